//! vhost-user frontends: the device runs in a back-end process; the VMM negotiates
//! features, shares guest memory (the memfd) and hands the back-end each queue's ioeventfd
//! (kick) and MSI-X irqfd (call), so it stays off the data path.
//!
//! `--vhost-user-blk socket=PATH[,queues=N][,queue_size=N][,timeout_ms=N][,server=on]
//! [,connect_timeout_ms=N][,id=NAME]` (net likewise, plus `mac=`): with `server=on` the VMM
//! listens at PATH and the back-end connects (QEMU's `server=on,wait=on`: boot waits for
//! the first back-end, at most `connect_timeout_ms` when given).
//!
//! **Nothing here blocks a vCPU or the VMM's exit.** Every message to the back-end runs on
//! the device's control thread, under a deadline (`timeout_ms`, default
//! [`DEFAULT_TIMEOUT`]): a watchdog shuts the socket down when a reply is late, which
//! makes the vhost crate's blocking call return (a plain `SO_RCVTIMEO` does not: its EAGAIN
//! surfaces as `Error::SocketRetry`, which the crate's receive loop retries forever). A
//! back-end that misses a deadline is treated as gone. The transport's status writes only
//! queue a command: DRIVER_OK (activate) returns at once; a reset (status 0) reads as the
//! old status until the back-end acknowledged it (GET_VRING_BASE) or missed the deadline.
//!
//! **When the back-end goes away** the control thread reconnects (client: a non-blocking
//! connect every 100 ms; server: the next connection on the same listener) and replays the
//! setup. Requests are never completed twice nor lost:
//! - With `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD` the VMM keeps the inflight region the
//!   back-end handed out (GET_INFLIGHT_FD at activation) and sends it back
//!   (SET_INFLIGHT_FD) before the rings on every (re)configuration: a restarted back-end
//!   resubmits what its predecessor took and did not complete, the rings resume at the
//!   used index.
//! - Without it, if requests were in flight, their state is unknown (a back-end may
//!   complete out of order): the device sets DEVICE_NEEDS_RESET instead of resuming, and
//!   the driver resets it. Unless the rings had nothing pending once the old back-end was
//!   seen dead: then whatever the driver made available since was never taken (a NIC
//!   that transmits during a back-end restart, DPDK's vhost having no inflight tracking),
//!   and the rings resume at the used index.
//! - After [`OUTAGE_GRACE`], and only once the old back-end process is dead (its pidfd,
//!   so a stopped one never counts), the VMM fails the requests itself (block:
//!   VIRTIO_BLK_S_IOERR; net: transmitted frames dropped): exactly those marked inflight in
//!   the region plus those never taken, updating the region so that a new back-end does not
//!   resubmit them; without a region only with VIRTIO_F_IN_ORDER.
//! - After every resume each queue's call eventfd is signalled once: completions posted
//!   just before a crash are seen.
//!
//! The back-end sees every queue's call eventfd, also for a queue the driver polls (no
//! MSI-X vector): DPDK's vhost starts a queue only once it got SET_VRING_CALL. Such a queue
//! gets an eventfd nobody reads, as the vhost crate cannot send the invalid-fd flag.

use backends::sandbox::{allow, allow_if, Rule, ThreadKind};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use backends::inflight::{InflightRegion, QueueInflight};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion,
};
use vmm_sys_util::eventfd::EventFd;

use super::{Activation, DeviceShared, VirtioDevice};

/// The vhost-user bit in the feature word; never offered to the guest.
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
const VIRTIO_NET_F_CTRL_VQ: u64 = 1 << 17;
const VIRTIO_NET_F_MQ: u64 = 1 << 22;
/// Transport features the VMM does not implement, never offered to the guest whatever the
/// back-end offers: RING_PACKED (34; the rings are set up, resumed at the used index and
/// failed as split rings, and a packed ring's base would need its wrap counter),
/// NOTIFICATION_DATA (38) and RING_RESET (40; the PCI transport has neither).
const UNSUPPORTED_TRANSPORT_FEATURES: u64 = 1 << 34 | 1 << 38 | 1 << 40;
/// virtio-net features that need the control queue (virtio 1.2, 5.1.3.1: CTRL_GUEST_OFFLOADS,
/// CTRL_RX, CTRL_VLAN, CTRL_RX_EXTRA, GUEST_ANNOUNCE, MQ, CTRL_MAC_ADDR, VQ_NOTF_COAL,
/// NOTF_COAL, HASH_REPORT, RSS) and the control queue itself.
const VIRTIO_NET_CTRL_FEATURES: u64 = VIRTIO_NET_F_CTRL_VQ
    | 1 << 2
    | 1 << 18
    | 1 << 19
    | 1 << 20
    | 1 << 21
    | VIRTIO_NET_F_MQ
    | 1 << 23
    | 1 << 52
    | 1 << 53
    | 1 << 57
    | 1 << 60;
const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
const VIRTIO_F_IN_ORDER: u64 = 1 << 35;
/// virtio-blk config: `num_queues` (u16); virtio-net config: `max_virtqueue_pairs` (u16).
const BLK_CFG_NUM_QUEUES: usize = 34;
const NET_CFG_MAX_PAIRS: usize = 8;

/// How long a back-end may take to answer one message, unless `timeout_ms=` says.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long guest requests wait for a back-end that went away before they fail.
pub const OUTAGE_GRACE: Duration = Duration::from_secs(8);
/// How long dropping the device waits for its control thread to finish what it was doing
/// before it cuts the back-end's socket.
const DROP_GRACE: Duration = Duration::from_millis(700);
/// How often a missing back-end is looked for.
const RECONNECT_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    #[error(
        "cannot connect to vhost-user back-end '{0}': is its daemon running and listening there?"
    )]
    Connect(PathBuf, #[source] io::Error),
    #[error(
        "vhost-user back-end '{path}' hung up during {what} (it died or closed the connection)"
    )]
    Gone {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("vhost-user back-end '{path}' refused {what}")]
    Protocol {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("vhost-user back-end '{path}' did not answer {what} within {ms} ms: is it stopped or stuck? (raise timeout_ms= if it is only slow)")]
    Timeout {
        path: PathBuf,
        what: &'static str,
        ms: u128,
    },
    #[error("vhost-user back-end '{path}' lacks {what}, which this frontend needs")]
    Missing { path: PathBuf, what: &'static str },
    #[error("cannot listen for a vhost-user back-end at '{0}': {1}")]
    Listen(PathBuf, String),
    #[error("no vhost-user back-end connected to '{0}' within {1} ms: start it with that socket path (or raise connect_timeout_ms=)")]
    NoBackend(PathBuf, u64),
    #[error("cannot start the vhost-user control thread: {0}")]
    Thread(#[source] io::Error),
}

/// Which device the back-end implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Block,
    Net,
}

/// One memory region as the back-end must map it.
#[derive(Clone, Copy)]
pub struct SharedRegion {
    pub guest_addr: u64,
    pub size: u64,
    pub host_addr: u64,
    pub file_offset: u64,
}

/// Everything needed to (re)configure a back-end.
struct Setup {
    acked: u64,
    queues: Vec<QueueSetup>,
    mem: super::Memory,
    shared: Arc<DeviceShared>,
    /// The rings were handed to a back-end: requests may have been taken.
    taken: bool,
}

struct QueueSetup {
    index: usize,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    kick: EventFd,
    /// The MSI-X irqfd, or for a polled queue an eventfd nobody reads.
    call: EventFd,
}

/// The back-end process, to tell a dead one from a stopped one.
struct Peer {
    pid: i32,
    pidfd: Option<OwnedFd>,
}

const SO_PEERPIDFD: libc::c_int = 77;

