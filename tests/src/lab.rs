//! The lab: Linux guests, real KVM, an IOMMU and assignable PCI devices inside QEMU TCG.
//!
//! This host's /dev/kvm cannot boot Linux in useful time, so Linux-guest tests run in "the
//! lab": L1 is QEMU TCG (`-cpu max`, q35, intel-iommu) booting Debian's generic kernel; in L1,
//! kvm-amd gives a real /dev/kvm, a VMM boots L2. L1 has two e1000e on one QEMU hub
//! (0000:00:02.0 to assign, 0000:00:03.0 as L1's peer) and an NVMe on a scratch file
//! (0000:00:04.0). The work is done by `scripts/lab/build-images` (cached images in
//! `target/lab/images`) and `scripts/lab/run` (one scenario, one L1 boot); this module
//! writes the scenario directory, runs the script, streams and records L1's console, and
//! kills what it started when dropped or on panic.
//!
//! Inside L1 (see `scripts/lab/lab-lib.sh`, installed as `/lab/lib.sh`):
//! - the scenario script is `/lab/scenario.sh`; `. /lab/lib.sh` gives `check`, `fail`,
//!   `lab_finish`, `vfio_bind`, `vfio_unbind`, `l2_qemu`, `lab_console`, `$IP` (iproute2);
//! - project binaries (`vmm`, `vhost-user-blk`, `vhost-user-net`, `passthrough` from this
//!   build's target directory) and [`Scenario::bin`] files are in `/lab/bin` (on PATH);
//! - L2 images: `/lab/l2/vmlinuz` + `/lab/l2/initrd.img` (cloud kernel, virtio modules),
//!   `/lab/l2/vmlinux-generic` (an ELF, booted through PVH) + `/lab/l2/initrd-generic.img` (e1000e, nvme too); the L2
//!   script is `/lab/scenario.sh` inside them;
//! - files: `/lab/files/` in L1 ([`Scenario::file`]) and in L2 ([`Scenario::l2_file`]).
//!
//! Markers: scripts print `LAB-OK name`, `LAB-FAIL name why`, `LAB-T name seconds`,
//! `LAB-VAL name value`; L1's init prints `LAB-INIT` and `LAB-EXIT status`, L2's `L2-INIT`
//! and `L2-EXIT status`.
//!
//! ```no_run
//! use tests::lab::Scenario;
//! let run = Scenario::new("example", ". /lab/lib.sh\ncheck kvm test -c /dev/kvm\nlab_finish\n")
//!     .run_ok();
//! run.assert_ok("kvm");
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Console silence after which L1 is taken for stuck, by default (scenarios print at least
/// every few seconds; the longest quiet step, a 64 MiB transfer in L2, takes about 30 s).
const STALL: Duration = Duration::from_secs(150);

/// Boots of L1 [`Scenario::run_ok`] allows a scenario whose L1 keeps dying.
pub const L1_ATTEMPTS: u32 = 3;

/// Extra time the fixture allows beyond the scenario timeout, for building the images the
/// first time (downloads, unpacking) and waiting for another lab run (runs are serialized).
const SETUP_ALLOWANCE: Duration = Duration::from_secs(1800);

/// The repository root (the parent of the `tests` package).
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The cargo profile directory this test was built into (`target/debug`, `target/release`):
/// where the project binaries are.
pub fn profile_dir() -> PathBuf {
    // Integration tests run as target/<profile>/deps/<name>-<hash>, this package's binaries
    // (`bench`) as target/<profile>/<name>.
    let found = std::env::current_exe().ok().and_then(|exe| {
        let dir = exe.parent()?;
        [Some(dir), dir.parent()]
            .into_iter()
            .flatten()
            .find(|d| d.join("deps").is_dir())
            .map(Path::to_path_buf)
    });
    found.unwrap_or_else(|| repo_root().join("target").join("debug"))
}

/// The lab's working directory: `$LAB_DIR`, else `<target>/lab`.
pub fn lab_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LAB_DIR") {
        return PathBuf::from(dir);
    }
    match profile_dir().parent() {
        Some(target) => target.join("lab"),
        None => repo_root().join("target").join("lab"),
    }
}

/// A lab script that could not be started or watched.
#[derive(Debug)]
pub enum LabError {
    /// Writing the scenario directory failed.
    Scenario(PathBuf, io::Error),
    /// `scripts/lab/...` could not be started.
    Spawn(PathBuf, io::Error),
    /// Waiting for the script failed.
    Wait(io::Error),
}

impl fmt::Display for LabError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LabError::Scenario(p, e) => write!(f, "cannot write scenario {}: {e}", p.display()),
            LabError::Spawn(p, e) => write!(f, "cannot start {}: {e}", p.display()),
            LabError::Wait(e) => write!(f, "cannot wait for the lab script: {e}"),
        }
    }
}

impl std::error::Error for LabError {}

/// Build (or reuse) the cached lab images, as `scripts/lab/build-images` does. Its output is
/// printed; a failure says why (missing package, QEMU missing...).
pub fn build_images() -> Result<(), String> {
    let script = repo_root().join("scripts/lab/build-images");
    let out = Command::new(&script)
        .env("LAB_DIR", lab_dir())
        .output()
        .map_err(|e| format!("cannot start {}: {e}", script.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprint!("{stderr}");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} failed ({}): {}",
            script.display(),
            out.status,
            stderr.trim_end()
        ))
    }
}

enum Content {
    Path(PathBuf),
    Bytes(Vec<u8>),
}

/// One lab boot: an L1 script, optionally an L2 script, files and binaries.
pub struct Scenario {
    name: String,
    l1_script: String,
    l2_script: Option<String>,
    files: Vec<(String, Content)>,
    l2_files: Vec<(String, Content)>,
    bins: Vec<PathBuf>,
    l2_bins: Vec<PathBuf>,
    project_bins: PathBuf,
    qemu: bool,
    pair: bool,
    timeout: Duration,
    stall: Duration,
    mem_mib: u32,
    smp: u32,
    append: String,
}

impl Scenario {
    /// A scenario named `name` (also the name of its directory under `target/lab/scenarios`
    /// and of its log under `target/lab/logs`; keep it unique per test) that runs `l1_script`
    /// (busybox sh) in L1. Its exit status is the scenario's.
    pub fn new(name: &str, l1_script: &str) -> Self {
        Scenario {
            name: name.to_string(),
            l1_script: l1_script.to_string(),
            l2_script: None,
            files: Vec::new(),
            l2_files: Vec::new(),
            bins: Vec::new(),
            l2_bins: Vec::new(),
            project_bins: profile_dir(),
            qemu: false,
            pair: false,
            timeout: Duration::from_secs(600),
            stall: STALL,
            mem_mib: 2048,
            smp: 2,
            append: String::new(),
        }
    }

    /// The script L2's init runs (as `/lab/scenario.sh` in both L2 initrds).
    pub fn l2_script(mut self, script: &str) -> Self {
        self.l2_script = Some(script.to_string());
        self
    }

    /// Copy the file `src` to L1's `/lab/files/<dst>`.
    pub fn file(mut self, src: impl AsRef<Path>, dst: &str) -> Self {
        self.files
            .push((dst.to_string(), Content::Path(src.as_ref().to_path_buf())));
        self
    }

    /// Put `contents` in L1's `/lab/files/<dst>`.
    pub fn file_contents(mut self, dst: &str, contents: impl Into<Vec<u8>>) -> Self {
        self.files
            .push((dst.to_string(), Content::Bytes(contents.into())));
        self
    }

    /// Copy the file `src` to L2's `/lab/files/<dst>`.
    pub fn l2_file(mut self, src: impl AsRef<Path>, dst: &str) -> Self {
        self.l2_files
            .push((dst.to_string(), Content::Path(src.as_ref().to_path_buf())));
        self
    }

    /// Put `contents` in L2's `/lab/files/<dst>`.
    pub fn l2_file_contents(mut self, dst: &str, contents: impl Into<Vec<u8>>) -> Self {
        self.l2_files
            .push((dst.to_string(), Content::Bytes(contents.into())));
        self
    }

    /// Copy an executable (e.g. `env!("CARGO_BIN_EXE_kvm-smoke")`) with the shared libraries
    /// it needs into L1's `/lab/bin/`.
    pub fn bin(mut self, path: impl AsRef<Path>) -> Self {
        self.bins.push(path.as_ref().to_path_buf());
        self
    }

