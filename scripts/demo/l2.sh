# The demo inside L2: show what the guest sees of the vmm's platform.
echo "== L2: $(uname -r), $(nproc) CPUs, $(awk '/^MemTotal:/ { print $2 }' /proc/meminfo) KiB RAM"
echo "== ACPI tables:"; ls /sys/firmware/acpi/tables
echo "== PCI:"; for d in /sys/bus/pci/devices/*; do echo "  $(basename "$d") $(cat "$d/vendor"):$(cat "$d/device") class $(cat "$d/class")"; done
echo "== clock: $(date -u)"
echo "== dmesg (ACPI, PCI, serial):"; dmesg | grep -E "ACPI: (RSDP|XSDT|FACP|APIC|MCFG|DSDT)|PCI host bridge|ttyS0 at|rtc_cmos.*registered|smp: Brought" | sed 's/^/  /'
