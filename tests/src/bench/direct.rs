//! The direct matrix: the ring-3 probe guest on this host's /dev/kvm.
//!
//! Every (configuration, test) is its own boot of the probe, so that each boot's exits and
//! host CPU time belong to one test; a baseline boot per configuration (`n=1`, no warm-up)
//! is subtracted, which removes what booting and device set-up cost. Configurations are
//! interleaved run by run; all blk configurations read the same stamped, page-cached image.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use super::{clock_ticks, LoadMeter, Matrix, Model, Record};
use crate::host::{Daemon, NetNs, ScratchDir, Tap};
use crate::probe::{
    self, parse_results, run_probe_watching, stamp_image, tsc_hz, ExitStats, ProbeConfig,
};

/// What the direct matrix runs.
#[derive(Debug, Clone)]
pub struct DirectOptions {
    pub runs: u32,
    /// Measured operations of the QD1 tests (and of the net test).
    pub n: u32,
    /// Measured operations of the QD32 test.
    pub n_qd32: u32,
    /// `poll_us=` of our in-VMM devices and `--poll-us` of our daemons.
    pub poll_us: u32,
    /// Wait (up to a minute) for the machine to be idle before each run.
    pub wait_idle: bool,
    /// vCPU threads on CPU 1, the device threads (queue threads, iothread, vring workers) on
    /// CPU 0.
    pub pin: bool,
    /// Only the configurations whose "vmm configuration" text contains this.
    pub only: Option<String>,
    /// Our vmm and daemons with their sandbox off (`--seccomp off --landlock off`), to
    /// measure what it costs against a run with it on (the default).
    pub sandbox_off: bool,
}

/// The options that turn our binaries' sandbox off.
const SANDBOX_OFF: [&str; 4] = ["--seccomp", "off", "--landlock", "off"];

const SEED: u64 = 0x0062_656e_6368;
const IMAGE_SIZE: u64 = 64 << 20;
const TIMEOUT: Duration = Duration::from_secs(120);
const GUEST_IP: &str = "192.0.2.2";
/// How often a boot's threads are sampled (their CPU time is cumulative: this only bounds
/// what is lost of a thread that ends before the last sample).
const SAMPLE_EVERY: Duration = Duration::from_millis(10);
const PEER_IP: &str = "192.0.2.1";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    VmmDisk,
    VmmVhostUserBlk,
    QemuBlk,
    QemuVhostUserBlk,
    QemuStorageDaemon,
    VmmNet,
    VmmVhostUserNet,
    QemuNet,
}

impl Setup {
    const ALL: [Setup; 8] = [
        Setup::VmmDisk,
        Setup::VmmVhostUserBlk,
        Setup::QemuBlk,
        Setup::QemuVhostUserBlk,
        Setup::QemuStorageDaemon,
        Setup::VmmNet,
        Setup::VmmVhostUserNet,
        Setup::QemuNet,
    ];

    fn model(self) -> Model {
        match self {
            Setup::VmmDisk | Setup::QemuBlk | Setup::VmmNet | Setup::QemuNet => Model::InVmm,
            _ => Model::VhostUser,
        }
    }

    fn ours(self) -> bool {
        matches!(
            self,
            Setup::VmmDisk | Setup::VmmVhostUserBlk | Setup::VmmNet | Setup::VmmVhostUserNet
        )
    }

    /// The back-end is one of our daemons (behind our vmm or QEMU).
    fn ours_daemon(self) -> bool {
        matches!(
            self,
            Setup::VmmVhostUserBlk | Setup::QemuVhostUserBlk | Setup::VmmVhostUserNet
        )
    }

    fn net(self) -> bool {
        matches!(
            self,
            Setup::VmmNet | Setup::VmmVhostUserNet | Setup::QemuNet
        )
    }