    /// Copy an executable with its shared libraries into L2's `/lab/bin/` (on L2's PATH).
    pub fn l2_bin(mut self, path: impl AsRef<Path>) -> Self {
        self.l2_bins.push(path.as_ref().to_path_buf());
        self
    }

    /// Where the project binaries (`vmm`, `vhost-user-blk`, `vhost-user-net`,
    /// `passthrough`) are taken from; default: this test's profile directory.
    pub fn project_bins(mut self, dir: impl AsRef<Path>) -> Self {
        self.project_bins = dir.as_ref().to_path_buf();
        self
    }

    /// Put QEMU and its firmware in L1 (the reference VMM; `l2_qemu` in `/lab/lib.sh`).
    /// Makes L1's initramfs about 50 MB bigger.
    pub fn with_qemu(mut self) -> Self {
        self.qemu = true;
        self
    }

    /// Give L1 a second NVMe and a second e1000e to assign (`--pair` of `scripts/lab/run`:
    /// `$NVME2_BDF`, `$NIC2_BDF`), for two L2s side by side.
    pub fn pair_devices(mut self) -> Self {
        self.pair = true;
        self
    }

    /// Kill L1 after `timeout` (default 600 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Take L1 for stuck (`Outcome::L1Lockup`) after `stall` without console output
    /// (default 150 s). A scenario whose steps all print within seconds can give up on a
    /// stuck L1 sooner.
    pub fn stall(mut self, stall: Duration) -> Self {
        self.stall = stall;
        self
    }

    /// L1 memory in MiB (default 2048).
    pub fn mem_mib(mut self, mib: u32) -> Self {
        self.mem_mib = mib;
        self
    }

    /// L1 vCPUs (default 2).
    pub fn smp(mut self, n: u32) -> Self {
        self.smp = n;
        self
    }

    /// More L1 kernel command line.
    pub fn append(mut self, args: &str) -> Self {
        self.append = args.to_string();
        self
    }

    /// The scenario directory: `target/lab/scenarios/<name>`. Run it again by hand with
    /// `scripts/lab/run [--qemu] target/lab/scenarios/<name>`.
    pub fn dir(&self) -> PathBuf {
        lab_dir().join("scenarios").join(&self.name)
    }

