//! `vhost-user-blk`: a vhost-user virtio-blk back-end running the `backends` block engine,
//! the same engine as the VMM's in-VMM virtio-blk device.
//!
//! - [`Args`]: the command line (QEMU's vhost-user-blk flags plus the vhost-user back-end
//!   program conventions: `--fd`, `--print-capabilities`).
//! - [`BlkBackend`]: one device instance for one frontend connection (`VhostUserBackend`),
//!   one worker thread per queue, io_uring completions on the same thread.
//! - [`run`]: opens the image and the socket, then serves frontends one after another with
//!   fresh device state until SIGTERM/SIGINT.
//!
//! `--poll-us N`: after handling a kick or a completion the queue thread keeps polling the
//! available ring (and the io_uring completions) for N microseconds before going back to
//! sleep on its eventfds; every request found meanwhile restarts the window, and the guest's
//! doorbells stay off meanwhile (`backends::poll`, the loop the vmm's devices run too).
//!
//! Sandbox (`backends::vhost_user::confine`): once everything is open, `--user`, Landlock,
//! and a seccomp filter per thread kind; [`WORKER_SYSCALLS`] is the vring workers' list,
//! kept here beside the code they run.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backends::block::{
    block_config_space, block_features, BlockBackend, BlockCounters, BlockOptions, BlockQueue,
    BlockStats, EngineChoice,
};
use backends::inflight::InflightRegion;
use backends::poll::{busy_poll, PollEnd, Poller};
use backends::sandbox::landlock::{Access, Grant};
use backends::sandbox::{allow, Rule, ThreadKind};
use backends::vhost_user::confine::{self, ConfineError, Confinement, SandboxArgs};
use backends::vhost_user::stats::StatsSocket;
use backends::QueueError;
use clap::Parser;
use serde::Serialize;
use thiserror::Error;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VringT};
use virtio_queue::QueueT;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use backends::vhost_user::{self, lock, Handler, Served};
pub use backends::vhost_user::{Mem, ServeError, SocketSource, Stop, Vring};

/// The largest queue size virtio's split ring allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// The most queues (one worker thread each).
pub const MAX_QUEUES: u16 = 64;

/// Command line of `vhost-user-blk`.
#[derive(Debug, Parser)]
#[command(
    name = "vhost-user-blk",
    version,
    about = "vhost-user virtio-blk back-end: serves a raw disk image to a VMM (QEMU \
             vhost-user-blk-pci, Cloud Hypervisor, our vmm) over a unix socket",
    long_about = None,
    after_help = "The daemon serves one frontend at a time; when it disconnects or dies, the \
                  socket stays and the next frontend gets a fresh device. SIGTERM/SIGINT finish \
                  in-flight requests, flush the image, remove the socket and exit 0. Logs go to \
                  stderr (RUST_LOG=debug for more). With --fd and a socket already connected to a frontend, the \
                  daemon serves that one connection and exits 0 when it ends. Our vmm takes the \
                  back-end at start (--vhost-user-blk socket=PATH) or while its guest runs \
                  (vmm-remote --api-socket API add-disk vhost_user=on,socket=PATH; \
                  remove-device to give it back).\n\n\
                  Sandbox (on by default): once the image or tap and the sockets are open, \
                  each thread gets a seccomp filter of the syscalls it makes (--seccomp), \
                  Landlock limits what can still be opened (--landlock), and a daemon \
                  started as root can become --user; io_uring rings accept only the \
                  engine's operations on the image. A syscall outside a thread's list prints \
                  one line naming the thread and the syscall. A systemd unit with \
                  hardening options: vhost-user-blk/vhost-user-blk@.service in the source tree."
)]
pub struct Args {
    /// Listen on this unix socket path (created; a stale socket is replaced; refused if a
    /// back-end listens there or the path is not a socket; removed at exit if still ours).
    #[arg(long, value_name = "PATH", required_unless_present_any = ["fd", "connect", "print_capabilities"], conflicts_with_all = ["fd", "connect"])]
    pub socket_path: Option<PathBuf>,
    /// Use this inherited unix socket instead of --socket-path: a listening one (frontends
    /// connect to it, one after another), or one already connected to a frontend (that one
    /// connection is served, and the daemon exits 0 when it ends: there is nothing to accept
    /// another from).
    #[arg(long, value_name = "FD", conflicts_with = "connect")]
    pub fd: Option<RawFd>,
    /// Client mode, instead of --socket-path or --fd: connect to a frontend listening on
    /// this unix socket (QEMU's and our vmm's `server=on`); when the connection ends, connect
    /// again (every 150 ms until it listens) and serve the next one, until SIGTERM/SIGINT.
    #[arg(long, value_name = "PATH")]
    pub connect: Option<PathBuf>,
    /// Raw disk image (file or block device).
    #[arg(
        long,
        value_name = "IMG",
        required_unless_present = "print_capabilities"
    )]
    pub blk_file: Option<PathBuf>,
    /// Open the image read-only and offer VIRTIO_BLK_F_RO.
    #[arg(long)]
    pub read_only: bool,
    /// Open the image with O_DIRECT (bypass the host page cache).
    #[arg(long)]
    pub direct: bool,
    /// Number of request queues (1-64).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub queues: u16,
    /// Largest queue size the frontend may choose (power of two, 2-32768).
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub queue_size: u16,
    /// After work, keep polling the queue for N microseconds before sleeping (latency).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub poll_us: u64,
    /// Publish the per-queue counters (requests and bytes by kind, errors, notifications,
    /// interrupts, latency histogram; kept across frontends) on this unix socket: read
    /// them with `curl --unix-socket PATH http://localhost/stats`, or give the vmm
    /// `stats=PATH` with the disk and read them in its `vm.counters`.
    #[arg(long, value_name = "PATH")]
    pub stats_socket: Option<PathBuf>,
    /// Print the back-end capabilities (JSON, vhost-user spec) and exit.
    #[arg(long)]
    pub print_capabilities: bool,
    /// The sandbox: --seccomp, --landlock, --user.
    #[command(flatten)]
    pub sandbox: SandboxArgs,
}

