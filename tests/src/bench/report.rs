//! The bench's outputs: medians across runs with their spread, as a Markdown table, a JSON
//! document (every record plus the summary rows, [`Results`]) and an SVG plot of the
//! percentiles.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{median, round, Matrix, Model, Record};

/// One configuration and test, summarized over its runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub matrix: Matrix,
    pub model: Model,
    pub vmm: String,
    pub config: String,
    pub test: String,
    pub runs: usize,
    /// Medians across runs.
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub p999: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// Smallest and largest p50 of the runs.
    pub p50_spread: Option<(f64, f64)>,
    pub iops: Option<f64>,
    pub seconds: Option<f64>,
    pub exits_per_op: BTreeMap<String, f64>,
    pub cpu_us_per_op: Option<f64>,
    /// The busiest other load seen in any of its runs (CPUs).
    pub max_other_cpus: f64,
}

fn med(records: &[&Record], f: impl Fn(&Record) -> Option<f64>) -> Option<f64> {
    let v: Vec<f64> = records.iter().filter_map(|r| f(r)).collect();
    median(&v)
}

/// Groups records by configuration and test, in first-seen order.
pub fn summarize(records: &[Record]) -> Vec<Row> {
    let mut order = Vec::new();
    let mut groups: BTreeMap<_, Vec<&Record>> = BTreeMap::new();
    for r in records {
        let k = r.key();
        if !groups.contains_key(&k) {
            order.push(k.clone());
        }
        groups.entry(k).or_default().push(r);
    }
    order
        .into_iter()
        .filter_map(|k| {
            let rs = groups.get(&k)?;
            let first = rs.first()?;
            let p50s: Vec<f64> = rs.iter().filter_map(|r| r.latency.map(|l| l.p50)).collect();
            let spread = p50s
                .iter()
                .copied()
                .fold(None, |acc: Option<(f64, f64)>, v| {
                    Some(acc.map_or((v, v), |(lo, hi)| (lo.min(v), hi.max(v))))
                });
            let mut exits = BTreeMap::new();
            let kinds: std::collections::BTreeSet<String> = rs
                .iter()
                .flat_map(|r| r.exits_per_op.keys().cloned())
                .collect();
            for kind in kinds {
                if let Some(m) = med(rs, |r| r.exits_per_op.get(&kind).copied()) {
                    exits.insert(kind, m);
                }
            }
            Some(Row {
                matrix: first.matrix,
                model: first.model,
                vmm: first.vmm.clone(),
                config: first.config.clone(),
                test: first.test.clone(),
                runs: rs.len(),
                p50: med(rs, |r| r.latency.map(|l| l.p50)),
                p90: med(rs, |r| r.latency.map(|l| l.p90)),
                p99: med(rs, |r| r.latency.map(|l| l.p99)),
                p999: med(rs, |r| r.latency.map(|l| l.p999)),
                min: med(rs, |r| r.latency.map(|l| l.min)),
                max: med(rs, |r| r.latency.map(|l| l.max)),
                p50_spread: spread,
                iops: med(rs, |r| r.iops),
                seconds: med(rs, |r| r.seconds),
                exits_per_op: exits,
                cpu_us_per_op: med(rs, |r| r.cpu_us_per_op),
                max_other_cpus: rs.iter().map(|r| r.load.other_cpus).fold(0.0, f64::max),
            })
        })
        .collect()
}

fn f2(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.2}"))
}

