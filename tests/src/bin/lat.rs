//! lat: 4 KiB random-read latency at queue depth 1 on a block device, for Linux guests in the
//! lab (the bench's lab matrix, `tests::bench::lab`).
//!
//! ```text
//! lat [--samples FILE] DEVICE [READS [WARMUP [SEED]]]   defaults: 1000 reads, 16 warm-up, seed 1
//! lat --summary FILE
//! lat --ping FILE
//! ```
//!
//! Opens DEVICE with O_DIRECT (so every read reaches the device, not the guest's page cache),
//! reads 4 KiB blocks at xorshift-random 4 KiB-aligned offsets over the whole device into a
//! 4 KiB-aligned buffer, one at a time, and times each read with CLOCK_MONOTONIC. The warm-up
//! reads are not measured. Prints one line
//!
//! ```text
//! LAT-RESULT {"test":"blk-read-qd1","n":1000,"min_ns":..,"p50_ns":..,"p90_ns":..,"p99_ns":..,"p999_ns":..,"max_ns":..}
//! ```
//!
//! with the nearest-rank percentiles of [`tests::probe::percentile`] (the probe's rule), and
//! exits 0; on an error, prints `LAT-ERROR <why>` and exits 1.
//!
//! Measured in batches (the bench's side-by-side runs, where two guests take turns): each
//! batch `--samples FILE` appends its latencies to FILE (one ns figure a line) after its own
//! line, and `--summary FILE` prints the `LAT-RESULT` line of every sample in FILE.
//!
//! `--ping FILE` prints the `LAT-RESULT` line (test `net-rtt`) of the round trips in FILE,
//! the output of busybox `ping` (every `time=<ms> ms`, to the µs it prints): one short line on
//! the guest's serial console instead of every packet's time (each byte L2 prints is an
//! exit, and the lab's L2s have died in the middle of long console output).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::process::ExitCode;
use std::time::Instant;

use tests::bench::lab::LatLine;
use tests::probe::{percentile, XorShift, PERCENTILES_PER_MILLE};

const BLOCK: usize = 4096;

struct Args {
    samples: Option<String>,
    device: String,
    reads: u32,
    warmup: u32,
    seed: u64,
}

enum Mode {
    Measure(Args),
    Summary(String),
    Ping(String),
}

const USAGE: &str = "usage: lat [--samples FILE] DEVICE [READS [WARMUP [SEED]]] | lat --summary FILE | lat --ping FILE";

fn parse_mode(args: &[String]) -> Result<Mode, String> {
    match args.first().map(String::as_str) {
        Some("--summary") => match args {
            [_, file] => Ok(Mode::Summary(file.clone())),
            _ => Err(USAGE.into()),
        },
        Some("--ping") => match args {
            [_, file] => Ok(Mode::Ping(file.clone())),
            _ => Err(USAGE.into()),
        },
        Some("--samples") => {
            let file = args.get(1).ok_or(USAGE)?.clone();
            let mut a = parse_args(&args[2..])?;
            a.samples = Some(file);
            Ok(Mode::Measure(a))
        }
        _ => parse_args(args).map(Mode::Measure),
    }
}

fn parse_args(args: &[String]) -> Result<Args, String> {
    let device = args.first().ok_or(USAGE)?.clone();
    let num = |i: usize, default: u64| -> Result<u64, String> {
        match args.get(i) {
            None => Ok(default),
            Some(s) => s
                .parse()
                .map_err(|_| format!("not a number: {s:?}; {USAGE}")),
        }
    };
    let reads = u32::try_from(num(1, 1000)?).map_err(|_| "READS too large".to_string())?;
    let warmup = u32::try_from(num(2, 16)?).map_err(|_| "WARMUP too large".to_string())?;
    if reads == 0 {
        return Err("READS must be positive".into());
    }
    Ok(Args {
        samples: None,
        device,
        reads,
        warmup,
        seed: num(3, 1)?,
    })
}

