//! `vhost-user-net`: a vhost-user virtio-net back-end on a tap, running the `backends` net
//! engine (the same as the VMM's in-VMM virtio-net device).
//!
//! - [`Args`]: the command line.
//! - [`NetBackend`]: one device instance for one frontend connection. Queues are
//!   rx0, tx0, rx1, tx1, ..., then the control queue; one worker thread per queue pair (the
//!   control queue on the first), each also woken by its tap fd.
//! - [`run`]: opens the tap (created when missing) and the socket, then serves frontends one
//!   after another with fresh device state until SIGTERM/SIGINT.
//!
//! `--poll-us N`: after work, the pair's thread keeps polling its TX ring and the tap for N
//! microseconds before going back to sleep, with TX doorbells off meanwhile
//! (`backends::poll`, the loop the vmm's devices run too).
//!
//! Sandbox (`backends::vhost_user::confine`): once everything is open, `--user`, Landlock,
//! and a seccomp filter per thread kind; [`WORKER_SYSCALLS`] is the vring workers' list,
//! kept here beside the code they run.

use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backends::net::{
    net_config_space, net_features, CtrlQueue, NetCounters, NetOptions, NetQueuePair, RxWait, Tap,
};
use backends::poll::{busy_poll, PollEnd, Poller};
use backends::sandbox::landlock::{Access, Grant};
use backends::sandbox::{allow, allow_if, Rule, ThreadKind};
use backends::vhost_user::confine::{self, ConfineError, Confinement, SandboxArgs};
use backends::vhost_user::stats::StatsSocket;
use backends::QueueError;
use clap::Parser;
use serde::Serialize;
use thiserror::Error;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VringT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use backends::vhost_user::{self, lock, Handler, Served};
pub use backends::vhost_user::{Mem, ServeError, SocketSource, Stop, Vring};

/// The largest queue size virtio's split ring allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// The most queue pairs (2 * 31 + 1 queues fit the worker masks).
pub const MAX_QUEUE_PAIRS: u16 = 31;

/// Command line of `vhost-user-net`.
#[derive(Debug, Parser)]
#[command(
    name = "vhost-user-net",
    version,
    about = "vhost-user virtio-net back-end: connects a VMM's virtio-net device (QEMU \
             -netdev vhost-user, Cloud Hypervisor, our vmm) to a tap over a unix socket",
    long_about = None,
    after_help = "The daemon serves one frontend at a time; when it disconnects or dies, the \
                  socket and the tap stay and the next frontend gets a fresh device. \
                  SIGTERM/SIGINT remove the socket and exit 0. Logs go to stderr \
                  (RUST_LOG=debug for more). With --fd and a socket already connected to a frontend, the \
                  daemon serves that one connection and exits 0 when it ends. Our vmm takes the \
                  back-end at start (--vhost-user-net socket=PATH) or while its guest runs \
                  (vmm-remote --api-socket API add-net vhost_user=on,socket=PATH; \
                  remove-device to give it back).\n\n\
                  Sandbox (on by default): once the image or tap and the sockets are open, \
                  each thread gets a seccomp filter of the syscalls it makes (--seccomp), \
                  Landlock limits what can still be opened (--landlock), and a daemon \
                  started as root can become --user; io_uring rings accept only the \
                  engine's operations on the image. A syscall outside a thread's list prints \
                  one line naming the thread and the syscall. A systemd unit with \
                  hardening options: vhost-user-net/vhost-user-net@.service in the source tree."
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
    pub fd: Option<i32>,
    /// Client mode, instead of --socket-path or --fd: connect to a frontend listening on
    /// this unix socket (QEMU's and our vmm's `server=on`); when the connection ends, connect
    /// again (every 150 ms until it listens) and serve the next one, until SIGTERM/SIGINT.
    #[arg(long, value_name = "PATH")]
    pub connect: Option<PathBuf>,
    /// Tap interface (created when missing; needs CAP_NET_ADMIN).
    #[arg(
        long,
        value_name = "NAME",
        required_unless_present = "print_capabilities"
    )]
    pub tap: Option<String>,
    /// The guest's MAC address.
    #[arg(long, value_name = "MAC", default_value = "52:54:00:12:34:56")]
    pub mac: String,
    /// Queue pairs (1-31); the tap is opened multiqueue when more than one.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub queues: u16,
    /// Largest queue size the frontend may choose (power of two, 2-32768).
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub queue_size: u16,
    /// After work, keep polling the TX ring and the tap for N microseconds before sleeping.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub poll_us: u64,
    /// Publish the per-queue counters (frames and bytes, drops, notifications,
    /// interrupts, TX latency histogram; kept across frontends) on this unix socket: read
    /// them with `curl --unix-socket PATH http://localhost/stats`, or give the vmm
    /// `stats=PATH` with the NIC and read them in its `vm.counters`.
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
    kind: "net",
    features: &[],
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
    /// The tap could not be opened.
    #[error("{0}")]
    Tap(String),
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

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(mac)
}

