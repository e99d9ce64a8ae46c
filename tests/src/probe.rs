//! Host side of the latency probe (the test guest with `probe=blk|net`, see
//! `tests/guest/src/probe.rs`): stamped disk images, the guest's `probe-result` lines, the
//! percentile rule, TSC frequency and cycles-to-µs conversion, and the command lines that run
//! the probe on our vmm and on QEMU.
//!
//! The stamp format, the random sequence and the percentile rule are compiled from the same
//! source file as the guest's (`tests/guest/src/probe_shared.rs`), so the two cannot drift.
//!
//! Percentiles are nearest-rank: for `n` samples sorted ascending and `p` in per-mille
//! (0 < p <= 1000), the sample of 1-based rank `ceil(p * n / 1000)`; `p = 0` is the minimum.
//! The guest computes them from all its samples; the host only converts units.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::bench::round;

#[path = "../guest/src/probe_shared.rs"]
mod shared;

pub use shared::{
    percentile, sector_matches, stamp_sector, XorShift, BLOCK_SIZE, PERCENTILES_PER_MILLE,
    SECTOR_SIZE, STAMP_MAGIC, WORDS_PER_SECTOR,
};

/// The prefix of every result line.
pub const RESULT_PREFIX: &str = "probe-result ";
/// The guest's exit code when a probe test failed (verify failure, I/O error, lost reply).
pub const EXIT_PROBE_FAILED: u32 = 0x72;
/// Guest RAM the probe needs (its DMA and sample areas end at 64 MiB).
pub const PROBE_MEMORY_MIB: u32 = 128;

// ---------------------------------------------------------------------------------------------
// Stamped images

fn sector_bytes(words: &[u64; WORDS_PER_SECTOR], out: &mut [u8]) {
    for (w, o) in words.iter().zip(out.chunks_exact_mut(8)) {
        o.copy_from_slice(&u64::from_le(*w).to_le_bytes());
    }
}

fn sector_words(bytes: &[u8]) -> [u64; WORDS_PER_SECTOR] {
    let mut words = [0u64; WORDS_PER_SECTOR];
    for (w, b) in words.iter_mut().zip(bytes.chunks_exact(8)) {
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        *w = u64::from_le_bytes(a).to_le();
    }
    words
}

/// Creates (or overwrites) `path` as an image of `size` bytes (a multiple of 4 KiB) in which
/// every sector carries its stamp for `seed`.
pub fn stamp_image(path: &Path, size: u64, seed: u64) -> io::Result<()> {
    if size == 0 || !size.is_multiple_of(BLOCK_SIZE as u64) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("image size {size} is not a positive multiple of {BLOCK_SIZE}"),
        ));
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let chunk_sectors = 2048u64; // 1 MiB
    let mut buf = vec![0u8; chunk_sectors as usize * SECTOR_SIZE];
    let mut words = [0u64; WORDS_PER_SECTOR];
    let sectors = size / SECTOR_SIZE as u64;
    let mut s = 0;
    while s < sectors {
        let n = chunk_sectors.min(sectors - s);
        for i in 0..n {
            stamp_sector(&mut words, seed, s + i);
            let at = i as usize * SECTOR_SIZE;
            sector_bytes(&words, &mut buf[at..at + SECTOR_SIZE]);
        }
        f.write_all(&buf[..n as usize * SECTOR_SIZE])?;
        s += n;
    }
    f.sync_all()
}

/// The sectors of the image at `path` that do not carry their stamp for `seed` (a trailing
/// partial sector counts as bad).
pub fn verify_image(path: &Path, seed: u64) -> io::Result<Vec<u64>> {
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 2048 * SECTOR_SIZE];
    let mut bad = Vec::new();
    let mut sector = 0u64;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            match f.read(&mut buf[filled..])? {
                0 => break,
                n => filled += n,
            }
        }
        if filled == 0 {
            break;
        }
        for chunk in buf[..filled].chunks(SECTOR_SIZE) {
            if chunk.len() < SECTOR_SIZE || !sector_matches(&sector_words(chunk), seed, sector) {
                bad.push(sector);
            }
            sector += 1;
        }
        if filled < buf.len() {
            break;
        }
    }
    Ok(bad)
}

