//! PCI root complex: bus 0 behind configuration mechanism #1 (0xCF8/0xCFC) and ECAM, BARs
//! placed in the PCI windows and followed when the guest moves them, and MSI-X.

pub mod msix;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};

use crate::bus::{Bus, BusDevice};

pub use passthrough::pci::{BarKind, BarMove, BarRange, ConfigSpace, PciDevice, PCI_CONFIG_DWORDS};

/// Routes a BAR's bus range to its device.
struct BarShim {
    dev: Weak<Mutex<dyn PciDevice>>,
    index: usize,
}

impl BusDevice for BarShim {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.dev.upgrade() {
            Some(d) => d
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .read_bar(self.index, offset, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(d) = self.dev.upgrade() {
            d.lock()
                .unwrap_or_else(|p| p.into_inner())
                .write_bar(self.index, offset, data);
        }
    }
}

/// The host bridge at 00:00.0.
pub struct HostBridge {
    config: ConfigSpace,
}

impl Default for HostBridge {
    fn default() -> Self {
        // Intel vendor, a generic host bridge device ID, class 06/00/00.
        HostBridge {
            config: ConfigSpace::new(0x8086, 0x0d57, 0x06_00_00, 0),
        }
    }
}

impl PciDevice for HostBridge {
    fn read_config(&mut self, reg: usize) -> u32 {
        self.config.read(reg)
    }

    fn write_config(&mut self, reg: usize, offset: u64, data: &[u8]) -> Option<BarMove> {
        self.config.write(reg, offset, data);
        None
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error("no free slot on PCI bus 0 (31 devices at most)")]
    NoSlot,
    #[error("cannot map a BAR of '{0}'")]
    Bar(String, #[source] crate::bus::BusError),
}

struct Slot {
    name: String,
    dev: Arc<Mutex<dyn PciDevice>>,
}

/// Bus 0: up to 32 single-function devices, their BARs on the MMIO and PIO buses.
/// Bus, device, function, register, write.
type TraceKey = (u8, u8, u8, usize, bool);

pub struct PciRoot {
    devices: BTreeMap<u8, Slot>,
    mmio: Arc<Bus>,
    pio: Arc<Bus>,
    /// With debug logging: configuration accesses per (device, register, write), logged
    /// when the root goes away, to find what a guest driver polls.
    trace: Option<Mutex<BTreeMap<TraceKey, u64>>>,
}

impl PciRoot {
    pub fn new(mmio: Arc<Bus>, pio: Arc<Bus>) -> Self {
        let mut devices = BTreeMap::new();
        let bridge: Arc<Mutex<dyn PciDevice>> = Arc::new(Mutex::new(HostBridge::default()));
        devices.insert(
            0,
            Slot {
                name: "host-bridge".into(),
                dev: bridge,
            },
        );
        PciRoot {
            devices,
            mmio,
            pio,
            trace: log::log_enabled!(log::Level::Debug).then(|| Mutex::new(BTreeMap::new())),
        }
    }

    fn bus(&self, kind: BarKind) -> &Bus {
        match kind {
            BarKind::Io => &self.pio,
            _ => &self.mmio,
        }
    }

    /// Adds a device at the first free slot and maps its BARs; returns its device number.
    pub fn add(&mut self, name: &str, dev: Arc<Mutex<dyn PciDevice>>) -> Result<u8, PciError> {
        let slot = (1..32u8)
            .find(|s| !self.devices.contains_key(s))
            .ok_or(PciError::NoSlot)?;
        let bars = dev.lock().unwrap_or_else(|p| p.into_inner()).bars();
        for b in &bars {
            let shim = BarShim {
                dev: Arc::downgrade(&dev),
                index: b.index,
            };
            self.bus(b.kind)
                .insert(name, Arc::new(Mutex::new(shim)), b.addr, b.size)
                .map_err(|e| PciError::Bar(name.to_string(), e))?;
        }
        self.devices.insert(
            slot,
            Slot {
                name: name.to_string(),
                dev,
            },
        );
        Ok(slot)
    }

    fn move_bar(&self, slot: &Slot, m: &BarMove) {
        let bus = self.bus(m.kind);
        bus.remove(m.old);
        let shim = BarShim {
            dev: Arc::downgrade(&slot.dev),
            index: m.index,
        };
        if let Err(e) = bus.insert(&slot.name, Arc::new(Mutex::new(shim)), m.new, m.size) {
            log::warn!(
                "pci: {}: BAR {} moved to {:#x} by the guest cannot be mapped: {e}",
                slot.name,
                m.index,
                m.new
            );
            return;
        }
        log::debug!(
            "pci: {}: BAR {} moved {:#x} -> {:#x}",
            slot.name,
            m.index,
            m.old,
            m.new
        );
        slot.dev
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .bar_moved(m);
    }