impl Peer {
    /// The process at the other end of the unix socket `fd`.
    fn of(fd: RawFd) -> Peer {
        let mut pidfd: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into the local int.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                SO_PEERPIDFD,
                (&mut pidfd as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        // SAFETY: the kernel returned a new pidfd this process owns.
        let from_socket = (r == 0 && pidfd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(pidfd) });
        // SAFETY: a zeroed ucred is valid; getsockopt writes at most `len` bytes into it.
        let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: as above, into the local ucred.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        let pid = if r == 0 { cred.pid } else { 0 };
        match from_socket {
            Some(pidfd) => Peer {
                pid,
                pidfd: Some(pidfd),
            },
            None => Peer::from_pid(pid),
        }
    }

    fn from_pid(pid: i32) -> Peer {
        let pidfd = (pid > 0)
            .then(|| {
                // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
                let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
                // SAFETY: a new pidfd this process owns.
                (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
            })
            .flatten();
        Peer { pid, pidfd }
    }

    /// The process has exited: it can no longer write into guest memory. A stopped or
    /// merely silent process, or one this VMM cannot see (pid 0), is not dead.
    fn dead(&self) -> bool {
        if let Some(fd) = &self.pidfd {
            let mut p = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: polls one local pollfd without waiting.
            let r = unsafe { libc::poll(&mut p, 1, 0) };
            return r > 0 && p.revents & libc::POLLIN != 0;
        }
        if self.pid <= 0 {
            return false;
        }
        match std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) {
            // Gone. (EACCES is Landlock's answer, not the process's fate: not dead.)
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
            Ok(s) => s.rsplit_once(')').is_some_and(|(_, rest)| {
                matches!(rest.trim_start().chars().next(), Some('Z' | 'X'))
            }),
        }
    }
}

struct Conn {
    frontend: Frontend,
    protocol: VhostUserProtocolFeatures,
    peer: Peer,
    /// The rings of the current setup were sent on this connection.
    rings: bool,
}

/// What a vhost-user device's control thread may call: the back-end's socket (connect, and
/// for server=on listen and accept; the messages with their fds), the peer's pidfd and its
/// readiness, the eventfds handed over (duplicated), the inflight region (mapped and
/// unmapped), waiting for commands and replies (poll, its eventfd), and the reconnect's
/// back-off. Reconnects and device resets run on this thread: no thread is started.
const VHOST_USER_SYSCALLS: &[Rule] = &[
    allow(libc::SYS_socket),
    allow(libc::SYS_connect),
    allow(libc::SYS_bind),
    allow(libc::SYS_listen),
    allow(libc::SYS_accept4),
    allow(libc::SYS_unlink),
    allow(libc::SYS_getsockopt),
    allow(libc::SYS_setsockopt),
    allow(libc::SYS_shutdown),
    allow(libc::SYS_sendmsg),
    allow(libc::SYS_recvmsg),
    allow(libc::SYS_sendto),
    allow(libc::SYS_recvfrom),
    allow(libc::SYS_poll),
    allow(libc::SYS_ppoll),
    allow(libc::SYS_read),
    allow(libc::SYS_write),
    allow(libc::SYS_openat),
    allow(libc::SYS_close),
    allow(libc::SYS_fcntl),
    allow(libc::SYS_fstat),
    allow(libc::SYS_statx),
    allow(libc::SYS_newfstatat),
    allow(libc::SYS_eventfd2),
    allow(libc::SYS_pidfd_open),
    allow(libc::SYS_getrandom),
    allow_if(libc::SYS_ioctl, &[(1, libc::FIONBIO)]),
];

/// A vhost-user device's control thread (`ID-vu`): boot, reconnect, reset.
pub const VHOST_USER: ThreadKind = ThreadKind {
    name: "vhost-user",
    syscalls: &[VHOST_USER_SYSCALLS, crate::sandbox::COMMON_SYSCALLS],
};

/// The reply watchdog (`ID-vuwd`): waits for a deadline and cuts the socket.
const VHOST_USER_WATCHDOG_SYSCALLS: &[Rule] = &[allow(libc::SYS_shutdown), allow(libc::SYS_close)];

/// The reply watchdog's kind.
pub const VHOST_USER_WATCHDOG: ThreadKind = ThreadKind {
    name: "vhost-user-watchdog",
    syscalls: &[
        VHOST_USER_WATCHDOG_SYSCALLS,
        crate::sandbox::COMMON_SYSCALLS,
    ],
};

/// Cuts the back-end's socket when a reply is late, so that the control thread's blocking
/// call returns; and at once when the device goes away.
#[derive(Default)]
struct Watchdog {
    st: Mutex<WatchState>,
    cv: Condvar,
}

#[derive(Default)]
struct WatchState {
    /// A duplicate of the connection's socket: shutting it down ends the connection.
    sock: Option<OwnedFd>,
    deadline: Option<Instant>,
    fired: bool,
    killed: bool,
    quit: bool,
}

fn shutdown(sock: &Option<OwnedFd>) {
    if let Some(s) = sock {
        // SAFETY: shuts down a socket this struct owns; wakes every thread blocked on it.
        unsafe { libc::shutdown(s.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

impl Watchdog {
    fn lock(&self) -> MutexGuard<'_, WatchState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Watches the socket `fd` from now on (None: no connection).
    fn watch(&self, fd: Option<RawFd>) {
        // SAFETY: dup of a live fd the caller owns; the result is a new fd.
        let dup = fd.map(|fd| unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) });
        // SAFETY: a new fd this struct owns.
        let sock = dup
            .filter(|&d| d >= 0)
            .map(|d| unsafe { OwnedFd::from_raw_fd(d) });
        let mut g = self.lock();
        g.sock = sock;
        if g.killed {
            shutdown(&g.sock);
        }
    }

    fn arm(&self, t: Duration) {
        let mut g = self.lock();
        g.deadline = Some(Instant::now() + t);
        g.fired = false;
        self.cv.notify_all();
    }

    /// Ends the deadline; true when it expired (and the socket was cut).
    fn disarm(&self) -> bool {
        let mut g = self.lock();
        g.deadline = None;
        std::mem::take(&mut g.fired)
    }

    /// Cuts the socket now and any later one: the device is going away.
    fn kill(&self) {
        let mut g = self.lock();
        g.killed = true;
        shutdown(&g.sock);
        self.cv.notify_all();
    }

    fn quit(&self) {
        self.lock().quit = true;
        self.cv.notify_all();
    }

    fn run(&self) {
        let mut g = self.lock();
        while !g.quit {
            match g.deadline {
                None => g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        shutdown(&g.sock);
                        g.fired = true;
                        g.deadline = None;
                    } else {
                        g = self
                            .cv
                            .wait_timeout(g, d - now)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                    }
                }
            }
        }
    }
}

/// Where back-ends come from.
enum Endpoint {
    /// The VMM connects to the back-end's socket.
    Client,
    /// The VMM listens.
    Server(UnixListener),
}

/// A non-blocking connect: a back-end that does not accept (its backlog full) is "not
/// there yet" instead of a blocked thread. The stream returned blocks.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    // SAFETY: creates a socket; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd this function owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a zeroed sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the socket path is too long",
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: connects the socket to a local, initialised address of the size given.
    let r = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let stream = UnixStream::from(sock);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Listens at `path` (non-blocking; see [`crate::sock::listen`]).
fn listen(path: &Path) -> Result<(UnixListener, (u64, u64)), VhostUserError> {
    let err = |why: String| VhostUserError::Listen(path.to_path_buf(), why);
    let (l, id) = crate::sock::listen(path).map_err(err)?;
    l.set_nonblocking(true).map_err(|e| err(e.to_string()))?;
    Ok((l, id))
}

/// Waits up to `timeout` (None: no limit) for `fd` to be readable.
fn poll_in(fd: RawFd, timeout: Option<Duration>) -> bool {
    let end = timeout.map(|t| Instant::now() + t);
    loop {
        let ms = end.map_or(-1, |e| {
            e.saturating_duration_since(Instant::now())
                .as_millis()
                .min(i32::MAX as u128) as i32
        });
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one local pollfd.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r > 0 {
            return p.revents & libc::POLLIN != 0;
        }
        // A signal interrupted the wait: go on waiting, up to the same end.
        if r == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return false;
        }
    }
}