    fn write_dir(&self) -> Result<PathBuf, LabError> {
        let dir = self.dir();
        let err = |p: &Path, e| LabError::Scenario(p.to_path_buf(), e);
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(|e| err(&dir, e))?;
        }
        fs::create_dir_all(&dir).map_err(|e| err(&dir, e))?;
        let l1 = dir.join("l1.sh");
        fs::write(&l1, &self.l1_script).map_err(|e| err(&l1, e))?;
        if let Some(script) = &self.l2_script {
            let l2 = dir.join("l2.sh");
            fs::write(&l2, script).map_err(|e| err(&l2, e))?;
        }
        for (sub, files) in [("files", &self.files), ("l2-files", &self.l2_files)] {
            for (dst, content) in files {
                let path = dir.join(sub).join(dst.trim_start_matches('/'));
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent).map_err(|e| err(parent, e))?;
                }
                match content {
                    Content::Path(src) => fs::copy(src, &path).map(|_| ()),
                    Content::Bytes(bytes) => fs::write(&path, bytes),
                }
                .map_err(|e| err(&path, e))?;
            }
        }
        for (sub, bins) in [("bin", &self.bins), ("l2-bin", &self.l2_bins)] {
            if bins.is_empty() {
                continue;
            }
            let bin_dir = dir.join(sub);
            fs::create_dir_all(&bin_dir).map_err(|e| err(&bin_dir, e))?;
            for src in bins {
                let name = src.file_name().ok_or_else(|| {
                    err(
                        src,
                        io::Error::new(io::ErrorKind::InvalidInput, "no file name"),
                    )
                })?;
                let dst = bin_dir.join(name);
                fs::copy(src, &dst).map_err(|e| err(&dst, e))?;
                fs::set_permissions(&dst, fs::Permissions::from_mode(0o755))
                    .map_err(|e| err(&dst, e))?;
            }
        }
        Ok(dir)
    }

    /// Boot L1 with this scenario and wait for it. L1's console is streamed to stderr
    /// (captured by the test harness, shown when the test fails or with `--nocapture`) and
    /// kept in `target/lab/logs/<name>.log`. An `Err` means the script could not be
    /// started; everything else (setup failures, timeouts, the scenario's status) is in the
    /// returned [`LabRun`].
    pub fn run(&self) -> Result<LabRun, LabError> {
        self.run_with(&mut |_| {})
    }

    /// [`Scenario::run`], calling `on_line` with every console line as it arrives (for
    /// progress reports while L1 runs).
    pub fn run_with(&self, on_line: &mut dyn FnMut(&str)) -> Result<LabRun, LabError> {
        let dir = self.write_dir()?;
        let script = repo_root().join("scripts/lab/run");
        let mut cmd = Command::new(&script);
        cmd.env("LAB_DIR", lab_dir())
            .arg("--bins")
            .arg(&self.project_bins)
            .arg("--timeout")
            .arg(self.timeout.as_secs().max(1).to_string())
            .arg("--mem")
            .arg(self.mem_mib.to_string())
            .arg("--smp")
            .arg(self.smp.to_string());
        if self.qemu {
            cmd.arg("--qemu");
        }
        if self.pair {
            cmd.arg("--pair");
        }
        if !self.append.is_empty() {
            cmd.arg("--append").arg(&self.append);
        }
        cmd.arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so that Drop can end the script and its QEMU together.
            .process_group(0);
        // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
        // which is async-signal-safe and touches no memory of the parent.
        unsafe {
            // If this test process dies (Ctrl-C, a crash) the script gets SIGTERM and ends
            // its QEMU: our process group is not the terminal's, so Ctrl-C would miss it.
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        eprintln!(
            "lab: {}{} {}",
            script.display(),
            if self.qemu { " --qemu" } else { "" },
            dir.display()
        );
        let start = Instant::now();
        let child = cmd
            .spawn()
            .map_err(|e| LabError::Spawn(script.clone(), e))?;
        let mut group = ProcessGroup { child: Some(child) };

        let (tx, rx) = mpsc::channel::<(Stream, String)>();
        let mut readers = Vec::new();
        if let Some(child) = group.child.as_mut() {
            if let Some(out) = child.stdout.take() {
                readers.push(spawn_reader(out, Stream::Console, tx.clone()));
            }
            if let Some(err) = child.stderr.take() {
                readers.push(spawn_reader(err, Stream::Script, tx.clone()));
            }
        }
        drop(tx);

        let deadline = start + self.timeout + SETUP_ALLOWANCE;
        let mut lines = Vec::new();
        let mut script_lines = Vec::new();
        let mut killed = false;
        let mut lockup = false;
        let mut last_line = Instant::now();
        // Silence counts only once L1 boots: waiting for another test's lab run (run.lock)
        // or for the images is quiet and no sign of a stuck L1.
        let mut l1_booting = false;
        let mut monitor: Option<PathBuf> = None;
        let mut qemu_pidfile: Option<PathBuf> = None;
        loop {
            let qemu_pid = qemu_pidfile.as_deref().and_then(|p| {
                std::fs::read_to_string(p)
                    .ok()
                    .and_then(|s| s.trim().parse::<u32>().ok())
            });
            let now = Instant::now();
            if l1_booting && !lockup && now.duration_since(last_line) > self.stall {
                // Neither L1 nor its guests said anything for minutes: an L1 vCPU is stuck
                // in nested virtualization and took L1 with it (see `Outcome::L1Lockup`).
                eprintln!(
                    "lab: no console output for {} s; L1 is stuck, killing it",
                    self.stall.as_secs()
                );
                // L1's QEMU threads as the host sees them, now and after the second look
                // below: whether its vCPU threads run (TCG executing L1's code: a loop in
                // L1) or sleep (QEMU itself waiting: a wedged emulator, not L1's doing).
                let threads_before = qemu_pid.and_then(host_threads);
                let sampled = Instant::now();
                // Where L1's vCPUs are, before it goes: the evidence of what stuck it.
                let regs = monitor.as_deref().map(l1_registers).unwrap_or_default();
                let kmap = lines
                    .iter()
                    .find(|l: &&Line| l.text.starts_with("LAB-KMAP "))
                    .map(|l| l.text.clone());
                let named = kmap
                    .map(|k| {
                        let lab = lab_dir();
                        let kallsyms = lab.join("images").join("l1-kallsyms");
                        name_l1_rips(&regs, &k, &lab.join("kernels"), &kallsyms)
                    })
                    .unwrap_or_default();
                // A second look a second later: whether the vCPUs move (a loop, a wait) or
                // sit still (one instruction over and over).
                let again: Vec<String> = monitor
                    .as_deref()
                    .map(|m| {
                        thread::sleep(Duration::from_secs(1));
                        l1_registers(m)
                    })
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|l| l.contains("RIP=") || l.contains("CPU#"))
                    .map(|l| l.replacen("L1-REGS ", "L1-REGS-1S ", 1))
                    .collect();
                let uart = monitor.as_deref().map(l1_uart).unwrap_or_default();
                let threads = match (threads_before, qemu_pid.and_then(host_threads)) {
                    (Some(a), Some(b)) => host_thread_lines(&a, &b, sampled.elapsed()),
                    _ => vec![format!(
                        "L1-HOST-THREAD none: L1's QEMU (pid {qemu_pid:?}) not readable"
                    )],
                };
                for text in regs
                    .into_iter()
                    .chain(named)
                    .chain(again)
                    .chain(uart)
                    .chain(threads)
                {
                    eprintln!("{text}");
                    lines.push(Line {
                        at: start.elapsed(),
                        text,
                    });
                }
                // A stalled console (L1 alive, its UART's transmit interrupt lost: every
                // process that writes to the console blocks) is silent too. An NMI makes
                // L1's kernel print (polled, no interrupt needed), and its console driver
                // re-arm the UART's interrupt on the way out: if output other than the NMI
                // report then comes, L1 was alive and goes on.
                let revived = match monitor.as_deref() {
                    Some(m) => {
                        let _ = monitor_command(m, "nmi");
                        let mut nmi_lines = 0;
                        let mut other = None;
                        let until = Instant::now() + NMI_WAIT;
                        while other.is_none() {
                            let Some(left) = until.checked_duration_since(Instant::now()) else {
                                break;
                            };
                            match rx.recv_timeout(left) {
                                Ok((stream, text)) => {
                                    let at = start.elapsed();
                                    if matches!(stream, Stream::Script) {
                                        eprintln!("{text}");
                                        script_lines.push(text);
                                        continue;
                                    }
                                    eprintln!("[L1 {:7.2}] {text}", at.as_secs_f64());
                                    on_line(&text);
                                    if is_nmi_report(&text) {
                                        nmi_lines += 1;
                                    } else {
                                        other = Some(text.clone());
                                    }
                                    lines.push(Line { at, text });
                                }
                                Err(_) => break,
                            }
                        }
                        let note = match &other {
                            Some(t) => format!(
                                "L1-STALL-REVIVED after {} s of silence by an NMI: {t}",
                                self.stall.as_secs()
                            ),
                            None if nmi_lines > 0 => format!(
                                "L1-AFTER-NMI L1's kernel answered ({nmi_lines} lines), \
                                 nothing else came in {} s",
                                NMI_WAIT.as_secs()
                            ),
                            None => "L1-AFTER-NMI no answer".to_string(),
                        };
                        eprintln!("{note}");
                        lines.push(Line {
                            at: start.elapsed(),
                            text: note,
                        });
                        other.is_some()
                    }
                    None => false,
                };
                if revived {
                    last_line = Instant::now();
                } else {
                    lockup = true;
                    group.kill();
                }
            }
            if now >= deadline {
                eprintln!("lab: the lab script did not finish in time; killing it");
                group.kill();
                killed = true;
                break;
            }
            match rx.recv_timeout((deadline - now).min(Duration::from_secs(5))) {
                Ok((stream, text)) => {
                    last_line = Instant::now();
                    let at = start.elapsed();
                    match stream {
                        Stream::Console => {
                            eprintln!("[L1 {:7.2}] {text}", at.as_secs_f64());
                            on_line(&text);
                            let stuck = text.contains("watchdog: BUG: soft lockup");
                            lines.push(Line { at, text });
                            if stuck && !lockup {
                                // A vCPU of L1 is stuck inside nested SVM (see
                                // `Outcome::L1Lockup`): nothing will finish, stop now.
                                eprintln!("lab: L1 reports a soft lockup; killing it");
                                lockup = true;
                                group.kill();
                            }
                        }
                        Stream::Script => {
                            eprintln!("{text}");
                            l1_booting |= text.contains("booting L1");
                            if let Some(p) = text.strip_prefix("lab: L1 monitor: ") {
                                monitor = Some(PathBuf::from(p.trim()));
                            }
                            if let Some(p) = text.strip_prefix("lab: L1 QEMU pid file: ") {
                                qemu_pidfile = Some(PathBuf::from(p.trim()));
                            }
                            script_lines.push(text);
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        for reader in readers {
            let _ = reader.join();
        }
        let status = group.wait().map_err(LabError::Wait)?;
        let duration = start.elapsed();
        let exit = parse_exit(&lines);
        let outcome = match (exit, status.code()) {
            _ if lockup => Outcome::L1Lockup,
            _ if killed => Outcome::Timeout,
            (Some(code), _) => Outcome::Exited(code),
            (None, Some(124)) => Outcome::Timeout,
            (None, _) => Outcome::NoExit(status),
        };
        eprintln!(
            "lab: scenario {} ended after {:.1} s: {outcome}",
            self.name,
            duration.as_secs_f64()
        );
        Ok(LabRun {
            name: self.name.clone(),
            outcome,
            lines,
            script_lines,
            duration,
            log: lab_dir().join("logs").join(format!("{}.log", self.name)),
        })
    }

    /// [`Scenario::run`], then [`LabRun::assert_success`]. A run whose L1 came up and then
    /// locked up or died ([`LabRun::l1_died`]: an L1 vCPU stuck in nested virtualization
    /// under TCG, seen with QEMU as the L2 VMM too; some days in one L1 boot out of a few), or
    /// whose script reported the lab's flake ([`LabRun::flake`]), or that failed with an L2
    /// triple fault ([`LabRun::lab_loss`]), is run again, up to [`L1_ATTEMPTS`] times,
    /// saying so loudly ([`LabRun::note_rerun`]); the last attempt's outcome decides.
    pub fn run_ok(&self) -> LabRun {
        for attempt in 1..=L1_ATTEMPTS {
            match self.run() {
                Ok(run) => match run.lab_loss() {
                    Some(why) if attempt < L1_ATTEMPTS => run.note_rerun(&why, attempt),
                    _ => {
                        run.assert_success();
                        return run;
                    }
                },
                Err(e) => panic!("lab scenario {}: {e}", self.name),
            }
        }
        unreachable!("the loop returns or panics on its second attempt")
    }
}

/// A thread of L1's QEMU as `/proc` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct HostThread {
    pub tid: u32,
    /// Its name (`CPU 0/TCG` with `debug-threads=on`).
    pub comm: String,
    /// R running, S sleeping, D in uninterruptible wait, ...
    pub state: char,
    /// User + system CPU time, in clock ticks.
    pub ticks: u64,
    /// The system call it is blocked in (`/proc/.../syscall`'s first field), or `running`.
    pub syscall: String,
}

/// Every thread of process `pid`; `None` when it is gone.
pub fn host_threads(pid: u32) -> Option<Vec<HostThread>> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut out = Vec::new();
    for e in dir.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else {
            continue;
        };
        let base = e.path();
        let Ok(stat) = std::fs::read_to_string(base.join("stat")) else {
            continue;
        };
        let Some(t) = parse_task_stat(tid, &stat) else {
            continue;
        };
        let syscall = std::fs::read_to_string(base.join("syscall"))
            .ok()
            .and_then(|s| s.split_whitespace().next().map(str::to_string))
            .unwrap_or_else(|| "?".into());
        out.push(HostThread { syscall, ..t });
    }
    out.sort_by_key(|t| t.tid);
    Some(out)
}

/// A task's `/proc/.../stat`: its name (in parentheses, may hold spaces), state, and
/// utime + stime (fields 14 and 15).
fn parse_task_stat(tid: u32, stat: &str) -> Option<HostThread> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is field 3 (state); field N is rest[N - 3].
    let state = rest.first()?.chars().next()?;
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some(HostThread {
        tid,
        comm,
        state,
        ticks: utime + stime,
        syscall: String::new(),
    })
}

