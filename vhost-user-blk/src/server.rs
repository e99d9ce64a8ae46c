//! The part of a vhost-user back-end program that does not depend on the device: the
//! listening socket (`--socket-path` or `--fd`), SIGTERM/SIGINT, and the accept loop that
//! serves one frontend after another, each with a fresh device.
//!
//! This file is shared by `vhost-user-blk` and `vhost-user-net` (the latter includes it with
//! `#[path]`), so that both daemons behave the same way.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use thiserror::Error;
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{
    ShutdownHandle, VhostUserBackend, VhostUserDaemon, VringEpollHandler, VringRwLock,
};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Guest memory as the daemons see it: the frontend's regions, replaced atomically on
/// SET_MEM_TABLE / ADD_MEM_REGION. No dirty bitmap (no live-migration logging).
pub type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;
/// The vring type handed to the backends.
pub type Vring = VringRwLock<Mem>;
/// The epoll handler of one worker thread.
pub type Handler<B> = VringEpollHandler<Arc<B>>;

/// Errors of the socket and the accept loop.
#[derive(Debug, Error)]
pub enum ServeError {
    /// The directory that should hold the socket does not exist.
    #[error("cannot create socket '{0}': its directory does not exist (create it first)")]
    NoSocketDir(PathBuf),
    /// Binding the socket failed.
    #[error("cannot listen on socket '{path}' (check the permissions of its directory)")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The error.
        #[source]
        source: VhostUserError,
    },
    /// `--fd` is not an open fd.
    #[error("--fd {0}: not an open file descriptor (the manager must pass it open)")]
    BadFd(RawFd, #[source] io::Error),
    /// `--fd` is neither a listening nor a connected unix stream socket.
    #[error(
        "--fd {0}: not a unix stream socket (pass a listening socket, or a socket connected \
         to the frontend)"
    )]
    NotSocket(RawFd),
    /// Setting up signals, the stop event or the device failed.
    #[error("cannot set up the daemon")]
    Setup(#[source] io::Error),
    /// vhost-user-backend refused to create the daemon.
    #[error("cannot create the vhost-user daemon: {0}")]
    Daemon(String),
    /// accept() failed.
    #[error("cannot accept a connection on the socket")]
    Accept(#[source] io::Error),
    /// The private socket between the relay and the vhost-user daemon failed.
    #[error("cannot set up the internal socket of the relay")]
    Internal(#[source] io::Error),
}

/// Where the frontend connects.
#[derive(Clone, Debug)]
pub enum SocketSource {
    /// Create (replacing a stale one) and listen on this path; removed on exit.
    Path(PathBuf),
    /// A unix socket inherited from a manager: listening (frontends connect to it), or
    /// already connected to the one frontend to serve.
    Fd(RawFd),
}

/// Where frontend connections come from.
pub enum Frontends {
    /// A listening socket: one frontend after another until stopped.
    Listening(Listener),
    /// One connection handed over by a manager; the daemon exits when it ends.
    Connected(Option<UnixStream>),
}

/// Opens the listening socket, or takes the inherited (listening or connected) one.
pub fn open_listener(src: &SocketSource) -> Result<Frontends, ServeError> {
    match src {
        SocketSource::Path(path) => {
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            if !dir.is_dir() {
                return Err(ServeError::NoSocketDir(path.clone()));
            }
            Listener::new(path, true)
                .map(Frontends::Listening)
                .map_err(|source| ServeError::Bind {
                    path: path.clone(),
                    source,
                })
        }
        SocketSource::Fd(fd) => {
            let fd = *fd;
            // SAFETY: F_GETFD only reads the flags of `fd`; an invalid fd gives EBADF.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                return Err(ServeError::BadFd(fd, io::Error::last_os_error()));
            }
            let (Some(listening), Some(domain), Some(ty)) = (
                sockopt_int(fd, libc::SO_ACCEPTCONN),
                sockopt_int(fd, libc::SO_DOMAIN),
                sockopt_int(fd, libc::SO_TYPE),
            ) else {
                return Err(ServeError::NotSocket(fd));
            };
            if domain != libc::AF_UNIX || ty != libc::SOCK_STREAM {
                return Err(ServeError::NotSocket(fd));
            }
            if listening != 0 {
                // SAFETY: `fd` is open, is a listening unix socket (checked above), and the
                // manager handed it to this process: nothing else in the program owns it.
                let l = unsafe { UnixListener::from_raw_fd(fd) };
                let _ = l.set_nonblocking(false);
                Ok(Frontends::Listening(Listener::from(l)))
            } else {
                // SAFETY: `fd` is open, is a unix stream socket that does not listen (checked
                // above), and the manager handed it to this process: nothing else owns it.
                let s = unsafe { UnixStream::from_raw_fd(fd) };
                let _ = s.set_nonblocking(false);
                Ok(Frontends::Connected(Some(s)))
            }
        }
    }
}

/// An int socket option of `fd` at SOL_SOCKET, or None when getsockopt fails (not a socket).
fn sockopt_int(fd: RawFd, opt: libc::c_int) -> Option<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the option is an int; getsockopt writes at most `len` bytes into `v`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(v)
}