    fn config(self, poll_us: u32) -> String {
        match self {
            Setup::VmmDisk => format!("virtio-blk in the vmm, poll_us={poll_us}"),
            Setup::VmmVhostUserBlk => format!("vhost-user-blk (ours, --poll-us {poll_us})"),
            Setup::QemuBlk => "virtio-blk, io_uring + iothread".into(),
            Setup::QemuVhostUserBlk => format!("vhost-user-blk (ours, --poll-us {poll_us})"),
            Setup::QemuStorageDaemon => "vhost-user-blk (qemu-storage-daemon)".into(),
            Setup::VmmNet => format!("virtio-net in the vmm, poll_us={poll_us}"),
            Setup::VmmVhostUserNet => format!("vhost-user-net (ours, --poll-us {poll_us})"),
            Setup::QemuNet => "virtio-net, tap, vhost=off".into(),
        }
    }

    fn tests(self) -> &'static [&'static str] {
        if self.net() {
            &["net"]
        } else {
            &["read", "write", "qd32"]
        }
    }
}

/// The probe's result name of a `tests=` word.
fn result_name(test: &str) -> &'static str {
    match test {
        "read" => "blk-read-qd1",
        "write" => "blk-write-qd1",
        "qd32" => "blk-read-qd32",
        _ => "net-icmp-rr",
    }
}

/// Per-thread CPU time (ns) of a process: vCPU threads and the others.
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    vcpu_ns: u64,
    other_ns: u64,
}

fn is_vcpu(name: &str) -> bool {
    name.starts_with("vcpu") || name.contains("/KVM")
}

/// A thread that runs a device's queues: ours (`disk0-q0`, `net0-p0`), the vhost-user
/// daemons' (`vring_worker`), QEMU's iothread (`IO io0`). Other threads (main loops, io_uring
/// workers) stay where the scheduler puts them.
fn is_device_thread(name: &str) -> bool {
    let ours = name.contains("-q") || name.contains("-p");
    (ours && (name.starts_with("disk") || name.starts_with("net")))
        || name == "vring_worker"
        || name.starts_with("IO ")
}

/// Samples the threads of `pid` (schedstat run time), pinning new ones when asked.
fn sample_threads(pid: u32, pin: bool, seen: &mut BTreeMap<u32, (bool, u64)>) {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for e in dir.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let base = format!("/proc/{pid}/task/{tid}");
        let name = fs::read_to_string(format!("{base}/comm")).unwrap_or_default();
        let ns = fs::read_to_string(format!("{base}/schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
            .unwrap_or(0);
        let vcpu = is_vcpu(name.trim());
        if pin && !seen.contains_key(&tid) {
            if vcpu {
                pin_thread(tid, 1);
            } else if is_device_thread(name.trim()) {
                pin_thread(tid, 0);
            }
        }
        let entry = seen.entry(tid).or_insert((vcpu, 0));
        entry.0 = vcpu;
        entry.1 = entry.1.max(ns);
    }
}

fn pin_thread(tid: u32, cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: sched_setaffinity reads `set` for the thread `tid`; a thread that is already
    // gone just makes it fail.
    unsafe {
        libc::sched_setaffinity(
            tid as libc::pid_t,
            std::mem::size_of::<libc::cpu_set_t>(),
            &set,
        )
    };
}

fn cpu_of(seen: &BTreeMap<u32, (bool, u64)>) -> Cpu {
    let mut c = Cpu::default();
    for (vcpu, ns) in seen.values() {
        if *vcpu {
            c.vcpu_ns += ns;
        } else {
            c.other_ns += ns;
        }
    }
    c
}

/// One probe boot: what it printed, the exit counters (ours), and CPU time.
struct Boot {
    stdout: String,
    status: Option<i32>,
    exits: Option<ExitStats>,
    vmm_cpu: Cpu,
    daemon_ns: u64,
}

/// Runs `cmd` to completion, sampling its threads (and the daemon's) every 2 ms.
fn boot(
    mut cmd: Command,
    stats: Option<&Path>,
    daemon: Option<u32>,
    pin: bool,
) -> Result<Boot, String> {
    let mut daemon_seen = BTreeMap::new();
    if let Some(d) = daemon {
        sample_threads(d, pin, &mut daemon_seen);
    }
    let daemon_before = cpu_of(&daemon_seen);
    let mut seen = BTreeMap::new();
    let out = run_probe_watching(&mut cmd, TIMEOUT, SAMPLE_EVERY, &mut |pid| {
        sample_threads(pid, pin, &mut seen);
        if let Some(d) = daemon {
            sample_threads(d, pin, &mut daemon_seen);
        }
    })
    .map_err(|e| e.to_string())?;
    if let Some(d) = daemon {
        sample_threads(d, pin, &mut daemon_seen);
    }
    let (stdout, stderr, status) = (out.stdout, out.stderr, out.status);
    let exits = match stats {
        Some(p) => Some(ExitStats::read(p).map_err(|e| format!("{e}\nstderr:\n{stderr}"))?),
        None => None,
    };
    let d = cpu_of(&daemon_seen);
    Ok(Boot {
        stdout,
        status: status.code(),
        exits,
        vmm_cpu: cpu_of(&seen),
        daemon_ns: (d.other_ns + d.vcpu_ns)
            .saturating_sub(daemon_before.other_ns + daemon_before.vcpu_ns),
    })
}

/// The processes one configuration needs for a run (daemon, namespace, tap).
struct Env {
    daemon: Option<Daemon>,
    ns: Option<NetNs>,
    tap: Option<Tap>,
    sock: PathBuf,
}

fn bin(name: &str) -> Result<PathBuf, String> {
    let p = crate::lab::profile_dir().join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "{} is missing: build the workspace binaries first (cargo build --release --workspace --bins)",
            p.display()
        ))
    }
}

