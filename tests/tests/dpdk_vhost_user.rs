//! DPDK's vhost-user back-end, which no one here wrote: `dpdk-testpmd` with the `net_vhost`
//! vdev (Debian's `dpdk-dev`) behind our vmm's `--vhost-user-net`, with the ring-3 probe
//! guest (`probe=net`) on this host's /dev/kvm.
//!
//! testpmd runs without hugepages or PCI devices (`--no-huge -m 256 --no-pci`) in its
//! `icmpecho` forward mode: it answers the probe's ARP requests and ICMP echo requests on
//! the vhost port, which is exactly the round trip the probe counts (`macswap` would send
//! the probe's own requests back, which the probe rightly does not take for replies).
//! `--stats-period=1` keeps it non-interactive without reading stdin and prints the port's
//! counters every second; at SIGTERM it prints its forward statistics.
//!
//! 1. testpmd listens, the vmm connects: every echo comes back (the probe's counters), and
//!    testpmd counted RX and TX packets.
//! 2. testpmd connects (`client=1`) to the vmm's `server=on`: the same; then testpmd is
//!    SIGKILLed and started again while the probe is idle between two phases (`phases=2
//!    gap_ms=`): the vmm takes the new connection, and the second phase's echoes all come
//!    back through the new testpmd, whose counters show them.
//! 3. The same restart with no gap to speak of: the probe's second phase sends its first
//!    frame while no testpmd is there; it waits in the ring and goes out through the new
//!    testpmd (the vmm saw the old one die with nothing pending, so resuming at the used
//!    index neither loses nor doubles a request).
//!
//! Installs nothing: without `dpdk-testpmd` the tests fail and say how to get it
//! (`apt-get install -y dpdk-dev`; `scripts/test` does that).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tests::guest::test_guest_elf;
use tests::host::{unique_name, Daemon, ScratchDir};
use tests::probe::{self, tsc_hz, ProbeConfig, ProbeOutput, ProbeResult};

const N: u32 = 2000;
const TIMEOUT: Duration = Duration::from_secs(120);
/// The probe's idle time between its phases in the restart test: testpmd is killed and
/// started again in it (its start takes about 3 s here).
const GAP_MS: u32 = 15_000;

fn testpmd_bin() -> PathBuf {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join("dpdk-testpmd"))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "dpdk-testpmd is missing: install Debian's dpdk-dev (apt-get install -y dpdk-dev; scripts/test does it)"
        )
    })
}

fn vmm() -> PathBuf {
    let p = probe::vmm_binary();
    assert!(
        p.is_file(),
        "{} is missing: build the workspace binaries first (cargo build --workspace --bins)",
        p.display()
    );
    p
}

fn elf() -> PathBuf {
    let p = test_guest_elf();
    assert!(p.is_file(), "test guest missing at {}", p.display());
    p
}

/// A testpmd: its process (stopped on drop: SIGTERM, then SIGKILL) and its EAL runtime
/// directory (removed on drop).
struct Testpmd {
    daemon: Daemon,
    runtime_dir: PathBuf,
}

impl std::ops::Deref for Testpmd {
    type Target = Daemon;
    fn deref(&self) -> &Daemon {
        &self.daemon
    }
}

impl std::ops::DerefMut for Testpmd {
    fn deref_mut(&mut self) -> &mut Daemon {
        &mut self.daemon
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        if self.daemon.pid() != 0 {
            let _ = self.daemon.stop();
        }
        let _ = std::fs::remove_dir_all(&self.runtime_dir);
    }
}

