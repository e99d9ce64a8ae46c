//! The `vhost-user-net` binary against a test frontend, on a real tap (root, /dev/net/tun).

#[path = "../../vhost-user-blk/tests/common/mod.rs"]
mod common;

use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::*;
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use vm_memory::{Bytes, GuestAddress};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-net");
static N: AtomicU32 = AtomicU32::new(0);

/// A daemon on a uniquely named tap; the tap is deleted in Drop (after the daemon is killed).
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
        "vut{}x{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::SeqCst)
    );
    let mut args = vec!["--tap", tap.as_str(), "--mac", "52:54:00:aa:bb:cc"];
    args.extend_from_slice(extra);
    let d = Daemon::start(BIN, tempdir("vun"), &args);
    NetDaemon { d, tap }
}

/// A correct connection: features, config (MAC), queue count, and one frame sent on TX0
/// coming back as a used entry.
fn connection_ok(d: &Daemon) {
    let (fe, _) = negotiate(&d.socket, 3);
    device_works(fe);
}

/// After negotiation: config (MAC), queue count, and one frame sent on TX0 coming back as a
/// used entry.
fn device_works(mut fe: Frontend) {
    assert_eq!(fe.get_queue_num().unwrap(), 3, "rx0, tx0, ctrl");
    let (_, cfg) = fe
        .get_config(0, 12, VhostUserConfigFlags::WRITABLE, &[0u8; 12])
        .expect("GET_CONFIG");
    assert_eq!(&cfg[0..6], &[0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc], "MAC");
    let m = GuestMem::new(1 << 20);
    fe.set_mem_table(&[m.region_info()]).expect("SET_MEM_TABLE");
    let size = 16;
    let (kick, call) = setup_queue(&mut fe, &m, 1, size);
    // 12-byte virtio_net_hdr_v1 (zero) + a 60-byte broadcast frame.
    let mut frame = vec![0u8; 12];
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&[0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc]);
    frame.extend_from_slice(&[0x88, 0xb5]);
    frame.resize(12 + 60, 0x5a);
    m.mem.write_slice(&frame, GuestAddress(0x4000)).unwrap();
    put_desc(&m, 0, 0x4000, frame.len() as u32, 0, 0);
    publish(&m, size, 0, 0);
    kick.write(1).unwrap();
    assert!(
        wait_readable(call.as_raw_fd(), Duration::from_secs(5)),
        "no TX used notification"
    );
    assert_eq!(used_idx(&m), 1);
    assert_eq!(used_elem(&m, 0, size).0, 0);
}

#[test]
fn negotiates_and_transmits() {
    let mut n = start(&[]);
    connection_ok(&n.d);
    n.d.assert_serving("a correct connection");
}

#[test]
fn hostile_frontends_get_dropped_and_the_daemon_serves_the_next() {
    let mut n = start(&[]);
    let page = 1u64 << 20;
    let a = memfd(page);
    let b = memfd(page);
    let small = memfd(4096);
    let cases: Vec<(&str, Vec<u8>, u32, Vec<i32>)> = vec![
        (
            "overlapping regions",
            mem_table_body(&[(0, page, 0x7000_0000, 0), (page / 2, page, 0x8000_0000, 0)]),
            SET_MEM_TABLE,
            vec![a.as_raw_fd(), b.as_raw_fd()],
        ),
        (
            "region past the end of its file",
            mem_table_body(&[(0, page, 0x7000_0000, 0)]),
            SET_MEM_TABLE,
            vec![small.as_raw_fd()],
        ),
        (
            "memory table without fds",
            mem_table_body(&[(0, page, 0x7000_0000, 0)]),
            SET_MEM_TABLE,
            vec![],
        ),
        (
            "queue size above 32768",
            vring_state_body(0, 65535),
            SET_VRING_NUM,
            vec![],
        ),
        (
            "queue index out of range",
            vring_state_body(3, 16),
            SET_VRING_NUM,
            vec![],
        ),
        (
            "ring outside the table",
            vring_addr_body(0, 0x1000, 0x2000, 0x3000),
            SET_VRING_ADDR,
            vec![],
        ),
        ("unknown request", vec![0u8; 8], 777, vec![]),
        ("body of the wrong size", vec![0u8; 3], SET_FEATURES, vec![]),
        (
            "header announcing a body over 4096 bytes",
            vec![0u8; 8],
            GET_FEATURES,
            vec![],
        ),
        (
            "more than 8 fds on one message",
            mem_table_body(&[(0, page, 0x7000_0000, 0)]),
            SET_MEM_TABLE,
            vec![a.as_raw_fd(); 9],
        ),
    ];
    for (name, body, code, fds) in &cases {
        let s = raw_connect(&n.d.socket);
        if name.starts_with("header announcing") {
            let mut m = header(*code, 5000);
            m.extend_from_slice(body);
            let _ = std::io::Write::write_all(&mut &s, &m);
        } else {
            raw_send(&s, *code, body, fds);
        }
        assert!(dropped(&s, Duration::from_secs(2)), "{name}: not dropped");
        n.d.assert_serving(name);
    }
    connection_ok(&n.d);
    n.d.assert_serving("the correct connection after the hostile ones");
}