/// The stop request shared by the signal thread and the accept loop.
pub struct Stop {
    requested: AtomicBool,
    event: EventFd,
    conn: Mutex<Option<ShutdownHandle>>,
}

impl Stop {
    /// A stop request not yet made.
    pub fn new() -> io::Result<Arc<Stop>> {
        Ok(Arc::new(Stop {
            requested: AtomicBool::new(false),
            event: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            conn: Mutex::new(None),
        }))
    }

    /// Asks the daemon to stop: the current connection is shut down (its in-flight requests
    /// are completed by the teardown) and no new connection is accepted.
    pub fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
        let _ = self.event.write(1);
        if let Some(h) = lock(&self.conn).as_ref() {
            h.shutdown();
        }
    }

    /// Whether a stop was requested.
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    fn set_conn(&self, h: Option<ShutdownHandle>) {
        let mut g = lock(&self.conn);
        *g = h;
        if self.requested() {
            if let Some(h) = g.as_ref() {
                h.shutdown();
            }
        }
    }
}

/// Locks a mutex, ignoring poisoning (a panicking worker must not take the daemon down).
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Blocks SIGTERM and SIGINT in this thread (and so in every thread created after it) and
/// starts a thread that turns them into `stop.request()`. Call before creating any thread.
pub fn handle_signals(stop: Arc<Stop>) -> io::Result<()> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the calls only modify it and the thread's mask.
    let r = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is an initialised sigset_t and `sig` a valid out pointer.
            let r = unsafe { libc::sigwait(&set, &mut sig) };
            if r == 0 {
                log::info!("signal {sig}: finishing in-flight requests and exiting");
                stop.request();
            }
        })?;
    Ok(())
}

/// What the accept loop needs from a device back-end besides `VhostUserBackend`.
pub trait Served: VhostUserBackend<Bitmap = (), Vring = Vring> + Sized + 'static {
    /// Called once the daemon exists and before the connection is accepted: register extra
    /// fds (completion eventfds, taps) with the worker threads.
    fn attach(&self, handlers: &[Arc<Handler<Self>>]) -> io::Result<()>;
    /// The connection being served, so that the back-end can drop it when the frontend
    /// misbehaves (e.g. rings outside guest memory).
    fn set_connection(&self, conn: ShutdownHandle);
    /// The connection is gone and the workers were told to exit: finish in-flight requests,
    /// flush, release guest memory.
    fn teardown(&self);
}

/// Waits until `fd` or the stop event is readable. Returns false on stop.
fn wait_for_connection(fd: RawFd, stop: &Stop) -> Result<bool, ServeError> {
    loop {
        if stop.requested() {
            return Ok(false);
        }
        let mut fds = [
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.event.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(ServeError::Accept(e));
        }
        if fds[1].revents != 0 || stop.requested() {
            return Ok(false);
        }
        if fds[0].revents != 0 {
            return Ok(true);
        }
    }
}

