//! A hostile guest against the real vmm and the real vhost-user-blk daemon (issue #20): the
//! ring-3 test guest's `hostile=` modes (see `tests/guest/src/hostile_io.rs`) attack a disk,
//! and this side checks what the host processes do meanwhile and after:
//! - the guest's reset (status 0) of the attacked device returns at once, and the device,
//!   and a second, sane disk, serve a plain request afterwards;
//! - the vmm (and the daemon) stay within a memory bound (peak RSS, VmHWM);
//! - SIGTERM ends the vmm within 2 s while the guest attacks again;
//! - a daemon serves the next frontend after the attacker's vmm is gone;
//! - each log holds a handful of lines per kind at most;
//! - CPU use while the guest attacks is printed (a loop the guest asks for keeps a device
//!   thread busy: that is its work, not a hang).
//!
//! Needs /dev/kvm and the workspace binaries (cargo build --workspace --bins); a missing
//! piece is a failure, not a skip. `HOSTILE_IO_BIN_DIR=DIR` takes `vmm` and `vhost-user-blk`
//! from DIR instead (each test failed that way on the binaries from before the fixes).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tests::guest::test_guest_elf;
use tests::host::{Daemon, NetNs, ScratchDir, Tap};
use tests::probe::{stamp_image, tsc_hz, verify_image, PROBE_MEMORY_MIB};

/// The sane disk's stamp seed (the guest's sane check writes stamps of this seed).
const SANE_SEED: u64 = 0x5eed_1234;
const SANE_SIZE: u64 = 4 << 20;
/// The loop needs 65536 sectors; the flood reads 254 MiB from sector 0.
const LOOP_DISK: u64 = 32 << 20;
const FLOOD_DISK: u64 = 256 << 20;
/// How long the guest attacks before its reset.
const HOLD_MS: u64 = 2000;
/// A process whose RSS passes this is killed at once (it would take the machine with it).
const RSS_KILL: u64 = 2 << 30;
/// The peak RSS bound: guest RAM plus this.
const RSS_SLACK: u64 = 64 << 20;
/// How long the guest's status write and the reset as a whole may take.
const RESET_WRITE_BOUND: Duration = Duration::from_millis(100);
const SIGTERM_BOUND: Duration = Duration::from_secs(2);
/// At most this many log lines of one kind (digits aside). The guest starts the attacked
/// device up to five times in a run (lay-out, attack, check, attack again; the next
/// frontend), and a back-end logs each start once.
const LINES_PER_KIND: usize = 6;

/// The binary `name` of this build, or of `$HOSTILE_IO_BIN_DIR` (to run the same attacks on
/// another build, e.g. one from before the fixes).
fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("HOSTILE_IO_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(tests::lab::profile_dir);
    let p = dir.join(name);
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

/// A field of /proc/PID/status in bytes (`VmHWM`, `VmRSS`).
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

/// utime + stime of a /proc stat file, in clock ticks.
fn ticks(stat: &str) -> Option<(String, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat[open + 1..close].to_string();
    let f: Vec<&str> = stat[close + 2..].split(' ').collect();
    Some((
        name,
        f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?,
    ))
}

/// Per-thread CPU ticks of `pid`: (thread name, ticks) by thread id.
fn thread_ticks(pid: u32) -> BTreeMap<String, (String, u64)> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in dir.flatten() {
        if let Some(v) = std::fs::read_to_string(t.path().join("stat"))
            .ok()
            .and_then(|s| ticks(&s))
        {
            out.insert(t.file_name().to_string_lossy().into_owned(), v);
        }
    }
    out
}

