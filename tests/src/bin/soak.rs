//! `soak`: many boots of the lab's Linux guest, our vmm and QEMU taking turns in the same L1,
//! every outcome classified (see `tests::soak`). `scripts/soak` builds the release binaries
//! and runs this.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tests::soak::{failures, run_soak, table, Model, SoakOptions};

const USAGE: &str = "usage: soak [--boots N] [--per-l1 N] [--models virtio,pt] [--deadline SECS]
            [--out DIR]

  --boots N        boots of each VMM (default 200), split over the models
  --per-l1 N       boots (both VMMs) per L1 boot (default 20; even)
  --models LIST    device models, taken in turn pair by pair: virtio (in-VMM virtio-blk and
                   virtio-net), pt (NVMe and e1000e through VFIO); default virtio,pt
  --deadline SECS  a boot not done by then is a hang (default 150)
  --out DIR        where soak.md goes (default target/soak); each boot's lines are kept in
                   target/lab/logs/soak/";

fn parse() -> Result<(SoakOptions, PathBuf), String> {
    let mut o = SoakOptions {
        bins: std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|p| p.to_path_buf()))
            .unwrap_or_else(tests::lab::profile_dir),
        ..SoakOptions::default()
    };
    let mut out = tests::lab::repo_root().join("target").join("soak");
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
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument '{other}'\n{USAGE}")),
        }
    }
    if o.boots == 0 || o.per_l1 < 2 || o.models.is_empty() || o.deadline.is_zero() {
        return Err(format!("nothing to run\n{USAGE}"));
    }
    Ok((o, out))
}

fn main() -> ExitCode {
    let (opts, out) = match parse() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("soak: {e}");
            return ExitCode::from(2);
        }
    };
    let start = Instant::now();
    let boots = match run_soak(&opts, &mut |l| {
        eprintln!("[{:7.0}s] {l}", start.elapsed().as_secs_f64())
    }) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    let hours = start.elapsed().as_secs_f64() / 3600.0;
    let report = format!(
        "# Soak: {} boots ({} per VMM asked), {hours:.1} h\n\n{}\n## Failed boots\n\n{}",
        boots.len(),
        opts.boots,
        table(&boots),
        failures(&boots)
    );
    println!("{report}");
    if let Err(e) =
        std::fs::create_dir_all(&out).and_then(|()| std::fs::write(out.join("soak.md"), &report))
    {
        eprintln!("soak: cannot write {}: {e}", out.join("soak.md").display());
        return ExitCode::from(1);
    }
    eprintln!("soak: wrote {}", out.join("soak.md").display());
    ExitCode::SUCCESS
}
