//! The `vhost-user-net` binary against a test frontend, on a real tap (root, /dev/net/tun).

#[path = "../../vhost-user-blk/tests/common/mod.rs"]
mod common;

use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::*;
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;
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
            // SAFETY: kill(2) on the PID of our own, not yet reaped child.
            unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
            let _ = c.wait();
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
    let (mut fe, _) = negotiate(&d.socket, 3);
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
    ];
    for (name, body, code, fds) in &cases {
        let s = raw_connect(&n.d.socket);
        raw_send(&s, *code, body, fds);
        assert!(dropped(&s, Duration::from_secs(2)), "{name}: not dropped");
        n.d.assert_serving(name);
    }
    connection_ok(&n.d);
    n.d.assert_serving("the correct connection after the hostile ones");
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
