//! The latency probe (test guest with `probe=blk|net`) on this host's /dev/kvm: on our vmm
//! with its in-VMM virtio-blk and virtio-net, and the same ELF under QEMU's virtio-blk. A
//! short run (n=1000) that must complete with every read verified, so the probe stays
//! working; the latencies are printed (not asserted: timing is the bench's job).
//!
//! Needs /dev/kvm, root (network namespaces, taps) and qemu-system-x86_64 with qboot; a missing
//! piece is a failure, not a skip.

use std::path::Path;
use std::time::Duration;

use tests::guest::test_guest_elf;
use tests::host::{Daemon, NetNs, ScratchDir, Tap};
use tests::probe::{
    self, run_probe, stamp_image, tsc_hz, verify_image, ExitStats, ProbeConfig, ProbeOutput,
    ProbeResult, EXIT_PROBE_FAILED,
};

const N: u32 = 1000;
const SEED: u64 = 0x5eed_1234;
const IMAGE_SIZE: u64 = 32 << 20;
const TIMEOUT: Duration = Duration::from_secs(120);

fn vmm() -> std::path::PathBuf {
    let p = probe::vmm_binary();
    assert!(
        p.is_file(),
        "{} is missing: build the workspace binaries first (cargo build --workspace --bins)",
        p.display()
    );
    p
}

fn elf() -> std::path::PathBuf {
    let p = test_guest_elf();
    assert!(p.is_file(), "test guest missing at {}", p.display());
    p
}

