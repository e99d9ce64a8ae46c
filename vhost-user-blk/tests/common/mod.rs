//! Test frontend helpers shared by the vhost-user daemon tests: the daemon process, guest
//! memory in a memfd, raw vhost-user messages, and a split virtqueue written by hand.
#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
    MmapRegion,
};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use vmm_sys_util::tempdir::TempDir;

/// A daemon process, killed (by PID) in Drop; its temp dir goes with it.
pub struct Daemon {
    pub child: Option<Child>,
    pub dir: TempDir,
    pub socket: PathBuf,
}

impl Daemon {
    /// Starts `bin` with `args` (`--socket-path` is added) and waits for the socket.
    pub fn start(bin: &str, dir: TempDir, args: &[&str]) -> Daemon {
        let socket = dir.as_path().join("vu.sock");
        let child = Command::new(bin)
            .arg("--socket-path")
            .arg(&socket)
            .args(args)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn the daemon");
        let mut d = Daemon {
            child: Some(child),
            dir,
            socket,
        };
        let t = Instant::now();
        while !d.socket.exists() {
            assert!(d.alive(), "the daemon exited before creating its socket");
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "no socket after 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    /// [`Daemon::start`] with the daemon's stderr in `stderr.log` of its directory (read
    /// with [`Daemon::log`]), and its temporary directory (the relay's private socket) in
    /// `tmp/` there, so that nothing is left behind by a daemon that gets killed. Both are
    /// searchable by others, for a daemon that becomes `--user`.
    pub fn start_logged(bin: &str, dir: TempDir, args: &[&str]) -> Daemon {
        use std::os::unix::fs::PermissionsExt;
        let socket = dir.as_path().join("vu.sock");
        let log = File::create(dir.as_path().join("stderr.log")).expect("daemon log");
        let tmp = dir.as_path().join("tmp");
        std::fs::create_dir(&tmp).expect("daemon tmp dir");
        for d in [dir.as_path(), tmp.as_path()] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711)).unwrap();
        }
        let child = Command::new(bin)
            .arg("--socket-path")
            .arg(&socket)
            .args(args)
            .env("RUST_LOG", "info")
            .env("TMPDIR", &tmp)
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn the daemon");
        let mut d = Daemon {
            child: Some(child),
            dir,
            socket,
        };
        let t = Instant::now();
        while !d.socket.exists() {
            assert!(
                d.alive(),
                "the daemon exited before creating its socket: {}",
                d.log()
            );
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "no socket after 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    /// What a daemon started with [`Daemon::start_logged`] wrote on stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.as_path().join("stderr.log")).unwrap_or_default()
    }

    /// Waits up to `t` for `needle` in [`Daemon::log`].
    pub fn wait_log(&self, needle: &str, t: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < t {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The daemon is still running and its socket is still there.
    pub fn assert_serving(&mut self, after: &str) {
        std::thread::sleep(Duration::from_millis(50));
        assert!(self.alive(), "the daemon died after: {after}");
        assert!(self.socket.exists(), "the socket vanished after: {after}");
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(-1, |c| c.id() as i32)
    }

    /// Waits up to `t` for the exit status.
    pub fn wait_exit(&mut self, t: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < t {
            if let Some(Ok(Some(s))) = self.child.as_mut().map(|c| c.try_wait()) {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

/// SIGTERM (the daemon removes its sockets and its private relay directory), then SIGKILL
/// if it has not exited within 2 s; reaps it.
pub fn stop_child(c: &mut Child) {
    // SAFETY: kill(2) on the PID of our own child, which we have not reaped yet.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        if !matches!(c.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: as above; the child is still not reaped.
    unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
    let _ = c.wait();
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c);
        }
    }
}

/// One thread of a process, from /proc/PID/task/TID/status.
pub struct ThreadStatus {
    pub tid: String,
    pub name: String,
    pub status: String,
}

impl ThreadStatus {
    /// The value of `field` ("Seccomp", "Uid"...), whitespace-normalised.
    pub fn field(&self, field: &str) -> String {
        self.status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    }
}

/// Every thread of process `pid`.
pub fn threads(pid: i32) -> Vec<ThreadStatus> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc/PID/task") {
        let e = e.unwrap();
        let tid = e.file_name().to_string_lossy().into_owned();
        // A thread may end meanwhile.
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let name = status
            .lines()
            .find_map(|l| l.strip_prefix("Name:"))
            .unwrap_or("")
            .trim()
            .to_string();
        out.push(ThreadStatus { tid, name, status });
    }
    out
}

/// The kernel's Landlock ABI version (0: no Landlock).
pub fn landlock_abi() -> i64 {
    // SAFETY: landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION) only returns
    // the ABI version or an error; it reads no memory.
    let r = unsafe { libc::syscall(libc::SYS_landlock_create_ruleset, 0usize, 0usize, 1u32) };
    r.max(0)
}

/// uid and gid of `name` in the password database.
pub fn passwd(name: &str) -> Option<(u32, u32)> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 3 && f[0] == name).then(|| (f[2].parse().ok(), f[3].parse().ok()))
        })
        .and_then(|(u, g)| Some((u?, g?)))
}