/// Why a result line or a JSON text was rejected.
#[derive(Debug, Error)]
pub enum ParseError {
    /// The line does not start with `probe-result `.
    #[error("not a '{}' line", RESULT_PREFIX.trim_end())]
    NotAResult,
    /// Malformed JSON, or a field missing or of the wrong type.
    #[error("bad JSON: {0}")]
    Json(serde_json::Error),
    /// A required field is empty.
    #[error("field '{0}' is empty")]
    Empty(&'static str),
    /// The percentiles are not in ascending order, or `n` is 0 with non-zero cycles.
    #[error("inconsistent result: {0}")]
    Inconsistent(&'static str),
}

// ---------------------------------------------------------------------------------------------
// Results

/// Latency percentiles of one test in TSC cycles, as the guest computed them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Cycles {
    pub min: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Cycles {
    /// The guest's computation, for host-side samples: sorts `samples`.
    pub fn from_samples(samples: &mut [u64]) -> Cycles {
        samples.sort_unstable();
        let p = |pm| percentile(samples, pm).unwrap_or(0);
        let [p50, p90, p99, p999] = PERCENTILES_PER_MILLE;
        Cycles {
            min: p(0),
            p50: p(p50),
            p90: p(p90),
            p99: p(p99),
            p999: p(p999),
            max: p(1000),
        }
    }

    fn ascending(&self) -> bool {
        let v = [self.min, self.p50, self.p90, self.p99, self.p999, self.max];
        v.windows(2).all(|w| w[0] <= w[1])
    }
}

/// One `probe-result` line: `probe-result ` and this as JSON (the guest writes it by hand:
/// it has no allocator, see `tests/guest/src/probe.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeResult {
    /// `blk-read-qd1`, `blk-write-qd1`, `blk-read-qd32`, `net-icmp-rr`.
    pub test: String,
    /// Measured operations (warm-up excluded).
    pub n: u64,
    pub qd: u64,
    pub warmup: u64,
    pub verify_failures: u64,
    /// I/O errors (blk) or lost replies (net).
    pub errors: u64,
    /// Doorbells written and skipped (the device asked for none), warm-up included.
    pub notifies: u64,
    pub notifies_suppressed: u64,
    /// TSC cycles spanned by the measured operations.
    pub elapsed_cycles: u64,
    pub cycles: Cycles,
}

impl ProbeResult {
    /// Whether the test passed: samples, no verify failure, no error.
    pub fn ok(&self) -> bool {
        self.n > 0 && self.verify_failures == 0 && self.errors == 0
    }

    /// Operations per second over the measured part.
    pub fn ops_per_sec(&self, tsc_hz: f64) -> f64 {
        if self.elapsed_cycles == 0 {
            return 0.0;
        }
        self.n as f64 * tsc_hz / self.elapsed_cycles as f64
    }