enum Command {
    Activate(Box<Setup>),
    Reset,
    /// vm.pause (true) / vm.resume: the back-end's rings disabled, and enabled again.
    Pause(bool),
}

/// What the device and its control thread share.
struct CtlShared {
    cmds: Mutex<VecDeque<Command>>,
    wake: EventFd,
    stop: AtomicBool,
    /// Resets queued and not done.
    resets: AtomicUsize,
}

impl CtlShared {
    fn push(&self, c: Command) {
        self.cmds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(c);
        // An eventfd write fails only on counter overflow: then it is readable anyway.
        let _ = self.wake.write(1);
    }

    fn pop(&self) -> Option<Command> {
        self.cmds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
    }
}

/// What the control thread owns: how to reach and drive the back-end.
struct Ctx {
    name: String,
    path: PathBuf,
    kind: Kind,
    timeout: Duration,
    memfd: RawFd,
    regions: Vec<SharedRegion>,
    /// Queues the device exposes and their maximum size (the inflight region's shape).
    num_queues: usize,
    queue_size: u16,
    endpoint: Endpoint,
    wd: Arc<Watchdog>,
    ctl: Arc<CtlShared>,
}

/// Whether a request failed because the connection went away, not because the back-end
/// answered with a refusal.
fn hung_up(e: &vhost::Error) -> bool {
    use vhost::vhost_user::Error as E;
    matches!(
        e,
        vhost::Error::VhostUserProtocol(
            E::Disconnected | E::PartialMessage | E::SocketBroken(_) | E::SocketError(_)
        )
    )
}

impl Ctx {
    /// Runs one request under the deadline.
    fn rq<T>(
        &self,
        what: &'static str,
        f: impl FnOnce() -> vhost::Result<T>,
    ) -> Result<T, VhostUserError> {
        self.wd.arm(self.timeout);
        let r = f();
        let late = self.wd.disarm();
        r.map_err(|source| {
            if late {
                VhostUserError::Timeout {
                    path: self.path.clone(),
                    what,
                    ms: self.timeout.as_millis(),
                }
            } else if hung_up(&source) {
                VhostUserError::Gone {
                    path: self.path.clone(),
                    what,
                    source,
                }
            } else {
                VhostUserError::Protocol {
                    path: self.path.clone(),
                    what,
                    source,
                }
            }
        })
    }

    /// A new connection, if a back-end is there now (never waits).
    fn try_stream(&self) -> io::Result<UnixStream> {
        match &self.endpoint {
            Endpoint::Client => connect_nonblocking(&self.path),
            Endpoint::Server(l) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                Ok(s)
            }
        }
    }

    /// Negotiates the protocol on a new connection; returns it and the back-end's virtio
    /// features.
    fn handshake(&self, stream: UnixStream) -> Result<(Conn, u64), VhostUserError> {
        let peer = Peer::of(stream.as_raw_fd());
        self.wd.watch(Some(stream.as_raw_fd()));
        let r = self.handshake_on(stream, peer);
        if r.is_err() {
            self.wd.watch(None);
        }
        r
    }

    fn handshake_on(&self, stream: UnixStream, peer: Peer) -> Result<(Conn, u64), VhostUserError> {
        let mut fe = Frontend::from_stream(stream, 64);
        self.rq("SET_OWNER", || fe.set_owner())?;
        let features = self.rq("GET_FEATURES", || fe.get_features())?;
        let mut protocol = VhostUserProtocolFeatures::empty();
        if features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            let offered = self.rq("GET_PROTOCOL_FEATURES", || fe.get_protocol_features())?;
            protocol = offered
                & (VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::CONFIG
                    | VhostUserProtocolFeatures::REPLY_ACK
                    | VhostUserProtocolFeatures::INFLIGHT_SHMFD);
            self.rq("SET_PROTOCOL_FEATURES", || {
                fe.set_protocol_features(protocol)
            })?;
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                fe.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        Ok((
            Conn {
                frontend: fe,
                protocol,
                peer,
                rings: false,
            },
            features,
        ))
    }

    /// Sends the memory table, the inflight region and every queue to the back-end. With
    /// `resume`, the rings continue at the used index in guest memory (a back-end with an
    /// inflight region recomputes from it what to resubmit), each queue is kicked (requests
    /// queued meanwhile) and its call eventfd signalled (completions posted before a
    /// crash).
    fn configure(
        &self,
        conn: &mut Conn,
        setup: &mut Setup,
        inflight: &mut Option<Inflight>,
        resume: bool,
    ) -> Result<(), VhostUserError> {
        let fe = &mut conn.frontend;
        let acked = setup.acked
            | if conn.protocol.is_empty() {
                0
            } else {
                VHOST_USER_F_PROTOCOL_FEATURES
            };
        self.rq("SET_FEATURES", || fe.set_features(acked))?;
        let table: Vec<VhostUserMemoryRegionInfo> = self
            .regions
            .iter()
            .map(|r| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.guest_addr,
                memory_size: r.size,
                userspace_addr: r.host_addr,
                mmap_offset: r.file_offset,
                mmap_handle: self.memfd,
            })
            .collect();
        self.rq("SET_MEM_TABLE", || fe.set_mem_table(&table))?;
        if conn
            .protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
            if inflight.is_none() {
                let ask = VhostUserInflight::new(0, 0, self.num_queues as u16, self.queue_size);
                let (info, file) = self.rq("GET_INFLIGHT_FD", || fe.get_inflight_fd(&ask))?;
                match Inflight::map(file, info) {
                    Ok(r) => *inflight = Some(r),
                    Err(why) => log::warn!(
                        "{}: vhost-user back-end {}: inflight region unusable ({why}); going on without inflight tracking",
                        self.name,
                        self.path.display()
                    ),
                }
            }
            if let Some(r) = inflight.as_ref() {
                let fd = r.region.fd().as_raw_fd();
                self.rq("SET_INFLIGHT_FD", || fe.set_inflight_fd(&r.info, fd))?;
            }
        }
        let mem = setup.mem.memory();
        let host = |ga: u64| -> Result<u64, VhostUserError> {
            mem.get_host_address(GuestAddress(ga))
                .map(|p| p as u64)
                .map_err(|_| VhostUserError::Protocol {
                    path: self.path.clone(),
                    what: "a ring address",
                    source: vhost::Error::InvalidGuestMemory,
                })
        };
        setup.taken = true;
        conn.rings = true;
        for q in &setup.queues {
            self.rq("SET_VRING_NUM", || fe.set_vring_num(q.index, q.size))?;
            let addr = VringConfigData {
                queue_max_size: q.size,
                queue_size: q.size,
                flags: 0,
                desc_table_addr: host(q.desc)?,
                used_ring_addr: host(q.used)?,
                avail_ring_addr: host(q.avail)?,
                log_addr: None,
            };
            self.rq("SET_VRING_ADDR", || fe.set_vring_addr(q.index, &addr))?;
            let base = if resume {
                mem.load::<u16>(GuestAddress(q.used + 2), Ordering::Acquire)
                    .unwrap_or(0)
            } else {
                0
            };
            self.rq("SET_VRING_BASE", || fe.set_vring_base(q.index, base))?;
            self.rq("SET_VRING_CALL", || fe.set_vring_call(q.index, &q.call))?;
            self.rq("SET_VRING_KICK", || fe.set_vring_kick(q.index, &q.kick))?;
            if !conn.protocol.is_empty() {
                self.rq("SET_VRING_ENABLE", || fe.set_vring_enable(q.index, true))?;
            }
        }
        if resume {
            for q in &setup.queues {
                let _ = q.kick.write(1);
                let _ = q.call.write(1);
            }
        }
        Ok(())
    }
}

/// The inflight region the back-end handed out (GET_INFLIGHT_FD), mapped here too (the
/// format is `backends::inflight`'s, which our daemons write).
struct Inflight {
    region: InflightRegion,
    info: VhostUserInflight,
}