/// The JSON printed by `--print-capabilities` (docs/interop/vhost-user.json).
pub const CAPABILITIES: Capabilities = Capabilities {
    kind: "block",
    features: &["read-only", "blk-file"],
};

/// A back-end's capabilities: its device type and the optional features it implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Capabilities {
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub features: &'static [&'static str],
}

/// Errors of the daemon, printed as one line by `main`.
#[derive(Debug, Error)]
pub enum Error {
    /// A command line value is out of range.
    #[error("{0}")]
    Usage(String),
    /// The image could not be opened.
    #[error("{0}")]
    Image(String),
    /// The socket or the daemon could not be set up.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// The sandbox could not be set up.
    #[error(transparent)]
    Sandbox(#[from] ConfineError),
    /// `--print-capabilities` could not write its JSON.
    #[error("cannot print the capabilities: {0}")]
    Capabilities(serde_json::Error),
}

/// Runs the daemon: parses nothing (see [`Args`]), sets up signals, opens the image and the
/// socket, serves frontends until SIGTERM/SIGINT.
pub fn run(args: Args) -> Result<(), Error> {
    if args.print_capabilities {
        let json = serde_json::to_string_pretty(&CAPABILITIES).map_err(Error::Capabilities)?;
        println!("{json}");
        return Ok(());
    }
    if args.queues == 0 || args.queues > MAX_QUEUES {
        return Err(Error::Usage(format!(
            "--queues {}: expected 1 to {MAX_QUEUES}",
            args.queues
        )));
    }
    if args.queue_size < 2 || args.queue_size > MAX_QUEUE_SIZE || !args.queue_size.is_power_of_two()
    {
        return Err(Error::Usage(format!(
            "--queue-size {}: expected a power of two from 2 to {MAX_QUEUE_SIZE}",
            args.queue_size
        )));
    }
    let poll = backends::poll::check_poll_us(args.poll_us)
        .map_err(|why| Error::Usage(format!("--poll-us {why}")))?;
    let source = match (&args.socket_path, args.fd, &args.connect) {
        (Some(p), None, None) => SocketSource::Path(p.clone()),
        (None, Some(fd), None) => SocketSource::Fd(fd),
        (None, None, Some(p)) => SocketSource::Connect(p.clone()),
        _ => {
            return Err(Error::Usage(
                "give exactly one of --socket-path, --fd and --connect".into(),
            ))
        }
    };
    let Some(path) = args.blk_file.clone() else {
        return Err(Error::Usage("--blk-file IMG is required".into()));
    };
    if let SocketSource::Path(sock) = &source {
        if same_file(sock, &path) {
            return Err(Error::Usage(format!(
                "--socket-path '{}' is the disk image (--blk-file '{}'): give the socket a \
                 path of its own",
                sock.display(),
                path.display()
            )));
        }
    }
    args.sandbox.check()?;
    let stop = Stop::new().map_err(ServeError::Setup)?;
    let signals = vhost_user::block_signals().map_err(ServeError::Setup)?;
    let disk = BlockBackend::open(&BlockOptions {
        path: path.clone(),
        readonly: args.read_only,
        direct: args.direct,
        engine: EngineChoice::Auto,
        serial: None,
    })
    .map_err(|e| Error::Image(image_error(&e, &path)))?;
    let disk = Arc::new(disk);
    let mut listener = vhost_user::open_listener(&source)?;
    log::info!(
        "serving '{}' ({} sectors{}, engine {:?}) on {}, {} queue(s) of up to {}",
        path.display(),
        disk.capacity_sectors(),
        if disk.readonly() { ", read-only" } else { "" },
        disk.engine(),
        source,
        args.queues,
        args.queue_size
    );
    let cfg = BlkConfig {
        queues: args.queues,
        queue_size: args.queue_size,
        poll,
    };
    let stats = args
        .stats_socket
        .as_deref()
        .map(StatsSocket::bind)
        .transpose()?;
    let relay = vhost_user::RelaySocket::new().map_err(ServeError::Internal)?;
    // The sandbox (backends::vhost_user::confine): what is open stays usable; from here on
    // the daemon may open only the image again and make or remove sockets in its
    // directories.
    let device = Grant::new(
        &path,
        if disk.readonly() {
            Access::ReadFile
        } else {
            Access::ReadWriteFile
        },
    );
    Confinement::for_daemon(
        "vhost-user-blk",
        &args.sandbox,
        device,
        &source,
        stats.as_ref().map(StatsSocket::path),
        &relay,
        WORKER,
    )
    .apply()?;
    signals.spawn(stop.clone())?;
    let counters: Arc<[Arc<BlockCounters>]> = (0..args.queues).map(|_| Arc::default()).collect();
    let c = counters.clone();
    let _stats = stats
        .map(|s| s.serve(Arc::new(move || stats_json(&c))))
        .transpose()?;
    confine::enter_connection()?;
    vhost_user::serve_prepared("vhost-user-blk", &mut listener, &stop, relay, || {
        BlkBackend::new(disk.clone(), cfg).map(|b| b.with_counters(counters.clone()))
    })?;
    // In-flight requests were completed by the teardown of the last connection.
    if let Err(e) = disk.flush() {
        log::warn!("final flush of '{}': {e}", path.display());
    }
    log::info!("stopped");
    Ok(())
}

/// What a vring worker (one queue: its kicks, the io_uring completions, the busy-poll
/// window) may call besides the block engine's own list
/// ([`backends::block::ENGINE_SYSCALLS`]): memory, waits and signal masks, and a thread's
/// exit. Found by running the daemon's tests and QEMU's vhost-user-blk under
/// `--seccomp log`.
pub const WORKER_SYSCALLS: &[Rule] = &[
    allow(libc::SYS_mmap),
    allow(libc::SYS_munmap),
    allow(libc::SYS_madvise),
    allow(libc::SYS_mprotect),
    allow(libc::SYS_brk),
    allow(libc::SYS_futex),
    allow(libc::SYS_sched_yield),
    allow(libc::SYS_rt_sigprocmask),
    allow(libc::SYS_sigaltstack),
];

/// The vring workers' kind.
pub const WORKER: ThreadKind = ThreadKind {
    name: "vring-worker",
    syscalls: &[backends::block::ENGINE_SYSCALLS, WORKER_SYSCALLS],
};

/// The stats endpoint's answer: every queue's counters since the daemon started.
pub fn stats_json(counters: &[Arc<BlockCounters>]) -> serde_json::Value {
    serde_json::json!({
        "device": "vhost-user-blk",
        "queues": counters
            .iter()
            .enumerate()
            .map(|(i, c)| BlockStats::report(i, c))
            .collect::<Vec<_>>(),
    })
}

/// Whether `a` and `b` name the same file: the same path once canonicalized (the file
/// itself need not exist), or the same device and inode (hard links, bind mounts).
fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let canonical = |p: &std::path::Path| {
        p.canonicalize().ok().or_else(|| {
            let dir = match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => std::path::Path::new("."),
            };
            Some(dir.canonicalize().ok()?.join(p.file_name()?))
        })
    };
    if a == b || matches!((canonical(a), canonical(b)), (Some(x), Some(y)) if x == y) {
        return true;
    }
    matches!(
        (std::fs::metadata(a), std::fs::metadata(b)),
        (Ok(x), Ok(y)) if x.dev() == y.dev() && x.ino() == y.ino()
    )
}

