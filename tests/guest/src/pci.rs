//! PCI configuration space through mechanism #1 (ports 0xCF8/0xCFC), bus 0 only, and BAR set-up:
//! a BAR the firmware left unassigned (qboot may) gets an address in a free part of the 32-bit
//! hole, and memory decoding and bus mastering are switched on.

use crate::pio;

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;
const COMMAND: u8 = 0x04;
const CMD_MEMORY: u16 = 1 << 1;
const CMD_BUS_MASTER: u16 = 1 << 2;
const HEADER_TYPE: u8 = 0x0e;
const BAR0: u8 = 0x10;
const CAP_PTR: u8 = 0x34;
const STATUS_CAP_LIST: u32 = 1 << 20;

/// Where unassigned BARs go: from the start of the 32-bit PCI hole (both our vmm's MMIO32
/// window and QEMU's pc/q35 hole with less than 3 GiB of RAM) up to below the ECAM/IOAPIC.
const ALLOC_START: u64 = 0xc000_0000;
const ALLOC_END: u64 = 0xe000_0000;

/// A function on bus 0.
#[derive(Clone, Copy, Debug)]
pub struct Function {
    pub dev: u8,
    pub func: u8,
}

impl Function {
    fn address(self, reg: u8) -> u32 {
        0x8000_0000
            | (u32::from(self.dev) << 11)
            | (u32::from(self.func) << 8)
            | u32::from(reg & 0xfc)
    }

    pub fn read32(self, reg: u8) -> u32 {
        // SAFETY: configuration mechanism #1: the address port selects a register, the data
        // port reads it; no memory is involved.
        unsafe {
            pio::outl(CONFIG_ADDRESS, self.address(reg));
            pio::inl(CONFIG_DATA)
        }
    }

    pub fn write32(self, reg: u8, value: u32) {
        // SAFETY: as for `read32`; the caller picks a register whose write it wants.
        unsafe {
            pio::outl(CONFIG_ADDRESS, self.address(reg));
            pio::outl(CONFIG_DATA, value);
        }
    }

    pub fn read8(self, reg: u8) -> u8 {
        (self.read32(reg) >> ((reg & 3) * 8)) as u8
    }

    pub fn vendor_device(self) -> (u16, u16) {
        let v = self.read32(0);
        (v as u16, (v >> 16) as u16)
    }

    pub fn subsystem_id(self) -> u16 {
        (self.read32(0x2c) >> 16) as u16
    }

    /// The capability list: (offset, id) pairs, at most 48 (a loop in the list ends it).
    pub fn capabilities(self) -> Caps {
        let next = if self.read32(COMMAND) & STATUS_CAP_LIST != 0 {
            self.read8(CAP_PTR) & 0xfc
        } else {
            0
        };
        Caps {
            func: self,
            next,
            left: 48,
        }
    }

    /// Switch on memory decoding and bus mastering.
    pub fn enable(self) {
        let cmd = self.read32(COMMAND) as u16;
        // Write the command register only (the status half is write-1-to-clear).
        self.write32(COMMAND, u32::from(cmd | CMD_MEMORY | CMD_BUS_MASTER));
    }
}

pub struct Caps {
    func: Function,
    next: u8,
    left: u32,
}

impl Iterator for Caps {
    type Item = (u8, u8);

    fn next(&mut self) -> Option<(u8, u8)> {
        if self.next < 0x40 || self.left == 0 {
            return None;
        }
        self.left -= 1;
        let at = self.next;
        let id = self.func.read8(at);
        self.next = self.func.read8(at + 1) & 0xfc;
        Some((at, id))
    }
}

/// Every function present on bus 0.
pub fn scan_bus0(mut visit: impl FnMut(Function)) {
    for dev in 0..32 {
        let f0 = Function { dev, func: 0 };
        if f0.vendor_device().0 == 0xffff {
            continue;
        }
        let funcs = if f0.read8(HEADER_TYPE) & 0x80 != 0 {
            8
        } else {
            1
        };
        for func in 0..funcs {
            let f = Function { dev, func };
            if f.vendor_device().0 != 0xffff {
                visit(f);
            }
        }
    }
}

/// Sizes BAR `index` of `f`: (is 64-bit, size); `None` for an I/O or absent BAR.
fn probe_bar(f: Function, index: u8) -> Option<(bool, u64, u64)> {
    let reg = BAR0 + index * 4;
    let orig = f.read32(reg);
    if orig & 1 != 0 {
        return None; // I/O space
    }
    let is64 = (orig >> 1) & 3 == 2;
    f.write32(reg, 0xffff_ffff);
    let mask_lo = f.read32(reg) & !0xf;
    f.write32(reg, orig);
    let (mut addr, mut mask) = (
        u64::from(orig & !0xf),
        0xffff_ffff_0000_0000 | u64::from(mask_lo),
    );
    if is64 {
        let orig_hi = f.read32(reg + 4);
        f.write32(reg + 4, 0xffff_ffff);
        let mask_hi = f.read32(reg + 4);
        f.write32(reg + 4, orig_hi);
        addr |= u64::from(orig_hi) << 32;
        mask = (u64::from(mask_hi) << 32) | u64::from(mask_lo);
    }
    if mask_lo == 0 && !is64 {
        return None; // not implemented
    }
    let size = (!mask).wrapping_add(1);
    if size == 0 {
        return None;
    }
    Some((is64, addr, size))
}

/// The end of the highest memory BAR assigned below 4 GiB on bus 0 (at least `ALLOC_START`),
/// where unassigned BARs can go without overlapping anything the firmware placed.
fn first_free() -> u64 {
    let mut end = ALLOC_START;
    scan_bus0(|f| {
        let mut i = 0;
        while i < 6 {
            match probe_bar(f, i) {
                Some((is64, addr, size)) => {
                    if addr != 0 && addr < ALLOC_END {
                        end = end.max(addr + size);
                    }
                    i += if is64 { 2 } else { 1 };
                }
                None => i += 1,
            }
        }
    });
    end
}

/// BAR `index` of `f`, assigned an address in the free part of the 32-bit hole if it has
/// none, and its address; memory decoding and bus mastering are enabled. An assigned BAR is
/// not sized (sizing moves it for a moment, which a VMM may act on).
pub fn memory_bar(f: Function, index: u8) -> Option<u64> {
    let reg = BAR0 + index * 4;
    let raw = f.read32(reg);
    if raw & 1 != 0 {
        return None;
    }
    let mut addr = u64::from(raw & !0xf);
    if (raw >> 1) & 3 == 2 {
        addr |= u64::from(f.read32(reg + 4)) << 32;
    }
    if addr != 0 {
        f.enable();
        return Some(addr);
    }
    let (is64, _, size) = probe_bar(f, index)?;
    let start = first_free().next_multiple_of(size.max(4096));
    if start + size > ALLOC_END {
        return None;
    }
    f.write32(reg, start as u32);
    if is64 {
        f.write32(reg + 4, 0);
    }
    crate::println!(
        "pci 00:{:02x}.{}: BAR{index} assigned at {start:#x} (size {size:#x})",
        f.dev,
        f.func
    );
    f.enable();
    Some(start)
}