    fn count(&self, bdf: (u8, u8, u8), reg: usize, write: bool) {
        if let Some(t) = &self.trace {
            *t.lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry((bdf.0, bdf.1, bdf.2, reg, write))
                .or_default() += 1;
        }
    }

    fn read(&self, bus: u8, dev: u8, func: u8, reg: usize) -> u32 {
        self.count((bus, dev, func), reg, false);
        if bus != 0 || func != 0 {
            return 0xffff_ffff;
        }
        match self.devices.get(&dev) {
            Some(s) => s
                .dev
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .read_config(reg),
            None => 0xffff_ffff,
        }
    }

    fn write(&self, bus: u8, dev: u8, func: u8, reg: usize, offset: u64, data: &[u8]) {
        self.count((bus, dev, func), reg, true);
        if bus != 0 || func != 0 {
            return;
        }
        if let Some(s) = self.devices.get(&dev) {
            let moved = s
                .dev
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .write_config(reg, offset, data);
            if let Some(m) = moved {
                self.move_bar(s, &m);
            }
        }
    }
}

impl PciRoot {
    /// Takes every device but the host bridge off the root, for the VM's teardown. The root
    /// and the buses refer to each other (the buses hold the configuration mechanisms,
    /// which hold the root), so dropping the VM's handle to the root frees nothing: the
    /// caller drops what this returns, and each device's Drop stops its threads, drains its
    /// I/O and releases what it holds (a vhost-user socket the vmm created, a VFIO group).
    pub fn take_devices(&mut self) -> Vec<(String, Arc<Mutex<dyn PciDevice>>)> {
        let slots: Vec<u8> = self.devices.keys().copied().filter(|&s| s != 0).collect();
        slots
            .into_iter()
            .filter_map(|s| self.devices.remove(&s))
            .map(|slot| (slot.name, slot.dev))
            .collect()
    }

    /// With debug logging: the most accessed configuration registers.
    pub fn log_config_trace(&self) {
        let Some(t) = &self.trace else {
            return;
        };
        let mut v: Vec<(TraceKey, u64)> = t
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, n)| (*k, *n))
            .collect();
        v.sort_by_key(|x| std::cmp::Reverse(x.1));
        let top: Vec<String> = v
            .iter()
            .take(12)
            .map(|((b, d, f, r, w), n)| {
                let name = match self.devices.get(d) {
                    Some(s) if *b == 0 && *f == 0 => s.name.clone(),
                    _ => format!("{b:02x}:{d:02x}.{f}"),
                };
                format!("{name}:{:#05x}{}={n}", r * 4, if *w { "w" } else { "r" })
            })
            .collect();
        let total: u64 = v.iter().map(|x| x.1).sum();
        let buses: std::collections::BTreeSet<u8> = v.iter().map(|x| x.0 .0).collect();
        let funcs = v.iter().filter(|x| x.0 .2 != 0).count();
        let regs: std::collections::BTreeSet<usize> = v.iter().map(|x| x.0 .3 * 4).collect();
        log::debug!(
            "pci: config accesses touched {} bus(es), {funcs} register(s) of functions other than 0, registers {:x?}",
            buses.len(),
            regs.iter().take(16).collect::<Vec<_>>()
        );
        log::debug!(
            "pci: {total} config accesses; busiest registers: {}",
            top.join(" ")
        );
    }
}

fn extract(value: u32, offset: u64, data: &mut [u8]) {
    let bytes = value.to_le_bytes();
    for (i, b) in data.iter_mut().enumerate() {
        *b = bytes.get(offset as usize + i).copied().unwrap_or(0xff);
    }
}

/// Configuration mechanism #1: address register at 0xCF8, data window at 0xCFC..0xD00.
pub struct PciConfigIo {
    root: Arc<Mutex<PciRoot>>,
    address: u32,
}

impl PciConfigIo {
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        PciConfigIo { root, address: 0 }
    }

    fn target(&self) -> Option<(u8, u8, u8, usize)> {
        if self.address & 0x8000_0000 == 0 {
            return None;
        }
        let bus = ((self.address >> 16) & 0xff) as u8;
        let dev = ((self.address >> 11) & 0x1f) as u8;
        let func = ((self.address >> 8) & 0x7) as u8;
        let reg = ((self.address >> 2) & 0x3f) as usize;
        Some((bus, dev, func, reg))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset < 4 {
            extract(self.address, offset, data);
            return;
        }
        let value = match self.target() {
            Some((b, d, f, r)) => self
                .root
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .read(b, d, f, r),
            None => 0xffff_ffff,
        };
        extract(value, offset - 4, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset < 4 {
            // Only full dword writes select a register (byte writes to 0xCF8..0xCFB are other
            // legacy registers on real chipsets).
            if offset == 0 && data.len() == 4 {
                self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            }
            return;
        }
        if let Some((b, d, f, r)) = self.target() {
            self.root
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .write(b, d, f, r, offset - 4, data);
        }
    }
}