/// Runs the daemon until SIGTERM/SIGINT.
pub fn run(args: Args) -> Result<(), Error> {
    if args.print_capabilities {
        let json = serde_json::to_string_pretty(&CAPABILITIES).map_err(Error::Capabilities)?;
        println!("{json}");
        return Ok(());
    }
    if args.queues == 0 || args.queues > MAX_QUEUE_PAIRS {
        return Err(Error::Usage(format!(
            "--queues {}: expected 1 to {MAX_QUEUE_PAIRS} queue pairs",
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
    let Some(mac) = parse_mac(&args.mac) else {
        return Err(Error::Usage(format!(
            "--mac {}: expected six hex bytes like 52:54:00:12:34:56",
            args.mac
        )));
    };
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
    let Some(tap_name) = args.tap.clone() else {
        return Err(Error::Usage("--tap NAME is required".into()));
    };
    args.sandbox.check()?;
    let stop = Stop::new().map_err(ServeError::Setup)?;
    let signals = vhost_user::block_signals().map_err(ServeError::Setup)?;
    let taps = Tap::open_queues(&tap_name, args.queues).map_err(|e| {
        use std::error::Error as _;
        let cause = e.source().map(|s| format!(": {s}")).unwrap_or_default();
        Error::Tap(format!(
            "{e}{cause} (needs root or CAP_NET_ADMIN and /dev/net/tun; an existing \
             interface must be a tap{})",
            if args.queues > 1 {
                " created with multi_queue"
            } else {
                ""
            }
        ))
    })?;
    let taps: Vec<Arc<Tap>> = taps.into_iter().map(Arc::new).collect();
    let mut listener = vhost_user::open_listener(&source)?;
    log::info!(
        "serving tap '{}' on {}, {} queue pair(s) of up to {}",
        taps[0].name(),
        source,
        args.queues,
        args.queue_size
    );
    let opts = NetOptions {
        mac,
        queue_pairs: args.queues,
        mtu: None,
    };
    let stats = args
        .stats_socket
        .as_deref()
        .map(StatsSocket::bind)
        .transpose()?;
    let relay = vhost_user::RelaySocket::new().map_err(ServeError::Internal)?;
    // The sandbox (backends::vhost_user::confine): the tap queues are open and stay
    // usable; from here on the daemon may open only the tun device again and make or
    // remove sockets in its directories.
    Confinement::for_daemon(
        "vhost-user-net",
        &args.sandbox,
        Grant::new(TUN_DEVICE, Access::ReadWriteFile),
        &source,
        stats.as_ref().map(StatsSocket::path),
        &relay,
        WORKER,
    )
    .apply()?;
    signals.spawn(stop.clone())?;
    let counters: Arc<[Arc<NetCounters>]> = taps.iter().map(|_| Arc::default()).collect();
    let c = counters.clone();
    let _stats = stats
        .map(|s| s.serve(Arc::new(move || stats_json(&c))))
        .transpose()?;
    confine::enter_connection()?;
    vhost_user::serve_prepared("vhost-user-net", &mut listener, &stop, relay, || {
        NetBackend::new(taps.clone(), opts.clone(), args.queue_size, poll)
            .map(|b| b.with_counters(counters.clone()))
    })?;
    log::info!("stopped");
    Ok(())
}

/// The tun device the tap queues come from.
const TUN_DEVICE: &str = "/dev/net/tun";

/// The tap ioctls the daemon makes once it serves: offloads and the vnet header size
/// (from the negotiated features), and attaching or detaching multiqueue queues.
const TAP_IOCTLS: &[Rule] = &[
    allow_if(libc::SYS_ioctl, &[(1, libc::TUNSETOFFLOAD)]),
    allow_if(libc::SYS_ioctl, &[(1, libc::TUNSETVNETHDRSZ)]),
    allow_if(libc::SYS_ioctl, &[(1, libc::TUNSETQUEUE)]),
    allow_if(libc::SYS_ioctl, &[(1, libc::TUNGETIFF)]),
];

/// What a queue pair's worker (its kicks, the tap's readiness, the busy-poll window) may
/// call: waiting on its epoll, eventfds, reading and writing frames on the tap, the tap
/// ioctls, and a thread's exit. Found by running the daemon's tests under `--seccomp log`.
pub const WORKER_SYSCALLS: &[Rule] = &[
    allow(libc::SYS_epoll_wait),
    allow(libc::SYS_epoll_pwait),
    allow(libc::SYS_epoll_ctl),
    allow(libc::SYS_read),
    allow(libc::SYS_readv),
    allow(libc::SYS_write),
    allow(libc::SYS_writev),
    allow(libc::SYS_close),
    allow(libc::SYS_mmap),
    allow(libc::SYS_munmap),
    allow(libc::SYS_madvise),
    allow(libc::SYS_mprotect),
    allow(libc::SYS_brk),
    allow(libc::SYS_getrandom),
    allow(libc::SYS_futex),
    allow(libc::SYS_sched_yield),
    allow(libc::SYS_rt_sigprocmask),
    allow(libc::SYS_sigaltstack),
];

/// The queue pair workers' kind.
pub const WORKER: ThreadKind = ThreadKind {
    name: "vring-worker",
    syscalls: &[WORKER_SYSCALLS, TAP_IOCTLS],
};

/// The stats endpoint's answer: every queue's counters since the daemon started (queue 2k
/// is pair k's RX, 2k+1 its TX).
pub fn stats_json(counters: &[Arc<NetCounters>]) -> serde_json::Value {
    let mut queues = Vec::new();
    for (p, c) in counters.iter().enumerate() {
        queues.push(serde_json::to_value(c.rx_report(2 * p)).unwrap_or_default());
        queues.push(serde_json::to_value(c.tx_report(2 * p + 1)).unwrap_or_default());
    }
    serde_json::json!({ "device": "vhost-user-net", "queues": queues })
}

struct PairState {
    engine: Option<NetQueuePair<Mem, Arc<Tap>>>,
    tap_in: bool,
    tap_out: bool,
    broken: bool,
    closed: bool,
    /// The polling window after work (shrinks while polling does not pay).
    poller: Poller,
}

/// The virtio-net device of one frontend connection.
pub struct NetBackend {
    taps: Vec<Arc<Tap>>,
    opts: NetOptions,
    queue_size: u16,
    poll: Duration,
    features: u64,
    config: Vec<u8>,
    acked: AtomicU64,
    mem: Mutex<Option<Mem>>,
    pairs: Vec<Mutex<PairState>>,
    /// Per pair: an epoll fd holding the tap fd with the interest the engine wants (IN
    /// while RX can take frames, OUT while TX waits for room), registered with the worker.
    tap_epolls: Vec<Epoll>,
    /// Per pair: asks a worker that is busy-polling the pair to stop (the pair is being
    /// stopped or torn down, and needs the pair's lock the worker holds).
    stop_poll: Vec<AtomicBool>,
    ctrl: Mutex<Option<CtrlQueue<Mem>>>,
    /// Which pairs the driver uses: their tap queues stay attached, the others' are
    /// detached (the kernel would steer frames to them that no ring takes).
    in_use: Mutex<PairsInUse>,
    conn: Mutex<Option<ShutdownHandle>>,
    /// The worker threads' exit events (closed with the back-end).
    exit_events: vhost_user::ExitEvents,
    /// Each pair's live counters (the daemon's, across connections).
    counters: Arc<[Arc<NetCounters>]>,
}

/// Which queue pairs the driver uses. A frontend that hands the control queue to this
/// back-end (ours) has it enable every ring of the pairs the device offers and then says on
/// the control queue how many the driver uses (one until it does, and one forever without
/// VIRTIO_NET_F_MQ: the vmm then starts no other pair's rings); a frontend that keeps the
/// control queue itself (QEMU) enables the rings of the pairs the driver uses
/// (SET_VRING_ENABLE) and disables the others.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PairsInUse {
    /// Per pair: its RX ring is enabled.
    rx_enabled: Vec<bool>,
    /// The control queue's ring is enabled: this back-end serves it.
    ctrl_enabled: bool,
    /// Pairs set on the control queue (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET), 1 before.
    ctrl_pairs: usize,
    /// No driver (between frontends): every queue attached, as the tap was.
    idle: bool,
}

impl PairsInUse {
    fn new(pairs: usize) -> Self {
        PairsInUse {
            rx_enabled: vec![false; pairs],
            ctrl_enabled: false,
            ctrl_pairs: 1,
            idle: true,
        }
    }

    /// A reset: no ring enabled, nothing set; pair 0 only until the driver starts again.
    fn reset(&mut self) {
        *self = PairsInUse {
            idle: false,
            ..PairsInUse::new(self.rx_enabled.len())
        };
    }

    /// The frontend is gone: every queue attached.
    fn all(&mut self) {
        *self = PairsInUse::new(self.rx_enabled.len());
    }

    fn used(&self, p: usize) -> bool {
        self.idle
            || p == 0
            || (self.rx_enabled.get(p).copied().unwrap_or(false)
                && (!self.ctrl_enabled || p < self.ctrl_pairs))
    }
}

impl NetBackend {
    /// A fresh device for one connection.
    pub fn new(
        taps: Vec<Arc<Tap>>,
        opts: NetOptions,
        queue_size: u16,
        poll: Duration,
    ) -> io::Result<Self> {
        let pairs = taps.len();
        let mut tap_epolls = Vec::new();
        for t in &taps {
            let ep = Epoll::new()?;
            // No interest until the pair starts: a tap with frames queued is readable for as
            // long as nobody reads it, and would wake the worker in a loop (the guest's
            // driver may start seconds after the frontend connects).
            ep.ctl(
                ControlOperation::Add,
                t.as_raw_fd(),
                EpollEvent::new(EventSet::empty(), 0),
            )?;
            tap_epolls.push(ep);
        }
        let features = net_features(&opts) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        Ok(NetBackend {
            pairs: taps
                .iter()
                .map(|_| {
                    Mutex::new(PairState {
                        engine: None,
                        tap_in: false,
                        tap_out: false,
                        broken: false,
                        closed: false,
                        poller: Poller::default(),
                    })
                })
                .collect(),
            config: net_config_space(&opts).to_vec(),
            taps,
            opts,
            queue_size,
            poll,
            features,
            acked: AtomicU64::new(0),
            mem: Mutex::new(None),
            stop_poll: tap_epolls.iter().map(|_| AtomicBool::new(false)).collect(),
            tap_epolls,
            ctrl: Mutex::new(None),
            in_use: Mutex::new(PairsInUse::new(pairs)),
            conn: Mutex::new(None),
            exit_events: Default::default(),
            counters: (0..pairs).map(|_| Arc::default()).collect(),
        })
    }

    /// Counts in `counters` (one per pair; the daemon keeps them across connections).
    pub fn with_counters(mut self, counters: Arc<[Arc<NetCounters>]>) -> Self {
        if counters.len() == self.taps.len() {
            self.counters = counters;
        }
        self
    }

    fn num_pairs(&self) -> usize {
        self.taps.len()
    }

    fn tap_event(&self) -> u16 {
        (self.num_pairs() * 2 + 2) as u16
    }

    fn drop_connection(&self, why: &str) {
        log::warn!("{why}; dropping the connection");
        if let Some(c) = lock(&self.conn).as_ref() {
            c.shutdown();
        }
    }

    fn fail(&self, what: &str, broken: &mut bool, e: QueueError) {
        match e {
            QueueError::NotReady => {}
            QueueError::InvalidLayout { .. } => {
                *broken = true;
                self.drop_connection(&format!("{what}: {e}"));
            }
            _ => {
                *broken = true;
                log::error!("{what}: {e}; the queue pair stops until the frontend restarts it");
            }
        }
    }

    fn set_interest(&self, p: usize, st: &PairState) {
        let mut ev = EventSet::empty();
        if st.tap_in {
            ev |= EventSet::IN;
        }
        if st.tap_out {
            ev |= EventSet::OUT;
        }
        if let Err(e) = self.tap_epolls[p].ctl(
            ControlOperation::Modify,
            self.taps[p].as_raw_fd(),
            EpollEvent::new(ev, 0),
        ) {
            log::warn!("pair {p}: tap interest: {e}");
        }
    }

    /// One round of RX (if `rx`) and TX (if `tx`) on pair `p`; returns whether work was done.
    fn pair_round(
        &self,
        p: usize,
        st: &mut PairState,
        vrings: &[Vring],
        rx: bool,
        tx: bool,
    ) -> bool {
        let Some(engine) = st.engine.as_mut() else {
            return false;
        };
        let mut did = false;
        let (old_in, old_out) = (st.tap_in, st.tap_out);
        if tx {
            let mut q = vrings[1].get_mut();
            match engine.process_tx(q.get_queue_mut()) {
                Ok(o) => {
                    did |= o.queue.used > 0;
                    st.tap_out = o.tap_full;
                    if o.queue.notify && q.signal_used_queue().is_ok() {
                        if let Some(c) = self.counters.get(p) {
                            c.tx.interrupt();
                        }
                    }
                    if o.queue.more {
                        // The TX budget ran out with chains left: come back through the
                        // worker's event loop.
                        backends::vhost_user::rekick(&q);
                    }
                }
                Err(QueueError::NotReady) => st.tap_out = false,
                Err(e) => {
                    drop(q);
                    self.fail(&format!("pair {p} tx"), &mut st.broken, e);
                    return false;
                }
            }
        }
        if rx {
            let mut q = vrings[0].get_mut();
            match engine.process_rx(q.get_queue_mut()) {
                Ok(o) => {
                    did |= o.frames > 0;
                    st.tap_in = o.wait != RxWait::GuestBuffers;
                    if o.queue.notify && q.signal_used_queue().is_ok() {
                        if let Some(c) = self.counters.get(p) {
                            c.rx.interrupt();
                        }
                    }
                }
                // Not started yet: stop reading the tap until the RX queue is kicked.
                Err(QueueError::NotReady) => st.tap_in = false,
                Err(e) => {
                    drop(q);
                    self.fail(&format!("pair {p} rx"), &mut st.broken, e);
                    return false;
                }
            }
        }
        if (old_in, old_out) != (st.tap_in, st.tap_out) {
            self.set_interest(p, st);
        }
        did
    }

    fn work(&self, p: usize, vrings: &[Vring], rx: bool, tx: bool) {
        let Some(m) = self.pairs.get(p) else {
            return;
        };
        if vrings.len() < 2 {
            return;
        }
        if self
            .stop_poll
            .get(p)
            .is_some_and(|s| s.load(Ordering::Acquire))
        {
            // A queue of the pair is being stopped (GET_VRING_BASE on its way, `stop_pair`):
            // leave the pair's locks to that. A guest (or a tap flood) that keeps the pair
            // busy would otherwise win them back each time on a busy host, and the
            // frontend's reset would miss its deadline.
            return;
        }
        let mut st = lock(m);
        if st.closed || st.broken {
            // Stop watching the tap, or its level-triggered readiness would spin the thread.
            if st.tap_in || st.tap_out {
                st.tap_in = false;
                st.tap_out = false;
                self.set_interest(p, &st);
            }
            return;
        }
        if st.engine.is_none() {
            let Some(mem) = lock(&self.mem).clone() else {
                // Not started: make sure the tap cannot keep waking this thread.
                if st.tap_in || st.tap_out {
                    st.tap_in = false;
                    st.tap_out = false;
                    self.set_interest(p, &st);
                }
                return;
            };
            let acked = self.acked.load(Ordering::SeqCst);
            if let Err(e) = self.taps[p].set_offloads(acked) {
                log::warn!("pair {p}: {e}");
            }
            let mut engine = NetQueuePair::new(self.taps[p].clone(), mem, acked);
            engine.set_polling(!self.poll.is_zero());
            if let Some(c) = self.counters.get(p) {
                engine.set_counters(c.clone());
            }
            st.engine = Some(engine);
            st.poller = Poller::new(self.poll);
            st.tap_in = true;
            st.tap_out = false;
            self.set_interest(p, &st);
            log::debug!("pair {p}: started");
        }
        if tx {
            st.poller.kicked();
        } else if !rx {
            // The tap woke the pair (a frame for the guest, or room to send).
            st.poller.woken();
        }
        let (do_rx, do_tx) = (rx || st.tap_in, tx || st.tap_out);
        self.pair_round(p, &mut st, vrings, do_rx, do_tx);
        if !st.poller.enabled() {
            return;
        }
        // Busy-poll the TX ring and (while RX can take frames) the tap, TX doorbells off,
        // until both were idle for the poller's window; then re-arm TX notifications and look at the ring
        // once more before sleeping.
        let stop = &self.stop_poll[p];
        loop {
            let window = st.poller.window();
            let end = busy_poll(
                window,
                || stop.load(Ordering::Acquire),
                || {
                    if st.broken {
                        return Err(());
                    }
                    let tx = st.engine.as_ref().is_some_and(|e| {
                        e.tx_pending(vrings[1].get_ref().get_queue())
                            .unwrap_or(true)
                    });
                    let rx = st.tap_in;
                    Ok(self.pair_round(p, &mut st, vrings, rx, tx))
                },
            );
            // Stopped too: a restarted queue must not find doorbells turned off.
            let more = match st.engine.as_mut() {
                Some(e) => e.rearm_tx(vrings[1].get_mut().get_queue_mut()),
                None => return,
            };
            match (end, more) {
                (Ok(PollEnd::Idle), Ok(true)) => {
                    self.pair_round(p, &mut st, vrings, false, true);
                }
                (_, Err(e)) if !st.broken => {
                    self.fail(&format!("pair {p} tx"), &mut st.broken, e);
                    return;
                }
                (Ok(PollEnd::Idle), Ok(false)) => {
                    st.poller.went_idle();
                    return;
                }
                _ => return,
            }
        }
    }

    fn work_ctrl(&self, vring: &Vring) {
        let mut ctrl = lock(&self.ctrl);
        if ctrl.is_none() {
            let Some(mem) = lock(&self.mem).clone() else {
                return;
            };
            *ctrl = Some(CtrlQueue::new(mem, self.opts.queue_pairs));
        }
        if let Some(c) = ctrl.as_mut() {
            let mut q = vring.get_mut();
            match c.process(q.get_queue_mut()) {
                Ok(o) => {
                    if o.queue.notify {
                        let _ = q.signal_used_queue();
                    }
                    if o.queue.more {
                        backends::vhost_user::rekick(&q);
                    }
                    if let Some(n) = o.vq_pairs {
                        log::debug!("driver uses {n} queue pairs");
                        self.update_pairs(|u| u.ctrl_pairs = usize::from(n));
                    }
                }
                Err(QueueError::NotReady) => {}
                Err(e) => log::error!("control queue: {e}"),
            }
        }
    }

    /// Changes what is known of the pairs in use (`f`), then attaches the tap queues of the
    /// pairs the driver uses and detaches the others (`backends::net::attach_queues`).
    fn update_pairs(&self, f: impl FnOnce(&mut PairsInUse)) {
        let mut u = lock(&self.in_use);
        f(&mut u);
        if let Err((q, e)) = backends::net::attach_queues(&self.taps, |p| u.used(p)) {
            log::warn!(
                "tap {}: cannot attach or detach queue {q}: {e}",
                self.taps[0].name()
            );
        }
    }

    fn stop_pair(&self, p: usize, closing: bool) {
        if let (Some(m), Some(stop)) = (self.pairs.get(p), self.stop_poll.get(p)) {
            stop.store(true, Ordering::Release);
            let mut st = lock(m);
            stop.store(false, Ordering::Release);
            st.engine = None;
            st.broken = false;
            st.closed |= closing;
            if st.tap_in || st.tap_out {
                st.tap_in = false;
                st.tap_out = false;
                self.set_interest(p, &st);
            }
        }
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.num_pairs() * 2 + 1
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.queue_size)
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::SeqCst);
        // A driver is coming: one pair until it sets more on the control queue (or its
        // frontend enables more rings).
        self.update_pairs(|u| {
            u.idle = false;
            u.ctrl_pairs = 1;
        });
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, _enabled: bool) {
        // vhost-user-backend sets EVENT_IDX on the vrings themselves.
    }

    fn reset_device(&self) {
        for p in 0..self.num_pairs() {
            self.stop_pair(p, false);
        }
        *lock(&self.ctrl) = None;
        self.update_pairs(PairsInUse::reset);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        vhost_user::config_window(&self.config, offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        log::debug!("ignoring SET_CONFIG at {offset} ({} bytes)", buf.len());
        Ok(())
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        // The relay checked every region against its fd before the table got here
        // (backends::vhost_user::memory).
        *lock(&self.mem) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        let n = self.num_pairs();
        (0..n)
            .map(|p| {
                let mut mask = 0b11u64 << (2 * p);
                if p == 0 {
                    mask |= 1u64 << (2 * n);
                }
                mask
            })
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exit_events.create()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let q = queue_index as usize;
        if q < self.num_pairs() * 2 {
            self.stop_pair(q / 2, false);
        } else {
            *lock(&self.ctrl) = None;
        }
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
        let p = thread_id;
        match device_event {
            // vhost-user-backend took the kick eventfd's count before calling (it also
            // calls once when a ring it saw a kick for is enabled: counted alike).
            0 => {
                if let Some(c) = self.counters.get(p) {
                    c.rx.kick();
                }
                self.work(p, vrings, true, false)
            }
            1 => {
                if let Some(c) = self.counters.get(p) {
                    c.tx.kick();
                }
                self.work(p, vrings, false, true)
            }
            2 if p == 0 => {
                if let Some(v) = vrings.get(2) {
                    self.work_ctrl(v);
                }
            }
            e if e == self.tap_event() => self.work(p, vrings, false, false),
            _ => {}
        }
        // Errors were handled (logged, pair stopped or connection dropped); an error here
        // would end the worker thread for good.
        Ok(())
    }
}

impl Served for NetBackend {
    fn attach(&self, handlers: &[Arc<Handler<Self>>]) -> io::Result<()> {
        for (p, h) in handlers.iter().enumerate() {
            if let Some(ep) = self.tap_epolls.get(p) {
                h.register_listener(ep.as_raw_fd(), EventSet::IN, u64::from(self.tap_event()))?;
            }
        }
        Ok(())
    }

    fn set_connection(&self, conn: ShutdownHandle) {
        *lock(&self.conn) = Some(conn);
    }

    fn vring_enabled(&self, index: u32, enabled: bool) {
        let (i, n) = (index as usize, self.num_pairs());
        if i % 2 == 0 && i < 2 * n {
            self.update_pairs(|u| {
                u.idle = false;
                u.rx_enabled[i / 2] = enabled;
            });
        } else if i == 2 * n {
            self.update_pairs(|u| {
                u.idle = false;
                u.ctrl_enabled = enabled;
            });
        }
    }

    fn stopping_vring(&self, index: u32) {
        // Cleared by `stop_pair` once it holds the pair (vhost-user-backend calls
        // `stop_vring` for the GET_VRING_BASE), or when the connection ends. The control
        // queue has no worker loop to step aside from.
        if let Some(s) = self.stop_poll.get(index as usize / 2) {
            if (index as usize) < self.num_pairs() * 2 {
                s.store(true, Ordering::Release);
            }
        }
    }

    fn teardown(&self) {
        for p in 0..self.num_pairs() {
            self.stop_pair(p, true);
        }
        *lock(&self.ctrl) = None;
        *lock(&self.mem) = None;
        // As the tap was: every queue attached, for the next frontend.
        self.update_pairs(PairsInUse::all);
    }
}

#[cfg(test)]
mod tests {
    use super::PairsInUse;

    fn used(u: &PairsInUse) -> Vec<bool> {
        (0..u.rx_enabled.len()).map(|p| u.used(p)).collect()
    }

    #[test]
    fn pairs_in_use_by_the_control_queue_or_by_enabled_rings() {
        let mut u = PairsInUse::new(3);
        // Between frontends: every queue attached.
        assert_eq!(used(&u), [true, true, true]);
        // Our vmm, a driver with MQ: every ring enabled, the control queue too; one pair
        // until the driver sets more on it.
        u.reset();
        u.rx_enabled = vec![true; 3];
        u.ctrl_enabled = true;
        assert_eq!(used(&u), [true, false, false]);
        u.ctrl_pairs = 2;
        assert_eq!(used(&u), [true, true, false]);
        // Our vmm, a driver without MQ: only pair 0's rings and the control queue start.
        u.reset();
        u.rx_enabled[0] = true;
        u.ctrl_enabled = true;
        assert_eq!(used(&u), [true, false, false]);
        // QEMU keeps the control queue: the rings it enables say which pairs are used.
        u.reset();
        u.rx_enabled = vec![true, true, false];
        assert_eq!(used(&u), [true, true, false]);
        u.rx_enabled[1] = false;
        assert_eq!(used(&u), [true, false, false]);
        // The frontend gone: all again.
        u.all();
        assert_eq!(used(&u), [true, true, true]);
    }
}