/// Serves frontends until `stop` is requested: from a listening socket one after another,
/// or the one connected socket a manager handed over (then returns when it ends). Each
/// connection gets a fresh back-end from `make` (fresh device state, fresh vrings and worker
/// threads); when a connection ends, for any reason, the back-end is torn down (in-flight
/// requests finished) before the next connection is accepted.
///
/// The vhost-user daemon does not talk to the frontend directly: it accepts from a private
/// socket, and a [relay](relay) copies the messages between that socket and the frontend's.
pub fn serve<B, F>(
    name: &str,
    frontends: &mut Frontends,
    stop: &Stop,
    mut make: F,
) -> Result<(), ServeError>
where
    B: Served,
    F: FnMut() -> io::Result<B>,
{
    let mut internal = Internal::new().map_err(ServeError::Internal)?;
    let mut n = 0u64;
    loop {
        let frontend = match frontends {
            Frontends::Listening(l) => {
                if !wait_for_connection(l.as_raw_fd(), stop)? {
                    break;
                }
                match l.accept() {
                    Ok(Some(s)) => s,
                    Ok(None) => continue,
                    Err(e) => {
                        log::warn!("cannot accept a connection: {e}");
                        thread::sleep(std::time::Duration::from_millis(100));
                        continue;
                    }
                }
            }
            Frontends::Connected(s) => match s.take() {
                Some(s) if !stop.requested() => s,
                _ => break,
            },
        };
        n += 1;
        serve_one(name, n, frontend, &mut internal, stop, &mut make)?;
    }
    Ok(())
}

/// Serves one frontend connection with a fresh back-end.
fn serve_one<B, F>(
    name: &str,
    n: u64,
    frontend: UnixStream,
    internal: &mut Internal,
    stop: &Stop,
    make: &mut F,
) -> Result<(), ServeError>
where
    B: Served,
    F: FnMut() -> io::Result<B>,
{
    let backend = Arc::new(make().map_err(ServeError::Setup)?);
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new(name.to_string(), backend.clone(), mem)
        .map_err(|e| ServeError::Daemon(e.to_string()))?;
    let handlers = daemon.get_epoll_handlers();
    backend.attach(&handlers).map_err(ServeError::Setup)?;
    // Connect first: the connection waits in the backlog for the accept in start(). If the
    // private socket is gone (a /tmp cleaner), make a new one.
    let inner = match UnixStream::connect(&internal.path) {
        Ok(s) => s,
        Err(e) => {
            log::warn!(
                "internal socket {}: {e}; recreating it",
                internal.path.display()
            );
            *internal = Internal::new().map_err(ServeError::Internal)?;
            UnixStream::connect(&internal.path).map_err(ServeError::Internal)?
        }
    };
    let started = daemon.start(&mut internal.listener);
    let handle = daemon.shutdown_handle();
    if let Some(h) = &handle {
        backend.set_connection(h.clone());
        stop.set_conn(Some(h.clone()));
    }
    match started {
        Ok(()) => {
            log::info!("connection {n}: frontend connected");
            let relay = match relay::Relay::start(n, frontend, inner) {
                Ok(r) => Some(r),
                Err(e) => {
                    log::warn!("connection {n}: cannot start the relay: {e}");
                    if let Some(h) = &handle {
                        h.shutdown();
                    }
                    None
                }
            };
            match daemon.wait() {
                Ok(()) => log::info!("connection {n}: frontend disconnected"),
                Err(vhost_user_backend::Error::HandleRequest(
                    VhostUserError::Disconnected | VhostUserError::PartialMessage,
                )) if stop.requested() => {}
                Err(vhost_user_backend::Error::HandleRequest(VhostUserError::Disconnected)) => {
                    log::info!("connection {n}: frontend disconnected")
                }
                Err(e) => log::warn!("connection {n}: dropped: {e}"),
            }
            // The shutdown handles keep the daemon's end of the private socket open: close
            // it so that the relay forwards the last replies, then closes the frontend.
            if let Some(h) = &handle {
                h.shutdown();
            }
            if let Some(r) = relay {
                r.finish();
            }
        }
        Err(e) => log::warn!("connection {n}: cannot start: {e}"),
    }
    stop.set_conn(None);
    for h in &handlers {
        h.send_exit_event();
    }
    backend.teardown();
    drop(daemon);
    Ok(())
}