    pub fn summary(&self, tsc_hz: f64) -> Summary {
        Summary::from_cycles(&self.cycles, tsc_hz)
    }
}

/// Parses one `probe-result {...}` line (leading whitespace and a trailing CR allowed).
pub fn parse_result_line(line: &str) -> Result<ProbeResult, ParseError> {
    let body = line
        .trim()
        .strip_prefix(RESULT_PREFIX)
        .ok_or(ParseError::NotAResult)?;
    let r: ProbeResult = serde_json::from_str(body).map_err(ParseError::Json)?;
    if r.test.is_empty() {
        return Err(ParseError::Empty("test"));
    }
    if !r.cycles.ascending() {
        return Err(ParseError::Inconsistent("percentiles are not ascending"));
    }
    if r.n == 0 && r.cycles != Cycles::default() {
        return Err(ParseError::Inconsistent("cycles without samples"));
    }
    Ok(r)
}

/// Every result line in a guest's output (other lines are skipped); one malformed result line
/// is an error.
pub fn parse_results(output: &str) -> Result<Vec<ProbeResult>, ParseError> {
    unsplit_lines(output)
        .iter()
        .filter(|l| l.trim_start().starts_with(RESULT_PREFIX))
        .map(|l| parse_result_line(l))
        .collect()
}

/// Where a vmm log line starts inside `line` (`[YYYY-MM-DDTHH:MM:SS.mmmZ LEVEL ...`), past
/// its first byte: the guest's serial output comes a byte at a time and the vmm's log a
/// line at a time, so where both go to one file a log line can land inside a guest line.
fn embedded_log_line(line: &str) -> Option<usize> {
    let b = line.as_bytes();
    (1..b.len()).find(|&i| {
        let t = &b[i..];
        t.len() > 26
            && t[0] == b'['
            && t[1..5].iter().all(u8::is_ascii_digit)
            && t[5] == b'-'
            && t[8] == b'-'
            && t[11] == b'T'
            && t[24] == b'Z'
            && t[25] == b' '
    })
}

/// The lines of a VM's merged output with every guest line that a vmm log line split put
/// back together (`ab[...log...]` + `cd` gives the log line, then `abcd`).
pub fn unsplit_lines(output: &str) -> Vec<String> {
    let mut out = Vec::new();
    // The start of a guest line cut by a log line: it goes on in the next line.
    let mut pending = String::new();
    for raw in output.lines() {
        let line = std::mem::take(&mut pending) + raw;
        match embedded_log_line(&line) {
            Some(at) => {
                out.push(line[at..].to_string());
                pending = line[..at].to_string();
            }
            None => out.push(line),
        }
    }
    if !pending.is_empty() {
        out.push(pending);
    }
    out
}

/// Latency percentiles in µs; in JSON `{"min":1.234,"p50":...,"p99.9":...,"max":...}`
/// (written with 3 decimals).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Summary {
    #[serde(serialize_with = "round::f3")]
    pub min: f64,
    #[serde(serialize_with = "round::f3")]
    pub p50: f64,
    #[serde(serialize_with = "round::f3")]
    pub p90: f64,
    #[serde(serialize_with = "round::f3")]
    pub p99: f64,
    #[serde(rename = "p99.9", serialize_with = "round::f3")]
    pub p999: f64,
    #[serde(serialize_with = "round::f3")]
    pub max: f64,
}

impl Summary {
    pub fn from_cycles(c: &Cycles, tsc_hz: f64) -> Summary {
        let us = |v: u64| cycles_to_us(v, tsc_hz);
        Summary {
            min: us(c.min),
            p50: us(c.p50),
            p90: us(c.p90),
            p99: us(c.p99),
            p999: us(c.p999),
            max: us(c.max),
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "min {:.2} p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} max {:.2} µs",
            self.min, self.p50, self.p90, self.p99, self.p999, self.max
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Time

fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads the time-stamp counter; x86_64 always has it.
    unsafe { std::arch::x86_64::_rdtsc() }
}

/// The TSC frequency in Hz, measured once per process: TSC ticks against CLOCK_MONOTONIC
/// over about 100 ms. (The guest's rdtsc reads the same counter with no offset on KVM here.)
pub fn tsc_hz() -> f64 {
    static HZ: OnceLock<f64> = OnceLock::new();
    *HZ.get_or_init(|| measure_tsc_hz(Duration::from_millis(100)))
}

/// Measures the TSC frequency over `span`.
pub fn measure_tsc_hz(span: Duration) -> f64 {
    let (t0, c0) = (Instant::now(), rdtsc());
    thread::sleep(span);
    let (t1, c1) = (Instant::now(), rdtsc());
    c1.wrapping_sub(c0) as f64 / (t1 - t0).as_secs_f64()
}

pub fn cycles_to_us(cycles: u64, tsc_hz: f64) -> f64 {
    if tsc_hz <= 0.0 {
        return 0.0;
    }
    cycles as f64 * 1e6 / tsc_hz
}

// ---------------------------------------------------------------------------------------------
// Command lines

/// Which probe, with its parameters; [`ProbeConfig::cmdline`] is the guest command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeConfig {
    /// `blk` or `net`.
    pub probe: &'static str,
    pub n: u32,
    pub warmup: u32,
    pub seed: u64,
    /// blk: comma-separated `read`, `write`, `qd32`.
    pub tests: String,
    pub qd: u32,
    /// net: guest and peer addresses.
    pub ip: String,
    pub peer: String,
}

impl ProbeConfig {
    pub fn blk(n: u32, seed: u64, tests: &str) -> Self {
        ProbeConfig {
            probe: "blk",
            n,
            warmup: 100,
            seed,
            tests: tests.to_string(),
            qd: 32,
            ip: "192.0.2.2".into(),
            peer: "192.0.2.1".into(),
        }
    }

