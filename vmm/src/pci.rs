//! PCI root complex: bus 0 behind configuration mechanism #1 (0xCF8/0xCFC) and ECAM.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::bus::BusDevice;

/// A function on the root bus, as its configuration space sees it.
pub trait PciDevice: Send {
    /// Reads the 32-bit configuration register `reg` (dword index, 0..1024).
    fn read_config(&mut self, reg: usize) -> u32;
    /// Writes `data` (1, 2 or 4 bytes) at byte `offset` (0..4) of register `reg`.
    fn write_config(&mut self, reg: usize, offset: u64, data: &[u8]);
}

/// A configuration space with per-bit write masks (read-only bits keep their value).
#[derive(Clone)]
pub struct ConfigSpace {
    regs: Vec<u32>,
    wmask: Vec<u32>,
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
        ConfigSpace { regs, wmask }
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

    fn write_config(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.config.write(reg, offset, data);
    }
}

/// Bus 0: up to 32 single-function devices.
#[derive(Default)]
pub struct PciRoot {
    devices: BTreeMap<u8, Arc<Mutex<dyn PciDevice>>>,
}

impl PciRoot {
    pub fn new() -> Self {
        let mut root = PciRoot::default();
        root.devices
            .insert(0, Arc::new(Mutex::new(HostBridge::default())));
        root
    }

    /// Adds a device at the first free slot; returns its device number.
    pub fn add(&mut self, dev: Arc<Mutex<dyn PciDevice>>) -> Option<u8> {
        let slot = (1..32u8).find(|s| !self.devices.contains_key(s))?;
        self.devices.insert(slot, dev);
        Some(slot)
    }

    fn read(&self, bus: u8, dev: u8, func: u8, reg: usize) -> u32 {
        if bus != 0 || func != 0 {
            return 0xffff_ffff;
        }
        match self.devices.get(&dev) {
            Some(d) => d.lock().unwrap_or_else(|p| p.into_inner()).read_config(reg),
            None => 0xffff_ffff,
        }
    }

    fn write(&self, bus: u8, dev: u8, func: u8, reg: usize, offset: u64, data: &[u8]) {
        if bus != 0 || func != 0 {
            return;
        }
        if let Some(d) = self.devices.get(&dev) {
            d.lock()
                .unwrap_or_else(|p| p.into_inner())
                .write_config(reg, offset, data);
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

    fn io() -> PciConfigIo {
        PciConfigIo::new(Arc::new(Mutex::new(PciRoot::new())))
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
        let root = Arc::new(Mutex::new(PciRoot::new()));
        let mut e = PciConfigMmio::new(root);
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
        let mut root = PciRoot::new();
        for i in 1..32 {
            assert_eq!(
                root.add(Arc::new(Mutex::new(HostBridge::default()))),
                Some(i)
            );
        }
        assert_eq!(root.add(Arc::new(Mutex::new(HostBridge::default()))), None);
    }
}
