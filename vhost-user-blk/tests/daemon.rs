//! The `vhost-user-blk` binary against a test frontend: correct I/O, hostile messages,
//! reconnects, SIGTERM, and the command line.

mod common;

use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use vm_memory::{Bytes, GuestAddress};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-blk");
const IMG_SECTORS: u64 = 2048;

fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(7) ^ (i >> 9)) as u8
}

/// A daemon on a 1 MiB image filled with `pattern`.
fn start(extra: &[&str]) -> Daemon {
    let dir = tempdir("vub");
    let img = dir.as_path().join("disk.img");
    let data: Vec<u8> = (0..IMG_SECTORS * 512).map(pattern).collect();
    std::fs::write(&img, data).unwrap();
    let img = img.to_str().unwrap().to_string();
    let mut args = vec!["--blk-file", img.as_str()];
    args.extend_from_slice(extra);
    Daemon::start(BIN, dir, &args)
}

/// A whole correct connection: negotiate, check the config, one queue, read sector
/// `sector` and check the data against the image.
fn read_sector_ok(d: &Daemon, sector: u64) {
    read_sector_through(negotiate(&d.socket, 1).0, sector);
}

/// [`read_sector_ok`] on a negotiated frontend.
fn read_sector_through(mut fe: vhost::vhost_user::Frontend, sector: u64) {
    assert_eq!(fe.get_queue_num().unwrap(), 1);
    let (_, cfg) = fe
        .get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])
        .expect("GET_CONFIG");
    assert_eq!(
        u64::from_le_bytes(cfg[0..8].try_into().unwrap()),
        IMG_SECTORS,
        "capacity"
    );
    let m = GuestMem::new(1 << 20);
    fe.set_mem_table(&[m.region_info()]).expect("SET_MEM_TABLE");
    let size = 16;
    let (kick, call) = setup_queue(&mut fe, &m, 0, size);
    // virtio_blk_outhdr { type: IN, reserved, sector }.
    m.mem.write_obj(0u32, GuestAddress(0x4000)).unwrap();
    m.mem.write_obj(0u32, GuestAddress(0x4004)).unwrap();
    m.mem.write_obj(sector, GuestAddress(0x4008)).unwrap();
    m.mem.write_obj(0xffu8, GuestAddress(0x6000)).unwrap();
    put_desc(&m, 0, 0x4000, 16, F_NEXT, 1);
    put_desc(&m, 1, 0x5000, 512, F_NEXT | F_WRITE, 2);
    put_desc(&m, 2, 0x6000, 1, F_WRITE, 0);
    publish(&m, size, 0, 0);
    kick.write(1).unwrap();
    assert!(
        wait_readable(call.as_raw_fd(), Duration::from_secs(5)),
        "no used-buffer notification"
    );
    assert_eq!(used_idx(&m), 1);
    assert_eq!(used_elem(&m, 0, size), (0, 513));
    let status: u8 = m.mem.read_obj(GuestAddress(0x6000)).unwrap();
    assert_eq!(status, 0, "VIRTIO_BLK_S_OK");
    let mut got = vec![0u8; 512];
    m.mem.read_slice(&mut got, GuestAddress(0x5000)).unwrap();
    let want: Vec<u8> = (sector * 512..sector * 512 + 512).map(pattern).collect();
    assert_eq!(got, want, "data of sector {sector}");
}

#[test]
fn reads_a_sector() {
    let mut d = start(&[]);
    read_sector_ok(&d, 3);
    d.assert_serving("a correct connection");
}

