//! The part of a vhost-user back-end program that does not depend on the device: the
//! listening socket (`--socket-path` or `--fd`), SIGTERM/SIGINT, and the accept loop that
//! serves one frontend after another, each with a fresh device.
//!
//! Both daemons, `vhost-user-blk` and `vhost-user-net`, are built on it, so that they behave
//! the same way.

pub mod confine;
pub mod memory;
pub mod relay;
pub mod stats;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
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
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
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
        source: io::Error,
    },
    /// A back-end already listens on the socket path.
    #[error("socket '{0}': another back-end is listening there (stop it, or choose another path)")]
    InUse(PathBuf),
    /// Something that is not a socket is at the socket path.
    #[error(
        "socket '{0}': the path exists and is not a socket (refusing to replace it: choose \
         another path)"
    )]
    NotASocket(PathBuf),
    /// Whether the socket at the path is live could not be told.
    #[error(
        "socket '{path}': cannot tell whether a back-end listens there (remove it if it is \
         stale)"
    )]
    Probe {
        /// The socket path.
        path: PathBuf,
        /// What connect() said.
        #[source]
        source: io::Error,
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
    /// Client mode: connect to a frontend listening on this path (QEMU's and our vmm's
    /// `server=on`), and connect again whenever the connection ends.
    Connect(PathBuf),
}

impl std::fmt::Display for SocketSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SocketSource::Path(p) => write!(f, "{}", p.display()),
            SocketSource::Fd(fd) => write!(f, "fd {fd}"),
            SocketSource::Connect(p) => write!(f, "the frontend listening on {}", p.display()),
        }
    }
}

/// How often client mode tries to connect while the frontend does not listen.
pub const RECONNECT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(150);

/// Where frontend connections come from.
pub enum Frontends {
    /// A listening socket: one frontend after another until stopped. With the socket file
    /// this daemon created, if it did (removed at exit if still the same socket).
    Listening(Listener, Option<SocketFile>),
    /// One connection handed over by a manager; the daemon exits when it ends.
    Connected(Option<UnixStream>),
    /// Client mode: connect to the frontend listening on this path, again after each
    /// connection, until stopped.
    Connecting(PathBuf),
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
            clear_stale_socket(path)?;
            let l = bind_listening(path)?;
            let file = SocketFile::record(path).map_err(|source| ServeError::Bind {
                path: path.clone(),
                source,
            })?;
            Ok(Frontends::Listening(Listener::from(l), Some(file)))
        }
        SocketSource::Connect(path) => Ok(Frontends::Connecting(path.clone())),
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
                Ok(Frontends::Listening(Listener::from(l), None))
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

