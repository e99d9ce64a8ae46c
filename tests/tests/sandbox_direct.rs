//! The vmm's sandbox (seccomp per thread kind, Landlock), on by default, proven with the
//! real `vmm` binary on this host's /dev/kvm and the ring-3 test guest:
//!
//! - every thread of a vmm running an in-VMM disk, an in-VMM NIC on a tap (in a network
//!   namespace the test makes), a disk served by our vhost-user-blk daemon, the API and the
//!   watchdog has `Seccomp: 2` and `NoNewPrivs: 1`, and each thread kind is there;
//! - a block queue thread that makes a syscall outside its filter (the hidden
//!   `--sandbox-selftest syscall`) kills the vmm with one line naming the thread and the
//!   syscall; with `--seccomp log` the same line, and the guest runs to its end;
//! - the same thread opening a file outside the Landlock set gets EACCES (and opens it
//!   with `--landlock off`, so the test tells the sandbox from the file's permissions);
//! - `vm.add-disk` of an image outside the set is refused with one line naming the path and
//!   `--landlock-rules`, the VM runs on; inside a `--landlock-rules` directory it is added.
//!
//! Needs /dev/kvm and root (network namespaces, taps); a missing piece is a failure.

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tests::guest::test_guest_elf;
use tests::host::{Daemon, NetNs, ScratchDir, Tap};
use tests::probe::{self, run_probe, run_probe_watching, stamp_image, ProbeConfig, ProbeOutput};

const SEED: u64 = 0x5a0d_b0c5;
const IMAGE_SIZE: u64 = 32 << 20;
const TIMEOUT: Duration = Duration::from_secs(120);

fn bin(name: &str) -> PathBuf {
    let p = tests::lab::profile_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: build the workspace binaries first (cargo build --workspace --bins)",
        p.display()
    );
    p
}

fn elf() -> PathBuf {
    let p = test_guest_elf();
    assert!(p.is_file(), "test guest missing at {}", p.display());
    p
}

/// One thread of a process, from /proc/PID/task/TID/status.
#[derive(Debug, Clone)]
struct ThreadStatus {
    tid: u32,
    name: String,
    seccomp: String,
    no_new_privs: String,
}

/// The threads of `pid` now (a thread that ends while it is read is left out).
fn threads(pid: u32) -> Vec<ThreadStatus> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        out.push(ThreadStatus {
            tid: e.file_name().to_string_lossy().parse().unwrap_or(0),
            name: field("Name:"),
            seccomp: field("Seccomp:"),
            no_new_privs: field("NoNewPrivs:"),
        });
    }
    out
}

/// What the watch of a run saw once the main thread had confined itself (the last step
/// of the boot): every thread name, and every thread that was not confined.
#[derive(Default)]
struct Seen {
    samples: usize,
    names: BTreeSet<String>,
    unconfined: Vec<ThreadStatus>,
    /// The API socket to pause and resume the VM through, once, while it runs: the device
    /// threads park under their filters.
    pause_api: Option<PathBuf>,
    paused: Vec<String>,
    /// Samples of the current run.
    run_samples: usize,
}

