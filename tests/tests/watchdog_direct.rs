//! `vmm --watchdog SECS` on this host's /dev/kvm with the ring-3 test guest: a guest that
//! stops making progress (a vCPU halted with interrupts off; a ring-3 loop that never exits
//! to the VMM) gets one report with every vCPU's state, once per stall, and the vmm still
//! ends at once on SIGTERM; a guest that does I/O gets no report.

use std::path::PathBuf;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use tests::guest::test_guest_elf;
use tests::host::Daemon;

fn vmm() -> PathBuf {
    let p = tests::lab::profile_dir().join("vmm");
    assert!(
        p.is_file(),
        "{} is missing: build the workspace binaries first (cargo build --workspace --bins)",
        p.display()
    );
    p
}

fn start(cmdline: &str, cpus: &str) -> Daemon {
    let elf = test_guest_elf();
    assert!(elf.is_file(), "test guest missing at {}", elf.display());
    let mut cmd = Command::new(vmm());
    cmd.args(["--kernel"])
        .arg(&elf)
        .args([
            "--cmdline",
            cmdline,
            "--memory",
            "32M",
            "--cpus",
            cpus,
            "--watchdog",
            "1",
        ])
        .env("RUST_LOG", "info");
    Daemon::spawn("watchdog", &mut cmd).expect("start vmm")
}

fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

/// Waits for the report, lets three more periods pass (no second report for one stall),
/// then checks SIGTERM ends the vmm within 2 s. Returns the log.
fn report_then_term(vm: &mut Daemon, cpus: usize) -> String {
    let path = vm.log_path().to_path_buf();
    vm.wait_for("the watchdog's report", Duration::from_secs(20), || {
        let log = String::from_utf8_lossy(&std::fs::read(&path).unwrap_or_default()).into_owned();
        count(&log, "watchdog: vcpu ") >= cpus
    })
    .unwrap_or_else(|e| panic!("{e}"));
    thread::sleep(Duration::from_secs(3));
    vm.set_grace(Duration::from_secs(10));
    let t = Instant::now();
    let status = vm.stop().expect("stop vmm");
    let took = t.elapsed();
    let log = vm.log();
    assert!(
        took < Duration::from_secs(2),
        "SIGTERM took {took:?} (status {status:?}); log:\n{log}"
    );
    assert_eq!(
        count(&log, "watchdog: the guest made no progress"),
        1,
        "one report per stall; log:\n{log}"
    );
    assert_eq!(count(&log, "watchdog: vcpu "), cpus, "log:\n{log}");
    log
}

/// The state line the watchdog logged for vCPU 0.
fn vcpu0_state(log: &str) -> String {
    log.lines()
        .find_map(|l| {
            l.split_once("watchdog: vcpu 0: ")
                .map(|(_, s)| s.to_string())
        })
        .unwrap_or_default()
}

#[test]
fn a_vcpu_halted_with_interrupts_off_is_reported_once_with_its_state() {
    let mut vm = start("fault=halt", "1");
    let log = report_then_term(&mut vm, 1);
    assert!(
        log.contains("the guest made no progress for 1 s (vcpu 0 halted with interrupts off)"),
        "log:\n{log}"
    );
    let state = vcpu0_state(&log);
    assert!(state.starts_with("halted rip=0x"), "state: {state}");
    // KVM_MP_STATE_HALTED, in ring 0 (the trap handler), IF clear.
    assert!(state.contains(" mp_state=3"), "state: {state}");
    assert!(state.contains(" cpl=0 "), "state: {state}");
    let rflags = state
        .split_whitespace()
        .find_map(|w| w.strip_prefix("rflags=0x"))
        .and_then(|v| u64::from_str_radix(v, 16).ok())
        .unwrap_or_else(|| panic!("no rflags: {state}"));
    assert_eq!(rflags & (1 << 9), 0, "IF set in {state}");
}

#[test]
fn a_guest_spinning_without_exits_is_reported_for_every_vcpu() {
    let mut vm = start("fault=spin", "2");
    let log = report_then_term(&mut vm, 2);
    assert!(
        log.contains("(no vCPU exited to the VMM while the guest ran)"),
        "log:\n{log}"
    );
    // vCPU 0 spins in ring 3.
    let state = vcpu0_state(&log);
    assert!(state.starts_with("running rip=0x"), "state: {state}");
    assert!(state.contains(" cpl=3 "), "state: {state}");
}

#[test]
fn a_guest_doing_io_is_not_reported() {
    // The blk probe keeps its vCPU exiting (doorbells, config reads) for a few seconds.
    let dir = tests::host::ScratchDir::new("wd-io").expect("scratch dir");
    let img = dir.join("disk.img");
    tests::probe::stamp_image(&img, 8 << 20, 1).expect("stamp image");
    let elf = test_guest_elf();
    let mut cmd = Command::new(vmm());
    cmd.arg("--kernel")
        .arg(&elf)
        .args([
            "--cmdline",
            "probe=blk n=20000 warmup=100 seed=1 tests=read,write",
            "--memory",
            "64M",
            "--watchdog",
            "1",
            "--disk",
        ])
        .arg(format!("path={}", img.display()))
        .env("RUST_LOG", "info");
    let mut vm = Daemon::spawn("watchdog-io", &mut cmd).expect("start vmm");
    let t = Instant::now();
    let status = vm.wait().expect("wait vmm");
    let log = vm.log();
    // Debug-exit 0 (the probe passed) ends the vmm with (0 << 1) | 1.
    assert_eq!(status.code(), Some(1), "log:\n{log}");
    assert!(log.contains("test-guest: probe: done"), "log:\n{log}");
    assert!(
        t.elapsed() > Duration::from_secs(2),
        "the probe ran {:?}: too short to say anything about the watchdog; log:\n{log}",
        t.elapsed()
    );
    assert_eq!(count(&log, "watchdog: "), 0, "log:\n{log}");
}