/// The run's results; fails unless the guest exited with code 0.
fn results_of(out: &ProbeOutput, what: &str) -> Vec<ProbeResult> {
    assert_eq!(
        out.guest_exit_code(),
        Some(0),
        "{what}: exit status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    let results = out
        .results()
        .unwrap_or_else(|e| panic!("{what}: {e}\nstdout:\n{}", out.stdout));
    let hz = tsc_hz();
    for r in &results {
        eprintln!(
            "{what}: {} n={} qd={}: {} ({:.0} ops/s, {} doorbells, {} skipped)",
            r.test,
            r.n,
            r.qd,
            r.summary(hz),
            r.ops_per_sec(hz),
            r.notifies,
            r.notifies_suppressed
        );
    }
    results
}

/// Exactly the tests named, each with `n` samples, no verify failure, no error.
fn assert_all_verified(results: &[ProbeResult], tests: &[&str], n: u64) {
    let names: Vec<&str> = results.iter().map(|r| r.test.as_str()).collect();
    assert_eq!(names, tests, "{results:#?}");
    for r in results {
        assert_eq!(r.n, n, "{r:#?}");
        assert_eq!(r.verify_failures, 0, "{r:#?}");
        assert_eq!(r.errors, 0, "{r:#?}");
        assert!(r.cycles.min > 0 && r.elapsed_cycles > 0, "{r:#?}");
    }
}

fn counter(map: &std::collections::BTreeMap<String, u64>, name: &str) -> u64 {
    *map.get(name)
        .unwrap_or_else(|| panic!("exit stats have no counter for {name}: {map:?}"))
}

#[test]
fn blk_probe_on_vmm_verifies_every_read() {
    let dir = ScratchDir::new("probe").expect("scratch dir");
    let img = dir.join("disk.img");
    stamp_image(&img, IMAGE_SIZE, SEED).expect("stamp image");
    let stats = dir.join("exits.json");
    let cfg = ProbeConfig::blk(N, SEED, "read,write,qd32");
    let mut cmd = probe::vmm_command(&vmm(), &elf(), &cfg);
    cmd.args(["--disk", &probe::vmm_disk_arg(&img)])
        .arg("--exit-stats")
        .arg(&stats);
    let out = run_probe(&mut cmd, TIMEOUT).expect("vmm probe run");
    let results = results_of(&out, "vmm blk");
    assert_all_verified(
        &results,
        &["blk-read-qd1", "blk-write-qd1", "blk-read-qd32"],
        u64::from(N),
    );
    let bad = verify_image(&img, SEED).expect("verify image");
    assert!(
        bad.is_empty(),
        "sectors no longer stamped after the run: {bad:?}"
    );

    // Doorbells go to an ioeventfd: no notify reaches the vmm, and the device's MMIO exits
    // are the set-up's only (far fewer than the 3300 I/Os).
    let stats = ExitStats::read(&stats).expect("exit stats");
    let ios: u64 = results.iter().map(|r| r.n + r.warmup).sum();
    let notify_exits = counter(&stats.notify_exits, "disk0");
    let mmio = counter(&stats.mmio, "disk0");
    let total = stats.total;
    eprintln!(
        "vmm blk: {ios} I/Os, {total} exits to userspace ({:.3} per I/O), disk0 mmio {mmio}, notify exits {notify_exits}",
        total as f64 / ios as f64
    );
    assert_eq!(notify_exits, 0, "{stats:?}");
    assert!(mmio < 100, "disk0 MMIO exits per I/O: {stats:?}");
    // The probe's PCI set-up selects every config register at 0xCF8 and reads or writes it
    // at 0xCFC: KVM buffers the 0xCF8 writes, so only the 0xCFC accesses exit.
    let config_exits = counter(&stats.pio, "pci-config");
    assert!(
        stats.coalesced >= 20 && stats.coalesced >= config_exits * 9 / 10,
        "PCI config address writes should be coalesced, not exits: {stats:?}"
    );
}

/// The probe fails loudly when the image does not hold what it expects: reads of an image
/// stamped with another seed all fail verification, and the guest exits with 0x72.
#[test]
fn blk_probe_detects_a_wrong_image() {
    let dir = ScratchDir::new("probe").expect("scratch dir");
    let img = dir.join("disk.img");
    stamp_image(&img, 1 << 20, SEED).expect("stamp image");
    let mut cfg = ProbeConfig::blk(50, SEED + 1, "read");
    cfg.warmup = 0;
    let mut cmd = probe::vmm_command(&vmm(), &elf(), &cfg);
    cmd.args([
        "--disk",
        &format!("{},readonly=on", probe::vmm_disk_arg(&img)),
    ]);
    let out = run_probe(&mut cmd, TIMEOUT).expect("vmm probe run");
    assert_eq!(
        out.guest_exit_code(),
        Some(EXIT_PROBE_FAILED),
        "stdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
    let results = out.results().expect("results");
    assert_eq!(results.len(), 1, "{}", out.stdout);
    assert_eq!(results[0].verify_failures, 50, "{:#?}", results[0]);
    assert!(!results[0].ok());
}

#[test]
fn net_probe_on_vmm_gets_every_echo_reply() {
    let ns = NetNs::new("prbns").expect("network namespace");
    let mut tap = Tap::new("prbtap").expect("tap");
    tap.move_to(&ns).expect("move tap");
    tap.add_addr("192.0.2.1/24").expect("tap address");
    tap.up().expect("tap up");
    let dir = ScratchDir::new("probe").expect("scratch dir");
    let stats = dir.join("exits.json");
    let cfg = ProbeConfig::net(N, "192.0.2.2", "192.0.2.1");
    let mut cmd = ns.command(vmm());
    cmd.args(probe::vmm_args(&elf(), &cfg))
        .args(["--net", &format!("tap={}", tap.name())])
        .arg("--exit-stats")
        .arg(&stats);
    let out = run_probe(&mut cmd, TIMEOUT).expect("vmm net probe run");
    let results = results_of(&out, "vmm net");
    assert_all_verified(&results, &["net-icmp-rr"], u64::from(N));
    let stats = ExitStats::read(&stats).expect("exit stats");
    let notify_exits = counter(&stats.notify_exits, "net0");
    eprintln!(
        "vmm net: {} exits to userspace, net0 mmio {}, notify exits {notify_exits}",
        stats.total,
        counter(&stats.mmio, "net0")
    );
    assert_eq!(notify_exits, 0, "{stats:?}");
    assert!(counter(&stats.mmio, "net0") < 100, "{stats:?}");
}

/// The same ELF on QEMU's virtio-net (the probe's driver against a second implementation).
#[test]
fn net_probe_on_qemu_gets_every_echo_reply() {
    let ns = NetNs::new("prbns").expect("network namespace");
    let mut tap = Tap::new("prbtap").expect("tap");
    tap.move_to(&ns).expect("move tap");
    tap.add_addr("192.0.2.1/24").expect("tap address");
    tap.up().expect("tap up");
    let cfg = ProbeConfig::net(N, "192.0.2.2", "192.0.2.1");
    let qemu = probe::qemu_command(&elf(), &cfg);
    let mut cmd = ns.command(qemu.get_program());
    cmd.args(qemu.get_args())
        .args(probe::qemu_net_args(tap.name()));
    let out = run_probe(&mut cmd, TIMEOUT).expect("QEMU net probe run");
    let results = results_of(&out, "qemu net");
    assert_all_verified(&results, &["net-icmp-rr"], u64::from(N));
}

/// The same ELF, unchanged, on QEMU's virtio-blk (io_uring + iothread): the probe assigns the
/// BAR qboot leaves unassigned and verifies every read.
#[test]
fn blk_probe_on_qemu_verifies_every_read() {
    assert!(
        Path::new(probe::QBOOT).is_file(),
        "{} missing: install qemu-system-x86 (Debian)",
        probe::QBOOT
    );
    let dir = ScratchDir::new("probe").expect("scratch dir");
    let img = dir.join("disk.img");
    stamp_image(&img, IMAGE_SIZE, SEED).expect("stamp image");
    let cfg = ProbeConfig::blk(N, SEED, "read,write,qd32");
    let mut cmd = probe::qemu_command(&elf(), &cfg);
    cmd.args(probe::qemu_blk_args(&img));
    let out = run_probe(&mut cmd, TIMEOUT).expect("QEMU probe run");
    let results = results_of(&out, "qemu blk");
    assert_all_verified(
        &results,
        &["blk-read-qd1", "blk-write-qd1", "blk-read-qd32"],
        u64::from(N),
    );
    let bad = verify_image(&img, SEED).expect("verify image");
    assert!(
        bad.is_empty(),
        "sectors no longer stamped after the run: {bad:?}"
    );
}

/// Without the device it is asked to probe, the guest says so and exits with 0x72; a bad
/// probe argument is a command-line error (the guest's panic, 0x70) that names the word.
#[test]
fn probe_without_device_or_with_bad_arguments_fails_with_a_message() {
    let cfg = ProbeConfig::blk(10, SEED, "read");
    let out = run_probe(&mut probe::vmm_command(&vmm(), &elf(), &cfg), TIMEOUT).expect("vmm run");
    assert_eq!(
        out.guest_exit_code(),
        Some(EXIT_PROBE_FAILED),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("probe: virtio-blk: no virtio device of this type on PCI bus 0"),
        "{}",
        out.stdout
    );
    assert!(out.results().expect("no result lines").is_empty());

    for (cmdline, message) in [
        ("probe=disk", "probe=disk: expected blk or net"),
        (
            "probe=blk tests=read,trim",
            "tests: trim: expected read, write or qd32",
        ),
        ("probe=net ip=192.0.2", "ip=192.0.2: not an IPv4 address"),
        ("probe=blk n=lots", "n=lots: not a number"),
    ] {
        let mut cmd = std::process::Command::new(vmm());
        cmd.arg("--kernel")
            .arg(elf())
            .args(["--cmdline", cmdline, "--memory", "128M"]);
        let out = run_probe(&mut cmd, TIMEOUT).expect("vmm run");
        assert_eq!(
            out.guest_exit_code(),
            Some(0x70),
            "{cmdline}: {}",
            out.stdout
        );
        assert!(
            out.stdout.contains(message),
            "{cmdline}: '{message}' not in:\n{}",
            out.stdout
        );
    }
}

/// Our `vhost-user-blk` binary, built with the workspace.
fn blk_daemon_bin() -> std::path::PathBuf {
    let bin = tests::lab::profile_dir().join("vhost-user-blk");
    assert!(
        bin.is_file(),
        "{} is missing: build the workspace binaries first (cargo build --workspace --bins)",
        bin.display()
    );
    bin
}

/// The probe through our vmm's vhost-user-blk frontend and our vhost-user-blk daemon: the
/// third device model gets the same verified run.
#[test]
fn blk_probe_on_vmm_with_vhost_user_daemon_verifies_every_read() {
    let daemon_bin = blk_daemon_bin();
    let dir = ScratchDir::new("probe").expect("scratch dir");
    let img = dir.join("disk.img");
    stamp_image(&img, IMAGE_SIZE, SEED).expect("stamp image");
    let sock = dir.join("blk.sock");
    let mut daemon = Daemon::spawn(
        "vhost-user-blk",
        std::process::Command::new(&daemon_bin)
            .arg("--socket-path")
            .arg(&sock)
            .arg("--blk-file")
            .arg(&img),
    )
    .expect("start vhost-user-blk");
    daemon
        .wait_for_path(&sock, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    let stats = dir.join("exits.json");
    let cfg = ProbeConfig::blk(N, SEED, "read,write,qd32");
    let mut cmd = probe::vmm_command(&vmm(), &elf(), &cfg);
    cmd.arg("--vhost-user-blk")
        .arg(format!("socket={}", sock.display()))
        .arg("--exit-stats")
        .arg(&stats);
    let out = run_probe(&mut cmd, TIMEOUT).expect("vmm probe run");
    let results = results_of(&out, "vmm vhost-user-blk");
    assert_all_verified(
        &results,
        &["blk-read-qd1", "blk-write-qd1", "blk-read-qd32"],
        u64::from(N),
    );
    let stats = ExitStats::read(&stats).expect("exit stats");
    assert_eq!(counter(&stats.notify_exits, "vublk0"), 0, "{stats:?}");
    // The daemon flushes on SIGTERM; then the image must still verify.
    let status = daemon.stop().expect("stop the daemon");
    assert!(status.success(), "daemon: {status}\n{}", daemon.log());
    let bad = verify_image(&img, SEED).expect("verify image");
    assert!(
        bad.is_empty(),
        "sectors no longer stamped after the run: {bad:?}"
    );
}

/// The roles of the socket swapped: the vmm listens (`server=on`), our daemon connects
/// (`--connect`) and keeps retrying until the vmm is there; the probe verifies every read
/// and write through it; at exit the vmm removes the socket it created (its devices are
/// torn down: the PCI root and the buses refer to each other, and once nothing dropped
/// them), and the daemon is still up, waiting for the next frontend.
#[test]
fn blk_probe_on_vmm_listening_for_a_connecting_daemon() {
    let daemon_bin = blk_daemon_bin();
    let dir = ScratchDir::new("probe").expect("scratch dir");
    let img = dir.join("disk.img");
    stamp_image(&img, IMAGE_SIZE, SEED).expect("stamp image");
    let sock = dir.join("blk.sock");
    // The daemon first: it connects as soon as the vmm listens.
    let mut daemon = Daemon::spawn(
        "vhost-user-blk",
        std::process::Command::new(&daemon_bin)
            .arg("--connect")
            .arg(&sock)
            .arg("--blk-file")
            .arg(&img),
    )
    .expect("start vhost-user-blk");
    let cfg = ProbeConfig::blk(N, SEED, "read,write,qd32");
    let mut cmd = probe::vmm_command(&vmm(), &elf(), &cfg);
    cmd.arg("--vhost-user-blk").arg(format!(
        "socket={},server=on,connect_timeout_ms=20000",
        sock.display()
    ));
    let out = run_probe(&mut cmd, TIMEOUT).expect("vmm probe run");
    let results = results_of(&out, "vmm listening, vhost-user-blk --connect");
    assert_all_verified(
        &results,
        &["blk-read-qd1", "blk-write-qd1", "blk-read-qd32"],
        u64::from(N),
    );
    assert!(
        !sock.exists(),
        "the vmm left its listening socket {} behind",
        sock.display()
    );
    assert!(
        daemon.is_running(),
        "the daemon exited with its frontend:\n{}",
        daemon.log()
    );
    let status = daemon.stop().expect("stop the daemon");
    assert!(status.success(), "daemon: {status}\n{}", daemon.log());
    let bad = verify_image(&img, SEED).expect("verify image");
    assert!(bad.is_empty(), "sectors no longer stamped: {bad:?}");
}

/// SIGTERM in the middle of a guest's I/O stops the VM cleanly and at once: exit status 0,
/// the signal logged, the exit counters written (the teardown ran), the image intact. The
/// vmm's signal watcher sleeps on an eventfd the handler writes (no timer), so a broken
/// wake-up path shows here as a vmm that never stops.
#[test]
fn sigterm_stops_the_vmm_cleanly_during_io() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::sync::mpsc;
    use std::time::Instant;

    let dir = ScratchDir::new("probe").expect("scratch dir");
    let img = dir.join("disk.img");
    stamp_image(&img, IMAGE_SIZE, SEED).expect("stamp image");
    let stats = dir.join("exits.json");
    // Far more reads than the test waits for (seconds of them): the guest is busy when the
    // signal comes.
    let cfg = ProbeConfig::blk(2_000_000, SEED, "read");
    let mut cmd = probe::vmm_command(&vmm(), &elf(), &cfg);
    cmd.args(["--disk", &probe::vmm_disk_arg(&img)])
        .arg("--exit-stats")
        .arg(&stats)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start vmm");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // The probe is reading once the guest found its disk (then it only reads).
    let started = Instant::now();
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|l: &String| l.contains("probe: virtio-blk at"))
    {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => seen.push(l),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the guest did not start within 30 s: {seen:?}");
            }
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let pid = libc::pid_t::try_from(child.id()).expect("pid");
    // SAFETY: sends SIGTERM to the vmm this test started and has not reaped yet.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let signalled = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait vmm") {
            break s;
        }
        if signalled.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the vmm was still running 10 s after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stop_time = signalled.elapsed();
    let _ = reader.join();
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut stderr);
    }
    eprintln!(
        "vmm stopped {:.0} ms after SIGTERM (guest up {:.1} s)",
        stop_time.as_secs_f64() * 1e3,
        started.elapsed().as_secs_f64()
    );
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    assert!(
        stderr.contains("received signal 15"),
        "the signal is not in the log:\n{stderr}"
    );
    assert!(
        ExitStats::read(&stats).is_ok(),
        "no exit counters: the teardown did not run\n{stderr}"
    );
    let bad = verify_image(&img, SEED).expect("verify image");
    assert!(bad.is_empty(), "sectors changed: {bad:?}");
}

