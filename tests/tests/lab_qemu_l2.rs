//! L2 boots inside L1 with QEMU+KVM as the VMM (the reference VMM in the lab): the cloud
//! kernel and the L2 initramfs from scripts/lab, a busybox init that prints a marker,
//! `nproc` and MemTotal, then powers off. Measures QEMU start to the L2 init marker.
//! The same scenario with the project's `vmm` comes when it boots Linux.

use std::time::Duration;

use tests::lab::Scenario;

const L1: &str = r#"
. /lab/lib.sh
check dev-kvm [ -c /dev/kvm ]
t0=$(lab_uptime)
echo "LAB-VAL qemu-start $t0"
l2_qemu -smp 2 -m 512 | lab_console "$t0" l2 | tee /tmp/l2.log
check l2-init grep -q '^L2-INIT' /tmp/l2.log
check l2-exit grep -q '^L2-EXIT 0$' /tmp/l2.log
echo "LAB-T l2-total $(lab_elapsed $t0)"
lab_finish
"#;

const L2: &str = r#"
echo "L2-MARKER hello from L2 $(uname -r)"
echo "L2-NPROC $(nproc)"
echo "L2-MEMTOTAL $(awk '/^MemTotal:/ { print $2 }' /proc/meminfo)"
"#;

#[test]
fn lab_qemu_l2_boots() {
    let run = Scenario::new("lab_qemu_l2", L1)
        .l2_script(L2)
        .with_qemu()
        .timeout(Duration::from_secs(300))
        .run_ok();
    run.assert_ok("l2-init");
    run.assert_ok("l2-exit");
    let marker = run.assert_line("L2-MARKER hello from L2");
    assert!(marker.text.contains("cloud-amd64"), "{}", marker.text);
    assert_eq!(run.field("L2-NPROC"), Some("2"));
    let mem_kib: u64 = run
        .field("L2-MEMTOTAL")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no L2-MEMTOTAL line"));
    assert!(
        (400 * 1024..=512 * 1024).contains(&mem_kib),
        "L2 MemTotal {mem_kib} KiB for -m 512"
    );

    let l2_init = run
        .timing("l2-init")
        .unwrap_or_else(|| panic!("no LAB-T l2-init"));
    // The same, seen from the host: when the lines arrived on L1's console.
    let host = match (run.find("LAB-VAL qemu-start"), run.find("L2-INIT")) {
        (Some(start), Some(init)) => (init.at - start.at).as_secs_f64(),
        _ => f64::NAN,
    };
    eprintln!(
        "lab_qemu_l2: QEMU start to L2 init {l2_init:.2} s (in L1), {host:.2} s (host clock); \
         whole run {:.1} s",
        run.duration.as_secs_f64()
    );
}