/// The private socket the vhost-user daemon accepts from: in a directory of mode 0700 that
/// this process creates (so only its user can connect) and removes when dropped.
struct Internal {
    dir: PathBuf,
    path: PathBuf,
    listener: Listener,
}

impl Internal {
    fn new() -> io::Result<Internal> {
        use std::os::unix::ffi::OsStringExt;
        let mut template = std::env::temp_dir()
            .join("vhost-user-relay.XXXXXX")
            .into_os_string()
            .into_vec();
        template.push(0);
        // SAFETY: `template` is a writable NUL-terminated buffer that mkdtemp fills in; it
        // creates the directory with mode 0700.
        let p = unsafe { libc::mkdtemp(template.as_mut_ptr().cast()) };
        if p.is_null() {
            return Err(io::Error::last_os_error());
        }
        template.pop();
        let dir = PathBuf::from(std::ffi::OsString::from_vec(template));
        let path = dir.join("relay.sock");
        match Listener::new(&path, true) {
            Ok(listener) => Ok(Internal {
                dir,
                path,
                listener,
            }),
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                Err(io::Error::other(e))
            }
        }
    }
}

impl Drop for Internal {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Copies vhost-user messages between a frontend and the vhost-user daemon, with their fds.
///
/// Messages from the frontend are read whole (12-byte header, then the body it announces),
/// so that the fds stay with their message and a header announcing more than
/// `MAX_MSG_SIZE` bytes ends the connection. One thing is changed: a frontend that sends
/// SET_VRING_ENABLE before SET_FEATURES (QEMU's `-netdev vhost-user` does, for the queues it
/// disables) gets a SET_FEATURES with only VHOST_USER_F_PROTOCOL_FEATURES injected first,
/// without reply, since the vhost crate refuses SET_VRING_ENABLE until that bit is acked.
/// The frontend's own SET_FEATURES later acks the real set.
pub mod relay {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc;
    use std::thread;
    use std::time::Duration;

    use vhost::vhost_user::message::MAX_MSG_SIZE;

    /// Size of the vhost-user header: request, flags, size (u32 each).
    pub const HEADER: usize = 12;
    /// Most fds one message may carry.
    pub const MAX_FDS: usize = 8;
    /// VHOST_USER_SET_FEATURES.
    pub const SET_FEATURES: u32 = 2;
    /// VHOST_USER_SET_VRING_ENABLE.
    pub const SET_VRING_ENABLE: u32 = 18;
    /// VHOST_USER_SET_VRING_NUM.
    pub const SET_VRING_NUM: u32 = 8;
    /// The largest split virtqueue.
    const MAX_QUEUE_SIZE: u32 = 32768;
    /// VHOST_USER_F_PROTOCOL_FEATURES.
    pub const PROTOCOL_FEATURES: u64 = 1 << 30;
    /// Version 1 in the flags.
    const VERSION: u32 = 0x1;
    const VERSION_MASK: u32 = 0x3;

    /// One message as read from a socket.
    pub struct Message {
        /// Header and body.
        pub bytes: Vec<u8>,
        /// The fds that came with it (closed when dropped).
        pub fds: Vec<OwnedFd>,
    }

    impl Message {
        /// The request code.
        pub fn request(&self) -> u32 {
            u32::from_le_bytes([self.bytes[0], self.bytes[1], self.bytes[2], self.bytes[3]])
        }
    }