/// ECAM (memory-mapped configuration) for bus 0.
pub struct PciConfigMmio {
    root: Arc<Mutex<PciRoot>>,
}

impl PciConfigMmio {
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        PciConfigMmio { root }
    }

    fn decode(offset: u64) -> (u8, u8, u8, usize, u64) {
        let bus = ((offset >> 20) & 0xff) as u8;
        let dev = ((offset >> 15) & 0x1f) as u8;
        let func = ((offset >> 12) & 0x7) as u8;
        let reg = ((offset & 0xfff) >> 2) as usize;
        (bus, dev, func, reg, offset & 3)
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (b, d, f, r, o) = Self::decode(offset);
        if o as usize + data.len() > 4 {
            data.fill(0xff);
            return;
        }
        let v = self
            .root
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .read(b, d, f, r);
        extract(v, o, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (b, d, f, r, o) = Self::decode(offset);
        if o as usize + data.len() > 4 {
            return;
        }
        self.root
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write(b, d, f, r, o, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PciRoot {
        PciRoot::new(Arc::new(Bus::new()), Arc::new(Bus::new()))
    }

    fn io() -> PciConfigIo {
        PciConfigIo::new(Arc::new(Mutex::new(root())))
    }

    fn cf8(dev: u8, reg: u8) -> [u8; 4] {
        (0x8000_0000u32 | (u32::from(dev) << 11) | u32::from(reg)).to_le_bytes()
    }

    #[test]
    fn host_bridge_via_cf8() {
        let mut p = io();
        p.write(0, &cf8(0, 0));
        let mut d = [0u8; 4];
        p.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0d57_8086);
        // Class code via a byte read at 0xCFF of register 8.
        p.write(0, &cf8(0, 8));
        let mut b = [0u8; 1];
        p.read(7, &mut b);
        assert_eq!(b[0], 0x06);
        // The address register reads back.
        p.read(0, &mut d);
        assert_eq!(d, cf8(0, 8));
    }

    #[test]
    fn absent_devices_read_all_ones() {
        let mut p = io();
        for dev in [1u8, 31] {
            p.write(0, &cf8(dev, 0));
            let mut d = [0u8; 4];
            p.read(4, &mut d);
            assert_eq!(u32::from_le_bytes(d), 0xffff_ffff);
        }
        // Enable bit clear: no access.
        p.write(0, &0u32.to_le_bytes());
        let mut d = [0u8; 2];
        p.read(4, &mut d);
        assert_eq!(d, [0xff, 0xff]);
    }

    #[test]
    fn ecam_matches_cf8() {
        let mut e = PciConfigMmio::new(Arc::new(Mutex::new(root())));
        let mut d = [0u8; 4];
        e.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0d57_8086);
        let mut w = [0u8; 2];
        e.read(2, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0d57);
        e.read(1 << 15, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xffff_ffff);
        // Misaligned access across a dword is refused, not wrapped.
        e.read(3, &mut d);
        assert_eq!(d, [0xff; 4]);
    }

    #[test]
    fn read_only_bits_hold() {
        let mut c = ConfigSpace::new(0x1af4, 0x1042, 0x01_80_00, 0);
        c.write(0, 0, &[0, 0, 0, 0]);
        assert_eq!(c.read(0), 0x1042_1af4);
        c.write(1, 0, &[0xff, 0xff]);
        assert_eq!(c.read(1) & 0xffff, 0x0407);
        c.write(15, 0, &[0x0b]);
        assert_eq!(c.read(15) & 0xff, 0x0b);
        assert_eq!(c.read(5000), 0xffff_ffff);
        c.write(5000, 0, &[1]);
    }

    #[test]
    fn slots_fill_up() {
        let mut root = root();
        for i in 1..32 {
            assert_eq!(
                root.add("b", Arc::new(Mutex::new(HostBridge::default())))
                    .unwrap(),
                i
            );
        }
        assert!(matches!(
            root.add("b", Arc::new(Mutex::new(HostBridge::default()))),
            Err(PciError::NoSlot)
        ));
    }

    /// A device with one 64-bit BAR and one I/O BAR that records BAR accesses.
    struct BarDev {
        config: ConfigSpace,
        hits: Vec<(usize, u64)>,
        moved: Vec<BarMove>,
    }

    impl PciDevice for BarDev {
        fn read_config(&mut self, reg: usize) -> u32 {
            self.config.read(reg)
        }
        fn write_config(&mut self, reg: usize, offset: u64, data: &[u8]) -> Option<BarMove> {
            self.config.write_tracking_bars(reg, offset, data)
        }
        fn bars(&self) -> Vec<BarRange> {
            self.config.bars()
        }
        fn read_bar(&mut self, index: usize, offset: u64, data: &mut [u8]) {
            self.hits.push((index, offset));
            data.fill(0x5a);
        }
        fn bar_moved(&mut self, m: &BarMove) {
            self.moved.push(*m);
        }
    }

    fn cfg_write(root: &PciRoot, slot: u8, reg: usize, v: u32) {
        root.write(0, slot, 0, reg, 0, &v.to_le_bytes());
    }

    #[test]
    fn bar_sizing_and_relocation() {
        let mmio = Arc::new(Bus::new());
        let pio = Arc::new(Bus::new());
        let mut root = PciRoot::new(mmio.clone(), pio.clone());
        let mut config = ConfigSpace::new(0x1af4, 0x1042, 0x01_80_00, 0);
        config.add_bar(BarRange {
            index: 0,
            kind: BarKind::Mem64,
            addr: 0x1_0000_0000,
            size: 0x4000,
            prefetchable: true,
        });
        config.add_bar(BarRange {
            index: 2,
            kind: BarKind::Io,
            addr: 0x1000,
            size: 0x20,
            prefetchable: false,
        });
        let dev = Arc::new(Mutex::new(BarDev {
            config,
            hits: vec![],
            moved: vec![],
        }));
        let slot = root.add("bardev", dev.clone()).unwrap();
        // Flags: 64-bit prefetchable memory; I/O.
        assert_eq!(root.read(0, slot, 0, 4) & 0xf, 0xc);
        assert_eq!(root.read(0, slot, 0, 5), 1);
        assert_eq!(root.read(0, slot, 0, 6) & 0x3, 0x1);
        let mut b = [0u8; 4];
        assert!(mmio.read(0x1_0000_0010, &mut b));
        // Sizing the 64-bit BAR as Linux does: no move, the size reads back.
        cfg_write(&root, slot, 4, 0xffff_ffff);
        assert_eq!(root.read(0, slot, 0, 4), 0xffff_c00c);
        cfg_write(&root, slot, 5, 0xffff_ffff);
        assert_eq!(root.read(0, slot, 0, 5), 0xffff_ffff);
        cfg_write(&root, slot, 4, 0x0000_000c);
        cfg_write(&root, slot, 5, 1);
        assert!(dev.lock().unwrap().moved.is_empty());
        assert!(mmio.read(0x1_0000_0010, &mut b));
        // The guest moves it below 4 GiB: the bus follows and the device is told.
        cfg_write(&root, slot, 4, 0xc000_0000);
        cfg_write(&root, slot, 5, 0);
        let moved = dev.lock().unwrap().moved.clone();
        assert_eq!(moved.last().unwrap().new, 0xc000_0000);
        assert!(mmio.read(0xc000_0008, &mut b));
        assert_eq!(b, [0x5a; 4]);
        assert!(!mmio.read(0x1_0000_0010, &mut b));
        // The I/O BAR sizes to 0x20 and moves too.
        cfg_write(&root, slot, 6, 0xffff_ffff);
        assert_eq!(root.read(0, slot, 0, 6), 0xffff_ffe1);
        cfg_write(&root, slot, 6, 0x2000);
        assert!(pio.read(0x2004, &mut b));
        assert!(dev.lock().unwrap().hits.contains(&(2, 4)));
    }

    #[test]
    fn capabilities_are_linked() {
        let mut c = ConfigSpace::new(0x1af4, 0x1042, 0x01_80_00, 0);
        let a = c.add_capability(&[0x09, 0, 4, 1], &[]);
        let b = c.add_capability(&[0x11, 0, 0, 0, 0, 0, 0, 0], &[0xc000_0000]);
        assert_eq!(c.read(0x34 / 4) & 0xff, a as u32);
        assert_ne!(c.read(1) & (1 << 20), 0);
        assert_eq!((c.read(a / 4) >> 8) & 0xff, b as u32);
        assert_eq!((c.read(b / 4) >> 8) & 0xff, 0);
        c.write(b / 4, 2, &[0xff, 0xff]);
        assert_eq!(c.read(b / 4) >> 16, 0xc000);
    }
}
