//! Confinement of a process that parses guest-controlled data: seccomp filters per thread
//! kind, a SIGSYS report, Landlock, and dropping privileges. Generic: the caller names its
//! thread kinds and gives each its syscall list; the lists live next to the threads they
//! describe (a change to a thread and to its list is one review), as in Cloud Hypervisor's
//! `seccomp_filters.rs` files.
//!
//! - [`SeccompMode`]: `on` (a syscall outside the thread's list kills the process), `log`
//!   (it is reported once and runs), `off`.
//! - [`ThreadKind`] + [`Rule`]: a thread kind's name and its allowed syscalls;
//!   [`enter`] installs the kind's filter on the calling thread (after its set-up, before
//!   it handles anything from outside). Filters are inherited by the threads a thread
//!   spawns afterwards, and they stack (a syscall must pass every filter on the thread):
//!   a thread that spawns others must allow what they need, which [`ThreadKind::with`]
//!   expresses.
//! - [`sigsys`]: the SIGSYS handler that prints the one-line report (thread, syscall) and,
//!   in `log` mode, runs the syscall on the thread's behalf.
//! - [`landlock`]: best-effort Landlock ruleset for the files a daemon may still open.
//! - [`user`]: `--user NAME|UID[:GID]`: groups, gid, uid, capabilities, no_new_privs.
//!
//! Only x86_64 is supported by the SIGSYS handler (register layout, syscall trampoline):
//! elsewhere `--seccomp on|log` is refused with a clear error.

pub mod landlock;
#[cfg(target_arch = "x86_64")]
pub mod sigsys;
pub mod user;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};
use thiserror::Error;

/// What a syscall outside a thread's list does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeccompMode {
    /// The process is killed (after the one-line report).
    On,
    /// The report is printed (once per thread kind and syscall) and the syscall runs.
    Log,
    /// No seccomp filter.
    Off,
}

impl FromStr for SeccompMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(SeccompMode::On),
            "log" => Ok(SeccompMode::Log),
            "off" => Ok(SeccompMode::Off),
            _ => Err(format!(
                "'{s}': expected on (a syscall outside a thread's list kills the process), \
                 log (it is reported and runs) or off"
            )),
        }
    }
}

impl fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SeccompMode::On => "on",
            SeccompMode::Log => "log",
            SeccompMode::Off => "off",
        })
    }
}

/// `on` or `off` (`--landlock`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Switch {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

impl FromStr for Switch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(Switch::On),
            "off" => Ok(Switch::Off),
            _ => Err(format!("'{s}': expected on or off")),
        }
    }
}

/// One allowed syscall, optionally only with some arguments equal to given values (each
/// compared as a 32-bit value, all of them must match).
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    /// The syscall number.
    pub nr: i64,
    /// (argument index, value) pairs that must all hold; empty: any arguments.
    pub args: &'static [(u8, u64)],
}

/// A syscall allowed with any arguments.
pub const fn allow(nr: libc::c_long) -> Rule {
    Rule { nr, args: &[] }
}

/// A syscall allowed only when every (argument index, value) pair holds.
pub const fn allow_if(nr: libc::c_long, args: &'static [(u8, u64)]) -> Rule {
    Rule { nr, args }
}

/// A kind of thread and what it may call.
#[derive(Clone, Copy, Debug)]
pub struct ThreadKind {
    /// The name the SIGSYS report gives the thread ("vring-worker").
    pub name: &'static str,
    /// Its own syscalls.
    pub syscalls: &'static [&'static [Rule]],
}

impl ThreadKind {
    /// This kind, allowing also what the kinds of the threads it spawns need (they inherit
    /// its filter, and a syscall must pass every filter on a thread).
    pub fn with(self, spawned: &[ThreadKind]) -> Kind {
        Kind {
            name: self.name,
            lists: std::iter::once(self.syscalls)
                .chain(spawned.iter().map(|k| k.syscalls))
                .flat_map(|l| l.iter().copied())
                .collect(),
        }
    }
}

/// A thread kind with its syscall lists merged (see [`ThreadKind::with`]).
#[derive(Clone, Debug)]
pub struct Kind {
    name: &'static str,
    lists: Vec<&'static [Rule]>,
}