/// CPU use of `pid` over `span`: the process in percent of one CPU, and its busiest threads.
/// [`rss_guard`] watches `guard` meanwhile.
fn cpu_use(pid: u32, span: Duration, guard: &[(&str, u32)]) -> (f64, String) {
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let a = thread_ticks(pid);
    let start = Instant::now();
    while start.elapsed() < span {
        if let Some(k) = rss_guard(guard) {
            panic!("{k}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let span = start.elapsed();
    let b = thread_ticks(pid);
    let mut per: Vec<(String, f64)> = b
        .iter()
        .map(|(tid, (name, t))| {
            let before = a.get(tid).map_or(0, |x| x.1);
            (
                name.clone(),
                (t - before) as f64 / hz / span.as_secs_f64() * 100.0,
            )
        })
        .collect();
    per.sort_by(|x, y| y.1.total_cmp(&x.1));
    let total = per.iter().map(|x| x.1).sum();
    let top = per
        .iter()
        .take(3)
        .map(|(n, p)| format!("{n} {p:.0}%"))
        .collect::<Vec<_>>()
        .join(", ");
    (total, top)
}

/// Kills (SIGKILL, by PID) any of `pids` whose RSS passed [`RSS_KILL`]; says which.
fn rss_guard(pids: &[(&str, u32)]) -> Option<String> {
    for &(name, pid) in pids {
        if let Some(rss) = status_kib(pid, "VmRSS") {
            if rss > RSS_KILL {
                // SAFETY: `pid` is a child this test started and has not reaped (a zombie
                // has no VmRSS line, so it was not found above).
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                return Some(format!(
                    "{name} reached {} MiB RSS and was killed",
                    rss >> 20
                ));
            }
        }
    }
    None
}

/// Waits for a guest line containing `needle` in `serial` (the output of `vmm`'s guest),
/// guarding RSS meanwhile.
fn wait_line(
    vmm: &mut Daemon,
    serial: &Path,
    needle: &str,
    timeout: Duration,
    guard: &[(&str, u32)],
) -> String {
    let log = serial.to_path_buf();
    let mut killed = None;
    let r = vmm.wait_for(needle, timeout, || {
        if killed.is_none() {
            killed = rss_guard(guard);
        }
        killed.is_some() || find_line(&log, needle).is_some()
    });
    let guest = std::fs::read_to_string(serial).unwrap_or_default();
    if let Some(k) = killed {
        panic!("{k}\n{}\nguest:\n{guest}", vmm.log());
    }
    r.unwrap_or_else(|e| panic!("{e}\nguest:\n{guest}"));
    find_line(&log, needle).unwrap_or_default()
}

fn find_line(log: &Path, needle: &str) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    // Whole lines only: the serial output arrives a byte at a time.
    text.split_inclusive('\n')
        .find(|l| l.ends_with('\n') && l.contains(needle))
        .map(|l| l.trim_end().to_string())
}

/// The guest's reset report: how long its status write took and how long until the device
/// read 0 (its own TSC).
fn reset_times(
    vmm: &mut Daemon,
    serial: &Path,
    guard: &[(&str, u32)],
    what: &str,
) -> (Duration, Duration) {
    let reset = wait_line(
        vmm,
        serial,
        "hostile-result phase=reset ",
        Duration::from_secs(20),
        guard,
    );
    let write = cycles(field(&reset, "write_cycles"));
    let done = cycles(field(&reset, "done_cycles"));
    eprintln!("{what}: the guest's status write took {write:?}, the reset {done:?}");
    (write, done)
}

/// The reset within its bounds (status write, whole reset), then the reset device answers a
/// read.
fn check_reset(
    vmm: &mut Daemon,
    serial: &Path,
    guard: &[(&str, u32)],
    what: &str,
    (write, done): (Duration, Duration),
    (write_bound, reset_bound): (Duration, Duration),
) {
    assert!(
        write < write_bound,
        "{what}: the status write took {write:?}"
    );
    assert!(done < reset_bound, "{what}: the reset took {done:?}");
    wait_line(
        vmm,
        serial,
        "hostile-result phase=reset-device-read status=0",
        Duration::from_secs(20),
        guard,
    );
}

/// `KEY=N` of a `hostile-result` line.
fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in: {line}"))
}

fn cycles(c: u64) -> Duration {
    Duration::from_secs_f64(c as f64 / tsc_hz())
}

/// Log lines by kind: the guest's serial lines left out, the timestamp dropped, every
/// number and hex string replaced by `#`.
fn log_kinds(log: &str) -> BTreeMap<String, usize> {
    let mut kinds = BTreeMap::new();
    for line in log.lines().filter(|l| !l.starts_with("test-guest:")) {
        let line = match line.find("] ") {
            Some(i) if line.starts_with('[') => &line[i + 2..],
            _ => line,
        };
        let mut kind = String::new();
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            if c.is_ascii_digit() {
                if c == '0' && chars.peek() == Some(&'x') {
                    chars.next();
                }
                while chars.peek().is_some_and(|c| c.is_ascii_hexdigit()) {
                    chars.next();
                }
                kind.push('#');
            } else {
                kind.push(c);
            }
        }
        *kinds.entry(kind).or_insert(0) += 1;
    }
    kinds
}

