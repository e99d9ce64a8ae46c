//! An assigned PCI function as the guest sees it: the PCI logic on top of [`Vfio`].
//!
//! - **Config space** is read from the device and virtualized where the guest must not see
//!   or drive the real thing: the BARs are shadowed (sizing, relocation; flags kept), the ROM
//!   BAR is hidden, the multifunction bit is masked, MSI and MSI-X are emulated, capabilities
//!   other than PM, MSI, MSI-X, PCIe and vendor-specific are unlinked from the list, and the
//!   extended space (no PCIe hierarchy is exposed) reads as empty.
//! - **BARs** are mmapped and handed to the hypervisor as guest memory ([`GuestMapper`]),
//!   except the pages holding the MSI-X table and PBA: those, I/O BARs and whatever cannot be
//!   mapped are trapped and forwarded through the region, or emulated (MSI-X table, PBA).
//! - **Interrupts**: every MSI/MSI-X vector is a GSI route plus an irqfd that VFIO signals
//!   directly ([`InterruptRouter`]); INTx is a level-triggered irqfd whose resample fd
//!   unmasks the host line. No VMM thread is on the interrupt path.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Condvar, Mutex};

use vmm_sys_util::eventfd::EventFd;

use crate::interrupt::{InterruptRouter, MsiMessage};
use crate::msix::{Msix, MSIX_ENABLE, MSIX_FUNCTION_MASK};
use crate::pci::{BarKind, BarMapError, BarRange, ConfigSpace, PciDevice};
use crate::vfio::{Vfio, CONFIG_REGION, INTX_IRQ, MSIX_IRQ, MSI_IRQ};

/// Page granularity of KVM memory slots and of the MSI-X trap.
pub const PAGE_SIZE: u64 = 4096;

/// Capability IDs.
const CAP_PM: u8 = 0x01;
const CAP_VPD: u8 = 0x03;
const CAP_MSI: u8 = 0x05;
const CAP_VENDOR: u8 = 0x09;
const CAP_PCIE: u8 = 0x10;
const CAP_MSIX: u8 = 0x11;
/// Capabilities the guest sees; the others are unlinked.
const VISIBLE_CAPS: [u8; 5] = [CAP_PM, CAP_MSI, CAP_VENDOR, CAP_PCIE, CAP_MSIX];

/// What the hypervisor does for an assigned device's BARs: make host memory (a BAR's
/// mmap) appear at a guest physical address (a KVM memory slot).
pub trait GuestMapper: Send + Sync {
    /// Maps `size` bytes at host address `host` at guest physical `gpa`; returns a handle.
    /// The caller keeps the host memory mapped until [`GuestMapper::unmap`].
    fn map(&self, gpa: u64, size: u64, host: *mut u8) -> io::Result<u32>;
    fn unmap(&self, handle: u32) -> io::Result<()>;
}

/// Where the vmm wants things.
pub struct Placement<'a> {
    /// Places a BAR of this kind and size (a power of two) and returns its address.
    pub alloc: &'a mut dyn FnMut(BarKind, u64) -> io::Result<u64>,
    /// The IOAPIC pin (GSI) the device's INTx line is wired to.
    pub intx_gsi: u32,
    /// Show the device's expansion ROM to the guest (hidden otherwise).
    pub rom: bool,
    /// Guest RAM's DMA mapping when it is still being made (the VM boots meanwhile): the
    /// guest's Bus Master Enable waits for it. `None`: already mapped.
    pub dma: Option<Arc<DmaGate>>,
}

/// Guest RAM being mapped for device DMA in the background. Mapping pins every page, which
/// for a large guest takes seconds; no device can DMA before its driver sets Bus Master
/// Enable, so the VM boots meanwhile and that write waits here.
#[derive(Default)]
pub struct DmaGate {
    state: Mutex<Option<Result<(), String>>>,
    done: Condvar,
}

impl DmaGate {
    pub fn new() -> Arc<DmaGate> {
        Arc::new(DmaGate::default())
    }

    /// The mapping ended: `Err` says why it failed.
    pub fn finish(&self, result: Result<(), String>) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
        self.done.notify_all();
    }

    /// Waits until the mapping ended; its outcome.
    pub fn wait(&self) -> Result<(), String> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = st.as_ref() {
                return r.clone();
            }
            st = self.done.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Bus Master Enable in the command register.
const COMMAND_BUS_MASTER: u8 = 0x04;

/// Index under which the expansion ROM appears among the BARs (after BARs 0-5).
pub const ROM_BAR: usize = 6;

/// The expansion ROM BAR, when shown: read-only and trapped.
struct Rom {
    size: u64,
    /// The address as the guest last wrote it (the size mask while it sizes the BAR).
    addr: u64,
    enabled: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("BAR {index}: no room for {size:#x} bytes in the guest's PCI windows")]
    BarAlloc {
        index: usize,
        size: u64,
        #[source]
        source: io::Error,
    },
    #[error("BAR {index}: cannot mmap [{offset:#x}, +{size:#x}) of the device region")]
    Mmap {
        index: usize,
        offset: u64,
        size: u64,
        #[source]
        source: io::Error,
    },
    #[error("cannot set up the device's interrupts")]
    Interrupts(#[source] io::Error),
    #[error("the device has no configuration space (VFIO config region empty)")]
    NoConfig,
}

/// A mmapped part of a BAR and its guest mapping.
struct Area {
    offset: u64,
    map: crate::vfio::Mapping,
    handle: Option<u32>,
}

struct Bar {
    areas: Vec<Area>,
    /// Where the root routes the BAR now (`None`: nowhere, nothing mapped).
    at: Option<u64>,
}

/// The MSI capability, emulated.
struct MsiCap {
    offset: usize,
    is64: bool,
    per_vector_mask: bool,
    /// Bytes of the capability as the guest sees them, and which bits it may write.
    bytes: Vec<u8>,
    wmask: Vec<u8>,
}

impl MsiCap {
    fn new(offset: usize, raw: &[u8]) -> MsiCap {
        let control = u16::from_le_bytes([raw[2], raw[3]]);
        let is64 = control & (1 << 7) != 0;
        let per_vector_mask = control & (1 << 8) != 0;
        let len = match (is64, per_vector_mask) {
            (false, false) => 10,
            (true, false) => 14,
            (false, true) => 20,
            (true, true) => 24,
        };
        let mut bytes = raw[..len].to_vec();
        let mut wmask = vec![0u8; len];
        // Control: enable and multiple message enable; the rest is read-only.
        bytes[2] &= !0x71;
        wmask[2] = 0x71;
        // Address (dword aligned), upper address, data.
        bytes[4..len.min(8)].fill(0);
        wmask[4] = 0xfc;
        wmask[5..8].fill(0xff);
        let data = if is64 {
            bytes[8..12].fill(0);
            wmask[8..12].fill(0xff);
            12
        } else {
            8
        };
        bytes[data..data + 2].fill(0);
        wmask[data..data + 2].fill(0xff);
        if per_vector_mask {
            let mask = if is64 { 16 } else { 12 };
            bytes[mask..mask + 8].fill(0);
            wmask[mask..mask + 4].fill(0xff);
        }
        MsiCap {
            offset,
            is64,
            per_vector_mask,
            bytes,
            wmask,
        }
    }

    fn u32_at(&self, off: usize) -> u32 {
        let b = |i: usize| self.bytes.get(off + i).copied().unwrap_or(0);
        u32::from_le_bytes([b(0), b(1), b(2), b(3)])
    }

    fn control(&self) -> u16 {
        u16::from_le_bytes([self.bytes[2], self.bytes[3]])
    }

    fn enabled(&self) -> bool {
        self.control() & 1 != 0
    }

    /// Vectors the guest enabled (Multiple Message Enable, capped by what is capable).
    fn vectors(&self) -> u32 {
        let c = self.control();
        let capable = (c >> 1) & 7;
        let enabled = (c >> 4) & 7;
        1 << enabled.min(capable).min(5)
    }

