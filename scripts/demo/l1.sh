# The demo inside L1 (the lab): our vmm boots Debian's cloud kernel in L2 with KVM and
# gives it devices of the two models that exist so far:
#   hypervisor-direct: virtio-blk (disk0) and virtio-net (net0, tap dtap0) inside the vmm;
#   split driver: virtio-blk (vublk) served by our vhost-user-blk daemon.
. /lab/lib.sh
echo "== L1: $(uname -r), $(nproc) CPUs, /dev/kvm from kvm-amd, IOMMU groups: $(ls /sys/kernel/iommu_groups | wc -l)"
dd if=/dev/zero of=/tmp/disk0.img bs=1M count=32 2>/dev/null
printf 'hello from the host, in-VMM disk' | dd of=/tmp/disk0.img conv=notrunc 2>/dev/null
dd if=/dev/zero of=/tmp/vublk.img bs=1M count=32 2>/dev/null
printf 'hello from the host, vhost-user disk' | dd of=/tmp/vublk.img conv=notrunc 2>/dev/null
vhost-user-blk --socket-path /tmp/vublk.sock --blk-file /tmp/vublk.img 2>/tmp/vublk.log &
daemon=$!
n=0; while [ ! -S /tmp/vublk.sock ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
$IP tuntap add dev dtap0 mode tap vnet_hdr
$IP addr add 192.0.2.1/24 dev dtap0
$IP link set dtap0 up
echo "== vmm --cpus 2 --memory 512M --disk path=/tmp/disk0.img --net tap=dtap0 --vhost-user-blk socket=/tmp/vublk.sock"
t0=$(lab_uptime)
{ vmm --kernel "$L2_KERNEL" --initramfs "$L2_INITRD" --cmdline "$L2_CMDLINE" \
    --cpus 2 --memory 512M --disk path=/tmp/disk0.img,id=disk0 --net tap=dtap0,id=net0 \
    --vhost-user-blk socket=/tmp/vublk.sock,id=vublk \
    --exit-stats /tmp/stats.json </dev/null 2>&1; echo "VMM-RC $?"; } \
    | lab_console "$t0" l2 | tee /tmp/l2.log
check vmm-exit-0 grep -q '^VMM-RC 0$' /tmp/l2.log
check l2-init grep -q '^L2-INIT' /tmp/l2.log
echo "== what the guest wrote to the in-VMM disk: $(head -c 29 /tmp/disk0.img)"
echo "== exit counters: $(cat /tmp/stats.json)"
kill "$daemon"
$IP link del dtap0
lab_finish
