//! The sandbox of the `vhost-user-net` binary, seen from outside while it serves a test
//! frontend on a real tap (root, /dev/net/tun) (issue #23's "must show"): every thread
//! filtered and without new privileges, running as the `--user` given; a queue pair worker
//! that makes a syscall outside its list is killed with one line naming the thread and
//! the syscall (`on`), or reported and kept serving (`log`); a path outside the Landlock
//! set is refused with EACCES.

#[path = "../../vhost-user-blk/tests/common/mod.rs"]
mod common;

use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::*;
use vhost::VhostBackend;
use vm_memory::{Bytes, GuestAddress};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-net");
static N: AtomicU32 = AtomicU32::new(0);

/// A daemon (stderr kept) on a uniquely named tap, deleted in Drop after the daemon.
struct NetDaemon {
    d: Daemon,
    tap: String,
}

impl Drop for NetDaemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.d.child.take() {
            stop_child(&mut c);
        }
        let _ = Command::new("ip")
            .args(["link", "delete", &self.tap])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

fn start(extra: &[&str]) -> NetDaemon {
    assert!(
        std::path::Path::new("/dev/net/tun").exists(),
        "this test needs /dev/net/tun and root"
    );
    let tap = format!(
        "vus{}x{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::SeqCst)
    );
    let mut args = vec!["--tap", tap.as_str(), "--mac", "52:54:00:aa:bb:cc"];
    args.extend_from_slice(extra);
    let d = Daemon::start_logged(BIN, tempdir("vun-sandbox"), &args);
    NetDaemon { d, tap }
}

/// A negotiated connection that sent one frame on TX0 (the worker's first request).
struct Sent {
    _fe: vhost::vhost_user::Frontend,
    m: GuestMem,
    call: vmm_sys_util::eventfd::EventFd,
    _kick: vmm_sys_util::eventfd::EventFd,
}

const SIZE: u16 = 16;

fn send_frame(d: &Daemon) -> Sent {
    send_frame_on(d, 3)
}

/// [`send_frame`] on a daemon with `queues` queues (2 per pair, and the control queue).
fn send_frame_on(d: &Daemon, queues: u64) -> Sent {
    let (mut fe, _) = negotiate(&d.socket, queues);
    let m = GuestMem::new(1 << 20);
    fe.set_mem_table(&[m.region_info()]).expect("SET_MEM_TABLE");
    let (kick, call) = setup_queue(&mut fe, &m, 1, SIZE);
    // 12-byte virtio_net_hdr_v1 (zero) + a 60-byte broadcast frame.
    let mut frame = vec![0u8; 12];
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&[0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc]);
    frame.extend_from_slice(&[0x88, 0xb5]);
    frame.resize(12 + 60, 0x5a);
    m.mem.write_slice(&frame, GuestAddress(0x4000)).unwrap();
    put_desc(&m, 0, 0x4000, frame.len() as u32, 0, 0);
    publish(&m, SIZE, 0, 0);
    kick.write(1).unwrap();
    Sent {
        _fe: fe,
        m,
        call,
        _kick: kick,
    }
}

impl Sent {
    /// The frame went out (used entry, notification).
    fn assert_done(&self, d: &Daemon) {
        assert!(
            wait_readable(self.call.as_raw_fd(), Duration::from_secs(5)),
            "no TX used notification; daemon log:\n{}",
            d.log()
        );
        assert_eq!(used_idx(&self.m), 1);
        assert_eq!(used_elem(&self.m, 0, SIZE).0, 0);
    }
}

fn user_is_root() -> bool {
    // SAFETY: geteuid has no failure and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// Must show (1) for vhost-user-net: while it serves a frontend (a frame sent, stats
/// endpoint up), every thread has `Seccomp: 2` and `NoNewPrivs: 1`, and the process runs
/// as the `--user` given with no capability left; the queue pair worker stacks a filter
/// of its own.
#[test]
fn every_thread_is_filtered_and_runs_as_the_user_given() {
    let (uid, gid) = passwd("nobody").expect("the test needs the user 'nobody'");
    assert!(user_is_root(), "this test starts the daemon as root");
    let stats_dir = tempdir("vun-sandbox-stats");
    let stats = stats_dir.as_path().join("stats.sock");
    let mut n = start(&[
        "--user",
        "nobody",
        "--stats-socket",
        stats.to_str().unwrap(),
    ]);
    let s = send_frame(&n.d);
    s.assert_done(&n.d);
    let ts = threads(n.d.pid());
    let names: Vec<&str> = ts.iter().map(|t| t.name.as_str()).collect();
    for want in ["vring_worker", "signals", "stats", "vhost-user-net"] {
        assert!(names.contains(&want), "no '{want}' thread in {names:?}");
    }
    for t in &ts {
        let who = format!("thread {} '{}'", t.tid, t.name);
        assert_eq!(t.field("Seccomp"), "2", "{who}: seccomp filter mode");
        assert_eq!(t.field("NoNewPrivs"), "1", "{who}");
        assert_eq!(t.field("Uid"), format!("{uid} {uid} {uid} {uid}"), "{who}");
        assert_eq!(t.field("Gid"), format!("{gid} {gid} {gid} {gid}"), "{who}");
        assert_eq!(t.field("Groups"), "", "{who}: supplementary groups");
        for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(t.field(cap), "0000000000000000", "{who}: {cap}");
        }
    }
    assert!(
        !n.d.log().contains("recreating it"),
        "the relay's socket, made before --user, is usable after it: {}",
        n.d.log()
    );
    let filters = |name: &str| -> u32 {
        let t = ts.iter().find(|t| t.name == name).unwrap();
        t.field("Seccomp_filters").parse().unwrap()
    };
    assert!(
        filters("vring_worker") > filters("vhost-user-net"),
        "the worker stacks its own filter on the connection's"
    );
    drop(s);
    // The next frontend is served too.
    send_frame(&n.d).assert_done(&n.d);
    n.d.assert_serving("two frontends as --user nobody");
}