#[test]
fn hostile_frontends_get_dropped_and_the_daemon_serves_the_next() {
    let mut d = start(&[]);
    let page = 1u64 << 20;
    let a = memfd(page);
    let b = memfd(page);
    let small = memfd(4096);
    let ev = vmm_sys_util::eventfd::EventFd::new(0).unwrap();

    // (name, expect a dropped connection, the messages)
    type Case<'a> = (
        &'a str,
        bool,
        Box<dyn Fn(&std::os::unix::net::UnixStream) + 'a>,
    );
    let cases: Vec<Case> = vec![
        (
            "overlapping memory regions",
            true,
            Box::new(|s| {
                let body =
                    mem_table_body(&[(0, page, 0x7000_0000, 0), (page / 2, page, 0x8000_0000, 0)]);
                raw_send(s, SET_MEM_TABLE, &body, &[a.as_raw_fd(), b.as_raw_fd()]);
            }),
        ),
        (
            "memory regions overlapping in the frontend's address space",
            true,
            Box::new(|s| {
                let body =
                    mem_table_body(&[(0, page, 0x7000_0000, 0), (page, page, 0x7008_0000, 0)]);
                raw_send(s, SET_MEM_TABLE, &body, &[a.as_raw_fd(), b.as_raw_fd()]);
            }),
        ),
        (
            "memory table with more fds than regions",
            true,
            Box::new(|s| {
                let body = mem_table_body(&[(0, page, 0x7000_0000, 0)]);
                raw_send(s, SET_MEM_TABLE, &body, &[a.as_raw_fd(), b.as_raw_fd()]);
            }),
        ),
        (
            "region larger than its file",
            true,
            Box::new(|s| {
                let body = mem_table_body(&[(0, page, 0x7000_0000, 0)]);
                raw_send(s, SET_MEM_TABLE, &body, &[small.as_raw_fd()]);
            }),
        ),
        (
            "region backed by an unmappable fd (eventfd)",
            true,
            Box::new(|s| {
                let body = mem_table_body(&[(0, 4096, 0x7000_0000, 0)]);
                raw_send(s, SET_MEM_TABLE, &body, &[ev.as_raw_fd()]);
            }),
        ),
        (
            "memory table without fds",
            true,
            Box::new(|s| {
                let body = mem_table_body(&[(0, page, 0x7000_0000, 0)]);
                raw_send(s, SET_MEM_TABLE, &body, &[]);
            }),
        ),
        (
            "memory table with fewer fds than regions",
            true,
            Box::new(|s| {
                let body =
                    mem_table_body(&[(0, page, 0x7000_0000, 0), (page, page, 0x8000_0000, 0)]);
                raw_send(s, SET_MEM_TABLE, &body, &[a.as_raw_fd()]);
            }),
        ),
        (
            "ring addresses outside the memory table",
            true,
            Box::new(|s| {
                let body = mem_table_body(&[(0, page, 0x7000_0000, 0)]);
                raw_send(s, SET_MEM_TABLE, &body, &[a.as_raw_fd()]);
                raw_send(s, SET_VRING_NUM, &vring_state_body(0, 16), &[]);
                let addr = vring_addr_body(0, 0x9000_0000, 0x9000_1000, 0x9000_2000);
                raw_send(s, SET_VRING_ADDR, &addr, &[]);
            }),
        ),
        (
            "ring addresses before any memory table",
            true,
            Box::new(|s| {
                let addr = vring_addr_body(0, 0x1000, 0x2000, 0x3000);
                raw_send(s, SET_VRING_ADDR, &addr, &[]);
            }),
        ),
        (
            "queue size above 32768",
            true,
            Box::new(|s| raw_send(s, SET_VRING_NUM, &vring_state_body(0, 65535), &[])),
        ),
        (
            "queue size above the daemon's maximum",
            true,
            Box::new(|s| raw_send(s, SET_VRING_NUM, &vring_state_body(0, 512), &[])),
        ),
        (
            "queue size zero",
            true,
            Box::new(|s| raw_send(s, SET_VRING_NUM, &vring_state_body(0, 0), &[])),
        ),
        (
            "queue size not a power of two",
            true,
            Box::new(|s| raw_send(s, SET_VRING_NUM, &vring_state_body(0, 100), &[])),
        ),
        (
            "queue index out of range (SET_VRING_NUM)",
            true,
            Box::new(|s| raw_send(s, SET_VRING_NUM, &vring_state_body(7, 16), &[])),
        ),
        (
            "queue index out of range (SET_VRING_BASE)",
            true,
            Box::new(|s| raw_send(s, SET_VRING_BASE, &vring_state_body(300, 0), &[])),
        ),
        (
            "queue index out of range (SET_VRING_KICK)",
            true,
            Box::new(|s| raw_send(s, SET_VRING_KICK, &9u64.to_le_bytes(), &[ev.as_raw_fd()])),
        ),
        (
            "unknown request code",
            true,
            Box::new(|s| raw_send(s, 999, &[0u8; 8], &[])),
        ),
        (
            "truncated body then hang-up",
            true,
            Box::new(|s| {
                let mut m = header(SET_FEATURES, 8);
                m.extend_from_slice(&[1, 2, 3]);
                let _ = std::io::Write::write_all(&mut &*s, &m);
                let _ = s.shutdown(std::net::Shutdown::Write);
            }),
        ),
        (
            "truncated header then hang-up",
            true,
            Box::new(|s| {
                let _ = std::io::Write::write_all(&mut &*s, &[3, 0, 0]);
                let _ = s.shutdown(std::net::Shutdown::Write);
            }),
        ),
        (
            "body size not matching the request",
            true,
            Box::new(|s| raw_send(s, SET_FEATURES, &[0u8; 4], &[])),
        ),
        (
            "fd attached to a request that takes none",
            true,
            Box::new(|s| raw_send(s, SET_OWNER, &[], &[ev.as_raw_fd()])),
        ),
        (
            "features the daemon does not offer",
            true,
            Box::new(|s| raw_send(s, SET_FEATURES, &u64::MAX.to_le_bytes(), &[])),
        ),
    ];
    for (name, expect_drop, send) in &cases {
        let s = raw_connect(&d.socket);
        send(&s);
        let was_dropped = dropped(&s, Duration::from_secs(2));
        if *expect_drop {
            assert!(was_dropped, "{name}: connection not dropped");
        }
        drop(s);
        d.assert_serving(name);
    }

    // Rings that start inside the table but run past its end: refused at SET_VRING_ADDR
    // (the queue size is known), before the queue is set up any further.
    {
        let (fe, _) = negotiate(&d.socket, 1);
        let m = GuestMem::new(64 << 10);
        fe.set_mem_table(&[m.region_info()]).unwrap();
        fe.set_vring_num(0, 256).unwrap();
        let mut cfg = vring_config(&m, 256);
        cfg.desc_table_addr = m.va((64 << 10) - 16);
        let _ = fe.set_vring_addr(0, &cfg);
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            fe.get_features().is_err(),
            "a ring past the end of memory must drop the connection at SET_VRING_ADDR"
        );
        d.assert_serving("ring past the end of memory");
    }

    // ADD_MEM_REG checked against the regions installed on the connection.
    for (name, region) in [
        (
            "ADD_MEM_REG overlapping an installed region's guest addresses",
            (512u64 << 10, page, 1u64 << 40, 0u64, a.as_raw_fd()),
        ),
        (
            "ADD_MEM_REG overlapping an installed region's frontend addresses",
            (4 * page, page, 0, 0, a.as_raw_fd()),
        ),
        (
            "ADD_MEM_REG larger than its file",
            (4 * page, page, 1 << 40, 0, small.as_raw_fd()),
        ),
    ] {
        let (mut fe, _) = negotiate(&d.socket, 1);
        let m = GuestMem::new(page);
        fe.set_mem_table(&[m.region_info()]).unwrap();
        let (gpa, size, ua, off, fd) = region;
        let info = VhostUserMemoryRegionInfo {
            guest_phys_addr: gpa,
            memory_size: size,
            // 0: the same frontend addresses as the installed region.
            userspace_addr: if ua == 0 { m.va(0) } else { ua },
            mmap_offset: off,
            mmap_handle: fd,
        };
        let _ = fe.add_mem_region(&info);
        assert!(fe.get_features().is_err(), "{name}: connection not dropped");
        d.assert_serving(name);
    }

    // A region whose size wraps the address space.
    {
        let (fe, _) = negotiate(&d.socket, 1);
        let m = GuestMem::new(4096);
        let mut r: VhostUserMemoryRegionInfo = m.region_info();
        r.guest_phys_addr = u64::MAX - 100;
        let _ = fe.set_mem_table(&[r]);
        std::thread::sleep(Duration::from_millis(100));
        d.assert_serving("a region wrapping the address space");
    }

    read_sector_ok(&d, 5);
    d.assert_serving("the correct connection after the hostile ones");
}

