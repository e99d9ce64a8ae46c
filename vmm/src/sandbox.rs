//! The vmm's sandbox: a seccomp filter per thread kind and Landlock, on by default
//! (`--seccomp on|log|off`, `--landlock on|off`, `--landlock-rules`), built on
//! `backends::sandbox` (the daemons' filters, SIGSYS report and Landlock).
//!
//! The order, in [`start`] and [`crate::vm::Vm::run`]:
//!
//! 1. [`start`], on the main thread while it is the only thread, once the command line is
//!    checked: the serial and exit-stats files are opened, the SIGSYS handler installed,
//!    and Landlock enforced with every path the command line names and the host paths the
//!    vmm always needs ([`grants`]). Every thread created afterwards inherits it. The VM is
//!    then built under Landlock: boot opens the same paths a hot-add would.
//! 2. Each thread the vmm starts installs its own kind's filter first, after its set-up;
//!    each list lives next to the code of its thread:
//!    - `vcpu` ([`crate::vcpu::VCPU`]): KVM_RUN and what the devices emulated on a vCPU
//!      exit do (a driver's DRIVER_OK starts the device's queue threads from the vCPU
//!      thread, so its filter also lets through what they need: filters stack),
//!    - `blk-queue` ([`crate::virtio::blk::BLK_QUEUE`]), `net-queue`
//!      ([`crate::virtio::net::NET_QUEUE`]),
//!    - `vhost-user` and `vhost-user-watchdog` ([`crate::virtio::vhost_user::VHOST_USER`],
//!      [`crate::virtio::vhost_user::VHOST_USER_WATCHDOG`]),
//!    - `vfio-dma-map` ([`crate::vfio::VFIO_DMA_MAP`]),
//!    - `signals` ([`crate::signals::SIGNALS`]), `serial-in`
//!      ([`crate::devices::serial::SERIAL_IN`]), `watchdog` ([`crate::watchdog::WATCHDOG`]),
//!    - `api` ([`crate::api::API`]: the API thread, tiny_http's threads it starts, and the
//!      request threads).
//! 3. The main thread (`control`, [`crate::vm::CONTROL`]) installs its own last, once every
//!    thread of the boot runs, joined with the lists of the threads a hot-add starts from it
//!    (vhost-user, vfio-dma-map); only then do the vCPU threads enter the guest.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, OnceLock};

use backends::sandbox::landlock::{self as ll, Access, Enforcement, Grant};
use backends::sandbox::{self, allow, allow_if, Rule, SeccompMode, Switch};

use crate::config::{SerialMode, VmConfig};

pub use backends::sandbox::{Kind, ThreadKind};

/// `--landlock-rules path=PATH,access=r|rw`: a path hotplug will need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LandlockRule {
    pub path: PathBuf,
    /// Read and write (`rw`), or read only (`r`).
    pub write: bool,
}

impl LandlockRule {
    pub fn parse(value: &str) -> Result<Self, String> {
        let bad = |why: String| format!("invalid --landlock-rules '{value}': {why}");
        let mut path = None;
        let mut write = None;
        for part in value.split(',').filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                Some(("path", p)) if !p.is_empty() => path = Some(PathBuf::from(p)),
                Some(("access", "r")) => write = Some(false),
                Some(("access", "rw")) => write = Some(true),
                Some(("access", a)) => return Err(bad(format!("access={a}: expected r or rw"))),
                _ => return Err(bad(format!("'{part}' is not path=PATH or access=r|rw"))),
            }
        }
        let path = path.ok_or_else(|| bad("path= is required".into()))?;
        let write = write.ok_or_else(|| bad("access=r or access=rw is required".into()))?;
        Ok(LandlockRule { path, write })
    }

    /// As `--landlock-rules` takes it.
    pub fn spec(&self) -> String {
        format!(
            "path={},access={}",
            self.path.display(),
            if self.write { "rw" } else { "r" }
        )
    }
}

