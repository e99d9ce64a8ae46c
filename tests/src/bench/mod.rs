//! The latency bench across the three device models (`scripts/bench`, the `bench` binary).
//!
//! Two matrices produce [`Record`]s:
//! - [`direct`]: the ring-3 probe guest (`tests/guest`, [`crate::probe`]) on this host's
//!   /dev/kvm, under our vmm and under QEMU, with in-VMM virtio, vhost-user daemons and QEMU's
//!   own configurations;
//! - [`lab`]: Linux guests inside the lab (L2 under KVM in L1), our vmm next to QEMU, for the
//!   three models (in-VMM virtio, vhost-user, VFIO passthrough).
//!
//! [`report`] turns the records into the table, the JSON and the SVG plot.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::time::Instant;

use crate::probe::Summary;

pub mod direct;
pub mod lab;
pub mod report;

/// Which matrix a record belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
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
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Load {
    /// 1-minute load average at the end of the run.
    pub loadavg1: f64,
    /// CPUs' worth of time used by processes other than the ones under test, averaged over
    /// the run (0.0 idle, 2.0 both CPUs of this machine busy).
    pub other_cpus: f64,
}

/// One measurement: one test of one configuration in one run.
#[derive(Debug, Clone, PartialEq)]
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
    pub latency: Option<Summary>,
    /// Operations per second (the QD32 run).
    pub iops: Option<f64>,
    /// Seconds (boot to init).
    pub seconds: Option<f64>,
    /// vCPU exits per operation by kind (from the vmm's exit counters; ours only).
    pub exits_per_op: BTreeMap<String, f64>,
    /// Host CPU time per operation (µs) of the VMM's non-vCPU threads and the back-end
    /// daemon's threads.
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

    pub fn to_json(&self) -> String {
        let mut s = String::new();
        let opt = |v: Option<f64>| v.map_or("null".to_string(), |v| format!("{v:.3}"));
        let _ = write!(
            s,
            "{{\"matrix\":\"{}\",\"model\":\"{}\",\"vmm\":{},\"config\":{},\"test\":{},\"run\":{},\"n\":{}",
            self.matrix.name(),
            self.model.name(),
            json_str(&self.vmm),
            json_str(&self.config),
            json_str(&self.test),
            self.run,
            self.n
        );
        let _ = write!(
            s,
            ",\"latency_us\":{}",
            self.latency.map_or("null".to_string(), |l| l.to_json())
        );
        let _ = write!(
            s,
            ",\"iops\":{},\"seconds\":{}",
            opt(self.iops),
            opt(self.seconds)
        );
        s.push_str(",\"exits_per_op\":{");
        for (i, (k, v)) in self.exits_per_op.iter().enumerate() {
            let _ = write!(s, "{}{}:{v:.3}", if i > 0 { "," } else { "" }, json_str(k));
        }
        let _ = write!(
            s,
            "}},\"cpu_us_per_op\":{},\"load\":{{\"loadavg1\":{:.2},\"other_cpus\":{:.3}}}}}",
            opt(self.cpu_us_per_op),
            self.load.loadavg1,
            self.load.other_cpus
        );
        s
    }
}

/// A JSON string literal.
pub fn json_str(v: &str) -> String {
    let mut s = String::from("\"");
    for c in v.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(s, "\\u{:04x}", c as u32);
            }
            c => s.push(c),
        }
    }
    s.push('"');
    s
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

    #[test]
    fn median_and_json() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(json_str("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
        let r = Record {
            matrix: Matrix::Direct,
            model: Model::InVmm,
            vmm: "vmm".into(),
            config: "virtio-blk".into(),
            test: "blk-read-qd1".into(),
            run: 1,
            n: 1000,
            latency: Some(Summary {
                min: 1.0,
                p50: 2.0,
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
        };
        let j = r.to_json();
        assert!(
            j.starts_with("{\"matrix\":\"direct\",\"model\":\"in-vmm\""),
            "{j}"
        );
        assert!(
            j.contains("\"latency_us\":{\"min\":1.000,\"p50\":2.000"),
            "{j}"
        );
        assert!(j.contains("\"exits_per_op\":{\"notify\":0.500}"), "{j}");
        assert!(
            j.ends_with("\"load\":{\"loadavg1\":0.50,\"other_cpus\":0.010}}"),
            "{j}"
        );
        assert_eq!(j.matches('{').count(), j.matches('}').count());
    }
}