/// A 4 KiB window of `buf` aligned to 4 KiB (O_DIRECT needs an aligned buffer).
fn aligned(buf: &mut [u8]) -> &mut [u8] {
    let off = buf.as_ptr().align_offset(BLOCK);
    &mut buf[off..off + BLOCK]
}

fn run(a: &Args) -> Result<String, String> {
    let mut f: File = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&a.device)
        .map_err(|e| format!("open {} with O_DIRECT: {e}", a.device))?;
    let size = f
        .seek(SeekFrom::End(0))
        .map_err(|e| format!("size of {}: {e}", a.device))?;
    let blocks = size / BLOCK as u64;
    if blocks == 0 {
        return Err(format!("{} is smaller than {BLOCK} bytes", a.device));
    }
    let mut storage = vec![0u8; 2 * BLOCK];
    let buf = aligned(&mut storage);
    let mut rng = XorShift::new(a.seed);
    let mut samples = Vec::with_capacity(a.reads as usize);
    for i in 0..a.warmup + a.reads {
        let at = rng.below(blocks) * BLOCK as u64;
        // Instant::now() is clock_gettime(CLOCK_MONOTONIC) on Linux.
        let t0 = Instant::now();
        let n = f
            .read_at(buf, at)
            .map_err(|e| format!("read at {at}: {e}"))?;
        let ns = t0.elapsed().as_nanos();
        if n != BLOCK {
            return Err(format!("short read at {at}: {n} bytes"));
        }
        if i >= a.warmup {
            samples.push(u64::try_from(ns).unwrap_or(u64::MAX));
        }
    }
    if let Some(file) = &a.samples {
        let mut text = String::with_capacity(samples.len() * 8);
        for ns in &samples {
            text.push_str(&ns.to_string());
            text.push('\n');
        }
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(file)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(|e| format!("append samples to {file}: {e}"))?;
    }
    result_line("blk-read-qd1", samples)
}

/// The `LAT-RESULT` line of test `test` over the samples `parse` finds in `file`.
fn file_summary(
    file: &str,
    test: &str,
    parse: fn(&str) -> Result<Vec<u64>, String>,
) -> Result<String, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("read {file}: {e}"))?;
    let samples = parse(&text)?;
    if samples.is_empty() {
        return Err(format!("{file} holds no {test} samples"));
    }
    result_line(test, samples)
}

/// The round trips (ns) of ping's `time=<ms> ms` fields, in order.
fn parse_ping(text: &str) -> Result<Vec<u64>, String> {
    text.split_ascii_whitespace()
        .filter_map(|w| w.strip_prefix("time="))
        .map(|ms| ping_ns(ms).ok_or_else(|| format!("not a ping time: \"time={ms}\"")))
        .collect()
}

/// `<ms>` with up to 3 decimals (ping prints whole µs) in ns.
fn ping_ns(ms: &str) -> Option<u64> {
    let (whole, frac) = ms.split_once('.').unwrap_or((ms, ""));
    let digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || frac.len() > 3 || !digits(frac) {
        return None;
    }
    let us: u64 = format!("{frac:0<3}").parse().ok()?;
    whole
        .parse::<u64>()
        .ok()?
        .checked_mul(1_000_000)?
        .checked_add(us * 1000)
}

fn parse_samples(text: &str) -> Result<Vec<u64>, String> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.trim().parse().map_err(|_| format!("not a sample: {l:?}")))
        .collect()
}