impl Inflight {
    /// Maps the region after checking its geometry and that the file holds all of it (a
    /// page past the end of the file would kill the VMM with SIGBUS the first time it is
    /// read, at a reconnect or an outage).
    fn map(file: std::fs::File, info: VhostUserInflight) -> Result<Self, String> {
        let region = InflightRegion::open(
            OwnedFd::from(file),
            info.mmap_size,
            info.mmap_offset,
            info.num_queues,
            info.queue_size,
        )
        .map_err(|e| error_chain(&e))?;
        Ok(Inflight { region, info })
    }

    /// Queue `i`'s part of the region.
    fn queue(&self, i: usize) -> Option<QueueInflight> {
        self.region.queue(u16::try_from(i).ok()?)
    }
}

/// "what: why" for an error and its sources, on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

const VIRTIO_BLK_S_IOERR: u8 = 1;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const VRING_DESC_F_INDIRECT: u16 = 4;

/// The guest address of a block request's status byte: the last byte of the chain's last
/// descriptor, if device-writable.
fn status_byte<M: GuestMemoryBackend>(mem: &M, q: &QueueSetup, head: u16) -> Option<GuestAddress> {
    let (mut table, mut n) = (q.desc, u32::from(q.size));
    let (mut i, mut budget, mut indirect) = (u32::from(head), u32::from(q.size), false);
    loop {
        if i >= n || budget == 0 {
            return None;
        }
        budget -= 1;
        let at = GuestAddress(table.checked_add(u64::from(i) * 16)?);
        let addr: u64 = mem.read_obj(at).ok()?;
        let len: u32 = mem.read_obj(at.checked_add(8)?).ok()?;
        let flags: u16 = mem.read_obj(at.checked_add(12)?).ok()?;
        let next: u16 = mem.read_obj(at.checked_add(14)?).ok()?;
        if flags & VRING_DESC_F_INDIRECT != 0 {
            if indirect {
                return None;
            }
            (table, n, i, budget, indirect) = (addr, len / 16, 0, len / 16, true);
            continue;
        }
        if flags & VRING_DESC_F_NEXT == 0 {
            return (flags & VRING_DESC_F_WRITE != 0 && len > 0)
                .then(|| GuestAddress(addr.wrapping_add(u64::from(len) - 1)));
        }
        i = u32::from(next);
    }
}

/// Completes `heads` on queue `q` with an error (block: IOERR in the status byte; net: a
/// dropped frame), publishes them and signals the queue. Returns the new used index.
fn complete_with_error<M: GuestMemoryBackend>(
    kind: Kind,
    mem: &M,
    q: &QueueSetup,
    used_idx: u16,
    heads: &[u16],
) -> u16 {
    let mut idx = used_idx;
    for &head in heads {
        let mut len = 0u32;
        if kind == Kind::Block {
            if let Some(at) = status_byte(mem, q, head) {
                if mem.write_obj(VIRTIO_BLK_S_IOERR, at).is_ok() {
                    len = 1;
                }
            }
        }
        let elem = q.used + 4 + 8 * u64::from(idx % q.size);
        if mem.write_obj(u32::from(head), GuestAddress(elem)).is_err()
            || mem.write_obj(len, GuestAddress(elem + 4)).is_err()
        {
            break;
        }
        idx = idx.wrapping_add(1);
    }
    if idx != used_idx {
        std::sync::atomic::fence(Ordering::Release);
        let _ = mem.store(idx, GuestAddress(q.used + 2), Ordering::Release);
        let _ = q.call.write(1);
    }
    idx
}

/// The (avail idx, used idx) of a queue in guest memory.
fn ring_indexes<M: GuestMemoryBackend>(mem: &M, q: &QueueSetup) -> Option<(u16, u16)> {
    let avail = mem
        .load::<u16>(GuestAddress(q.avail + 2), Ordering::Acquire)
        .ok()?;
    let used = mem
        .load::<u16>(GuestAddress(q.used + 2), Ordering::Acquire)
        .ok()?;
    Some((avail, used))
}

/// The heads at avail positions `from..to`.
fn avail_heads<M: GuestMemoryBackend>(mem: &M, q: &QueueSetup, from: u16, to: u16) -> Vec<u16> {
    let n = to.wrapping_sub(from).min(q.size);
    (0..n)
        .filter_map(|k| {
            let pos = from.wrapping_add(k) % q.size;
            mem.read_obj::<u16>(GuestAddress(q.avail + 4 + 2 * u64::from(pos)))
                .ok()
        })
        .filter(|&h| h < q.size)
        .collect()
}

/// Whether queue `q` carries requests a dead back-end may have left (net RX buffers wait
/// for the next back-end whatever happened).
fn carries_requests(kind: Kind, q: &QueueSetup) -> bool {
    kind == Kind::Block || q.index % 2 == 1
}

/// The old back-end is dead and kept an inflight region: fails exactly the requests it
/// took and did not complete (in the order it took them) and those it never took, and
/// records that in the region, so that a new back-end resubmits none of them. Returns how
/// many failed.
fn fail_inflight<M: GuestMemoryBackend>(
    kind: Kind,
    mem: &M,
    q: &QueueSetup,
    region: &mut QueueInflight,
) -> u32 {
    let Some((avail, used)) = ring_indexes(mem, q) else {
        return 0;
    };
    // Never more completions than requests outstanding: a region marking more heads in
    // flight than that (a broken back-end, or a driver that moved its index back) must not
    // make the used index run past the available one, nor the untaken ones be looked for
    // before the used index.
    let outstanding = avail.wrapping_sub(used).min(q.size);
    let mut heads = region.recover(used).resubmit;
    heads.retain(|&h| h < q.size);
    heads.truncate(usize::from(outstanding));
    let untaken = outstanding - heads.len() as u16;
    heads.extend(avail_heads(mem, q, avail.wrapping_sub(untaken), avail));
    let new_used = complete_with_error(kind, mem, q, used, &heads);
    let done = new_used.wrapping_sub(used);
    for &h in heads.iter().take(usize::from(done)) {
        region.completed(h, new_used);
    }
    u32::from(done)
}

/// The back-end completes in order (VIRTIO_F_IN_ORDER), or had nothing pending when it
/// died: everything from the used index on is not completed. Returns how many failed.
fn fail_in_order<M: GuestMemoryBackend>(kind: Kind, mem: &M, q: &QueueSetup) -> u32 {
    let Some((avail, used)) = ring_indexes(mem, q) else {
        return 0;
    };
    let heads = avail_heads(mem, q, used, avail);
    u32::from(complete_with_error(kind, mem, q, used, &heads).wrapping_sub(used))
}

/// Requests the driver made available and the device has not completed.
fn pending(kind: Kind, setup: &Setup) -> u32 {
    let mem = setup.mem.memory();
    setup
        .queues
        .iter()
        .filter(|q| carries_requests(kind, q))
        .filter_map(|q| ring_indexes(&*mem, q))
        .map(|(a, u)| u32::from(a.wrapping_sub(u)))
        .sum()
}

/// The control thread's state.
struct State {
    conn: Option<Conn>,
    setup: Option<Box<Setup>>,
    inflight: Option<Inflight>,
    /// The last back-end's process, while it is away.
    gone: Option<Peer>,
    down_since: Option<Instant>,
    failed: u64,
    /// Logged that the old back-end is alive, so requests wait.
    said_alive: bool,
    /// NEEDS_RESET was set: the rings stay stopped until the driver resets the device.
    halted: bool,
    /// Reconnect attempts failed in a row (logged once).
    quiet: bool,
    /// Once `gone` is known dead: whether its rings had no request pending then (see
    /// [`State::note_death`]).
    idle_at_death: Option<bool>,
    /// vm.pause is on: the back-end's rings are disabled (SET_VRING_ENABLE 0), so it takes
    /// no request (what it holds completes); a back-end that connects meanwhile gets them
    /// disabled too.
    paused: bool,
}