impl From<ThreadKind> for Kind {
    fn from(k: ThreadKind) -> Kind {
        k.with(&[])
    }
}

/// What every thread needs whatever it does: the SIGSYS handler's own calls (its report,
/// and in `on` mode the kill: SIGSYS back to its default action and sent to the thread),
/// returning from a signal handler (and the kernel's restart of a syscall a signal
/// interrupted), leaving, and reading the clocks: the vDSO answers those without a syscall
/// only when the clocksource allows it; on others (a VM's `hpet` or `acpi_pm`, as in the
/// lab's L1 under TCG) every `Instant::now()` is a real clock_gettime, and a thread that
/// may not make it dies at its first timestamp.
pub const HANDLER_SYSCALLS: &[Rule] = &[
    allow(libc::SYS_clock_gettime),
    allow(libc::SYS_clock_getres),
    allow(libc::SYS_gettimeofday),
    allow(libc::SYS_time),
    allow_if(libc::SYS_write, &[(0, 2)]),
    allow(libc::SYS_gettid),
    allow(libc::SYS_getpid),
    allow_if(libc::SYS_prctl, &[(0, libc::PR_GET_NAME as u64)]),
    allow_if(libc::SYS_rt_sigaction, &[(0, libc::SIGSYS as u64)]),
    allow_if(libc::SYS_tgkill, &[(2, libc::SIGSYS as u64)]),
    allow(libc::SYS_rt_sigreturn),
    allow(libc::SYS_restart_syscall),
    allow(libc::SYS_exit),
    allow(libc::SYS_exit_group),
];

/// Errors of the sandbox set-up.
#[derive(Debug, Error)]
pub enum SandboxError {
    /// The filter could not be compiled.
    #[error("cannot build the seccomp filter of the '{kind}' threads: {why}")]
    Build {
        /// The thread kind.
        kind: &'static str,
        /// seccompiler's error.
        why: String,
    },
    /// The kernel refused the filter.
    #[error(
        "cannot install the seccomp filter of the '{kind}' threads: {why} (the kernel needs \
         CONFIG_SECCOMP_FILTER; run with --seccomp off to go without)"
    )]
    Install {
        /// The thread kind.
        kind: &'static str,
        /// seccompiler's error.
        why: String,
    },
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler that reports denied syscalls")]
    Handler(#[source] std::io::Error),
    /// `on`/`log` on an architecture the handler does not know.
    #[error("--seccomp on|log is only implemented on x86_64: run with --seccomp off")]
    Unsupported,
}

static MODE: AtomicU8 = AtomicU8::new(MODE_UNSET);
const MODE_UNSET: u8 = 0;
const MODE_ON: u8 = 1;
const MODE_LOG: u8 = 2;
const MODE_OFF: u8 = 3;

/// The most thread kinds one process names (the report's once-per-kind table).
pub const MAX_KINDS: usize = 16;

thread_local! {
    /// The kind of the calling thread, once [`enter`] ran on it: (name, slot in the
    /// report's table). Const-initialised and without destructor, so reading it in the
    /// SIGSYS handler allocates nothing and takes no lock.
    static THREAD_KIND: Cell<(&'static str, usize)> = const { Cell::new(("", 0)) };
}

/// The kind names seen so far (slot = index + 1; slot 0 is "no kind").
static KINDS: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());

/// The calling thread's kind ("" before [`enter`]) and its slot.
pub(crate) fn thread_kind() -> (&'static str, usize) {
    THREAD_KIND.with(|k| k.get())
}

fn kind_slot(name: &'static str) -> usize {
    let mut kinds = KINDS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(i) = kinds.iter().position(|k| *k == name) {
        return i + 1;
    }
    if kinds.len() + 1 >= MAX_KINDS {
        return 0;
    }
    kinds.push(name);
    kinds.len()
}

/// Makes the C library do now, before any filter or Landlock, what it would otherwise do
/// lazily from whichever thread first needs it, and which no thread's list allows:
/// glibc's malloc opens /sys/devices/system/cpu/online when a thread first needs an arena
/// beyond the first few (to size the arena limit), and /proc/sys/vm/overcommit_memory the
/// first time it shrinks a thread's heap. Setting the arena limit (glibc's own default:
/// 8 per CPU) and a trim threshold no heap of the daemons reaches (their buffers are
/// bounded by the queue sizes; large blocks are mmapped and returned anyway) removes both.
pub fn prepare_libc() {
    #[cfg(target_env = "gnu")]
    {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let arenas = i32::try_from(8 * cpus).unwrap_or(i32::MAX);
        // SAFETY: mallopt only sets malloc parameters; called before the other threads.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        }
    }
}