    /// The SET_FEATURES message injected before an early SET_VRING_ENABLE.
    pub fn protocol_features_message() -> Vec<u8> {
        let mut m = Vec::with_capacity(HEADER + 8);
        m.extend_from_slice(&SET_FEATURES.to_le_bytes());
        m.extend_from_slice(&VERSION.to_le_bytes());
        m.extend_from_slice(&8u32.to_le_bytes());
        m.extend_from_slice(&PROTOCOL_FEATURES.to_le_bytes());
        m
    }

    fn bad(msg: String) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, msg)
    }

    /// Reads into `buf` until it is full or the peer closes; fds that arrive go to `fds`.
    /// Returns the bytes read.
    fn read_full(s: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
        let mut off = 0;
        while off < buf.len() {
            // Room for more than MAX_FDS so that a frontend sending too many is seen (the
            // extra ones are closed with the rest); MSG_CTRUNC if even more.
            let mut cmsg = [0u64; 10];
            let mut iov = libc::iovec {
                iov_base: buf[off..].as_mut_ptr().cast(),
                iov_len: buf.len() - off,
            };
            // SAFETY: msghdr is plain data; all-zero is a valid empty header.
            let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
            mh.msg_iov = &mut iov;
            mh.msg_iovlen = 1;
            mh.msg_control = cmsg.as_mut_ptr().cast();
            mh.msg_controllen = std::mem::size_of_val(&cmsg) as _;
            // SAFETY: `mh` points at `iov` (inside `buf`) and `cmsg`, both alive and of the
            // lengths given, for the duration of the call.
            let r = unsafe { libc::recvmsg(s.as_raw_fd(), &mut mh, libc::MSG_CMSG_CLOEXEC) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            // SAFETY: `mh` was filled in by recvmsg; the CMSG macros walk the control
            // buffer within `msg_controllen`, and SCM_RIGHTS data is an array of fds that
            // this process now owns.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&mh);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                        let data = libc::CMSG_DATA(c).cast::<RawFd>();
                        let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                        for i in 0..len / std::mem::size_of::<RawFd>() {
                            let fd = std::ptr::read_unaligned(data.add(i));
                            fds.push(OwnedFd::from_raw_fd(fd));
                        }
                    }
                    c = libc::CMSG_NXTHDR(&mh, c);
                }
            }
            if mh.msg_flags & libc::MSG_CTRUNC != 0 || fds.len() > MAX_FDS {
                return Err(bad(format!("more than {MAX_FDS} fds in one message")));
            }
            if r == 0 {
                break;
            }
            off += r as usize;
        }
        Ok(off)
    }

    /// Reads one whole message. None: the peer closed between two messages.
    pub fn read_message(s: &UnixStream) -> io::Result<Option<Message>> {
        let mut bytes = vec![0u8; HEADER];
        let mut fds = Vec::new();
        match read_full(s, &mut bytes, &mut fds)? {
            0 => return Ok(None),
            HEADER => {}
            n => return Err(bad(format!("closed after {n} bytes of a header"))),
        }
        let word =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let (request, flags, size) = (word(0), word(4), word(8) as usize);
        if flags & VERSION_MASK != VERSION {
            return Err(bad(format!(
                "request {request}: bad flags {flags:#x} (not version 1)"
            )));
        }
        if size > MAX_MSG_SIZE {
            return Err(bad(format!(
                "request {request}: {size}-byte body (at most {MAX_MSG_SIZE})"
            )));
        }
        bytes.resize(HEADER + size, 0);
        let got = read_full(s, &mut bytes[HEADER..], &mut fds)?;
        if got < size {
            return Err(bad(format!(
                "request {request}: closed after {got} of {size} body bytes"
            )));
        }
        Ok(Some(Message { bytes, fds }))
    }

    /// Sends `bytes` with `fds` attached to the first byte.
    pub fn send_message(s: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
        let mut off = 0;
        let mut fds = fds;
        while off < bytes.len() {
            let mut cmsg = [0u64; 8];
            let mut iov = libc::iovec {
                iov_base: bytes[off..].as_ptr() as *mut libc::c_void,
                iov_len: bytes.len() - off,
            };
            // SAFETY: msghdr is plain data; all-zero is a valid empty header.
            let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
            mh.msg_iov = &mut iov;
            mh.msg_iovlen = 1;
            if !fds.is_empty() {
                let n = std::mem::size_of_val(fds);
                // SAFETY: CMSG_SPACE only computes a size.
                let space = unsafe { libc::CMSG_SPACE(n as u32) } as usize;
                if space > std::mem::size_of_val(&cmsg) {
                    return Err(bad(format!("{} fds in one message", fds.len())));
                }
                mh.msg_control = cmsg.as_mut_ptr().cast();
                mh.msg_controllen = space as _;
                // SAFETY: the control buffer holds `space` bytes (checked above): one cmsg
                // header followed by `n` bytes of fds, copied from `fds`.
                unsafe {
                    let c = libc::CMSG_FIRSTHDR(&mh);
                    (*c).cmsg_level = libc::SOL_SOCKET;
                    (*c).cmsg_type = libc::SCM_RIGHTS;
                    (*c).cmsg_len = libc::CMSG_LEN(n as u32) as _;
                    std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), n);
                }
            }
            // SAFETY: `mh` points at `iov` (inside `bytes`) and the control buffer, both
            // alive for the duration of the call.
            let r = unsafe { libc::sendmsg(s.as_raw_fd(), &mh, libc::MSG_NOSIGNAL) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            off += r as usize;
            fds = &[];
        }
        Ok(())
    }

    /// Copies messages from `from` to `to` until either fails or closes. `to_backend`:
    /// the frontend -> daemon direction, where SET_FEATURES is injected when needed.
    fn pump(n: u64, from: &UnixStream, to: &UnixStream, to_backend: bool) {
        let (src, dst) = if to_backend {
            ("frontend", "back-end")
        } else {
            ("back-end", "frontend")
        };
        let mut features_seen = false;
        loop {
            let m = match read_message(from) {
                Ok(Some(m)) => m,
                Ok(None) => return,
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    log::warn!("connection {n}: message from the {src}: {e}; closing");
                    return;
                }
                Err(e) => {
                    log::debug!("connection {n}: reading from the {src}: {e}");
                    return;
                }
            };
            log::trace!(
                "connection {n}: {src} -> {dst}: request {}, {} bytes, {} fd(s)",
                m.request(),
                m.bytes.len(),
                m.fds.len()
            );
            if to_backend {
                match m.request() {
                    SET_VRING_NUM => {
                        // virtio-queue would ignore a size that is not a power of two and
                        // keep the old one; refuse it like every other bad queue size.
                        let word = |i: usize| {
                            m.bytes
                                .get(HEADER + i..HEADER + i + 4)
                                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        };
                        match (word(0), word(4)) {
                            (Some(_), Some(num))
                                if num.is_power_of_two() && num <= MAX_QUEUE_SIZE => {}
                            (q, num) => {
                                log::warn!(
                                    "connection {n}: SET_VRING_NUM {num:?} for queue {q:?}: not a \
                                     power of two from 1 to {MAX_QUEUE_SIZE}; closing"
                                );
                                return;
                            }
                        }
                    }
                    SET_FEATURES => features_seen = true,
                    SET_VRING_ENABLE if !features_seen => {
                        log::debug!(
                            "connection {n}: SET_VRING_ENABLE before SET_FEATURES: acking \
                             PROTOCOL_FEATURES first"
                        );
                        if let Err(e) = send_message(to, &protocol_features_message(), &[]) {
                            log::debug!("connection {n}: writing to the {dst}: {e}");
                            return;
                        }
                        features_seen = true;
                    }
                    _ => {}
                }
            }
            let fds: Vec<RawFd> = m.fds.iter().map(AsRawFd::as_raw_fd).collect();
            if let Err(e) = send_message(to, &m.bytes, &fds) {
                log::debug!("connection {n}: writing to the {dst}: {e}");
                return;
            }
        }
    }

    /// The two copying threads of one connection.
    pub struct Relay {
        frontend: UnixStream,
        inner: UnixStream,
        to_backend: thread::JoinHandle<()>,
        to_frontend: thread::JoinHandle<()>,
        to_frontend_done: mpsc::Receiver<()>,
    }

    fn close(a: &UnixStream, b: &UnixStream) {
        let _ = a.shutdown(std::net::Shutdown::Both);
        let _ = b.shutdown(std::net::Shutdown::Both);
    }

    impl Relay {
        /// Starts copying between `frontend` and `inner` (the daemon's connection). When
        /// either side closes or misbehaves, both are closed.
        pub fn start(n: u64, frontend: UnixStream, inner: UnixStream) -> io::Result<Relay> {
            let (fe, inn) = (frontend.try_clone()?, inner.try_clone()?);
            let to_backend =
                thread::Builder::new()
                    .name(format!("relay-in-{n}"))
                    .spawn(move || {
                        pump(n, &fe, &inn, true);
                        close(&fe, &inn);
                    })?;
            let (fe, inn) = (frontend.try_clone()?, inner.try_clone()?);
            let (tx, to_frontend_done) = mpsc::channel();
            let to_frontend =
                match thread::Builder::new()
                    .name(format!("relay-out-{n}"))
                    .spawn(move || {
                        pump(n, &inn, &fe, false);
                        close(&fe, &inn);
                        let _ = tx.send(());
                    }) {
                    Ok(t) => t,
                    Err(e) => {
                        close(&frontend, &inner);
                        let _ = to_backend.join();
                        return Err(e);
                    }
                };
            Ok(Relay {
                frontend,
                inner,
                to_backend,
                to_frontend,
                to_frontend_done,
            })
        }

        /// Once the daemon closed its end: lets the last replies through (up to a second,
        /// for a frontend that does not read them), closes both sides, joins the threads.
        pub fn finish(self) {
            let _ = self.to_frontend_done.recv_timeout(Duration::from_secs(1));
            close(&self.frontend, &self.inner);
            let _ = self.to_frontend.join();
            let _ = self.to_backend.join();
        }
    }
}