/// Keeps queue 0 (of `size`, set up on `m`) busy with reads of sector 0 until `stop`, until
/// the daemon stops completing them for a second, or for 10 s at most. Returns the used
/// index reached.
fn keep_busy(
    m: &GuestMem,
    kick: &vmm_sys_util::eventfd::EventFd,
    size: u16,
    stop: &AtomicBool,
) -> u16 {
    const SLOTS: u16 = 4;
    let mut avail = 0u16;
    let mut last_progress = std::time::Instant::now();
    let mut last_used = 0u16;
    let start = std::time::Instant::now();
    // Bounded, so that a failing test never waits on it for long.
    while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(10) {
        let used = used_idx(m);
        if used != last_used {
            last_used = used;
            last_progress = std::time::Instant::now();
        } else if last_progress.elapsed() > Duration::from_secs(1) {
            break;
        }
        if avail.wrapping_sub(used) >= SLOTS {
            std::thread::yield_now();
            continue;
        }
        let slot = avail % SLOTS;
        let hdr = 0x4000 + 0x100 * u64::from(slot);
        m.mem.write_obj(0u32, GuestAddress(hdr)).unwrap();
        m.mem.write_obj(0u64, GuestAddress(hdr + 8)).unwrap();
        put_desc(m, 3 * slot, hdr, 16, F_NEXT, 3 * slot + 1);
        let data = 0x10000 + 0x1000 * u64::from(slot);
        put_desc(m, 3 * slot + 1, data, 512, F_NEXT | F_WRITE, 3 * slot + 2);
        put_desc(m, 3 * slot + 2, hdr + 0x80, 1, F_WRITE, 0);
        publish(m, size, avail, 3 * slot);
        avail = avail.wrapping_add(1);
        let _ = kick.write(1);
    }
    last_used
}

/// A memory table whose region runs past the end of its memfd, sent while a polling worker
/// keeps reading the rings under load: refused before anything maps it. Installed (as
/// vhost-user-backend does before calling the device), the worker's next look at the ring
/// reads a page past the end of the file and the daemon dies of SIGBUS. The ADD_MEM_REG
/// round adds a region beside the rings (nothing polls it): it shows the connection
/// dropped and the daemon serving the next frontend under load, not the SIGBUS.
#[test]
fn a_region_past_its_file_under_polling_load_drops_the_connection_not_the_daemon() {
    let mut d = start(&["--poll-us", "100000"]);
    let page = 1u64 << 20;
    for add in [false, true] {
        let what = if add { "ADD_MEM_REG" } else { "SET_MEM_TABLE" };
        let (mut fe, _) = negotiate(&d.socket, 1);
        let m = GuestMem::new(page);
        fe.set_mem_table(&[m.region_info()]).unwrap();
        let size = 16;
        let (kick, _call) = setup_queue(&mut fe, &m, 0, size);
        let stop = AtomicBool::new(false);
        let small = memfd(4096);
        std::thread::scope(|sc| {
            let load = sc.spawn(|| keep_busy(&m, &kick, size, &stop));
            // Under load: requests are being completed.
            let t = std::time::Instant::now();
            while used_idx(&m) < 50 && t.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(5));
            }
            assert!(used_idx(&m) >= 50, "{what}: no load on the queue");
            if add {
                // Beside the installed region, 1 MiB on a 4 KiB memfd.
                let _ = fe.add_mem_region(&VhostUserMemoryRegionInfo {
                    guest_phys_addr: page,
                    memory_size: page,
                    userspace_addr: m.va(0) + page,
                    mmap_offset: 0,
                    mmap_handle: small.as_raw_fd(),
                });
            } else {
                // The same layout as the installed table, on a 4 KiB memfd: the rings at
                // 0x1000-0x3fff are past its end.
                let mut r = m.region_info();
                r.mmap_handle = small.as_raw_fd();
                let _ = fe.set_mem_table(&[r]);
            }
            std::thread::sleep(Duration::from_millis(200));
            stop.store(true, Ordering::Relaxed);
            let _ = load.join();
        });
        assert!(
            fe.get_features().is_err(),
            "{what}: the connection was not dropped"
        );
        d.assert_serving(&format!("{what} with a region past the end of its memfd"));
        read_sector_ok(&d, 6);
    }
}

#[test]
fn reconnects_with_fresh_state() {
    let mut d = start(&[]);
    // Frontend 1: full setup, I/O, clean disconnect.
    read_sector_ok(&d, 1);
    d.assert_serving("frontend 1 disconnecting");
    // Frontend 2: closes the socket in the middle of the setup.
    {
        let (fe, _) = negotiate(&d.socket, 1);
        let m = GuestMem::new(1 << 20);
        fe.set_mem_table(&[m.region_info()]).unwrap();
        fe.set_vring_num(0, 16).unwrap();
    }
    d.assert_serving("a frontend gone mid-setup");
    // Frontend 3: dies with requests submitted and never reaped (in-flight at hang-up).
    {
        let (mut fe, _) = negotiate(&d.socket, 1);
        let m = GuestMem::new(1 << 20);
        fe.set_mem_table(&[m.region_info()]).unwrap();
        let (kick, _call) = setup_queue(&mut fe, &m, 0, 16);
        for i in 0..5u16 {
            let hdr = 0x4000 + 0x100 * u64::from(i);
            m.mem.write_obj(0u32, GuestAddress(hdr)).unwrap();
            m.mem
                .write_obj(u64::from(i) * 8, GuestAddress(hdr + 8))
                .unwrap();
            put_desc(&m, 3 * i, hdr, 16, F_NEXT, 3 * i + 1);
            put_desc(
                &m,
                3 * i + 1,
                0x10000 + 0x1000 * u64::from(i),
                4096,
                F_NEXT | F_WRITE,
                3 * i + 2,
            );
            put_desc(&m, 3 * i + 2, hdr + 0x80, 1, F_WRITE, 0);
            publish(&m, 16, i, 3 * i);
        }
        kick.write(1).unwrap();
        drop(fe);
    }
    d.assert_serving("a frontend dying with I/O in flight");
    // Frontend 4: works, on a new device (its queue starts at index 0 again).
    read_sector_ok(&d, 7);
    d.assert_serving("frontend 4");
}