/// The process's seccomp mode, once [`init`] ran.
pub fn mode() -> SeccompMode {
    match MODE.load(Ordering::Acquire) {
        MODE_ON => SeccompMode::On,
        MODE_LOG => SeccompMode::Log,
        _ => SeccompMode::Off,
    }
}

/// Sets the process's mode and, unless `off`, installs the SIGSYS handler that reports a
/// denied syscall as one line starting with `program` ("vhost-user-blk"). Call once, on
/// the main thread, before [`enter`].
pub fn init(program: &'static str, m: SeccompMode) -> Result<(), SandboxError> {
    let v = match m {
        SeccompMode::On => MODE_ON,
        SeccompMode::Log => MODE_LOG,
        SeccompMode::Off => MODE_OFF,
    };
    if m != SeccompMode::Off {
        #[cfg(target_arch = "x86_64")]
        sigsys::install(program).map_err(SandboxError::Handler)?;
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = program;
            return Err(SandboxError::Unsupported);
        }
    }
    MODE.store(v, Ordering::Release);
    Ok(())
}

/// Compiles the filter of `kind` for `mode` (None for `off`): every listed syscall is
/// allowed, any other raises SIGSYS (SECCOMP_RET_TRAP), which the handler turns into the
/// report and then a kill (`on`) or the syscall's result (`log`).
pub fn compile(kind: &Kind, mode: SeccompMode) -> Result<Option<BpfProgram>, SandboxError> {
    if mode == SeccompMode::Off {
        return Ok(None);
    }
    let err = |why: String| SandboxError::Build {
        kind: kind.name,
        why,
    };
    // A syscall with an unconditional rule anywhere is allowed whatever its arguments:
    // seccompiler's empty rule list. Otherwise the conditional rules are alternatives.
    let mut rules: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
    for r in kind
        .lists
        .iter()
        .flat_map(|l| l.iter())
        .chain(HANDLER_SYSCALLS)
    {
        let entry = rules.entry(r.nr).or_insert_with(|| Some(Vec::new()));
        if r.args.is_empty() {
            *entry = None;
            continue;
        }
        if let Some(list) = entry {
            let conds = r
                .args
                .iter()
                .map(|&(i, v)| {
                    SeccompCondition::new(i, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| err(e.to_string()))?;
            list.push(SeccompRule::new(conds).map_err(|e| err(e.to_string()))?);
        }
    }
    let rules = rules
        .into_iter()
        .map(|(nr, r)| (nr, r.unwrap_or_default()))
        .collect();
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| err(e.to_string()))?;
    let filter = SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, arch)
        .map_err(|e| err(e.to_string()))?;
    let mut prog: BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| err(e.to_string()))?;
    #[cfg(target_arch = "x86_64")]
    if mode == SeccompMode::Log {
        prog = sigsys::trampoline_prefix()
            .into_iter()
            .chain(prog)
            .collect();
    }
    Ok(Some(prog))
}

/// Confines the calling thread to `kind`: records the kind (for the SIGSYS report) and,
/// unless the mode is `off`, installs its filter (which also sets no_new_privs on the
/// thread). Every thread this one spawns afterwards inherits the filter.
pub fn enter(kind: impl Into<Kind>) -> Result<(), SandboxError> {
    let kind = kind.into();
    let slot = kind_slot(kind.name);
    THREAD_KIND.with(|k| k.set((kind.name, slot)));
    let Some(prog) = compile(&kind, mode())? else {
        return Ok(());
    };
    seccompiler::apply_filter(&prog).map_err(|e| SandboxError::Install {
        kind: kind.name,
        why: e.to_string(),
    })
}

/// Names the calling thread's kind for the SIGSYS report without a filter of its own (a
/// thread confined by the filter it inherited).
pub fn name_thread(name: &'static str) {
    let slot = kind_slot(name);
    THREAD_KIND.with(|k| k.set((name, slot)));
}

#[cfg(test)]
mod tests;