/// A vhost-user back-end that stops answering (SIGSTOPped right after the vmm connected,
/// before the guest's driver starts the device) freezes neither the guest's vCPU nor the
/// vmm's exit: the activation's messages miss their deadline (`timeout_ms=1000`), and
/// SIGTERM ends the vmm within 5 s.
#[test]
fn sigterm_ends_the_vmm_within_5_s_while_its_vhost_user_daemon_is_stopped() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::sync::mpsc;
    use std::time::Instant;

    let daemon_bin = blk_daemon_bin();
    let dir = ScratchDir::new("probe").expect("scratch dir");
    let img = dir.join("disk.img");
    stamp_image(&img, IMAGE_SIZE, SEED).expect("stamp image");
    let sock = dir.join("blk.sock");
    let mut daemon = Daemon::spawn(
        "vhost-user-blk",
        std::process::Command::new(&daemon_bin)
            .arg("--socket-path")
            .arg(&sock)
            .arg("--blk-file")
            .arg(&img),
    )
    .expect("start vhost-user-blk");
    daemon
        .wait_for_path(&sock, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    let daemon_pid = libc::pid_t::try_from(daemon.pid()).expect("daemon pid");
    let cfg = ProbeConfig::blk(2_000_000, SEED, "read");
    let mut cmd = probe::vmm_command(&vmm(), &elf(), &cfg);
    cmd.arg("--vhost-user-blk")
        .arg(format!("socket={},timeout_ms=1000", sock.display()))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start vmm");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    // The vmm logs the back-end's features once it negotiated them at boot: stop the
    // daemon then, before the guest's driver gets to DRIVER_OK.
    while !seen
        .iter()
        .any(|l: &String| l.contains("vublk0: vhost-user back-end"))
    {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => seen.push(l),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the vmm did not connect to its back-end within 30 s: {seen:?}");
            }
        }
    }
    // SAFETY: stops the daemon this test started (its process group leader, not reaped).
    assert_eq!(unsafe { libc::kill(daemon_pid, libc::SIGSTOP) }, 0);
    // The guest runs meanwhile: the activation's deadline passes.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        child.try_wait().expect("wait vmm").is_none(),
        "the vmm ended on its own"
    );
    let pid = libc::pid_t::try_from(child.id()).expect("pid");
    // SAFETY: sends SIGTERM to the vmm this test started and has not reaped yet.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let signalled = Instant::now();
    let ended = loop {
        if child.try_wait().expect("wait vmm").is_some() {
            break Some(signalled.elapsed());
        }
        if signalled.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // SAFETY: lets the daemon this test stopped go on, so that it can be stopped.
    unsafe { libc::kill(daemon_pid, libc::SIGCONT) };
    let _ = reader.join();
    seen.extend(rx.try_iter());
    let log = seen.join("\n");
    let ended =
        ended.unwrap_or_else(|| panic!("the vmm was still running 15 s after SIGTERM:\n{log}"));
    eprintln!(
        "vmm ended {:.0} ms after SIGTERM:\n{log}",
        ended.as_secs_f64() * 1e3
    );
    assert!(ended < Duration::from_secs(5), "took {ended:?}:\n{log}");
    let _ = daemon.stop();
}
