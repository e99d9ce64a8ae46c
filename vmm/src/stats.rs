//! Counters of vCPU exits to userspace, by kind and device, reported when the VM stops.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use crate::bus::Bus;
use crate::vcpu::VcpuCounters;

/// Snapshot of the exit counters.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExitStats {
    /// Port I/O exits per device, and to ports no device claims.
    pub pio: BTreeMap<String, u64>,
    pub pio_unclaimed: u64,
    /// The busiest unclaimed ports, (port, count).
    pub pio_unclaimed_top: Vec<(u64, u64)>,
    /// MMIO exits per device, and to addresses no device claims.
    pub mmio: BTreeMap<String, u64>,
    pub mmio_unclaimed: u64,
    pub mmio_unclaimed_top: Vec<(u64, u64)>,
    /// Signals that interrupted KVM_RUN, and other exit reasons.
    pub interrupted: u64,
    pub other: BTreeMap<String, u64>,
    /// Virtio queue notifications that exited to userspace, per device (part of `mmio`):
    /// zero when every doorbell is caught by an ioeventfd.
    pub notify_exits: BTreeMap<String, u64>,
    /// Port and MMIO writes KVM buffered in its coalesced ring instead of exiting (the PCI
    /// configuration address register): not exits, not part of `total`.
    pub coalesced: u64,
}

impl ExitStats {
    pub fn collect(pio: &Bus, mmio: &Bus, vcpu: &VcpuCounters) -> Self {
        let (pio_map, pio_unclaimed) = pio.counters();
        let (mmio_map, mmio_unclaimed) = mmio.counters();
        let other = vcpu
            .other
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect();
        ExitStats {
            pio: pio_map,
            pio_unclaimed,
            pio_unclaimed_top: pio.unclaimed_top(4),
            mmio: mmio_map,
            mmio_unclaimed,
            mmio_unclaimed_top: mmio.unclaimed_top(4),
            interrupted: vcpu.interrupted.load(Ordering::Relaxed),
            other,
            notify_exits: BTreeMap::new(),
            coalesced: pio.buffered() + mmio.buffered(),
        }
    }

    pub fn total(&self) -> u64 {
        self.pio.values().sum::<u64>()
            + self.pio_unclaimed
            + self.mmio.values().sum::<u64>()
            + self.mmio_unclaimed
            + self.other.values().sum::<u64>()
    }

    /// One line for the log: `pio serial=10 ... mmio pci-ecam=3 ...`.
    pub fn summary(&self) -> String {
        let list = |m: &BTreeMap<String, u64>| {
            m.iter()
                .filter(|(_, v)| **v > 0)
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let top = |v: &[(u64, u64)]| {
            v.iter()
                .map(|(a, c)| format!(" {a:#x}={c}"))
                .collect::<String>()
        };
        format!(
            "{} exits to userspace: pio [{}] unclaimed={}{}; mmio [{}] unclaimed={}{}; other [{}]; kicks={}; coalesced writes {}",
            self.total(),
            list(&self.pio),
            self.pio_unclaimed,
            top(&self.pio_unclaimed_top),
            list(&self.mmio),
            self.mmio_unclaimed,
            top(&self.mmio_unclaimed_top),
            list(&self.other),
            self.interrupted,
            self.coalesced
        )
    }

    /// The `--exit-stats` file: one line of JSON for tests and the benchmark.
    pub fn to_json(&self) -> serde_json::Result<String> {
        let file = ExitStatsFile {
            total: self.total(),
            pio: self.pio.clone(),
            pio_unclaimed: self.pio_unclaimed,
            mmio: self.mmio.clone(),
            mmio_unclaimed: self.mmio_unclaimed,
            other: self.other.clone(),
            interrupted: self.interrupted,
            notify_exits: self.notify_exits.clone(),
            coalesced: self.coalesced,
        };
        serde_json::to_string(&file)
    }
}

/// The `--exit-stats` JSON (`tests::probe::ExitStats` and the bench's lab matrix read it).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatsFile {
    /// Every exit to userspace (coalesced writes excluded).
    pub total: u64,
    pub pio: BTreeMap<String, u64>,
    pub pio_unclaimed: u64,
    pub mmio: BTreeMap<String, u64>,
    pub mmio_unclaimed: u64,
    pub other: BTreeMap<String, u64>,
    pub interrupted: u64,
    pub notify_exits: BTreeMap<String, u64>,
    pub coalesced: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_summary() {
        let mut s = ExitStats::default();
        s.pio.insert("serial".into(), 10);
        s.pio.insert("i8042".into(), 0);
        s.mmio.insert("pci-ecam".into(), 3);
        s.pio_unclaimed = 2;
        s.other.insert("irq_window".into(), 1);
        assert_eq!(s.total(), 16);
        assert_eq!(
            s.to_json().unwrap(),
            "{\"total\":16,\"pio\":{\"i8042\":0,\"serial\":10},\"pio_unclaimed\":2,\"mmio\":{\"pci-ecam\":3},\"mmio_unclaimed\":0,\"other\":{\"irq_window\":1},\"interrupted\":0,\"notify_exits\":{},\"coalesced\":0}"
        );
        let line = s.summary();
        assert!(line.starts_with("16 exits"));
        assert!(line.contains("serial=10"));
        assert!(!line.contains("i8042"));
    }

    #[test]
    fn json_reads_back_with_any_device_name() {
        let mut s = ExitStats::default();
        // A device id is the user's text: quotes, backslashes and control characters must
        // come back as they were, not be mangled or break the document.
        let odd = "disk \"a\"\\b\n\u{1}é";
        s.mmio.insert(odd.into(), 7);
        s.notify_exits.insert(odd.into(), 2);
        s.pio.insert("serial".into(), 1);
        s.interrupted = 4;
        s.coalesced = 9;
        let text = s.to_json().unwrap();
        assert!(!text.contains('\n'), "one line: {text}");
        let back: ExitStatsFile = serde_json::from_str(&text).expect(&text);
        assert_eq!(back.total, 8);
        assert_eq!(back.mmio[odd], 7);
        assert_eq!(back.notify_exits[odd], 2);
        assert_eq!((back.interrupted, back.coalesced), (4, 9));
        assert_eq!(back.pio, s.pio);
    }
}