/// The sandbox options, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxConfig {
    pub seccomp: SeccompMode,
    pub landlock: Switch,
    pub rules: Vec<LandlockRule>,
    /// `--sandbox-selftest` (a test hook).
    pub selftest: Option<Selftest>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            seccomp: SeccompMode::On,
            landlock: Switch::On,
            rules: Vec::new(),
            selftest: None,
        }
    }
}

/// `--sandbox-selftest`: what the first block queue thread to serve a request attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selftest {
    /// getpgid(2), in no thread's list.
    Syscall,
    /// Open this path for reading.
    Open(PathBuf),
}

impl Selftest {
    pub fn parse(v: &str) -> Result<Self, String> {
        match v {
            "syscall" => Ok(Selftest::Syscall),
            s => match s.strip_prefix("open:") {
                Some(p) if !p.is_empty() => Ok(Selftest::Open(PathBuf::from(p))),
                _ => Err(format!(
                    "invalid --sandbox-selftest '{v}': expected syscall or open:PATH"
                )),
            },
        }
    }
}

/// The pending selftest (taken by the first queue thread that serves a request).
static SELFTEST: Mutex<Option<Selftest>> = Mutex::new(None);

/// What Landlock lets the vmm open (set by [`start`] when Landlock is enforced).
static GRANTED: OnceLock<Vec<Grant>> = OnceLock::new();

/// Files the vmm opens before Landlock, whose paths it may not open afterwards.
#[derive(Default)]
pub struct Opened {
    /// `--serial file=PATH`.
    pub serial: Option<File>,
    /// `--exit-stats PATH`: created now, written (truncated first) at exit.
    pub exit_stats: Option<File>,
    /// The sandbox's state in one line, logged once the VM is built (a configuration
    /// error is still the first line the user sees).
    pub summary: String,
}