impl Seen {
    fn watch(&mut self, pid: u32) {
        let ts = threads(pid);
        let main_confined = ts.iter().any(|t| t.tid == pid && t.seccomp == "2");
        if !main_confined {
            return;
        }
        self.samples += 1;
        self.run_samples += 1;
        if self.run_samples == 3 {
            if let Some(api) = self.pause_api.take() {
                for what in ["pause", "resume"] {
                    let o = Command::new(bin("vmm-remote"))
                        .arg("--api-socket")
                        .arg(&api)
                        .arg(what)
                        .output()
                        .expect("run vmm-remote");
                    self.paused.push(format!(
                        "{what}: {} {}",
                        o.status,
                        String::from_utf8_lossy(&o.stderr).trim()
                    ));
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        for t in ts {
            if t.seccomp != "2" || t.no_new_privs != "1" {
                self.unconfined.push(t.clone());
            }
            self.names.insert(t.name);
        }
    }
}

fn assert_guest_ok(out: &ProbeOutput, what: &str) {
    assert_eq!(
        out.guest_exit_code(),
        Some(0),
        "{what}: exit status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    let results = out
        .results()
        .unwrap_or_else(|e| panic!("{what}: {e}\nstdout:\n{}", out.stdout));
    assert!(!results.is_empty(), "{what}: no probe result");
    for r in &results {
        assert!(r.ok(), "{what}: {r:?}");
    }
}

/// A disk image, its vhost-user-blk daemon, a tap in a namespace: the devices of the
/// first test, cleaned up by their drops whatever happens.
struct Rig {
    dir: ScratchDir,
    ns: NetNs,
    _tap: Tap,
    tap_name: String,
    daemon: Daemon,
    vu_sock: PathBuf,
    disk: PathBuf,
}

impl Rig {
    fn new() -> Rig {
        let ns = NetNs::new("sbxns").expect("network namespace");
        let mut tap = Tap::new("sbxtap").expect("tap");
        tap.move_to(&ns).expect("move tap");
        tap.add_addr("192.0.2.1/24").expect("tap address");
        tap.up().expect("tap up");
        let tap_name = tap.name().to_string();
        let dir = ScratchDir::new("sandbox").expect("scratch dir");
        let disk = dir.join("disk.img");
        stamp_image(&disk, IMAGE_SIZE, SEED).expect("stamp image");
        let vu_img = dir.join("vu.img");
        stamp_image(&vu_img, IMAGE_SIZE, SEED).expect("stamp image");
        let vu_sock = dir.join("blk.sock");
        let mut daemon = Daemon::spawn(
            "sandbox-vu-blk",
            Command::new(bin("vhost-user-blk"))
                .arg("--socket-path")
                .arg(&vu_sock)
                .arg("--blk-file")
                .arg(&vu_img),
        )
        .expect("start vhost-user-blk");
        daemon
            .wait_for_path(&vu_sock, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{e}"));
        Rig {
            dir,
            ns,
            _tap: tap,
            tap_name,
            daemon,
            vu_sock,
            disk,
        }
    }

    /// The vmm in the namespace with every device, the API and the watchdog.
    fn vmm(&self, cfg: &ProbeConfig, api: &Path) -> Command {
        let mut cmd = self.ns.command(bin("vmm"));
        cmd.args(probe::vmm_args(&elf(), cfg))
            .args(["--disk", &probe::vmm_disk_arg(&self.disk)])
            .args(["--net", &format!("tap={}", self.tap_name)])
            .arg("--vhost-user-blk")
            .arg(format!("socket={}", self.vu_sock.display()))
            .arg("--api-socket")
            .arg(format!("path={}", api.display()))
            .args(["--watchdog", "1"]);
        cmd
    }
}

#[test]
fn every_vmm_thread_is_confined_with_disk_nic_vhost_user_disk_api_and_watchdog() {
    let mut rig = Rig::new();
    // The in-VMM disk's queue thread: the blk probe drives the first virtio-blk (the
    // in-VMM disk), long enough to be watched.
    let cfg = ProbeConfig::blk(20_000, SEED, "read,qd32");
    let api = rig.dir.join("api-a.sock");
    let mut seen = Seen {
        pause_api: Some(api.clone()),
        ..Seen::default()
    };
    let out = run_probe_watching(
        &mut rig.vmm(&cfg, &api),
        TIMEOUT,
        Duration::from_millis(20),
        &mut |pid| seen.watch(pid),
    )
    .expect("vmm run (blk probe)");
    assert_guest_ok(&out, "blk probe");
    // vm.pause parked the queue threads (a poll on their stop eventfd) under their filters.
    assert_eq!(seen.paused.len(), 2, "{:?}", seen.paused);
    assert!(
        seen.paused.iter().all(|p| p.contains("exit status: 0")),
        "{:?}",
        seen.paused
    );
    // The NIC's queue thread: the net probe, paused and resumed too.
    let cfg = ProbeConfig::net(3000, "192.0.2.2", "192.0.2.1");
    let api = rig.dir.join("api-b.sock");
    seen.pause_api = Some(api.clone());
    seen.paused.clear();
    seen.run_samples = 0;
    let out = run_probe_watching(
        &mut rig.vmm(&cfg, &api),
        TIMEOUT,
        Duration::from_millis(20),
        &mut |pid| seen.watch(pid),
    )
    .expect("vmm run (net probe)");
    assert_guest_ok(&out, "net probe");
    assert_eq!(seen.paused.len(), 2, "{:?}", seen.paused);
    assert!(
        seen.samples >= 4,
        "the runs were too short to watch ({} samples)",
        seen.samples
    );
    assert!(
        seen.unconfined.is_empty(),
        "threads without Seccomp: 2 / NoNewPrivs: 1 once the boot was over: {:#?}",
        seen.unconfined
    );
    // Each thread kind: main/control, vCPU, block queue, NIC queue pair, vhost-user
    // control and reply watchdog, signals, API, watchdog.
    for name in [
        "vmm",
        "vcpu0",
        "disk0-q0",
        "net0-p0",
        "vublk0-vu",
        "vublk0-vuwd",
        "signals",
        "api",
        "watchdog",
    ] {
        assert!(
            seen.names.contains(name),
            "no thread '{name}' seen; threads: {:?}",
            seen.names
        );
    }
    assert!(rig.daemon.is_running(), "daemon: {}", rig.daemon.log());
}

/// The blk probe on an in-VMM disk with extra vmm arguments.
fn blk_run(dir: &ScratchDir, extra: &[&str]) -> ProbeOutput {
    let img = dir.join("disk.img");
    stamp_image(&img, IMAGE_SIZE, SEED).expect("stamp image");
    let cfg = ProbeConfig::blk(500, SEED, "read");
    let mut cmd = probe::vmm_command(&bin("vmm"), &elf(), &cfg);
    cmd.args(["--disk", &probe::vmm_disk_arg(&img)]).args(extra);
    run_probe(&mut cmd, TIMEOUT).expect("vmm run")
}

fn seccomp_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.starts_with("vmm: seccomp: "))
        .collect()
}

#[test]
fn a_queue_thread_outside_its_filter_kills_the_vmm_with_one_line() {
    let dir = ScratchDir::new("sandbox-kill").expect("scratch dir");
    let out = blk_run(&dir, &["--sandbox-selftest", "syscall"]);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSYS),
        "the vmm must die of SIGSYS: {}\nstderr:\n{}",
        out.status,
        out.stderr
    );
    let lines = seccomp_lines(&out.stderr);
    assert_eq!(lines.len(), 1, "one report line:\n{}", out.stderr);
    let l = lines[0];
    assert!(
        l.contains("thread 'blk-queue' (tid ")
            && l.contains("made syscall getpgid (121), not in its filter: process killed"),
        "{l}"
    );
    assert!(
        !out.stderr.contains("sandbox selftest: getpgid"),
        "the syscall must not have returned:\n{}",
        out.stderr
    );
}

#[test]
fn with_seccomp_log_the_line_is_printed_and_the_guest_runs_on() {
    let dir = ScratchDir::new("sandbox-log").expect("scratch dir");
    let out = blk_run(&dir, &["--sandbox-selftest", "syscall", "--seccomp", "log"]);
    assert_guest_ok(&out, "seccomp log");
    let lines = seccomp_lines(&out.stderr);
    assert_eq!(lines.len(), 1, "one report line:\n{}", out.stderr);
    assert!(
        lines[0].contains("thread 'blk-queue' (tid ")
            && lines[0]
                .contains("made syscall getpgid (121), not in its filter: allowed (--seccomp log)"),
        "{}",
        lines[0]
    );
    assert!(
        out.stderr
            .contains("sandbox selftest: getpgid(0) returned "),
        "{}",
        out.stderr
    );
    // The default list of this workload is complete: nothing else was reported.
}

#[test]
fn a_queue_thread_opening_a_path_outside_landlock_gets_eacces() {
    let dir = ScratchDir::new("sandbox-open").expect("scratch dir");
    let secret = dir.join("not-on-the-command-line");
    std::fs::write(&secret, b"x").expect("write a file");
    let arg = format!("open:{}", secret.display());
    // Seccomp off: the open(2) itself is outside the queue thread's filter, and here
    // Landlock alone must refuse it.
    let out = blk_run(&dir, &["--sandbox-selftest", &arg, "--seccomp", "off"]);
    assert_guest_ok(&out, "landlock on");
    let want = format!(
        "sandbox selftest: open '{}': Permission denied (os error 13)",
        secret.display()
    );
    assert!(
        out.stderr.contains(&want),
        "{want}\nstderr:\n{}",
        out.stderr
    );
    assert!(seccomp_lines(&out.stderr).is_empty(), "{}", out.stderr);
    // The file itself is readable: without Landlock the same open succeeds.
    let out = blk_run(
        &dir,
        &[
            "--sandbox-selftest",
            &arg,
            "--seccomp",
            "off",
            "--landlock",
            "off",
        ],
    );
    assert_guest_ok(&out, "landlock off");
    let want = format!("sandbox selftest: open '{}': opened", secret.display());
    assert!(
        out.stderr.contains(&want),
        "{want}\nstderr:\n{}",
        out.stderr
    );
}

#[test]
fn hot_adding_a_disk_outside_landlock_is_refused_with_its_fix_and_inside_accepted() {
    let dir = ScratchDir::new("sandbox-hp").expect("scratch dir");
    let mk = |p: &Path| {
        std::fs::File::create(p)
            .and_then(|f| f.set_len(1 << 20))
            .expect("disk image");
    };
    let boot = dir.join("boot.img");
    mk(&boot);
    let declared = dir.join("declared");
    let elsewhere = dir.join("elsewhere");
    std::fs::create_dir_all(&declared).expect("mkdir");
    std::fs::create_dir_all(&elsewhere).expect("mkdir");
    let api = dir.join("api.sock");
    let mut cmd = Command::new(bin("vmm"));
    cmd.arg("--kernel")
        .arg(elf())
        .args([
            "--cmdline",
            "fault=halt",
            "--memory",
            "32M",
            "--serial",
            "off",
        ])
        .arg("--disk")
        .arg(format!("path={}", boot.display()))
        .arg("--api-socket")
        .arg(format!("path={}", api.display()))
        .arg("--landlock-rules")
        .arg(format!("path={},access=rw", declared.display()));
    let mut vm = Daemon::spawn("sandbox-hp-vmm", &mut cmd).expect("start vmm");
    vm.wait_for_path(&api, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    let remote = |args: &[&str]| {
        Command::new(bin("vmm-remote"))
            .arg("--api-socket")
            .arg(&api)
            .args(args)
            .output()
            .expect("run vmm-remote")
    };
    let outside = elsewhere.join("x.img");
    mk(&outside);
    let o = remote(&["add-disk", &format!("path={},id=out0", outside.display())]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "{o:?}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains(": 400: ")
            && err.contains(&format!("does not allow '{}'", outside.display()))
            && err.contains(&format!(
                "--landlock-rules path={},access=rw",
                outside.display()
            )),
        "{err}"
    );
    assert!(vm.is_running(), "the vmm must run on: {}", vm.log());
    let inside = declared.join("y.img");
    mk(&inside);
    let o = remote(&["add-disk", &format!("path={},id=in0", inside.display())]);
    assert!(o.status.success(), "{o:?}\nvmm:\n{}", vm.log());
    let info = remote(&["info"]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("vm.info JSON");
    assert_eq!(info["device_tree"]["in0"]["model"], "virtio-blk", "{info}");
    assert_eq!(info["config"]["sandbox"]["seccomp"], "on", "{info}");
    assert_eq!(info["config"]["sandbox"]["landlock"], true, "{info}");
    assert!(vm.is_running(), "{}", vm.log());
}