    pub fn net(n: u32, ip: &str, peer: &str) -> Self {
        ProbeConfig {
            probe: "net",
            n,
            warmup: 100,
            seed: 1,
            tests: String::new(),
            qd: 1,
            ip: ip.into(),
            peer: peer.into(),
        }
    }

    pub fn cmdline(&self) -> String {
        let mut s = format!(
            "probe={} n={} warmup={} seed={}",
            self.probe, self.n, self.warmup, self.seed
        );
        if self.probe == "blk" {
            s += &format!(" tests={} qd={}", self.tests, self.qd);
        } else {
            s += &format!(" ip={} peer={}", self.ip, self.peer);
        }
        s
    }
}

/// Our vmm running the probe ELF with `cfg`; add `--disk`/`--net`/`--exit-stats` to it.
pub fn vmm_command(vmm: &Path, elf: &Path, cfg: &ProbeConfig) -> Command {
    let mut cmd = Command::new(vmm);
    cmd.args(vmm_args(elf, cfg));
    cmd
}

/// The arguments of [`vmm_command`], for a vmm started some other way (`ip netns exec`).
pub fn vmm_args(elf: &Path, cfg: &ProbeConfig) -> Vec<OsString> {
    vec![
        "--kernel".into(),
        elf.into(),
        "--cmdline".into(),
        cfg.cmdline().into(),
        "--memory".into(),
        format!("{PROBE_MEMORY_MIB}M").into(),
    ]
}

/// `--disk path=IMG` for our vmm.
pub fn vmm_disk_arg(img: &Path) -> String {
    format!("path={}", img.display())
}

pub const QEMU: &str = "qemu-system-x86_64";
pub const QBOOT: &str = "/usr/share/qemu/qboot.rom";

/// QEMU + KVM running the probe ELF with `cfg` through qboot, debug-exit and serial on stdio;
/// add devices with [`qemu_blk_args`].
pub fn qemu_command(elf: &Path, cfg: &ProbeConfig) -> Command {
    let mut cmd = Command::new(QEMU);
    cmd.args(["-accel", "kvm", "-cpu", "qemu64"])
        .args(["-m", &PROBE_MEMORY_MIB.to_string()])
        .args(["-nodefaults", "-nographic", "-no-reboot"])
        .args(["-bios", QBOOT])
        .arg("-kernel")
        .arg(elf)
        .args(["-append", &cfg.cmdline()])
        .args(["-serial", "stdio"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"]);
    cmd
}

/// QEMU's best virtio-blk configuration here: io_uring, writeback cache, an iothread.
pub fn qemu_blk_args(img: &Path) -> Vec<String> {
    vec![
        "-object".into(),
        "iothread,id=io0".into(),
        "-drive".into(),
        format!(
            "if=none,file={},format=raw,id=d0,cache=writeback,aio=io_uring",
            img.display()
        ),
        "-device".into(),
        "virtio-blk-pci,drive=d0,iothread=io0,disable-legacy=on".into(),
    ]
}

/// QEMU's virtio-net on an existing tap (`ifname=`, no vhost-net: the host has none).
pub fn qemu_net_args(tap: &str) -> Vec<String> {
    vec![
        "-netdev".into(),
        format!("tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off"),
        "-device".into(),
        "virtio-net-pci,netdev=n0,disable-legacy=on,romfile=".into(),
    ]
}

/// The vmm's `--exit-stats` JSON (`vmm::stats::ExitStatsFile`, the fields tests read):
/// exits to userspace, in total and per device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ExitStats {
    pub total: u64,
    pub pio: BTreeMap<String, u64>,
    pub mmio: BTreeMap<String, u64>,
    /// Queue notifications that reached the vmm (no ioeventfd caught them), per device.
    pub notify_exits: BTreeMap<String, u64>,
    /// Writes KVM buffered instead of exiting (the PCI config address register); not exits.
    pub coalesced: u64,
}

impl ExitStats {
    pub fn parse(text: &str) -> Result<ExitStats, ParseError> {
        serde_json::from_str(text).map_err(ParseError::Json)
    }

    /// Reads and parses the file the vmm wrote.
    pub fn read(path: &Path) -> io::Result<ExitStats> {
        let text = std::fs::read_to_string(path)?;
        ExitStats::parse(&text).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })
    }
}

