//! Host-level helpers for integration tests: network namespaces, tap devices, daemon
//! processes and scratch directories. Everything is torn down by `Drop`, also when the test
//! panics. Only what a helper created is removed, and only processes it started are
//! signalled, by PID.
//!
//! Addresses: use the documentation ranges 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24.
//!
//! ```no_run
//! use tests::host::{Daemon, NetNs, Tap};
//! use std::process::Command;
//! let ns = NetNs::new("blk").unwrap();
//! let tap = Tap::new("tap").unwrap();
//! tap.add_addr("192.0.2.1/24").unwrap();
//! tap.up().unwrap();
//! let mut daemon = Daemon::spawn("sleeper", Command::new("sleep").arg("60")).unwrap();
//! assert!(daemon.is_running());
//! ```

use std::fs;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique in this machine for this process: `<prefix><pid-hex><n>`, at most 15
/// bytes (the limit for interface names). `prefix` is cut to fit.
pub fn unique_name(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let suffix = format!("{:x}{n}", std::process::id());
    let keep = 15usize.saturating_sub(suffix.len());
    let prefix: String = prefix.chars().take(keep).collect();
    format!("{prefix}{suffix}")
}

/// Run a command; an error says which command failed and its stderr.
pub fn run(cmd: &mut Command) -> io::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run {cmd:?}: {e}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(io::Error::other(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        )))
    }
}

