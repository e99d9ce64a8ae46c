//! PCI root complex: bus 0 behind configuration mechanism #1 (0xCF8/0xCFC) and ECAM, BARs
//! placed in the PCI windows and followed when the guest moves them, and MSI-X.

pub mod msix;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};

use crate::bus::{Bus, BusDevice};

/// Where a BAR lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    Io,
    Mem32,
    Mem64,
}

/// A BAR as programmed: its index, kind, address and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarRange {
    pub index: usize,
    pub kind: BarKind,
    pub addr: u64,
    pub size: u64,
    pub prefetchable: bool,
}

/// A BAR the guest moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarMove {
    pub index: usize,
    pub kind: BarKind,
    pub old: u64,
    pub new: u64,
    pub size: u64,
}

/// A function on the root bus, as its configuration space and BARs see it.
pub trait PciDevice: Send {
    /// Reads the 32-bit configuration register `reg` (dword index, 0..1024).
    fn read_config(&mut self, reg: usize) -> u32;
    /// Writes `data` (1, 2 or 4 bytes) at byte `offset` (0..4) of register `reg`. Returns the
    /// BAR the write moved, if any: the root then moves its bus range.
    fn write_config(&mut self, reg: usize, offset: u64, data: &[u8]) -> Option<BarMove>;
    /// The BARs as currently programmed.
    fn bars(&self) -> Vec<BarRange> {
        Vec::new()
    }
    /// An access to BAR `index` at `offset`.
    fn read_bar(&mut self, _index: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write_bar(&mut self, _index: usize, _offset: u64, _data: &[u8]) {}
    /// Called after the root moved BAR `m.index` on its bus, for what the device itself
    /// registered at the old address (ioeventfds, KVM memory slots).
    fn bar_moved(&mut self, _m: &BarMove) {}
}

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

/// A configuration space with per-bit write masks (read-only bits keep their value).
#[derive(Clone)]
pub struct ConfigSpace {
    regs: Vec<u32>,
    wmask: Vec<u32>,
    bars: [Option<BarRange>; 6],
    /// Next free byte for a capability, and the last capability's pointer register.
    next_cap: usize,
    last_cap_ptr: Option<usize>,
}

pub const PCI_CONFIG_DWORDS: usize = 1024;

impl ConfigSpace {
    pub fn new(vendor: u16, device: u16, class: u32, header_type: u8) -> Self {
        let mut regs = vec![0u32; PCI_CONFIG_DWORDS];
        let mut wmask = vec![0u32; PCI_CONFIG_DWORDS];
        regs[0] = u32::from(vendor) | (u32::from(device) << 16);
        // Class code in the top 24 bits, revision 0.
        regs[2] = class << 8;
        regs[3] = u32::from(header_type) << 16;
        // Command register: I/O, memory, bus master, INTx disable are writable.
        wmask[1] = 0x0000_0407;
        // Cache line size and latency timer.
        wmask[3] = 0x0000_ffff;
        // Interrupt line.
        wmask[15] = 0x0000_00ff;
        ConfigSpace {
            regs,
            wmask,
            bars: [None; 6],
            next_cap: 0x40,
            last_cap_ptr: None,
        }
    }

    /// Declares BAR `index` at `addr` (a power-of-two `size`, naturally aligned).
    pub fn add_bar(&mut self, bar: BarRange) {
        let i = bar.index;
        let (flags, mask) = match bar.kind {
            BarKind::Io => (0x1, !(bar.size as u32 - 1) & !0x3),
            BarKind::Mem32 => (
                if bar.prefetchable { 0x8 } else { 0 },
                !(bar.size as u32 - 1) & !0xf,
            ),
            BarKind::Mem64 => (
                0x4 | if bar.prefetchable { 0x8 } else { 0 },
                (!(bar.size - 1) as u32) & !0xf,
            ),
        };
        self.regs[4 + i] = (bar.addr as u32 & mask) | flags;
        self.wmask[4 + i] = mask;
        if bar.kind == BarKind::Mem64 {
            self.regs[5 + i] = (bar.addr >> 32) as u32;
            self.wmask[5 + i] = (!(bar.size - 1) >> 32) as u32;
        }
        self.bars[i] = Some(bar);
    }

    pub fn bars(&self) -> Vec<BarRange> {
        self.bars.iter().flatten().copied().collect()
    }