#[test]
fn sigterm_with_a_connection_open_exits_0_and_removes_the_socket() {
    let mut d = start(&["--poll-us", "50"]);
    let (mut fe, _) = negotiate(&d.socket, 1);
    let m = GuestMem::new(1 << 20);
    fe.set_mem_table(&[m.region_info()]).unwrap();
    let (_kick, _call) = setup_queue(&mut fe, &m, 0, 16);
    // SAFETY: kill(2) on our child's PID.
    unsafe { libc::kill(d.pid(), libc::SIGTERM) };
    let status = d
        .wait_exit(Duration::from_secs(10))
        .expect("no exit 10 s after SIGTERM");
    assert_eq!(status.code(), Some(0));
    assert!(!d.socket.exists(), "socket file left behind");
    drop(fe);
}

#[test]
fn poll_us_serves_requests() {
    let mut d = start(&["--poll-us", "200"]);
    read_sector_ok(&d, 9);
    read_sector_ok(&d, 10);
    d.assert_serving("polling connections");
}

#[test]
fn print_capabilities_and_help() {
    let out = Command::new(BIN)
        .arg("--print-capabilities")
        .output()
        .unwrap();
    assert!(out.status.success());
    let s = String::from_utf8(out.stdout).unwrap();
    let compact: String = s.split_whitespace().collect();
    assert_eq!(
        compact,
        r#"{"type":"block","features":["read-only","blk-file"]}"#
    );

    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let s = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--socket-path",
        "--fd",
        "--connect",
        "--blk-file",
        "--read-only",
        "--direct",
        "--queues",
        "--queue-size",
        "--poll-us",
        "--print-capabilities",
    ] {
        assert!(s.contains(flag), "--help lacks {flag}");
    }
}

/// Runs the binary, expects exit 2 and exactly one stderr line containing `want`.
fn bad(args: &[&str], want: &str) {
    let mut child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "error")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A daemon that starts instead of refusing is stopped, not waited for forever.
    let t = std::time::Instant::now();
    while matches!(child.try_wait(), Ok(None)) && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    if matches!(child.try_wait(), Ok(None)) {
        stop_child(&mut child);
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{args:?}: not one line: {err}"
    );
    assert!(err.contains(want), "{args:?}: {err}");
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    let dir = tempdir("vub-bad");
    let sock = dir.as_path().join("s.sock");
    let sock = sock.to_str().unwrap();
    let img = dir.as_path().join("d.img");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    let img = img.to_str().unwrap();
    bad(
        &["--socket-path", sock, "--blk-file", "/nonexistent/x.img"],
        "create it",
    );
    bad(
        &[
            "--socket-path",
            "/nonexistent-dir/s.sock",
            "--blk-file",
            img,
        ],
        "directory does not exist",
    );
    bad(
        &[
            "--socket-path",
            sock,
            "--blk-file",
            img,
            "--queue-size",
            "100",
        ],
        "power of two",
    );
    bad(
        &[
            "--socket-path",
            sock,
            "--blk-file",
            img,
            "--queue-size",
            "65536",
        ],
        "--queue-size",
    );
    bad(
        &["--socket-path", sock, "--blk-file", img, "--queues", "0"],
        "--queues",
    );
    bad(
        &[
            "--socket-path",
            sock,
            "--blk-file",
            img,
            "--poll-us",
            "1000001",
        ],
        "--poll-us 1000001 µs: expected 0 (off) to 1000000",
    );
    bad(
        &["--fd", "0", "--blk-file", img],
        "not a unix stream socket",
    );
    bad(
        &["--fd", "1000", "--blk-file", img],
        "not an open file descriptor",
    );
    bad(&["--blk-file", img], "--socket-path");
    assert!(!std::path::Path::new(sock).exists());
}

#[test]
fn serves_an_inherited_listening_fd() {
    use std::os::unix::process::CommandExt;
    let dir = tempdir("vub-fd");
    let img = dir.as_path().join("disk.img");
    let data: Vec<u8> = (0..IMG_SECTORS * 512).map(pattern).collect();
    std::fs::write(&img, data).unwrap();
    let sock = dir.as_path().join("fd.sock");
    let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let fd = l.as_raw_fd();
    let mut cmd = Command::new(BIN);
    cmd.args(["--fd", "3", "--blk-file", img.to_str().unwrap()]);
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
    let child = cmd.spawn().unwrap();
    let d = Daemon {
        child: Some(child),
        dir,
        socket: sock,
    };
    drop(l);
    read_sector_ok(&d, 2);
    read_sector_ok(&d, 4);
}

/// An image path given as the socket path (as such, through another spelling, or through a
/// hard link) is refused before anything touches the image.
#[test]
fn the_image_is_never_the_socket() {
    let dir = tempdir("vub-same");
    let img = dir.as_path().join("d.img");
    let data: Vec<u8> = (0..8192u64).map(pattern).collect();
    std::fs::write(&img, &data).unwrap();
    let link = dir.as_path().join("link.img");
    std::fs::hard_link(&img, &link).unwrap();
    let img_s = img.to_str().unwrap();
    let other_spelling = dir.as_path().join(".").join("d.img");
    for sock in [
        img_s,
        other_spelling.to_str().unwrap(),
        link.to_str().unwrap(),
    ] {
        bad(
            &["--socket-path", sock, "--blk-file", img_s],
            "is the disk image",
        );
        assert_eq!(std::fs::read(&img).unwrap(), data, "{sock}: image changed");
    }
}