/// `ip ARGS...` (iproute2), optionally inside a network namespace.
fn ip(netns: Option<&str>, args: &[&str]) -> io::Result<String> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    run(cmd.args(args))
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// `ip netns add <prefix><unique>`.
    pub fn new(prefix: &str) -> io::Result<Self> {
        let name = unique_name(prefix);
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> ARGS...`.
    pub fn ip(&self, args: &[&str]) -> io::Result<String> {
        ip(Some(&self.name), args)
    }

    /// A command that runs `program` inside the namespace (`ip netns exec`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = run(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("host: {e}");
        }
    }
}

/// A persistent tap device (`ip tuntap add`), deleted on drop. A VMM or daemon attaches to
/// it by name (TUNSETIFF with the same multi-queue setting).
#[derive(Debug)]
pub struct Tap {
    name: String,
    netns: Option<String>,
}

impl Tap {
    /// A single-queue tap `<prefix><unique>` with IFF_VNET_HDR.
    pub fn new(prefix: &str) -> io::Result<Self> {
        Self::create(prefix, false)
    }

    /// A multi-queue tap.
    pub fn multi_queue(prefix: &str) -> io::Result<Self> {
        Self::create(prefix, true)
    }

    fn create(prefix: &str, multi_queue: bool) -> io::Result<Self> {
        let name = unique_name(prefix);
        let mut args = vec!["tuntap", "add", "dev", &name, "mode", "tap", "vnet_hdr"];
        if multi_queue {
            args.push("multi_queue");
        }
        ip(None, &args)?;
        Ok(Tap { name, netns: None })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Add an address (`192.0.2.1/24`).
    pub fn add_addr(&self, cidr: &str) -> io::Result<()> {
        ip(
            self.netns.as_deref(),
            &["addr", "add", cidr, "dev", &self.name],
        )
        .map(|_| ())
    }

    /// Set the link up.
    pub fn up(&self) -> io::Result<()> {
        ip(self.netns.as_deref(), &["link", "set", &self.name, "up"]).map(|_| ())
    }

    /// Move the tap into `ns` (addresses are lost: add them afterwards).
    pub fn move_to(&mut self, ns: &NetNs) -> io::Result<()> {
        ip(
            self.netns.as_deref(),
            &["link", "set", &self.name, "netns", ns.name()],
        )?;
        self.netns = Some(ns.name().to_string());
        Ok(())
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        // A tap moved into a namespace that is already gone went with it.
        if let Some(ns) = &self.netns {
            if !Path::new("/run/netns").join(ns).exists() {
                return;
            }
        }
        if let Err(e) = ip(self.netns.as_deref(), &["link", "del", &self.name]) {
            eprintln!("host: {e}");
        }
    }
}

/// A directory for a test's scratch files (under `<target>/tmp`), removed on drop.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    pub fn new(prefix: &str) -> io::Result<Self> {
        let path = crate::lab::profile_dir()
            .parent()
            .map(|t| t.join("tmp"))
            .unwrap_or_else(std::env::temp_dir)
            .join(unique_name(prefix));
        fs::create_dir_all(&path)?;
        Ok(ScratchDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A background process (a vhost-user daemon, a VMM) with its output in a log file. On drop
/// it gets SIGTERM, then SIGKILL after a grace period, and is reaped.
#[derive(Debug)]
pub struct Daemon {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    grace: Duration,
}

impl Daemon {
    /// Start `cmd` in its own process group, stdout and stderr to
    /// `<target>/test-logs/<name>-<unique>.log` (kept after the test for reading).
    pub fn spawn(name: &str, cmd: &mut Command) -> io::Result<Self> {
        let dir = crate::lab::profile_dir()
            .parent()
            .map(|t| t.join("test-logs"))
            .unwrap_or_else(std::env::temp_dir);
        fs::create_dir_all(&dir)?;
        let log = dir.join(format!("{}.log", unique_name(name)));
        let out = fs::File::create(&log)?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start {name} ({cmd:?}): {e}")))?;
        Ok(Daemon {
            name: name.to_string(),
            child: Some(child),
            log,
            grace: Duration::from_secs(5),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The PID (0 once stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The output so far.
    pub fn log(&self) -> String {
        fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// How long `stop`/drop waits after SIGTERM before SIGKILL (default 5 s).
    pub fn set_grace(&mut self, grace: Duration) {
        self.grace = grace;
    }

    /// Whether the process is still running (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// Wait until `cond` holds, the process exits, or `timeout` passes; says which failed.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut() -> bool,
    ) -> Result<(), String> {
        let end = Instant::now() + timeout;
        loop {
            if cond() {
                return Ok(());
            }
            if !self.is_running() {
                return Err(format!(
                    "{} exited while waiting for {what}; its output:\n{}",
                    self.name,
                    self.log()
                ));
            }
            if Instant::now() >= end {
                return Err(format!(
                    "{} did not reach {what} in {timeout:?}; its output:\n{}",
                    self.name,
                    self.log()
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait for a file or socket to appear.
    pub fn wait_for_path(&mut self, path: &Path, timeout: Duration) -> Result<(), String> {
        let what = format!("{}", path.display());
        self.wait_for(&what, timeout, || path.exists())
    }

    fn signal(&self, sig: libc::c_int) {
        if let Some(child) = &self.child {
            if let Ok(pid) = libc::pid_t::try_from(child.id()) {
                // SAFETY: kill(2) touches no memory of ours. `pid` is our unreaped child,
                // the leader of the process group spawn() created, so the group is ours.
                unsafe { libc::kill(-pid, sig) };
            }
        }
    }

    /// SIGTERM, wait up to the grace period, then SIGKILL; returns the exit status.
    pub fn stop(&mut self) -> io::Result<ExitStatus> {
        let Some(child) = self.child.as_mut() else {
            return Err(io::Error::other(format!("{} already stopped", self.name)));
        };
        if let Some(status) = child.try_wait()? {
            self.child = None;
            return Ok(status);
        }
        self.signal(libc::SIGTERM);
        let end = Instant::now() + self.grace;
        while Instant::now() < end {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    return Ok(status);
                }
            }
            thread::sleep(Duration::from_millis(20));
        }
        self.signal(libc::SIGKILL);
        let mut child = self
            .child
            .take()
            .ok_or_else(|| io::Error::other("no child"))?;
        child.wait()
    }

    /// Wait for the process to exit by itself.
    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| io::Error::other(format!("{} already stopped", self.name)))?;
        child.wait()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            if let Err(e) = self.stop() {
                eprintln!("host: stopping {}: {e}", self.name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_fit_interface_names() {
        let a = unique_name("a-very-long-prefix-for-a-tap");
        let b = unique_name("a-very-long-prefix-for-a-tap");
        assert!(a.len() <= 15, "{a}");
        assert_ne!(a, b);
    }

    // Needs root and iproute2, as every host-level network test does.
    #[test]
    fn netns_and_tap_are_removed_on_drop() {
        let ns = NetNs::new("hns").unwrap();
        let ns_name = ns.name().to_string();
        let mut tap = Tap::new("htap").unwrap();
        let tap_name = tap.name().to_string();
        tap.move_to(&ns).unwrap();
        tap.add_addr("192.0.2.1/24").unwrap();
        tap.up().unwrap();
        let shown = ns.ip(&["addr", "show", "dev", &tap_name]).unwrap();
        assert!(shown.contains("192.0.2.1/24"), "{shown}");
        drop(tap);
        assert!(ns.ip(&["link", "show", &tap_name]).is_err());
        drop(ns);
        assert!(!Path::new("/run/netns").join(&ns_name).exists());
    }

    #[test]
    fn daemon_is_stopped_on_drop() {
        let mut daemon = Daemon::spawn("sleeper", Command::new("sleep").arg("600")).unwrap();
        let pid = daemon.pid();
        assert!(daemon.is_running());
        let log = daemon.log_path().to_path_buf();
        drop(daemon);
        // Reaped: the PID is gone (reuse within these microseconds is not a concern here).
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        let _ = fs::remove_file(log);
    }

    #[test]
    fn daemon_exit_is_reported_with_its_output() {
        let mut daemon = Daemon::spawn(
            "failer",
            Command::new("sh").args(["-c", "echo boom; exit 3"]),
        )
        .unwrap();
        let err = daemon
            .wait_for("never", Duration::from_secs(10), || false)
            .unwrap_err();
        assert!(err.contains("exited") && err.contains("boom"), "{err}");
        let log = daemon.log_path().to_path_buf();
        drop(daemon);
        let _ = fs::remove_file(log);
    }

    #[test]
    fn scratch_dir_is_removed_on_drop() {
        let dir = ScratchDir::new("scratch").unwrap();
        fs::write(dir.join("f"), b"x").unwrap();
        let path = dir.path().to_path_buf();
        drop(dir);
        assert!(!path.exists());
    }
}
