//! The sandbox of the `vhost-user-blk` binary, seen from outside while it serves a test
//! frontend (issue #23's "must show"): every thread filtered and without new privileges,
//! running as the `--user` given; a vring worker that makes a syscall outside its list is
//! killed with one line naming the thread and the syscall (`on`), or reported and kept
//! serving (`log`); a path outside the Landlock set is refused with EACCES.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use common::*;
use vhost::vhost_user::Frontend;
use vhost::VhostBackend;
use vm_memory::{Bytes, GuestAddress};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-blk");
const IMG_SECTORS: u64 = 2048;

fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(7) ^ (i >> 9)) as u8
}

/// A daemon (stderr kept) on a 1 MiB image filled with `pattern`.
fn start(extra: &[&str]) -> Daemon {
    let dir = tempdir("vub-sandbox");
    let img = dir.as_path().join("disk.img");
    let data: Vec<u8> = (0..IMG_SECTORS * 512).map(pattern).collect();
    std::fs::write(&img, data).unwrap();
    let img = img.to_str().unwrap().to_string();
    let mut args = vec!["--blk-file", img.as_str()];
    args.extend_from_slice(extra);
    Daemon::start_logged(BIN, dir, &args)
}

/// A negotiated connection with queue 0 set up and one read of `sector` kicked.
struct Request {
    _fe: Frontend,
    m: GuestMem,
    call: vmm_sys_util::eventfd::EventFd,
    _kick: vmm_sys_util::eventfd::EventFd,
    sector: u64,
}

const SIZE: u16 = 16;

fn kick_read(d: &Daemon, sector: u64) -> Request {
    let (mut fe, _) = negotiate(&d.socket, 1);
    let m = GuestMem::new(1 << 20);
    fe.set_mem_table(&[m.region_info()]).expect("SET_MEM_TABLE");
    let (kick, call) = setup_queue(&mut fe, &m, 0, SIZE);
    m.mem.write_obj(0u32, GuestAddress(0x4000)).unwrap();
    m.mem.write_obj(0u32, GuestAddress(0x4004)).unwrap();
    m.mem.write_obj(sector, GuestAddress(0x4008)).unwrap();
    m.mem.write_obj(0xffu8, GuestAddress(0x6000)).unwrap();
    put_desc(&m, 0, 0x4000, 16, F_NEXT, 1);
    put_desc(&m, 1, 0x5000, 512, F_NEXT | F_WRITE, 2);
    put_desc(&m, 2, 0x6000, 1, F_WRITE, 0);
    publish(&m, SIZE, 0, 0);
    kick.write(1).unwrap();
    Request {
        _fe: fe,
        m,
        call,
        _kick: kick,
        sector,
    }
}

impl Request {
    /// The read completed with the image's data.
    fn assert_done(&self, d: &Daemon) {
        assert!(
            wait_readable(self.call.as_raw_fd(), Duration::from_secs(5)),
            "no used-buffer notification; daemon log:\n{}",
            d.log()
        );
        assert_eq!(used_idx(&self.m), 1);
        let status: u8 = self.m.mem.read_obj(GuestAddress(0x6000)).unwrap();
        assert_eq!(status, 0, "VIRTIO_BLK_S_OK");
        let mut got = vec![0u8; 512];
        self.m
            .mem
            .read_slice(&mut got, GuestAddress(0x5000))
            .unwrap();
        let s = self.sector;
        let want: Vec<u8> = (s * 512..s * 512 + 512).map(pattern).collect();
        assert_eq!(got, want, "data of sector {s}");
    }
}

/// Must show (1): while the daemon serves a frontend (queue running, stats endpoint up),
/// every thread has a seccomp filter (`Seccomp: 2`) and no_new_privs, and the process runs
/// as the `--user` given with no capability left. The vring worker has a filter of its own
/// on top of the one it inherited.
#[test]
fn every_thread_is_filtered_and_runs_as_the_user_given() {
    let (uid, gid) = passwd("nobody").expect("the test needs the user 'nobody'");
    assert!(
        user_is_root(),
        "this test starts the daemon as root (to drop to --user nobody)"
    );
    let stats_dir = tempdir("vub-sandbox-stats");
    let stats = stats_dir.as_path().join("stats.sock");
    let d = start(&[
        "--user",
        "nobody",
        "--stats-socket",
        stats.to_str().unwrap(),
    ]);
    let r = kick_read(&d, 7);
    r.assert_done(&d);
    let ts = threads(d.pid());
    let names: Vec<&str> = ts.iter().map(|t| t.name.as_str()).collect();
    for want in ["vring_worker", "signals", "stats", "vhost-user-blk"] {
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
        !d.log().contains("recreating it"),
        "the relay's socket, made before --user, is usable after it: {}",
        d.log()
    );
    let filters = |name: &str| -> u32 {
        let t = ts.iter().find(|t| t.name == name).unwrap();
        t.field("Seccomp_filters").parse().unwrap()
    };
    assert!(
        filters("vring_worker") > filters("vhost-user-blk"),
        "the worker stacks its own filter on the connection's"
    );
    drop(r);
    // Still serving after the frontend left.
    kick_read(&d, 9).assert_done(&d);
}