/// A path that exists and is not a socket is refused and left as it was; a stale socket
/// (nobody listens) is replaced.
#[test]
fn only_a_stale_socket_is_replaced() {
    let dir = tempdir("vub-notsock");
    let img = dir.as_path().join("d.img");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    let file = dir.as_path().join("file");
    std::fs::write(&file, b"precious").unwrap();
    bad(
        &[
            "--socket-path",
            file.to_str().unwrap(),
            "--blk-file",
            img.to_str().unwrap(),
        ],
        "is not a socket",
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");
    let sub = dir.as_path().join("subdir");
    std::fs::create_dir(&sub).unwrap();
    bad(
        &[
            "--socket-path",
            sub.to_str().unwrap(),
            "--blk-file",
            img.to_str().unwrap(),
        ],
        "is not a socket",
    );
    assert!(sub.is_dir());

    // A stale socket: bound, then its listener closed.
    let d = start_at_stale_socket();
    read_sector_ok(&d, 1);
}

fn start_at_stale_socket() -> Daemon {
    let dir = tempdir("vub-stale");
    drop(std::os::unix::net::UnixListener::bind(dir.as_path().join("vu.sock")).unwrap());
    assert!(dir.as_path().join("vu.sock").exists());
    let img = dir.as_path().join("disk.img");
    let data: Vec<u8> = (0..IMG_SECTORS * 512).map(pattern).collect();
    std::fs::write(&img, data).unwrap();
    let img = img.to_str().unwrap().to_string();
    Daemon::start(BIN, dir, &["--blk-file", &img])
}

/// A second daemon on the path of a live one exits 2 with one line; the first keeps its
/// socket and keeps serving.
#[test]
fn a_live_socket_is_not_taken_over() {
    let mut d = start(&[]);
    let img = d.dir.as_path().join("disk.img");
    bad(
        &[
            "--socket-path",
            d.socket.to_str().unwrap(),
            "--blk-file",
            img.to_str().unwrap(),
        ],
        "another back-end is listening there",
    );
    d.assert_serving("a second daemon started on its socket");
    read_sector_ok(&d, 2);
    // Neither daemon left its temporary bind name (`.vu.sock.PID.binding`) behind.
    let mut names: Vec<String> = std::fs::read_dir(d.dir.as_path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["disk.img", "vu.sock"]);
}

/// At exit the daemon removes its socket only if the path still names the socket it
/// created: one put there since (by another back-end) stays.
#[test]
fn a_replaced_socket_is_not_removed_at_exit() {
    let mut d = start(&[]);
    std::fs::remove_file(&d.socket).unwrap();
    let theirs = std::os::unix::net::UnixListener::bind(&d.socket).unwrap();
    // SAFETY: kill(2) on our child's PID.
    unsafe { libc::kill(d.pid(), libc::SIGTERM) };
    let status = d
        .wait_exit(Duration::from_secs(10))
        .expect("no exit 10 s after SIGTERM");
    assert_eq!(status.code(), Some(0));
    assert!(d.socket.exists(), "the other back-end's socket was removed");
    let _c = std::os::unix::net::UnixStream::connect(&d.socket).expect("connect");
    assert!(theirs.accept().is_ok());
}

/// Client mode: the daemon connects to a frontend that listens, serves it, and when it
/// is gone (its socket too, as a restarting frontend's) connects again once it listens
/// again.
#[test]
fn connect_mode_serves_and_reconnects_to_a_restarted_frontend() {
    let dir = tempdir("vub-connect");
    let img = dir.as_path().join("disk.img");
    let data: Vec<u8> = (0..IMG_SECTORS * 512).map(pattern).collect();
    std::fs::write(&img, data).unwrap();
    let sock = dir.as_path().join("frontend.sock");
    // The daemon starts before the frontend listens: it waits.
    let child = Command::new(BIN)
        .arg("--connect")
        .arg(&sock)
        .arg("--blk-file")
        .arg(&img)
        .env("RUST_LOG", "debug")
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut d = Daemon {
        child: Some(child),
        dir,
        socket: sock.clone(),
    };
    std::thread::sleep(Duration::from_millis(300));
    assert!(d.alive(), "the daemon gave up before the frontend listened");
    for (round, sector) in [(1, 3u64), (2, 8)] {
        let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let s = accept_within(&l, Duration::from_secs(5));
        let (fe, _) = negotiate_frontend(vhost::vhost_user::Frontend::from_stream(s, 1));
        read_sector_through(fe, sector);
        // The frontend goes away with its socket, and is not back for a while.
        drop(l);
        std::fs::remove_file(&sock).unwrap();
        std::thread::sleep(Duration::from_millis(400));
        assert!(
            d.alive(),
            "round {round}: the daemon exited with its frontend"
        );
    }
    // SIGTERM while connected: exits 0, and the frontend's socket is the frontend's.
    let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let _s = accept_within(&l, Duration::from_secs(5));
    // SAFETY: kill(2) on our child's PID.
    unsafe { libc::kill(d.pid(), libc::SIGTERM) };
    let status = d
        .wait_exit(Duration::from_secs(5))
        .expect("no exit after SIGTERM");
    assert_eq!(status.code(), Some(0));
    assert!(sock.exists(), "the daemon removed the frontend's socket");
}

#[test]
fn exactly_one_of_socket_path_fd_and_connect() {
    let dir = tempdir("vub-one");
    let img = dir.as_path().join("d.img");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    let img = img.to_str().unwrap();
    let sock = dir.as_path().join("s.sock");
    let sock = sock.to_str().unwrap();
    bad(
        &["--socket-path", sock, "--connect", sock, "--blk-file", img],
        "--connect",
    );
    bad(
        &["--fd", "3", "--connect", sock, "--blk-file", img],
        "--connect",
    );
    assert!(!std::path::Path::new(sock).exists());
}

/// The frontend side of INFLIGHT_SHMFD: negotiates it with everything `negotiate` does.
fn negotiate_inflight(d: &Daemon) -> vhost::vhost_user::Frontend {
    use vhost::vhost_user::message::VhostUserProtocolFeatures as P;
    let mut fe = vhost::vhost_user::Frontend::connect(&d.socket, 1).expect("connect");
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    fe.set_features(features).unwrap();
    let pf = fe.get_protocol_features().unwrap();
    assert!(
        pf.contains(P::INFLIGHT_SHMFD),
        "INFLIGHT_SHMFD not offered: {pf:?}"
    );
    fe.set_protocol_features(required_protocol_features() | P::INFLIGHT_SHMFD)
        .unwrap();
    fe
}

/// The ring a back-end that completes out of order leaves when it dies: head 0 a FLUSH it
/// took and never completed, head 2 a READ of sector 5 it took after and completed (used
/// entry 0). Returns the guest memory.
fn crashed_ring(size: u16) -> GuestMem {
    let m = GuestMem::new(1 << 20);
    // head 0: FLUSH (type 4), status at 0x6000.
    m.mem.write_obj(4u32, GuestAddress(0x4000)).unwrap();
    m.mem.write_obj(0u64, GuestAddress(0x4008)).unwrap();
    m.mem.write_obj(0xffu8, GuestAddress(0x6000)).unwrap();
    put_desc(&m, 0, 0x4000, 16, F_NEXT, 1);
    put_desc(&m, 1, 0x6000, 1, F_WRITE, 0);
    // head 2: IN sector 5 into 0x5000, status at 0x6001.
    m.mem.write_obj(0u32, GuestAddress(0x4100)).unwrap();
    m.mem.write_obj(5u64, GuestAddress(0x4108)).unwrap();
    m.mem.write_obj(0xffu8, GuestAddress(0x6001)).unwrap();
    put_desc(&m, 2, 0x4100, 16, F_NEXT, 3);
    put_desc(&m, 3, 0x5000, 512, F_NEXT | F_WRITE, 4);
    put_desc(&m, 4, 0x6001, 1, F_WRITE, 0);
    publish(&m, size, 0, 0);
    publish(&m, size, 1, 2);
    // EVENT_IDX: the driver wants a notification for the next used entry.
    m.mem
        .write_obj(1u16, GuestAddress(AVAIL + 4 + 2 * u64::from(size)))
        .unwrap();
    // The dead back-end's completion of head 2: used entry 0, used index 1.
    m.mem
        .write_obj(2u32, GuestAddress(USED + 4))
        .and_then(|_| m.mem.write_obj(513u32, GuestAddress(USED + 8)))
        .and_then(|_| m.mem.write_obj(1u16, GuestAddress(USED + 2)))
        .unwrap();
    m
}

/// Starts queue 0 on `fe` at the used index, as a frontend does after a back-end crash.
fn resume_queue(
    fe: &mut vhost::vhost_user::Frontend,
    m: &GuestMem,
    size: u16,
) -> (
    vmm_sys_util::eventfd::EventFd,
    vmm_sys_util::eventfd::EventFd,
) {
    let kick = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let call = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    fe.set_mem_table(&[m.region_info()]).unwrap();
    fe.set_vring_num(0, size).unwrap();
    fe.set_vring_addr(0, &vring_config(m, size)).unwrap();
    fe.set_vring_base(0, used_idx(m)).unwrap();
    fe.set_vring_call(0, &call).unwrap();
    fe.set_vring_kick(0, &kick).unwrap();
    fe.set_vring_enable(0, true).unwrap();
    kick.write(1).unwrap();
    (kick, call)
}

fn used_ids(m: &GuestMem, size: u16) -> Vec<u32> {
    (0..used_idx(m)).map(|n| used_elem(m, n, size).0).collect()
}

#[test]
fn after_a_crash_the_daemon_executes_exactly_what_the_inflight_region_says_was_taken() {
    use std::os::fd::AsRawFd as _;
    let size = 16u16;
    let mut d = start(&[]);

    // Without the region (what every restart did before): resuming at the used index serves
    // head 2's ring slot again, and the flush never.
    let m = crashed_ring(size);
    let (mut fe, _) = negotiate(&d.socket, 1);
    let (_kick, call) = resume_queue(&mut fe, &m, size);
    assert!(wait_readable(call.as_raw_fd(), Duration::from_secs(5)));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        used_ids(&m, size),
        vec![2, 2],
        "the old resume doubles head 2"
    );
    drop(fe);
    d.assert_serving("a connection without inflight tracking");

    // With the region: the frontend got it from an earlier connection and kept it; the
    // earlier back-end recorded head 0 as taken (counter 7) and head 2 as completed.
    let m = crashed_ring(size);
    let mut fe = negotiate_inflight(&d);
    let want = vhost::vhost_user::message::VhostUserInflight::new(0, 0, 1, size);
    let (info, file) = fe.get_inflight_fd(&want).expect("GET_INFLIGHT_FD");
    assert_eq!((info.num_queues, info.queue_size), (1, size));
    assert!(info.mmap_size >= 16 + 16 * u64::from(size));
    drop(fe);
    {
        use std::os::unix::fs::FileExt;
        // Header: version 1, desc_num, last_batch_head 2, used_idx 1.
        let mut hdr = [0u8; 16];
        hdr[8..10].copy_from_slice(&1u16.to_le_bytes());
        hdr[10..12].copy_from_slice(&size.to_le_bytes());
        hdr[12..14].copy_from_slice(&2u16.to_le_bytes());
        hdr[14..16].copy_from_slice(&1u16.to_le_bytes());
        file.write_all_at(&hdr, 0).unwrap();
        let mut desc0 = [0u8; 16];
        desc0[0] = 1;
        desc0[8..16].copy_from_slice(&7u64.to_le_bytes());
        file.write_all_at(&desc0, 16).unwrap();
    }
    let mut fe = negotiate_inflight(&d);
    fe.set_inflight_fd(&info, file.as_raw_fd())
        .expect("SET_INFLIGHT_FD");
    let (_kick, call) = resume_queue(&mut fe, &m, size);
    assert!(
        wait_readable(call.as_raw_fd(), Duration::from_secs(5)),
        "the resumed queue signals the guest"
    );
    let t = std::time::Instant::now();
    while used_idx(&m) < 2 && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(used_ids(&m, size), vec![2, 0], "every head exactly once");
    let st: u8 = m.mem.read_obj(GuestAddress(0x6000)).unwrap();
    assert_eq!(st, 0, "the flush was executed");
    // The region now records nothing in flight.
    {
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 1];
        file.read_exact_at(&mut b, 16).unwrap();
        assert_eq!(b[0], 0, "head 0 completed in the region");
    }
    drop(fe);
    d.assert_serving("a resumed connection");
}