fn start_env(
    setup: Setup,
    dir: &Path,
    img: &Path,
    poll_us: u32,
    sandbox_off: bool,
) -> Result<Env, String> {
    let e = |what: &str, err: std::io::Error| format!("{what}: {err}");
    let sock = dir.join(format!("{setup:?}.sock"));
    let mut env = Env {
        daemon: None,
        ns: None,
        tap: None,
        sock: sock.clone(),
    };
    if setup.net() {
        let ns = NetNs::new("bench").map_err(|x| e("network namespace", x))?;
        let mut tap = Tap::new("bntap").map_err(|x| e("tap", x))?;
        tap.move_to(&ns).map_err(|x| e("move the tap", x))?;
        tap.add_addr(&format!("{PEER_IP}/24"))
            .map_err(|x| e("tap address", x))?;
        tap.up().map_err(|x| e("tap up", x))?;
        env.ns = Some(ns);
        env.tap = Some(tap);
    }
    let mut daemon_cmd = match setup {
        Setup::VmmVhostUserBlk | Setup::QemuVhostUserBlk => {
            let mut c = Command::new(bin("vhost-user-blk")?);
            c.arg("--socket-path")
                .arg(&sock)
                .arg("--blk-file")
                .arg(img)
                .args(["--poll-us", &poll_us.to_string()]);
            c
        }
        Setup::QemuStorageDaemon => {
            let mut c = Command::new("qemu-storage-daemon");
            c.args([
                "--blockdev",
                &format!(
                    "driver=file,node-name=file0,filename={},aio=io_uring,cache.direct=off",
                    img.display()
                ),
                "--blockdev",
                "driver=raw,node-name=disk0,file=file0",
                "--export",
                &format!(
                    "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on",
                    sock.display()
                ),
            ]);
            c
        }
        Setup::VmmVhostUserNet => {
            let ns = env.ns.as_ref().ok_or("no namespace")?;
            let tap = env.tap.as_ref().ok_or("no tap")?;
            let mut c = ns.command(bin("vhost-user-net")?);
            c.arg("--socket-path").arg(&sock).args([
                "--tap",
                tap.name(),
                "--poll-us",
                &poll_us.to_string(),
            ]);
            c
        }
        _ => return Ok(env),
    };
    if sandbox_off && setup.ours_daemon() {
        daemon_cmd.args(SANDBOX_OFF);
    }
    let mut d = Daemon::spawn(&format!("{setup:?}"), &mut daemon_cmd)
        .map_err(|x| e("start the back-end", x))?;
    d.wait_for_path(&sock, Duration::from_secs(10))?;
    env.daemon = Some(d);
    Ok(env)
}