/// One line with the cause and the fix for an image that cannot be opened.
fn image_error(e: &backends::block::BlockError, path: &std::path::Path) -> String {
    use std::error::Error as _;
    let cause = e.source().map(|s| s.to_string()).unwrap_or_default();
    let hint = match e
        .source()
        .and_then(|s| s.downcast_ref::<io::Error>())
        .map(io::Error::kind)
    {
        Some(io::ErrorKind::NotFound) => " (create it, e.g. `truncate -s 1G IMG`, or fix the path)",
        Some(io::ErrorKind::PermissionDenied) => {
            " (fix its permissions, or pass --read-only for a read-only image)"
        }
        _ if cause.contains("Invalid argument") => {
            " (the file system may not support O_DIRECT: drop --direct)"
        }
        _ => "",
    };
    let _ = path;
    format!("{e}: {cause}{hint}")
}

/// Per-daemon settings every connection's back-end uses.
#[derive(Clone, Copy, Debug)]
pub struct BlkConfig {
    /// Number of queues.
    pub queues: u16,
    /// Largest queue size.
    pub queue_size: u16,
    /// Busy-poll window after work.
    pub poll: Duration,
}

#[derive(Default)]
struct QueueState {
    engine: Option<BlockQueue<Mem>>,
    /// The vring, kept for draining from the frontend thread (stop, reset, teardown).
    vring: Option<Vring>,
    /// The queue failed (guest fault): nothing more is processed until it is restarted.
    broken: bool,
    /// The connection is gone: no new engine.
    closed: bool,
    /// The polling window after work (shrinks while polling does not pay).
    poller: Poller,
}