/// What a probe run printed and how it ended.
#[derive(Debug)]
pub struct ProbeOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl ProbeOutput {
    /// The guest's debug-exit code (`(code << 1) | 1` is the VMM's status), if it wrote one.
    pub fn guest_exit_code(&self) -> Option<u32> {
        let s = self.status.code()?;
        (s & 1 == 1).then_some((s as u32) >> 1)
    }

    pub fn results(&self) -> Result<Vec<ProbeResult>, ParseError> {
        parse_results(&self.stdout)
    }
}

/// Runs `cmd` to completion, killing it (by its PID) after `timeout`.
pub fn run_probe(cmd: &mut Command, timeout: Duration) -> io::Result<ProbeOutput> {
    run_probe_watching(cmd, timeout, Duration::from_millis(5), &mut |_| {})
}

/// [`run_probe`], calling `watch` with the child's PID every `every` while it runs (the
/// bench samples its threads' CPU time there).
pub fn run_probe_watching(
    cmd: &mut Command,
    timeout: Duration,
    every: Duration,
    watch: &mut dyn FnMut(u32),
) -> io::Result<ProbeOutput> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot start {cmd:?}: {e}")))?;
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut s = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut s);
            }
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let out = reader(child.stdout.take().map(|p| Box::new(p) as _));
    let err = reader(child.stderr.take().map(|p| Box::new(p) as _));
    let pid = child.id();
    let status = loop {
        watch(pid);
        let polled = child.try_wait();
        if let Ok(Some(status)) = polled {
            break status;
        }
        if let Err(e) = polled {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = out.join().unwrap_or_default();
            let stderr = err.join().unwrap_or_default();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{cmd:?} did not finish in {timeout:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
                ),
            ));
        }
        thread::sleep(every);
    };
    Ok(ProbeOutput {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        elapsed: start.elapsed(),
    })
}

