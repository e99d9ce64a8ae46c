//! Our `vmm` boots Debian's cloud kernel + a busybox initramfs to userspace inside the lab
//! (L1 = QEMU TCG with kvm-amd), with 2 vCPUs and 512 MiB, and exits 0 after `poweroff -f`.

use std::time::Duration;

use tests::lab::Scenario;
use tests::probe::ExitStats;

const L1: &str = r#"
. /lab/lib.sh
check dev-kvm [ -c /dev/kvm ]
t0=$(lab_uptime)
{ vmm --kernel "$L2_KERNEL" --initramfs "$L2_INITRD" --cmdline "$L2_CMDLINE" \
    --cpus 2 --memory 512M --exit-stats /tmp/stats.json </dev/null 2>&1; echo "VMM-RC $?"; } \
    | lab_console "$t0" l2 | tee /tmp/l2.log
check vmm-exit-0 grep -q '^VMM-RC 0$' /tmp/l2.log
check l2-init grep -q '^L2-INIT' /tmp/l2.log
check l2-exit grep -q '^L2-EXIT 0$' /tmp/l2.log
echo "LAB-VAL exit-stats $(cat /tmp/stats.json)"
lab_finish
"#;

const L2: &str = r#"
echo "L2-NPROC $(nproc)"
echo "L2-MEMTOTAL $(awk '/^MemTotal:/ { print $2 }' /proc/meminfo)"
"#;

#[test]
fn vmm_boots_linux_to_userspace() {
    let run = Scenario::new("lab_vmm_boot", L1)
        .l2_script(L2)
        .timeout(Duration::from_secs(300))
        .run_ok();
    run.assert_ok("l2-init");
    run.assert_ok("l2-exit");
    assert_eq!(run.field("L2-NPROC"), Some("2"));
    let mem_kib: u64 = run
        .field("L2-MEMTOTAL")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no L2-MEMTOTAL line"));
    assert!(
        (400 * 1024..=512 * 1024).contains(&mem_kib),
        "L2 MemTotal {mem_kib} KiB for --memory 512M"
    );
    // Linux selects a PCI config register at 0xCF8 before every access at 0xCFC (over a
    // hundred while it probes; the generic kernel's AGP bridge scan adds ~16,000): KVM
    // buffers those writes, so only the 0xCFC accesses exit, and the guest still found its
    // devices and booted (2 vCPUs).
    let stats = run
        .value("exit-stats")
        .map(ExitStats::parse)
        .unwrap_or_else(|| panic!("no exit-stats value"))
        .expect("exit stats JSON");
    let config_exits = stats.pio.get("pci-config").copied().unwrap_or(0);
    assert!(
        stats.coalesced >= 100 && config_exits < stats.coalesced * 11 / 10,
        "PCI config address writes should be coalesced: {stats:?}"
    );
}
