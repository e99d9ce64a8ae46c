# The demo inside L2: what the guest sees of the vmm's platform and devices.
echo "== L2: $(uname -r), $(nproc) CPUs, $(awk '/^MemTotal:/ { print $2 }' /proc/meminfo) KiB RAM"
echo "== ACPI tables:"; ls /sys/firmware/acpi/tables
echo "== PCI:"; for d in /sys/bus/pci/devices/*; do echo "  $(basename "$d") $(cat "$d/vendor"):$(cat "$d/device") class $(cat "$d/class")"; done
echo "== PCI hotplug slots: $(ls /sys/bus/pci/slots | wc -l)"
echo "== clock: $(date -u)"
echo "== disks: $(ls /sys/block | tr '\n' ' ')"
echo "== vda (in-VMM virtio-blk): $(head -c 32 /dev/vda)"
echo "== vdb (vhost-user-blk):    $(head -c 36 /dev/vdb)"
printf 'hello from the guest, 0123456' | dd of=/dev/vda conv=fsync 2>/dev/null
ip link set eth0 up; ip addr add 192.0.2.2/24 dev eth0
echo "== ping through the in-VMM virtio-net to the tap in L1:"; ping -c 5 -i 0.2 192.0.2.1 | tail -2
echo "== interrupts:"; grep -E "virtio" /proc/interrupts | awk '{ print "  " $NF ": " $2 + $3 }'
echo "== guest: waiting for an assigned NIC (the host adds it through the vmm's API)"
n=0; dev=""
while [ -z "$dev" ] && [ $n -lt 1200 ]; do
    dev=$(ls /sys/bus/pci/drivers/e1000e/ 2>/dev/null | grep '^0000:' | head -n1)
    [ -n "$dev" ] || sleep 0.1; n=$((n + 1))
done
if [ -n "$dev" ]; then
    # The interface appears once the driver's probe has registered it.
    n=0; ifc=""
    while [ -z "$ifc" ] && [ $n -lt 200 ]; do
        ifc=$(ls /sys/bus/pci/devices/$dev/net/ 2>/dev/null | head -n1); [ -n "$ifc" ] || sleep 0.1; n=$((n + 1))
    done
    echo "== guest: the e1000e driver bound to $dev ($ifc), hot-added through ACPI"
    ip link set $ifc up; ip addr add 198.51.100.2/24 dev $ifc
    n=0; until [ "$(cat /sys/class/net/$ifc/carrier 2>/dev/null)" = 1 ] || [ $n -ge 100 ]; do sleep 0.1; n=$((n + 1)); done
    n=0; until ping -c 1 -W 1 198.51.100.1 >/dev/null 2>&1 || [ $n -ge 20 ]; do n=$((n + 1)); done
    echo "== guest: $(ping -c 5 -i 0.2 198.51.100.1 | grep 'packets transmitted')"
    grep -E "$ifc|$dev" /proc/interrupts | awk '{ print "  " $NF ": " $2 + $3 }'
fi
echo "== guest: done with the assigned NIC"
n=0; while [ -n "$dev" ] && [ -e /sys/bus/pci/devices/$dev ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n + 1)); done
echo "== guest: the NIC is gone (ejected): $(ls /sys/bus/pci/devices | tr '\n' ' ')"
