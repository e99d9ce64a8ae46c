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
