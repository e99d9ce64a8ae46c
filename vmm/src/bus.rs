//! Dispatch of trapped port I/O and MMIO accesses to devices, with per-device exit counters.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use thiserror::Error;

/// A device on the PIO or MMIO bus. `offset` is relative to the base it was inserted at.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} for '{name}' overlaps '{other}'")]
    Overlap {
        name: String,
        base: u64,
        len: u64,
        other: String,
    },
    #[error("bus range for '{0}' is empty or wraps around")]
    BadRange(String),
}

struct Entry {
    base: u64,
    len: u64,
    name: String,
    device: Arc<Mutex<dyn BusDevice>>,
    accesses: AtomicU64,
}

/// An address space (port I/O or MMIO) of non-overlapping device ranges.
/// How many distinct unclaimed addresses are counted one by one (the rest are summed).
const UNCLAIMED_TRACKED: usize = 32;

#[derive(Default)]
pub struct Bus {
    entries: RwLock<BTreeMap<u64, Arc<Entry>>>,
    unhandled: AtomicU64,
    unclaimed: Mutex<BTreeMap<u64, u64>>,
    /// Writes KVM buffered instead of exiting (see [`crate::coalesced`]).
    buffered: AtomicU64,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &self,
        name: &str,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len).is_none() {
            return Err(BusError::BadRange(name.to_string()));
        }
        let mut map = self.entries.write().unwrap_or_else(|e| e.into_inner());
        let end = base + len;
        let overlapping = map
            .range(..end)
            .next_back()
            .filter(|(_, e)| e.base + e.len > base);
        if let Some((_, e)) = overlapping {
            return Err(BusError::Overlap {
                name: name.to_string(),
                base,
                len,
                other: e.name.clone(),
            });
        }
        map.insert(
            base,
            Arc::new(Entry {
                base,
                len,
                name: name.to_string(),
                device,
                accesses: AtomicU64::new(0),
            }),
        );
        Ok(())
    }

    /// Removes the range starting at `base` if `owner` is the device inserted there (the
    /// same `Arc`): whoever removes a range must be the one that put it there, so that a
    /// stale address never takes another device's range off the bus. Returns whether it
    /// removed one.
    pub fn remove(&self, base: u64, owner: &Arc<Mutex<dyn BusDevice>>) -> bool {
        let mut map = self.entries.write().unwrap_or_else(|e| e.into_inner());
        let owned = map
            .get(&base)
            .is_some_and(|e| Arc::ptr_eq(&e.device, owner));
        owned && map.remove(&base).is_some()
    }

    /// Every range on the bus: (base, length, name), by address.
    pub fn ranges(&self) -> Vec<(u64, u64, String)> {
        let map = self.entries.read().unwrap_or_else(|e| e.into_inner());
        map.values()
            .map(|e| (e.base, e.len, e.name.clone()))
            .collect()
    }

    /// Whether the range at `base` is `owner`'s.
    pub fn owned_by(&self, base: u64, owner: &Arc<Mutex<dyn BusDevice>>) -> bool {
        let map = self.entries.read().unwrap_or_else(|e| e.into_inner());
        map.get(&base)
            .is_some_and(|e| Arc::ptr_eq(&e.device, owner))
    }

    fn find(&self, addr: u64, size: usize) -> Option<Arc<Entry>> {
        let map = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let (_, e) = map.range(..=addr).next_back()?;
        (addr + size as u64 <= e.base + e.len).then(|| Arc::clone(e))
    }

    /// Reads from the device at `addr`; returns false (and fills 0xff) when nothing is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some(e) => {
                e.accesses.fetch_add(1, Ordering::Relaxed);
                let mut d = e.device.lock().unwrap_or_else(|p| p.into_inner());
                d.read(addr - e.base, data);
                true
            }
            None => {
                self.note_unclaimed(addr);
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to the device at `addr`; returns false when nothing is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        self.deliver(addr, data, true)
    }

    /// Writes a value KVM buffered in its coalesced ring to the device at `addr`: the same
    /// as [`Bus::write`], but counted as buffered, not as an exit.
    pub fn write_buffered(&self, addr: u64, data: &[u8]) -> bool {
        self.buffered.fetch_add(1, Ordering::Relaxed);
        self.deliver(addr, data, false)
    }

    fn deliver(&self, addr: u64, data: &[u8], exit: bool) -> bool {
        match self.find(addr, data.len()) {
            Some(e) => {
                if exit {
                    e.accesses.fetch_add(1, Ordering::Relaxed);
                }
                let mut d = e.device.lock().unwrap_or_else(|p| p.into_inner());
                d.write(addr - e.base, data);
                true
            }
            None => {
                if exit {
                    self.note_unclaimed(addr);
                }
                false
            }
        }
    }

    /// Writes applied from KVM's coalesced ring (not exits).
    pub fn buffered(&self) -> u64 {
        self.buffered.load(Ordering::Relaxed)
    }

    fn note_unclaimed(&self, addr: u64) {
        self.unhandled.fetch_add(1, Ordering::Relaxed);
        let mut m = self.unclaimed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&addr) {
            *n += 1;
        } else if m.len() < UNCLAIMED_TRACKED {
            m.insert(addr, 1);
        }
    }

    /// The most accessed addresses no device claims, with their counts (busiest first).
    pub fn unclaimed_top(&self, n: usize) -> Vec<(u64, u64)> {
        let m = self.unclaimed.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<(u64, u64)> = m.iter().map(|(a, c)| (*a, *c)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v.truncate(n);
        v
    }

    /// Accesses per device name (ranges of one device are summed), and unclaimed accesses.
    pub fn counters(&self) -> (BTreeMap<String, u64>, u64) {
        let map = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let mut out = BTreeMap::new();
        for e in map.values() {
            *out.entry(e.name.clone()).or_insert(0) += e.accesses.load(Ordering::Relaxed);
        }
        (out, self.unhandled.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Reg {
        last: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_and_count() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Reg::default()));
        bus.insert("reg", dev.clone(), 0x100, 0x10).unwrap();
        let mut b = [0u8; 2];
        assert!(bus.read(0x104, &mut b));
        assert_eq!(b, [4, 4]);
        assert!(bus.write(0x10e, &[1, 2]));
        assert_eq!(dev.lock().unwrap().last, vec![(0xe, vec![1, 2])]);
        // Straddling the end is not claimed.
        assert!(!bus.write(0x10f, &[1, 2]));
        assert!(!bus.read(0xff, &mut b));
        assert_eq!(b, [0xff, 0xff]);
        let (c, unhandled) = bus.counters();
        assert_eq!(c["reg"], 2);
        assert_eq!(unhandled, 2);
        assert!(!bus.write(0xff, &[0]));
        assert_eq!(bus.unclaimed_top(1), vec![(0xff, 2)]);
    }

    #[test]
    fn overlaps_rejected() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Reg::default()));
        bus.insert("a", dev.clone(), 0x100, 0x10).unwrap();
        assert!(matches!(
            bus.insert("b", dev.clone(), 0x10f, 1),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert("c", dev.clone(), 0xf0, 0x11),
            Err(BusError::Overlap { .. })
        ));
        bus.insert("d", dev.clone(), 0x110, 1).unwrap();
        bus.insert("e", dev.clone(), 0xf0, 0x10).unwrap();
        assert_eq!(
            bus.insert("f", dev.clone(), u64::MAX, 2),
            Err(BusError::BadRange("f".into()))
        );
        let owner: Arc<Mutex<dyn BusDevice>> = dev.clone();
        assert!(bus.remove(0x100, &owner));
        bus.insert("b", dev, 0x10f, 1).unwrap();
    }

    #[test]
    fn only_the_owner_removes_a_range() {
        let bus = Bus::new();
        let a: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(Reg::default()));
        let b: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(Reg::default()));
        bus.insert("a", a.clone(), 0xcf8, 8).unwrap();
        // Another device's handle, or an address where nothing starts, removes nothing.
        assert!(!bus.remove(0xcf8, &b));
        assert!(!bus.remove(0xcfc, &a));
        assert!(bus.owned_by(0xcf8, &a) && !bus.owned_by(0xcf8, &b));
        assert_eq!(bus.ranges(), vec![(0xcf8, 8, "a".to_string())]);
        assert!(bus.remove(0xcf8, &a));
        assert!(bus.ranges().is_empty());
        assert!(!bus.remove(0xcf8, &a));
    }
}
