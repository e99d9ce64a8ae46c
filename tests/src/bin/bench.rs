//! `bench`: I/O latency across the three device models, our vmm next to QEMU.
//!
//! Runs the direct matrix (the ring-3 probe guest on /dev/kvm) and the lab matrix (Linux
//! guests inside the lab), prints progress and a table, and writes `results.json`,
//! `results.md` and `latency.svg` to the output directory. `scripts/bench` builds the
//! release binaries and runs this.
//!
//! `bench compare DIR`: the comparison of two builds' rounds (`scripts/bench-compare`), see
//! [`tests::bench::compare`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use tests::bench::compare::{run_compare, CompareOptions, DEFAULT_THRESHOLD};
use tests::bench::direct::{run_direct, DirectOptions};
use tests::bench::lab::{run_lab, LabOptions};
use tests::bench::report::{lab_pairs, pairs_table, summarize, svg, table, Meta, Results};
use tests::bench::Record;

const USAGE: &str = "usage: bench [--direct-only | --lab-only] [--runs N] [--n N] [--n-qd32 N]
             [--poll-us N] [--lab-blk-ops N] [--lab-pings N] [--sequential] [--wait-idle]
             [--pin] [--sandbox-off] [--only TEXT] [--out DIR]

  --runs N         runs of every configuration, interleaved (default 4: in the lab, where
                   runs alternate which VMM boots first, an even count balances the order)
  --n N            measured operations per QD1 test in the direct matrix (default 20000)
  --n-qd32 N       measured operations of the QD32 test (default 500000)
  --poll-us N      poll_us= of our in-VMM devices, --poll-us of our daemons (default 50)
  --lab-blk-ops N  4 KiB reads per lab guest (default 2000)
  --lab-pings N    pings per lab guest (default 500)
  --sequential     lab: one VM after the other (default, --side-by-side: both VMMs' L2s
                   of a model at once, each on its own devices, taking turns in 6 batches,
                   the one whose turn it is not stopped)
  --wait-idle      wait (at most a minute) for an idle machine before each direct run
  --pin            direct matrix: vCPU threads on CPU 1, device threads (queue threads,
                   QEMU's iothread, the daemons' vring workers) on CPU 0
  --sandbox-off    direct matrix: our vmm and daemons with --seccomp off --landlock off (to
                   measure the sandbox's cost against a run without this)
  --only TEXT      direct matrix: only configurations whose \"vmm configuration\" contains
                   TEXT (e.g. \"vmm virtio-blk\")
  --out DIR        where results go (default target/bench)

usage: bench compare DIR [--threshold PCT] [--base-name NAME] [--head-name NAME]

  Reads DIR/base/*/results.json and DIR/head/*/results.json (one per round, written by two
  builds' bench: scripts/bench-compare), prints per configuration and test the median and
  min-max of p50 (and of IOPS on QD32 rows) for both, writes the table to DIR/compare.md, and
  exits 1 when a row of HEAD is slower by more than PCT % (default 10) and the noise.";

/// `bench compare`: Ok(true) when no row is slower.
fn compare(args: &[String]) -> Result<bool, String> {
    let mut o = CompareOptions {
        dir: PathBuf::new(),
        threshold: DEFAULT_THRESHOLD,
        base_name: "BASE".into(),
        head_name: "HEAD".into(),
    };
    let mut dir = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--threshold" => {
                let v = value("--threshold")?;
                o.threshold = v
                    .parse::<f64>()
                    .ok()
                    .filter(|p| p.is_finite() && *p >= 0.0)
                    .ok_or(format!("--threshold {v}: expected a percentage"))?
                    / 100.0;
            }
            "--base-name" => o.base_name = value("--base-name")?.clone(),
            "--head-name" => o.head_name = value("--head-name")?.clone(),
            d if !d.starts_with('-') && dir.is_none() => dir = Some(PathBuf::from(d)),
            other => return Err(format!("compare: unexpected argument '{other}'\n{USAGE}")),
        }
    }
    o.dir = dir.ok_or(format!("compare: which directory?\n{USAGE}"))?;
    let c = run_compare(&o)?;
    println!("{}", c.markdown);
    let slower = c.slower();
    for l in &slower {
        eprintln!(
            "bench compare: {} '{}' {} {}: HEAD slower than BASE",
            l.vmm,
            l.config,
            l.test,
            l.metric.name()
        );
    }
    eprintln!(
        "bench compare: wrote {}",
        o.dir.join("compare.md").display()
    );
    Ok(slower.is_empty())
}