    fn message(&self, vector: u32) -> MsiMessage {
        let (hi, data) = if self.is64 {
            (self.u32_at(8), self.u32_at(12) & 0xffff)
        } else {
            (0, self.u32_at(8) & 0xffff)
        };
        let n = self.vectors();
        MsiMessage {
            addr_lo: self.u32_at(4),
            addr_hi: hi,
            data: (data & !(n - 1)) | vector,
        }
    }

    fn masked(&self, vector: u32) -> bool {
        if !self.per_vector_mask {
            return false;
        }
        let mask = self.u32_at(if self.is64 { 16 } else { 12 });
        mask & (1 << vector) != 0
    }
}

/// One MSI vector: its GSI and the irqfd VFIO signals.
struct MsiVector {
    gsi: u32,
    irqfd: EventFd,
    attached: bool,
}

struct MsiState {
    cap: MsiCap,
    vectors: Vec<MsiVector>,
    /// Vectors enabled in VFIO (0: MSI off).
    active: u32,
    /// Vectors VFIO offers.
    max: u32,
}

/// Where the MSI-X capability puts its table and PBA.
struct MsixState {
    offset: usize,
    table_bar: usize,
    table_offset: u64,
    table_len: u64,
    pba_bar: usize,
    pba_offset: u64,
    pba_len: u64,
    table: Msix,
    active: bool,
}

impl MsixState {
    fn in_table(&self, bar: usize, off: u64) -> bool {
        bar == self.table_bar
            && off >= self.table_offset
            && off - self.table_offset < self.table_len
    }

    fn in_pba(&self, bar: usize, off: u64) -> bool {
        bar == self.pba_bar && off >= self.pba_offset && off - self.pba_offset < self.pba_len
    }

    /// Page-aligned ranges of BAR `bar` that must be trapped.
    fn trapped(&self, bar: usize) -> Vec<(u64, u64)> {
        let page = |off: u64, len: u64| {
            let start = off & !(PAGE_SIZE - 1);
            (start, (off + len).next_multiple_of(PAGE_SIZE) - start)
        };
        let mut v = Vec::new();
        if bar == self.table_bar {
            v.push(page(self.table_offset, self.table_len));
        }
        if bar == self.pba_bar {
            v.push(page(self.pba_offset, self.pba_len));
        }
        v
    }
}

struct Intx {
    gsi: u32,
    pin: u8,
    trigger: EventFd,
    resample: EventFd,
    enabled: bool,
}

/// An assigned device on the guest's PCI bus.
pub struct PassthroughPci {
    name: String,
    dev: Arc<dyn Vfio>,
    router: Arc<dyn InterruptRouter>,
    mapper: Arc<dyn GuestMapper>,
    /// The shadow of the BARs and the interrupt line.
    shadow: ConfigSpace,
    bars: BTreeMap<usize, Bar>,
    /// Byte overrides that relink the capability list (0x34 and each next pointer).
    cap_links: BTreeMap<usize, u8>,
    /// Byte ranges of hidden capabilities: writes there are dropped.
    hidden: Vec<(usize, usize)>,
    has_caps: bool,
    msi: Option<MsiState>,
    msix: Option<MsixState>,
    intx: Option<Intx>,
    rom: Option<Rom>,
    logged: bool,
    /// Guest RAM's DMA mapping in progress (see [`DmaGate`]).
    dma: Option<Arc<DmaGate>>,
}

fn io_err(e: io::Error) -> DeviceError {
    DeviceError::Interrupts(e)
}

/// Subtracts the `holes` from `[0, size)` limited to `areas` (page-aligned results).
fn mappable_areas(size: u64, areas: &[(u64, u64)], holes: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = if areas.is_empty() {
        vec![(0, size)]
    } else {
        areas.to_vec()
    };
    for &(hs, hl) in holes {
        let he = hs + hl;
        out = out
            .into_iter()
            .flat_map(|(s, l)| {
                let e = s + l;
                if he <= s || hs >= e {
                    return vec![(s, l)];
                }
                let mut parts = Vec::new();
                if hs > s {
                    parts.push((s, hs - s));
                }
                if he < e {
                    parts.push((he, e - he));
                }
                parts
            })
            .collect();
    }
    out.retain(|&(s, l)| l > 0 && s % PAGE_SIZE == 0 && l % PAGE_SIZE == 0 && s + l <= size);
    out
}

/// Length of a capability the guest must not drive, for dropping its writes.
fn hidden_cap_len(id: u8) -> usize {
    match id {
        CAP_VPD => 8,
        0x07 => 24, // PCI-X
        0x12 => 8,  // SATA
        0x13 => 6,  // Advanced Features
        _ => 4,
    }
}

