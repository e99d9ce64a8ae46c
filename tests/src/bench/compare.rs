//! `bench compare`: the same bench run by two builds (BASE and HEAD, `scripts/bench-compare`),
//! side by side per configuration and test, and whether HEAD is slower.
//!
//! Each build's `results.json` files (one per round, every run of every round a sample) are
//! read back with serde. Per row (vmm, configuration, test) and metric (the p50 latency; the
//! IOPS too on QD32 rows), each side gets its median and min-max over its samples.
//!
//! The p50 of one run is not one number plus small noise here: on this machine a QD1 read's
//! p50 is bimodal across runs (2.1-2.3 µs or 2.8-3.2 µs, for the same binary), and QD32 IOPS
//! move 320k-530k run to run. A difference of medians alone flips whenever one side happens
//! to draw more runs of the upper mode. So a row is flagged slower only when all three hold:
//! - HEAD's median is worse than BASE's by more than the threshold (10 %);
//! - the Hodges-Lehmann shift (the median of the ratios of every HEAD sample to every BASE
//!   sample), which does not jump with a mode flip, is worse by more than the threshold too;
//! - a one-sided Mann-Whitney rank test says HEAD's samples are worse than BASE's with
//!   p < [`P_SLOWER`] (normal approximation, ties counted as halves).
//!
//! The same rule the other way round marks a row faster (informative only).

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use super::report::Results;
use super::{median, Record};

/// The one-sided p-value below which a worse median counts as more than noise.
pub const P_SLOWER: f64 = 0.05;

/// The default threshold: HEAD worse by more than 10 %.
pub const DEFAULT_THRESHOLD: f64 = 0.10;

/// What a comparison row measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Metric {
    /// The p50 latency in µs: lower is better.
    P50,
    /// Operations per second (QD32 rows): higher is better.
    Iops,
}

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::P50 => "p50 µs",
            Metric::Iops => "IOPS",
        }
    }

    fn sample(self, r: &Record) -> Option<f64> {
        match self {
            Metric::P50 => r.latency.map(|l| l.p50),
            Metric::Iops => r.iops,
        }
    }

    /// How much worse `head` is than `base`: above 1 worse, below 1 better.
    fn worse(self, base: f64, head: f64) -> f64 {
        match self {
            Metric::P50 => head / base,
            Metric::Iops => base / head,
        }
    }
}

/// One side's samples of one row.
#[derive(Debug, Clone, PartialEq)]
pub struct Spread {
    pub samples: Vec<f64>,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    fn new(samples: Vec<f64>) -> Option<Spread> {
        let median = median(&samples)?;
        let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
        let max = samples.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Some(Spread {
            samples,
            median,
            min,
            max,
        })
    }
}

/// What the comparison says about a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// HEAD is worse by more than the threshold and the noise.
    Slower,
    /// HEAD is better by more than the threshold and the noise.
    Faster,
    /// Within the noise.
    Same,
    /// Only one side has samples (a configuration that one build does not have).
    Missing,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Slower => "**slower**",
            Verdict::Faster => "faster",
            Verdict::Same => "",
            Verdict::Missing => "one side only",
        }
    }
}

/// One row of the comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub vmm: String,
    pub config: String,
    pub test: String,
    pub metric: Metric,
    pub base: Option<Spread>,
    pub head: Option<Spread>,
    /// HEAD's median over BASE's.
    pub ratio: Option<f64>,
    /// The Hodges-Lehmann estimate of HEAD over BASE (median of the pairwise ratios).
    pub shift: Option<f64>,
    /// One-sided p-value of "HEAD is worse".
    pub p_worse: Option<f64>,
    /// One-sided p-value of "HEAD is better".
    pub p_better: Option<f64>,
    pub verdict: Verdict,
}

type Key = (String, String, String);

fn key(r: &Record) -> Key {
    (r.vmm.clone(), r.config.clone(), r.test.clone())
}

/// Compares the records of BASE and HEAD, rows in BASE's order (then HEAD's new rows).
pub fn compare(base: &[Record], head: &[Record], threshold: f64) -> Vec<Line> {
    let mut order: Vec<Key> = Vec::new();
    for r in base.iter().chain(head) {
        let k = key(r);
        if !order.contains(&k) {
            order.push(k);
        }
    }
    let samples = |records: &[Record], k: &Key, m: Metric| -> Option<Spread> {
        let v: Vec<f64> = records
            .iter()
            .filter(|r| key(r) == *k)
            .filter_map(|r| m.sample(r))
            .filter(|v| v.is_finite() && *v > 0.0)
            .collect();
        Spread::new(v)
    };
    let mut out = Vec::new();
    for k in order {
        for metric in [Metric::P50, Metric::Iops] {
            let (b, h) = (samples(base, &k, metric), samples(head, &k, metric));
            if b.is_none() && h.is_none() {
                continue;
            }
            out.push(judge(&k, metric, b, h, threshold));
        }
    }
    out
}