/// Errors of the sandbox set-up.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Seccomp(#[from] sandbox::SandboxError),
    #[error(transparent)]
    Landlock(#[from] ll::LandlockError),
    #[error("cannot create the serial output file '{0}'")]
    SerialFile(PathBuf, #[source] std::io::Error),
    #[error("cannot create the exit stats file '{0}'")]
    ExitStats(PathBuf, #[source] std::io::Error),
}

/// Host paths the vmm may need whatever its command line says, when they exist: KVM, the
/// tun device (taps), VFIO's nodes and the sysfs and procfs files its host checks read.
pub const HOST_PATHS: &[(&str, Access)] = &[
    ("/dev/kvm", Access::Device),
    ("/dev/net/tun", Access::Device),
    ("/dev/vfio", Access::Device),
    ("/sys/bus/pci", Access::Read),
    ("/sys/devices", Access::Read),
    ("/sys/kernel/iommu_groups", Access::Read),
    ("/sys/class/iommu", Access::Read),
    ("/sys/module/vfio_iommu_type1", Access::Read),
    ("/sys/kernel/mm/transparent_hugepage", Access::Read),
    ("/proc/cpuinfo", Access::Read),
    ("/proc/self/status", Access::Read),
];

/// What the vmm may open once Landlock is on: the paths of its command line and
/// `--landlock-rules`, and [`HOST_PATHS`]. A path that does not exist is left out (its
/// open fails as it would anyway).
pub fn grants(cfg: &VmConfig) -> Vec<Grant> {
    let mut g = Vec::new();
    for (p, a) in HOST_PATHS {
        g.push(Grant::new(*p, *a));
    }
    g.push(Grant::new(&cfg.kernel, Access::Read));
    if let Some(i) = &cfg.initramfs {
        g.push(Grant::new(i, Access::Read));
    }
    for d in &cfg.disks {
        let a = if d.readonly {
            Access::Read
        } else {
            Access::ReadWrite
        };
        g.push(Grant::new(&d.path, a));
    }
    for v in cfg.vhost_user.iter().filter(|v| v.server) {
        // The listening socket is created (a stale one replaced) and removed at exit.
        g.push(Grant::new(ll::socket_dir(&v.socket), Access::SocketDir));
    }
    if let Some(crate::api::ApiSocket::Path(p)) = &cfg.api_socket {
        g.push(Grant::new(ll::socket_dir(p), Access::SocketDir));
    }
    for r in &cfg.sandbox.rules {
        let a = if r.write {
            Access::ReadWrite
        } else {
            Access::Read
        };
        g.push(Grant::new(&r.path, a));
    }
    g.retain(|g| g.path.exists());
    g
}

/// Step 1 of the module doc. Call on the main thread while it is the only thread.
pub fn start(cfg: &VmConfig) -> Result<Opened, SandboxError> {
    let s = &cfg.sandbox;
    let mut opened = Opened::default();
    if let SerialMode::File(p) = &cfg.serial {
        opened.serial = Some(File::create(p).map_err(|e| SandboxError::SerialFile(p.clone(), e))?);
    }
    if let Some(p) = &cfg.exit_stats {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(p)
            .map_err(|e| SandboxError::ExitStats(p.clone(), e))?;
        opened.exit_stats = Some(f);
    }
    *lock(&SELFTEST) = s.selftest.clone();
    sandbox::prepare_libc();
    sandbox::init("vmm", s.seccomp)?;
    if s.landlock == Switch::On {
        let grants = grants(cfg);
        let landlock = match ll::restrict(&grants)? {
            Enforcement::Full => "on".to_string(),
            Enforcement::Partial => format!(
                "on, partly (this kernel's Landlock ABI {} knows fewer rights)",
                ll::kernel_abi()
            ),
            Enforcement::None => "not available in this kernel (needs Linux 5.13 with \
                 CONFIG_SECURITY_LANDLOCK and landlock in lsm=): the vmm can open any file \
                 its user can"
                .to_string(),
        };
        if landlock.starts_with("on") {
            let _ = GRANTED.set(grants);
        }
        opened.summary = format!("sandbox: seccomp {}, landlock {landlock}", s.seccomp);
    } else {
        opened.summary = format!("sandbox: seccomp {}, landlock off", s.seccomp);
    }
    Ok(opened)
}

/// When Landlock is enforced and `path` is beneath none of its rules: the one-line reason
/// an open of it failed, with the fix (None: Landlock is not why).
pub fn landlock_denial(path: &Path, write: bool) -> Option<String> {
    let granted = GRANTED.get()?;
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let canon = abs.canonicalize().unwrap_or_else(|_| abs.clone());
    let covered = granted.iter().any(|g| {
        let gp = g.path.canonicalize().unwrap_or_else(|_| g.path.clone());
        let ok = match g.access {
            Access::ReadWrite | Access::Device => true,
            Access::Read | Access::ReadFile => !write,
            Access::ReadWriteFile => true,
            Access::SocketDir | Access::PrivateDirs => false,
        };
        ok && canon.starts_with(&gp)
    });
    (!covered).then(|| {
        format!(
            "the vmm's sandbox (Landlock) does not allow '{}': it may open only the paths of \
             its command line; start the vmm with --landlock-rules path={},access={} (or a \
             directory above it) to hot-add it",
            path.display(),
            abs.display(),
            if write { "rw" } else { "r" }
        )
    })
}

/// Installs `kind`'s filter on the calling thread (and names it for the SIGSYS report); a
/// failure is logged, the thread keeps the filter it inherited.
pub fn enter(kind: impl Into<Kind>) {
    if let Err(e) = sandbox::enter(kind) {
        log::error!("{e}");
    }
}

/// Starts a thread that installs `kind`'s filter first and then runs `f`; returns once the
/// filter is on, so that a thread of the boot is never seen unconfined once the main thread
/// confined itself.
pub fn spawn<F, T>(
    builder: std::thread::Builder,
    kind: impl Into<Kind>,
    f: F,
) -> std::io::Result<std::thread::JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let kind = kind.into();
    let (tx, rx) = std::sync::mpsc::channel();
    let h = builder.spawn(move || {
        enter(kind);
        let _ = tx.send(());
        f()
    })?;
    let _ = rx.recv();
    Ok(h)
}

/// As [`enter`], returning the failure.
pub fn try_enter(kind: impl Into<Kind>) -> Result<(), sandbox::SandboxError> {
    sandbox::enter(kind)
}

/// The pending `--sandbox-selftest`, run once by the first block queue thread that serves
/// a request: the attempt and its result on stderr.
pub fn selftest_once() {
    let Some(t) = lock(&SELFTEST).take() else {
        return;
    };
    match t {
        Selftest::Syscall => {
            // SAFETY: getpgid(0) only returns the caller's process group.
            let r = unsafe { libc::syscall(libc::SYS_getpgid, 0) };
            eprintln!("sandbox selftest: getpgid(0) returned {r}");
        }
        Selftest::Open(p) => match File::open(&p) {
            Ok(_) => eprintln!("sandbox selftest: open '{}': opened", p.display()),
            Err(e) => eprintln!("sandbox selftest: open '{}': {e}", p.display()),
        },
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where the vCPU threads wait, their filter installed, until the main thread installed
/// its own (step 3): no guest instruction runs before every boot thread is confined.
#[derive(Default)]
pub struct StartGate {
    open: Mutex<bool>,
    cv: Condvar,
}

impl StartGate {
    pub fn open(&self) {
        *lock(&self.open) = true;
        self.cv.notify_all();
    }

    pub fn wait(&self) {
        let g = lock(&self.open);
        let _g = self
            .cv
            .wait_while(g, |open| !*open)
            .unwrap_or_else(|p| p.into_inner());
    }
}

// ioctl request numbers (asm-generic/ioctl.h), for the lists that allow ioctl by request.
const IOC_NONE: u64 = 0;
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

const fn ioc(dir: u64, ty: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (ty << 8) | nr
}
/// `_IO(ty, nr)`.
pub const fn io(ty: u64, nr: u64) -> u64 {
    ioc(IOC_NONE, ty, nr, 0)
}
/// `_IOW(ty, nr, T)`.
pub const fn iow<T>(ty: u64, nr: u64) -> u64 {
    ioc(IOC_WRITE, ty, nr, std::mem::size_of::<T>())
}
/// `_IOR(ty, nr, T)`.
pub const fn ior<T>(ty: u64, nr: u64) -> u64 {
    ioc(IOC_READ, ty, nr, std::mem::size_of::<T>())
}
/// `_IOWR(ty, nr, T)`.
pub const fn iowr<T>(ty: u64, nr: u64) -> u64 {
    ioc(IOC_READ | IOC_WRITE, ty, nr, std::mem::size_of::<T>())
}

/// KVM's ioctl type.
pub const KVMIO: u64 = 0xae;
/// VFIO's ioctl type (`;`); its requests are `_IO(VFIO_TYPE, VFIO_BASE + n)`.
pub const VFIO_TYPE: u64 = b';' as u64;
/// VFIO_BASE.
pub const VFIO_BASE: u64 = 100;

/// What a thread that starts threads needs for them: the clone, the new thread's stack
/// and start-up (run under the spawner's filter until the new thread installs its own),
/// and joining them.
pub const SPAWN_SYSCALLS: &[Rule] = &[
    allow(libc::SYS_clone3),
    allow(libc::SYS_clone),
    allow(libc::SYS_mmap),
    allow(libc::SYS_mprotect),
    allow(libc::SYS_munmap),
    allow(libc::SYS_madvise),
    allow(libc::SYS_rt_sigprocmask),
    allow(libc::SYS_sigaltstack),
    allow(libc::SYS_set_robust_list),
    allow(libc::SYS_rseq),
    allow(libc::SYS_sched_getaffinity),
    allow(libc::SYS_getrandom),
    allow(libc::SYS_futex),
    allow_if(libc::SYS_prctl, &[(0, libc::PR_SET_NAME as u64)]),
    allow_if(libc::SYS_prctl, &[(0, libc::PR_SET_NO_NEW_PRIVS as u64)]),
    allow_if(
        libc::SYS_seccomp,
        &[(0, libc::SECCOMP_SET_MODE_FILTER as u64)],
    ),
];

/// What every thread kind here needs: allocating (malloc's arenas grow and shrink), locks
/// and condition variables, timed sleeps, the log's writes to stderr, and a thread's exit
/// (its stack and guard page unmapped, its signal stack dropped).
/// Found, with the lists of each kind, by running the tests under `--seccomp log`.
pub const COMMON_SYSCALLS: &[Rule] = &[
    allow(libc::SYS_futex),
    allow(libc::SYS_mmap),
    allow(libc::SYS_munmap),
    allow(libc::SYS_mprotect),
    allow(libc::SYS_madvise),
    allow(libc::SYS_brk),
    allow(libc::SYS_sigaltstack),
    allow(libc::SYS_rt_sigprocmask),
    allow(libc::SYS_sched_yield),
    allow(libc::SYS_clock_nanosleep),
    allow(libc::SYS_nanosleep),
    allow(libc::SYS_clock_gettime),
    allow_if(libc::SYS_write, &[(0, 2)]),
    // The standard library's check, as a file descriptor is dropped, that it was open.
    allow_if(libc::SYS_fcntl, &[(1, libc::F_GETFD as u64)]),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel() {
        // KVM_RUN = _IO(KVMIO, 0x80), KVM_GET_REGS = _IOR(KVMIO, 0x81, struct kvm_regs).
        assert_eq!(io(KVMIO, 0x80), 0xae80);
        assert_eq!(ior::<kvm_bindings::kvm_regs>(KVMIO, 0x81), 0x8090_ae81);
        // KVM_IRQFD = _IOW(KVMIO, 0x76, struct kvm_irqfd).
        assert_eq!(iow::<kvm_bindings::kvm_irqfd>(KVMIO, 0x76), 0x4020_ae76);
        // VFIO_DEVICE_SET_IRQS = _IO(';', 110).
        assert_eq!(io(VFIO_TYPE, VFIO_BASE + 10), 0x3b6e);
    }

    #[test]
    fn landlock_rules_parse() {
        let r = LandlockRule::parse("path=/srv/img,access=rw").unwrap();
        assert_eq!(r.path, PathBuf::from("/srv/img"));
        assert!(r.write);
        assert_eq!(r.spec(), "path=/srv/img,access=rw");
        assert!(!LandlockRule::parse("access=r,path=/x").unwrap().write);
        for bad in ["path=/x", "access=r", "path=/x,access=w", "x=1", ""] {
            let e = LandlockRule::parse(bad).unwrap_err();
            assert!(e.starts_with("invalid --landlock-rules"), "{e}");
        }
        assert_eq!(Selftest::parse("syscall"), Ok(Selftest::Syscall));
        assert!(Selftest::parse("open:").is_err());
    }

    #[test]
    fn every_kind_compiles() {
        for k in [
            crate::vcpu::VCPU.with(&[crate::virtio::blk::BLK_QUEUE, crate::virtio::net::NET_QUEUE]),
            crate::vm::CONTROL.with(&[
                crate::virtio::vhost_user::VHOST_USER,
                crate::virtio::vhost_user::VHOST_USER_WATCHDOG,
                crate::vfio::VFIO_DMA_MAP,
            ]),
            crate::api::API.into(),
            crate::signals::SIGNALS.into(),
            crate::devices::serial::SERIAL_IN.into(),
            crate::watchdog::WATCHDOG.into(),
        ] {
            assert!(sandbox::compile(&k, SeccompMode::On).unwrap().is_some());
        }
    }
}
