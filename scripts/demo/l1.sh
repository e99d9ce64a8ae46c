# The demo inside L1 (the lab): our vmm boots Debian's kernel in L2 with KVM and gives it
# devices of all three models:
#   hypervisor-direct: virtio-blk (disk0) and virtio-net (net0, tap dtap0) inside the vmm;
#   split driver: virtio-blk (vublk) served by our vhost-user-blk daemon;
#   passthrough: L1's e1000e, assigned to the running guest through the control API
#   (`vmm-remote add-device`), pinged through, and taken back (`remove-device`).
. /lab/lib.sh
API=$LAB_TMP/api.sock
# api ARGS...: one control API call, shown as typed and answered.
api() {
    echo "== \$ vmm-remote --api-socket $API $*"
    vmm-remote --api-socket $API "$@" 2>&1 | sed 's/^/   /'
}
echo "== L1: $(uname -r), $(nproc) CPUs, /dev/kvm from kvm-amd, IOMMU groups: $(ls /sys/kernel/iommu_groups | wc -l)"
dd if=/dev/zero of=$LAB_TMP/disk0.img bs=1M count=32 2>/dev/null
printf 'hello from the host, in-VMM disk' | dd of=$LAB_TMP/disk0.img conv=notrunc 2>/dev/null
dd if=/dev/zero of=$LAB_TMP/vublk.img bs=1M count=32 2>/dev/null
printf 'hello from the host, vhost-user disk' | dd of=$LAB_TMP/vublk.img conv=notrunc 2>/dev/null
vhost-user-blk --socket-path $LAB_TMP/vublk.sock --blk-file $LAB_TMP/vublk.img 2>$LAB_TMP/vublk.log &
daemon=$!
n=0; while [ ! -S $LAB_TMP/vublk.sock ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
$IP tuntap add dev dtap0 mode tap vnet_hdr
$IP addr add 192.0.2.1/24 dev dtap0
$IP link set dtap0 up
# The NIC to assign ($NIC_BDF) leaves L1's e1000e driver for vfio-pci; its twin stays in L1
# as the guest's peer.
echo "== \$ passthrough bind $NIC_BDF"
passthrough bind $NIC_BDF 2>&1 | sed 's/^/   /'
peer=$(ls /sys/bus/pci/devices/$PEER_NIC_BDF/net/)
$IP addr add 198.51.100.1/24 dev $peer
$IP link set $peer up
echo "== vmm --cpus 2 --memory 512M --disk path=$LAB_TMP/disk0.img --net tap=dtap0 --vhost-user-blk socket=$LAB_TMP/vublk.sock --api-socket path=$API"
t0=$(lab_uptime)
( { vmm --kernel "$L2_GENERIC_KERNEL" --initramfs "$L2_GENERIC_INITRD" --cmdline "$L2_CMDLINE" \
    --cpus 2 --memory 512M --disk path=$LAB_TMP/disk0.img,id=disk0 --net tap=dtap0,id=net0 \
    --vhost-user-blk socket=$LAB_TMP/vublk.sock,id=vublk --api-socket path=$API \
    --exit-stats $LAB_TMP/stats.json </dev/null 2>&1; echo "VMM-RC $?"; } \
    | lab_console "$t0" l2 | tee $LAB_TMP/l2.log ) &
if wait_for $LAB_TMP/l2.log '^== guest: waiting for an assigned NIC' 300; then
    api ping
    api info
    api add-device path=/sys/bus/pci/devices/$NIC_BDF,id=nic0
    wait_for $LAB_TMP/l2.log '^== guest: done with the assigned NIC' 120
    api counters
    api remove-device nic0
    n=0; while vmm-remote --api-socket $API info 2>/dev/null | grep -q '"nic0": {' && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
    echo "== the guest ejected nic0 and the vmm released it; the host device can be assigned again:"
    echo "== \$ passthrough check $NIC_BDF --memory 512M"
    passthrough check $NIC_BDF --memory 512M 2>&1 | sed 's/^/   /'
fi
wait_for $LAB_TMP/l2.log '^VMM-RC' 120
check vmm-exit-0 grep -q '^VMM-RC 0$' $LAB_TMP/l2.log
check l2-init grep -q '^L2-INIT' $LAB_TMP/l2.log
check nic-pinged grep -q '^== guest: 5 packets transmitted, 5 packets received' $LAB_TMP/l2.log
echo "== what the guest wrote to the in-VMM disk: $(head -c 29 $LAB_TMP/disk0.img)"
echo "== exit counters: $(cat $LAB_TMP/stats.json)"
echo "== \$ passthrough unbind $NIC_BDF"
passthrough unbind $NIC_BDF 2>&1 | sed 's/^/   /'
kill "$daemon"
$IP link del dtap0
lab_finish
