//! The daemons' sandbox: when each thread gets its seccomp filter, what the daemon may still
//! open (Landlock), and `--user`. The order, in [`Confinement::apply`] and its callers:
//!
//! 1. On the main thread, while it is the only thread (SIGTERM/SIGINT are already blocked,
//!    [`super::block_signals`]): the image or tap, the listening socket, the stats socket and
//!    the relay's private socket are open; `--user` drops root (uids, gids and capabilities
//!    are per thread, so before any other thread exists); Landlock restricts the thread,
//!    and so every thread created afterwards.
//! 2. The signal thread and the stats thread start and each installs its filter first
//!    ([`SIGNALS_SYSCALLS`], [`super::stats::STATS_SYSCALLS`]); the main thread waits for
//!    them.
//! 3. The main thread installs the connection filter ([`CONNECTION_SYSCALLS`]) joined with
//!    the vring workers' list: it spawns them (and the vhost-user message thread and the
//!    relay, which keep the connection filter), and a spawned thread keeps its parent's
//!    filter under its own. Then it accepts the first frontend.
//! 4. For each connection, the serving layer wakes every vring worker once before the
//!    connection is accepted ([`WORKER_SETUP_EVENT`]); the worker installs its own list (kept
//!    next to the worker's code, in each daemon) in [`worker_event`], and the serving layer
//!    waits for that.

use std::path::PathBuf;
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;

use crate::sandbox::landlock::{self as ll, Enforcement, Grant};
use crate::sandbox::user::{self, User};
use crate::sandbox::{self, allow, allow_if, Rule, SeccompMode, Switch, ThreadKind};

/// The sandbox options both daemons take.
#[derive(Debug, Clone, clap::Args)]
pub struct SandboxArgs {
    /// Seccomp filters per thread (vring workers, connection, signals, stats): on (a
    /// syscall outside a thread's list kills the daemon, after one line on stderr naming
    /// the thread and the syscall), log (that line once per thread kind and syscall, and
    /// the syscall runs: to find what a new workload needs), off.
    #[arg(long, value_name = "on|log|off", default_value = "on")]
    pub seccomp: SeccompMode,
    /// Landlock (when the kernel has it): after set-up the daemon may open nothing but its
    /// image or tap and create sockets only in its socket directories. Without Landlock in
    /// the kernel the daemon says so in one line and goes on.
    #[arg(long, value_name = "on|off", default_value = "on")]
    pub landlock: Switch,
    /// Started as root: once the image/tap and sockets are open, become this user (NAME,
    /// UID, NAME:GID or UID:GID; supplementary groups cleared, capabilities dropped
    /// including the bounding set, no new privileges). The socket directory should belong
    /// to that user, so that the daemon can remove its socket at exit.
    #[arg(long, value_name = "NAME|UID[:GID]")]
    pub user: Option<User>,
    /// Test hook, not for use: `syscall` makes a vring worker call getpgid(2), outside its
    /// seccomp list, on its first request; `open:PATH` makes it open PATH. The worker
    /// prints the result on stderr. It exists so that the daemons' tests can prove, with
    /// the real binary, that a worker thread is confined (killed or reported by seccomp,
    /// EACCES from Landlock). It is harmless: it only attempts, from inside the sandbox,
    /// what the sandbox forbids, and opens nothing the daemon's own user could not.
    #[arg(long, value_name = "syscall|open:PATH", hide = true)]
    pub sandbox_selftest: Option<String>,
}

impl SandboxArgs {
    /// What can be refused before the daemon opens anything: `--user` when not root, a
    /// malformed `--sandbox-selftest`.
    pub fn check(&self) -> Result<(), ConfineError> {
        if let Some(u) = &self.user {
            if !user::is_root() {
                return Err(user::UserError::NotRoot {
                    spec: u.spec.clone(),
                    // SAFETY: geteuid has no failure and touches no memory.
                    euid: unsafe { libc::geteuid() },
                }
                .into());
            }
        }
        if let Some(t) = &self.sandbox_selftest {
            parse_selftest(t)?;
        }
        Ok(())
    }
}