fn command(
    setup: Setup,
    env: &Env,
    img: &Path,
    cfg: &ProbeConfig,
    stats: &Path,
    poll_us: u32,
    sandbox_off: bool,
) -> Result<Command, String> {
    let elf = crate::guest::test_guest_elf();
    let vmm = bin("vmm")?;
    let in_ns = |program: &Path| match &env.ns {
        Some(ns) => ns.command(program),
        None => Command::new(program),
    };
    let tap = env
        .tap
        .as_ref()
        .map(|t| t.name().to_string())
        .unwrap_or_default();
    let cmd = if setup.ours() {
        let mut c = in_ns(&vmm);
        c.args(probe::vmm_args(&elf, cfg));
        if sandbox_off {
            c.args(SANDBOX_OFF);
        }
        c.arg("--exit-stats").arg(stats).args(["--serial", "stdio"]);
        match setup {
            Setup::VmmDisk => c.args([
                "--disk",
                &format!("path={},poll_us={poll_us}", img.display()),
            ]),
            Setup::VmmVhostUserBlk => c.args([
                "--vhost-user-blk",
                &format!("socket={}", env.sock.display()),
            ]),
            Setup::VmmNet => c.args(["--net", &format!("tap={tap},poll_us={poll_us}")]),
            _ => c.args([
                "--vhost-user-net",
                &format!("socket={}", env.sock.display()),
            ]),
        };
        c
    } else {
        let q = probe::qemu_command(&elf, cfg);
        let mut c = in_ns(Path::new(q.get_program()));
        c.args(q.get_args());
        match setup {
            Setup::QemuBlk => {
                c.args(probe::qemu_blk_args(img));
            }
            Setup::QemuNet => {
                c.args(probe::qemu_net_args(&tap));
            }
            _ => {
                c.args([
                    "-object",
                    &format!(
                        "memory-backend-memfd,id=mem,size={}M,share=on",
                        probe::PROBE_MEMORY_MIB
                    ),
                    "-numa",
                    "node,memdev=mem",
                    "-chardev",
                    &format!("socket,id=c0,path={}", env.sock.display()),
                    "-device",
                    "vhost-user-blk-pci,chardev=c0,disable-legacy=on",
                ]);
            }
        }
        c
    };
    Ok(cmd)
}

fn probe_config(test: &str, n: u32) -> ProbeConfig {
    if test == "net" {
        ProbeConfig::net(n, GUEST_IP, PEER_IP)
    } else {
        ProbeConfig::blk(n, SEED, test)
    }
}

/// Exits of a boot by kind.
fn exit_kinds(s: &ExitStats) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    m.insert("total".to_string(), s.total);
    m.insert("pio".to_string(), s.pio.values().sum());
    m.insert("mmio".to_string(), s.mmio.values().sum());
    m.insert("notify".to_string(), s.notify_exits.values().sum());
    m
}