fn user_is_root() -> bool {
    // SAFETY: geteuid has no failure and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// The report a vring worker's getpgid(2) gets, up to the mode's ending.
fn report_prefix(log: &str) -> Option<&str> {
    log.lines().find(|l| {
        l.starts_with("vhost-user-blk: seccomp: thread 'vring-worker' (tid ")
            && l.contains(") made syscall getpgid (121), not in its filter: ")
    })
}

/// Must show (2), `on`: a vring worker that calls outside its list on its first request
/// kills the daemon, after one line naming the thread and the syscall.
#[test]
fn a_worker_outside_its_filter_kills_the_daemon_with_one_line() {
    let mut d = start(&["--sandbox-selftest", "syscall"]);
    let _r = kick_read(&d, 3);
    let status = d
        .wait_exit(Duration::from_secs(10))
        .expect("the daemon was not killed");
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{}", d.log());
    let log = d.log();
    let line = report_prefix(&log).unwrap_or_else(|| panic!("no report in:\n{log}"));
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
        "one line: {log}"
    );
    assert!(!log.contains("sandbox selftest: getpgid"), "{log}");
}

/// Must show (2), `log`: the same line, the syscall runs, and the daemon goes on serving
/// (this connection and the next).
#[test]
fn with_seccomp_log_the_line_is_printed_and_the_daemon_keeps_serving() {
    let mut d = start(&["--seccomp", "log", "--sandbox-selftest", "syscall"]);
    let r = kick_read(&d, 3);
    r.assert_done(&d);
    assert!(d.wait_log(
        "sandbox selftest: getpgid(0) returned",
        Duration::from_secs(5)
    ));
    let log = d.log();
    let line = report_prefix(&log).unwrap_or_else(|| panic!("no report in:\n{log}"));
    assert!(
        line.ends_with("not in its filter: allowed (--seccomp log)"),
        "{line}"
    );
    let got = log
        .lines()
        .find_map(|l| l.strip_prefix("sandbox selftest: getpgid(0) returned "))
        .unwrap();
    assert!(got.parse::<i64>().unwrap() > 0, "the syscall ran: {got}");
    drop(r);
    kick_read(&d, 5).assert_done(&d);
    d.assert_serving("a syscall outside the worker's list in log mode");
}

/// Must show (3), Landlock: a vring worker that opens a readable file outside the daemon's
/// set gets EACCES (the seccomp report for openat comes first: `log` lets it run so that
/// Landlock is what answers). Without Landlock in the kernel the daemon says so and the
/// open succeeds; with Landlock in the kernel anything but EACCES fails the test. The
/// control run with `--landlock off` opens the same file.
#[test]
fn landlock_refuses_a_worker_a_path_outside_its_set() {
    let outside = tempdir("vub-sandbox-outside");
    let secret = outside.as_path().join("secret");
    std::fs::write(&secret, b"not for the daemon").unwrap();
    let open = format!("open:{}", secret.display());
    let selftest = |landlock: &str| {
        let d = start(&[
            "--seccomp",
            "log",
            "--landlock",
            landlock,
            "--sandbox-selftest",
            &open,
        ]);
        let r = kick_read(&d, 1);
        r.assert_done(&d);
        let needle = format!("sandbox selftest: open '{}': ", secret.display());
        assert!(d.wait_log(&needle, Duration::from_secs(5)), "{}", d.log());
        let log = d.log();
        let result = log
            .lines()
            .find_map(|l| l.strip_prefix(needle.as_str()))
            .unwrap()
            .to_string();
        (log, result)
    };
    let (log, result) = selftest("on");
    assert!(
        log.contains("seccomp: thread 'vring-worker' (tid ")
            && log.contains("made syscall openat (257), not in its filter: allowed"),
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

/// `--user` without root, and bad sandbox values: one line, exit 2.
#[test]
fn sandbox_options_are_checked() {
    let dir = tempdir("vub-sandbox-args");
    let img = dir.as_path().join("disk.img");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    let sock = dir.as_path().join("vu.sock");
    let run = |extra: &[&str]| {
        std::process::Command::new(BIN)
            .arg("--socket-path")
            .arg(&sock)
            .arg("--blk-file")
            .arg(&img)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&["--seccomp", "maybe"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("'maybe': expected on"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let out = run(&["--user", "no-such-user-here"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("no such user"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    // Not root: refused before anything is opened.
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN])
        .args([
            "--socket-path",
            "/nonexistent/vu.sock",
            "--blk-file",
            "/nonexistent/x.img",
        ])
        .args(["--user", "65534"])
        .output()
        .expect("setpriv (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(
        err.trim_end(),
        "vhost-user-blk: --user 65534: the daemon runs as uid 65534, not root, and cannot \
         change user (start it as root, or leave --user out)"
    );
    let help = std::process::Command::new(BIN)
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for opt in ["--seccomp", "--landlock", "--user"] {
        assert!(help.contains(opt), "{opt} in --help");
    }
    assert!(
        !help.contains("sandbox-selftest"),
        "the test hook is hidden"
    );
}