/// testpmd as the vhost-user-net back-end at `sock`: listening, or connecting with
/// `client`. Its log is kept under `target/test-logs`.
fn testpmd(sock: &Path, client: bool) -> Testpmd {
    let vdev = format!(
        "net_vhost0,iface={},queues=1{}",
        sock.display(),
        if client { ",client=1" } else { "" }
    );
    // Its own EAL runtime directory: other testpmds on this machine do not collide.
    let prefix = unique_name("tpmd");
    // SAFETY: geteuid has no preconditions and touches no memory.
    let root = unsafe { libc::geteuid() } == 0;
    // EAL's choice: /var/run for root, else $XDG_RUNTIME_DIR (or /tmp).
    let runtime_dir = match std::env::var_os("XDG_RUNTIME_DIR") {
        _ if root => PathBuf::from("/var/run"),
        Some(d) => PathBuf::from(d),
        None => PathBuf::from("/tmp"),
    }
    .join("dpdk")
    .join(&prefix);
    let mut cmd = Command::new(testpmd_bin());
    cmd.args(["--no-huge", "-m", "256", "--no-pci"])
        .arg(format!("--file-prefix={prefix}"))
        .args(["--vdev", &vdev])
        .args(["--log-level=lib.vhost.config:debug"])
        .args([
            "--",
            "--forward-mode=icmpecho",
            "--total-num-mbufs=8192",
            "--stats-period=1",
        ]);
    let mut daemon = Daemon::spawn("dpdk-testpmd", &mut cmd).expect("start dpdk-testpmd");
    daemon.set_grace(Duration::from_secs(10));
    Testpmd {
        daemon,
        runtime_dir,
    }
}

/// The last RX and TX packet counts testpmd printed (its periodic port statistics, or the
/// forward statistics at exit).
fn testpmd_counts(log: &str) -> Option<(u64, u64)> {
    let last = |key: &str| {
        log.lines().rev().find_map(|l| {
            let at = l.find(key)?;
            l[at + key.len()..].split_whitespace().next()?.parse().ok()
        })
    };
    Some((last("RX-packets:")?, last("TX-packets:")?))
}