impl State {
    /// Tells the back-end whether its rings are enabled, as `paused` says (it needs the
    /// protocol features, which carry SET_VRING_ENABLE). On resume every queue is kicked:
    /// the back-end looks at what the guest added before the pause.
    fn apply_pause(&mut self, ctx: &Ctx) {
        let (Some(conn), Some(setup)) = (self.conn.as_mut(), self.setup.as_ref()) else {
            return;
        };
        if !conn.rings || conn.protocol.is_empty() || self.halted {
            return;
        }
        let fe = &mut conn.frontend;
        let enable = !self.paused;
        let mut failed = None;
        for q in &setup.queues {
            if let Err(e) = ctx.rq("SET_VRING_ENABLE", || fe.set_vring_enable(q.index, enable)) {
                failed = Some(e);
                break;
            }
        }
        if enable {
            for q in &setup.queues {
                let _ = q.kick.write(1);
            }
        }
        if let Some(e) = failed {
            self.lost(ctx, &e);
        }
    }

    fn lost(&mut self, ctx: &Ctx, why: &dyn std::fmt::Display) {
        if let Some(c) = self.conn.take() {
            log::warn!(
                "{}: vhost-user back-end {} is gone ({why}); reconnecting when it is back",
                ctx.name,
                ctx.path.display()
            );
            self.gone = Some(c.peer);
            self.idle_at_death = None;
        }
        ctx.wd.watch(None);
        self.down_since.get_or_insert_with(Instant::now);
        self.said_alive = false;
        self.failed = 0;
    }

    /// Stops the rings: the driver must reset the device.
    fn halt(&mut self, ctx: &Ctx, setup: &Setup, n: u32, how: &str) {
        if !self.halted {
            log::error!(
                "{}: vhost-user back-end {} {how} with {n} requests in flight; without inflight tracking their state is unknown, so the device needs a reset (give the back-end VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD)",
                ctx.name,
                ctx.path.display()
            );
            setup.shared.set_needs_reset();
            self.halted = true;
        }
    }

    fn activate(&mut self, ctx: &Ctx, mut setup: Box<Setup>) {
        self.halted = false;
        if let Some(conn) = self.conn.as_mut() {
            if let Err(e) = ctx.configure(conn, &mut setup, &mut self.inflight, false) {
                self.setup = Some(setup);
                self.lost(ctx, &e);
                return;
            }
        }
        self.setup = Some(setup);
        if self.paused {
            self.apply_pause(ctx);
        }
    }

    fn reset(&mut self, ctx: &Ctx) {
        let setup = self.setup.take();
        if let (Some(conn), Some(setup)) = (self.conn.as_mut(), setup) {
            if conn.rings {
                conn.rings = false;
                // GET_VRING_BASE stops each ring in the back-end.
                for q in &setup.queues {
                    let fe = &mut conn.frontend;
                    if let Err(e) = ctx.rq("GET_VRING_BASE", || fe.get_vring_base(q.index)) {
                        self.lost(ctx, &e);
                        break;
                    }
                }
            }
        }
        // The next activation starts from fresh rings: a region describing the old ones
        // would make a back-end resubmit stale heads (QEMU frees it at reset too).
        self.inflight = None;
        self.halted = false;
        self.failed = 0;
    }

    /// The first time the old back-end is seen dead: whether nothing was pending on its
    /// rings then. If so, every request pending later was made available after it died, so
    /// no back-end ever took one: without inflight tracking too, the rings can resume at
    /// the used index and the outage may fail what is pending (as with IN_ORDER). A request
    /// made available before this look counts as pending: that stays unknown.
    fn note_death(&mut self, ctx: &Ctx) {
        if self.idle_at_death.is_some() {
            return;
        }
        if let (Some(gone), Some(setup)) = (&self.gone, &self.setup) {
            if gone.dead() {
                self.idle_at_death = Some(pending(ctx.kind, setup) == 0);
            }
        }
    }

    /// While the back-end is away: after the grace period, fail what is known not to be
    /// completed, once the old back-end cannot write into the rings any more.
    fn outage(&mut self, ctx: &Ctx) {
        let Some(setup) = self.setup.as_ref() else {
            return;
        };
        if self.halted || !setup.taken || self.down_since.is_none_or(|t| t.elapsed() < OUTAGE_GRACE)
        {
            return;
        }
        if !self.gone.as_ref().is_some_and(|p| p.dead()) {
            if !self.said_alive {
                log::warn!(
                    "{}: vhost-user back-end {} still away after {} s but its process ({}) is not known to be dead: guest requests wait for it",
                    ctx.name,
                    ctx.path.display(),
                    OUTAGE_GRACE.as_secs(),
                    self.gone.as_ref().map_or(0, |p| p.pid)
                );
                self.said_alive = true;
            }
            return;
        }
        let mem = setup.mem.memory();
        let mut n = 0;
        if let Some(region) = &self.inflight {
            for q in setup
                .queues
                .iter()
                .filter(|q| carries_requests(ctx.kind, q))
            {
                if let Some(mut r) = region.queue(q.index) {
                    n += fail_inflight(ctx.kind, &*mem, q, &mut r);
                }
            }
        } else if setup.acked & VIRTIO_F_IN_ORDER != 0 || self.idle_at_death == Some(true) {
            for q in setup
                .queues
                .iter()
                .filter(|q| carries_requests(ctx.kind, q))
            {
                n += fail_in_order(ctx.kind, &*mem, q);
            }
        } else {
            let p = pending(ctx.kind, setup);
            if p > 0 {
                let setup = self.setup.take();
                if let Some(s) = &setup {
                    self.halt(ctx, s, p, "died");
                }
                self.setup = setup;
            }
            return;
        }
        if n > 0 && self.failed == 0 {
            log::warn!(
                "{}: vhost-user back-end {} died and is still away after {} s: failing guest requests until it is back",
                ctx.name,
                ctx.path.display(),
                OUTAGE_GRACE.as_secs()
            );
        }
        self.failed += u64::from(n);
    }

    fn reconnect(&mut self, ctx: &Ctx) {
        let stream = match ctx.try_stream() {
            Ok(s) => s,
            Err(_) => return,
        };
        let (mut conn, _) = match ctx.handshake(stream) {
            Ok(c) => c,
            Err(e) => {
                if !self.quiet {
                    log::warn!("{}: reconnect failed: {e}", ctx.name);
                    self.quiet = true;
                }
                return;
            }
        };
        let Some(mut setup) = self.setup.take() else {
            log::info!("{}: reconnected to {}", ctx.name, ctx.path.display());
            self.quiet = false;
            self.conn = Some(conn);
            self.gone = None;
            self.idle_at_death = None;
            self.down_since = None;
            return;
        };
        let unknown = self.inflight.is_none()
            && setup.acked & VIRTIO_F_IN_ORDER == 0
            && self.idle_at_death != Some(true);
        let p = pending(ctx.kind, &setup);
        if !self.halted && setup.taken && unknown && p > 0 {
            self.halt(ctx, &setup, p, "went away");
        }
        if self.halted {
            log::info!(
                "{}: reconnected to {}; the rings stay stopped until the driver resets the device",
                ctx.name,
                ctx.path.display()
            );
        } else {
            let resubmit = self.inflight_count(&setup);
            if let Err(e) = ctx.configure(&mut conn, &mut setup, &mut self.inflight, true) {
                if !self.quiet {
                    log::warn!(
                        "{}: reconnect to {} failed: {e}",
                        ctx.name,
                        ctx.path.display()
                    );
                    self.quiet = true;
                }
                ctx.wd.watch(None);
                if conn.rings {
                    // This back-end had the rings: its death, not the old one's, decides.
                    self.gone = Some(conn.peer);
                    self.idle_at_death = None;
                }
                self.setup = Some(setup);
                return;
            }
            log::info!(
                "{}: reconnected to {}, queues resumed ({resubmit} inflight requests handed back, {} failed meanwhile)",
                ctx.name,
                ctx.path.display(),
                self.failed
            );
        }
        self.setup = Some(setup);
        self.conn = Some(conn);
        self.gone = None;
        self.idle_at_death = None;
        self.down_since = None;
        if self.paused {
            self.apply_pause(ctx);
        }
        self.quiet = false;
    }

