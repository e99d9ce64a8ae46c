//! PCI building blocks shared by the vmm's devices and passthrough: BARs, a configuration
//! space with write masks and BAR tracking, and the trait a function on the root bus
//! implements.

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

impl BarRange {
    /// Whether the register holds the all-ones value of BAR sizing (in either dword of a
    /// 64-bit BAR) rather than an address: a BAR being sized decodes nothing.
    pub fn is_sizing(&self) -> bool {
        if self.size == 0 || !self.size.is_power_of_two() {
            return false;
        }
        let mask = !(self.size - 1);
        let low_flags = if self.kind == BarKind::Io { 0x3 } else { 0xf };
        // A BAR of 4 GiB or more has no writable bit in its low dword.
        let low_ones =
            mask as u32 != 0 && (self.addr as u32) | low_flags == (mask as u32) | low_flags;
        match self.kind {
            BarKind::Mem64 => low_ones || (self.addr >> 32) as u32 == (mask >> 32) as u32,
            _ => low_ones,
        }
    }

    /// One past the last address, `None` if the range wraps around.
    pub fn end(&self) -> Option<u64> {
        self.addr.checked_add(self.size)
    }
}

/// Command register bits that switch decoding on.
pub const COMMAND_IO: u16 = 0x1;
pub const COMMAND_MEMORY: u16 = 0x2;

/// Why a device could not set up all it registers for a BAR at a new address. The BAR still
/// works: what is not registered (an ioeventfd, a KVM memory slot) is trapped instead.
#[derive(Debug, thiserror::Error)]
#[error("{what} at {at:#x}; accesses there are trapped instead")]
pub struct BarMapError {
    pub what: String,
    pub at: u64,
    #[source]
    pub source: std::io::Error,
}

/// A function on the root bus, as its configuration space and BARs see it.
///
/// The root decides what a BAR decodes: after every configuration write it compares the
/// BARs as programmed ([`PciDevice::bars`]) and the command register's I/O and Memory Space
/// bits with the ranges it mapped for the device, unmaps what changed or lost decode, maps
/// what is valid and free, and tells the device ([`PciDevice::bar_mapping`]).
pub trait PciDevice: Send {
    /// Reads the 32-bit configuration register `reg` (dword index, 0..1024).
    fn read_config(&mut self, reg: usize) -> u32;
    /// Writes `data` (1, 2 or 4 bytes) at byte `offset` (0..4) of register `reg`.
    fn write_config(&mut self, reg: usize, offset: u64, data: &[u8]);
    /// The BARs as programmed now: their addresses are what the registers read (the guest's
    /// last write, sizing values included), whether or not they decode. A BAR that cannot
    /// decode at all (an expansion ROM with its enable bit clear) is left out.
    fn bars(&self) -> Vec<BarRange> {
        Vec::new()
    }
    /// An access to BAR `index` at `offset`.
    fn read_bar(&mut self, _index: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write_bar(&mut self, _index: usize, _offset: u64, _data: &[u8]) {}
    /// The root now routes BAR `index` at `at` (`None`: nowhere). The device moves or drops
    /// what it registered for the BAR (ioeventfds, KVM memory slots): nothing of it may stay
    /// at an address the root no longer routes to the device.
    fn bar_mapping(&mut self, _index: usize, _at: Option<u64>) -> Result<(), BarMapError> {
        Ok(())
    }
    /// `vm.pause` (true) and `vm.resume` (false): the device's own threads stop taking
    /// requests and finish what they hold, or go on. Returns, for a pause, a probe that
    /// says when they have (None: nothing to wait for).
    fn pause(&mut self, _paused: bool) -> Option<Box<dyn Fn() -> bool + Send>> {
        None
    }
    /// Before [`PciDevice::write_config`]: something this write must wait for first (a
    /// Bus Master Enable while guest RAM is still being mapped for DMA). The root calls it
    /// with no lock held, its own or the device's, so that other vCPUs' configuration
    /// accesses, BAR accesses and hot-adds go on meanwhile, then makes the write. `None`:
    /// nothing to wait for (the default).
    fn write_config_wait(
        &self,
        _reg: usize,
        _offset: u64,
        _data: &[u8],
    ) -> Option<Box<dyn FnOnce() + Send>> {
        None
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

    /// The BARs with the addresses their registers hold now.
    pub fn bars(&self) -> Vec<BarRange> {
        self.bars
            .iter()
            .flatten()
            .map(|b| BarRange {
                addr: self.bar_addr(b),
                ..*b
            })
            .collect()
    }

    /// The address BAR `b`'s registers hold.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn bar(kind: BarKind, addr: u64, size: u64) -> BarRange {
        BarRange {
            index: 0,
            kind,
            addr,
            size,
            prefetchable: false,
        }
    }

    #[test]
    fn sizing_values_are_not_addresses() {
        let mut c = ConfigSpace::new(0x1af4, 0x1042, 0, 0);
        c.add_bar(bar(BarKind::Mem64, 0xc000_0000, 0x4000));
        c.add_bar(BarRange {
            index: 2,
            ..bar(BarKind::Io, 0xc000, 0x20)
        });
        c.add_bar(BarRange {
            index: 3,
            ..bar(BarKind::Mem32, 0xd000_0000, 0x1000)
        });
        let at = |c: &ConfigSpace, i: usize| *c.bars().iter().find(|b| b.index == i).unwrap();
        assert!(c.bars().iter().all(|b| !b.is_sizing()));
        // Each BAR register sized on its own reads as sizing; restored, it is an address.
        for (reg, index) in [(4, 0), (5, 0), (6, 2), (7, 3)] {
            let before = c.read(reg);
            c.write(reg, 0, &[0xff; 4]);
            assert!(at(&c, index).is_sizing(), "register {reg}");
            c.write(reg, 0, &before.to_le_bytes());
            assert!(!at(&c, index).is_sizing(), "register {reg}");
        }
        // The registers hold what the guest wrote, moved or not.
        c.write(4, 0, &0xc001_0000u32.to_le_bytes());
        assert_eq!(at(&c, 0).addr, 0xc001_0000);
        c.write(5, 0, &1u32.to_le_bytes());
        assert_eq!(at(&c, 0).addr, 0x1_c001_0000);
        // A BAR of 4 GiB or more has a read-only low dword: only its high dword sizes.
        let big = bar(BarKind::Mem64, 0x10_0000_0000, 8 << 30);
        assert!(!big.is_sizing());
        assert!(BarRange {
            addr: 0xffff_fffe_0000_0000,
            ..big
        }
        .is_sizing());
        assert_eq!(bar(BarKind::Mem32, u64::MAX, 16).end(), None);
    }
}