/// The virtio-blk device of one frontend connection.
pub struct BlkBackend {
    disk: Arc<BlockBackend>,
    cfg: BlkConfig,
    features: u64,
    config: Vec<u8>,
    mem: Mutex<Option<Mem>>,
    queues: Vec<Mutex<QueueState>>,
    /// Per queue: an epoll fd holding the engine's io_uring completion eventfd, registered
    /// with the queue's worker thread (an engine is created when the queue starts).
    completions: Vec<Epoll>,
    /// Per queue: asks a worker that is busy-polling the queue to stop (the queue is being
    /// stopped, reset or torn down, and needs the queue's lock the worker holds).
    stop_poll: Vec<AtomicBool>,
    conn: Mutex<Option<ShutdownHandle>>,
    /// The inflight region the frontend keeps (SET_INFLIGHT_FD / GET_INFLIGHT_FD), when it
    /// negotiated INFLIGHT_SHMFD: every queue records in it what it took and completed, and
    /// resumes from it when it starts.
    inflight: Mutex<Option<InflightRegion>>,
    /// The worker threads' exit events (closed with the back-end).
    exit_events: vhost_user::ExitEvents,
    /// Each queue's live counters (the daemon's, across connections).
    counters: Arc<[Arc<BlockCounters>]>,
}

/// Event id of the completion epoll in each worker (above the ids of the queues and the
/// exit event, as vhost-user-backend requires).
fn completion_event(queues: u16) -> u16 {
    queues + 1
}

impl BlkBackend {
    /// A fresh device for one connection.
    pub fn new(disk: Arc<BlockBackend>, cfg: BlkConfig) -> io::Result<Self> {
        let config = block_config_space(&disk, cfg.queues, cfg.queue_size).to_vec();
        let features =
            block_features(&disk, cfg.queues) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let completions = (0..cfg.queues)
            .map(|_| Epoll::new())
            .collect::<io::Result<Vec<_>>>()?;
        Ok(BlkBackend {
            disk,
            cfg,
            features,
            config,
            mem: Mutex::new(None),
            queues: (0..cfg.queues).map(|_| Mutex::default()).collect(),
            completions,
            stop_poll: (0..cfg.queues).map(|_| AtomicBool::new(false)).collect(),
            conn: Mutex::new(None),
            inflight: Mutex::new(None),
            exit_events: Default::default(),
            counters: (0..cfg.queues).map(|_| Arc::default()).collect(),
        })
    }