    /// How many requests the inflight region marks taken and not completed.
    fn inflight_count(&self, setup: &Setup) -> usize {
        let Some(region) = &self.inflight else {
            return 0;
        };
        let mem = setup.mem.memory();
        setup
            .queues
            .iter()
            .filter_map(|q| {
                let (_, used) = ring_indexes(&*mem, q)?;
                Some(region.queue(q.index)?.resubmits_at(used))
            })
            .sum()
    }
}

/// Sleeps until the back-end's socket `fd` hangs up (true), `wake` is written, `listen`
/// is readable, or `timeout_ms` passes (-1: no timeout). No timer runs while the back-end
/// is connected: an idle VMM does not wake up.
fn wait_events(fd: RawFd, listen: RawFd, wake: &EventFd, timeout_ms: i32) -> bool {
    let mut pfds = [
        libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd,
            events: libc::POLLRDHUP,
            revents: 0,
        },
        libc::pollfd {
            fd: listen,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: polls three pollfds of a live local array (poll ignores a negative fd).
    let r = unsafe { libc::poll(pfds.as_mut_ptr(), 3, timeout_ms) };
    if r <= 0 {
        return false;
    }
    if pfds[0].revents & libc::POLLIN != 0 {
        // Drain it; the caller looks at why it was woken.
        let _ = wake.read();
    }
    pfds[1].revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

fn control(ctx: &Ctx, mut st: State) {
    loop {
        while let Some(cmd) = ctx.ctl.pop() {
            match cmd {
                Command::Activate(setup) => st.activate(ctx, setup),
                Command::Reset => {
                    st.reset(ctx);
                    ctx.ctl.resets.fetch_sub(1, Ordering::AcqRel);
                }
                Command::Pause(on) => {
                    st.paused = on;
                    st.apply_pause(ctx);
                }
            }
        }
        if ctx.ctl.stop.load(Ordering::Acquire) {
            break;
        }
        match st.conn.as_ref().map(|c| c.frontend.as_raw_fd()) {
            Some(fd) => {
                if wait_events(fd, -1, &ctx.ctl.wake, -1) {
                    st.lost(ctx, &"its socket hung up");
                }
            }
            None => {
                let listen = match &ctx.endpoint {
                    Endpoint::Server(l) => l.as_raw_fd(),
                    Endpoint::Client => -1,
                };
                wait_events(
                    -1,
                    listen,
                    &ctx.ctl.wake,
                    RECONNECT_EVERY.as_millis() as i32,
                );
                if ctx.ctl.stop.load(Ordering::Acquire) || ctx.ctl.cmds_pending() {
                    continue;
                }
                st.note_death(ctx);
                st.outage(ctx);
                st.reconnect(ctx);
            }
        }
    }
}

impl CtlShared {
    fn cmds_pending(&self) -> bool {
        !self
            .cmds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }
}

/// A virtio-net config's `max_virtqueue_pairs`, when it says one.
fn cfg_pairs(config: &[u8]) -> Option<u16> {
    config
        .get(NET_CFG_MAX_PAIRS..NET_CFG_MAX_PAIRS + 2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .filter(|&n| n > 0)
}

/// The queues the VMM drives and what the guest is told: the back-end's MQ feature and
/// queue count (virtio-blk `num_queues`, virtio-net `max_virtqueue_pairs`) clamped to
/// them. `asked`: queues (blk) or pairs (net) configured; `backend_max`: GET_QUEUE_NUM,
/// when the back-end has the MQ protocol feature. Returns (queues, features, warning).
fn present(
    kind: Kind,
    asked: u16,
    features: u64,
    backend_max: Option<u64>,
    config: &mut [u8],
) -> (usize, u64, Option<String>) {
    let cfg_u16 = |c: &[u8], at: usize| c.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let (mq_bit, at) = match kind {
        Kind::Block => (VIRTIO_BLK_F_MQ, BLK_CFG_NUM_QUEUES),
        Kind::Net => (VIRTIO_NET_F_MQ, NET_CFG_MAX_PAIRS),
    };
    let mut ctrl = usize::from(kind == Kind::Net && features & VIRTIO_NET_F_CTRL_VQ != 0);
    let per = if kind == Kind::Net { 2 } else { 1 };
    let mut cap = match backend_max {
        Some(m) => (usize::try_from(m)
            .unwrap_or(usize::MAX)
            .saturating_sub(ctrl)
            / per)
            .max(1),
        None => 1,
    };
    if features & mq_bit == 0 {
        cap = 1;
    } else if let Some(n) = cfg_u16(config, at).filter(|&n| n > 0) {
        cap = cap.min(usize::from(n));
    }
    let n = usize::from(asked).min(cap).max(1);
    let mut features = features & !UNSUPPORTED_TRANSPORT_FEATURES;
    if features & mq_bit != 0 {
        if let Some(b) = config.get_mut(at..at + 2) {
            b.copy_from_slice(&(n as u16).to_le_bytes());
        }
    }
    if n == 1 {
        features &= !mq_bit;
        // One pair needs no control queue, and not every back-end serves one: QEMU keeps
        // it in the VMM, so DPDK's vhost never polls it, and a Linux guest then spins in
        // the kernel on its first command (`ip link set up`). Not offered, with what
        // depends on it.
        if ctrl == 1 {
            features &= !VIRTIO_NET_CTRL_FEATURES;
            ctrl = 0;
        }
    }
    let what = if kind == Kind::Net {
        "queue pairs"
    } else {
        "queues"
    };
    let warning = (n < usize::from(asked))
        .then(|| format!("the back-end offers {cap} {what}, {asked} asked: using {n}"));
    (n * per + ctrl, features, warning)
}

/// Where a virtio-net driver's queues go on the back-end when the device has a control
/// queue. The driver's control queue is queue 2 × the pairs it uses (the guest's
/// `max_virtqueue_pairs` with MQ negotiated, 1 without); the back-end's is 2 × the pairs
/// it serves (its own `max_virtqueue_pairs`), which may be more than the guest was shown
/// (`queues=` below the back-end's count) and is more than 1 whenever there is a control
/// queue: passing the index through would hand the control queue to a back-end's RX queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetQueueMap {
    /// Pairs the guest was offered.
    pub pairs: u16,
    /// The back-end's control queue index (2 × its pairs: up to 0x10000, as the spec allows
    /// 0x8000 pairs).
    pub backend_ctrl: u32,
}

impl NetQueueMap {
    /// The back-end's index of the driver's queue `index` (`mq`: VIRTIO_NET_F_MQ acked), or
    /// None for a queue that does not exist for that driver (beyond the pairs it uses).
    pub fn backend_index(&self, index: u16, mq: bool) -> Option<u32> {
        let data = if mq { 2 * u32::from(self.pairs) } else { 2 };
        match u32::from(index) {
            i if i < data => Some(i),
            i if i == data => Some(self.backend_ctrl),
            _ => None,
        }
    }
}

pub struct VhostUserDevice {
    name: String,
    kind: Kind,
    /// virtio-net with a control queue: how the driver's queues map to the back-end's.
    net_map: Option<NetQueueMap>,
    /// Queues a driver started that have no back-end queue (rate-limited: a guest can
    /// reset and start the device in a loop).
    faults: backends::ratelimit::GuestErrorLog<1>,
    features: u64,
    queue_sizes: Vec<u16>,
    config: Vec<u8>,
    ctl: Arc<CtlShared>,
    wd: Arc<Watchdog>,
    thread: Option<(thread::JoinHandle<()>, mpsc::Receiver<()>)>,
    watchdog: Option<thread::JoinHandle<()>>,
    /// Server mode: the socket this VMM created, removed at exit if still the same.
    created: Option<(PathBuf, (u64, u64))>,
    /// The back-end's stats endpoint (`stats=PATH`), relayed into `vm.counters`.
    stats: Option<PathBuf>,
}

/// How long `vm.counters` waits for a back-end's stats endpoint.
pub const STATS_DEADLINE: Duration = Duration::from_millis(500);

/// The most bytes read from a back-end's stats endpoint.
const STATS_MAX: usize = 1 << 20;

/// `GET /stats` from a back-end's stats endpoint (`--stats-socket` of our daemons), within
/// `deadline` in all (a stuck or slow-dripping back-end costs no more) and [`STATS_MAX`]
/// bytes.
pub fn fetch_stats(path: &Path, deadline: Duration) -> Result<serde_json::Value, String> {
    use std::io::{Read, Write};
    let start = std::time::Instant::now();
    let fail = |why: String| format!("{}: {why}", path.display());
    let left = || {
        deadline
            .checked_sub(start.elapsed())
            .filter(|d| !d.is_zero())
    };
    let mut s = UnixStream::connect(path).map_err(|e| fail(e.to_string()))?;
    let request = b"GET /stats HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    s.set_write_timeout(left())
        .and_then(|_| s.write_all(request))
        .map_err(|e| fail(e.to_string()))?;
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        let Some(t) = left() else {
            return Err(fail(format!(
                "no complete answer within {} ms",
                deadline.as_millis()
            )));
        };
        s.set_read_timeout(Some(t))
            .map_err(|e| fail(e.to_string()))?;
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) if out.len() + n > STATS_MAX => {
                return Err(fail(format!("answer over {STATS_MAX} bytes")))
            }
            Ok(n) => out.extend_from_slice(&buf[..n]),
            // A timed-out read: the loop says the deadline passed.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted
                        | io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(fail(e.to_string())),
        }
    }
    let text = String::from_utf8_lossy(&out);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Err(fail("not an HTTP answer".into()));
    };
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(fail(head.lines().next().unwrap_or_default().to_string()));
    }
    serde_json::from_str(body).map_err(|e| fail(format!("not JSON: {e}")))
}