fn judge(k: &Key, metric: Metric, base: Option<Spread>, head: Option<Spread>, thr: f64) -> Line {
    let mut line = Line {
        vmm: k.0.clone(),
        config: k.1.clone(),
        test: k.2.clone(),
        metric,
        base,
        head,
        ratio: None,
        shift: None,
        p_worse: None,
        p_better: None,
        verdict: Verdict::Missing,
    };
    let (Some(b), Some(h)) = (&line.base, &line.head) else {
        return line;
    };
    let worse = metric.worse(b.median, h.median);
    let shift = hodges_lehmann_ratio(&b.samples, &h.samples);
    let shift_worse = shift.map(|s| match metric {
        Metric::P50 => s,
        Metric::Iops => 1.0 / s,
    });
    let (p_worse, p_better) = match metric {
        Metric::P50 => (
            mann_whitney_greater(&h.samples, &b.samples),
            mann_whitney_greater(&b.samples, &h.samples),
        ),
        Metric::Iops => (
            mann_whitney_greater(&b.samples, &h.samples),
            mann_whitney_greater(&h.samples, &b.samples),
        ),
    };
    line.ratio = Some(h.median / b.median);
    line.shift = shift;
    line.p_worse = Some(p_worse);
    line.p_better = Some(p_better);
    let beyond = |w: f64| w > 1.0 + thr;
    line.verdict = match shift_worse {
        Some(s) if beyond(worse) && beyond(s) && p_worse < P_SLOWER => Verdict::Slower,
        Some(s) if beyond(1.0 / worse) && beyond(1.0 / s) && p_better < P_SLOWER => Verdict::Faster,
        _ => Verdict::Same,
    };
    line
}

/// The median of `h / b` over every pair of a HEAD and a BASE sample.
fn hodges_lehmann_ratio(base: &[f64], head: &[f64]) -> Option<f64> {
    let logs: Vec<f64> = head
        .iter()
        .flat_map(|h| base.iter().map(move |b| (h / b).ln()))
        .collect();
    median(&logs).map(f64::exp)
}

/// One-sided Mann-Whitney p-value that samples of `x` tend to be greater than those of `y`
/// (normal approximation with tie and continuity corrections); 1.0 when it cannot be told.
fn mann_whitney_greater(x: &[f64], y: &[f64]) -> f64 {
    let (n1, n2) = (x.len() as f64, y.len() as f64);
    if x.is_empty() || y.is_empty() {
        return 1.0;
    }
    let u: f64 = x
        .iter()
        .map(|a| {
            y.iter()
                .map(|b| match a.total_cmp(b) {
                    std::cmp::Ordering::Greater => 1.0,
                    std::cmp::Ordering::Equal => 0.5,
                    std::cmp::Ordering::Less => 0.0,
                })
                .sum::<f64>()
        })
        .sum();
    // Tie correction: sum of t^3 - t over groups of equal values in the pooled samples.
    let mut pooled: Vec<f64> = x.iter().chain(y).copied().collect();
    pooled.sort_by(|a, b| a.total_cmp(b));
    let mut ties = 0.0;
    let mut i = 0;
    while i < pooled.len() {
        let mut j = i + 1;
        while j < pooled.len() && pooled[j] == pooled[i] {
            j += 1;
        }
        let t = (j - i) as f64;
        ties += t * t * t - t;
        i = j;
    }
    let n = n1 + n2;
    let var = n1 * n2 / 12.0 * ((n + 1.0) - ties / (n * (n - 1.0)));
    if var <= 0.0 {
        return 1.0;
    }
    let z = (u - n1 * n2 / 2.0 - 0.5) / var.sqrt();
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

/// The complementary error function (Numerical Recipes' erfcc, relative error < 1.2e-7).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

fn fmt_value(metric: Metric, v: f64) -> String {
    match metric {
        Metric::P50 => format!("{v:.2}"),
        Metric::Iops => format!("{:.0}k", v / 1000.0),
    }
}

fn fmt_spread(metric: Metric, s: &Option<Spread>) -> String {
    match s {
        Some(s) => format!(
            "{} ({}-{}) n={}",
            fmt_value(metric, s.median),
            fmt_value(metric, s.min),
            fmt_value(metric, s.max),
            s.samples.len()
        ),
        None => "-".into(),
    }
}

/// The comparison as a Markdown table, with a line saying what the columns mean.
pub fn markdown(lines: &[Line], base_name: &str, head_name: &str, threshold: f64) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "BASE = {base_name}, HEAD = {head_name}: median (min-max) over every run of every round. \
         HEAD/BASE is the ratio of the medians, shift the Hodges-Lehmann estimate of HEAD over \
         BASE, p the one-sided Mann-Whitney p-value of HEAD being worse. Slower: median and \
         shift worse by more than {:.0} % and p < {P_SLOWER}.\n",
        threshold * 100.0
    );
    s.push_str(
        "| vmm | configuration | test | metric | BASE | HEAD | HEAD/BASE | shift | p | verdict |\n",
    );
    s.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
    let f3 = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
    for l in lines {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            l.vmm,
            l.config,
            l.test,
            l.metric.name(),
            fmt_spread(l.metric, &l.base),
            fmt_spread(l.metric, &l.head),
            f3(l.ratio),
            f3(l.shift),
            l.p_worse.map_or("-".to_string(), |p| format!("{p:.3}")),
            l.verdict.name()
        );
    }
    s
}