/// Waits until testpmd's periodic statistics show at least `want` packets each way.
fn wait_counts(d: &mut Daemon, want: u64, what: &str) {
    let path = d.log_path().to_path_buf();
    d.wait_for(what, Duration::from_secs(10), || {
        std::fs::read_to_string(&path)
            .ok()
            .and_then(|l| testpmd_counts(&l))
            .is_some_and(|(rx, tx)| rx >= want && tx >= want)
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

/// The vmm running the probe, in the background (output in its log).
fn vmm_probe(vhost_arg: &str, cfg: &ProbeConfig, extra: &str) -> Daemon {
    let mut cmd = Command::new(vmm());
    cmd.arg("--kernel")
        .arg(elf())
        .arg("--cmdline")
        .arg(format!("{} {extra}", cfg.cmdline()))
        .arg("--memory")
        .arg(format!("{}M", probe::PROBE_MEMORY_MIB))
        .arg("--vhost-user-net")
        .arg(vhost_arg)
        .env("RUST_LOG", "info");
    Daemon::spawn("vmm-dpdk", &mut cmd).expect("start vmm")
}

/// Waits for the vmm to end by itself; its output as a [`ProbeOutput`].
fn finish(vmm: &mut Daemon, timeout: Duration, what: &str) -> ProbeOutput {
    let start = Instant::now();
    while vmm.is_running() {
        if start.elapsed() > timeout {
            let _ = vmm.stop();
            panic!(
                "{what}: the vmm did not end within {timeout:?}; its output:\n{}",
                vmm.log()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = vmm.wait().expect("vmm status");
    ProbeOutput {
        status,
        stdout: vmm.log(),
        stderr: String::new(),
        elapsed: start.elapsed(),
    }
}

/// The probe's results; fails unless the guest exited with code 0 and every phase got
/// every reply, verified.
fn all_replies(
    out: &ProbeOutput,
    phases: usize,
    what: &str,
    testpmd_log: &str,
) -> Vec<ProbeResult> {
    assert_eq!(
        out.guest_exit_code(),
        Some(0),
        "{what}: exit status {}\nvmm output:\n{}\ntestpmd:\n{testpmd_log}",
        out.status,
        out.stdout
    );
    let results = out
        .results()
        .unwrap_or_else(|e| panic!("{what}: {e}\n{}", out.stdout));
    assert_eq!(
        results.len(),
        phases,
        "{what}: {results:#?}\n{}",
        out.stdout
    );
    let hz = tsc_hz();
    for r in &results {
        assert_eq!(r.test, "net-icmp-rr", "{r:#?}");
        assert_eq!(r.n, u64::from(N), "{r:#?}");
        assert_eq!(r.verify_failures, 0, "{r:#?}");
        assert_eq!(r.errors, 0, "{r:#?}");
        eprintln!(
            "{what}: {} n={}: {} ({:.0} round trips/s)",
            r.test,
            r.n,
            r.summary(hz),
            r.ops_per_sec(hz)
        );
    }
    results
}

/// testpmd's counters: every echo (and ARP) the probe sent was received and answered.
fn assert_counts(d: &Testpmd, at_least: u64, what: &str) -> (u64, u64) {
    let log = d.log();
    let (rx, tx) = testpmd_counts(&log)
        .unwrap_or_else(|| panic!("{what}: no packet counts in testpmd's output:\n{log}"));
    eprintln!("{what}: testpmd RX-packets {rx}, TX-packets {tx}");
    assert!(
        rx >= at_least && tx >= at_least,
        "{what}: testpmd counted RX {rx}, TX {tx}, expected at least {at_least} each:\n{log}"
    );
    (rx, tx)
}

#[test]
fn testpmd_listening_answers_every_probe_echo() {
    let dir = ScratchDir::new("dpdk").expect("scratch dir");
    let sock = dir.join("vhost.sock");
    let mut pmd = testpmd(&sock, false);
    pmd.wait_for_path(&sock, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    let cfg = ProbeConfig::net(N, "192.0.2.2", "192.0.2.1");
    let t = Instant::now();
    let mut vmm = vmm_probe(&format!("socket={},id=dpdk0", sock.display()), &cfg, "");
    let out = finish(&mut vmm, TIMEOUT, "vmm + testpmd");
    eprintln!(
        "vmm + testpmd: the probe ran {:.1} s",
        t.elapsed().as_secs_f64()
    );
    all_replies(&out, 1, "vmm + testpmd", &pmd.log());
    // SIGTERM: testpmd prints its forward statistics and exits.
    let status = pmd.stop().expect("stop testpmd");
    let log = pmd.log();
    assert!(
        log.contains("Forward statistics for port 0"),
        "testpmd ({status}) did not print its statistics:\n{log}"
    );
    // Every echo of the run and its warm-up, plus the ARP exchange.
    assert_counts(&pmd, u64::from(N + cfg.warmup), "vmm + testpmd");
}

#[test]
fn testpmd_client_reconnects_to_vmm_server_after_sigkill() {
    let dir = ScratchDir::new("dpdk").expect("scratch dir");
    let sock = dir.join("vhost.sock");
    let cfg = ProbeConfig::net(N, "192.0.2.2", "192.0.2.1");
    let t = Instant::now();
    let mut vmm = vmm_probe(
        &format!("socket={},server=on,id=dpdk0", sock.display()),
        &cfg,
        &format!("phases=2 gap_ms={GAP_MS}"),
    );
    vmm.wait_for_path(&sock, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut first = testpmd(&sock, true);
    // Phase 1 done: the probe idles for GAP_MS.
    let vmm_log = vmm.log_path().to_path_buf();
    vmm.wait_for("the probe's first phase", TIMEOUT, || {
        std::fs::read_to_string(&vmm_log).is_ok_and(|l| l.contains("probe-result "))
    })
    .unwrap_or_else(|e| panic!("{e}\ntestpmd:\n{}", first.log()));
    let phase1 = Instant::now();
    // Its port statistics come once a second: wait for the ones that show phase 1.
    let want = u64::from(N + cfg.warmup);
    wait_counts(&mut first, want, "phase 1 in testpmd's counters");
    let (rx1, tx1) = assert_counts(&first, want, "phase 1 (first testpmd)");
    let pid = libc::pid_t::try_from(first.pid()).expect("testpmd pid");
    // SAFETY: SIGKILL to the testpmd this test started (our child, not yet reaped).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let status = first.wait().expect("reap testpmd");
    eprintln!("first testpmd killed: {status}");

    let restart = Instant::now();
    let mut second = testpmd(&sock, true);
    vmm.wait_for("the vmm's reconnect", Duration::from_secs(30), || {
        std::fs::read_to_string(&vmm_log).is_ok_and(|l| l.contains("dpdk0: reconnected"))
    })
    .unwrap_or_else(|e| panic!("{e}\ntestpmd:\n{}", second.log()));
    eprintln!(
        "second testpmd connected {:.1} s after the restart, {:.1} s into the probe's {} s gap",
        restart.elapsed().as_secs_f64(),
        phase1.elapsed().as_secs_f64(),
        GAP_MS / 1000
    );
    assert!(
        phase1.elapsed() < Duration::from_millis(u64::from(GAP_MS)),
        "the restart took longer than the probe's gap; the vmm's log:\n{}",
        vmm.log()
    );
    let out = finish(&mut vmm, TIMEOUT, "vmm server + testpmd client");
    eprintln!(
        "vmm server + testpmd client: the probe ran {:.1} s",
        t.elapsed().as_secs_f64()
    );
    all_replies(&out, 2, "vmm server + testpmd client", &second.log());
    assert!(
        out.stdout.contains("queues resumed"),
        "the vmm did not resume the queues:\n{}",
        out.stdout
    );
    // Phase 2 went through the new testpmd only.
    wait_counts(&mut second, want, "phase 2 in testpmd's counters");
    let (rx2, tx2) = assert_counts(&second, want, "phase 2 (restarted testpmd)");
    eprintln!("testpmd counters: first RX {rx1} TX {tx1}; restarted RX {rx2} TX {tx2}");
    let _ = second.stop();
}

/// testpmd is SIGKILLed as soon as the probe's first phase ends and the probe's second
/// phase starts (its first ARP request) before the new testpmd is there: that frame waits
/// in the ring, the vmm resumes the rings when testpmd is back (nothing was pending when
/// the old one died, so nothing it took can be lost or doubled; DPDK has no inflight
/// tracking) and the second phase gets every reply.
#[test]
fn a_frame_sent_while_testpmd_restarts_goes_out_through_the_new_one() {
    let dir = ScratchDir::new("dpdk").expect("scratch dir");
    let sock = dir.join("vhost.sock");
    let cfg = ProbeConfig::net(N, "192.0.2.2", "192.0.2.1");
    let mut vmm = vmm_probe(
        &format!("socket={},server=on,id=dpdk0", sock.display()),
        &cfg,
        "phases=2 gap_ms=3000",
    );
    vmm.wait_for_path(&sock, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut first = testpmd(&sock, true);
    let vmm_log = vmm.log_path().to_path_buf();
    vmm.wait_for("the probe's first phase", TIMEOUT, || {
        std::fs::read_to_string(&vmm_log).is_ok_and(|l| l.contains("probe-result "))
    })
    .unwrap_or_else(|e| panic!("{e}\ntestpmd:\n{}", first.log()));
    let pid = libc::pid_t::try_from(first.pid()).expect("testpmd pid");
    // SAFETY: SIGKILL to the testpmd this test started (our child, not yet reaped).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let killed = Instant::now();
    let _ = first.wait();
    // The second phase's ARP request goes into the ring while no back-end is there.
    vmm.wait_for("the probe's second phase", Duration::from_secs(10), || {
        std::fs::read_to_string(&vmm_log).is_ok_and(|l| l.contains("probe: net: phase 2"))
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let log = vmm.log();
    let (gone, phase2) = (
        log.find("is gone (its socket hung up)"),
        log.find("probe: net: phase 2"),
    );
    assert!(
        gone.is_some_and(|g| phase2.is_some_and(|p| g < p)),
        "the vmm did not see testpmd go before the probe's second phase (a machine too busy for the 3 s gap?):\n{log}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let mut second = testpmd(&sock, true);
    let out = finish(&mut vmm, TIMEOUT, "frame sent during the restart");
    eprintln!(
        "frame sent during the restart: the probe ended {:.1} s after the kill",
        killed.elapsed().as_secs_f64()
    );
    all_replies(&out, 2, "frame sent during the restart", &second.log());
    assert!(
        out.stdout.contains("queues resumed"),
        "the vmm did not resume the queues:\n{}",
        out.stdout
    );
    let want = u64::from(N + cfg.warmup);
    wait_counts(&mut second, want, "phase 2 in testpmd's counters");
    assert_counts(&second, want, "phase 2 (restarted testpmd)");
    let _ = second.stop();
}