impl VhostUserDevice {
    /// Connects to the back-end at `path` (or waits for it to connect, with `server=on`)
    /// and reads what the guest will see.
    pub fn new(
        cfg: &crate::config::VhostUserConfig,
        memfd: RawFd,
        regions: Vec<SharedRegion>,
    ) -> Result<Self, VhostUserError> {
        Self::open(cfg, memfd, regions, None)
    }

    /// As [`Self::new`], on a stream already connected to the back-end (a reconnect goes to
    /// `cfg.socket` as usual): for the fuzz targets, whose fake back-ends sit on a
    /// socketpair.
    #[cfg(feature = "fuzzing")]
    pub fn with_stream(
        cfg: &crate::config::VhostUserConfig,
        stream: UnixStream,
        memfd: RawFd,
        regions: Vec<SharedRegion>,
    ) -> Result<Self, VhostUserError> {
        Self::open(cfg, memfd, regions, Some(stream))
    }

    fn open(
        cfg: &crate::config::VhostUserConfig,
        memfd: RawFd,
        regions: Vec<SharedRegion>,
        connected: Option<UnixStream>,
    ) -> Result<Self, VhostUserError> {
        let name = cfg.id.clone();
        let path = cfg.socket.clone();
        let kind = if cfg.net { Kind::Net } else { Kind::Block };
        let (endpoint, created) = if cfg.server {
            let (l, ino) = listen(&path)?;
            (Endpoint::Server(l), Some((path.clone(), ino)))
        } else {
            (Endpoint::Client, None)
        };
        let wd = Arc::new(Watchdog::default());
        let wdt = {
            let wd = wd.clone();
            crate::sandbox::spawn(
                thread::Builder::new().name(format!("{name}-vuwd")),
                VHOST_USER_WATCHDOG,
                move || wd.run(),
            )
            .map_err(VhostUserError::Thread)?
        };
        let ctl = Arc::new(CtlShared {
            cmds: Mutex::new(VecDeque::new()),
            wake: EventFd::new(libc::EFD_NONBLOCK).map_err(VhostUserError::Thread)?,
            stop: AtomicBool::new(false),
            resets: AtomicUsize::new(0),
        });
        let mut ctx = Ctx {
            name: name.clone(),
            path: path.clone(),
            kind,
            timeout: cfg.timeout,
            memfd,
            regions,
            num_queues: 0,
            queue_size: cfg.queue_size,
            endpoint,
            wd: wd.clone(),
            ctl: ctl.clone(),
        };
        let mut dev = VhostUserDevice {
            name: name.clone(),
            kind,
            net_map: None,
            faults: backends::ratelimit::GuestErrorLog::new(name.clone()),
            features: 0,
            queue_sizes: Vec::new(),
            config: Vec::new(),
            ctl,
            wd,
            thread: None,
            watchdog: Some(wdt),
            created,
            stats: cfg.stats.clone(),
        };
        let stream = match (connected, &ctx.endpoint) {
            (Some(s), _) => s,
            (None, Endpoint::Client) => {
                connect_nonblocking(&path).map_err(|e| VhostUserError::Connect(path.clone(), e))?
            }
            (None, Endpoint::Server(l)) => {
                log::info!(
                    "{name}: waiting for a vhost-user back-end to connect to {}",
                    path.display()
                );
                if !poll_in(l.as_raw_fd(), cfg.connect_timeout) {
                    let ms = cfg.connect_timeout.map_or(0, |t| t.as_millis() as u64);
                    return Err(VhostUserError::NoBackend(path.clone(), ms));
                }
                ctx.try_stream()
                    .map_err(|e| VhostUserError::Connect(path.clone(), e))?
            }
        };
        let (mut conn, features) = ctx.handshake(stream)?;
        let backend_max = if conn.protocol.contains(VhostUserProtocolFeatures::MQ) {
            let fe = &mut conn.frontend;
            Some(ctx.rq("GET_QUEUE_NUM", || fe.get_queue_num())?)
        } else {
            None
        };
        let config_len = match kind {
            Kind::Block => 60,
            Kind::Net => 12,
        };
        let mut config = vec![0u8; config_len];
        if conn.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            let fe = &mut conn.frontend;
            let (_, payload) = ctx.rq("GET_CONFIG", || {
                fe.get_config(
                    0,
                    config_len as u32,
                    VhostUserConfigFlags::WRITABLE,
                    &config,
                )
            })?;
            let n = payload.len().min(config_len);
            config[..n].copy_from_slice(&payload[..n]);
        } else if kind == Kind::Block {
            return Err(VhostUserError::Missing {
                path,
                what: "the CONFIG protocol feature (the disk's capacity comes from it)",
            });
        }
        // The back-end's own pair count (its control queue follows them), before `present`
        // writes the guest's into the config.
        // (The spec allows 1 to 0x8000 pairs; a back-end saying more is clamped.)
        let backend_pairs = cfg_pairs(&config)
            .filter(|_| features & VIRTIO_NET_F_MQ != 0)
            .or(backend_max.map(|m| (m.saturating_sub(1) / 2).clamp(1, 0x8000) as u16))
            .unwrap_or(1)
            .clamp(1, 0x8000);
        let (nq, mut features, warning) =
            present(kind, cfg.queues, features, backend_max, &mut config);
        if kind == Kind::Net && nq % 2 == 1 {
            dev.net_map = Some(NetQueueMap {
                pairs: (nq / 2) as u16,
                backend_ctrl: 2 * u32::from(backend_pairs.max((nq / 2) as u16)),
            });
        }
        if let Some(w) = warning {
            log::warn!("{name}: vhost-user back-end {}: {w}", path.display());
        }
        features &= !VHOST_USER_F_PROTOCOL_FEATURES;
        if let (Kind::Net, Some(mac)) = (kind, cfg.mac) {
            config[..6].copy_from_slice(&mac);
            features |= 1 << 5; // VIRTIO_NET_F_MAC
        }
        log::info!(
            "{name}: vhost-user back-end {} ({:?}), {nq} queues, features {features:#x}, protocol {:?}",
            path.display(),
            kind,
            conn.protocol
        );
        ctx.num_queues = nq;
        dev.features = features;
        dev.queue_sizes = vec![cfg.queue_size; nq];
        dev.config = config;
        let st = State {
            conn: Some(conn),
            setup: None,
            inflight: None,
            gone: None,
            down_since: None,
            failed: 0,
            said_alive: false,
            halted: false,
            quiet: false,
            idle_at_death: None,
            paused: false,
        };
        let (done_tx, done_rx) = mpsc::channel();
        let t = crate::sandbox::spawn(
            thread::Builder::new().name(format!("{name}-vu")),
            VHOST_USER,
            move || {
                control(&ctx, st);
                let _ = done_tx.send(());
            },
        )
        .map_err(VhostUserError::Thread)?;
        dev.thread = Some((t, done_rx));
        Ok(dev)
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u16 {
        match self.kind {
            Kind::Net => 1,
            Kind::Block => 2,
        }
    }