struct Args {
    direct: bool,
    lab: bool,
    runs: u32,
    n: u32,
    n_qd32: u32,
    poll_us: u32,
    lab_blk_ops: u32,
    lab_pings: u32,
    side_by_side: bool,
    wait_idle: bool,
    pin: bool,
    sandbox_off: bool,
    only: Option<String>,
    out: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        direct: true,
        lab: true,
        runs: 4,
        n: 20_000,
        n_qd32: 500_000,
        poll_us: 50,
        lab_blk_ops: 2000,
        lab_pings: 500,
        side_by_side: true,
        wait_idle: false,
        pin: false,
        sandbox_off: false,
        only: None,
        out: tests::lab::repo_root().join("target").join("bench"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut num = |name: &str| -> Result<u32, String> {
            let v = it.next().ok_or(format!("{name} needs a value"))?;
            v.parse()
                .map_err(|_| format!("{name} {v}: expected a number"))
        };
        match arg.as_str() {
            "--direct-only" => a.lab = false,
            "--lab-only" => a.direct = false,
            "--runs" => a.runs = num("--runs")?.max(1),
            "--n" => a.n = num("--n")?.max(1),
            "--n-qd32" => a.n_qd32 = num("--n-qd32")?.max(1),
            "--poll-us" => a.poll_us = num("--poll-us")?,
            "--lab-blk-ops" => a.lab_blk_ops = num("--lab-blk-ops")?.max(1),
            "--lab-pings" => a.lab_pings = num("--lab-pings")?.max(1),
            "--side-by-side" => a.side_by_side = true,
            "--sequential" => a.side_by_side = false,
            "--wait-idle" => a.wait_idle = true,
            "--pin" => a.pin = true,
            "--sandbox-off" => a.sandbox_off = true,
            "--only" => a.only = Some(it.next().ok_or("--only needs a text")?),
            "--out" => a.out = PathBuf::from(it.next().ok_or("--out needs a directory")?),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument '{other}'\n{USAGE}")),
        }
    }
    Ok(a)
}

fn run() -> Result<(), String> {
    let a = parse_args()?;
    let t0 = Instant::now();
    let mut progress = |line: &str| eprintln!("[{:6.1}s] {line}", t0.elapsed().as_secs_f64());
    let mut records: Vec<Record> = Vec::new();
    if a.direct {
        records.extend(run_direct(
            &DirectOptions {
                runs: a.runs,
                n: a.n,
                n_qd32: a.n_qd32,
                poll_us: a.poll_us,
                wait_idle: a.wait_idle,
                pin: a.pin,
                only: a.only.clone(),
                sandbox_off: a.sandbox_off,
            },
            &mut progress,
        )?);
    }
    if a.lab {
        records.extend(run_lab(
            &LabOptions {
                runs: a.runs,
                blk_ops: a.lab_blk_ops,
                pings: a.lab_pings,
                poll_us: a.poll_us,
                side_by_side: a.side_by_side,
                only_model: None,
            },
            &mut progress,
        )?);
    }
    let rows = summarize(&records);
    let mut t = table(&rows);
    let pairs = lab_pairs(&records);
    if !pairs.is_empty() {
        t.push_str(if a.side_by_side {
            "\nLab, our vmm against QEMU pair by pair (the same run and L1 boot, side by side in alternating turns):\n\n"
        } else {
            "\nLab, our vmm against QEMU pair by pair (the same run and L1 boot, back to back):\n\n"
        });
        t.push_str(&pairs_table(&pairs));
    }
    println!("{t}");
    std::fs::create_dir_all(&a.out).map_err(|e| format!("{}: {e}", a.out.display()))?;
    let date = std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("")
        .trim()
        .to_string();
    let meta = Meta {
        date: date.clone(),
        cpu,
        runs: a.runs.to_string(),
        poll_us: a.poll_us.to_string(),
        pinned: a.pin.to_string(),
        seconds: format!("{:.0}", t0.elapsed().as_secs_f64()),
    };
    let write = |name: &str, body: &str| -> Result<(), String> {
        let p = a.out.join(name);
        std::fs::write(&p, body).map_err(|e| format!("{}: {e}", p.display()))
    };
    let results = Results::new(meta, &records, &rows)
        .to_json()
        .map_err(|e| format!("results.json: {e}"))?;
    write("results.json", &results)?;
    write(
        "results.md",
        &format!(
            "Bench of {date}, {} run(s), poll_us={}, {}{}:\n\n{t}",
            a.runs,
            a.poll_us,
            if a.pin { "pinned" } else { "not pinned" },
            if a.sandbox_off {
                ", our sandbox off (--sandbox-off)"
            } else {
                ""
            }
        ),
    )?;
    write(
        "latency.svg",
        &svg(&rows, &format!("I/O latency by device model, {date}")),
    )?;
    progress(&format!(
        "wrote results.json, results.md and latency.svg to {}",
        a.out.display()
    ));
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("compare") {
        return match compare(&args[1..]) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => {
                eprintln!("bench compare: {e}");
                ExitCode::from(2)
            }
        };
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::from(1)
        }
    }
}
