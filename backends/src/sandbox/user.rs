//! `--user NAME|UID[:GID]`: a daemon started as root gives up root once it has opened what
//! it needs. In order, on the main thread before any other thread exists (uids, gids and
//! capabilities are per thread in the kernel): the capability bounding set and the ambient
//! set are emptied (this needs CAP_SETPCAP, so before the uid changes), supplementary
//! groups cleared, then gid and uid set (real, effective and saved), which also empties the
//! permitted and effective capabilities, and no_new_privs is set. Each step is checked
//! afterwards; a daemon that cannot prove it is unprivileged refuses to run.

use std::ffi::CString;
use std::io;
use std::str::FromStr;

use thiserror::Error;

/// A user (and group) to run as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// What was given on the command line.
    pub spec: String,
    /// The uid.
    pub uid: libc::uid_t,
    /// The gid.
    pub gid: libc::gid_t,
}

/// Errors of `--user`.
#[derive(Debug, Error)]
pub enum UserError {
    /// The user is not known.
    #[error("--user {0}: no such user (give a name from the password database, or UID:GID)")]
    Unknown(String),
    /// A number is not a valid id.
    #[error("--user {0}: expected NAME, UID or NAME|UID:GID with numeric ids")]
    Syntax(String),
    /// The daemon is not root.
    #[error(
        "--user {spec}: the daemon runs as uid {euid}, not root, and cannot change user \
         (start it as root, or leave --user out)"
    )]
    NotRoot {
        /// The spec.
        spec: String,
        /// The effective uid.
        euid: libc::uid_t,
    },
    /// A step failed.
    #[error("--user {spec}: cannot {step} (the daemon refuses to run half-privileged)")]
    Step {
        /// The spec.
        spec: String,
        /// What failed.
        step: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A check after the drop found privileges left.
    #[error("--user {spec}: after dropping privileges, {what} (the daemon refuses to run)")]
    Left {
        /// The spec.
        spec: String,
        /// What is left.
        what: String,
    },
}

/// A password database entry: (uid, primary gid).
fn passwd_by(name: Option<&str>, uid: Option<libc::uid_t>) -> Option<(libc::uid_t, libc::gid_t)> {
    // SAFETY: passwd is plain data, filled in by getpw*_r.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16384];
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    let r = match (name, uid) {
        (Some(n), _) => {
            let c = CString::new(n).ok()?;
            // SAFETY: `c` is NUL-terminated; `pw`, `buf` (with its length) and `out` are
            // valid for the call, which writes only into them.
            unsafe { libc::getpwnam_r(c.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) }
        }
        (None, Some(u)) => {
            // SAFETY: as above.
            unsafe { libc::getpwuid_r(u, &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) }
        }
        (None, None) => return None,
    };
    (r == 0 && !out.is_null()).then_some((pw.pw_uid, pw.pw_gid))
}

impl FromStr for User {
    type Err = UserError;
    /// `NAME`, `UID` (the group is the user's primary group, or the same number when the
    /// uid has no entry), `NAME:GID` or `UID:GID`.
    fn from_str(spec: &str) -> Result<User, UserError> {
        let (who, group) = match spec.split_once(':') {
            Some((w, g)) => (w, Some(g)),
            None => (spec, None),
        };
        let gid = match group {
            Some(g) => Some(
                g.parse::<libc::gid_t>()
                    .map_err(|_| UserError::Syntax(spec.into()))?,
            ),
            None => None,
        };
        if who.is_empty() {
            return Err(UserError::Syntax(spec.into()));
        }
        let (uid, primary) = match who.parse::<libc::uid_t>() {
            Ok(uid) => (uid, passwd_by(None, Some(uid)).map_or(uid, |(_, g)| g)),
            Err(_) => passwd_by(Some(who), None).ok_or_else(|| UserError::Unknown(spec.into()))?,
        };
        Ok(User {
            spec: spec.into(),
            uid,
            gid: gid.unwrap_or(primary),
        })
    }
}

fn check(r: libc::c_int, spec: &str, step: &'static str) -> Result<(), UserError> {
    if r == 0 {
        Ok(())
    } else {
        Err(UserError::Step {
            spec: spec.into(),
            step,
            source: io::Error::last_os_error(),
        })
    }
}

/// Whether the calling process is root (effective uid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no failure and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// Becomes `user` for good (see the module doc). Call on the main thread before any other
/// thread is created.
pub fn drop_to(user: &User) -> Result<(), UserError> {
    let spec = user.spec.as_str();
    // SAFETY: geteuid has no failure and touches no memory.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(UserError::NotRoot {
            spec: spec.into(),
            euid,
        });
    }
    // The bounding set: every capability the kernel knows (PR_CAPBSET_READ says EINVAL past
    // the last one).
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) } < 0 {
            break;
        }
        // SAFETY: prctl with integer arguments only.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        check(r, spec, "drop the capability bounding set")?;
    }
    // SAFETY: prctl with integer arguments only.
    let r = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    check(r, spec, "clear the ambient capabilities")?;
    // SAFETY: an empty list: no memory is read.
    let r = unsafe { libc::setgroups(0, std::ptr::null()) };
    check(r, spec, "clear the supplementary groups")?;
    // SAFETY: integer arguments only.
    let r = unsafe { libc::setresgid(user.gid, user.gid, user.gid) };
    check(r, spec, "set the group id")?;
    // SAFETY: integer arguments only.
    let r = unsafe { libc::setresuid(user.uid, user.uid, user.uid) };
    check(r, spec, "set the user id")?;
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    check(r, spec, "set no_new_privs")?;
    verify(user)
}

/// Checks that nothing of root is left on the calling thread.
pub fn verify(user: &User) -> Result<(), UserError> {
    let left = |what: String| UserError::Left {
        spec: user.spec.clone(),
        what,
    };
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: three valid out pointers.
    unsafe { libc::getresuid(&mut r, &mut e, &mut s) };
    if [r, e, s] != [user.uid; 3] {
        return Err(left(format!(
            "the user ids are {r}/{e}/{s}, not {}",
            user.uid
        )));
    }
    // SAFETY: three valid out pointers.
    unsafe { libc::getresgid(&mut r, &mut e, &mut s) };
    if [r, e, s] != [user.gid; 3] {
        return Err(left(format!(
            "the group ids are {r}/{e}/{s}, not {}",
            user.gid
        )));
    }
    // SAFETY: size 0 only counts the groups; no memory is written.
    let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    if n != 0 {
        return Err(left(format!("{n} supplementary group(s) are left")));
    }
    #[repr(C)]
    struct CapHeader {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct CapData {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut h = CapHeader {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let mut d = [CapData::default(); 2];
    // SAFETY: capget writes two CapData (version 3) into `d` and reads `h`.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut h, d.as_mut_ptr()) };
    if rc != 0
        || d.iter()
            .any(|c| c.effective | c.permitted | c.inheritable != 0)
    {
        return Err(left("capabilities are left".into()));
    }
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments only.
        let v = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) };
        if v < 0 {
            break;
        }
        if v != 0 {
            return Err(left(format!("capability {cap} is in the bounding set")));
        }
    }
    if user.uid != 0 {
        // SAFETY: integer argument only; must fail for an unprivileged user.
        if unsafe { libc::setuid(0) } == 0 {
            return Err(left("setuid(0) succeeds".into()));
        }
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) } != 1 {
        return Err(left("no_new_privs is not set".into()));
    }
    Ok(())
}
