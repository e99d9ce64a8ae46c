//! The latency bench across the three device models (`scripts/bench`, the `bench` binary).
//!
//! Two matrices produce [`Record`]s:
//! - [`direct`]: the ring-3 probe guest (`tests/guest`, [`crate::probe`]) on this host's
//!   /dev/kvm, under our vmm and under QEMU, with in-VMM virtio, vhost-user daemons and QEMU's
//!   own configurations;
//! - [`lab`]: Linux guests inside the lab (L2 under KVM in L1), our vmm next to QEMU, for the
//!   three models (in-VMM virtio, vhost-user, VFIO passthrough).
//!
//! [`report`] turns the records into the table, the JSON and the SVG plot; [`compare`] reads
//! the JSON of two builds' runs back and tells whether one is slower.

use std::collections::BTreeMap;
use std::fs;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::probe::Summary;

pub mod compare;
pub mod direct;
pub mod lab;
pub mod report;

/// Serializers that round floats for the bench's JSON (measurements do not carry more than
/// a few digits; the files stay readable and diffable).
pub mod round {
    use std::collections::BTreeMap;

    use serde::ser::{SerializeMap, Serializer};

    fn to(v: f64, decimals: i32) -> f64 {
        let scale = 10f64.powi(decimals);
        (v * scale).round() / scale
    }

    /// Three decimals.
    pub fn f3<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(to(*v, 3))
    }

    /// Two decimals.
    pub fn f2<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(to(*v, 2))
    }

    /// Three decimals, `null` for None.
    pub fn opt3<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_some(&to(*v, 3)),
            None => s.serialize_none(),
        }
    }

    /// A map's values with three decimals.
    pub fn map3<S: Serializer>(m: &BTreeMap<String, f64>, s: S) -> Result<S::Ok, S::Error> {
        let mut out = s.serialize_map(Some(m.len()))?;
        for (k, v) in m {
            out.serialize_entry(k, &to(*v, 3))?;
        }
        out.end()
    }
}

/// Which matrix a record belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Matrix {
    Direct,
    Lab,
}

impl Matrix {
    pub fn name(self) -> &'static str {
        match self {
            Matrix::Direct => "direct",
            Matrix::Lab => "lab",
        }
    }
}

/// The device model measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Model {
    /// Hypervisor-direct: the device emulated in the VMM process.
    InVmm,
    /// Split driver: a vhost-user back-end process.
    VhostUser,
    /// VFIO passthrough of a host PCI device.
    Passthrough,
}

impl Model {
    pub fn name(self) -> &'static str {
        match self {
            Model::InVmm => "in-vmm",
            Model::VhostUser => "vhost-user",
            Model::Passthrough => "passthrough",
        }
    }
}

/// What else the machine did during a run.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Load {
    /// 1-minute load average at the end of the run.
    #[serde(serialize_with = "round::f2")]
    pub loadavg1: f64,
    /// CPUs' worth of time used by processes other than the ones under test, averaged over
    /// the run (0.0 idle, 2.0 both CPUs of this machine busy).
    #[serde(serialize_with = "round::f3")]
    pub other_cpus: f64,
}

/// One measurement: one test of one configuration in one run (one line of `records` in
/// `results.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub matrix: Matrix,
    pub model: Model,
    /// `vmm` (ours) or `qemu`.
    pub vmm: String,
    /// The configuration, e.g. `virtio-blk io_uring+iothread`, `vhost-user-blk (ours)`.
    pub config: String,
    /// `blk-read-qd1`, `blk-write-qd1`, `blk-read-qd32`, `net-rtt`, `boot-to-init`.
    pub test: String,
    /// 1-based run number (configurations are interleaved run by run).
    pub run: u32,
    /// Measured operations.
    pub n: u64,
    /// Latency percentiles (µs).
    #[serde(rename = "latency_us")]
    pub latency: Option<Summary>,
    /// Operations per second (the QD32 run).
    #[serde(serialize_with = "round::opt3")]
    pub iops: Option<f64>,
    /// Seconds (boot to init).
    #[serde(serialize_with = "round::opt3")]
    pub seconds: Option<f64>,
    /// vCPU exits per operation by kind (from the vmm's exit counters; ours only).
    #[serde(serialize_with = "round::map3")]
    pub exits_per_op: BTreeMap<String, f64>,
    /// Host CPU time per operation (µs) of the VMM's non-vCPU threads and the back-end
    /// daemon's threads.
    #[serde(serialize_with = "round::opt3")]
    pub cpu_us_per_op: Option<f64>,
    pub load: Load,
}

impl Record {
    /// The key that groups the runs of one configuration and test.
    pub fn key(&self) -> (Matrix, Model, String, String, String) {
        (
            self.matrix,
            self.model,
            self.vmm.clone(),
            self.config.clone(),
            self.test.clone(),
        )
    }
}