/// `L1-HOST-THREAD` lines: each thread of L1's QEMU seen twice `between` apart, with the
/// share of one CPU it used in between and what it sat in (a system call number, or
/// `running`), then one `L1-HOST-VCPUS` verdict: whether L1's vCPU threads were executing.
pub fn host_thread_lines(a: &[HostThread], b: &[HostThread], between: Duration) -> Vec<String> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let secs = between.as_secs_f64().max(0.001);
    let mut lines = Vec::new();
    let mut vcpu_busy = Vec::new();
    for t in b {
        let before = a
            .iter()
            .find(|x| x.tid == t.tid)
            .map_or(t.ticks, |x| x.ticks);
        let pct = (t.ticks.saturating_sub(before)) as f64 / hz / secs * 100.0;
        lines.push(format!(
            "L1-HOST-THREAD {} '{}' state={} cpu={pct:.0}% syscall={}",
            t.tid, t.comm, t.state, t.syscall
        ));
        if t.comm.starts_with("CPU ") {
            vcpu_busy.push(pct >= 50.0);
        }
    }
    let verdict = match (vcpu_busy.len(), vcpu_busy.iter().filter(|&&b| b).count()) {
        (0, _) => "no vCPU thread found".to_string(),
        (n, 0) => format!(
            "all {n} idle: the vCPUs halted, or, where L1-REGS says HLT=0, QEMU waiting on itself (a wedged emulator)"
        ),
        (n, k) if k == n => format!("all {n} executing: L1 runs code (a loop in L1 or its guest)"),
        (n, k) => format!("{k} of {n} executing"),
    };
    lines.push(format!("L1-HOST-VCPUS {verdict}"));
    lines
}

/// How long a silent L1 gets to answer an NMI (see `Scenario::run_with`).
const NMI_WAIT: Duration = Duration::from_secs(10);

/// A line of the kernel's report of an NMI it has no handler for.
fn is_nmi_report(line: &str) -> bool {
    [
        "NMI received for unknown reason",
        "Dazed and confused",
        "strange power saving",
    ]
    .iter()
    .any(|p| line.contains(p))
}

/// L1's serial port (COM1) as its UART shows it, read through the monitor (`i /b`): IER
/// (is the transmit interrupt enabled?), LSR (is the transmitter empty?) and MCR (OUT2
/// gates the interrupt line), as one `L1-UART` line. IIR is not read: reading it clears a
/// pending transmit interrupt.
pub fn l1_uart(monitor: &Path) -> Vec<String> {
    let mut regs = Vec::new();
    for (name, port) in [("IER", 0x3f9), ("LSR", 0x3fd), ("MCR", 0x3fc)] {
        let out = monitor_command(monitor, &format!("i /b {port:#x}"));
        // "port[0x03f9] = 0x0f"
        let v = out
            .iter()
            .find_map(|l| l.split_once("] = ").map(|(_, v)| v.trim().to_string()))
            .unwrap_or_else(|| "?".into());
        regs.push(format!("{name}={v}"));
    }
    vec![format!("L1-UART COM1 {}", regs.join(" "))]
}

/// One command to L1's QEMU monitor; its answer's lines (empty when the monitor does not
/// answer within 5 s).
pub fn monitor_command(monitor: &Path, command: &str) -> Vec<String> {
    use std::io::{Read, Write};
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(monitor) else {
        return Vec::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let _ = s.write_all(format!("{command}\n").as_bytes());
    let start = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    while start.elapsed() < Duration::from_secs(5) {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                // Quiet for half a second after some output: the answer is complete.
                if out.len() > 200 {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&out)
        .lines()
        .map(|l| l.replace(|c: char| c.is_control(), ""))
        .filter(|l| !l.starts_with("(qemu)") && !l.starts_with("QEMU ") && !l.is_empty())
        .collect()
}

/// L1's vCPU registers from its QEMU monitor (`info registers -a`), as `L1-REGS` lines;
/// empty when the monitor does not answer within 5 s.
pub fn l1_registers(monitor: &Path) -> Vec<String> {
    monitor_command(monitor, "info registers -a")
        .into_iter()
        .filter(|l| l.contains('=') || l.starts_with("CPU#"))
        .map(|l| format!("L1-REGS {l}"))
        .collect()
}

/// Where each of L1's vCPUs was, by name: for every `RIP=` in `regs` ([`l1_registers`]), an
/// `L1-RIP-NAME CPU#n rip <function+0xoff> (<image>)` line, named with the L1 kernel's
/// text symbols (`kallsyms`: `/proc/kallsyms` lines of one earlier L1 boot, see
/// `scripts/lab/run`; Debian's System.map is a placeholder) and its KVM modules' symbol
/// tables from the unpacked kernel under `kernels` (`target/lab/kernels/<release>`), placed
/// where L1 said it had them (its `LAB-KMAP` line: release, `_text` after KASLR, the
/// modules' section addresses). A CPU that was running a nested guest shows that guest's
/// RIP (QEMU reports the state it executes): the generic L2 kernel is the same build, booted
/// without KASLR, so its RIPs are named too.
pub fn name_l1_rips(regs: &[String], kmap: &str, kernels: &Path, kallsyms: &Path) -> Vec<String> {
    let mut words = kmap.split_whitespace();
    if words.next() != Some("LAB-KMAP") {
        return Vec::new();
    }
    let Some(release) = words.next() else {
        return Vec::new();
    };
    let tree = kernels.join(release);
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    // (module, section) -> load address, from "kvm_amd:.text=0xffffffffc0a01000".
    let mut sections: Vec<(String, String, u64)> = Vec::new();
    let mut text_after_kaslr = None;
    for w in words {
        let Some((what, addr)) = w.split_once('=') else {
            continue;
        };
        let Some(addr) = hex(addr) else { continue };
        match what.split_once(':') {
            Some(("vmlinux", "_text")) => text_after_kaslr = Some(addr),
            Some((m, sec)) => sections.push((m.to_string(), sec.to_string(), addr)),
            None => {}
        }
    }
    let map = SymbolTable::system_map(kallsyms);
    let dump_text = map.as_ref().and_then(|m| m.address("_text"));
    let mut modules: BTreeMap<String, Option<SymbolTable>> = BTreeMap::new();
    let mut out = Vec::new();
    let mut cpu = String::from("CPU#?");
    for line in regs {
        let text = line.strip_prefix("L1-REGS ").unwrap_or(line);
        if let Some(c) = text
            .split_whitespace()
            .next()
            .filter(|w| w.starts_with("CPU#"))
        {
            cpu = c.to_string();
            continue;
        }
        let Some(rip) = text
            .split_whitespace()
            .find_map(|w| w.strip_prefix("RIP="))
            .and_then(hex)
        else {
            continue;
        };
        let mut names = Vec::new();
        if let (Some(map), Some(dump_text)) = (&map, dump_text) {
            if let Some(n) =
                text_after_kaslr.and_then(|t| map.name(rip.wrapping_sub(t).wrapping_add(dump_text)))
            {
                names.push(format!("{n} (L1 kernel)"));
            }
            if text_after_kaslr != Some(UNMOVED_TEXT) {
                if let Some(n) = map.name(rip.wrapping_sub(UNMOVED_TEXT).wrapping_add(dump_text)) {
                    names.push(format!("{n} (an L2 kernel of the same build, no KASLR)"));
                }
            }
        }
        for (m, sec, base) in &sections {
            if rip < *base {
                continue;
            }
            let table = modules.entry(m.clone()).or_insert_with(|| {
                find_module(&tree.join("lib").join("modules").join(release), m)
                    .and_then(|ko| SymbolTable::module(&ko))
            });
            if let Some(n) = table.as_ref().and_then(|t| t.name_in(sec, rip - base)) {
                names.push(format!("{n} ({m} {sec})"));
            }
        }
        let named = if names.is_empty() {
            "(not named: outside the kernel's and the KVM modules' text)".to_string()
        } else {
            names.join(" or ")
        };
        out.push(format!("L1-RIP-NAME {cpu} rip {rip:#x} {named}"));
    }
    out
}

/// Where x86-64 kernels link `_text` (`__START_KERNEL_map` + 16 MiB): where an L2 kernel
/// booted without KASLR (PVH entry into vmlinux) has it.
const UNMOVED_TEXT: u64 = 0xffff_ffff_8100_0000;

/// A kernel module's file under `dir` by module name (`kvm_amd` is `kvm-amd.ko`).
fn find_module(dir: &Path, name: &str) -> Option<PathBuf> {
    let wanted = [
        format!("{name}.ko"),
        format!("{}.ko", name.replace('_', "-")),
    ];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).ok()?.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if entry
                .file_name()
                .to_str()
                .is_some_and(|f| wanted.iter().any(|w| w == f))
            {
                return Some(path);
            }
        }
    }
    None
}