    fn pci_class(&self) -> u32 {
        match self.kind {
            Kind::Net => 0x02_00_00,
            Kind::Block => 0x01_80_00,
        }
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        self.queue_sizes.clone()
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        backends::read_config(&self.config, offset, data);
    }

    /// Hands the queues to the control thread, which configures the back-end: returns at
    /// once.
    fn activate(&mut self, a: Activation) -> io::Result<()> {
        let mut queues = Vec::new();
        let mq = a.acked_features & VIRTIO_NET_F_MQ != 0;
        for q in a.queues {
            let index = match self.net_map {
                None => Some(u32::from(q.index)),
                Some(m) => m.backend_index(q.index, mq),
            };
            let Some(index) = index else {
                self.faults.record(
                    0,
                    format_args!(
                        "the driver started queue {} without VIRTIO_NET_F_MQ, which gives it \
                         one pair and the control queue: not handed to the back-end",
                        q.index
                    ),
                );
                continue;
            };
            if index > 255 {
                // SET_VRING_KICK and SET_VRING_CALL carry the index in 8 bits.
                self.faults.record(
                    0,
                    format_args!(
                        "the back-end's control queue is its queue {index}, past the 255 the \
                         vhost-user protocol can name: not handed to it"
                    ),
                );
                continue;
            }
            let call = match q.irq.fd() {
                Some(f) => f.try_clone()?,
                None => EventFd::new(libc::EFD_NONBLOCK)?,
            };
            queues.push(QueueSetup {
                index: index as usize,
                size: q.queue.size(),
                desc: q.queue.desc_table(),
                avail: q.queue.avail_ring(),
                used: q.queue.used_ring(),
                kick: q.kick,
                call,
            });
        }
        self.ctl.push(Command::Activate(Box::new(Setup {
            acked: a.acked_features & self.features,
            queues,
            mem: a.mem,
            shared: a.shared,
            taken: false,
        })));
        Ok(())
    }

    /// Hands the reset to the control thread: returns at once; [`Self::reset_pending`]
    /// tells when the back-end acknowledged it or missed its deadline.
    fn reset(&mut self) {
        self.ctl.resets.fetch_add(1, Ordering::AcqRel);
        self.ctl.push(Command::Reset);
    }

    fn pause(&mut self, paused: bool) {
        // Handed to the control thread, which talks to the back-end under its deadline.
        self.ctl.push(Command::Pause(paused));
    }

    /// The queues are the back-end's: with `stats=PATH`, its stats endpoint's answer, as
    /// `backend` (or why not, as `backend_error`), within [`STATS_DEADLINE`].
    fn counters(&self) -> Option<super::CountersReader> {
        let path = self.stats.clone()?;
        Some(Arc::new(move || match fetch_stats(&path, STATS_DEADLINE) {
            Ok(v) => serde_json::json!({ "backend": v }),
            Err(e) => serde_json::json!({ "backend_error": e }),
        }))
    }

    fn reset_pending(&self) -> bool {
        self.ctl.resets.load(Ordering::Acquire) > 0
    }
}

impl Drop for VhostUserDevice {
    /// Bounded: the control thread gets [`DROP_GRACE`] to finish (a reset the transport
    /// queued stops the back-end's rings), then the back-end's socket is cut; a thread
    /// still not done is left behind.
    fn drop(&mut self) {
        self.ctl.stop.store(true, Ordering::Release);
        let _ = self.ctl.wake.write(1);
        if let Some((t, done)) = self.thread.take() {
            let mut finished = done.recv_timeout(DROP_GRACE).is_ok();
            if !finished {
                self.wd.kill();
                finished = done.recv_timeout(Duration::from_millis(300)).is_ok();
            }
            if finished {
                let _ = t.join();
            } else {
                log::warn!(
                    "{}: the vhost-user control thread did not stop; leaving it behind",
                    self.name
                );
            }
        }
        self.wd.kill();
        self.wd.quit();
        if let Some(t) = self.watchdog.take() {
            let _ = t.join();
        }
        if let Some((path, id)) = self.created.take() {
            crate::sock::remove_if_ours(&path, id);
        }
    }
}

/// The regions of guest RAM as a back-end maps them (host addresses of this process).
pub fn shared_regions(ram: &crate::memory::Ram) -> Vec<SharedRegion> {
    ram.memory
        .iter()
        .zip(&ram.ranges)
        .filter_map(|(r, (ga, size, off))| {
            let host = r.get_host_address(vm_memory::MemoryRegionAddress(0)).ok()?;
            Some(SharedRegion {
                guest_addr: ga.0,
                size: *size,
                host_addr: host as u64,
                file_offset: *off,
            })
        })
        .collect()
}

/// Entry points for the `cargo fuzz` targets (feature `fuzzing`).
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    use std::os::unix::fs::FileExt;

    use backends::inflight::InflightRegion;
    use vm_memory::GuestMemoryMmap;
    use vmm_sys_util::eventfd::EventFd;

    use super::{fail_in_order, fail_inflight, Kind, QueueSetup};

    /// One queue's rings in guest memory.
    #[derive(Clone, Copy, Debug)]
    pub struct Ring {
        pub index: usize,
        pub size: u16,
        pub desc: u64,
        pub avail: u64,
        pub used: u64,
    }

    /// What the outage path does to one queue of a dead back-end: with `region` (the
    /// queue's part of the inflight region) it fails what the region marks taken and what
    /// was never taken, else (VIRTIO_F_IN_ORDER) everything from the used index on.
    /// Returns how many requests failed and whether the queue's call eventfd was signalled.
    pub fn fail_pending(
        block: bool,
        mem: &GuestMemoryMmap<()>,
        ring: Ring,
        region: Option<&mut [u8]>,
    ) -> (u32, bool) {
        let kind = if block { Kind::Block } else { Kind::Net };
        let (Ok(kick), Ok(call)) = (
            EventFd::new(libc::EFD_NONBLOCK),
            EventFd::new(libc::EFD_NONBLOCK),
        ) else {
            return (0, false);
        };
        let q = QueueSetup {
            index: ring.index,
            size: ring.size,
            desc: ring.desc,
            avail: ring.avail,
            used: ring.used,
            kick,
            call,
        };
        let n = match region {
            // The region as the back-end left it (the bytes of one queue of `ring.size`
            // entries, `backends::inflight::queue_region_size`), and as the outage leaves
            // it, written back.
            Some(bytes) => {
                let Ok(r) = InflightRegion::create(1, ring.size) else {
                    return (0, false);
                };
                let Ok(file) = r.fd().try_clone_to_owned().map(std::fs::File::from) else {
                    return (0, false);
                };
                let (Ok(()), Some(mut q0)) = (file.write_all_at(bytes, 0), r.queue(0)) else {
                    return (0, false);
                };
                let n = fail_inflight(kind, mem, &q, &mut q0);
                if file.read_exact_at(bytes, 0).is_err() {
                    return (0, false);
                }
                n
            }
            None => fail_in_order(kind, mem, &q),
        };
        (n, q.call.read().is_ok())
    }
}

#[cfg(test)]
#[path = "vhost_user_tests.rs"]
mod tests;