/// The other load during each side's runs (CPUs' worth, 2.0 = both CPUs of this machine).
fn load_line(base: &[Record], head: &[Record]) -> String {
    let side = |r: &[Record]| {
        let v: Vec<f64> = r.iter().map(|r| r.load.other_cpus).collect();
        let max = v.iter().copied().fold(0.0, f64::max);
        format!("median {:.2}, max {max:.2}", median(&v).unwrap_or(0.0))
    };
    format!(
        "\nOther load during the runs (CPUs busy with other processes): BASE {}; HEAD {}.\n",
        side(base),
        side(head)
    )
}

/// Every `results.json` in the subdirectories of `dir` (one per round), in name order.
pub fn read_rounds(dir: &Path) -> Result<Vec<Record>, String> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path().join("results.json")))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(format!(
            "{}: no round directory with a results.json",
            dir.display()
        ));
    }
    let mut records = Vec::new();
    for f in files {
        records.extend(Results::read(&f)?.records);
    }
    Ok(records)
}

/// What `bench compare` found.
#[derive(Debug)]
pub struct Comparison {
    pub lines: Vec<Line>,
    pub markdown: String,
}

impl Comparison {
    pub fn slower(&self) -> Vec<&Line> {
        self.lines
            .iter()
            .filter(|l| l.verdict == Verdict::Slower)
            .collect()
    }
}

/// Options of `bench compare DIR`.
#[derive(Debug, Clone, PartialEq)]
pub struct CompareOptions {
    /// Holds `base/<round>/results.json` and `head/<round>/results.json`; `compare.md` is
    /// written there.
    pub dir: PathBuf,
    pub threshold: f64,
    pub base_name: String,
    pub head_name: String,
}