    /// The address BAR `i` decodes now.
    fn bar_addr(&self, b: &BarRange) -> u64 {
        let i = b.index;
        match b.kind {
            BarKind::Io => u64::from(self.regs[4 + i] & !0x3),
            BarKind::Mem32 => u64::from(self.regs[4 + i] & !0xf),
            BarKind::Mem64 => {
                u64::from(self.regs[4 + i] & !0xf) | (u64::from(self.regs[5 + i]) << 32)
            }
        }
    }

    /// Appends a capability (`body` starts with the ID byte and a placeholder next byte) and
    /// returns its offset. `wmask` gives the writable bits of each dword of the body.
    pub fn add_capability(&mut self, body: &[u8], wmask: &[u32]) -> usize {
        let off = self.next_cap;
        let len = body.len().next_multiple_of(4);
        let mut bytes = body.to_vec();
        bytes.resize(len, 0);
        bytes[1] = 0;
        for (k, chunk) in bytes.chunks(4).enumerate() {
            let r = off / 4 + k;
            self.regs[r] = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            self.wmask[r] = wmask.get(k).copied().unwrap_or(0);
        }
        match self.last_cap_ptr {
            // Link from the previous capability's next pointer.
            Some(prev) => self.regs[prev / 4] |= (off as u32) << 8,
            None => {
                // Capabilities pointer at 0x34 and the status bit "has capabilities".
                self.regs[0x34 / 4] = off as u32;
                self.regs[1] |= 1 << 20;
            }
        }
        self.last_cap_ptr = Some(off);
        self.next_cap = off + len;
        off
    }

    pub fn command(&self) -> u32 {
        self.regs[1] & 0xffff
    }

    /// Writes as the guest does and reports a BAR the write moved. The transient all-ones
    /// value of BAR sizing and writes while decoding is off do not move anything.
    pub fn write_tracking_bars(&mut self, reg: usize, offset: u64, data: &[u8]) -> Option<BarMove> {
        self.write(reg, offset, data);
        let bar = (4..10)
            .contains(&reg)
            .then(|| {
                self.bars.iter().flatten().copied().find(|b| {
                    reg == 4 + b.index || (b.kind == BarKind::Mem64 && reg == 5 + b.index)
                })
            })
            .flatten()?;
        let new = self.bar_addr(&bar);
        // BAR sizing writes all ones; Linux restores the BAR afterwards. Neither the
        // all-ones value nor the half-restored 64-bit value is a new address.
        let all_ones =
            |r: usize| self.wmask[r] != 0 && self.regs[r] & self.wmask[r] == self.wmask[r];
        let sizing =
            all_ones(4 + bar.index) || (bar.kind == BarKind::Mem64 && all_ones(5 + bar.index));
        if new == bar.addr || sizing || new == 0 {
            return None;
        }
        let m = BarMove {
            index: bar.index,
            kind: bar.kind,
            old: bar.addr,
            new,
            size: bar.size,
        };
        if let Some(b) = self.bars[bar.index].as_mut() {
            b.addr = new;
        }
        Some(m)
    }

    pub fn read(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0xffff_ffff)
    }

    pub fn write(&mut self, reg: usize, offset: u64, data: &[u8]) {
        let Some(cur) = self.regs.get(reg).copied() else {
            return;
        };
        let mask = self.wmask[reg];
        let mut value = cur;
        for (i, b) in data.iter().enumerate() {
            let shift = (offset as usize + i) * 8;
            if shift >= 32 {
                break;
            }
            let m = (mask >> shift) & 0xff;
            let byte = ((cur >> shift) & !m & 0xff) | (u32::from(*b) & m);
            value = (value & !(0xff << shift)) | (byte << shift);
        }
        self.regs[reg] = value;
    }

    /// Sets a register directly (device-side view), e.g. capability contents.
    pub fn set(&mut self, reg: usize, value: u32, wmask: u32) {
        if reg < PCI_CONFIG_DWORDS {
            self.regs[reg] = value;
            self.wmask[reg] = wmask;
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
pub struct PciRoot {
    devices: BTreeMap<u8, Slot>,
    mmio: Arc<Bus>,
    pio: Arc<Bus>,
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
        PciRoot { devices, mmio, pio }
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

    fn read(&self, bus: u8, dev: u8, func: u8, reg: usize) -> u32 {
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