fn report(log: &str) -> Option<&str> {
    log.lines().find(|l| {
        l.starts_with("vhost-user-net: seccomp: thread 'vring-worker' (tid ")
            && l.contains(") made syscall getpgid (121), not in its filter: ")
    })
}

/// Must show (2), `on`: the worker's syscall outside its list kills the daemon after one
/// line naming the thread and the syscall.
#[test]
fn a_worker_outside_its_filter_kills_the_daemon_with_one_line() {
    let mut n = start(&["--sandbox-selftest", "syscall"]);
    let _s = send_frame(&n.d);
    let status =
        n.d.wait_exit(Duration::from_secs(10))
            .expect("the daemon was not killed");
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{}", n.d.log());
    let log = n.d.log();
    let line = report(&log).unwrap_or_else(|| panic!("no report in:\n{log}"));
    assert!(
        line.ends_with(
            "not in its filter: process killed (run with --seccomp log to list what it needs)"
        ),
        "{line}"
    );
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("seccomp: thread"))
            .count(),
        1,
        "{log}"
    );
}

/// Must show (2), `log`: the same line, and the daemon keeps serving.
#[test]
fn with_seccomp_log_the_line_is_printed_and_the_daemon_keeps_serving() {
    let mut n = start(&["--seccomp", "log", "--sandbox-selftest", "syscall"]);
    let s = send_frame(&n.d);
    s.assert_done(&n.d);
    assert!(n.d.wait_log(
        "sandbox selftest: getpgid(0) returned",
        Duration::from_secs(5)
    ));
    let log = n.d.log();
    let line = report(&log).unwrap_or_else(|| panic!("no report in:\n{log}"));
    assert!(
        line.ends_with("not in its filter: allowed (--seccomp log)"),
        "{line}"
    );
    drop(s);
    send_frame(&n.d).assert_done(&n.d);
    n.d.assert_serving("a syscall outside the worker's list in log mode");
}

/// Must show (3), Landlock, for vhost-user-net: a worker's open of a readable file outside
/// the set gets EACCES when the kernel has Landlock (anything else fails the test), and
/// opens it with `--landlock off`.
#[test]
fn landlock_refuses_a_worker_a_path_outside_its_set() {
    let outside = tempdir("vun-sandbox-outside");
    let secret = outside.as_path().join("secret");
    std::fs::write(&secret, b"not for the daemon").unwrap();
    let open = format!("open:{}", secret.display());
    let selftest = |landlock: &str| {
        let n = start(&[
            "--seccomp",
            "log",
            "--landlock",
            landlock,
            "--sandbox-selftest",
            &open,
        ]);
        send_frame(&n.d).assert_done(&n.d);
        let needle = format!("sandbox selftest: open '{}': ", secret.display());
        assert!(
            n.d.wait_log(&needle, Duration::from_secs(5)),
            "{}",
            n.d.log()
        );
        let log = n.d.log();
        let result = log
            .lines()
            .find_map(|l| l.strip_prefix(needle.as_str()))
            .unwrap()
            .to_string();
        (log, result)
    };
    let (log, result) = selftest("on");
    assert!(
        log.contains("made syscall openat (257), not in its filter: allowed"),
        "the worker's list has no openat: {log}"
    );
    if landlock_abi() > 0 {
        assert!(log.contains("landlock: on"), "{log}");
        assert_eq!(result, "Permission denied (os error 13)", "{log}");
    } else {
        assert!(log.contains("landlock: not available"), "{log}");
        assert_eq!(result, "opened");
    }
    let (_, control) = selftest("off");
    assert_eq!(control, "opened", "with --landlock off");
}

/// A multiqueue tap as `--user`: the queues of the pairs a driver does not use are
/// detached and attached again (TUNSETQUEUE) after the daemon gave up root.
#[test]
fn a_multiqueue_tap_attaches_and_detaches_its_queues_as_the_user() {
    let mut n = start(&["--queues", "2", "--user", "nobody"]);
    for _ in 0..2 {
        // Only pair 0 is used: pair 1's tap queue is detached, then attached again when
        // the frontend leaves.
        let s = send_frame_on(&n.d, 5);
        s.assert_done(&n.d);
        drop(s);
    }
    std::thread::sleep(Duration::from_millis(200));
    let log = n.d.log();
    assert!(!log.contains("cannot attach or detach"), "{log}");
    assert!(!log.contains("seccomp: thread"), "{log}");
    n.d.assert_serving("two multiqueue frontends as --user nobody");
}