/// Makes room for a new socket at `path`: nothing there is fine, a stale socket (connect()
/// is refused: nobody listens) is removed; a live socket or anything that is not a socket
/// is refused and left alone.
fn clear_stale_socket(path: &Path) -> Result<(), ServeError> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ServeError::Probe {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ServeError::NotASocket(path.to_path_buf()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ServeError::InUse(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            log::info!("socket '{}': replacing a stale socket", path.display());
            std::fs::remove_file(path).map_err(|source| ServeError::Bind {
                path: path.to_path_buf(),
                source,
            })
        }
        Err(source) => Err(ServeError::Probe {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Binds and listens on a socket that appears at `path` only once it listens, and only if
/// nothing is there: bound at a temporary name beside it, then hard-linked to `path`
/// (link() never replaces), then the temporary name removed. A frontend (or a test) that
/// sees the path can connect at once, and a daemon started at the same moment on the same
/// path cannot be replaced by this one.
fn bind_listening(path: &Path) -> Result<UnixListener, ServeError> {
    let bind_err = |source| ServeError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(path.file_name().unwrap_or_default());
    tmp_name.push(format!(".{}.binding", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let l = UnixListener::bind(&tmp).map_err(bind_err)?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(l),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            Err(ServeError::InUse(path.to_path_buf()))
        }
        Err(e) => Err(bind_err(e)),
    }
}

/// The socket file this daemon created: removed when dropped, but only if the path still
/// names that socket (same device and inode as right after bind). A socket someone put
/// there since (another daemon started on the path) is theirs, and stays.
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    fn record(path: &Path) -> io::Result<SocketFile> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(path)?;
        Ok(SocketFile {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.dev() == self.dev && m.ino() == self.ino => {
                let _ = std::fs::remove_file(&self.path);
            }
            Ok(_) => log::info!(
                "socket '{}' was replaced since this daemon created it: leaving it",
                self.path.display()
            ),
            Err(_) => {}
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

/// SIGTERM and SIGINT, blocked in the main thread (and so in every thread created after it)
/// by [`block_signals`], waiting for [`Signals::spawn`].
pub struct Signals {
    set: libc::sigset_t,
}

/// Blocks SIGTERM and SIGINT in this thread (and so in every thread created after it).
/// Call before creating any thread; a signal that arrives before [`Signals::spawn`] waits.
pub fn block_signals() -> io::Result<Signals> {
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
    Ok(Signals { set })
}

impl Signals {
    /// Starts the thread that turns SIGTERM/SIGINT into `stop.request()`, confined to
    /// [`confine::SIGNALS`] from its first instruction.
    pub fn spawn(self, stop: Arc<Stop>) -> Result<(), confine::ConfineError> {
        let set = self.set;
        confine::spawn_confined("signals", confine::SIGNALS, move || loop {
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
    /// Whether the back-end records what its queues take and complete in an inflight region
    /// (the serving layer then offers VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD for it).
    fn keeps_inflight(&self) -> bool {
        false
    }
    /// The frontend's inflight region for this connection (only with
    /// [`keeps_inflight`](Self::keeps_inflight)).
    fn set_inflight(&self, _region: crate::inflight::InflightRegion) {}
    /// The frontend is stopping vring `index` (GET_VRING_BASE on its way to the handler,
    /// which needs the vring's lock): a worker that the guest keeps busy should let go of
    /// it instead of taking it again.
    fn stopping_vring(&self, _index: u32) {}

    /// The frontend enables or disables vring `index` (SET_VRING_ENABLE, before the handler
    /// gets it).
    fn vring_enabled(&self, _index: u32, _enabled: bool) {}
}

/// The exit events of a back-end's worker threads (`VhostUserBackend::exit_event`).
///
/// vhost-user-backend 0.24 registers the consumer half with the worker's epoll through
/// `into_raw_fd` and never closes it: one eventfd per worker thread per connection, which a
/// daemon serving frontend after frontend (reconnects, restarts of the VMM) accumulates
/// until accept() and every socket fail with EMFILE. The fds handed out are recorded here
/// and closed when this is dropped, with the back-end that owns it: every worker handler
/// holds the back-end, so that is after the last epoll that polled them is gone.
#[derive(Default)]
pub struct ExitEvents {
    handed_out: Mutex<Vec<RawFd>>,
}

impl ExitEvents {
    /// A new exit event for a worker thread.
    pub fn create(&self) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok((consumer, notifier)) => {
                lock(&self.handed_out).push(consumer.as_raw_fd());
                Some((consumer, notifier))
            }
            Err(e) => {
                log::error!("cannot create a worker exit event: {e}");
                None
            }
        }
    }
}

impl Drop for ExitEvents {
    fn drop(&mut self) {
        let fds = std::mem::take(self.handed_out.get_mut().unwrap_or_else(|e| e.into_inner()));
        for fd in fds {
            // SAFETY: vhost-user-backend took this fd over with `into_raw_fd` (its only use
            // of `exit_event`, in `VringEpollHandler::new`) and never closes it; the handlers
            // that polled it are gone (they hold the back-end that owns `self`), so nothing
            // refers to this fd any more and closing it frees no one else's.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
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

/// Client mode: connects to the frontend listening on `path`, trying again every
/// [`RECONNECT_INTERVAL`] while it does not listen (not yet, or restarting). None: stop
/// was requested meanwhile.
fn connect_to_frontend(path: &Path, stop: &Stop) -> Result<Option<UnixStream>, ServeError> {
    let mut logged = false;
    loop {
        if stop.requested() {
            return Ok(None);
        }
        match UnixStream::connect(path) {
            Ok(s) => return Ok(Some(s)),
            Err(e) if !logged => {
                log::info!(
                    "no frontend listening on '{}' ({e}); trying again every {} ms",
                    path.display(),
                    RECONNECT_INTERVAL.as_millis()
                );
                logged = true;
            }
            Err(e) => log::trace!("connecting to '{}': {e}", path.display()),
        }
        let mut p = libc::pollfd {
            fd: stop.event.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut p, 1, RECONNECT_INTERVAL.as_millis() as i32) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(ServeError::Accept(e));
            }
        }
    }
}

/// Serves frontends until `stop` is requested: from a listening socket one after another,
/// the one connected socket a manager handed over (then returns when it ends), or in
/// client mode one connection to the frontend's socket after another. Each
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
    make: F,
) -> Result<(), ServeError>
where
    B: Served,
    F: FnMut() -> io::Result<B>,
{
    let internal = RelaySocket::new().map_err(ServeError::Internal)?;
    serve_prepared(name, frontends, stop, internal, make)
}

/// [`serve`] with the relay's private socket already made (before the sandbox is set up:
/// [`confine`]).
pub fn serve_prepared<B, F>(
    name: &str,
    frontends: &mut Frontends,
    stop: &Stop,
    mut internal: RelaySocket,
    mut make: F,
) -> Result<(), ServeError>
where
    B: Served,
    F: FnMut() -> io::Result<B>,
{
    let mut n = 0u64;
    loop {
        let frontend = match frontends {
            Frontends::Listening(l, _) => {
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
            Frontends::Connecting(path) => match connect_to_frontend(path, stop)? {
                Some(s) => s,
                None => break,
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
    internal: &mut RelaySocket,
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
    confine_workers(&handlers);
    // Connect first: the connection waits in the backlog for the accept in start(). If the
    // private socket is gone (a /tmp cleaner), make a new one.
    let inner = match UnixStream::connect(&internal.path) {
        Ok(s) => s,
        Err(e) => {
            log::warn!(
                "internal socket {}: {e}; recreating it",
                internal.path.display()
            );
            *internal = RelaySocket::new().map_err(ServeError::Internal)?;
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
            let hook = backend.keeps_inflight().then(|| {
                let b = backend.clone();
                let hook: relay::InflightHook = Arc::new(move |r| b.set_inflight(r));
                hook
            });
            let b = backend.clone();
            let stopping: relay::StopHook = Arc::new(move |e| match e {
                relay::VringEvent::Stopping(i) => b.stopping_vring(i),
                relay::VringEvent::Enabling(i, on) => b.vring_enabled(i, on),
            });
            let relay =
                match relay::Relay::start_with_stop(n, frontend, inner, hook, Some(stopping)) {
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

/// Wakes every vring worker of a new connection once, so that each installs its seccomp
/// filter ([`confine::worker_event`]) before the frontend's first message, and waits for
/// them. A worker that does not answer in time installs it on its first event instead.
fn confine_workers<B: Served>(handlers: &[Arc<Handler<B>>]) {
    if !confine::workers_confined() {
        return;
    }
    confine::reset_installed();
    let id = u64::from(confine::WORKER_SETUP_EVENT);
    let ev = vmm_sys_util::epoll::EventSet::IN | vmm_sys_util::epoll::EventSet::EDGE_TRIGGERED;
    let mut woken = Vec::new();
    for h in handlers {
        let fd = match EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) {
            Ok(fd) => fd,
            Err(e) => {
                log::warn!("cannot wake a vring worker to confine it: {e}");
                continue;
            }
        };
        if let Err(e) = h.register_listener(fd.as_raw_fd(), ev, id) {
            log::warn!("cannot wake a vring worker to confine it: {e}");
            continue;
        }
        let _ = fd.write(1);
        woken.push((h, fd));
    }
    if !confine::wait_installed(woken.len()) {
        log::warn!("a vring worker did not install its seccomp filter within 5 s");
    }
    for (h, fd) in woken {
        let _ = h.unregister_listener(fd.as_raw_fd(), ev, id);
    }
}

/// The private socket the vhost-user daemon accepts from: in a directory of mode 0700 that
/// this process creates (so only its user can connect) and removes when dropped.
pub struct RelaySocket {
    dir: PathBuf,
    path: PathBuf,
    listener: Listener,
}

impl RelaySocket {
    /// The directory holding the socket.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The socket.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates the directory and the listening socket in it.
    pub fn new() -> io::Result<RelaySocket> {
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
            Ok(listener) => Ok(RelaySocket {
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

impl Drop for RelaySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
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
    crate::read_config(config, u64::from(offset), &mut out);
    out
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

/// Makes the queue's kick eventfd readable again, so that the worker serves the queue once
/// more after it has handled its other events (an engine stopped at its budget with work
/// left: the worker must see its exit event and vring changes between rounds).
pub fn rekick(state: &vhost_user_backend::VringState<Mem>) {
    if let Some(kick) = state.get_kick() {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live local buffer to the kick eventfd, which the
        // vring state keeps open while it is borrowed; an eventfd accepts an 8-byte add.
        let r = unsafe { libc::write(kick.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if r != 8 {
            log::warn!(
                "cannot re-arm the queue's kick eventfd: {}",
                io::Error::last_os_error()
            );
        }
    }
}