/// The Markdown table: one line per configuration and test.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str("| matrix | model | vmm | configuration | test | runs | p50 µs (spread) | p90 | p99 | p99.9 | max | IOPS / s | exits per op | host CPU µs per op | other load |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        let spread = r
            .p50_spread
            .map_or(String::new(), |(lo, hi)| format!(" ({lo:.2}-{hi:.2})"));
        let exits = if r.exits_per_op.is_empty() {
            "-".to_string()
        } else {
            r.exits_per_op
                .iter()
                .filter(|(k, _)| k.as_str() != "total")
                .map(|(k, v)| format!("{k} {v:.3}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let iops_or_secs = match (r.iops, r.seconds) {
            (Some(i), _) => format!("{i:.0} IOPS"),
            (_, Some(s)) => format!("{s:.2} s"),
            _ => "-".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {}{} | {} | {} | {} | {} | {} | {} | {} | {:.2} |",
            r.matrix.name(),
            r.model.name(),
            r.vmm,
            r.config,
            r.test,
            r.runs,
            f2(r.p50),
            spread,
            f2(r.p90),
            f2(r.p99),
            f2(r.p999),
            f2(r.max),
            iops_or_secs,
            exits,
            f2(r.cpu_us_per_op),
            r.max_other_cpus
        );
    }
    s
}

/// Our vmm against QEMU in the lab, pair by pair: the two configurations of one model in the
/// same run (the same L1 boot; back to back, or side by side in alternating turns), so the
/// lab's drift between L1 boots, and side by side its drift over minutes, cancels out of each
/// pair.
#[derive(Debug, Clone, PartialEq)]
pub struct Pairs {
    pub model: Model,
    pub test: String,
    /// (run, ours, QEMU's): the p50 in µs, or the seconds of `boot-to-init`.
    pub pairs: Vec<(u32, f64, f64)>,
}

impl Pairs {
    /// The geometric mean of ours / QEMU's over the pairs (below 1: ours lower).
    pub fn ratio(&self) -> Option<f64> {
        let logs: Vec<f64> = self
            .pairs
            .iter()
            .filter(|(_, a, b)| *a > 0.0 && *b > 0.0)
            .map(|(_, a, b)| (a / b).ln())
            .collect();
        (!logs.is_empty()).then(|| (logs.iter().sum::<f64>() / logs.len() as f64).exp())
    }

    /// Pairs in which ours was lower.
    pub fn ours_lower(&self) -> usize {
        self.pairs.iter().filter(|(_, a, b)| a < b).count()
    }
}

/// The lab's pairs per model and test, in first-seen order.
pub fn lab_pairs(records: &[Record]) -> Vec<Pairs> {
    let metric = |r: &Record| r.latency.map(|l| l.p50).or(r.seconds);
    let mut out: Vec<Pairs> = Vec::new();
    for r in records
        .iter()
        .filter(|r| r.matrix == Matrix::Lab && r.vmm == "vmm")
    {
        let Some(ours) = metric(r) else { continue };
        let theirs = records.iter().find(|q| {
            q.matrix == Matrix::Lab
                && q.vmm == "qemu"
                && q.model == r.model
                && q.test == r.test
                && q.run == r.run
        });
        let Some(theirs) = theirs.and_then(metric) else {
            continue;
        };
        let i = match out
            .iter()
            .position(|p| p.model == r.model && p.test == r.test)
        {
            Some(i) => i,
            None => {
                out.push(Pairs {
                    model: r.model,
                    test: r.test.clone(),
                    pairs: Vec::new(),
                });
                out.len() - 1
            }
        };
        out[i].pairs.push((r.run, ours, theirs));
    }
    out
}

/// The pairs as a Markdown table.
pub fn pairs_table(pairs: &[Pairs]) -> String {
    let mut s = String::from(
        "| model | test | ours / QEMU's per pair (run: ours vs QEMU's) | ours lower | geometric mean of ours / QEMU's |\n|---|---|---|---|---|\n",
    );
    for p in pairs {
        let list = p
            .pairs
            .iter()
            .map(|(run, a, b)| format!("{run}: {a:.0} vs {b:.0}", a = a, b = b))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} of {} | {} |",
            p.model.name(),
            p.test,
            list,
            p.ours_lower(),
            p.pairs.len(),
            p.ratio().map_or("-".into(), |r| format!("{r:.3}"))
        );
    }
    s
}