#[test]
fn an_inflight_region_past_its_file_drops_the_connection_not_the_daemon() {
    use std::os::fd::AsRawFd as _;
    let mut d = start(&[]);
    let mut fe = negotiate_inflight(&d);
    let small = memfd(4096);
    let lie = vhost::vhost_user::message::VhostUserInflight::new(1 << 20, 0, 4, 1024);
    let _ = fe.set_inflight_fd(&lie, small.as_raw_fd());
    assert!(
        fe.get_features().is_err(),
        "a region larger than its file ends the connection"
    );
    drop(fe);
    d.assert_serving("a bad inflight region");
    read_sector_ok(&d, 9);
}

/// A ring that re-arms itself from the disk (issue #20's loop): sector `s` of the image holds
/// an available ring with one more entry for head 0 (index `s + 2`) and, at byte 64, the
/// header of a read of sector `s + 1`; head 0 reads one sector into the available ring
/// itself. The frontend keeps kicking, as a guest that re-arms does. Every GET_VRING_BASE
/// (the frontend stopping the ring: a guest's reset) must be answered promptly, round after
/// round: the worker comes back between budgets, and must let the stop have the queue then
/// instead of taking it again at once (the vmm's deadline for a reply is 3 s).
#[test]
fn a_self_re_arming_ring_is_stopped_promptly_every_time() {
    const SECTORS: usize = 65536;
    const HDR: u64 = AVAIL + 64;
    const STATUS: u64 = 0x6000;
    const ROUNDS: u32 = 12;
    let dir = tempdir("vub");
    let img = dir.as_path().join("loop.img");
    let mut data = vec![0u8; SECTORS * 512];
    for (s, sector) in data.chunks_mut(512).enumerate() {
        sector[2..4].copy_from_slice(&((s + 2) as u16).to_le_bytes());
        sector[72..80].copy_from_slice(&(((s + 1) % SECTORS) as u64).to_le_bytes());
    }
    std::fs::write(&img, &data).unwrap();
    let img = img.to_str().unwrap().to_string();
    let mut d = Daemon::start(BIN, dir, &["--blk-file", &img]);
    let (mut fe, _) = negotiate(&d.socket, 1);
    let m = GuestMem::new(1 << 20);
    fe.set_mem_table(&[m.region_info()]).unwrap();
    let size = 16;
    let mut worst = Duration::ZERO;
    for round in 0..ROUNDS {
        // A fresh ring: nothing used, head 0 armed for sector 0.
        for a in (AVAIL..AVAIL + 0x1000).chain(USED..USED + 0x1000) {
            m.mem.write_obj(0u8, GuestAddress(a)).unwrap();
        }
        m.mem.write_obj(0u32, GuestAddress(HDR)).unwrap();
        m.mem.write_obj(0u64, GuestAddress(HDR + 8)).unwrap();
        put_desc(&m, 0, HDR, 16, F_NEXT, 1);
        put_desc(&m, 1, AVAIL, 512, F_NEXT | F_WRITE, 2);
        put_desc(&m, 2, STATUS, 1, F_WRITE, 0);
        publish(&m, size, 0, 0);
        let (kick, _call) = setup_queue(&mut fe, &m, 0, size);
        let stop = AtomicBool::new(false);
        let (back, took) = std::thread::scope(|sc| {
            let kicker = sc.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let _ = kick.write(1);
                    std::thread::sleep(Duration::from_micros(200));
                }
            });
            // The loop runs: the used index moves far past what was published.
            let t = std::time::Instant::now();
            while used_idx(&m) < 2000 && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(2));
            }
            let moved = used_idx(&m);
            let r = timed_get_vring_base(fe, &d, &format!("round {round}"));
            stop.store(true, Ordering::Relaxed);
            kicker.join().unwrap();
            assert!(
                moved >= 2000,
                "round {round}: the loop did not run ({moved})"
            );
            r
        });
        fe = back;
        // Stopped: nothing moves any more.
        let used = used_idx(&m);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(used, used_idx(&m), "round {round}: the ring still runs");
        worst = worst.max(took);
        assert!(
            took < Duration::from_secs(1),
            "round {round}: GET_VRING_BASE took {took:?} while the ring re-armed itself"
        );
    }
    eprintln!("worst GET_VRING_BASE of {ROUNDS} rounds: {worst:?}");
    let got = plain_read(&mut fe, &m, 3);
    assert_eq!(
        &got[72..80],
        &4u64.to_le_bytes(),
        "sector 3 after the rounds"
    );
    drop(fe);
    d.assert_serving("self-re-arming rings");
}