    /// Counts in `counters` (one per queue; the daemon keeps them across connections).
    pub fn with_counters(mut self, counters: Arc<[Arc<BlockCounters>]>) -> Self {
        if counters.len() == usize::from(self.cfg.queues) {
            self.counters = counters;
        }
        self
    }

    /// Counts an interrupt sent to the guest for queue `q` (`r`: the signal's result).
    fn signaled(&self, q: usize, r: io::Result<()>) -> io::Result<()> {
        if r.is_ok() {
            if let Some(c) = self.counters.get(q) {
                c.interrupt();
            }
        }
        r
    }

    /// The frontend's inflight region for this connection (queues that start afterwards
    /// record in it and resume from it).
    pub fn set_inflight(&self, region: InflightRegion) {
        *lock(&self.inflight) = Some(region);
    }

    fn drop_connection(&self, why: &str) {
        log::warn!("{why}; dropping the connection");
        if let Some(c) = lock(&self.conn).as_ref() {
            c.shutdown();
        }
    }

    /// A queue error: layout errors come from the frontend (drop it); others are guest
    /// faults (the queue stops, as with NEEDS_RESET).
    fn fail(&self, q: usize, st: &mut QueueState, e: QueueError) {
        if !matches!(e, QueueError::NotReady) {
            // Completions are no longer reaped: stop watching their eventfd, or its
            // level-triggered readiness would spin the worker.
            if let (Some(fd), Some(ep)) = (
                st.engine.as_ref().and_then(BlockQueue::completion_fd),
                self.completions.get(q),
            ) {
                let _ = ep.ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
        }
        match e {
            QueueError::NotReady => {}
            QueueError::InvalidLayout { .. } => {
                st.broken = true;
                self.drop_connection(&format!("queue {q}: {e}"));
            }
            _ => {
                st.broken = true;
                log::error!("queue {q}: {e}; the queue stops until the frontend restarts it");
            }
        }
    }

    /// Creates the engine of queue `q` when it starts.
    fn ensure_engine(&self, q: usize, st: &mut QueueState, vring: &Vring) -> bool {
        if st.engine.is_some() {
            return true;
        }
        if st.closed || st.broken {
            return false;
        }
        let Some(mem) = lock(&self.mem).clone() else {
            self.drop_connection(&format!("queue {q}: kicked before SET_MEM_TABLE"));
            st.broken = true;
            return false;
        };
        let size = vring.get_ref().get_queue().size();
        match BlockQueue::new(self.disk.clone(), mem, size) {
            Ok(mut engine) => {
                engine.set_polling(!self.cfg.poll.is_zero());
                if let Some(c) = self.counters.get(q) {
                    engine.set_counters(c.clone());
                }
                if !self.resume(q, &mut engine, vring) {
                    st.broken = true;
                    return false;
                }
                if let Some(fd) = engine.completion_fd() {
                    if let Err(e) = self.completions[q].ctl(
                        ControlOperation::Add,
                        fd,
                        EpollEvent::new(EventSet::IN, 0),
                    ) {
                        log::error!("queue {q}: cannot watch io_uring completions: {e}");
                        st.broken = true;
                        return false;
                    }
                }
                log::debug!(
                    "queue {q}: started, size {size}, engine {:?}",
                    engine.engine()
                );
                st.engine = Some(engine);
                st.vring = Some(vring.clone());
                st.poller = Poller::new(self.cfg.poll);
                true
            }
            Err(e) => {
                st.broken = true;
                self.drop_connection(&format!("queue {q}: {e}"));
                false
            }
        }
    }

    /// With an inflight region: executes again what an earlier back-end took from queue `q`
    /// and never completed, then signals the guest once (completions the earlier back-end
    /// published just before it died may not have been signalled). False: the queue
    /// cannot go on.
    fn resume(&self, q: usize, engine: &mut BlockQueue<Mem>, vring: &Vring) -> bool {
        let Some(part) = lock(&self.inflight)
            .as_ref()
            .and_then(|r| r.queue(u16::try_from(q).ok()?))
        else {
            return true;
        };
        engine.set_inflight(part);
        let mut state = vring.get_mut();
        match engine.resume_inflight(state.get_queue_mut()) {
            Ok(r) if r.fresh => true,
            Ok(r) => {
                log::info!(
                    "queue {q}: resumed from the inflight region: {} request(s) taken by the \
                     previous back-end and not completed are executed again{}",
                    r.resubmitted,
                    if r.finished_last_batch {
                        " (one more had completed just before it stopped)"
                    } else {
                        ""
                    }
                );
                if let Err(e) = self.signaled(q, state.signal_used_queue()) {
                    log::warn!("queue {q}: cannot signal the call eventfd: {e}");
                }
                true
            }
            Err(e) => {
                log::error!("queue {q}: cannot resume from the inflight region: {e}");
                false
            }
        }
    }

    /// Kick or completion on queue `q`, then the optional polling window.
    fn work(&self, q: usize, vring: &Vring, kick: bool) {
        if self
            .stop_poll
            .get(q)
            .is_some_and(|s| s.load(Ordering::Acquire))
        {
            // The queue is being stopped (`stop_queue`, or GET_VRING_BASE on its way):
            // leave its locks to that. A guest that keeps the queue busy (the engine says
            // 'more', the queue is kicked again) would otherwise win them back each time on
            // a busy host, and the frontend's reset would miss its deadline.
            return;
        }
        let mut st = lock(&self.queues[q]);
        let st = &mut *st;
        if kick && !self.ensure_engine(q, st, vring) {
            return;
        }
        if st.broken || st.closed {
            return;
        }
        if kick {
            st.poller.kicked();
        }
        let Some(engine) = st.engine.as_mut() else {
            return;
        };
        let mut state = vring.get_mut();
        let r = if kick {
            engine.process_queue(state.get_queue_mut())
        } else {
            engine.process_completions(state.get_queue_mut())
        };
        let (notify, more) = match r {
            Ok(o) => (o.notify, o.more),
            Err(e) => {
                drop(state);
                self.fail(q, st, e);
                return;
            }
        };
        if notify {
            if let Err(e) = self.signaled(q, state.signal_used_queue()) {
                log::warn!("queue {q}: cannot signal the call eventfd: {e}");
            }
        }
        if more {
            // The engine stopped at its budget with chains left: come back through the
            // worker's event loop (which also sees the exit event and vring changes)
            // instead of serving on here.
            backends::vhost_user::rekick(&state);
            return;
        }
        if !st.poller.enabled() {
            return;
        }
        // Busy-poll the available ring and the io_uring completions (guest notifications
        // off) until the queue was idle for the poller's window; then re-arm notifications and look at
        // the ring once more before sleeping.
        let stop = &self.stop_poll[q];
        loop {
            let mut idle = false;
            let end = busy_poll(
                st.poller.window(),
                || stop.load(Ordering::Acquire),
                || {
                    Ok(match engine.poll_round(state.get_queue_mut())? {
                        Some(o) => {
                            if o.notify {
                                let _ = self.signaled(q, state.signal_used_queue());
                            }
                            true
                        }
                        None => {
                            // I/O punted to an io_uring worker needs a CPU: on a small host it may be
                            // this one, which the polling would keep for the whole window.
                            if engine.in_flight() > 0 {
                                std::thread::yield_now();
                            }
                            false
                        }
                    })
                },
            )
            .and_then(|end| {
                // Stopped too: a restarted queue must not find doorbells turned off.
                let more = engine.rearm(state.get_queue_mut())?;
                idle = end == PollEnd::Idle && !more;
                if end == PollEnd::Stopped || !more {
                    return Ok(None);
                }
                engine
                    .poll_round(state.get_queue_mut())
                    .map(|o| Some(o.unwrap_or_default()))
            });
            if idle {
                st.poller.went_idle();
            }
            match end {
                Ok(None) => return,
                Ok(Some(o)) => {
                    if o.notify {
                        let _ = self.signaled(q, state.signal_used_queue());
                    }
                }
                Err(e) => {
                    drop(state);
                    self.fail(q, st, e);
                    return;
                }
            }
        }
    }

    /// Finishes in-flight requests of queue `q` and drops its engine.
    fn stop_queue(&self, q: usize, closing: bool) {
        let (Some(m), Some(stop)) = (self.queues.get(q), self.stop_poll.get(q)) else {
            return;
        };
        stop.store(true, Ordering::Release);
        let mut st = lock(m);
        stop.store(false, Ordering::Release);
        if closing {
            st.closed = true;
        }
        st.broken = false;
        if let (Some(mut engine), Some(vring)) = (st.engine.take(), st.vring.take()) {
            let in_flight = engine.in_flight();
            let mut state = vring.get_mut();
            match engine.drain(state.get_queue_mut()) {
                // Also when the connection is closing (SIGTERM, frontend gone): the call fd
                // is the guest's interrupt, and what the drain completed must be seen.
                Ok(o) if o.notify || (closing && o.used > 0) => {
                    let _ = self.signaled(q, state.signal_used_queue());
                }
                Ok(_) => {}
                Err(e) => log::warn!("queue {q}: draining {in_flight} requests: {e}"),
            }
            if in_flight > 0 {
                log::debug!("queue {q}: drained {in_flight} in-flight requests");
            }
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.cfg.queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.cfg.queue_size)
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, _enabled: bool) {
        // vhost-user-backend sets EVENT_IDX on every vring (`set_queue_event_idx`) when the
        // feature is acked; the engines then compute notifications with it.
    }

    fn reset_device(&self) {
        for q in 0..self.queues.len() {
            self.stop_queue(q, false);
        }
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        vhost_user::config_window(&self.config, offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // No writable field is offered (no CONFIG_WCE): ignore, as a device would.
        log::debug!("ignoring SET_CONFIG at {offset} ({} bytes)", buf.len());
        Ok(())
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        // The atomic handle is the one the vrings and engines already share: engines see
        // the new table on their next call; in-flight requests keep their snapshot.
        // The relay checked every region against its fd before the table got here
        // (backends::vhost_user::memory).
        *lock(&self.mem) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.cfg.queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exit_events.create()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        self.stop_queue(queue_index as usize, false);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if confine::worker_event(device_event) {
            return Ok(());
        }
        // One queue per thread: thread `q` serves queue `q`, which is `vrings[0]`.
        let (q, Some(vring)) = (thread_id, vrings.first()) else {
            return Ok(());
        };
        if q >= self.queues.len() {
            return Ok(());
        }
        if device_event == 0 {
            // vhost-user-backend took the kick eventfd's count before calling (it also
            // calls once when a ring it saw a kick for is enabled: counted alike).
            if let Some(c) = self.counters.get(q) {
                c.kick();
            }
            self.work(q, vring, true);
        } else if device_event == completion_event(self.cfg.queues) {
            self.work(q, vring, false);
        }
        // Errors are handled (logged, queue stopped or connection dropped): returning one
        // would kill the worker thread for good.
        Ok(())
    }
}

impl Served for BlkBackend {
    fn attach(&self, handlers: &[Arc<Handler<Self>>]) -> io::Result<()> {
        for (q, h) in handlers.iter().enumerate() {
            if let Some(ep) = self.completions.get(q) {
                h.register_listener(
                    ep.as_raw_fd(),
                    EventSet::IN,
                    u64::from(completion_event(self.cfg.queues)),
                )?;
            }
        }
        Ok(())
    }

    fn set_connection(&self, conn: ShutdownHandle) {
        *lock(&self.conn) = Some(conn);
    }

    fn keeps_inflight(&self) -> bool {
        true
    }

    fn set_inflight(&self, region: InflightRegion) {
        BlkBackend::set_inflight(self, region);
    }

    fn stopping_vring(&self, index: u32) {
        // Cleared by `stop_queue` once it holds the queue (vhost-user-backend calls
        // `stop_vring` for the GET_VRING_BASE), or when the connection ends.
        if let Some(s) = self.stop_poll.get(index as usize) {
            s.store(true, Ordering::Release);
        }
    }

    fn teardown(&self) {
        for q in 0..self.queues.len() {
            self.stop_queue(q, true);
        }
        if let Err(e) = self.disk.flush() {
            log::warn!("flush after disconnect: {e}");
        }
        *lock(&self.mem) = None;
        *lock(&self.inflight) = None;
    }
}