fn result_line(test: &str, mut samples: Vec<u64>) -> Result<String, String> {
    samples.sort_unstable();
    let p = |pm: u32| percentile(&samples, pm).unwrap_or(0);
    let [p50, p90, p99, p999] = PERCENTILES_PER_MILLE;
    LatLine {
        test: test.to_string(),
        n: samples.len() as u64,
        min_ns: p(0),
        p50_ns: p(p50),
        p90_ns: p(p90),
        p99_ns: p(p99),
        p999_ns: p(p999),
        max_ns: p(1000),
    }
    .line()
    .map_err(|e| format!("result line: {e}"))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = parse_mode(&args).and_then(|m| match m {
        Mode::Measure(a) => run(&a),
        Mode::Summary(file) => file_summary(&file, "blk-read-qd1", parse_samples),
        Mode::Ping(file) => file_summary(&file, "net-rtt", parse_ping),
    });
    match result {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("LAT-ERROR {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn modes() {
        let Ok(Mode::Measure(a)) = parse_mode(&strings(&["/dev/vda", "500", "4", "7"])) else {
            panic!("measure expected");
        };
        assert_eq!((a.reads, a.warmup, a.seed, a.samples), (500, 4, 7, None));
        let Ok(Mode::Measure(a)) = parse_mode(&strings(&["--samples", "samples.txt", "/dev/vda"]))
        else {
            panic!("measure expected");
        };
        assert_eq!(a.samples.as_deref(), Some("samples.txt"));
        assert_eq!(a.device, "/dev/vda");
        assert!(
            matches!(parse_mode(&strings(&["--summary", "samples.txt"])), Ok(Mode::Summary(f)) if f == "samples.txt")
        );
        assert!(parse_mode(&strings(&["--summary"])).is_err());
        assert!(
            matches!(parse_mode(&strings(&["--ping", "ping.txt"])), Ok(Mode::Ping(f)) if f == "ping.txt")
        );
        assert!(parse_mode(&strings(&["--ping"])).is_err());
        assert!(parse_mode(&strings(&["--samples", "samples.txt"])).is_err());
        assert!(parse_mode(&strings(&["/dev/vda", "0"])).is_err());
    }

    #[test]
    fn batches_sum_up() {
        let file = std::env::temp_dir().join(format!("lat-test-{}", std::process::id()));
        let _ = std::fs::remove_file(&file);
        let path = file.to_string_lossy().into_owned();
        for batch in ["30\n10\n", "20\n40\n"] {
            let mut f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&file)
                .unwrap();
            f.write_all(batch.as_bytes()).unwrap();
        }
        let line = file_summary(&path, "blk-read-qd1", parse_samples).unwrap();
        std::fs::remove_file(&file).unwrap();
        assert!(
            line.starts_with("LAT-RESULT {\"test\":\"blk-read-qd1\",\"n\":4,\"min_ns\":10,"),
            "{line}"
        );
        assert!(line.ends_with("\"max_ns\":40}"), "{line}");
        let r = tests::bench::lab::parse_lat_result(&line).unwrap();
        assert_eq!((r.test.as_str(), r.n), ("blk-read-qd1", 4));
        assert_eq!((r.summary.min, r.summary.max), (0.01, 0.04));
        assert!(parse_samples("1\nx\n").is_err());
        assert_eq!(parse_samples("\n5\n\n").unwrap(), vec![5]);
    }

    /// busybox ping's own output (times with 1 to 3 decimals), its summary lines ignored.
    #[test]
    fn ping_times() {
        let text = "PING 198.51.100.1 (198.51.100.1): 56 data bytes\n\
            64 bytes from 198.51.100.1: seq=0 ttl=64 time=2.345 ms\n\
            64 bytes from 198.51.100.1: seq=1 ttl=64 time=10.5 ms\n\
            64 bytes from 198.51.100.1: seq=2 ttl=64 time=0.07 ms\n\
            \n--- 198.51.100.1 ping statistics ---\n\
            3 packets transmitted, 3 packets received, 0% packet loss\n\
            round-trip min/avg/max = 0.070/4.306/10.500 ms\n";
        assert_eq!(
            parse_ping(text).unwrap(),
            vec![2_345_000, 10_500_000, 70_000]
        );
        for bad in [
            "time=x ms",
            "time=1.2345 ms",
            "time=-1 ms",
            "time=1.-5 ms",
            "time=+1 ms",
            "time=.5 ms",
        ] {
            assert!(parse_ping(bad).is_err(), "accepted {bad:?}");
        }
        let line = result_line("net-rtt", parse_ping(text).unwrap()).unwrap();
        assert!(
            line.starts_with(
                "LAT-RESULT {\"test\":\"net-rtt\",\"n\":3,\"min_ns\":70000,\"p50_ns\":2345000,"
            ),
            "{line}"
        );
    }
}