pub fn tempdir(prefix: &str) -> TempDir {
    TempDir::new_with_prefix(format!("/tmp/{prefix}")).expect("temp dir")
}

/// Guest memory of `size` bytes at guest address 0 in a memfd, mapped shared here.
pub struct GuestMem {
    pub mem: GuestMemoryMmap,
    pub file: File,
    pub size: u64,
}

pub fn memfd(size: u64) -> File {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"vu-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nobody else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).expect("ftruncate");
    f
}

impl GuestMem {
    pub fn new(size: u64) -> GuestMem {
        let file = memfd(size);
        let region = MmapRegion::from_file(
            FileOffset::new(file.try_clone().expect("dup"), 0),
            size as usize,
        )
        .expect("mmap");
        let region = GuestRegionMmap::new(region, GuestAddress(0)).expect("region");
        let mem = GuestMemoryMmap::from_regions(vec![region]).expect("memory");
        GuestMem { mem, file, size }
    }

    pub fn region_info(&self) -> VhostUserMemoryRegionInfo {
        let r = self.mem.iter().next().expect("one region");
        VhostUserMemoryRegionInfo::from_guest_region(r).expect("region info")
    }

    /// The frontend's virtual address of guest address `gpa`.
    pub fn va(&self, gpa: u64) -> u64 {
        self.region_info().userspace_addr + gpa
    }
}

/// Split ring layout used by the tests.
pub const DESC: u64 = 0x1000;
pub const AVAIL: u64 = 0x2000;
pub const USED: u64 = 0x3000;

pub fn vring_config(m: &GuestMem, size: u16) -> VringConfigData {
    VringConfigData {
        queue_max_size: size,
        queue_size: size,
        flags: 0,
        desc_table_addr: m.va(DESC),
        used_ring_addr: m.va(USED),
        avail_ring_addr: m.va(AVAIL),
        log_addr: None,
    }
}

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;

/// Writes descriptor `i` of the table at DESC.
pub fn put_desc(m: &GuestMem, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let at = GuestAddress(DESC + 16 * u64::from(i));
    m.mem.write_obj(addr, at).unwrap();
    m.mem.write_obj(len, at.unchecked_add(8)).unwrap();
    m.mem.write_obj(flags, at.unchecked_add(12)).unwrap();
    m.mem.write_obj(next, at.unchecked_add(14)).unwrap();
}

/// Publishes `head` as available entry number `n` (0-based) of a queue of `size`.
pub fn publish(m: &GuestMem, size: u16, n: u16, head: u16) {
    let slot = AVAIL + 4 + 2 * u64::from(n % size);
    m.mem.write_obj(head, GuestAddress(slot)).unwrap();
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    m.mem
        .write_obj(n.wrapping_add(1), GuestAddress(AVAIL + 2))
        .unwrap();
}

pub fn used_idx(m: &GuestMem) -> u16 {
    m.mem.read_obj(GuestAddress(USED + 2)).unwrap()
}

/// (id, len) of used entry `n`.
pub fn used_elem(m: &GuestMem, n: u16, size: u16) -> (u32, u32) {
    let at = GuestAddress(USED + 4 + 8 * u64::from(n % size));
    (
        m.mem.read_obj(at).unwrap(),
        m.mem.read_obj(at.unchecked_add(4)).unwrap(),
    )
}

/// Waits until `fd` is readable (an eventfd was signalled), up to `t`.
pub fn wait_readable(fd: RawFd, t: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut p, 1, t.as_millis() as i32) };
    r == 1
}

/// The protocol features the daemons must offer.
pub fn required_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
}

/// Connects and negotiates features (all offered ones) and protocol features.
pub fn negotiate(socket: &Path, queues: u64) -> (Frontend, u64) {
    negotiate_frontend(Frontend::connect(socket, queues).expect("connect"))
}