const SET_VRING_ENABLE: u32 = 18;

/// What QEMU 7.2's `-netdev vhost-user` does: protocol features negotiated, then
/// SET_VRING_ENABLE (disable) for the queues before SET_FEATURES. The connection survives
/// and the device works once the real features are set.
#[test]
fn set_vring_enable_before_set_features_like_qemu() {
    let mut n = start(&[]);
    let s = raw_connect(&n.d.socket);
    let mut fe = Frontend::from_stream(s.try_clone().expect("dup"), 3);
    fe.set_owner().expect("SET_OWNER");
    let features = fe.get_features().expect("GET_FEATURES");
    assert_ne!(
        features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        0
    );
    let pf = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    assert!(pf.contains(required_protocol_features()));
    fe.set_protocol_features(required_protocol_features())
        .expect("SET_PROTOCOL_FEATURES");
    // The Frontend refuses SET_VRING_ENABLE before SET_FEATURES: raw, as QEMU sends it (no
    // need-reply, so no reply comes).
    for q in 0..3 {
        raw_send(&s, SET_VRING_ENABLE, &vring_state_body(q, 0), &[]);
    }
    assert_eq!(
        fe.get_features()
            .expect("the connection survives SET_VRING_ENABLE"),
        features
    );
    // With need-reply (REPLY_ACK negotiated): the ack says success.
    let mut m = header(SET_VRING_ENABLE, 8);
    m[4..8].copy_from_slice(&(1u32 | 1 << 3).to_le_bytes());
    m.extend_from_slice(&vring_state_body(2, 0));
    std::io::Write::write_all(&mut &s, &m).expect("send");
    let mut reply = [0u8; 20];
    std::io::Read::read_exact(&mut &s, &mut reply).expect("the ack of SET_VRING_ENABLE");
    assert_eq!(
        u32::from_le_bytes(reply[0..4].try_into().unwrap()),
        SET_VRING_ENABLE
    );
    assert_eq!(
        u64::from_le_bytes(reply[12..20].try_into().unwrap()),
        0,
        "ack status"
    );
    fe.set_features(features).expect("SET_FEATURES");
    device_works(fe);
    drop(s);
    n.d.assert_serving("SET_VRING_ENABLE before SET_FEATURES");
    connection_ok(&n.d);
}