/// Reads both sides' rounds under `opts.dir`, compares them and writes `compare.md` there.
pub fn run_compare(opts: &CompareOptions) -> Result<Comparison, String> {
    let base = read_rounds(&opts.dir.join("base"))?;
    let head = read_rounds(&opts.dir.join("head"))?;
    let lines = compare(&base, &head, opts.threshold);
    if !lines.iter().any(|l| l.base.is_some() && l.head.is_some()) {
        return Err(format!(
            "{}: no configuration and test has samples on both sides ({} records of BASE, {} of HEAD)",
            opts.dir.display(),
            base.len(),
            head.len()
        ));
    }
    let mut md = markdown(&lines, &opts.base_name, &opts.head_name, opts.threshold);
    md.push_str(&load_line(&base, &head));
    let out = opts.dir.join("compare.md");
    fs::write(&out, &md).map_err(|e| format!("{}: {e}", out.display()))?;
    Ok(Comparison {
        lines,
        markdown: md,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::bench::report::{summarize, Meta};
    use crate::bench::{Load, Matrix, Model};
    use crate::host::ScratchDir;
    use crate::probe::Summary;

    /// The p50s of QD1 reads of one build over 12 runs, as this machine gives them: two
    /// modes, 2.1-2.3 µs and 2.8-3.2 µs.
    const BIMODAL: [f64; 12] = [
        2.12, 2.95, 2.21, 3.10, 2.28, 2.18, 2.86, 3.04, 2.25, 2.16, 3.18, 2.23,
    ];
    /// QD32 IOPS of 12 runs: 320k-530k.
    const IOPS: [f64; 12] = [
        402e3, 331e3, 515e3, 468e3, 352e3, 529e3, 441e3, 389e3, 322e3, 497e3, 455e3, 376e3,
    ];

    fn record(config: &str, test: &str, run: u32, p50: f64, iops: Option<f64>) -> Record {
        Record {
            matrix: Matrix::Direct,
            model: Model::InVmm,
            vmm: "vmm".into(),
            config: config.into(),
            test: test.into(),
            run,
            n: 1000,
            latency: Some(Summary {
                min: p50 * 0.8,
                p50,
                p90: p50 * 1.5,
                p99: p50 * 4.0,
                p999: p50 * 40.0,
                max: p50 * 300.0,
            }),
            iops,
            seconds: None,
            exits_per_op: BTreeMap::new(),
            cpu_us_per_op: Some(3.0),
            load: Load::default(),
        }
    }

    /// Writes `rounds` results.json files per side under a scratch dir, `runs` runs each, the
    /// same layout `scripts/bench-compare` makes, with the QD1 p50s and QD32 IOPS given.
    fn write_side(dir: &Path, side: &str, p50: &[f64], iops: &[f64], runs_per_round: usize) {
        for (round, chunk) in p50.chunks(runs_per_round).enumerate() {
            let mut recs = Vec::new();
            for (i, v) in chunk.iter().enumerate() {
                let run = i as u32 + 1;
                recs.push(record("virtio-blk", "blk-read-qd1", run, *v, None));
                let at = round * runs_per_round + i;
                recs.push(record(
                    "virtio-blk",
                    "blk-read-qd32",
                    run,
                    60.0,
                    Some(iops[at]),
                ));
            }
            let rows = summarize(&recs);
            let text = Results::new(Meta::default(), &recs, &rows)
                .to_json()
                .unwrap();
            let d = dir.join(side).join(format!("round-{:02}", round + 1));
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("results.json"), text).unwrap();
        }
    }

    fn run(tag: &str, base: (&[f64], &[f64]), head: (&[f64], &[f64])) -> Comparison {
        let dir = ScratchDir::new(tag).unwrap();
        write_side(dir.path(), "base", base.0, base.1, 2);
        write_side(dir.path(), "head", head.0, head.1, 2);
        let c = run_compare(&CompareOptions {
            dir: dir.path().to_path_buf(),
            threshold: DEFAULT_THRESHOLD,
            base_name: "base".into(),
            head_name: "head".into(),
        })
        .unwrap();
        let md = fs::read_to_string(dir.join("compare.md")).unwrap();
        assert_eq!(md, c.markdown);
        c
    }

    fn line(c: &Comparison, test: &str, metric: Metric) -> Line {
        c.lines
            .iter()
            .find(|l| l.test == test && l.metric == metric)
            .unwrap_or_else(|| panic!("no {test} {metric:?} in {:?}", c.lines))
            .clone()
    }

    fn scaled(v: &[f64], f: f64) -> Vec<f64> {
        v.iter().map(|x| x * f).collect()
    }

    #[test]
    fn head_30_percent_slower_is_flagged() {
        let c = run(
            "cmp-slower",
            (&BIMODAL, &IOPS),
            (&scaled(&BIMODAL, 1.3), &scaled(&IOPS, 1.0 / 1.3)),
        );
        let p50 = line(&c, "blk-read-qd1", Metric::P50);
        assert_eq!(p50.verdict, Verdict::Slower, "{}", c.markdown);
        assert!((p50.shift.unwrap() - 1.3).abs() < 0.02, "{p50:?}");
        assert_eq!(p50.base.as_ref().unwrap().samples.len(), 12);
        let iops = line(&c, "blk-read-qd32", Metric::Iops);
        assert_eq!(iops.verdict, Verdict::Slower, "{}", c.markdown);
        // Its p50 did not change: not flagged.
        assert_eq!(
            line(&c, "blk-read-qd32", Metric::P50).verdict,
            Verdict::Same
        );
        assert_eq!(c.slower().len(), 2);
        assert!(
            c.markdown
                .contains("| vmm | virtio-blk | blk-read-qd1 | p50 µs | 2.26 (2.12-3.18) n=12 |"),
            "{}",
            c.markdown
        );
        assert!(c.markdown.contains("**slower**"));
    }

    #[test]
    fn equal_distributions_are_not_flagged() {
        // The same values in another order: other runs, same build.
        let mut p50 = BIMODAL;
        p50.reverse();
        let mut iops = IOPS;
        iops.rotate_left(5);
        let c = run("cmp-equal", (&BIMODAL, &IOPS), (&p50, &iops));
        assert!(c.slower().is_empty(), "{}", c.markdown);
        assert!(c.lines.iter().all(|l| l.verdict == Verdict::Same));
        assert_eq!(line(&c, "blk-read-qd1", Metric::P50).ratio, Some(1.0));
    }

    #[test]
    fn a_mode_flip_is_not_a_slowdown() {
        // Same build, but HEAD drew 7 of 12 runs in the upper mode where BASE drew 4: the
        // median moves by about 30 %, the distributions do not.
        let base = [
            2.12, 2.21, 2.28, 2.18, 2.25, 2.16, 2.23, 2.19, 2.95, 3.10, 2.86, 3.04,
        ];
        let head = [
            2.14, 2.22, 2.27, 2.17, 2.24, 2.96, 3.08, 2.88, 3.02, 3.15, 2.91, 3.11,
        ];
        let c = run("cmp-flip", (&base, &IOPS), (&head, &IOPS));
        let p50 = line(&c, "blk-read-qd1", Metric::P50);
        assert!(p50.ratio.unwrap() > 1.25, "{p50:?}");
        assert_eq!(p50.verdict, Verdict::Same, "{}", c.markdown);
    }

    #[test]
    fn faster_and_one_sided_rows_do_not_fail() {
        let dir = ScratchDir::new("cmp-faster").unwrap();
        write_side(dir.path(), "base", &BIMODAL, &IOPS, 3);
        write_side(dir.path(), "head", &scaled(&BIMODAL, 0.7), &IOPS, 3);
        let extra = dir.path().join("head").join("round-09");
        fs::create_dir_all(&extra).unwrap();
        let recs = vec![record("new config", "blk-read-qd1", 1, 2.0, None)];
        fs::write(
            extra.join("results.json"),
            Results::new(Meta::default(), &recs, &[]).to_json().unwrap(),
        )
        .unwrap();
        let c = run_compare(&CompareOptions {
            dir: dir.path().to_path_buf(),
            threshold: DEFAULT_THRESHOLD,
            base_name: "a".into(),
            head_name: "b".into(),
        })
        .unwrap();
        assert!(c.slower().is_empty(), "{}", c.markdown);
        assert_eq!(
            line(&c, "blk-read-qd1", Metric::P50).verdict,
            Verdict::Faster
        );
        let new = c.lines.iter().find(|l| l.config == "new config").unwrap();
        assert_eq!(new.verdict, Verdict::Missing);
        assert!(new.base.is_none());
    }

    #[test]
    fn missing_or_broken_rounds_are_errors() {
        let dir = ScratchDir::new("cmp-broken").unwrap();
        let opts = CompareOptions {
            dir: dir.path().to_path_buf(),
            threshold: DEFAULT_THRESHOLD,
            base_name: "a".into(),
            head_name: "b".into(),
        };
        assert!(run_compare(&opts).unwrap_err().contains("base"));
        write_side(dir.path(), "base", &BIMODAL, &IOPS, 2);
        let e = run_compare(&opts).unwrap_err();
        assert!(e.contains("head"), "{e}");
        fs::create_dir_all(dir.path().join("head").join("round-01")).unwrap();
        let e = run_compare(&opts).unwrap_err();
        assert!(e.contains("no round directory"), "{e}");
        let bad = dir.path().join("head").join("round-01");
        fs::create_dir_all(&bad).unwrap();
        fs::write(bad.join("results.json"), "{\"records\":[").unwrap();
        let e = run_compare(&opts).unwrap_err();
        assert!(e.contains("results.json"), "{e}");
        // Rounds without records (a filter that matched nothing) compare nothing: an error.
        fs::write(
            bad.join("results.json"),
            Results::new(Meta::default(), &[], &[]).to_json().unwrap(),
        )
        .unwrap();
        let e = run_compare(&opts).unwrap_err();
        assert!(e.contains("no configuration and test"), "{e}");
    }

    #[test]
    fn rank_test_and_erfc() {
        assert!((erfc(0.0) - 1.0).abs() < 1e-7);
        assert!((erfc(1.0) - 0.157_299_207).abs() < 1e-6);
        assert!((erfc(-1.0) - 1.842_700_793).abs() < 1e-6);
        let a: Vec<f64> = (0..12).map(f64::from).collect();
        let b: Vec<f64> = (12..24).map(f64::from).collect();
        assert!(mann_whitney_greater(&b, &a) < 1e-4);
        assert!(mann_whitney_greater(&a, &b) > 0.999);
        assert!((mann_whitney_greater(&a, &a) - 0.5).abs() < 0.05);
        assert_eq!(mann_whitney_greater(&[1.0], &[]), 1.0);
        assert_eq!(mann_whitney_greater(&[1.0, 1.0], &[1.0, 1.0]), 1.0);
    }
}