/// Function symbols of a kernel image or module: (section, start, size or 0, name), sorted.
struct SymbolTable {
    syms: Vec<(String, u64, u64, String)>,
}

impl SymbolTable {
    /// `System.map` or `/proc/kallsyms` text: `ffffffff81000000 T _text` lines; text
    /// symbols only, no module's (`... [kvm]`).
    fn system_map(path: &Path) -> Option<SymbolTable> {
        let text = fs::read_to_string(path).ok()?;
        let mut syms: Vec<(String, u64, u64, String)> = text
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                let addr = u64::from_str_radix(w.next()?, 16).ok()?;
                let kind = w.next()?;
                let name = w.next()?;
                let module = w.next().is_some();
                (matches!(kind, "T" | "t" | "W" | "w") && !module)
                    .then(|| (String::new(), addr, 0, name.to_string()))
            })
            .collect();
        syms.sort_by_key(|s| s.1);
        Some(SymbolTable { syms })
    }

    /// A module's function symbols with their sections (`objdump -t`: `0000000000000a50 l
    /// F .text\t0000000000000123 svm_vcpu_run`).
    fn module(ko: &Path) -> Option<SymbolTable> {
        let out = Command::new("objdump").arg("-t").arg(ko).output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut syms: Vec<(String, u64, u64, String)> = text
            .lines()
            .filter_map(|l| {
                let (left, right) = l.split_once('\t')?;
                let mut lw = left.split_whitespace();
                let value = u64::from_str_radix(lw.next()?, 16).ok()?;
                let rest: Vec<&str> = lw.collect();
                if !rest.contains(&"F") {
                    return None;
                }
                let section = rest.last()?.to_string();
                let mut rw = right.split_whitespace();
                let size = u64::from_str_radix(rw.next()?, 16).ok()?;
                let name = rw.last()?.to_string();
                Some((section, value, size, name))
            })
            .collect();
        syms.sort_by_key(|s| s.1);
        Some(SymbolTable { syms })
    }

    fn address(&self, name: &str) -> Option<u64> {
        self.syms.iter().find(|s| s.3 == name).map(|s| s.1)
    }

    /// `function+0xoff` for an address in a System.map's text, if below `_etext` (or within
    /// 64 KiB of the last symbol, when the table has no `_etext`).
    fn name(&self, addr: u64) -> Option<String> {
        let end = match self.address("_etext") {
            Some(e) => e,
            None => self.syms.last()?.1 + 0x10000,
        };
        if addr < self.address("_text")? || addr >= end {
            return None;
        }
        let i = self.syms.partition_point(|s| s.1 <= addr).checked_sub(1)?;
        let s = &self.syms[i];
        Some(format!("{}+{:#x}", s.3, addr - s.1))
    }

    /// `function+0xoff` for an offset into a module section, inside the function's size.
    fn name_in(&self, section: &str, offset: u64) -> Option<String> {
        self.syms
            .iter()
            .filter(|s| s.0 == section && s.1 <= offset && offset < s.1 + s.2.max(1))
            .max_by_key(|s| s.1)
            .map(|s| format!("{}+{:#x}", s.3, offset - s.1))
    }
}

/// `(vcpu, rip)` of an `L1-TRACE` line with a shutdown exit (SVM's `shutdown`, VMX's
/// `TRIPLE_FAULT`): `... kvm_exit: vcpu 0 reason shutdown rip 0xffffffff81234567 info1 ...`.
pub fn shutdown_exit(line: &str) -> Option<(u32, u64)> {
    let rest = line.strip_prefix("L1-TRACE")?;
    let (_, event) = rest.split_once("kvm_exit:")?;
    let words: Vec<&str> = event.split_whitespace().collect();
    let after = |key: &str| {
        words
            .iter()
            .position(|w| *w == key)
            .and_then(|i| words.get(i + 1).copied())
    };
    if !matches!(after("reason"), Some("shutdown" | "TRIPLE_FAULT")) {
        return None;
    }
    let vcpu = after("vcpu")?.parse().ok()?;
    let rip = u64::from_str_radix(after("rip")?.trim_start_matches("0x"), 16).ok()?;
    Some((vcpu, rip))
}

/// Which VMM's thread an `L1-TRACE` line comes from (its task name): QEMU's (`qemu-system-*`,
/// `CPU n/KVM`) or ours (`vcpuN`).
pub fn trace_vmm(line: &str) -> Option<&'static str> {
    let task = line.strip_prefix("L1-TRACE")?.trim_start();
    if task.starts_with("qemu-system") || task.starts_with("CPU ") {
        Some("QEMU")
    } else if task.starts_with("vcpu") {
        Some("our vmm")
    } else {
        None
    }
}

/// The names L1 gave the RIPs of shutdown exits (`L1-RIP <rip> <function+0xoff>`, from
/// `lab_rip_names` in `scripts/lab/lab-lib.sh`).
pub fn rip_names<'a>(lines: impl Iterator<Item = &'a str>) -> BTreeMap<u64, String> {
    lines
        .filter_map(|l| {
            let (rip, name) = l.strip_prefix("L1-RIP ")?.trim().split_once(' ')?;
            let rip = u64::from_str_radix(rip.trim_start_matches("0x"), 16).ok()?;
            Some((rip, name.trim().to_string()))
        })
        .collect()
}

/// `vcpu N rip 0x...: function+0xoff in the generic kernel` for a shutdown exit, named as L1
/// named it (`names`: [`rip_names`]).
pub fn name_shutdown(vcpu: u32, rip: u64, names: &BTreeMap<u64, String>) -> String {
    match names.get(&rip) {
        // L1's "(not in the kernel image: ...)".
        Some(n) if n.starts_with('(') => format!("vcpu {vcpu} rip {rip:#x} {n}"),
        Some(n) => format!("vcpu {vcpu} rip {rip:#x}: {n} in the generic kernel (if L2 ran it)"),
        None => format!("vcpu {vcpu} rip {rip:#x} (not named)"),
    }
}

#[derive(Clone, Copy)]
enum Stream {
    Console,
    Script,
}

fn spawn_reader(
    src: impl Read + Send + 'static,
    stream: Stream,
    tx: mpsc::Sender<(Stream, String)>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut reader = BufReader::new(src);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&buf);
                    let text = text.trim_end_matches(['\n', '\r']).to_string();
                    if tx.send((stream, text)).is_err() {
                        break;
                    }
                }
            }
        }
    })
}

fn parse_exit(lines: &[Line]) -> Option<i32> {
    lines
        .iter()
        .rev()
        .find_map(|l| l.text.strip_prefix("LAB-EXIT "))
        .and_then(|code| code.trim().parse().ok())
}

/// The script's process group; killed (SIGTERM, then SIGKILL) when dropped unreaped.
struct ProcessGroup {
    child: Option<Child>,
}

impl ProcessGroup {
    fn signal(&self, sig: libc::c_int) {
        if let Some(child) = &self.child {
            if let Ok(pid) = libc::pid_t::try_from(child.id()) {
                // SAFETY: kill(2) has no memory effects; the group id is the PID of the child
                // we spawned with process_group(0) and have not reaped, so it is ours.
                unsafe { libc::kill(-pid, sig) };
            }
        }
    }

    fn kill(&mut self) {
        self.signal(libc::SIGTERM);
        let give_up = Instant::now() + Duration::from_secs(5);
        while Instant::now() < give_up {
            match self.child.as_mut().map(|c| c.try_wait()) {
                Some(Ok(None)) => thread::sleep(Duration::from_millis(50)),
                _ => return,
            }
        }
        self.signal(libc::SIGKILL);
    }

