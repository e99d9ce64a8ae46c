//! Landlock: after its set-up, a daemon may open only the few paths it still needs (its
//! image or tap, its socket directory, the stats socket's directory, the relay's private
//! directory). Files opened before stay usable: Landlock checks opens, not open fds.
//!
//! Best effort: the ruleset asks for what Landlock ABI 6 can restrict (every file system
//! access right up to truncate and device ioctls, abstract unix sockets and signals scoped
//! to the sandbox); an older kernel enforces what it knows ([`Enforcement::Partial`]), a
//! kernel without Landlock nothing ([`Enforcement::None`]; the caller logs one info line).

use std::path::{Path, PathBuf};

use ::landlock::{
    Access as _, AccessFs, BitFlags, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, Scope, ABI,
};
use thiserror::Error;

/// The Landlock ABI whose access rights the ruleset handles.
const ABI_WANTED: ABI = ABI::V6;

/// What a daemon may still do beneath a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Open this file for reading.
    ReadFile,
    /// Open this file for reading and writing.
    ReadWriteFile,
    /// A socket directory: create and remove sockets in it (a stale socket replaced, ours
    /// removed at exit). No file in it can be read or written.
    SocketDir,
    /// A directory where private directories with a socket in them are created and removed
    /// (the relay's, under the temporary directory). No file in it can be read or written.
    PrivateDirs,
    /// A device node (or a directory of them, as /dev/vfio): open it for reading and
    /// writing and use its ioctls (Landlock ABI 5 checks device ioctls on files opened
    /// after the restriction).
    Device,
    /// Read files beneath (and list directories).
    Read,
    /// Read and write files beneath, use a block device's ioctls, and create or remove
    /// files and sockets in the directories beneath.
    ReadWrite,
}

impl Access {
    fn rights(self) -> BitFlags<AccessFs> {
        match self {
            Access::ReadFile => AccessFs::ReadFile.into(),
            Access::ReadWriteFile => AccessFs::ReadFile | AccessFs::WriteFile,
            Access::SocketDir => AccessFs::MakeSock | AccessFs::RemoveFile,
            Access::PrivateDirs => {
                AccessFs::MakeDir | AccessFs::RemoveDir | AccessFs::MakeSock | AccessFs::RemoveFile
            }
            Access::Device => AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::IoctlDev,
            Access::Read => AccessFs::ReadFile | AccessFs::ReadDir,
            Access::ReadWrite => {
                AccessFs::ReadFile
                    | AccessFs::ReadDir
                    | AccessFs::WriteFile
                    | AccessFs::Truncate
                    | AccessFs::IoctlDev
                    | AccessFs::MakeReg
                    | AccessFs::MakeSock
                    | AccessFs::RemoveFile
            }
        }
    }
}

/// One path and what may be done beneath it.
#[derive(Clone, Debug)]
pub struct Grant {
    /// The file or directory.
    pub path: PathBuf,
    /// What may be done.
    pub access: Access,
}

impl Grant {
    /// A grant.
    pub fn new(path: impl Into<PathBuf>, access: Access) -> Grant {
        Grant {
            path: path.into(),
            access,
        }
    }
}

/// How much of the ruleset the kernel enforces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enforcement {
    /// Everything asked for.
    Full,
    /// What the kernel's Landlock ABI knows (an older kernel).
    Partial,
    /// Nothing: the kernel has no Landlock (or it is disabled).
    None,
}

/// Errors of the Landlock set-up.
#[derive(Debug, Error)]
pub enum LandlockError {
    /// A path to grant cannot be opened.
    #[error("Landlock: cannot open '{0}' to allow it (it must exist and be reachable by the daemon's user at start)")]
    Path(PathBuf, #[source] ::landlock::PathFdError),
    /// The ruleset could not be built or enforced.
    #[error("Landlock: cannot restrict the daemon: {0} (run with --landlock off to go without)")]
    Ruleset(#[from] ::landlock::RulesetError),
}

/// A ruleset with its paths open, not enforced yet: made while the daemon can still open
/// them (before `--user`), enforced after.
pub struct Prepared(::landlock::RulesetCreated);

/// Opens `grants` into a ruleset (see [`Prepared::enforce`]).
pub fn prepare(grants: &[Grant]) -> Result<Prepared, LandlockError> {
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(ABI_WANTED))?
        .scope(Scope::from_all(ABI_WANTED))?
        .create()?;
    for g in grants {
        let fd = PathFd::new(&g.path).map_err(|e| LandlockError::Path(g.path.clone(), e))?;
        // A file takes only the rights that apply to files (the kernel refuses a rule on
        // a file that names directory rights).
        let mut rights = g.access.rights();
        if !g.path.is_dir() {
            rights &= AccessFs::from_file(ABI_WANTED);
        }
        ruleset = ruleset.add_rule(PathBeneath::new(fd, rights))?;
    }
    Ok(Prepared(ruleset))
}

impl Prepared {
    /// Restricts the calling thread, and every thread it creates afterwards (a thread
    /// created before keeps its access: call while the process has no other thread).
    /// Sets no_new_privs.
    pub fn enforce(self) -> Result<Enforcement, LandlockError> {
        let status = self.0.restrict_self()?;
        Ok(match status.ruleset {
            RulesetStatus::FullyEnforced => Enforcement::Full,
            RulesetStatus::PartiallyEnforced => Enforcement::Partial,
            RulesetStatus::NotEnforced => Enforcement::None,
        })
    }
}

/// [`prepare`] and [`Prepared::enforce`] at once.
pub fn restrict(grants: &[Grant]) -> Result<Enforcement, LandlockError> {
    prepare(grants)?.enforce()
}

/// Whether this kernel has Landlock enabled (its ABI version, 0 if not).
pub fn kernel_abi() -> i64 {
    // SAFETY: landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION) only
    // returns the ABI version (or an error); it reads no memory.
    let r = unsafe { libc::syscall(libc::SYS_landlock_create_ruleset, 0usize, 0usize, 1u32) };
    r.max(0)
}

/// The directory a socket path lives in (`.` for a bare name).
pub fn socket_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