/// GET_VRING_BASE for queue 0, timed; a daemon that has not answered in 5 s is killed (its
/// socket closes, which ends the call) and the test fails.
fn timed_get_vring_base(
    fe: vhost::vhost_user::Frontend,
    d: &Daemon,
    what: &str,
) -> (vhost::vhost_user::Frontend, Duration) {
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::time::Instant::now();
    let h = std::thread::spawn(move || {
        let r = fe.get_vring_base(0);
        let _ = tx.send(t.elapsed());
        (fe, r)
    });
    let Ok(took) = rx.recv_timeout(Duration::from_secs(5)) else {
        // SAFETY: kill(2) on the daemon this test started and has not reaped.
        unsafe { libc::kill(d.pid(), libc::SIGKILL) };
        let _ = h.join();
        panic!("{what}: GET_VRING_BASE not answered in 5 s");
    };
    let (fe, r) = h.join().unwrap();
    assert!(r.is_ok(), "{what}: GET_VRING_BASE: {r:?}");
    (fe, took)
}

/// Restarts queue 0 (of 16) on `m` with a fresh ring and reads `sector` through it: the
/// queue serves a plain request after it was stopped. Returns the data.
fn plain_read(fe: &mut vhost::vhost_user::Frontend, m: &GuestMem, sector: u64) -> Vec<u8> {
    let size = 16;
    for a in (AVAIL..AVAIL + 0x1000).chain(USED..USED + 0x1000) {
        m.mem.write_obj(0u8, GuestAddress(a)).unwrap();
    }
    m.mem.write_obj(0u32, GuestAddress(0x4000)).unwrap();
    m.mem.write_obj(0u32, GuestAddress(0x4004)).unwrap();
    m.mem.write_obj(sector, GuestAddress(0x4008)).unwrap();
    m.mem.write_obj(0xffu8, GuestAddress(0x6000)).unwrap();
    put_desc(m, 0, 0x4000, 16, F_NEXT, 1);
    put_desc(m, 1, 0x5000, 512, F_NEXT | F_WRITE, 2);
    put_desc(m, 2, 0x6000, 1, F_WRITE, 0);
    publish(m, size, 0, 0);
    let (kick, call) = setup_queue(fe, m, 0, size);
    kick.write(1).unwrap();
    assert!(
        wait_readable(call.as_raw_fd(), Duration::from_secs(5)),
        "no used-buffer notification for a plain read"
    );
    assert_eq!(used_idx(m), 1);
    let status: u8 = m.mem.read_obj(GuestAddress(0x6000)).unwrap();
    assert_eq!(status, 0, "VIRTIO_BLK_S_OK");
    let mut got = vec![0u8; 512];
    m.mem.read_slice(&mut got, GuestAddress(0x5000)).unwrap();
    got
}