    fn wait(&mut self) -> io::Result<ExitStatus> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| io::Error::other("already waited"))?;
        child.wait()
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.kill();
            if let Some(mut child) = self.child.take() {
                let _ = child.wait();
            }
        }
    }
}

/// One line of L1's console, with the time it arrived (from the start of the script).
#[derive(Debug, Clone)]
pub struct Line {
    pub at: Duration,
    pub text: String,
}

/// How a lab run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// L1's init printed `LAB-EXIT <status>`: the scenario script's exit status.
    Exited(i32),
    /// The scenario's timeout (or the fixture's) killed L1.
    Timeout,
    /// No `LAB-EXIT`: setup failed (see the script's messages) or L1 crashed.
    NoExit(ExitStatus),
    /// L1's kernel reported a soft lockup, or the console went silent for minutes: an L1
    /// vCPU is stuck running L2 (nested SVM emulated by TCG; seen with QEMU as the L2 VMM
    /// as well as with ours) and L1 was killed.
    L1Lockup,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Exited(code) => write!(f, "scenario exited with status {code}"),
            Outcome::Timeout => write!(f, "timed out"),
            Outcome::L1Lockup => {
                write!(f, "L1 soft lockup (a vCPU stuck in nested virtualization)")
            }
            Outcome::NoExit(status) => write!(
                f,
                "no LAB-EXIT marker: the lab could not be set up or L1 crashed (script {status})"
            ),
        }
    }
}

/// The record of one lab boot.
#[derive(Debug)]
pub struct LabRun {
    pub name: String,
    pub outcome: Outcome,
    /// L1's console (CRs and terminal escapes removed).
    pub lines: Vec<Line>,
    /// The lab script's own messages (`lab: ...`, errors).
    pub script_lines: Vec<String>,
    /// From starting the script to its end (includes image checks and L1's boot).
    pub duration: Duration,
    /// The console log file.
    pub log: PathBuf,
}

impl LabRun {
    /// The scenario exited with status 0.
    pub fn success(&self) -> bool {
        self.outcome == Outcome::Exited(0)
    }

    /// The first console line starting with `prefix`.
    pub fn find(&self, prefix: &str) -> Option<&Line> {
        self.lines.iter().find(|l| l.text.starts_with(prefix))
    }

    /// L1 came up (`LAB-INIT`) and then locked up or died without finishing the scenario:
    /// the lab's nested-virtualization flake, not a verdict on the scenario.
    pub fn l1_died(&self) -> bool {
        matches!(self.outcome, Outcome::L1Lockup | Outcome::NoExit(_))
            && self.find("LAB-INIT").is_some()
    }

    /// What the scenario reported as the lab's own flake (`LAB-FLAKE <why>`), not a verdict on
    /// the code under test: e.g. the reference VMM (QEMU) losing its L2 mid-output. Only
    /// scenarios that can tell print it.
    pub fn flake(&self) -> Option<&str> {
        self.field("LAB-FLAKE")
    }

    /// The L2s that died in a shutdown exit (a triple fault), from L1's KVM trace
    /// (`lab_l2_shutdowns` in `scripts/lab/lab-lib.sh`): one line each, with the guest's
    /// RIP and the function L1 found there.
    pub fn l2_triple_faults(&self) -> Vec<String> {
        let names = rip_names(self.lines.iter().map(|l| l.text.as_str()));
        self.lines
            .iter()
            .filter_map(|l| {
                let (vcpu, rip) = shutdown_exit(&l.text)?;
                Some(format!(
                    "{}{}",
                    name_shutdown(vcpu, rip, &names),
                    trace_vmm(&l.text).map_or(String::new(), |v| format!(", under {v}"))
                ))
            })
            .collect()
    }

    /// Why this run says nothing about the code under test, if it does not: L1 died
    /// ([`LabRun::l1_died`]), L1's kernel panicked before its init (seen under load: "timer
    /// doesn't work through Interrupt-remapped IO-APIC"), the script reported the lab's
    /// flake ([`LabRun::flake`]), or the run failed with an L2 triple fault in L1's trace.
    /// The last is counted, not explained: the soak (`scripts/soak`) sets our vmm's rate
    /// against QEMU's in the same L1s, and each one is logged with the guest's RIP.
    pub fn lab_loss(&self) -> Option<String> {
        if self.l1_died() {
            let mut why = self.outcome.to_string();
            // What else the run knows: an L1 whose kernel answered the NMI was alive and its
            // scenario merely quiet (a wait in the script, e.g. on a guest that died), and a
            // guest that crashed before is named.
            if self.find("L1-AFTER-NMI L1's kernel answered").is_some() {
                why.push_str(
                    "; but L1 was alive: its kernel answered an NMI, the scenario was quiet",
                );
            }
            if let Some(l) = self
                .lines
                .iter()
                .find(|l| l.text.contains("guest crashed:"))
            {
                why.push_str(&format!("; before that: {}", l.text.trim()));
            }
            return Some(why);
        }
        if self.find("LAB-INIT").is_none()
            && self.lines.iter().any(|l| l.text.contains("Kernel panic"))
        {
            return Some("L1's kernel panicked before its init".into());
        }
        if let Some(f) = self.flake() {
            return Some(format!("the lab's flake: {f}"));
        }
        let shutdowns = self.l2_triple_faults();
        if !self.success() && !shutdowns.is_empty() {
            return Some(format!("an L2 triple-faulted: {}", shutdowns.join("; ")));
        }
        None
    }

    /// Says loudly that this run is run again and why, keeps its log as
    /// `<name>.rerun-<attempt>.log` and appends the reason to `logs/reruns.log` (which
    /// `scripts/test` prints at its end).
    pub fn note_rerun(&self, why: &str, attempt: u32) {
        eprintln!(
            "lab: WARNING: scenario {}: {why} (attempt {attempt} of {L1_ATTEMPTS}); running it again",
            self.name
        );
        let logs = lab_dir().join("logs");
        let kept = logs.join(format!("{}.rerun-{attempt}.log", self.name));
        let _ = fs::copy(&self.log, &kept);
        // The console log lacks what the fixture found itself (a silent L1's registers, its
        // QEMU's threads, the NMI's answer): kept with it.
        let evidence: String = self
            .lines
            .iter()
            .filter(|l| {
                [
                    "L1-REGS",
                    "L1-RIP-NAME",
                    "L1-UART",
                    "L1-AFTER-NMI",
                    "L1-STALL-REVIVED",
                    "L1-HOST-",
                ]
                .iter()
                .any(|p| l.text.starts_with(p))
            })
            .map(|l| format!("{}\n", l.text))
            .collect();
        if !evidence.is_empty() {
            let _ = fs::OpenOptions::new()
                .append(true)
                .open(&kept)
                .and_then(|mut f| {
                    io::Write::write_all(
                        &mut f,
                        format!("--- the lab fixture's findings ---\n{evidence}").as_bytes(),
                    )
                });
        }
        let line = format!(
            "{}: attempt {attempt}: {why} (log {})\n",
            self.name,
            kept.display()
        );
        let _ = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(logs.join("reruns.log"))
            .and_then(|mut f| io::Write::write_all(&mut f, line.as_bytes()));
    }

    /// The network checks the L2 scripts of the device tests share: `L2-VAL ping` reports 100
    /// packets with no loss, and the sha256 of each transfer (`L2-VAL guest-up-sha` against
    /// `LAB-VAL host-up-sha`, and the same for `down`) agrees on both ends.
    pub fn assert_ping_and_transfers(&self) {
        let ping = self.require("L2-VAL ping");
        assert!(
            ping.starts_with("100 packets transmitted, 100 packets received, 0% packet loss"),
            "{ping}"
        );
        for dir in ["up", "down"] {
            assert_eq!(
                self.require(&format!("L2-VAL guest-{dir}-sha")),
                self.require(&format!("LAB-VAL host-{dir}-sha")),
                "{dir}load corrupted"
            );
        }
    }

    /// The value of the `key value` line; panics with the run's report when there is none.
    pub fn require(&self, key: &str) -> &str {
        match self.field(key) {
            Some(v) => v,
            None => panic!("no '{key}' line in the lab output\n{}", self.report()),
        }
    }