impl PassthroughPci {
    /// Takes over the device: resets it, reads its config space, places its BARs (`place`),
    /// mmaps what can be mapped and wires INTx.
    pub fn new(
        name: &str,
        dev: Arc<dyn Vfio>,
        router: Arc<dyn InterruptRouter>,
        mapper: Arc<dyn GuestMapper>,
        place: Placement<'_>,
    ) -> Result<PassthroughPci, DeviceError> {
        if dev.region(CONFIG_REGION).size < 0x40 {
            return Err(DeviceError::NoConfig);
        }
        // Whatever a previous user left enabled goes away first.
        for irq in [MSIX_IRQ, MSI_IRQ, INTX_IRQ] {
            if dev.irq_count(irq) > 0 {
                let _ = dev.disable_irqs(irq);
            }
        }
        match dev.reset() {
            Ok(()) => log::info!("{name}: device reset"),
            Err(e) => log::warn!("{name}: the kernel offers no reset for this device: {e}"),
        }
        // No DMA until the guest's driver asks for it (a reset that did not reset, or a
        // previous user, may have left Bus Master Enable on).
        let mut command = [0u8; 2];
        dev.read(CONFIG_REGION, 4, &mut command);
        if command[0] & COMMAND_BUS_MASTER != 0 {
            command[0] &= !COMMAND_BUS_MASTER;
            dev.write(CONFIG_REGION, 4, &command);
        }
        let mut raw = vec![0u8; 256];
        dev.read(CONFIG_REGION, 0, &mut raw);
        // Room to parse a capability that ends at the top of the standard space.
        raw.resize(256 + 24, 0);
        let u16_at = |o: usize| u16::from_le_bytes([raw[o], raw[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([raw[o], raw[o + 1], raw[o + 2], raw[o + 3]]);

        let mut shadow = ConfigSpace::new(u16_at(0), u16_at(2), u32_at(8) >> 8, 0);
        // BARs: sizes from VFIO, kind and flags from the device's registers.
        let mut index = 0;
        while index < 6 {
            let reg = u32_at(0x10 + index * 4);
            let size = dev.region(index as u32).size;
            let i = index;
            index += 1;
            if size == 0 {
                continue;
            }
            let kind = if reg & 1 != 0 {
                BarKind::Io
            } else if (reg >> 1) & 3 == 2 {
                index += 1;
                BarKind::Mem64
            } else {
                BarKind::Mem32
            };
            let size = match kind {
                BarKind::Io => size.next_power_of_two().max(4),
                _ => size.next_power_of_two().max(16),
            };
            let alloc_size = if kind == BarKind::Io {
                size
            } else {
                size.max(PAGE_SIZE)
            };
            let addr = (place.alloc)(kind, alloc_size).map_err(|source| DeviceError::BarAlloc {
                index: i,
                size,
                source,
            })?;
            shadow.add_bar(BarRange {
                index: i,
                kind,
                addr,
                size,
                prefetchable: kind != BarKind::Io && reg & 0x8 != 0,
            });
        }

        let mut d = PassthroughPci {
            name: name.to_string(),
            dev,
            router,
            mapper,
            shadow,
            bars: BTreeMap::new(),
            cap_links: BTreeMap::new(),
            hidden: Vec::new(),
            has_caps: false,
            msi: None,
            msix: None,
            intx: None,
            rom: None,
            logged: false,
            dma: place.dma.clone(),
        };
        let rom_size = d.dev.region(crate::vfio::ROM_REGION).size;
        if place.rom && rom_size > 0 {
            let size = rom_size.next_power_of_two().max(2048);
            let addr = (place.alloc)(BarKind::Mem32, size.max(PAGE_SIZE)).map_err(|source| {
                DeviceError::BarAlloc {
                    index: ROM_BAR,
                    size,
                    source,
                }
            })?;
            d.rom = Some(Rom {
                size,
                addr,
                enabled: false,
            });
        }
        d.parse_capabilities(&raw)?;

        // INTx: the pin the device uses, wired to the GSI the vmm chose.
        let pin = raw[0x3d];
        if (1..=4).contains(&pin) && d.dev.irq_count(INTX_IRQ) > 0 {
            d.intx = Some(Intx {
                gsi: place.intx_gsi,
                pin,
                trigger: EventFd::new(libc::EFD_NONBLOCK).map_err(io_err)?,
                resample: EventFd::new(libc::EFD_NONBLOCK).map_err(io_err)?,
                enabled: false,
            });
            // Interrupt line register: the GSI (what legacy code reads).
            d.shadow.set(15, place.intx_gsi & 0xff, 0xff);
            d.intx_enable().map_err(io_err)?;
        }

        d.map_bars()?;
        Ok(d)
    }

    fn parse_capabilities(&mut self, raw: &[u8]) -> Result<(), DeviceError> {
        let status = u16::from_le_bytes([raw[6], raw[7]]);
        let mut found = Vec::new();
        if status & 0x10 != 0 {
            let mut ptr = usize::from(raw[0x34] & 0xfc);
            // A loop in the list ends at 48 capabilities (all that fit).
            while ptr >= 0x40 && ptr + 2 <= raw.len() && found.len() < 48 {
                found.push((ptr, raw[ptr]));
                ptr = usize::from(raw[ptr + 1] & 0xfc);
            }
        }
        let visible: Vec<(usize, u8)> = found
            .iter()
            .copied()
            .filter(|(_, id)| VISIBLE_CAPS.contains(id))
            .collect();
        for &(off, id) in found.iter().filter(|(_, id)| !VISIBLE_CAPS.contains(id)) {
            log::info!(
                "{}: hiding capability {id:#04x} at {off:#x} from the guest",
                self.name
            );
            self.hidden.push((off, hidden_cap_len(id)));
        }
        self.cap_links
            .insert(0x34, visible.first().map_or(0, |&(o, _)| o as u8));
        for (k, &(off, _)) in visible.iter().enumerate() {
            let next = visible.get(k + 1).map_or(0, |&(o, _)| o as u8);
            self.cap_links.insert(off + 1, next);
        }
        self.has_caps = !visible.is_empty();

        for &(off, id) in &visible {
            match id {
                CAP_MSI if off + 24 <= raw.len() => {
                    let max = self.dev.irq_count(MSI_IRQ);
                    if max > 0 {
                        self.msi = Some(MsiState {
                            cap: MsiCap::new(off, &raw[off..]),
                            vectors: Vec::new(),
                            active: 0,
                            max,
                        });
                    }
                }
                CAP_MSIX if off + 12 <= raw.len() => {
                    let u32_at =
                        |o: usize| u32::from_le_bytes([raw[o], raw[o + 1], raw[o + 2], raw[o + 3]]);
                    let control = u16::from_le_bytes([raw[off + 2], raw[off + 3]]);
                    let count = (control & 0x7ff) + 1;
                    let table = u32_at(off + 4);
                    let pba = u32_at(off + 8);
                    if self.dev.irq_count(MSIX_IRQ) == 0 {
                        continue;
                    }
                    let msix = Msix::new(count, self.router.clone()).map_err(io_err)?;
                    self.msix = Some(MsixState {
                        offset: off,
                        table_bar: (table & 7) as usize,
                        table_offset: u64::from(table & !7),
                        table_len: msix.table_size(),
                        pba_bar: (pba & 7) as usize,
                        pba_offset: u64::from(pba & !7),
                        pba_len: msix.pba_size(),
                        table: msix,
                        active: false,
                    });
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// mmaps every mappable area of the memory BARs; they are mapped into the guest when
    /// the PCI root routes the BAR ([`PciDevice::bar_mapping`]).
    fn map_bars(&mut self) -> Result<(), DeviceError> {
        for b in self.shadow.bars() {
            if b.kind == BarKind::Io {
                continue;
            }
            let info = self.dev.region(b.index as u32);
            if !info.mmappable {
                continue;
            }
            let holes = self
                .msix
                .as_ref()
                .map(|m| m.trapped(b.index))
                .unwrap_or_default();
            let mut bar = Bar {
                areas: Vec::new(),
                at: None,
            };
            for (offset, size) in mappable_areas(info.size, &info.areas, &holes) {
                let map = self
                    .dev
                    .mmap(b.index as u32, offset, size)
                    .map_err(|source| DeviceError::Mmap {
                        index: b.index,
                        offset,
                        size,
                        source,
                    })?;
                bar.areas.push(Area {
                    offset,
                    map,
                    handle: None,
                });
            }
            self.bars.insert(b.index, bar);
        }
        Ok(())
    }

    /// Maps BAR `index`'s areas at guest address `addr`; what fails stays trapped (and the
    /// first failure is returned, for the caller's rate-limited log).
    fn attach_bar(&mut self, index: usize, addr: u64) -> Result<(), BarMapError> {
        let Some(bar) = self.bars.get_mut(&index) else {
            return Ok(());
        };
        bar.at = Some(addr);
        let mut first = Ok(());
        for a in &mut bar.areas {
            let Some(gpa) = addr.checked_add(a.offset).filter(|g| g % PAGE_SIZE == 0) else {
                continue;
            };
            match self.mapper.map(gpa, a.map.len() as u64, a.map.addr()) {
                Ok(h) => a.handle = Some(h),
                Err(source) if first.is_ok() => {
                    first = Err(BarMapError {
                        what: format!(
                            "cannot map [{:#x}, +{:#x}) of BAR {index} as guest memory",
                            a.offset,
                            a.map.len()
                        ),
                        at: gpa,
                        source,
                    })
                }
                Err(_) => {}
            }
        }
        first
    }

    /// Unmaps BAR `index`'s areas from the guest (its accesses are trapped from now on).
    fn detach_bar(&mut self, index: usize) -> Result<(), BarMapError> {
        let Some(bar) = self.bars.get_mut(&index) else {
            return Ok(());
        };
        let was = bar.at.take().unwrap_or(0);
        let mut first = Ok(());
        for a in &mut bar.areas {
            if let Some(h) = a.handle.take() {
                if let Err(source) = self.mapper.unmap(h) {
                    if first.is_ok() {
                        first = Err(BarMapError {
                            what: format!(
                                "cannot unmap [{:#x}, +{:#x}) of BAR {index}",
                                a.offset,
                                a.map.len()
                            ),
                            at: was.wrapping_add(a.offset),
                            source,
                        });
                    }
                }
            }
        }
        first
    }

    /// The INTx pin the guest sees (1 = INTA), if the device uses one.
    pub fn intx_pin(&self) -> Option<u8> {
        self.intx.as_ref().map(|i| i.pin)
    }

    /// Guest-physical ranges mapped directly (not trapped), for tests and logs.
    pub fn mapped_ranges(&self) -> Vec<(u64, u64)> {
        let mut v = Vec::new();
        for bar in self.bars.values() {
            if let Some(at) = bar.at {
                for a in bar.areas.iter().filter(|a| a.handle.is_some()) {
                    v.push((at + a.offset, a.map.len() as u64));
                }
            }
        }
        v
    }

    fn dev_u32(&self, off: usize) -> u32 {
        let mut b = [0xffu8; 4];
        self.dev.read(CONFIG_REGION, off as u64, &mut b);
        u32::from_le_bytes(b)
    }

    fn log_once(&mut self, what: &str, e: &io::Error) {
        if !self.logged {
            log::error!("{}: {what}: {e}", self.name);
            self.logged = true;
        }
    }

    fn intx_enable(&mut self) -> io::Result<()> {
        let Some(i) = self.intx.as_mut() else {
            return Ok(());
        };
        if i.enabled {
            return Ok(());
        }
        self.router
            .register_resample_irqfd(&i.trigger, &i.resample, i.gsi)?;
        self.dev.enable_irqs(INTX_IRQ, &[&i.trigger])?;
        self.dev.set_intx_unmask_fd(&i.resample)?;
        i.enabled = true;
        Ok(())
    }

    fn intx_disable(&mut self) -> io::Result<()> {
        let Some(i) = self.intx.as_mut() else {
            return Ok(());
        };
        if !i.enabled {
            return Ok(());
        }
        i.enabled = false;
        self.dev.disable_irqs(INTX_IRQ)?;
        self.router.unregister_irqfd(&i.trigger, i.gsi)
    }

    /// Brings VFIO and the routes in line with the MSI capability.
    fn msi_update(&mut self) -> io::Result<()> {
        let Some(m) = self.msi.as_mut() else {
            return Ok(());
        };
        let want = if m.cap.enabled() {
            m.cap.vectors().min(m.max.max(1))
        } else {
            0
        };
        while (m.vectors.len() as u32) < want {
            m.vectors.push(MsiVector {
                gsi: self.router.allocate_gsi()?,
                irqfd: EventFd::new(libc::EFD_NONBLOCK)?,
                attached: false,
            });
        }
        for (i, v) in m.vectors.iter_mut().enumerate() {
            let i = i as u32;
            let live = i < want && !m.cap.masked(i);
            if i < want {
                self.router.set_msi_route(v.gsi, m.cap.message(i))?;
            }
            if live && !v.attached {
                self.router.register_irqfd(&v.irqfd, v.gsi)?;
                v.attached = true;
            } else if !live && v.attached {
                self.router.unregister_irqfd(&v.irqfd, v.gsi)?;
                v.attached = false;
            }
        }
        if want != m.active {
            let was = m.active;
            m.active = want;
            if was > 0 {
                self.dev.disable_irqs(MSI_IRQ)?;
            }
            if want > 0 {
                if was == 0 {
                    self.intx_disable()?;
                }
                let Some(m) = self.msi.as_ref() else {
                    return Ok(());
                };
                let fds: Vec<&EventFd> = m.vectors[..want as usize]
                    .iter()
                    .map(|v| &v.irqfd)
                    .collect();
                self.dev.enable_irqs(MSI_IRQ, &fds)?;
            } else {
                self.intx_enable()?;
            }
        }
        Ok(())
    }

    fn msix_control(&mut self, control: u16) -> io::Result<()> {
        let Some(x) = self.msix.as_mut() else {
            return Ok(());
        };
        x.table
            .set_control(control & (MSIX_ENABLE | MSIX_FUNCTION_MASK));
        let on = x.table.enabled();
        if on == x.active {
            return Ok(());
        }
        x.active = on;
        if on {
            let fds = (0..x.table.count())
                .filter_map(|v| x.table.irqfd(v))
                .collect::<io::Result<Vec<EventFd>>>()?;
            self.intx_disable()?;
            let refs: Vec<&EventFd> = fds.iter().collect();
            self.dev.enable_irqs(MSIX_IRQ, &refs)
        } else {
            self.dev.disable_irqs(MSIX_IRQ)?;
            self.intx_enable()
        }
    }

    /// A guest write to the expansion ROM BAR (address and enable bit; sizing reads back the
    /// size mask). The root maps the ROM's trapped range while it is enabled.
    fn rom_write(&mut self, offset: u64, data: &[u8]) {
        let Some(r) = self.rom.as_mut() else {
            return;
        };
        let mut bytes = ((r.addr as u32) | u32::from(r.enabled)).to_le_bytes();
        for (k, b) in data.iter().enumerate() {
            if let Some(x) = bytes.get_mut(offset as usize + k) {
                *x = *b;
            }
        }
        let v = u32::from_le_bytes(bytes);
        let mask = !(r.size as u32 - 1);
        r.enabled = v & 1 != 0;
        r.addr = u64::from(v & mask);
    }

    /// Applies a guest write of `data` at config byte `start` to the emulated MSI capability.
    fn msi_write(&mut self, start: usize, data: &[u8]) {
        let Some(m) = self.msi.as_mut() else {
            return;
        };
        for (k, b) in data.iter().enumerate() {
            let Some(rel) = (start + k).checked_sub(m.cap.offset) else {
                continue;
            };
            if rel < m.cap.bytes.len() {
                let w = m.cap.wmask[rel];
                m.cap.bytes[rel] = (m.cap.bytes[rel] & !w) | (b & w);
            }
        }
        if let Err(e) = self.msi_update() {
            self.log_once("cannot program MSI", &e);
        }
    }
}

impl PciDevice for PassthroughPci {
    fn read_config(&mut self, reg: usize) -> u32 {
        // No PCIe hierarchy is exposed: the extended space is empty.
        if reg >= 64 {
            return 0;
        }
        match reg {
            4..=9 => return self.shadow.read(reg),
            // The ROM BAR: hidden unless asked for.
            12 => {
                return self.rom.as_ref().map_or(0, |r| {
                    (r.addr as u32 & !(r.size as u32 - 1)) | u32::from(r.enabled)
                })
            }
            _ => {}
        }
        let mut v = self.dev_u32(reg * 4);
        match reg {
            1 => {
                v &= !(1 << 20);
                if self.has_caps {
                    v |= 1 << 20;
                }
            }
            // Header type: one function, whatever the host device is.
            3 => v &= !(0x80 << 16),
            15 => {
                let pin = self.intx.as_ref().map_or(0, |i| i.pin);
                v = (v & 0xffff_0000) | (u32::from(pin) << 8) | (self.shadow.read(15) & 0xff);
            }
            _ => {}
        }
        let mut bytes = v.to_le_bytes();
        for (k, b) in bytes.iter_mut().enumerate() {
            let at = reg * 4 + k;
            if let Some(&l) = self.cap_links.get(&at) {
                *b = l;
                continue;
            }
            if let Some(m) = &self.msi {
                if let Some(rel) = at.checked_sub(m.cap.offset) {
                    if (2..m.cap.bytes.len()).contains(&rel) {
                        *b = m.cap.bytes[rel];
                    }
                }
            }
            if let Some(x) = &self.msix {
                if at == x.offset + 3 {
                    let bits = (x.table.control_bits() >> 8) as u8;
                    *b = (*b & 0x3f) | bits;
                }
            }
        }
        u32::from_le_bytes(bytes)
    }

    fn write_config(&mut self, reg: usize, offset: u64, data: &[u8]) {
        if reg >= 64 || offset as usize + data.len() > 4 {
            return;
        }
        match reg {
            4..=9 | 15 => return self.shadow.write(reg, offset, data),
            12 => return self.rom_write(offset, data),
            _ => {}
        }
        let start = reg * 4 + offset as usize;
        let end = start + data.len();
        if let Some(m) = &self.msi {
            let (s, e) = (m.cap.offset, m.cap.offset + m.cap.bytes.len());
            if start < e && end > s {
                self.msi_write(start, data);
                return;
            }
        }
        if let Some(x) = &self.msix {
            let (s, e) = (x.offset, x.offset + 12);
            if start < e && end > s {
                // Only Message Control's enable and function mask bits are writable.
                let mut control = x.table.control_bits();
                for (k, b) in data.iter().enumerate() {
                    if start + k == x.offset + 3 {
                        control = u16::from(*b) << 8;
                    }
                }
                if let Err(e) = self.msix_control(control) {
                    self.log_once("cannot program MSI-X", &e);
                }
                return;
            }
        }
        if self.hidden.iter().any(|&(s, l)| start < s + l && end > s) {
            return;
        }
        // Bus Master Enable: the device may DMA from now on, so guest RAM must be mapped.
        if start <= 4 && end > 4 && data[4 - start] & COMMAND_BUS_MASTER != 0 {
            if let Some(gate) = self.dma.clone() {
                if let Err(why) = gate.wait() {
                    self.log_once(
                        "Bus Master Enable refused: guest RAM is not mapped for DMA",
                        &io::Error::other(why),
                    );
                    let mut v = data.to_vec();
                    v[4 - start] &= !COMMAND_BUS_MASTER;
                    self.dev.write(CONFIG_REGION, start as u64, &v);
                    return;
                }
                // Mapped: nothing to wait for any more.
                self.dma = None;
            }
        }
        self.dev.write(CONFIG_REGION, start as u64, data);
    }

    fn bars(&self) -> Vec<BarRange> {
        let mut v = self.shadow.bars();
        // The ROM decodes only with its enable bit set (and Memory Space on).
        if let Some(r) = self.rom.as_ref().filter(|r| r.enabled) {
            v.push(BarRange {
                index: ROM_BAR,
                kind: BarKind::Mem32,
                addr: r.addr,
                size: r.size,
                prefetchable: false,
            });
        }
        v
    }

    fn read_bar(&mut self, index: usize, offset: u64, data: &mut [u8]) {
        if index == ROM_BAR {
            match &self.rom {
                Some(r) if r.enabled => self.dev.read(crate::vfio::ROM_REGION, offset, data),
                _ => data.fill(0xff),
            }
            return;
        }
        if let Some(x) = self.msix.as_mut() {
            if x.in_table(index, offset) {
                x.table.read_table(offset - x.table_offset, data);
                return;
            }
            if x.in_pba(index, offset) {
                x.table.read_pba(offset - x.pba_offset, data);
                return;
            }
        }
        self.dev.read(index as u32, offset, data);
    }

    fn write_bar(&mut self, index: usize, offset: u64, data: &[u8]) {
        if index == ROM_BAR {
            return;
        }
        if let Some(x) = self.msix.as_mut() {
            if x.in_table(index, offset) {
                x.table.write_table(offset - x.table_offset, data);
                return;
            }
            if x.in_pba(index, offset) {
                return;
            }
        }
        self.dev.write(index as u32, offset, data);
    }

    fn bar_mapping(&mut self, index: usize, at: Option<u64>) -> Result<(), BarMapError> {
        if self.bars.get(&index).map(|b| b.at) == Some(at) {
            return Ok(());
        }
        let detached = self.detach_bar(index);
        let attached = match at {
            Some(addr) => self.attach_bar(index, addr),
            None => Ok(()),
        };
        detached.and(attached)
    }
}

impl Drop for PassthroughPci {
    fn drop(&mut self) {
        if self.msix.as_ref().is_some_and(|x| x.active) {
            let _ = self.dev.disable_irqs(MSIX_IRQ);
        }
        if let Some(m) = self.msi.as_mut() {
            if m.active > 0 {
                let _ = self.dev.disable_irqs(MSI_IRQ);
            }
            for v in &m.vectors {
                if v.attached {
                    let _ = self.router.unregister_irqfd(&v.irqfd, v.gsi);
                }
                let _ = self.router.remove_route(v.gsi);
            }
        }
        let _ = self.intx_disable();
        let indices: Vec<usize> = self.bars.keys().copied().collect();
        for i in indices {
            if let Err(e) = self.detach_bar(i) {
                log::warn!("{}: {e}: {}", self.name, e.source);
            }
        }
        if let Err(e) = self.dev.reset() {
            log::debug!("{}: no reset at teardown: {e}", self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::fake::FakeRouter;
    use crate::vfio::{Mapping, RegionInfo};
    use std::sync::Mutex;

    /// A VFIO device made of a config space and region sizes, recording what it is asked.
    struct FakeDev {
        config: Mutex<Vec<u8>>,
        regions: BTreeMap<u32, RegionInfo>,
        irqs: [u32; 3],
        enabled: Mutex<BTreeMap<u32, usize>>,
        unmask_fd: Mutex<bool>,
        config_writes: Mutex<Vec<(u64, Vec<u8>)>>,
        bar_writes: Mutex<Vec<(u32, u64, Vec<u8>)>>,
        resets: Mutex<u32>,
    }

    impl Vfio for FakeDev {
        fn region(&self, index: u32) -> RegionInfo {
            self.regions.get(&index).cloned().unwrap_or_default()
        }
        fn read(&self, index: u32, offset: u64, data: &mut [u8]) {
            if index == CONFIG_REGION {
                let c = self.config.lock().unwrap();
                for (i, b) in data.iter_mut().enumerate() {
                    *b = c.get(offset as usize + i).copied().unwrap_or(0);
                }
            } else {
                // BAR contents: the low byte of the offset, to see forwarding.
                for (i, b) in data.iter_mut().enumerate() {
                    *b = (offset as u8).wrapping_add(i as u8);
                }
            }
        }
        fn write(&self, index: u32, offset: u64, data: &[u8]) {
            if index == CONFIG_REGION {
                self.config_writes
                    .lock()
                    .unwrap()
                    .push((offset, data.to_vec()));
            } else {
                self.bar_writes
                    .lock()
                    .unwrap()
                    .push((index, offset, data.to_vec()));
            }
        }
        fn mmap(&self, _index: u32, _offset: u64, size: u64) -> io::Result<Mapping> {
            Mapping::anonymous(size as usize)
        }
        fn irq_count(&self, index: u32) -> u32 {
            self.irqs.get(index as usize).copied().unwrap_or(0)
        }
        fn enable_irqs(&self, index: u32, fds: &[&EventFd]) -> io::Result<()> {
            let mut e = self.enabled.lock().unwrap();
            // Like vfio-pci: one interrupt kind at a time.
            if e.keys().any(|&k| k != index) {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            e.insert(index, fds.len());
            Ok(())
        }
        fn disable_irqs(&self, index: u32) -> io::Result<()> {
            self.enabled.lock().unwrap().remove(&index);
            Ok(())
        }
        fn set_intx_unmask_fd(&self, _fd: &EventFd) -> io::Result<()> {
            *self.unmask_fd.lock().unwrap() = true;
            Ok(())
        }
        fn reset(&self) -> io::Result<()> {
            *self.resets.lock().unwrap() += 1;
            Ok(())
        }
    }

    #[derive(Default)]
    struct FakeMapper {
        next: Mutex<u32>,
        maps: Mutex<BTreeMap<u32, (u64, u64)>>,
        refuse_below: Mutex<u64>,
    }

    impl GuestMapper for FakeMapper {
        fn map(&self, gpa: u64, size: u64, _host: *mut u8) -> io::Result<u32> {
            if gpa < *self.refuse_below.lock().unwrap() {
                return Err(io::Error::from_raw_os_error(libc::EEXIST));
            }
            let mut n = self.next.lock().unwrap();
            *n += 1;
            self.maps.lock().unwrap().insert(*n, (gpa, size));
            Ok(*n)
        }
        fn unmap(&self, handle: u32) -> io::Result<()> {
            self.maps
                .lock()
                .unwrap()
                .remove(&handle)
                .map(|_| ())
                .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
        }
    }

    fn put(c: &mut [u8], off: usize, v: &[u8]) {
        c[off..off + v.len()].copy_from_slice(v);
    }

    const MB: u64 = 1 << 20;

    /// An e1000e-like function: BAR0 128 KiB with the MSI-X table at 0x10000 and the PBA
    /// at 0x18000 (an NVMe-like layout: the table shares a BAR with registers), BAR2 I/O,
    /// BAR4/5 a 64-bit prefetchable 1 MiB BAR; capabilities PM, VPD (hidden), MSI (64-bit,
    /// per-vector masks, 4 vectors), MSI-X (5 vectors), PCIe; INTx pin A; multifunction.
    fn config(with_msix: bool) -> Vec<u8> {
        let mut c = vec![0u8; 256];
        put(&mut c, 0, &0x8086u16.to_le_bytes());
        put(&mut c, 2, &0x10d3u16.to_le_bytes());
        put(&mut c, 6, &0x0010u16.to_le_bytes());
        put(&mut c, 8, &0x0200_0000u32.to_le_bytes());
        c[0x0e] = 0x80;
        put(&mut c, 0x10, &0u32.to_le_bytes());
        put(&mut c, 0x18, &1u32.to_le_bytes());
        put(&mut c, 0x20, &0xcu32.to_le_bytes());
        put(&mut c, 0x30, &0xfff0_0001u32.to_le_bytes());
        c[0x34] = 0x40;
        c[0x3d] = 1;
        // PM
        put(&mut c, 0x40, &[CAP_PM, 0x50, 0x03, 0x00]);
        // VPD: must be hidden.
        put(&mut c, 0x50, &[CAP_VPD, 0x60, 0, 0]);
        // MSI: 64-bit, per-vector masking, 4 vectors capable.
        let msi_ctrl: u16 = (1 << 8) | (1 << 7) | (2 << 1);
        put(
            &mut c,
            0x60,
            &[CAP_MSI, if with_msix { 0x78 } else { 0xa0 }],
        );
        put(&mut c, 0x62, &msi_ctrl.to_le_bytes());
        if with_msix {
            put(&mut c, 0x78, &[CAP_MSIX, 0xa0]);
            put(&mut c, 0x7a, &4u16.to_le_bytes());
            put(&mut c, 0x7c, &0x10000u32.to_le_bytes());
            put(&mut c, 0x80, &0x18000u32.to_le_bytes());
        }
        put(&mut c, 0xa0, &[CAP_PCIE, 0x00, 0x02, 0x00]);
        c
    }

    fn fake_dev(with_msix: bool) -> Arc<FakeDev> {
        let mem = |size: u64| RegionInfo {
            size,
            readable: true,
            writable: true,
            mmappable: true,
            areas: Vec::new(),
        };
        let mut regions = BTreeMap::new();
        regions.insert(0, mem(128 << 10));
        regions.insert(
            2,
            RegionInfo {
                size: 32,
                readable: true,
                writable: true,
                ..Default::default()
            },
        );
        regions.insert(4, mem(MB));
        regions.insert(
            crate::vfio::ROM_REGION,
            RegionInfo {
                size: 0x6000,
                readable: true,
                ..Default::default()
            },
        );
        regions.insert(
            CONFIG_REGION,
            RegionInfo {
                size: 4096,
                readable: true,
                writable: true,
                ..Default::default()
            },
        );
        Arc::new(FakeDev {
            config: Mutex::new(config(with_msix)),
            regions,
            irqs: [1, 4, if with_msix { 5 } else { 0 }],
            enabled: Mutex::new(BTreeMap::new()),
            unmask_fd: Mutex::new(false),
            config_writes: Mutex::new(Vec::new()),
            bar_writes: Mutex::new(Vec::new()),
            resets: Mutex::new(0),
        })
    }

    struct Rig {
        dev: Arc<FakeDev>,
        router: Arc<FakeRouter>,
        mapper: Arc<FakeMapper>,
        pci: PassthroughPci,
    }

    fn rig(with_msix: bool) -> Rig {
        rig_with(with_msix, false)
    }

    fn rig_with(with_msix: bool, rom: bool) -> Rig {
        rig_gated(with_msix, rom, None)
    }

    fn rig_gated(with_msix: bool, rom: bool, dma: Option<Arc<DmaGate>>) -> Rig {
        let dev = fake_dev(with_msix);
        let router = Arc::new(FakeRouter::default());
        let mapper = Arc::new(FakeMapper::default());
        let mut next_mem = 0xc000_0000u64;
        let mut next_io = 0xc000u64;
        let mut alloc = |kind: BarKind, size: u64| -> io::Result<u64> {
            let next = if kind == BarKind::Io {
                &mut next_io
            } else {
                &mut next_mem
            };
            let a = next.next_multiple_of(size);
            *next = a + size;
            Ok(a)
        };
        let pci = PassthroughPci::new(
            "nic0",
            dev.clone(),
            router.clone(),
            mapper.clone(),
            Placement {
                alloc: &mut alloc,
                intx_gsi: 17,
                rom,
                dma: dma.clone(),
            },
        )
        .unwrap();
        Rig {
            dev,
            router,
            mapper,
            pci,
        }
    }

    /// `dev` assigned with BARs placed at 0xc000_0000 + size, INTx on GSI 16.
    fn take_over(dev: Arc<FakeDev>) -> PassthroughPci {
        let mut a = |_: BarKind, s: u64| -> io::Result<u64> { Ok(0xc000_0000 + s) };
        PassthroughPci::new(
            "nic0",
            dev,
            Arc::new(FakeRouter::default()),
            Arc::new(FakeMapper::default()),
            Placement {
                alloc: &mut a,
                intx_gsi: 16,
                rom: false,
                dma: None,
            },
        )
        .unwrap()
    }

    fn cfg_write(p: &mut PassthroughPci, off: usize, v: &[u8]) {
        p.write_config(off / 4, (off % 4) as u64, v)
    }

    /// Routes every BAR where it is programmed, as the PCI root does when decoding is on.
    fn route_all(p: &mut PassthroughPci) {
        for b in p.bars() {
            p.bar_mapping(b.index, Some(b.addr)).unwrap();
        }
    }

    fn cfg_read(p: &mut PassthroughPci, off: usize) -> u32 {
        p.read_config(off / 4)
    }

    #[test]
    fn bars_are_placed_sized_and_keep_their_flags() {
        let mut r = rig(true);
        let bars = r.pci.bars();
        assert_eq!(bars.len(), 3);
        assert_eq!(
            bars[0],
            BarRange {
                index: 0,
                kind: BarKind::Mem32,
                addr: 0xc000_0000,
                size: 128 << 10,
                prefetchable: false
            }
        );
        assert_eq!(
            (bars[1].kind, bars[1].addr, bars[1].size),
            (BarKind::Io, 0xc000, 32)
        );
        assert_eq!((bars[2].kind, bars[2].size), (BarKind::Mem64, MB));
        assert!(bars[2].prefetchable);
        // Guest sizing: all ones, read back the size mask with the flags.
        cfg_write(&mut r.pci, 0x10, &[0xff; 4]);
        assert_eq!(cfg_read(&mut r.pci, 0x10), !((128u32 << 10) - 1));
        cfg_write(&mut r.pci, 0x18, &[0xff; 4]);
        assert_eq!(cfg_read(&mut r.pci, 0x18), !31u32 | 1);
        // 64-bit: both halves, type and prefetch bits kept.
        cfg_write(&mut r.pci, 0x20, &[0xff; 4]);
        cfg_write(&mut r.pci, 0x24, &[0xff; 4]);
        assert_eq!(cfg_read(&mut r.pci, 0x20), !(MB as u32 - 1) | 0xc);
        assert_eq!(cfg_read(&mut r.pci, 0x24), 0xffff_ffff);
        // Unused BAR registers read 0, the ROM BAR is hidden.
        assert_eq!(cfg_read(&mut r.pci, 0x14), 0);
        assert_eq!(cfg_read(&mut r.pci, 0x30), 0);
        cfg_write(&mut r.pci, 0x30, &[0xff; 4]);
        assert_eq!(cfg_read(&mut r.pci, 0x30), 0);
        assert!(r.dev.config_writes.lock().unwrap().is_empty());
    }

    #[test]
    fn bar_relocation_moves_the_guest_mappings() {
        let mut r = rig(true);
        // Nothing is mapped until the root routes the BARs.
        assert!(r.pci.mapped_ranges().is_empty());
        assert!(r.mapper.maps.lock().unwrap().is_empty());
        route_all(&mut r.pci);
        let before = r.pci.mapped_ranges();
        // BAR0 minus the MSI-X table and PBA pages; the 64-bit BAR whole.
        assert_eq!(
            before,
            vec![
                (0xc000_0000, 0x10000),
                (0xc001_1000, 0x7000),
                (0xc001_9000, 0x7000),
                (0xc010_0000, MB)
            ]
        );
        // Move BAR0 to 0xd000_0000 the way Linux does (sizing, then the new address).
        cfg_write(&mut r.pci, 0x10, &[0xff; 4]);
        cfg_write(&mut r.pci, 0x10, &0xd000_0000u32.to_le_bytes());
        assert_eq!(r.pci.bars()[0].addr, 0xd000_0000);
        r.pci.bar_mapping(0, Some(0xd000_0000)).unwrap();
        let after = r.pci.mapped_ranges();
        assert!(after.contains(&(0xd000_0000, 0x10000)), "{after:x?}");
        assert!(after.contains(&(0xd001_1000, 0x7000)));
        let live: Vec<(u64, u64)> = r.mapper.maps.lock().unwrap().values().copied().collect();
        assert!(!live
            .iter()
            .any(|&(g, _)| (0xc000_0000..0xc002_0000).contains(&g)));
        assert_eq!(live.len(), 4);
        // A 64-bit move above 4 GiB: low half, then high half.
        cfg_write(&mut r.pci, 0x20, &0u32.to_le_bytes());
        cfg_write(&mut r.pci, 0x24, &1u32.to_le_bytes());
        assert_eq!(r.pci.bars()[2].addr, 0x1_0000_0000);
        r.pci.bar_mapping(4, Some(0x1_0000_0000)).unwrap();
        assert!(r.pci.mapped_ranges().contains(&(0x1_0000_0000, MB)));
        // Unrouted (decoding off): no KVM slot of the BAR is left anywhere.
        r.pci.bar_mapping(4, None).unwrap();
        assert!(!r.pci.mapped_ranges().iter().any(|&(_, l)| l == MB));
        r.pci.bar_mapping(0, None).unwrap();
        assert!(r.pci.mapped_ranges().is_empty());
        assert!(r.mapper.maps.lock().unwrap().is_empty());
        // Routing it twice at one address maps it once.
        r.pci.bar_mapping(0, Some(0xd000_0000)).unwrap();
        r.pci.bar_mapping(0, Some(0xd000_0000)).unwrap();
        assert_eq!(r.mapper.maps.lock().unwrap().len(), 3);
        // Dropping the device unmaps what is left.
        let mapper = r.mapper.clone();
        drop(r);
        assert!(mapper.maps.lock().unwrap().is_empty());
    }

    #[test]
    fn unmappable_placement_stays_trapped_and_forwards() {
        let mut r = rig(true);
        *r.mapper.refuse_below.lock().unwrap() = u64::MAX;
        cfg_write(&mut r.pci, 0x10, &[0xff; 4]);
        cfg_write(&mut r.pci, 0x10, &0xd000_0000u32.to_le_bytes());
        // The failure is reported (the root logs it, rate-limited), not logged here.
        let e = r.pci.bar_mapping(0, Some(0xd000_0000)).unwrap_err();
        assert_eq!(e.at, 0xd000_0000);
        assert!(!r
            .pci
            .mapped_ranges()
            .iter()
            .any(|&(g, _)| (0xd000_0000..0xd002_0000).contains(&g)));
        // Trapped accesses go to the region.
        r.pci.write_bar(0, 0x100, &7u32.to_le_bytes());
        assert_eq!(
            r.dev.bar_writes.lock().unwrap().last().unwrap(),
            &(0, 0x100, 7u32.to_le_bytes().to_vec())
        );
        let mut d = [0u8; 4];
        r.pci.read_bar(2, 4, &mut d);
        assert_eq!(d, [4, 5, 6, 7]);
    }

    #[test]
    fn msix_table_is_intercepted_and_vectors_routed() {
        let mut r = rig(true);
        // At assignment: reset, INTx wired with a resample fd.
        assert_eq!(*r.dev.resets.lock().unwrap(), 1);
        assert_eq!(r.dev.enabled.lock().unwrap().get(&INTX_IRQ), Some(&1));
        assert!(*r.dev.unmask_fd.lock().unwrap());
        assert!(r.router.resample.lock().unwrap().contains(&17));
        // Program entry 2 through BAR0 (the table at 0x10000): not forwarded.
        let e = 0x10000 + 2 * 16;
        r.pci.write_bar(0, e, &0xfee0_1000u32.to_le_bytes());
        r.pci.write_bar(0, e + 4, &0u32.to_le_bytes());
        r.pci.write_bar(0, e + 8, &0x45u32.to_le_bytes());
        r.pci.write_bar(0, e + 12, &0u32.to_le_bytes());
        assert!(r.dev.bar_writes.lock().unwrap().is_empty());
        let mut d = [0u8; 4];
        r.pci.read_bar(0, e + 8, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x45);
        // Enable MSI-X with the function masked, as Linux does.
        cfg_write(&mut r.pci, 0x7a, &(0xc004u16).to_le_bytes());
        assert_eq!(cfg_read(&mut r.pci, 0x78) >> 16, 0xc004);
        {
            let en = r.dev.enabled.lock().unwrap();
            assert_eq!(en.get(&MSIX_IRQ), Some(&5), "all vectors handed to VFIO");
            assert!(!en.contains_key(&INTX_IRQ), "INTx off while MSI-X is on");
        }
        let gsi = |r: &Rig, data: u32| {
            r.router
                .routes
                .lock()
                .unwrap()
                .iter()
                .find(|(_, m)| m.data == data)
                .map(|(g, _)| *g)
        };
        assert_eq!(gsi(&r, 0x45), None, "function masked: nothing routed yet");
        // Unmask the function: entry 2 gets its route and irqfd.
        cfg_write(&mut r.pci, 0x7a, &(0x8004u16).to_le_bytes());
        let g = gsi(&r, 0x45).expect("route for vector 2");
        assert_eq!(r.router.irqfds.lock().unwrap().get(&g), Some(&true));
        // Masking the entry detaches its irqfd.
        r.pci.write_bar(0, e + 12, &1u32.to_le_bytes());
        assert_eq!(r.router.irqfds.lock().unwrap().get(&g), Some(&false));
        // The PBA is emulated and read-only.
        r.pci.write_bar(0, 0x18000, &[0xff; 8]);
        assert!(r.dev.bar_writes.lock().unwrap().is_empty());
        // Registers beside the table are forwarded.
        r.pci.write_bar(0, 0x100, &1u32.to_le_bytes());
        assert_eq!(r.dev.bar_writes.lock().unwrap().len(), 1);
        // Disable: VFIO MSI-X off, INTx back.
        cfg_write(&mut r.pci, 0x7a, &(0x0004u16).to_le_bytes());
        let en = r.dev.enabled.lock().unwrap();
        assert!(!en.contains_key(&MSIX_IRQ));
        assert_eq!(en.get(&INTX_IRQ), Some(&1));
    }

    fn walk_caps(p: &mut PassthroughPci) -> Vec<(usize, u8)> {
        let mut v = Vec::new();
        let mut ptr = (cfg_read(p, 0x34) & 0xff) as usize;
        while ptr != 0 && v.len() < 64 {
            let w = cfg_read(p, ptr);
            v.push((ptr, (w & 0xff) as u8));
            ptr = ((w >> 8) & 0xfc) as usize;
        }
        v
    }

    #[test]
    fn capabilities_are_filtered_and_header_virtualized() {
        let mut r = rig(true);
        assert_eq!(
            walk_caps(&mut r.pci),
            vec![
                (0x40, CAP_PM),
                (0x60, CAP_MSI),
                (0x78, CAP_MSIX),
                (0xa0, CAP_PCIE)
            ]
        );
        // Writes into the hidden VPD capability never reach the device.
        cfg_write(&mut r.pci, 0x52, &[1, 2]);
        assert!(r.dev.config_writes.lock().unwrap().is_empty());
        // Single function, whatever the host says; extended space empty.
        assert_eq!((cfg_read(&mut r.pci, 0x0c) >> 16) & 0x80, 0);
        assert_eq!(cfg_read(&mut r.pci, 0x100), 0);
        cfg_write(&mut r.pci, 0x100, &[0xff; 4]);
        // Interrupt pin from the device, line = the GSI, writable line.
        assert_eq!(cfg_read(&mut r.pci, 0x3c) & 0xffff, 0x0111);
        cfg_write(&mut r.pci, 0x3c, &[0x0b]);
        assert_eq!(cfg_read(&mut r.pci, 0x3c) & 0xffff, 0x010b);
        // The command register is forwarded (memory, bus master).
        cfg_write(&mut r.pci, 0x04, &0x0006u16.to_le_bytes());
        assert_eq!(
            r.dev.config_writes.lock().unwrap().as_slice(),
            &[(4, vec![6, 0])]
        );
        // Oversized accesses are ignored.
        r.pci.write_config(1, 2, &[0; 4]);
        assert_eq!(r.dev.config_writes.lock().unwrap().len(), 1);
    }

    #[test]
    fn bus_master_enable_waits_for_guest_ram_to_be_mapped_for_dma() {
        let gate = DmaGate::new();
        let mut r = rig_gated(true, false, Some(gate.clone()));
        // Memory decoding alone does not wait.
        cfg_write(&mut r.pci, 0x04, &0x0002u16.to_le_bytes());
        assert_eq!(
            r.dev.config_writes.lock().unwrap().as_slice(),
            &[(4, vec![2, 0])]
        );
        let dev = r.dev.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut pci = r.pci;
        let t = std::thread::spawn(move || {
            cfg_write(&mut pci, 0x04, &0x0006u16.to_le_bytes());
            tx.send(()).unwrap();
            pci
        });
        // Still mapping: the write waits and the device has not seen it.
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(200))
            .is_err());
        assert_eq!(dev.config_writes.lock().unwrap().len(), 1);
        gate.finish(Ok(()));
        rx.recv().unwrap();
        let mut pci = t.join().unwrap();
        assert_eq!(dev.config_writes.lock().unwrap()[1], (4, vec![6, 0]));
        // Later writes go straight through.
        cfg_write(&mut pci, 0x04, &0x0004u16.to_le_bytes());
        assert_eq!(dev.config_writes.lock().unwrap()[2], (4, vec![4, 0]));
    }

    #[test]
    fn bus_master_enable_is_refused_when_mapping_failed() {
        let gate = DmaGate::new();
        gate.finish(Err("no memory".into()));
        let mut r = rig_gated(true, false, Some(gate));
        // A dword write of command + status: only the bus master bit is dropped.
        cfg_write(&mut r.pci, 0x04, &0x0000_0006u32.to_le_bytes());
        assert_eq!(
            r.dev.config_writes.lock().unwrap().as_slice(),
            &[(4, vec![2, 0, 0, 0])]
        );
    }

    #[test]
    fn takeover_turns_bus_master_off() {
        let dev = fake_dev(true);
        dev.config.lock().unwrap()[4] = 0x07;
        let _p = take_over(dev.clone());
        assert_eq!(dev.config_writes.lock().unwrap()[0], (4, vec![0x03, 0]));
    }

    #[test]
    fn rom_is_hidden_unless_asked_for() {
        let mut r = rig(true);
        assert_eq!(cfg_read(&mut r.pci, 0x30), 0);
        assert!(!r.pci.bars().iter().any(|b| b.index == ROM_BAR));
        let mut r = rig_with(true, true);
        // 24 KiB of ROM: a 32 KiB BAR, disabled at first (so not among the BARs that decode).
        assert!(!r.pci.bars().iter().any(|b| b.index == ROM_BAR));
        let rom_addr = cfg_read(&mut r.pci, 0x30);
        assert_ne!(rom_addr, 0);
        assert_eq!(rom_addr & 1, 0);
        // Sizing reads the size mask; restored, the ROM is still disabled.
        cfg_write(&mut r.pci, 0x30, &[0xfe, 0xff, 0xff, 0xff]);
        assert_eq!(cfg_read(&mut r.pci, 0x30), !0x7fffu32);
        cfg_write(&mut r.pci, 0x30, &rom_addr.to_le_bytes());
        assert!(!r.pci.bars().iter().any(|b| b.index == ROM_BAR));
        // Disabled: reads float; enabled: the device's ROM; writes are dropped.
        let mut d = [0u8; 4];
        r.pci.read_bar(ROM_BAR, 0x10, &mut d);
        assert_eq!(d, [0xff; 4]);
        cfg_write(&mut r.pci, 0x30, &(rom_addr | 1).to_le_bytes());
        let on = *r.pci.bars().iter().find(|b| b.index == ROM_BAR).unwrap();
        assert_eq!((on.addr, on.size), (u64::from(rom_addr), 0x8000));
        r.pci.read_bar(ROM_BAR, 0x10, &mut d);
        assert_eq!(d, [0x10, 0x11, 0x12, 0x13]);
        r.pci.write_bar(ROM_BAR, 0, &[0; 4]);
        assert!(r.dev.bar_writes.lock().unwrap().is_empty());
        // The guest moves it: the BAR the root maps follows.
        cfg_write(&mut r.pci, 0x30, &0xd800_0001u32.to_le_bytes());
        let moved = *r.pci.bars().iter().find(|b| b.index == ROM_BAR).unwrap();
        assert_eq!((moved.addr, moved.size), (0xd800_0000, 0x8000));
        assert_eq!(cfg_read(&mut r.pci, 0x30), 0xd800_0001);
    }

    #[test]
    fn a_looping_capability_list_ends() {
        let dev = fake_dev(false);
        {
            let mut c = dev.config.lock().unwrap();
            c[0x41] = 0x40; // PM points at itself
        }
        let mut p = take_over(dev);
        assert!(walk_caps(&mut p).len() <= 48);
    }

    #[test]
    fn msi_without_msix() {
        let mut r = rig(false);
        assert!(r.pci.msix.is_none());
        assert_eq!(
            walk_caps(&mut r.pci),
            vec![(0x40, CAP_PM), (0x60, CAP_MSI), (0xa0, CAP_PCIE)]
        );
        // Program address/data, then enable 4 vectors (MME=2).
        cfg_write(&mut r.pci, 0x64, &0xfee0_0000u32.to_le_bytes());
        cfg_write(&mut r.pci, 0x68, &0u32.to_le_bytes());
        cfg_write(&mut r.pci, 0x6c, &0x60u32.to_le_bytes());
        // Mask vector 1 (per-vector masking).
        cfg_write(&mut r.pci, 0x70, &2u32.to_le_bytes());
        let ctrl = (1u16 << 8) | (1 << 7) | (2 << 1) | (2 << 4) | 1;
        cfg_write(&mut r.pci, 0x62, &ctrl.to_le_bytes());
        assert_eq!(cfg_read(&mut r.pci, 0x60) >> 16, u32::from(ctrl));
        assert_eq!(cfg_read(&mut r.pci, 0x6c), 0x60);
        {
            let en = r.dev.enabled.lock().unwrap();
            assert_eq!(en.get(&MSI_IRQ), Some(&4));
            assert!(!en.contains_key(&INTX_IRQ));
        }
        let routes = r.router.routes.lock().unwrap().clone();
        let datas: Vec<u32> = routes.values().map(|m| m.data).collect();
        assert_eq!(datas, vec![0x60, 0x61, 0x62, 0x63]);
        let gsis: Vec<u32> = routes.keys().copied().collect();
        let irqfds = r.router.irqfds.lock().unwrap().clone();
        assert_eq!(irqfds.get(&gsis[0]), Some(&true));
        assert_eq!(irqfds.get(&gsis[1]), None, "vector 1 masked: not attached");
        // Unmask vector 1.
        cfg_write(&mut r.pci, 0x70, &0u32.to_le_bytes());
        assert_eq!(r.router.irqfds.lock().unwrap().get(&gsis[1]), Some(&true));
        // Nothing of the emulated capability reached the device.
        assert!(r.dev.config_writes.lock().unwrap().is_empty());
        // Disable: MSI off in VFIO, INTx back on.
        cfg_write(&mut r.pci, 0x62, &0u16.to_le_bytes());
        let en = r.dev.enabled.lock().unwrap();
        assert!(!en.contains_key(&MSI_IRQ));
        assert_eq!(en.get(&INTX_IRQ), Some(&1));
    }

    #[test]
    fn teardown_releases_everything_and_resets() {
        let mut r = rig(true);
        route_all(&mut r.pci);
        let Rig {
            dev, mapper, pci, ..
        } = r;
        assert!(!mapper.maps.lock().unwrap().is_empty());
        drop(pci);
        assert!(mapper.maps.lock().unwrap().is_empty());
        assert!(dev.enabled.lock().unwrap().is_empty());
        assert_eq!(*dev.resets.lock().unwrap(), 2);
    }

    #[test]
    fn area_math() {
        // Sparse areas from VFIO, a hole in the middle, unaligned leftovers dropped.
        assert_eq!(
            mappable_areas(
                0x8000,
                &[(0, 0x4000), (0x5000, 0x3000)],
                &[(0x2000, 0x1000)]
            ),
            vec![(0, 0x2000), (0x3000, 0x1000), (0x5000, 0x3000)]
        );
        assert_eq!(mappable_areas(0x800, &[], &[]), vec![]);
    }
}
