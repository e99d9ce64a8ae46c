# The demo inside L2: what the guest sees of the vmm's platform and devices.
echo "== L2: $(uname -r), $(nproc) CPUs, $(awk '/^MemTotal:/ { print $2 }' /proc/meminfo) KiB RAM"
echo "== ACPI tables:"; ls /sys/firmware/acpi/tables
echo "== PCI:"; for d in /sys/bus/pci/devices/*; do echo "  $(basename "$d") $(cat "$d/vendor"):$(cat "$d/device") class $(cat "$d/class")"; done
echo "== clock: $(date -u)"
echo "== disks: $(ls /sys/block | tr '\n' ' ')"
echo "== vda (in-VMM virtio-blk): $(head -c 32 /dev/vda)"
echo "== vdb (vhost-user-blk):    $(head -c 36 /dev/vdb)"
printf 'hello from the guest, 0123456' | dd of=/dev/vda conv=fsync 2>/dev/null
ip link set eth0 up; ip addr add 192.0.2.2/24 dev eth0
echo "== ping through the in-VMM virtio-net to the tap in L1:"; ping -c 5 -i 0.2 192.0.2.1 | tail -2
echo "== interrupts:"; grep -E "virtio" /proc/interrupts | awk '{ print "  " $NF ": " $2 + $3 }'