/// Starts logging through env_logger (`RUST_LOG`, default `info`).
pub fn init_logging() {
    let env = env_logger::Env::default().default_filter_or("info");
    let _ = env_logger::Builder::from_env(env)
        .format_timestamp_millis()
        .try_init();
}

/// GET_CONFIG: `size` bytes of `config` from `offset`. A frontend may read past the device's
/// structure (e.g. a newer layout): the rest reads as zero. vhost already bounds `size`.
pub fn config_window(config: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let mut out = vec![0u8; size as usize];
    backends::read_config(config, u64::from(offset), &mut out);
    out
}

/// Checks that every region of `mem` lies inside its file. vm-memory maps past the end of a
/// file without complaint, and touching such a page would kill the daemon with SIGBUS, so a
/// frontend that sends a region larger than its memfd is refused here.
pub fn check_regions(mem: &Mem) -> io::Result<()> {
    use vm_memory::{GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion};
    let guard = mem.memory();
    for r in guard.iter() {
        let Some(fo) = r.file_offset() else {
            continue;
        };
        let meta = fo.file().metadata()?;
        if !meta.file_type().is_file() {
            continue;
        }
        let end = fo.start().checked_add(r.len());
        if end.is_none_or(|e| e > meta.len()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "memory region at guest {:#x} ({:#x} bytes at file offset {:#x}) runs past \
                     the end of its file ({:#x} bytes)",
                    r.start_addr().0,
                    r.len(),
                    fo.start(),
                    meta.len()
                ),
            ));
        }
    }
    Ok(())
}

/// A clap error as one line ("invalid value ... (see --help)").
pub fn one_line(e: &clap::Error) -> String {
    let text = e.to_string();
    let parts: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .collect();
    let msg = parts.join(" ");
    format!("{} (see --help)", msg.trim_start_matches("error: "))
}