fn assert_few_lines_per_kind(who: &str, log: &str) {
    let kinds = log_kinds(log);
    let worst = kinds.iter().max_by_key(|(_, n)| **n);
    eprintln!(
        "{who}: {} log lines of {} kinds, most of one kind: {:?}",
        kinds.values().sum::<usize>(),
        kinds.len(),
        worst
    );
    for (kind, n) in &kinds {
        assert!(
            *n <= LINES_PER_KIND,
            "{who} logged {n} lines of one kind ({kind}):\n{log}"
        );
    }
}

/// Sends SIGTERM to `p` and returns how long it took to exit (None: not within 10 s; it
/// is then killed by its drop).
fn sigterm(p: &mut Daemon) -> (Option<Duration>, Option<std::process::ExitStatus>) {
    let pid = p.pid() as libc::pid_t;
    // SAFETY: `pid` is a child this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if !p.is_running() {
            let took = start.elapsed();
            return (Some(took), p.wait().ok());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    (None, None)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Attack {
    Loop,
    Bounce,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Host {
    /// The in-VMM virtio-blk device.
    Vmm,
    /// Our vhost-user-blk daemon.
    Daemon,
}

/// The vmm running the guest in mode `attack` with `disks`; the guest's serial output goes
/// to `serial` (apart from the vmm's log lines, which could split its lines).
fn vmm_command(attack: &str, disks: &[String], serial: &Path) -> Command {
    let mut cmd = Command::new(bin("vmm"));
    let tsc_mhz = (tsc_hz() / 1e6).round() as u64;
    cmd.arg("--kernel")
        .arg(elf())
        .arg("--cmdline")
        .arg(format!(
            "hostile={attack} hold_ms={HOLD_MS} tsc_mhz={tsc_mhz}"
        ))
        .args(["--memory", &format!("{PROBE_MEMORY_MIB}M")])
        .args(disks)
        .arg("--serial")
        .arg(format!("file={}", serial.display()))
        .env("RUST_LOG", "info");
    cmd
}

/// The whole scenario for one attack on one host (see the module doc).
fn hostile(attack: Attack, host: Host) {
    let what = format!("{attack:?} on {host:?}");
    let dir = ScratchDir::new("hostile").expect("scratch dir");
    let target = dir.join("target.img");
    let size = match attack {
        Attack::Loop => LOOP_DISK,
        Attack::Bounce => FLOOD_DISK,
    };
    std::fs::File::create(&target)
        .and_then(|f| f.set_len(size))
        .expect("target image");
    let sane = dir.join("sane.img");
    stamp_image(&sane, SANE_SIZE, SANE_SEED).expect("sane image");
    let direct = attack == Attack::Bounce;
    let sock = dir.join("blk.sock");
    let mut daemon = (host == Host::Daemon).then(|| {
        let mut cmd = Command::new(bin("vhost-user-blk"));
        cmd.arg("--socket-path")
            .arg(&sock)
            .arg("--blk-file")
            .arg(&target)
            .env("RUST_LOG", "info");
        if direct {
            cmd.arg("--direct");
        }
        let mut d = Daemon::spawn("hostile-vublk", &mut cmd).expect("start vhost-user-blk");
        d.wait_for_path(&sock, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{e}"));
        d
    });
    let target_arg = match host {
        Host::Vmm => vec![
            "--disk".to_string(),
            format!(
                "path={}{}",
                target.display(),
                if direct { ",direct=on" } else { "" }
            ),
        ],
        Host::Daemon => vec![
            "--vhost-user-blk".to_string(),
            format!("socket={}", sock.display()),
        ],
    };
    let mut disks = target_arg.clone();
    disks.extend(["--disk".to_string(), format!("path={}", sane.display())]);
    let mode = match attack {
        Attack::Loop => "loop",
        Attack::Bounce => "bounce",
    };
    let serial = dir.join("serial.log");
    let mut vmm =
        Daemon::spawn("hostile-vmm", &mut vmm_command(mode, &disks, &serial)).expect("start vmm");
    vmm.set_grace(Duration::from_secs(1));
    let vmm_pid = vmm.pid();
    let daemon_pid = daemon.as_ref().map(Daemon::pid);
    let mut guard = vec![("vmm", vmm_pid)];
    if let Some(pid) = daemon_pid {
        guard.push(("vhost-user-blk", pid));
    }

    wait_line(&mut vmm, &serial, "armed", Duration::from_secs(60), &guard);
    std::thread::sleep(Duration::from_millis(200));
    let (vmm_cpu, vmm_top) = cpu_use(vmm_pid, Duration::from_secs(1), &guard);
    eprintln!("{what}: while attacked, vmm {vmm_cpu:.0}% CPU ({vmm_top})");
    let daemon_cpu = daemon_pid.map(|pid| {
        let (c, top) = cpu_use(pid, Duration::from_millis(500), &guard);
        eprintln!("{what}: while attacked, vhost-user-blk {c:.0}% CPU ({top})");
        c
    });

    let attacked = wait_line(
        &mut vmm,
        &serial,
        "hostile-result phase=attack",
        Duration::from_millis(HOLD_MS) + Duration::from_secs(20),
        &guard,
    );
    eprintln!("{what}: {attacked}");
    // The attack's requests were served, not refused (a refused one completes at once).
    let served = match attack {
        Attack::Loop => field(&attacked, "requests"),
        Attack::Bounce => field(&attacked, "served"),
    };
    assert!(
        served > 0,
        "{what}: the attack never got a request served:\n{}",
        std::fs::read_to_string(&serial).unwrap_or_default()
    );
    let (write, done) = reset_times(&mut vmm, &serial, &guard, &what);
    // A vhost-user back-end acknowledges the reset (GET_VRING_BASE) between two of its
    // budgets; the vmm's deadline for a reply is 3 s: well under it. A bounced request larger
    // than the bounce budget (254 MiB, piece by piece on the queue thread) is finished
    // before the queue stops: one such request, not a ring of them.
    let reset_bound = match (attack, host) {
        (Attack::Loop, Host::Vmm) => RESET_WRITE_BOUND,
        (Attack::Loop, Host::Daemon) => Duration::from_millis(500),
        (Attack::Bounce, _) => Duration::from_secs(1),
    };
    // The in-VMM device stops its queue threads within the status write; the vmm hands a
    // vhost-user reset to the device's control thread and the write returns at once.
    let write_bound = match host {
        Host::Vmm => reset_bound,
        Host::Daemon => RESET_WRITE_BOUND,
    };
    check_reset(
        &mut vmm,
        &serial,
        &guard,
        &what,
        (write, done),
        (write_bound, reset_bound),
    );
    wait_line(
        &mut vmm,
        &serial,
        "hostile-result phase=sane",
        Duration::from_secs(20),
        &guard,
    );
    wait_line(
        &mut vmm,
        &serial,
        "hostile: attacking until stopped",
        Duration::from_secs(20),
        &guard,
    );
    // The attack runs again; let it work a while, then stop the vmm.
    let (again, again_top) = cpu_use(vmm_pid, Duration::from_millis(700), &guard);
    eprintln!("{what}: attacked again, vmm {again:.0}% CPU ({again_top})");
    let vmm_hwm = status_kib(vmm_pid, "VmHWM").expect("vmm VmHWM");
    let guest_ram = u64::from(PROBE_MEMORY_MIB) << 20;
    let (took, status) = sigterm(&mut vmm);
    let log = vmm.log();
    let took =
        took.unwrap_or_else(|| panic!("{what}: the vmm was running 10 s after SIGTERM:\n{log}"));
    eprintln!(
        "{what}: vmm peak RSS {} MiB, ended {took:?} after SIGTERM",
        vmm_hwm >> 20
    );
    assert!(
        took < SIGTERM_BOUND,
        "{what}: SIGTERM took {took:?}:\n{log}"
    );
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{what}: vmm exit status {status:?}:\n{log}"
    );
    assert!(
        vmm_hwm < guest_ram + RSS_SLACK,
        "{what}: vmm peak RSS {} MiB (bound {} MiB)",
        vmm_hwm >> 20,
        (guest_ram + RSS_SLACK) >> 20
    );
    assert_few_lines_per_kind("vmm", &log);
    let bad = verify_image(&sane, SANE_SEED).expect("verify the sane image");
    assert!(bad.is_empty(), "{what}: sane disk sectors changed: {bad:?}");

    if let Some(mut d) = daemon.take() {
        // The attacker is gone: the daemon idles, then serves the next frontend.
        std::thread::sleep(Duration::from_millis(300));
        let (idle_cpu, idle_top) = cpu_use(d.pid(), Duration::from_millis(500), &[]);
        eprintln!(
            "{what}: vhost-user-blk after the attacker left: {idle_cpu:.0}% CPU ({idle_top}); while attacked {:.0}%",
            daemon_cpu.unwrap_or(0.0)
        );
        assert!(
            idle_cpu < 5.0,
            "{what}: the daemon still works for a frontend that left: {idle_cpu:.0}% CPU"
        );
        let next_serial = dir.join("serial-next.log");
        let mut next = Daemon::spawn(
            "hostile-vmm-next",
            &mut vmm_command("sane", &target_arg, &next_serial),
        )
        .expect("start the next vmm");
        let pid = d.pid();
        let deadline = Instant::now() + Duration::from_secs(60);
        while next.is_running() && Instant::now() < deadline {
            if let Some(k) = rss_guard(&[("vhost-user-blk", pid)]) {
                panic!("{what}: {k}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let status = next.stop().expect("next vmm");
        assert_eq!(
            status.code(),
            Some(1),
            "{what}: the next frontend was not served (guest exit 0 is status 1):\n{}\n{}\ndaemon:\n{}",
            std::fs::read_to_string(&next_serial).unwrap_or_default(),
            next.log(),
            d.log()
        );
        let guest = std::fs::read_to_string(&next_serial).unwrap_or_default();
        assert!(guest.contains("hostile: done"), "{guest}\n{}", next.log());
        let hwm = status_kib(pid, "VmHWM").expect("daemon VmHWM");
        let (took, status) = sigterm(&mut d);
        let log = d.log();
        let took = took
            .unwrap_or_else(|| panic!("{what}: the daemon was running 10 s after SIGTERM:\n{log}"));
        eprintln!(
            "{what}: vhost-user-blk peak RSS {} MiB, ended {took:?} after SIGTERM",
            hwm >> 20
        );
        assert!(
            took < SIGTERM_BOUND,
            "{what}: SIGTERM took {took:?}:\n{log}"
        );
        assert!(
            status.is_some_and(|s| s.success()),
            "{what}: daemon exit {status:?}:\n{log}"
        );
        assert!(
            hwm < guest_ram + RSS_SLACK,
            "{what}: daemon peak RSS {} MiB (bound {} MiB)",
            hwm >> 20,
            (guest_ram + RSS_SLACK) >> 20
        );
        assert_few_lines_per_kind("vhost-user-blk", &log);
    }
    let _ = vmm_cpu;
}

#[test]
fn self_re_arming_loop_on_the_in_vmm_disk() {
    hostile(Attack::Loop, Host::Vmm);
}

#[test]
fn self_re_arming_loop_through_the_vhost_user_blk_daemon() {
    hostile(Attack::Loop, Host::Daemon);
}

#[test]
fn aliased_bounce_flood_on_an_in_vmm_direct_disk() {
    hostile(Attack::Bounce, Host::Vmm);
}

#[test]
fn aliased_bounce_flood_through_the_vhost_user_blk_daemon_with_direct() {
    hostile(Attack::Bounce, Host::Daemon);
}

#[test]
fn log_kinds_ignore_numbers() {
    let log = "[2026-12-07T04:45:53.123Z WARN  vmm::virtio] disk0 q0: request (head 12) refused: bad\n\
               [2026-12-07T04:45:54.000Z WARN  vmm::virtio] disk0 q0: request (head 0x1f) refused: bad\n\
               test-guest: hostile: 1\n\
               vmm: other 3";
    let k = log_kinds(log);
    assert_eq!(k.len(), 2, "{k:?}");
    assert_eq!(k["disk# q#: request (head #) refused: bad"], 2, "{k:?}");
}

/// The guest's MAC on the flooded tap, and the addresses (documentation range).
const NET_MAC: &str = "52:54:00:c0:00:02";
const TAP_ADDR: &str = "192.0.2.1";
const GUEST_ADDR: &str = "192.0.2.2";

/// Sends UDP datagrams to the guest from inside `ns` (this thread only enters it) until
/// `stop`; returns how many the kernel took.
fn flood(ns: &str, stop: &AtomicBool) -> u64 {
    let f = std::fs::File::open(format!("/run/netns/{ns}")).expect("netns file");
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    // SAFETY: setns on this thread with an fd we own: only this thread changes network
    // namespace (CLONE_NEWNET affects the calling thread alone).
    let r = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
    let sock = std::net::UdpSocket::bind((TAP_ADDR, 0)).expect("bind in the namespace");
    let payload = [0x5au8; 1000];
    let mut sent = 0;
    while !stop.load(Ordering::Relaxed) {
        if sock.send_to(&payload, (GUEST_ADDR, 9)).is_ok() {
            sent += 1;
        }
    }
    sent
}

/// A counter of the tap's statistics, read inside the namespace.
fn tap_stat(ns: &NetNs, tap: &str, stat: &str) -> u64 {
    let out = ns
        .command("cat")
        .arg(format!("/sys/class/net/{tap}/statistics/{stat}"))
        .output()
        .expect("read tap statistics");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{stat} of {tap}: {out:?}"))
}

/// Frames keep arriving on the tap faster than the guest takes them: first with its 256 RX
/// buffers full and never refilled, then with every buffer handed back at once (RX always
/// has frames and room). TX and the control queue are served all along (a TX frame's wait
/// is bounded), and so are a reset and SIGTERM; the net thread's CPU use is printed. The
/// same through the vhost-user-net daemon, where the reset is the frontend stopping the
/// rings (GET_VRING_BASE) while the daemon's worker is kept busy by the flood.
///
/// This one also passes on the binaries from before the net budgets (6e08a15): here the
/// flood reaches the vmm at 10-20k frames/s and an RX round mostly ends on an empty tap or
/// on no buffers, never at its budget, so the old loop (which kept serving RX while its
/// budget ran out) never starved TX or the stop signal.
#[test]
fn net_flood_with_rx_stalled_then_refilled_on_the_in_vmm_device() {
    net_flood(Host::Vmm);
}

#[test]
fn net_flood_with_rx_stalled_then_refilled_through_the_vhost_user_net_daemon() {
    net_flood(Host::Daemon);
}

fn net_flood(host: Host) {
    let what = &format!("net flood on {host:?}");
    let ns = NetNs::new("hosns").expect("network namespace");
    // Two queue pairs on a multi-queue tap (see below).
    let mut tap = Tap::multi_queue("hostap").expect("tap");
    tap.move_to(&ns).expect("move tap");
    tap.add_addr(&format!("{TAP_ADDR}/24"))
        .expect("tap address");
    tap.up().expect("tap up");
    // No ARP: the guest answers none.
    ns.ip(&[
        "neigh",
        "replace",
        GUEST_ADDR,
        "lladdr",
        NET_MAC,
        "dev",
        tap.name(),
    ])
    .expect("static neighbour");
    let dir = ScratchDir::new("hostile").expect("scratch dir");
    let serial = dir.join("serial.log");
    let tsc_mhz = (tsc_hz() / 1e6).round() as u64;
    let sock = dir.join("net.sock");
    let mut daemon = (host == Host::Daemon).then(|| {
        let mut cmd = ns.command(bin("vhost-user-net"));
        cmd.arg("--socket-path")
            .arg(&sock)
            .args(["--tap", tap.name(), "--mac", NET_MAC, "--queues", "2"])
            .env("RUST_LOG", "info");
        let mut d = Daemon::spawn("hostile-vunet", &mut cmd).expect("start vhost-user-net");
        d.wait_for_path(&sock, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{e}"));
        d
    });
    // Two pairs: the harder version, and the vmm offers a vhost-user back-end's control
    // queue (the guest's attack needs one) only with more than one. The guest negotiates no
    // MQ: it uses pair 0 and the control queue as queue 2 (the device's is queue 4), and
    // the tap queue of pair 1 must be detached or half the flood goes where no ring reads.
    let nic = match host {
        Host::Vmm => [
            "--net".to_string(),
            format!("tap={},mac={NET_MAC},queues=2", tap.name()),
        ],
        Host::Daemon => [
            "--vhost-user-net".to_string(),
            format!("socket={},queues=2", sock.display()),
        ],
    };
    let mut cmd = ns.command(bin("vmm"));
    cmd.arg("--kernel")
        .arg(elf())
        .arg("--cmdline")
        .arg(format!(
            "hostile=netflood hold_ms={HOLD_MS} tsc_mhz={tsc_mhz}"
        ))
        .args(["--memory", &format!("{PROBE_MEMORY_MIB}M")])
        .args(nic)
        .arg("--serial")
        .arg(format!("file={}", serial.display()))
        .env("RUST_LOG", "info");
    let stop = AtomicBool::new(false);
    std::thread::scope(|sc| {
        let flooder = sc.spawn(|| flood(ns.name(), &stop));
        // Whatever fails below, the flood ends with the scope.
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = StopOnDrop(&stop);
        let mut vmm = Daemon::spawn("hostile-vmm-net", &mut cmd).expect("start vmm");
        vmm.set_grace(Duration::from_secs(1));
        let vmm_pid = vmm.pid();
        let mut guard = vec![("vmm", vmm_pid)];
        // The data path: the vmm's net0 thread, or the daemon's worker.
        let (pid, who, data_thread) = match &daemon {
            Some(d) => {
                guard.push(("vhost-user-net", d.pid()));
                (d.pid(), "vhost-user-net", "vring_worker")
            }
            None => (vmm_pid, "vmm", "net0"),
        };
        let guard = guard.as_slice();
        wait_line(&mut vmm, &serial, "armed", Duration::from_secs(60), guard);
        wait_line(
            &mut vmm,
            &serial,
            "hostile-result phase=rx-full",
            Duration::from_secs(30),
            guard,
        );
        let (to_vmm, tx_before) = (
            tap_stat(&ns, tap.name(), "tx_packets"),
            tap_stat(&ns, tap.name(), "rx_packets"),
        );
        let before = thread_ticks(pid);
        let (cpu, top) = cpu_use(pid, Duration::from_millis(700), guard);
        let after = thread_ticks(pid);
        eprintln!("{what}: RX stalled, flooded, guest sending: {who} {cpu:.0}% CPU ({top})");
        let stalled = wait_line(
            &mut vmm,
            &serial,
            "hostile-result phase=stalled",
            Duration::from_millis(HOLD_MS) + Duration::from_secs(20),
            guard,
        );
        eprintln!("{what}: {stalled}");
        assert!(field(&stalled, "requests") > 0, "{stalled}");
        assert!(field(&stalled, "ctrl") > 0, "{stalled}");
        let (cpu, top) = cpu_use(pid, Duration::from_millis(500), guard);
        eprintln!("{what}: RX refilled, flooded, guest sending: {who} {cpu:.0}% CPU ({top})");
        let attacked = wait_line(
            &mut vmm,
            &serial,
            "hostile-result phase=attack",
            Duration::from_millis(HOLD_MS) + Duration::from_secs(20),
            guard,
        );
        eprintln!("{what}: {attacked}");
        assert!(field(&attacked, "requests") > 0, "{attacked}");
        assert!(field(&attacked, "ctrl") > 0, "{attacked}");
        assert!(field(&attacked, "rx") > 0, "{attacked}");
        // A TX frame waits for RX rounds of at most a budget each, not for the flood.
        let tx_max = cycles(field(&attacked, "tx_max_cycles"));
        eprintln!("{what}: the longest TX wait while RX was flooded and refilled: {tx_max:?}");
        assert!(
            tx_max < Duration::from_secs(1),
            "{what}: a TX frame waited {tx_max:?} while RX was flooded"
        );
        let times = reset_times(&mut vmm, &serial, guard, what);
        check_reset(
            &mut vmm,
            &serial,
            guard,
            what,
            times,
            (RESET_WRITE_BOUND, RESET_WRITE_BOUND),
        );
        wait_line(
            &mut vmm,
            &serial,
            "hostile: attacking until stopped",
            Duration::from_secs(20),
            guard,
        );
        let (again, again_top) = cpu_use(pid, Duration::from_millis(700), guard);
        eprintln!("{what}: flooded again: {who} {again:.0}% CPU ({again_top})");
        let hwm = status_kib(pid, "VmHWM").expect("VmHWM");
        let (took, status) = sigterm(&mut vmm);
        let log = vmm.log();
        stop.store(true, Ordering::Relaxed);
        let sent = flooder.join().expect("flooder");
        let took = took
            .unwrap_or_else(|| panic!("{what}: the vmm was running 10 s after SIGTERM:\n{log}"));
        let (to_vmm_end, from_guest) = (
            tap_stat(&ns, tap.name(), "tx_packets"),
            tap_stat(&ns, tap.name(), "rx_packets"),
        );
        eprintln!(
            "{what}: {sent} datagrams sent, {} frames toward the guest, {} from the guest; \
             {who} peak RSS {} MiB, the vmm ended {took:?} after SIGTERM",
            to_vmm_end - to_vmm,
            from_guest - tx_before,
            hwm >> 20
        );
        assert!(
            took < SIGTERM_BOUND,
            "{what}: SIGTERM took {took:?}:\n{log}"
        );
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(0),
            "{what}: {status:?}:\n{log}"
        );
        let guest_ram = u64::from(PROBE_MEMORY_MIB) << 20;
        assert!(
            hwm < guest_ram + RSS_SLACK,
            "{what}: {who} peak RSS {} MiB",
            hwm >> 20
        );
        assert!(
            from_guest - tx_before >= field(&attacked, "requests") / 2,
            "{what}: the guest's frames did not reach the tap"
        );
        // While RX has no buffers the net thread only sends what the guest sends (printed:
        // a thread spinning on the flooded tap would take a whole CPU, 70 ticks).
        let net_ticks: u64 = after
            .iter()
            .filter(|(_, (name, _))| name.starts_with(data_thread))
            .map(|(tid, (_, t))| t - before.get(tid).map_or(0, |b| b.1))
            .sum();
        eprintln!(
            "{what}: with RX stalled the {data_thread} thread used {net_ticks} ticks in 700 ms"
        );
        assert_few_lines_per_kind("vmm", &log);
        if let Some(d) = daemon.as_mut() {
            // The frontend is gone: the daemon waits for the next one, and ends on SIGTERM.
            let (took, status) = sigterm(d);
            let log = d.log();
            assert!(
                took.is_some_and(|t| t < SIGTERM_BOUND),
                "{what}: the daemon took {took:?} to end after SIGTERM:\n{log}"
            );
            assert_eq!(
                status.and_then(|s| s.code()),
                Some(0),
                "{what}: the daemon's status {status:?}:\n{log}"
            );
            assert_few_lines_per_kind("vhost-user-net", &log);
        }
    });
}