/// CPU time (in clock ticks) of the whole machine and of a set of processes, to tell the
/// other load from ours.
#[derive(Debug, Clone, Copy, Default)]
struct CpuSample {
    busy_ticks: u64,
    at: Option<Instant>,
}

fn machine_busy_ticks() -> u64 {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0;
    };
    // user nice system idle iowait irq softirq steal ...
    let v: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    v.iter().take(8).sum::<u64>().saturating_sub(idle)
}

/// Ticks per second of /proc's CPU times.
pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Measures the machine's load during a run: start before the run, finish after it with the
/// CPU ticks the processes under test used meanwhile.
pub struct LoadMeter {
    start: CpuSample,
}

impl LoadMeter {
    pub fn start() -> LoadMeter {
        LoadMeter {
            start: CpuSample {
                busy_ticks: machine_busy_ticks(),
                at: Some(Instant::now()),
            },
        }
    }

    pub fn finish(&self, own_ticks: u64) -> Load {
        let busy = machine_busy_ticks().saturating_sub(self.start.busy_ticks);
        let secs = self
            .start
            .at
            .map_or(0.0, |t| t.elapsed().as_secs_f64())
            .max(1e-3);
        let other = busy.saturating_sub(own_ticks) as f64 / clock_ticks() / secs;
        Load {
            loadavg1: loadavg1(),
            other_cpus: other,
        }
    }
}

pub fn loadavg1() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(0.0)
}

/// Median of `v` (the mean of the two middle values for an even count); None when empty.
pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let m = s.len() / 2;
    Some(if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            matrix: Matrix::Direct,
            model: Model::InVmm,
            vmm: "vmm".into(),
            config: "virtio-blk \"x\"\n".into(),
            test: "blk-read-qd1".into(),
            run: 1,
            n: 1000,
            latency: Some(Summary {
                min: 1.0,
                p50: 2.0004,
                p90: 3.0,
                p99: 4.0,
                p999: 5.0,
                max: 6.0,
            }),
            iops: None,
            seconds: None,
            exits_per_op: [("notify".to_string(), 0.5)].into_iter().collect(),
            cpu_us_per_op: Some(1.25),
            load: Load {
                loadavg1: 0.5,
                other_cpus: 0.01,
            },
        }
    }

    #[test]
    fn median() {
        assert_eq!(super::median(&[]), None);
        assert_eq!(super::median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(super::median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn record_json_round_trip() {
        let r = record();
        let j = serde_json::to_string(&r).unwrap();
        assert!(
            j.starts_with("{\"matrix\":\"direct\",\"model\":\"in-vmm\",\"vmm\":\"vmm\",\"config\":\"virtio-blk \\\"x\\\"\\n\""),
            "{j}"
        );
        assert!(
            j.contains("\"latency_us\":{\"min\":1.0,\"p50\":2.0,\"p90\":3.0"),
            "{j}"
        );
        assert!(
            j.contains("\"iops\":null,\"seconds\":null,\"exits_per_op\":{\"notify\":0.5}"),
            "{j}"
        );
        assert!(
            j.ends_with("\"load\":{\"loadavg1\":0.5,\"other_cpus\":0.01}}"),
            "{j}"
        );
        let back: Record = serde_json::from_str(&j).unwrap();
        let mut rounded = r.clone();
        if let Some(l) = rounded.latency.as_mut() {
            l.p50 = 2.0;
        }
        assert_eq!(back, rounded);
        for m in [Matrix::Direct, Matrix::Lab] {
            assert_eq!(
                serde_json::to_string(&m).unwrap(),
                format!("\"{}\"", m.name())
            );
        }
        for m in [Model::InVmm, Model::VhostUser, Model::Passthrough] {
            assert_eq!(
                serde_json::to_string(&m).unwrap(),
                format!("\"{}\"", m.name())
            );
        }
    }

    /// The committed results (written by the hand-built writer this replaced) read back.
    #[test]
    fn committed_results_read_back() {
        let path = crate::lab::repo_root().join("scripts/bench-results/results.json");
        let r = report::Results::read(&path).unwrap();
        assert_eq!(r.meta.runs, "4");
        assert!(r.records.len() > 50, "{}", r.records.len());
        assert!(r
            .records
            .iter()
            .any(|x| x.matrix == Matrix::Lab && x.model == Model::Passthrough));
        assert!(r
            .records
            .iter()
            .any(|x| x.latency.is_none() && x.seconds.is_some()));
        assert_eq!(r.summary.len(), report::summarize(&r.records).len());
        // Written again, it reads back the same.
        let again: report::Results = serde_json::from_str(&r.to_json().unwrap()).unwrap();
        assert_eq!(again, r);
    }
}
