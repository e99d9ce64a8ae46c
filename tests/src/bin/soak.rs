//! `soak`: many boots of the lab's Linux guest, our vmm and QEMU taking turns in the same L1,
//! every outcome classified (see `tests::soak`). `scripts/soak` builds the release binaries
//! and runs this.
//!
//! Every boot is appended to `OUT/boots.jsonl` as it is classified, with its run (the UTC
//! time the run started), the machine and the revision, and a failed boot's lines are kept
//! as `OUT/logs/<run>/<tag>.log`: a soak too long for one sitting is run in parts
//! (`--hours`), and `OUT/soak.md` is the table of every boot recorded, with each part
//! listed. OUT is `scripts/soak-results` (committed: the record outlives a checkout).

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tests::soak::{failures, run_soak, table, Boot, Model, SoakOptions};

const USAGE: &str = "usage: soak [--boots N] [--per-l1 N] [--models virtio,pt] [--deadline SECS]
            [--hours H] [--fresh] [--report] [--out DIR]

  --boots N        boots of each VMM in this run (default 200), split over the models
  --per-l1 N       boots (both VMMs) per L1 boot (default 20; even)
  --models LIST    device models, taken in turn pair by pair: virtio (in-VMM virtio-blk and
                   virtio-net), pt (NVMe and e1000e through VFIO); default virtio,pt
  --deadline SECS  a boot not done by then is a hang (default 150)
  --hours H        start no L1 after H hours (the one running finishes): a part of a soak
  --fresh          start the record over (the old one is kept as boots.jsonl.old)
  --report         write the table of the boots recorded so far, run nothing
  --out DIR        where boots.jsonl, soak.md and the failed boots' logs go (default
                   scripts/soak-results); every boot's lines are in target/lab/logs/soak/<run>/";

/// One boot as recorded: the boot and the run it belongs to.
#[derive(Serialize, Deserialize)]
struct Record {
    /// The UTC time its run started (`2026-12-07T11:40Z`).
    run: String,
    /// The host's CPU model.
    machine: String,
    /// `git describe` of the tree the soak ran.
    rev: String,
    /// Seconds from the run's start to this boot's end.
    secs: f64,
    boot: Boot,
}

struct Args {
    opts: SoakOptions,
    out: PathBuf,
    fresh: bool,
    report_only: bool,
}

fn parse() -> Result<Args, String> {
    let mut o = SoakOptions {
        bins: std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|p| p.to_path_buf()))
            .unwrap_or_else(tests::lab::profile_dir),
        ..SoakOptions::default()
    };
    let mut out = tests::lab::repo_root().join("scripts").join("soak-results");
    let (mut fresh, mut report_only) = (false, false);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or(format!("{a} needs a value"));
        let num = |v: String| -> Result<u32, String> {
            v.parse().map_err(|_| format!("{a} {v}: expected a number"))
        };
        match a.as_str() {
            "--boots" => o.boots = num(value()?)?,
            "--per-l1" => o.per_l1 = num(value()?)?,
            "--deadline" => o.deadline = Duration::from_secs(u64::from(num(value()?)?)),
            "--models" => {
                o.models = value()?
                    .split(',')
                    .map(|m| {
                        Model::parse(m).ok_or(format!("--models: unknown model '{m}' (virtio, pt)"))
                    })
                    .collect::<Result<_, _>>()?
            }
            "--out" => out = PathBuf::from(value()?),
            "--hours" => {
                let v = value()?;
                let h: f64 = v
                    .parse()
                    .ok()
                    .filter(|h: &f64| h.is_finite() && *h > 0.0)
                    .ok_or(format!("--hours {v}: expected a positive number"))?;
                o.budget = Some(Duration::from_secs_f64(h * 3600.0));
            }
            "--fresh" => fresh = true,
            "--report" => report_only = true,
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument '{other}'\n{USAGE}")),
        }
    }
    if o.boots == 0 || o.per_l1 < 2 || o.models.is_empty() || o.deadline.is_zero() {
        return Err(format!("nothing to run\n{USAGE}"));
    }
    Ok(Args {
        opts: o,
        out,
        fresh,
        report_only,
    })
}

/// The first line of a command's output, or `unknown`.
fn first_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .current_dir(tests::lab::repo_root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim().to_string())
        })
        .filter(|l| !l.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn machine() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Every record in `path` (none when it does not exist); a line that does not parse is
/// reported and skipped.
fn load(path: &Path) -> Result<Vec<Record>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("soak: {}: {e}", path.display())),
    };
    let mut v = Vec::new();
    for (i, l) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        match serde_json::from_str(l) {
            Ok(r) => v.push(r),
            Err(e) => eprintln!("soak: {}:{}: skipped: {e}", path.display(), i + 1),
        }
    }
    Ok(v)
}