fn parse_selftest(t: &str) -> Result<Selftest, ConfineError> {
    match t {
        "syscall" => Ok(Selftest::Syscall),
        s => match s.strip_prefix("open:") {
            Some(p) if !p.is_empty() => Ok(Selftest::Open(PathBuf::from(p))),
            _ => Err(ConfineError::Selftest(t.into())),
        },
    }
}

/// Errors of the daemons' sandbox set-up.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// Seccomp.
    #[error(transparent)]
    Seccomp(#[from] sandbox::SandboxError),
    /// `--user`.
    #[error(transparent)]
    User(#[from] user::UserError),
    /// Landlock.
    #[error(transparent)]
    Landlock(#[from] ll::LandlockError),
    /// The relay's private directory could not be given to `--user`.
    #[error("--user: cannot give '{0}' (the relay's private socket) to the user")]
    Chown(PathBuf, #[source] std::io::Error),
    /// `--sandbox-selftest`.
    #[error("--sandbox-selftest {0}: expected syscall or open:PATH")]
    Selftest(String),
    /// A thread did not confirm its filter.
    #[error("the {0} thread did not start (check the log above)")]
    Thread(&'static str),
}

/// The main thread, the vhost-user message thread and the relay: accepting, the relay's
/// copying, the vhost-user messages (memory tables mapped, eventfds, the inflight region),
/// spawning the connection's threads, and the teardown (the image flushed, sockets removed).
pub const CONNECTION_SYSCALLS: &[Rule] = &[
    allow(libc::SYS_accept4),
    allow(libc::SYS_poll),
    allow(libc::SYS_ppoll),
    allow(libc::SYS_read),
    allow(libc::SYS_write),
    allow(libc::SYS_recvmsg),
    allow(libc::SYS_sendmsg),
    allow(libc::SYS_recvfrom),
    allow(libc::SYS_sendto),
    allow(libc::SYS_socket),
    allow(libc::SYS_connect),
    allow(libc::SYS_shutdown),
    allow(libc::SYS_getsockopt),
    allow(libc::SYS_close),
    allow(libc::SYS_fcntl),
    allow(libc::SYS_fstat),
    allow(libc::SYS_newfstatat),
    allow(libc::SYS_statx),
    allow(libc::SYS_mmap),
    allow(libc::SYS_munmap),
    allow(libc::SYS_mprotect),
    allow(libc::SYS_madvise),
    allow(libc::SYS_brk),
    allow(libc::SYS_futex),
    allow(libc::SYS_clone3),
    allow(libc::SYS_clone),
    allow(libc::SYS_rt_sigprocmask),
    allow(libc::SYS_sigaltstack),
    allow(libc::SYS_set_robust_list),
    allow(libc::SYS_rseq),
    allow(libc::SYS_sched_getaffinity),
    allow(libc::SYS_getrandom),
    allow_if(libc::SYS_prctl, &[(0, libc::PR_SET_NAME as u64)]),
    // The threads it spawns install their own filters (narrower: filters only add up).
    allow_if(libc::SYS_prctl, &[(0, libc::PR_SET_NO_NEW_PRIVS as u64)]),
    allow_if(
        libc::SYS_seccomp,
        &[(0, libc::SECCOMP_SET_MODE_FILTER as u64)],
    ),
    allow(libc::SYS_epoll_create1),
    allow(libc::SYS_epoll_ctl),
    allow(libc::SYS_eventfd2),
    allow(libc::SYS_memfd_create),
    allow(libc::SYS_ftruncate),
    allow(libc::SYS_unlink),
    allow(libc::SYS_rmdir),
    allow(libc::SYS_mkdir),
    allow(libc::SYS_bind),
    allow(libc::SYS_listen),
    allow(libc::SYS_clock_nanosleep),
    allow(libc::SYS_nanosleep),
];

/// The signal thread: sigwait, then the stop request (an eventfd write, the connection's
/// socket shut down) and its log line.
pub const SIGNALS_SYSCALLS: &[Rule] = &[
    allow(libc::SYS_rt_sigtimedwait),
    allow(libc::SYS_write),
    allow(libc::SYS_shutdown),
    allow(libc::SYS_futex),
];

/// The connection kind.
pub const CONNECTION: ThreadKind = ThreadKind {
    name: "connection",
    syscalls: &[CONNECTION_SYSCALLS],
};

/// The signal thread's kind.
pub const SIGNALS: ThreadKind = ThreadKind {
    name: "signals",
    syscalls: &[SIGNALS_SYSCALLS],
};

/// Device event id of the per-connection wake-up that makes each vring worker install its
/// filter before the frontend's first message. Above every queue id and exit event id.
pub const WORKER_SETUP_EVENT: u16 = u16::MAX;

/// The vring workers' kind (set once by [`Confinement::apply`]).
static WORKER: OnceLock<ThreadKind> = OnceLock::new();

/// How many workers installed their filter since the serving layer last asked.
static INSTALLED: (Mutex<usize>, Condvar) = (Mutex::new(0), Condvar::new());

thread_local! {
    static WORKER_READY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The pending `--sandbox-selftest`.
static SELFTEST: Mutex<Option<Selftest>> = Mutex::new(None);

#[derive(Debug, Clone)]
enum Selftest {
    Syscall,
    Open(PathBuf),
}

/// Called first by a daemon's `handle_event` on a vring worker: installs the worker's
/// filter on the thread's first event (the serving layer's wake-up, before the
/// connection's first message), and runs a pending `--sandbox-selftest` on its first
/// request. True: the event was the wake-up, nothing else to do.
pub fn worker_event(device_event: u16) -> bool {
    if !WORKER_READY.with(|r| r.get()) {
        WORKER_READY.with(|r| r.set(true));
        if let Some(kind) = WORKER.get() {
            if let Err(e) = sandbox::enter(*kind) {
                // The thread keeps the connection filter it inherited.
                log::error!("{e}");
            }
        }
        let (m, cv) = &INSTALLED;
        *super::lock(m) += 1;
        cv.notify_all();
    }
    if device_event == WORKER_SETUP_EVENT {
        return true;
    }
    let test = super::lock(&SELFTEST).take();
    if let Some(t) = test {
        run_selftest(&t);
    }
    false
}

fn run_selftest(t: &Selftest) {
    match t {
        Selftest::Syscall => {
            // SAFETY: getpgid(0) only returns the caller's process group.
            let r = unsafe { libc::syscall(libc::SYS_getpgid, 0) };
            eprintln!("sandbox selftest: getpgid(0) returned {r}");
        }
        Selftest::Open(p) => match std::fs::File::open(p) {
            Ok(_) => eprintln!("sandbox selftest: open '{}': opened", p.display()),
            Err(e) => eprintln!("sandbox selftest: open '{}': {e}", p.display()),
        },
    }
}

/// Resets the count of workers that installed their filter (before a connection's
/// workers are woken).
pub(super) fn reset_installed() {
    *super::lock(&INSTALLED.0) = 0;
}

/// Waits until `n` workers installed their filter (false: not within the deadline).
pub(super) fn wait_installed(n: usize) -> bool {
    let (m, cv) = &INSTALLED;
    let g = super::lock(m);
    let (g, _) = cv
        .wait_timeout_while(g, Duration::from_secs(5), |c| *c < n)
        .unwrap_or_else(|e| e.into_inner());
    *g >= n
}

/// Whether vring workers get a filter of their own (seccomp on or log).
pub(super) fn workers_confined() -> bool {
    WORKER.get().is_some() && sandbox::mode() != SeccompMode::Off
}

/// The set-up a daemon hands to [`Confinement::apply`].
pub struct Confinement<'a> {
    /// The program name ("vhost-user-blk") the reports start with.
    pub program: &'static str,
    /// The options.
    pub args: &'a SandboxArgs,
    /// What the daemon may still open or create.
    pub grants: Vec<Grant>,
    /// The vring workers' kind.
    pub worker: ThreadKind,
    /// What `--user` must own: the relay's private directory and socket (made by root,
    /// used by the daemon after it changed user).
    pub user_owned: Vec<PathBuf>,
}

impl<'a> Confinement<'a> {
    /// A daemon's confinement: `device` (its image or the tun device) and what every daemon
    /// needs besides: its listening socket's directory (a socket made, or removed at exit),
    /// the stats socket's, and the relay's private directory, owned by `--user`.
    pub fn for_daemon(
        program: &'static str,
        args: &'a SandboxArgs,
        device: Grant,
        source: &super::SocketSource,
        stats: Option<&std::path::Path>,
        relay: &super::RelaySocket,
        worker: ThreadKind,
    ) -> Self {
        let mut grants = vec![device];
        if let super::SocketSource::Path(p) = source {
            grants.push(Grant::new(ll::socket_dir(p), ll::Access::SocketDir));
        }
        if let Some(s) = stats {
            grants.push(Grant::new(ll::socket_dir(s), ll::Access::SocketDir));
        }
        if let Some(tmp) = relay.dir().parent() {
            grants.push(Grant::new(tmp, ll::Access::PrivateDirs));
        }
        Confinement {
            program,
            args,
            grants,
            worker,
            user_owned: vec![relay.dir().to_path_buf(), relay.path().to_path_buf()],
        }
    }
}

impl Confinement<'_> {
    /// Steps 1 of the module doc: `--user`, Landlock, and the seccomp mode (SIGSYS
    /// handler). Call on the main thread while it is the only one.
    pub fn apply(self) -> Result<(), ConfineError> {
        let a = self.args;
        if let Some(t) = &a.sandbox_selftest {
            *super::lock(&SELFTEST) = Some(parse_selftest(t)?);
        }
        sandbox::prepare_libc();
        sandbox::init(self.program, a.seccomp)?;
        let _ = WORKER.set(self.worker);
        // The paths are opened now, while the daemon still can (a socket directory may be
        // closed to --user), and the ruleset enforced after the user changed.
        let ruleset = match a.landlock {
            Switch::On => Some(ll::prepare(&self.grants)?),
            Switch::Off => None,
        };
        if let Some(u) = &a.user {
            for p in &self.user_owned {
                std::os::unix::fs::chown(p, Some(u.uid), Some(u.gid))
                    .map_err(|e| ConfineError::Chown(p.clone(), e))?;
            }
            user::drop_to(u)?;
            log::info!("running as uid {} gid {} (--user {})", u.uid, u.gid, u.spec);
        }
        if let Some(ruleset) = ruleset {
            match ruleset.enforce()? {
                Enforcement::Full => log::info!("landlock: on"),
                Enforcement::Partial => log::info!(
                    "landlock: on, partly (this kernel's Landlock ABI {} knows fewer rights)",
                    ll::kernel_abi()
                ),
                Enforcement::None => log::info!(
                    "landlock: not available in this kernel (needs Linux 5.13 with \
                     CONFIG_SECURITY_LANDLOCK and landlock in lsm=): the daemon can open any \
                     file its user can"
                ),
            }
        }
        log::info!("seccomp: {}", a.seccomp);
        Ok(())
    }
}

/// Step 3 of the module doc: the main thread's filter (the connection list joined with
/// the workers'), installed just before it accepts the first frontend.
pub fn enter_connection() -> Result<(), ConfineError> {
    let worker = WORKER.get().copied();
    let kind = CONNECTION.with(worker.as_slice());
    sandbox::enter(kind)?;
    Ok(())
}

/// Spawns a thread that installs `kind`'s filter first, then runs `f`; returns once the
/// filter is installed (or failed).
pub fn spawn_confined<F>(
    name: &str,
    kind: ThreadKind,
    f: F,
) -> Result<std::thread::JoinHandle<()>, ConfineError>
where
    F: FnOnce() + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let r = sandbox::enter(kind);
            let ok = r.is_ok();
            let _ = tx.send(r);
            if ok {
                f();
            }
        })
        .map_err(|_| ConfineError::Thread(kind.name))?;
    match rx.recv() {
        Ok(r) => r?,
        Err(_) => return Err(ConfineError::Thread(kind.name)),
    }
    Ok(h)
}