/// The `vmm` binary of this build profile.
pub fn vmm_binary() -> PathBuf {
    crate::lab::profile_dir().join("vmm")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vmm log line that landed inside a guest result line (seen in
    /// `dpdk_vhost_user`, December 2026) is taken out and the result parsed; two in a row
    /// too; a log line at a line's start is left alone.
    #[test]
    fn results_split_by_vmm_log_lines_are_put_back_together() {
        let log1 = "[2026-12-07T22:32:13.148Z WARN  vmm::virtio::vhost_user] dpdk0: gone";
        let log2 = "[2026-12-07T22:32:13.150Z INFO  vmm::virtio::vhost_user] dpdk0: back";
        let whole = "probe-result {\"test\":\"x\"}";
        let text = format!("boot\nprobe-result {{\"te{log1}\n{log2}\nst\":\"x\"}}\n{log2}\nend\n");
        let lines = unsplit_lines(&text);
        assert_eq!(lines, vec!["boot", log1, log2, whole, log2, "end"]);
        let clean = format!("{whole}\n");
        assert_eq!(unsplit_lines(&clean), vec![whole]);
        assert!(embedded_log_line("a [2026-12-07 not a log line").is_none());
    }

    const LINE: &str = r#"probe-result {"test":"blk-read-qd1","n":1000,"qd":1,"warmup":100,"verify_failures":0,"errors":0,"notifies":1100,"notifies_suppressed":0,"elapsed_cycles":9000000,"cycles":{"min":5000,"p50":7000,"p90":8000,"p99":9000,"p999":12000,"max":50000}}"#;

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<u64> = (1..=10).collect();
        assert_eq!(percentile(&v, 0), Some(1));
        assert_eq!(percentile(&v, 1), Some(1)); // ceil(0.01) = rank 1
        assert_eq!(percentile(&v, 500), Some(5)); // rank 5
        assert_eq!(percentile(&v, 501), Some(6)); // ceil(5.01) = 6
        assert_eq!(percentile(&v, 900), Some(9));
        assert_eq!(percentile(&v, 990), Some(10));
        assert_eq!(percentile(&v, 1000), Some(10));
        assert_eq!(percentile(&v, 1001), None);
        assert_eq!(percentile(&[], 500), None);
        assert_eq!(percentile(&[42], 999), Some(42));
        // 1000 samples 1..=1000: p99.9 is the 999th.
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&v, 999), Some(999));
        assert_eq!(percentile(&v, 990), Some(990));
        // 1001 samples: rank ceil(999.999) = 1000.
        let v: Vec<u64> = (1..=1001).collect();
        assert_eq!(percentile(&v, 999), Some(1000));
        assert_eq!(percentile(&v, 500), Some(501));
    }

    #[test]
    fn percentile_never_indexes_out_of_range() {
        for n in 1..300u64 {
            let v: Vec<u64> = (0..n).collect();
            for pm in 0..=1000 {
                let p = percentile(&v, pm).unwrap();
                // At least pm/1000 of the samples are <= p, and p is the smallest such sample.
                let le = v.iter().filter(|&&x| x <= p).count() as u64;
                assert!(le * 1000 >= u64::from(pm) * n, "n={n} pm={pm}");
                if p > 0 {
                    assert!(
                        (le - 1) * 1000 < u64::from(pm) * n || pm == 0,
                        "n={n} pm={pm}"
                    );
                }
            }
        }
    }

    #[test]
    fn cycles_from_samples_sorts() {
        let mut s = vec![5, 1, 4, 2, 3];
        let c = Cycles::from_samples(&mut s);
        assert_eq!(
            c,
            Cycles {
                min: 1,
                p50: 3,
                p90: 5,
                p99: 5,
                p999: 5,
                max: 5
            }
        );
    }

    #[test]
    fn parses_a_result_line() {
        let r = parse_result_line(LINE).unwrap();
        assert_eq!(r.test, "blk-read-qd1");
        assert_eq!(r.n, 1000);
        assert_eq!(r.cycles.p999, 12000);
        assert!(r.ok());
        let s = r.summary(1e9);
        assert!((s.p50 - 7.0).abs() < 1e-9);
        assert!((r.ops_per_sec(1e9) - 1000.0 / 0.009).abs() < 1e-6);
        // With a CR and surrounding output.
        let out = format!("test-guest: hello\r\n{LINE}\r\nprobe: done\n");
        assert_eq!(parse_results(&out).unwrap(), vec![r]);
    }

    #[test]
    fn malformed_lines_are_errors() {
        let cut = &LINE[..LINE.len() - 5];
        for bad in [
            "",
            "probe-result",
            "probe-result ",
            "probe-result {",
            "probe-result []",
            "probe-result {\"test\":1}",
            cut,
            &LINE.replace("\"n\":1000", "\"n\":-1"),
            &LINE.replace("\"n\":1000", "\"n\":1.5"),
            &LINE.replace("\"n\":1000", "\"n\":99999999999999999999999"),
            &LINE.replace("\"p50\":7000", "\"p50\":1"),
            &LINE.replace("\"test\":\"blk-read-qd1\"", "\"test\":\"\""),
            &LINE.replace(",\"errors\":0", ""),
            &format!("{LINE} trailing"),
            &LINE.replace("probe-result ", "probe-results "),
            "probe-result {\"a\":\"\\u0041\"}",
            &format!("probe-result {}", "[".repeat(100)),
        ] {
            assert!(parse_result_line(bad).is_err(), "accepted: {bad}");
        }
        let out = format!("{LINE}\nprobe-result {{\"test\"\n");
        assert!(parse_results(&out).is_err());
        assert!(matches!(
            parse_result_line("hello"),
            Err(ParseError::NotAResult)
        ));
        assert!(parse_result_line(cut)
            .unwrap_err()
            .to_string()
            .contains("bad JSON"));
        let missing = parse_result_line(&LINE.replace(",\"errors\":0", "")).unwrap_err();
        assert!(missing.to_string().contains("errors"), "{missing}");
    }

    #[test]
    fn result_line_round_trip() {
        let r = parse_result_line(LINE).unwrap();
        let line = format!("{RESULT_PREFIX}{}", serde_json::to_string(&r).unwrap());
        assert_eq!(line, LINE, "the guest's field order and names");
        // Escaped test names and unknown fields (a newer guest) are read.
        let other = LINE.replace(
            "\"test\":\"blk-read-qd1\"",
            "\"test\":\"blk\\u002dread\",\"new\":[1,{}]",
        );
        assert_eq!(parse_result_line(&other).unwrap().test, "blk-read");
    }

    #[test]
    fn summary_json_and_conversion() {
        let c = Cycles {
            min: 2600,
            p50: 5200,
            p90: 7800,
            p99: 26000,
            p999: 260000,
            max: 2_600_000,
        };
        let s = Summary::from_cycles(&c, 2.6e9);
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(
            text,
            "{\"min\":1.0,\"p50\":2.0,\"p90\":3.0,\"p99\":10.0,\"p99.9\":100.0,\"max\":1000.0}"
        );
        assert_eq!(serde_json::from_str::<Summary>(&text).unwrap(), s);
        // Three decimals are written; they read back as the rounded value.
        let third = Summary::from_cycles(&c, 7.8e9);
        let text = serde_json::to_string(&third).unwrap();
        assert!(text.starts_with("{\"min\":0.333,\"p50\":0.667,"), "{text}");
        let back: Summary = serde_json::from_str(&text).unwrap();
        assert!((back.p50 - third.p50).abs() < 5e-4 && back.p50 != third.p50);
        assert_eq!(cycles_to_us(1, 0.0), 0.0);
    }

    #[test]
    fn stamp_round_trip_and_corruption() {
        let dir = crate::host::ScratchDir::new("stamp").unwrap();
        let img = dir.join("img");
        stamp_image(&img, 64 * 1024, 7).unwrap();
        assert!(verify_image(&img, 7).unwrap().is_empty());
        assert_eq!(verify_image(&img, 8).unwrap().len(), 128);
        let mut bytes = std::fs::read(&img).unwrap();
        assert_eq!(&bytes[..8], b"PRBSTMP1");
        bytes[3 * 512 + 100] ^= 1;
        std::fs::write(&img, &bytes).unwrap();
        assert_eq!(verify_image(&img, 7).unwrap(), vec![3]);
        assert!(stamp_image(&img, 1000, 7).is_err());
    }

    #[test]
    fn stamps_differ_by_sector_and_seed() {
        let mut a = [0u64; WORDS_PER_SECTOR];
        stamp_sector(&mut a, 1, 10);
        assert!(sector_matches(&a, 1, 10));
        assert!(!sector_matches(&a, 1, 11));
        assert!(!sector_matches(&a, 2, 10));
        assert_eq!(a[0], STAMP_MAGIC.to_le());
    }

    #[test]
    fn xorshift_is_deterministic() {
        let mut a = XorShift::new(5);
        let mut b = XorShift::new(5);
        let mut z = XorShift::new(0);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
            assert_ne!(z.next_u64(), 0);
            let x = a.below(10);
            assert!(x < 10);
            assert_eq!(x, b.below(10));
        }
    }

    #[test]
    fn tsc_frequency_is_plausible_and_stable() {
        let a = measure_tsc_hz(Duration::from_millis(50));
        let b = tsc_hz();
        for hz in [a, b] {
            assert!((1e8..1e10).contains(&hz), "TSC at {hz} Hz");
        }
        assert!((a / b - 1.0).abs() < 0.1, "{a} vs {b}");
        assert!((cycles_to_us(b as u64, b) - 1e6).abs() < 1.0);
    }

    #[test]
    fn exit_stats() {
        let text = "{\"total\":16,\"pio\":{\"i8042\":0,\"serial\":10},\"pio_unclaimed\":2,\"mmio\":{\"disk0\":3},\"mmio_unclaimed\":0,\"other\":{\"irq_window\":1},\"interrupted\":0,\"notify_exits\":{\"disk0\":0},\"coalesced\":5}";
        let s = ExitStats::parse(text).unwrap();
        assert_eq!(s.total, 16);
        assert_eq!(s.coalesced, 5);
        assert!(ExitStats::parse(&text.replace(",\"coalesced\":5", "")).is_err());
        assert_eq!(s.pio["serial"], 10);
        assert_eq!(s.mmio["disk0"], 3);
        assert_eq!(s.notify_exits["disk0"], 0);
        assert!(ExitStats::parse("{\"total\":1}").is_err());
        assert!(ExitStats::parse(&text.replace("\"serial\":10", "\"serial\":\"x\"")).is_err());
    }

    #[test]
    fn cmdlines() {
        assert_eq!(
            ProbeConfig::blk(1000, 9, "read,qd32").cmdline(),
            "probe=blk n=1000 warmup=100 seed=9 tests=read,qd32 qd=32"
        );
        assert_eq!(
            ProbeConfig::net(10, "192.0.2.2", "192.0.2.1").cmdline(),
            "probe=net n=10 warmup=100 seed=1 ip=192.0.2.2 peer=192.0.2.1"
        );
    }
}
