//! lat: 4 KiB random-read latency at queue depth 1 on a block device, for Linux guests in the
//! lab (the bench's lab matrix, `tests::bench::lab`).
//!
//! ```text
//! lat DEVICE [READS [WARMUP [SEED]]]      defaults: 1000 reads, 16 warm-up reads, seed 1
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

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::process::ExitCode;
use std::time::Instant;

use tests::probe::{percentile, XorShift, PERCENTILES_PER_MILLE};

const BLOCK: usize = 4096;

struct Args {
    device: String,
    reads: u32,
    warmup: u32,
    seed: u64,
}

fn parse_args(args: &[String]) -> Result<Args, String> {
    let usage = "usage: lat DEVICE [READS [WARMUP [SEED]]]";
    let device = args.first().ok_or(usage)?.clone();
    let num = |i: usize, default: u64| -> Result<u64, String> {
        match args.get(i) {
            None => Ok(default),
            Some(s) => s
                .parse()
                .map_err(|_| format!("not a number: {s:?}; {usage}")),
        }
    };
    let reads = u32::try_from(num(1, 1000)?).map_err(|_| "READS too large".to_string())?;
    let warmup = u32::try_from(num(2, 16)?).map_err(|_| "WARMUP too large".to_string())?;
    if reads == 0 {
        return Err("READS must be positive".into());
    }
    Ok(Args {
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
    samples.sort_unstable();
    let p = |pm: u32| percentile(&samples, pm).unwrap_or(0);
    let [p50, p90, p99, p999] = PERCENTILES_PER_MILLE;
    Ok(format!(
        "LAT-RESULT {{\"test\":\"blk-read-qd1\",\"n\":{},\"min_ns\":{},\"p50_ns\":{},\"p90_ns\":{},\"p99_ns\":{},\"p999_ns\":{},\"max_ns\":{}}}",
        samples.len(),
        p(0),
        p(p50),
        p(p90),
        p(p99),
        p(p999),
        p(1000)
    ))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match parse_args(&args).and_then(|a| run(&a)) {
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