/// What a `results.json` says about its run (strings, as the committed files have them).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// `2026-12-06 21:47 UTC`.
    pub date: String,
    /// The CPU's model name.
    pub cpu: String,
    pub runs: String,
    pub poll_us: String,
    /// `true` when `--pin` was given.
    pub pinned: String,
    /// The bench's wall time.
    pub seconds: String,
}

/// One summary row of `results.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SummaryRow {
    pub matrix: Matrix,
    pub model: Model,
    pub vmm: String,
    pub config: String,
    pub test: String,
    pub runs: usize,
    #[serde(serialize_with = "round::opt3")]
    pub p50_us: Option<f64>,
    #[serde(serialize_with = "round::opt3")]
    pub p90_us: Option<f64>,
    #[serde(serialize_with = "round::opt3")]
    pub p99_us: Option<f64>,
    #[serde(serialize_with = "round::opt3")]
    pub p999_us: Option<f64>,
    #[serde(serialize_with = "round::opt3")]
    pub max_us: Option<f64>,
    #[serde(serialize_with = "round::opt3")]
    pub p50_min_us: Option<f64>,
    #[serde(serialize_with = "round::opt3")]
    pub p50_max_us: Option<f64>,
    #[serde(serialize_with = "round::opt3")]
    pub iops: Option<f64>,
    #[serde(serialize_with = "round::opt3")]
    pub seconds: Option<f64>,
    #[serde(serialize_with = "round::map3")]
    pub exits_per_op: BTreeMap<String, f64>,
    #[serde(serialize_with = "round::opt3")]
    pub cpu_us_per_op: Option<f64>,
    #[serde(serialize_with = "round::f3")]
    pub max_other_cpus: f64,
}

impl From<&Row> for SummaryRow {
    fn from(r: &Row) -> Self {
        SummaryRow {
            matrix: r.matrix,
            model: r.model,
            vmm: r.vmm.clone(),
            config: r.config.clone(),
            test: r.test.clone(),
            runs: r.runs,
            p50_us: r.p50,
            p90_us: r.p90,
            p99_us: r.p99,
            p999_us: r.p999,
            max_us: r.max,
            p50_min_us: r.p50_spread.map(|s| s.0),
            p50_max_us: r.p50_spread.map(|s| s.1),
            iops: r.iops,
            seconds: r.seconds,
            exits_per_op: r.exits_per_op.clone(),
            cpu_us_per_op: r.cpu_us_per_op,
            max_other_cpus: r.max_other_cpus,
        }
    }
}

/// `results.json`: the run's metadata, every record, the summary rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Results {
    #[serde(flatten)]
    pub meta: Meta,
    pub records: Vec<Record>,
    pub summary: Vec<SummaryRow>,
}

impl Results {
    pub fn new(meta: Meta, records: &[Record], rows: &[Row]) -> Results {
        Results {
            meta,
            records: records.to_vec(),
            summary: rows.iter().map(SummaryRow::from).collect(),
        }
    }

    /// The document, one record or row per line (readable, and diffs line by line).
    pub fn to_json(&self) -> serde_json::Result<String> {
        let mut out = Vec::new();
        let mut ser = serde_json::Serializer::with_formatter(&mut out, OuterLines::default());
        self.serialize(&mut ser)?;
        out.push(b'\n');
        String::from_utf8(out).map_err(|e| serde_json::Error::io(io::Error::other(e)))
    }

    /// Reads a `results.json` (this version's or an older bench's: the format is the same).
    pub fn read(path: &Path) -> Result<Results, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// A JSON layout: the outer two levels (the document and its arrays) one member per line,
/// everything deeper on one line.
#[derive(Default)]
struct OuterLines {
    depth: usize,
    has_value: bool,
}

impl OuterLines {
    /// Containers at this depth or above are spread over lines.
    const SPREAD: usize = 2;