    /// The rest of the first console line that starts with the word `key` (`key value...`).
    pub fn field(&self, key: &str) -> Option<&str> {
        self.lines.iter().find_map(|l| {
            l.text
                .strip_prefix(key)
                .filter(|rest| rest.is_empty() || rest.starts_with(' '))
                .map(str::trim)
        })
    }

    /// The value of `LAB-VAL <name> <value>`.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.field(&format!("LAB-VAL {name}"))
    }

    /// The seconds of `LAB-T <name> <seconds>`.
    pub fn timing(&self, name: &str) -> Option<f64> {
        self.field(&format!("LAB-T {name}"))?.parse().ok()
    }

    /// Check names that printed `LAB-FAIL`.
    pub fn failures(&self) -> Vec<&str> {
        self.lines
            .iter()
            .filter_map(|l| l.text.strip_prefix("LAB-FAIL "))
            .collect()
    }

    /// The outcome, failed checks and the console's last lines, for assertion messages.
    pub fn report(&self) -> String {
        let tail: Vec<&str> = self
            .lines
            .iter()
            .rev()
            .take(40)
            .map(|l| l.text.as_str())
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        let errors: Vec<&str> = self
            .script_lines
            .iter()
            .map(String::as_str)
            .filter(|l| l.contains("error") || l.contains("TIMEOUT") || l.contains("without"))
            .collect();
        let shutdowns = self.l2_triple_faults();
        format!(
            "lab scenario {}: {} after {:.1} s\nfailed checks: {:?}\n{}lab script: {}\n\
             last console lines:\n  {}\nfull log: {}\nrerun by hand: scripts/lab/run {}",
            self.name,
            self.outcome,
            self.duration.as_secs_f64(),
            self.failures(),
            if shutdowns.is_empty() {
                String::new()
            } else {
                format!(
                    "L2 triple faults (L1's trace):\n  {}\n",
                    shutdowns.join("\n  ")
                )
            },
            if errors.is_empty() {
                "-".to_string()
            } else {
                errors.join(" | ")
            },
            tail.join("\n  "),
            self.log.display(),
            lab_dir().join("scenarios").join(&self.name).display(),
        )
    }

    /// Panic (with the reason, failed checks and the end of the console) unless the scenario
    /// exited 0.
    pub fn assert_success(&self) {
        assert!(self.success(), "{}", self.report());
    }

    /// Panic unless the console has `LAB-OK <check>`.
    pub fn assert_ok(&self, check: &str) {
        let ok = format!("LAB-OK {check}");
        assert!(
            self.lines.iter().any(|l| l.text.trim_end() == ok),
            "check {check} did not pass\n{}",
            self.report()
        );
    }

    /// Panic unless a console line starts with `prefix`; returns it.
    pub fn assert_line(&self, prefix: &str) -> &Line {
        match self.find(prefix) {
            Some(line) => line,
            None => panic!("no console line starts with {prefix:?}\n{}", self.report()),
        }
    }
}

/// A Linux guest image for a VMM running directly on this host (not inside L1): Debian's
/// cloud kernel and the lab's L2 initramfs with `script` as its `/lab/scenario.sh`, whose
/// init prints `L2-INIT`, runs the script, prints `L2-EXIT <status>` and powers off.
pub struct DirectGuest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl DirectGuest {
    /// Builds the initramfs under `dir` (the images are built or reused first).
    pub fn new(dir: &Path, script: &str) -> Result<DirectGuest, String> {
        Self::with_files(dir, script, &[])
    }