/// The report of every recorded boot: the parts, the table, the failed boots.
fn report(records: &[Record]) -> String {
    // run -> (machine, rev, boots, seconds)
    let mut runs: BTreeMap<&str, (&str, &str, u32, f64)> = BTreeMap::new();
    for r in records {
        let e = runs
            .entry(r.run.as_str())
            .or_insert((r.machine.as_str(), r.rev.as_str(), 0, 0.0));
        e.2 += 1;
        e.3 = e.3.max(r.secs);
    }
    let hours: f64 = runs.values().map(|r| r.3).sum::<f64>() / 3600.0;
    let boots: Vec<Boot> = records.iter().map(|r| r.boot.clone()).collect();
    let per = |vmm: &str| boots.iter().filter(|b| b.vmm == vmm).count();
    let mut parts = String::from(
        "| run (UTC start) | machine | revision | boots | hours |\n|---|---|---|---|---|\n",
    );
    for (run, (machine, rev, n, secs)) in &runs {
        parts.push_str(&format!(
            "| {run} | {machine} | {rev} | {n} | {:.2} |\n",
            secs / 3600.0
        ));
    }
    format!(
        "# Soak: {} boots of our vmm, {} of QEMU's, {hours:.1} h in {} run(s)\n\n{parts}\n{}\n\
         ## Failed boots\n\n{}",
        per("vmm"),
        per("qemu"),
        runs.len(),
        table(&boots),
        failures(&boots)
    )
}

fn main() -> ExitCode {
    let Args {
        mut opts,
        out,
        fresh,
        report_only,
    } = match parse() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("soak: {e}");
            return ExitCode::from(2);
        }
    };
    let records_path = out.join("boots.jsonl");
    if let Err(e) = std::fs::create_dir_all(&out) {
        eprintln!("soak: cannot create {}: {e}", out.display());
        return ExitCode::from(1);
    }
    if fresh && records_path.exists() {
        if let Err(e) = std::fs::rename(&records_path, out.join("boots.jsonl.old")) {
            eprintln!("soak: cannot move {} aside: {e}", records_path.display());
            return ExitCode::from(1);
        }
    }
    let mut failed = false;
    if !report_only {
        let run = first_line("date", &["-u", "+%Y-%m-%dT%H:%MZ"]);
        let machine = machine();
        let rev = first_line("git", &["describe", "--always", "--dirty"]);
        opts.log_dir = opts.log_dir.join(run.replace(':', ""));
        let start = Instant::now();
        let mut sink = match OpenOptions::new()
            .create(true)
            .append(true)
            .open(&records_path)
        {
            Ok(f) => f,
            Err(e) => {
                eprintln!("soak: cannot open {}: {e}", records_path.display());
                return ExitCode::from(1);
            }
        };
        let kept = out.join("logs").join(run.replace(':', ""));
        let root = tests::lab::repo_root();
        let mut record = |b: &Boot| {
            let mut boot = b.clone();
            if boot.outcome.failed() {
                // The evidence stays with the record (the lab's logs are under target/).
                let to = kept.join(format!("{}.log", boot.tag));
                match std::fs::create_dir_all(&kept).and_then(|()| std::fs::copy(&boot.log, &to)) {
                    Ok(_) => boot.log = to,
                    Err(e) => eprintln!("soak: cannot keep {}: {e}", boot.log.display()),
                }
            }
            // Paths in the record are the repository's (it is committed).
            if let Ok(rel) = boot.log.strip_prefix(&root) {
                boot.log = rel.to_path_buf();
            }
            let r = Record {
                run: run.clone(),
                machine: machine.clone(),
                rev: rev.clone(),
                secs: start.elapsed().as_secs_f64(),
                boot,
            };
            let line = serde_json::to_string(&r).unwrap_or_default() + "\n";
            if let Err(e) = sink.write_all(line.as_bytes()) {
                eprintln!("soak: cannot record {}: {e}", b.tag);
            }
        };
        let result = run_soak(
            &opts,
            &mut |l| eprintln!("[{:7.0}s] {l}", start.elapsed().as_secs_f64()),
            &mut record,
        );
        if let Err(e) = result {
            // What was recorded stands; the report below covers it.
            eprintln!("{e}");
            failed = true;
        }
    }
    let records = match load(&records_path) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    let text = report(&records);
    println!("{text}");
    if let Err(e) = std::fs::write(out.join("soak.md"), &text) {
        eprintln!("soak: cannot write {}: {e}", out.join("soak.md").display());
        return ExitCode::from(1);
    }
    eprintln!("soak: wrote {}", out.join("soak.md").display());
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