/// The aliased bounce flood of issue #20 on `--direct`: a ring of misaligned 64 MiB reads
/// whose 1 MiB descriptors all alias one guest buffer, each bounced piece by piece on the
/// queue thread (larger than the bounce budget), completed heads made available again at
/// once. The frontend stops the ring (GET_VRING_BASE) round after round while the flood
/// runs: each stop must come within one request or so, not after a ring of them, and the
/// daemon's memory stays bounded.
#[test]
fn an_aliased_bounce_flood_is_stopped_promptly_every_time() {
    const MIB: u64 = 1 << 20;
    const SEGS: u64 = 64;
    const TABLE: u64 = 0x8000;
    const BUF: u64 = 0x10_0200;
    const ROUNDS: u32 = 6;
    let dir = tempdir("vub");
    let img = dir.as_path().join("flood.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(SEGS * MIB)
        .unwrap();
    let img = img.to_str().unwrap().to_string();
    let mut d = Daemon::start(BIN, dir, &["--blk-file", &img, "--direct"]);
    let (mut fe, _) = negotiate(&d.socket, 1);
    let m = GuestMem::new(4 * MIB);
    fe.set_mem_table(&[m.region_info()]).unwrap();
    // 64 requests of 64 MiB: 4 GiB in one call without a bound on the bytes a call moves.
    let size: u16 = 64;
    // One indirect table: header (IN, sector 0), SEGS x 1 MiB on BUF, status.
    let put = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
        let at = TABLE + 16 * i;
        m.mem.write_obj(addr, GuestAddress(at)).unwrap();
        m.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        m.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        m.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    };
    m.mem.write_obj(0u32, GuestAddress(0x4000)).unwrap();
    m.mem.write_obj(0u64, GuestAddress(0x4008)).unwrap();
    put(0, 0x4000, 16, F_NEXT, 1);
    for i in 1..=SEGS {
        put(i, BUF, MIB as u32, F_NEXT | F_WRITE, i as u16 + 1);
    }
    put(SEGS + 1, 0x6000, 1, F_WRITE, 0);
    let mut worst = Duration::ZERO;
    for round in 0..ROUNDS {
        for a in (AVAIL..AVAIL + 0x1000).chain(USED..USED + 0x1000) {
            m.mem.write_obj(0u8, GuestAddress(a)).unwrap();
        }
        for h in 0..size {
            put_desc(&m, h, TABLE, (16 * (SEGS + 2)) as u32, 4, 0);
            publish(&m, size, h, h);
        }
        let (kick, _call) = setup_queue(&mut fe, &m, 0, size);
        let stop = AtomicBool::new(false);
        let (back, took) = std::thread::scope(|sc| {
            // The guest: every completed head goes back to the ring at once.
            let guest = sc.spawn(|| {
                let (mut avail, mut seen) = (size, 0u16);
                while !stop.load(Ordering::Relaxed) {
                    let used = used_idx(&m);
                    while seen != used {
                        let (id, _) = used_elem(&m, seen, size);
                        publish(&m, size, avail, id as u16);
                        avail = avail.wrapping_add(1);
                        seen = seen.wrapping_add(1);
                    }
                    let _ = kick.write(1);
                    std::thread::sleep(Duration::from_micros(500));
                }
                seen
            });
            let t = std::time::Instant::now();
            while used_idx(&m) < 4 && t.elapsed() < Duration::from_secs(20) {
                std::thread::sleep(Duration::from_millis(2));
            }
            let served = used_idx(&m);
            let r = timed_get_vring_base(fe, &d, &format!("round {round}"));
            stop.store(true, Ordering::Relaxed);
            guest.join().unwrap();
            assert!(
                served >= 4,
                "round {round}: the flood was not served ({served})"
            );
            r
        });
        fe = back;
        worst = worst.max(took);
        assert!(
            took < Duration::from_secs(1),
            "round {round}: GET_VRING_BASE took {took:?} during the flood"
        );
    }
    let hwm = std::fs::read_to_string(format!("/proc/{}/status", d.pid()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:").map(|v| v.trim().to_string()))
        .unwrap();
    eprintln!("worst GET_VRING_BASE of {ROUNDS} rounds: {worst:?}; daemon VmHWM {hwm}");
    let kib: u64 = hwm.trim_end_matches(" kB").parse().unwrap();
    assert!(kib < 64 << 10, "the daemon's peak RSS is {hwm}");
    let got = plain_read(&mut fe, &m, 3);
    assert!(got.iter().all(|&b| b == 0), "sector 3 of a sparse image");
    drop(fe);
    d.assert_serving("aliased bounce floods");
}

/// `GET /stats` over the unix socket; the JSON body.
fn get_stats(path: &std::path::Path) -> serde_json::Value {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let body = out.split_once("\r\n\r\n").unwrap().1;
    serde_json::from_str(body).unwrap()
}

/// `--stats-socket`: the per-queue counters of every frontend since the daemon started
/// (reads, bytes, kicks, interrupts, one latency per request), readable while it serves.
#[test]
fn stats_socket_counts_every_frontends_requests() {
    let dir = tempdir("vub-stats");
    let stats = dir.as_path().join("stats.sock");
    let mut d = start(&["--stats-socket", stats.to_str().unwrap()]);
    let start = std::time::Instant::now();
    while !stats.exists() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let v = get_stats(&stats);
    assert_eq!(v["device"], "vhost-user-blk");
    assert_eq!(v["queues"][0]["reads"], 0, "{v}");
    read_sector_ok(&d, 1);
    read_sector_ok(&d, 2);
    let v = get_stats(&stats);
    let q = &v["queues"][0];
    assert_eq!(q["reads"], 2, "{v}");
    assert_eq!(q["bytes_read"], 2 * 512, "{v}");
    // Each frontend kicked once; vhost-user-backend also raises the queue's event once
    // when a ring it had seen a kick for gets enabled: at most one more each.
    let kicks = q["notifications"].as_u64().unwrap();
    assert!((2..=4).contains(&kicks), "{v}");
    assert_eq!(q["interrupts"], 2, "{v}");
    assert_eq!(q["latency_us"]["count"], 2, "{v}");
    d.assert_serving("after the stats were read");
}