/// `--fd` with a socket already connected to the frontend (a socketpair end): that one
/// connection is served, and the daemon exits 0 when the frontend closes it.
#[test]
fn serves_a_connected_fd_and_exits_when_it_ends() {
    use std::os::unix::process::CommandExt;
    assert!(
        std::path::Path::new("/dev/net/tun").exists(),
        "this test needs /dev/net/tun and root"
    );
    let tap = format!(
        "vut{}x{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::SeqCst)
    );
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let fd = theirs.as_raw_fd();
    let mut cmd = Command::new(BIN);
    cmd.args(["--fd", "3", "--tap", &tap, "--mac", "52:54:00:aa:bb:cc"])
        .env("RUST_LOG", "debug");
    // SAFETY: between fork and exec only async-signal-safe calls: dup2 onto fd 3, or, when
    // the listener already is fd 3 (dup2 would do nothing), clearing its close-on-exec flag,
    // which Rust sets on every fd it opens: without that the daemon starts without the socket.
    unsafe {
        cmd.pre_exec(move || {
            let r = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("spawn the daemon");
    let mut n = NetDaemon {
        d: Daemon {
            child: Some(child),
            dir: tempdir("vun-fd"),
            socket: std::path::PathBuf::new(),
        },
        tap,
    };
    drop(theirs);
    let mut fe = Frontend::from_stream(ours, 3);
    fe.set_owner().expect("SET_OWNER");
    let features = fe.get_features().expect("GET_FEATURES");
    fe.set_features(features).expect("SET_FEATURES");
    fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    fe.set_protocol_features(required_protocol_features() & VhostUserProtocolFeatures::all())
        .expect("SET_PROTOCOL_FEATURES");
    device_works(fe);
    // device_works dropped the frontend: the daemon has nothing more to serve.
    let st =
        n.d.wait_exit(Duration::from_secs(10))
            .expect("the daemon did not exit after its connection ended");
    assert_eq!(st.code(), Some(0));
}

#[test]
fn reconnects_and_sigterm() {
    let mut n = start(&["--poll-us", "50"]);
    connection_ok(&n.d);
    {
        // Gone in the middle of the setup.
        let (fe, _) = negotiate(&n.d.socket, 3);
        let m = GuestMem::new(1 << 20);
        fe.set_mem_table(&[m.region_info()]).unwrap();
        fe.set_vring_num(0, 16).unwrap();
    }
    n.d.assert_serving("a frontend gone mid-setup");
    connection_ok(&n.d);
    // SIGTERM with a connection open.
    let (_fe, _) = negotiate(&n.d.socket, 3);
    // SAFETY: kill(2) on our child's PID.
    unsafe { libc::kill(n.d.pid(), libc::SIGTERM) };
    let st =
        n.d.wait_exit(Duration::from_secs(10))
            .expect("no exit after SIGTERM");
    assert_eq!(st.code(), Some(0));
    assert!(!n.d.socket.exists(), "socket left behind");
}

#[test]
fn command_line() {
    let out = Command::new(BIN)
        .arg("--print-capabilities")
        .output()
        .unwrap();
    assert!(out.status.success());
    let s: String = String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(s, r#"{"type":"net"}"#);
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let h = String::from_utf8(out.stdout).unwrap();
    for f in [
        "--socket-path",
        "--fd",
        "--connect",
        "--tap",
        "--mac",
        "--queues",
        "--queue-size",
        "--poll-us",
    ] {
        assert!(h.contains(f), "--help lacks {f}");
    }
    let dir = tempdir("vun-bad");
    let sock = dir.as_path().join("s.sock");
    let sock = sock.to_str().unwrap();
    for (args, want) in [
        (
            vec!["--socket-path", sock, "--tap", "this-name-is-too-long"],
            "invalid tap name",
        ),
        (
            vec!["--socket-path", sock, "--tap", "vutx", "--mac", "zz"],
            "--mac",
        ),
        (
            vec!["--socket-path", sock, "--tap", "vutx", "--queue-size", "3"],
            "power of two",
        ),
        (
            vec![
                "--socket-path",
                sock,
                "--tap",
                "vutx",
                "--poll-us",
                "1000001",
            ],
            "--poll-us 1000001 µs: expected 0 (off) to 1000000",
        ),
        (
            vec!["--socket-path", "/nonexistent-dir/s", "--tap", "vutbad0"],
            "directory does not exist",
        ),
    ] {
        let out = Command::new(BIN)
            .args(&args)
            .env("RUST_LOG", "error")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let _ = Command::new("ip")
        .args(["link", "delete", "vutbad0"])
        .stderr(std::process::Stdio::null())
        .status();
}

/// Frames waiting on the tap before the guest's driver starts (the frontend connected, no
/// memory table or rings yet) must not make the worker spin: a readable tap is only watched
/// once a queue pair runs.
#[test]
fn queued_tap_frames_before_the_driver_starts_cost_no_cpu() {
    struct Ns(String);
    impl Drop for Ns {
        fn drop(&mut self) {
            let _ = Command::new("ip")
                .args(["netns", "delete", &self.0])
                .status();
        }
    }
    let n = start(&[]);
    let (_fe, _) = negotiate(&n.d.socket, 3);
    let ns = Ns(format!(
        "vuns{}x{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let ip = |args: &[&str]| {
        let st = Command::new("ip").args(args).status().expect("ip");
        assert!(st.success(), "ip {args:?}");
    };
    ip(&["netns", "add", &ns.0]);
    ip(&["link", "set", &n.tap, "netns", &ns.0]);
    ip(&["-n", &ns.0, "addr", "add", "203.0.113.1/24", "dev", &n.tap]);
    ip(&["-n", &ns.0, "link", "set", &n.tap, "up"]);
    // ARP requests for a neighbour that is not there queue frames on the tap.
    let _ = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.0,
            "ping",
            "-c",
            "2",
            "-W",
            "1",
            "203.0.113.2",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    let pid = n.d.child.as_ref().expect("daemon running").id();
    let ticks = || {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("daemon stat");
        let rest = &s[s.rfind(')').expect("stat format") + 1..];
        let f: Vec<u64> = rest
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        // utime and stime (fields 14 and 15; the state letter is not a number).
        f[10] + f[11]
    };
    let before = ticks();
    std::thread::sleep(Duration::from_millis(1500));
    let used = ticks() - before;
    assert!(
        used < 20,
        "the daemon used {used} ticks of CPU in 1.5 s with frames queued on an unstarted tap"
    );
}