    /// As [`DirectGuest::new`], with extra files in the initramfs: `(path, contents)`,
    /// paths relative to its root (`frag/1`), directories created as needed.
    pub fn with_files(
        dir: &Path,
        script: &str,
        files: &[(String, Vec<u8>)],
    ) -> Result<DirectGuest, String> {
        build_images()?;
        let images = lab_dir().join("images");
        let stage = dir.join("l2-stage");
        let lab = stage.join("lab");
        fs::create_dir_all(&lab).map_err(|e| format!("{}: {e}", lab.display()))?;
        fs::write(lab.join("scenario.sh"), script).map_err(|e| format!("scenario: {e}"))?;
        for (path, contents) in files {
            let dst = stage.join(path.trim_start_matches('/'));
            if let Some(parent) = dst.parent() {
                fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
            }
            fs::write(&dst, contents).map_err(|e| format!("{}: {e}", dst.display()))?;
        }
        let extra = dir.join("l2-extra.cpio");
        // `find . | busybox cpio -o -H newc`, as scripts/lab does.
        let out = Command::new("sh")
            .arg("-c")
            .arg("find . | busybox cpio -o -H newc")
            .current_dir(&stage)
            .output()
            .map_err(|e| format!("cannot run busybox cpio: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "busybox cpio failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        fs::write(&extra, &out.stdout).map_err(|e| format!("{}: {e}", extra.display()))?;
        let mut initrd = fs::read(images.join("l2-base.cpio"))
            .map_err(|e| format!("{}: {e}", images.join("l2-base.cpio").display()))?;
        initrd.extend_from_slice(&out.stdout);
        let initrd_path = dir.join("initrd.img");
        fs::write(&initrd_path, initrd).map_err(|e| format!("{}: {e}", initrd_path.display()))?;
        Ok(DirectGuest {
            kernel: images.join("l2-vmlinuz"),
            initrd: initrd_path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_of(outcome: Outcome, lines: &[&str]) -> LabRun {
        LabRun {
            name: "t".into(),
            outcome,
            lines: lines
                .iter()
                .map(|t| Line {
                    at: Duration::ZERO,
                    text: t.to_string(),
                })
                .collect(),
            script_lines: Vec::new(),
            duration: Duration::ZERO,
            log: PathBuf::new(),
        }
    }

    /// L1's QEMU threads from the host: names with spaces and parentheses parsed, CPU
    /// shares computed, and the verdict on the vCPU threads.
    #[test]
    fn a_silent_l1s_qemu_threads_are_read_from_proc() {
        let t = parse_task_stat(
            7,
            "7 (CPU 0/TCG (x)) R 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 4 0",
        )
        .unwrap();
        assert_eq!(
            (t.comm.as_str(), t.state, t.ticks),
            ("CPU 0/TCG (x)", 'R', 300)
        );
        // This process: its own threads are found, with a state and a syscall field.
        let me = host_threads(std::process::id()).unwrap();
        assert!(!me.is_empty());
        assert!(me.iter().all(|t| t.state != '\0' && !t.syscall.is_empty()));
        let hz = clock_ticks_per_second();
        let th = |tid, comm: &str, ticks| HostThread {
            tid,
            comm: comm.into(),
            state: 'S',
            ticks,
            syscall: "202".into(),
        };
        let a = [
            th(1, "qemu-system-x86", 0),
            th(2, "CPU 0/TCG", 0),
            th(3, "CPU 1/TCG", 0),
        ];
        let idle = host_thread_lines(&a, &a, Duration::from_secs(1));
        assert_eq!(idle.len(), 4);
        assert!(
            idle[1].contains("'CPU 0/TCG' state=S cpu=0% syscall=202"),
            "{idle:?}"
        );
        assert!(idle[3].starts_with("L1-HOST-VCPUS all 2 idle"), "{idle:?}");
        let b = [
            th(1, "qemu-system-x86", 0),
            th(2, "CPU 0/TCG", hz),
            th(3, "CPU 1/TCG", 0),
        ];
        let one = host_thread_lines(&a, &b, Duration::from_secs(1));
        assert!(one[1].contains("cpu=100%"), "{one:?}");
        assert_eq!(one[3], "L1-HOST-VCPUS 1 of 2 executing");
    }

    fn clock_ticks_per_second() -> u64 {
        // SAFETY: sysconf has no memory-safety preconditions.
        unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64
    }

    /// A silent L1's RIPs get named: one in the kernel (moved by KASLR), one in a KVM
    /// module's `.text`, one nowhere; with a module assembled here (`as`) and a kallsyms.
    #[test]
    fn a_silent_l1s_rips_are_named_from_its_kernel_and_modules() {
        let dir = std::env::temp_dir().join(format!("l1-rips-{}", std::process::id()));
        let rel = "6.1.0-test-amd64";
        let tree = dir.join(rel);
        let mods = tree
            .join("lib/modules")
            .join(rel)
            .join("kernel/arch/x86/kvm");
        fs::create_dir_all(&mods).unwrap();

        // An earlier L1 boot's kallsyms (its own KASLR slide), with a module's line.
        let kallsyms = dir.join("l1-kallsyms");
        fs::write(
            &kallsyms,
            "ffffffffa5000000 T _text\nffffffffa5001000 T native_safe_halt\n\
             ffffffffa5001100 t helper\nffffffffa5002000 D some_data\n\
             ffffffffa5003000 T _etext\nffffffffc0a00000 t svm_vcpu_run\t[kvm_amd]\n",
        )
        .unwrap();
        let src = dir.join("m.s");
        fs::write(
            &src,
            ".text\n.globl svm_vcpu_run\n.type svm_vcpu_run,@function\nsvm_vcpu_run:\n\
             .fill 64,1,0x90\n.size svm_vcpu_run,64\n.type svm_other,@function\nsvm_other:\n\
             .fill 32,1,0x90\n.size svm_other,32\n",
        )
        .unwrap();
        let ko = mods.join("kvm-amd.ko");
        let ok = Command::new("as")
            .arg("-o")
            .arg(&ko)
            .arg(&src)
            .status()
            .unwrap();
        assert!(ok.success());
        let regs: Vec<String> = [
            "CPU#0",
            "RAX=0 RBX=0",
            "RIP=ffffffff91001104 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1",
            "CPU#1",
            "RIP=ffffffffc0a00048 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=0",
            "CPU#2",
            "RIP=00007f0000001000 RFL=00000246",
        ]
        .iter()
        .map(|l| format!("L1-REGS {l}"))
        .collect();
        let kmap = format!(
            "LAB-KMAP {rel} vmlinux:_text=0xffffffff91000000 kvm_amd:.text=0xffffffffc0a00000 \
             kvm:.text=0xffffffffc0b00000"
        );
        let named = name_l1_rips(&regs, &kmap, &dir, &kallsyms);
        // A CPU running an L2 of the same build (no KASLR there) is named as such.
        let l2 = name_l1_rips(
            &["L1-REGS RIP=ffffffff81001000".to_string()],
            &kmap,
            &dir,
            &kallsyms,
        );
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            l2,
            [
                "L1-RIP-NAME CPU#? rip 0xffffffff81001000 native_safe_halt+0x0 (an L2 kernel of \
              the same build, no KASLR)"
            ]
        );
        assert_eq!(
            named,
            [
                "L1-RIP-NAME CPU#0 rip 0xffffffff91001104 helper+0x4 (L1 kernel)",
                "L1-RIP-NAME CPU#1 rip 0xffffffffc0a00048 svm_other+0x8 (kvm_amd .text)",
                "L1-RIP-NAME CPU#2 rip 0x7f0000001000 (not named: outside the kernel's and \
                 the KVM modules' text)",
            ]
        );
    }

    #[test]
    fn flakes_and_dead_l1s_are_told_from_verdicts() {
        let flaky = run_of(
            Outcome::Exited(1),
            &[
                "LAB-INIT 6.5",
                "LAB-FLAKE msix: QEMU's L2 ended without L2-EXIT",
                "LAB-FAIL msix-l2-exit",
            ],
        );
        assert_eq!(flaky.flake(), Some("msix: QEMU's L2 ended without L2-EXIT"));
        assert!(!flaky.l1_died());

        let failed = run_of(Outcome::Exited(1), &["LAB-INIT 6.5", "LAB-FAIL x"]);
        assert_eq!(failed.flake(), None);
        assert!(!failed.l1_died());

        assert!(run_of(Outcome::L1Lockup, &["LAB-INIT 6.5"]).l1_died());
        // An L1 that never came up is a set-up failure, not the flake.
        assert!(!run_of(Outcome::L1Lockup, &["qemu: error"]).l1_died());
        // A word that only starts with the marker is not one.
        assert_eq!(run_of(Outcome::Exited(0), &["LAB-FLAKES x"]).flake(), None);
    }

    #[test]
    fn l2_triple_faults_come_from_l1s_trace_and_fail_only_failed_runs() {
        let shutdown = "L1-TRACE  CPU 0/KVM-812 [001] d.... 88.10: kvm_exit: vcpu 1 reason \
                        shutdown rip 0xffffffff81a0b2c3 info1 0x0000000000000000 info2 0x0";
        assert_eq!(shutdown_exit(shutdown), Some((1, 0xffff_ffff_81a0_b2c3)));
        // Whose vCPU thread: QEMU's (CPU n/KVM, or its main thread) or ours (vcpuN).
        assert_eq!(trace_vmm(shutdown), Some("QEMU"));
        assert_eq!(
            trace_vmm("L1-TRACE  qemu-system-x86-199     [000] ..... 40.1: kvm_exit: vcpu 1"),
            Some("QEMU")
        );
        assert_eq!(
            trace_vmm("L1-TRACE            vcpu0-758     [000] ..... 45.7: kvm_inj_exception"),
            Some("our vmm")
        );
        assert_eq!(trace_vmm("L1-TRACE  sh-12 [000] x"), None);
        // Other exits, other events, and the same words outside a trace line are none.
        assert_eq!(
            shutdown_exit("L1-TRACE x: kvm_exit: vcpu 0 reason npf rip 0x1 info1 0"),
            None
        );
        assert_eq!(
            shutdown_exit("L1-TRACE x: kvm_inj_exception: #GP (0x0)"),
            None
        );
        assert_eq!(
            shutdown_exit("kvm_exit: vcpu 0 reason shutdown rip 0x1"),
            None
        );
        assert_eq!(
            shutdown_exit("L1-TRACE x: kvm_exit: vcpu 0 reason TRIPLE_FAULT rip 0x10 info1 0"),
            Some((0, 0x10))
        );

        let failed = run_of(
            Outcome::Exited(2),
            &["LAB-INIT 6.5", "LAB-FAIL m2-vmm-exit", shutdown],
        );
        assert_eq!(failed.l2_triple_faults().len(), 1);
        assert_eq!(
            failed.l2_triple_faults(),
            vec!["vcpu 1 rip 0xffffffff81a0b2c3 (not named), under QEMU".to_string()]
        );
        let why = failed.lab_loss().unwrap_or_default();
        assert!(why.starts_with("an L2 triple-faulted: vcpu 1"), "{why}");
        assert!(failed.report().contains("L2 triple faults (L1's trace)"));
        // A scenario that passed with a triple fault in it (one that provokes them) stands.
        let passed = run_of(Outcome::Exited(0), &["LAB-INIT 6.5", shutdown]);
        assert_eq!(passed.lab_loss(), None);
        // A plain failure is a verdict.
        let plain = run_of(Outcome::Exited(1), &["LAB-INIT 6.5", "LAB-FAIL x"]);
        assert_eq!(plain.lab_loss(), None);
        // An L1 that panicked before its init is the lab's.
        let early = run_of(
            Outcome::NoExit(ExitStatus::default()),
            &["Kernel panic - not syncing: IO-APIC + timer doesn't work!"],
        );
        assert!(early.lab_loss().is_some());
    }

    #[test]
    fn shutdown_rips_are_named_as_l1_named_them() {
        let names = rip_names(
            [
                "L1-RIP ffffffff8106b299 native_machine_emergency_restart+0x39",
                "L1-RIP nothex x+0x1",
                "L1-RIPS ffffffff81000000 y+0x0",
                "L1-RIP ffffffffc0651f7c (not in the kernel image: a module?)",
            ]
            .into_iter(),
        );
        assert_eq!(names.len(), 2);
        assert_eq!(
            name_shutdown(0, 0xffff_ffff_c065_1f7c, &names),
            "vcpu 0 rip 0xffffffffc0651f7c (not in the kernel image: a module?)"
        );
        assert_eq!(
            name_shutdown(0, 0xffff_ffff_8106_b299, &names),
            "vcpu 0 rip 0xffffffff8106b299: native_machine_emergency_restart+0x39 in the \
             generic kernel (if L2 ran it)"
        );
        assert_eq!(
            name_shutdown(1, 0x10, &names),
            "vcpu 1 rip 0x10 (not named)"
        );
    }
}