/// Runs the direct matrix.
pub fn run_direct(
    opts: &DirectOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<Record>, String> {
    // The harness must not take CPU from what it measures: on 2 CPUs a polling device
    // thread and a spinning vCPU already use both.
    // SAFETY: setpriority on this process only changes its scheduling weight.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
    let dir = ScratchDir::new("bench").map_err(|e| format!("scratch dir: {e}"))?;
    let img = dir.join("disk.img");
    stamp_image(&img, IMAGE_SIZE, SEED).map_err(|e| format!("stamp the image: {e}"))?;
    let hz = tsc_hz();
    progress(&format!(
        "direct: TSC {:.0} MHz, image {} MiB, {} run(s) of {} configurations",
        hz / 1e6,
        IMAGE_SIZE >> 20,
        opts.runs,
        Setup::ALL.len()
    ));
    // Baselines: per configuration and test, a boot that does one operation.
    let mut base: BTreeMap<(String, String), (BTreeMap<String, u64>, u64)> = BTreeMap::new();
    let mut records = Vec::new();
    for run in 1..=opts.runs {
        if opts.wait_idle {
            wait_idle(progress);
        }
        for setup in Setup::ALL {
            let config = setup.config(opts.poll_us);
            let vmm = if setup.ours() { "vmm" } else { "qemu" };
            if let Some(f) = &opts.only {
                if !format!("{vmm} {config}").contains(f.as_str()) {
                    continue;
                }
            }
            let env = start_env(setup, dir.path(), &img, opts.poll_us, opts.sandbox_off)
                .map_err(|e| format!("{vmm} {config}: {e}"))?;
            let daemon_pid = env.daemon.as_ref().map(|d| d.pid());
            for &test in setup.tests() {
                let stats = dir.join("exits.json");
                let _ = fs::remove_file(&stats);
                let key = (format!("{vmm} {config}"), test.to_string());
                if !base.contains_key(&key) {
                    let mut cfg = probe_config(test, 1);
                    cfg.warmup = 0;
                    let b = boot(
                        command(
                            setup,
                            &env,
                            &img,
                            &cfg,
                            &stats,
                            opts.poll_us,
                            opts.sandbox_off,
                        )?,
                        setup.ours().then_some(stats.as_path()),
                        daemon_pid,
                        opts.pin,
                    )?;
                    let exits = b.exits.as_ref().map(exit_kinds).unwrap_or_default();
                    base.insert(key.clone(), (exits, b.vmm_cpu.other_ns + b.daemon_ns));
                    let _ = fs::remove_file(&stats);
                }
                let n = if test == "qd32" { opts.n_qd32 } else { opts.n };
                let cfg = probe_config(test, n);
                progress(&format!(
                    "direct: run {run}/{}: {vmm:4} {config}: {}",
                    opts.runs,
                    result_name(test)
                ));
                let meter = LoadMeter::start();
                let b = boot(
                    command(
                        setup,
                        &env,
                        &img,
                        &cfg,
                        &stats,
                        opts.poll_us,
                        opts.sandbox_off,
                    )?,
                    setup.ours().then_some(stats.as_path()),
                    daemon_pid,
                    opts.pin,
                )?;
                let own_ns = b.vmm_cpu.vcpu_ns + b.vmm_cpu.other_ns + b.daemon_ns;
                let load = meter.finish((own_ns as f64 / 1e9 * clock_ticks()) as u64);
                let results = parse_results(&b.stdout)
                    .map_err(|e| format!("{vmm} {config}: {e}\n{}", b.stdout))?;
                let want = result_name(test);
                let r = results.iter().find(|r| r.test == want).ok_or_else(|| {
                    format!(
                        "{vmm} {config}: no {want} result (exit {:?})\n{}",
                        b.status, b.stdout
                    )
                })?;
                if !r.ok() {
                    return Err(format!(
                        "{vmm} {config}: {want} failed: {} verify failures, {} errors",
                        r.verify_failures, r.errors
                    ));
                }
                let ops = (r.n + r.warmup).max(1) as f64;
                let (base_exits, base_cpu) = base.get(&key).cloned().unwrap_or_default();
                let mut exits_per_op: BTreeMap<String, f64> = b
                    .exits
                    .as_ref()
                    .map(|s| {
                        exit_kinds(s)
                            .into_iter()
                            .map(|(k, v)| {
                                let b0 = base_exits.get(&k).copied().unwrap_or(0);
                                (k, v.saturating_sub(b0) as f64 / ops)
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                // Doorbells the guest wrote: each is an exit KVM handles in the kernel
                // (ioeventfd), for every VMM alike; counted by the probe itself.
                exits_per_op.insert("doorbell".to_string(), r.notifies as f64 / ops);
                let cpu = (b.vmm_cpu.other_ns + b.daemon_ns).saturating_sub(base_cpu);
                let summary = r.summary(hz);
                progress(&format!(
                    "direct:        p50 {:.2} µs, p99 {:.2} µs{}; other load {:.2} CPUs",
                    summary.p50,
                    summary.p99,
                    if test == "qd32" {
                        format!(", {:.0} IOPS", r.ops_per_sec(hz))
                    } else {
                        String::new()
                    },
                    load.other_cpus
                ));
                records.push(Record {
                    matrix: Matrix::Direct,
                    model: setup.model(),
                    vmm: vmm.to_string(),
                    config: config.clone(),
                    test: want.to_string(),
                    run,
                    n: r.n,
                    latency: Some(summary),
                    iops: (test == "qd32").then(|| r.ops_per_sec(hz)),
                    seconds: None,
                    exits_per_op,
                    cpu_us_per_op: Some(cpu as f64 / 1e3 / ops),
                    load,
                });
            }
            if let Some(mut d) = env.daemon {
                let _ = d.stop();
            }
        }
    }
    Ok(records)
}

/// Waits until the other load drops below a quarter of a CPU (at most a minute).
fn wait_idle(progress: &mut dyn FnMut(&str)) {
    let start = Instant::now();
    loop {
        let m = LoadMeter::start();
        thread::sleep(Duration::from_secs(1));
        let l = m.finish(0);
        if l.other_cpus < 0.25 {
            return;
        }
        if start.elapsed() > Duration::from_secs(60) {
            progress(&format!(
                "direct: the machine is still busy ({:.2} CPUs); measuring anyway",
                l.other_cpus
            ));
            return;
        }
        progress(&format!(
            "direct: waiting for an idle machine ({:.2} CPUs busy)",
            l.other_cpus
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setups_cover_the_matrix() {
        // Every model our vmm offers directly, and QEMU's three blk configurations.
        let ours: Vec<Setup> = Setup::ALL.iter().copied().filter(|s| s.ours()).collect();
        assert_eq!(ours.len(), 4);
        assert!(Setup::ALL.iter().any(|s| !s.ours() && s.net()));
        assert_eq!(
            Setup::ALL.iter().filter(|s| !s.ours() && !s.net()).count(),
            3
        );
        for s in Setup::ALL {
            for t in s.tests() {
                assert!(result_name(t).starts_with(if s.net() { "net" } else { "blk" }));
            }
        }
        assert!(is_vcpu("vcpu0") && is_vcpu("CPU 1/KVM") && !is_vcpu("blk-q0"));
        for t in ["disk0-q0", "net0-p0", "vring_worker", "IO io0"] {
            assert!(is_device_thread(t), "{t}");
        }
        for t in ["vcpu0", "iou-wrk-123", "vmm", "qemu-system-x86", "disk0-vu"] {
            assert!(!is_device_thread(t), "{t}");
        }
    }

    #[test]
    fn exit_kinds_sum_by_kind() {
        let s = ExitStats::parse(
            r#"{"total":10,"pio":{"serial":3,"pci-config":2},"mmio":{"disk0":4},"notify_exits":{"disk0":1},"coalesced":2}"#,
        )
        .unwrap();
        let k = exit_kinds(&s);
        assert_eq!(k["total"], 10);
        assert_eq!(k["pio"], 5);
        assert_eq!(k["mmio"], 4);
        assert_eq!(k["notify"], 1);
    }
}