/// Negotiates features (all offered ones) and protocol features on a connected frontend.
pub fn negotiate_frontend(mut fe: Frontend) -> (Frontend, u64) {
    fe.set_owner().expect("SET_OWNER");
    let features = fe.get_features().expect("GET_FEATURES");
    assert_ne!(
        features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        0,
        "PROTOCOL_FEATURES not offered"
    );
    assert_ne!(features & (1 << 29), 0, "EVENT_IDX not offered");
    fe.set_features(features).expect("SET_FEATURES");
    let pf = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    assert!(
        pf.contains(required_protocol_features()),
        "protocol features {pf:?}"
    );
    fe.set_protocol_features(required_protocol_features())
        .expect("SET_PROTOCOL_FEATURES");
    (fe, features)
}

/// Sets up queue `q` of `size` on `m` and enables it; returns (kick, call).
pub fn setup_queue(fe: &mut Frontend, m: &GuestMem, q: usize, size: u16) -> (EventFd, EventFd) {
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    fe.set_vring_num(q, size).expect("SET_VRING_NUM");
    fe.set_vring_addr(q, &vring_config(m, size))
        .expect("SET_VRING_ADDR");
    fe.set_vring_base(q, 0).expect("SET_VRING_BASE");
    fe.set_vring_call(q, &call).expect("SET_VRING_CALL");
    fe.set_vring_kick(q, &kick).expect("SET_VRING_KICK");
    fe.set_vring_enable(q, true).expect("SET_VRING_ENABLE");
    (kick, call)
}

// Raw vhost-user messages, for what the Frontend refuses to send.
pub const GET_FEATURES: u32 = 1;
pub const SET_FEATURES: u32 = 2;
pub const SET_OWNER: u32 = 3;
pub const SET_MEM_TABLE: u32 = 5;
pub const SET_VRING_NUM: u32 = 8;
pub const SET_VRING_ADDR: u32 = 9;
pub const SET_VRING_BASE: u32 = 10;
pub const SET_VRING_KICK: u32 = 12;
pub const SET_VRING_CALL: u32 = 13;

pub fn header(code: u32, size: usize) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&code.to_le_bytes());
    h.extend_from_slice(&1u32.to_le_bytes()); // version 1, request
    h.extend_from_slice(&(size as u32).to_le_bytes());
    h
}

pub fn raw_send(s: &UnixStream, code: u32, body: &[u8], fds: &[RawFd]) {
    let mut msg = header(code, body.len());
    msg.extend_from_slice(body);
    if fds.is_empty() {
        let _ = (&*s).write_all(&msg);
    } else {
        let _ = s.send_with_fds(&[&msg[..]], fds);
    }
}

pub fn mem_table_body(regions: &[(u64, u64, u64, u64)]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    for (gpa, size, ua, off) in regions {
        for v in [gpa, size, ua, off] {
            b.extend_from_slice(&v.to_le_bytes());
        }
    }
    b
}

pub fn vring_state_body(index: u32, num: u32) -> Vec<u8> {
    let mut b = index.to_le_bytes().to_vec();
    b.extend_from_slice(&num.to_le_bytes());
    b
}

pub fn vring_addr_body(index: u32, desc: u64, used: u64, avail: u64) -> Vec<u8> {
    let mut b = index.to_le_bytes().to_vec();
    b.extend_from_slice(&0u32.to_le_bytes());
    for v in [desc, used, avail, 0u64] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

/// Whether the daemon closes `s` within `t` (reads EOF or a reset, after any replies).
pub fn dropped(s: &UnixStream, t: Duration) -> bool {
    s.set_read_timeout(Some(t)).unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        match (&*s).read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
        if start.elapsed() > t {
            return false;
        }
    }
}

/// The next connection on `l` within `t`; panics (the caller's Drop guards clean up) if
/// none comes.
pub fn accept_within(l: &std::os::unix::net::UnixListener, t: Duration) -> UnixStream {
    l.set_nonblocking(true).unwrap();
    let start = Instant::now();
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                return s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(start.elapsed() < t, "no connection within {t:?}");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Connects a raw socket to the daemon.
pub fn raw_connect(socket: &Path) -> UnixStream {
    UnixStream::connect(socket).expect("connect")
}

pub fn raw_fd_of<T: AsRawFd>(t: &T) -> RawFd {
    t.as_raw_fd()
}
