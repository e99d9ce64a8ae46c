# The demo inside L1 (the lab): our vmm boots Debian's cloud kernel in L2 with KVM.
. /lab/lib.sh
echo "== L1: $(uname -r), $(nproc) CPUs, /dev/kvm from kvm-amd, IOMMU groups: $(ls /sys/kernel/iommu_groups | wc -l)"
echo "== vmm --kernel $L2_KERNEL --initramfs $L2_INITRD --cpus 2 --memory 512M"
t0=$(lab_uptime)
{ vmm --kernel "$L2_KERNEL" --initramfs "$L2_INITRD" --cmdline "$L2_CMDLINE" \
    --cpus 2 --memory 512M --exit-stats /tmp/stats.json </dev/null 2>&1; echo "VMM-RC $?"; } \
    | lab_console "$t0" l2 | tee /tmp/l2.log
check vmm-exit-0 grep -q '^VMM-RC 0$' /tmp/l2.log
check l2-init grep -q '^L2-INIT' /tmp/l2.log
echo "== exit counters: $(cat /tmp/stats.json)"
lab_finish