    fn begin<W: ?Sized + io::Write>(&mut self, w: &mut W, open: &[u8]) -> io::Result<()> {
        self.depth += 1;
        self.has_value = false;
        w.write_all(open)
    }

    fn end<W: ?Sized + io::Write>(&mut self, w: &mut W, close: &[u8]) -> io::Result<()> {
        let spread = self.depth <= Self::SPREAD;
        self.depth = self.depth.saturating_sub(1);
        if spread && self.has_value {
            w.write_all(b"\n")?;
            self.indent(w)?;
        }
        w.write_all(close)
    }

    fn member<W: ?Sized + io::Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if !first {
            w.write_all(b",")?;
        }
        if self.depth <= Self::SPREAD {
            w.write_all(b"\n")?;
            self.indent(w)?;
        }
        Ok(())
    }

    fn indent<W: ?Sized + io::Write>(&self, w: &mut W) -> io::Result<()> {
        for _ in 0..self.depth {
            w.write_all(b"  ")?;
        }
        Ok(())
    }
}

impl serde_json::ser::Formatter for OuterLines {
    fn begin_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.begin(w, b"[")
    }

    fn end_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.end(w, b"]")
    }

    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.member(w, first)
    }

    fn end_array_value<W: ?Sized + io::Write>(&mut self, _w: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }

    fn begin_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.begin(w, b"{")
    }

    fn end_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.end(w, b"}")
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.member(w, first)
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(if self.depth <= 1 { b": " } else { b":" })
    }

    fn end_object_value<W: ?Sized + io::Write>(&mut self, _w: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// An SVG plot: one panel per (matrix, test); one line per configuration with its median
/// p50, p90, p99 and p99.9 on a log-scale µs axis.
pub fn svg(rows: &[Row], title: &str) -> String {
    let mut panels: Vec<(String, Vec<&Row>)> = Vec::new();
    for r in rows.iter().filter(|r| r.p50.is_some()) {
        let name = format!("{} / {}", r.matrix.name(), r.test);
        match panels.iter_mut().find(|(n, _)| *n == name) {
            Some((_, v)) => v.push(r),
            None => panels.push((name, vec![r])),
        }
    }
    let (lo, hi) = rows
        .iter()
        .flat_map(|r| [r.p50, r.p999.or(r.p99)])
        .flatten()
        .filter(|v| *v > 0.0)
        .fold((f64::MAX, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if lo > hi {
        (1.0, 10.0)
    } else {
        (
            10f64.powf(lo.log10().floor()),
            10f64.powf(hi.log10().ceil()),
        )
    };
    let (label_w, plot_w, row_h, head_h) = (430.0, 520.0, 18.0, 34.0);
    let width = label_w + plot_w + 40.0;
    let height: f64 = 60.0
        + panels
            .iter()
            .map(|(_, v)| head_h + row_h * v.len() as f64 + 10.0)
            .sum::<f64>();
    let x =
        |v: f64| label_w + (v.max(lo).log10() - lo.log10()) / (hi.log10() - lo.log10()) * plot_w;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="20" font-size="14" font-weight="bold">{}</text>"#,
        esc(title)
    );
    let _ = writeln!(
        s,
        r##"<text x="10" y="38">latency µs, log scale: <tspan fill="#1f77b4">● p50</tspan> <tspan fill="#2ca02c">▲ p90</tspan> <tspan fill="#ff7f0e">■ p99</tspan> <tspan fill="#d62728">◆ p99.9</tspan>; bar = p50 spread across runs</text>"##
    );
    let mut y = 60.0;
    for (name, rs) in &panels {
        let _ = writeln!(
            s,
            r#"<text x="10" y="{:.0}" font-weight="bold">{}</text>"#,
            y + 14.0,
            esc(name)
        );
        // Decade grid lines.
        let mut d = lo;
        while d <= hi * 1.0001 {
            let gx = x(d);
            let _ = writeln!(
                s,
                r##"<line x1="{gx:.1}" y1="{:.0}" x2="{gx:.1}" y2="{:.0}" stroke="#ddd"/><text x="{gx:.1}" y="{:.0}" text-anchor="middle" fill="#666">{}</text>"##,
                y + 20.0,
                y + head_h + row_h * rs.len() as f64,
                y + 28.0,
                if d >= 1.0 {
                    format!("{d:.0}")
                } else {
                    format!("{d}")
                }
            );
            d *= 10.0;
        }
        y += head_h;
        for r in rs {
            let cy = y + row_h / 2.0;
            let _ = writeln!(
                s,
                r#"<text x="10" y="{:.1}">{}</text>"#,
                cy + 4.0,
                esc(&format!("{} {} — {}", r.model.name(), r.vmm, r.config))
            );
            if let Some((a, b)) = r.p50_spread {
                let _ = writeln!(
                    s,
                    r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="6" fill="#aec7e8"/>"##,
                    x(a),
                    cy - 3.0,
                    (x(b) - x(a)).max(1.0)
                );
            }
            let marks = [
                (r.p50, "#1f77b4", "circle"),
                (r.p90, "#2ca02c", "tri"),
                (r.p99, "#ff7f0e", "square"),
                (r.p999, "#d62728", "diamond"),
            ];
            for (v, color, shape) in marks {
                let Some(v) = v else { continue };
                let mx = x(v);
                let _ = match shape {
                    "circle" => writeln!(
                        s,
                        r#"<circle cx="{mx:.1}" cy="{cy:.1}" r="4" fill="{color}"/>"#
                    ),
                    "tri" => writeln!(
                        s,
                        r#"<path d="M{mx:.1},{:.1} l4,7 l-8,0 z" fill="{color}"/>"#,
                        cy - 4.0
                    ),
                    "square" => writeln!(
                        s,
                        r#"<rect x="{:.1}" y="{:.1}" width="7" height="7" fill="{color}"/>"#,
                        mx - 3.5,
                        cy - 3.5
                    ),
                    _ => writeln!(
                        s,
                        r#"<path d="M{mx:.1},{:.1} l4,4 l-4,4 l-4,-4 z" fill="{color}"/>"#,
                        cy - 4.0
                    ),
                };
            }
            y += row_h;
        }
        y += 10.0;
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::Load;
    use crate::probe::Summary;

    fn rec(vmm: &str, run: u32, p50: f64) -> Record {
        Record {
            matrix: Matrix::Direct,
            model: Model::InVmm,
            vmm: vmm.into(),
            config: "virtio-blk".into(),
            test: "blk-read-qd1".into(),
            run,
            n: 100,
            latency: Some(Summary {
                min: p50 / 2.0,
                p50,
                p90: p50 * 2.0,
                p99: p50 * 3.0,
                p999: p50 * 4.0,
                max: p50 * 10.0,
            }),
            iops: None,
            seconds: None,
            exits_per_op: [("notify".to_string(), run as f64)].into_iter().collect(),
            cpu_us_per_op: Some(p50),
            load: Load {
                loadavg1: 0.1,
                other_cpus: run as f64 / 10.0,
            },
        }
    }

    #[test]
    fn medians_and_spread_per_configuration() {
        let recs = vec![
            rec("vmm", 1, 3.0),
            rec("qemu", 1, 5.0),
            rec("vmm", 2, 2.0),
            rec("qemu", 2, 6.0),
            rec("vmm", 3, 10.0),
        ];
        let rows = summarize(&recs);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].vmm, "vmm", "first-seen order");
        assert_eq!(rows[0].runs, 3);
        assert_eq!(rows[0].p50, Some(3.0));
        assert_eq!(rows[0].p50_spread, Some((2.0, 10.0)));
        assert_eq!(rows[0].exits_per_op["notify"], 2.0);
        assert!((rows[0].max_other_cpus - 0.3).abs() < 1e-9);
        assert_eq!(rows[1].p50, Some(5.5));
        let t = table(&rows);
        assert_eq!(t.lines().count(), 4);
        assert!(t.contains("| 3.00 (2.00-10.00) |"), "{t}");
        let meta = Meta {
            date: "2026-11-24".into(),
            ..Meta::default()
        };
        let results = Results::new(meta, &recs, &rows);
        let j = results.to_json().unwrap();
        assert!(j.starts_with("{\n  \"date\": \"2026-11-24\",\n"), "{j}");
        assert_eq!(j.matches("\"run\":").count(), 5);
        assert!(j.contains("\"p50_us\":3.0,"), "{j}");
        // One record or row per line, between the document's own lines.
        assert_eq!(
            j.lines().count(),
            6 + 2 + recs.len() + 2 + rows.len() + 2,
            "{j}"
        );
        assert!(j.contains("\n  \"records\": [\n    {\"matrix\":\"direct\",\"model\":\"in-vmm\","));
        assert!(j.ends_with("}\n  ]\n}\n"), "{j}");
        assert_eq!(serde_json::from_str::<Results>(&j).unwrap(), results);
        let svg = svg(&rows, "test <plot>");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("test &lt;plot&gt;"));
        assert_eq!(svg.matches("<circle").count(), 2);
    }

    fn lab(vmm: &str, model: Model, test: &str, run: u32, v: f64) -> Record {
        let mut r = rec(vmm, run, v);
        r.matrix = Matrix::Lab;
        r.model = model;
        r.test = test.into();
        if test == "boot-to-init" {
            r.latency = None;
            r.seconds = Some(v);
        }
        r
    }

    #[test]
    fn lab_pairs_match_runs_and_models() {
        let recs = vec![
            rec("vmm", 1, 3.0), // direct: not a lab pair
            lab("vmm", Model::InVmm, "blk-read-qd1", 1, 600.0),
            lab("qemu", Model::InVmm, "blk-read-qd1", 1, 800.0),
            lab("qemu", Model::InVmm, "blk-read-qd1", 2, 500.0),
            lab("vmm", Model::InVmm, "blk-read-qd1", 2, 1000.0),
            lab("vmm", Model::Passthrough, "blk-read-qd1", 1, 700.0),
            // QEMU's run 3 has no partner; our run 3 of passthrough has no QEMU record.
            lab("qemu", Model::InVmm, "blk-read-qd1", 3, 1.0),
            lab("vmm", Model::InVmm, "boot-to-init", 1, 9.0),
            lab("qemu", Model::InVmm, "boot-to-init", 1, 16.0),
        ];
        let p = lab_pairs(&recs);
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(p[0].model, Model::InVmm);
        assert_eq!(p[0].test, "blk-read-qd1");
        assert_eq!(p[0].pairs, vec![(1, 600.0, 800.0), (2, 1000.0, 500.0)]);
        assert_eq!(p[0].ours_lower(), 1);
        // sqrt(0.75 * 2.0)
        assert!((p[0].ratio().unwrap() - 1.5f64.sqrt()).abs() < 1e-9);
        assert_eq!(p[1].test, "boot-to-init");
        assert_eq!(p[1].pairs, vec![(1, 9.0, 16.0)]);
        let t = pairs_table(&p);
        assert!(
            t.contains(
                "| in-vmm | blk-read-qd1 | 1: 600 vs 800, 2: 1000 vs 500 | 1 of 2 | 1.225 |"
            ),
            "{t}"
        );
        assert!(pairs_table(&[]).lines().count() == 2);
        assert_eq!(
            Pairs {
                model: Model::InVmm,
                test: "x".into(),
                pairs: vec![]
            }
            .ratio(),
            None
        );
    }

    #[test]
    fn empty_input_gives_an_empty_table_and_a_valid_plot() {
        let rows = summarize(&[]);
        assert!(rows.is_empty());
        assert_eq!(table(&rows).lines().count(), 2);
        assert!(svg(&rows, "empty").contains("</svg>"));
    }
}
