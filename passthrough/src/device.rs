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

use backends::ratelimit::GuestErrorLog;
use vmm_sys_util::eventfd::EventFd;

use crate::interrupt::{InterruptRouter, MsiMessage};
use crate::msix::{Msix, MSIX_ENABLE, MSIX_FUNCTION_MASK};
use crate::pci::{
    BarKind, BarMapError, BarRange, ConfigSpace, PciDevice, COMMAND_IO, COMMAND_MEMORY,
};
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

    /// Whether the mapping has ended (a [`DmaGate::wait`] would return at once).
    pub fn is_done(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
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

/// Command register bits.
const COMMAND_BUS_MASTER: u8 = 0x04;
const COMMAND_INTX_DISABLE: u16 = 0x0400;
/// PMCSR power state D3hot: the function decodes nothing but its config space.
const PM_D3HOT: u16 = 3;

/// Kinds of guest-caused problems, each counted and logged at a limited rate
/// ([`GuestErrorLog`]): a guest repeating one must neither flood the host's log nor go
/// unnoticed.
pub mod guest_error {
    /// A BAR access while the device decodes nothing there (Memory or I/O Space Enable
    /// off, or in D3hot): reads are all ones, writes dropped, as a master abort.
    pub const NO_DECODE: usize = 0;
    /// A BAR access beyond what the device has (the BAR is larger than the region).
    pub const OUT_OF_RANGE: usize = 1;
    /// MSI and MSI-X enabled at once: the second enable is refused.
    pub const IRQ_CONFLICT: usize = 2;
    /// VFIO or KVM refused an interrupt mode or route the guest asked for.
    pub const IRQ_REFUSED: usize = 3;
    /// Bus Master Enable while guest RAM is not mapped for DMA.
    pub const DMA_REFUSED: usize = 4;
    /// A direct (KVM slot) access to a BAR faulted: the BARs are trapped from then on.
    pub const MAPPING_FAULT: usize = 5;
    /// KVM refused a slot for a BAR where the guest put it: that part stays trapped.
    pub const MAP_REFUSED: usize = 6;
    pub const KINDS: usize = 7;
}

/// The interrupt kind VFIO has enabled: at most one at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqMode {
    Off,
    Intx,
    /// MSI with this many vectors.
    Msi(u32),
    Msix,
}

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
    /// What VFIO has enabled; recorded only once VFIO accepted it.
    irq: IrqMode,
    /// The command register as the guest last wrote it (forwarded to the device).
    command: u16,
    /// The PM capability's offset and its control/status register as last written.
    pm: Option<usize>,
    pmcsr: u16,
    /// Region sizes (BARs 0-5, ROM): accesses beyond them are not forwarded.
    region_size: [u64; 7],
    /// The kind of each BAR (0-5, ROM), `None` where there is none.
    bar_kind: [Option<BarKind>; 7],
    /// Direct (KVM slot) mappings allowed: cleared when one faulted, until the guest
    /// turns memory decoding off and on again.
    direct: bool,
    errors: GuestErrorLog<{ guest_error::KINDS }>,
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
            irq: IrqMode::Off,
            command: u16::from_le_bytes(command) & !u16::from(COMMAND_BUS_MASTER),
            pm: None,
            pmcsr: 0,
            region_size: [0; 7],
            bar_kind: [None; 7],
            direct: true,
            errors: GuestErrorLog::new(name),
            dma: place.dma.clone(),
        };
        for (i, size) in d.region_size.iter_mut().enumerate() {
            *size = d.dev.region(i as u32).size;
        }
        for b in d.shadow.bars() {
            d.bar_kind[b.index] = Some(b.kind);
        }
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
            d.bar_kind[ROM_BAR] = Some(BarKind::Mem32);
        }
        d.parse_capabilities(&raw)?;

        // INTx: a device that uses a pin is wired to the GSI the vmm chose, and the guest sees
        // INTA whichever pin the device has on the host (a single function; its line is the
        // vmm's, routed by slot and INTA in the DSDT's _PRT).
        let pin = raw[0x3d];
        if (1..=4).contains(&pin) && d.dev.irq_count(INTX_IRQ) > 0 {
            d.intx = Some(Intx {
                gsi: place.intx_gsi,
                pin: 1,
                trigger: EventFd::new(libc::EFD_NONBLOCK).map_err(io_err)?,
                resample: EventFd::new(libc::EFD_NONBLOCK).map_err(io_err)?,
            });
            // Interrupt line register: the GSI (what legacy code reads).
            d.shadow.set(15, place.intx_gsi & 0xff, 0xff);
            if d.command & COMMAND_INTX_DISABLE == 0 {
                d.vfio_enable(IrqMode::Intx).map_err(io_err)?;
                d.irq = IrqMode::Intx;
            }
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
                CAP_PM if off + 6 <= raw.len() => {
                    self.pm = Some(off);
                    self.pmcsr = u16::from_le_bytes([raw[off + 4], raw[off + 5]]);
                }
                CAP_MSI if off + 24 <= raw.len() => {
                    let max = self.dev.irq_count(MSI_IRQ);
                    if max > 0 {
                        self.msi = Some(MsiState {
                            cap: MsiCap::new(off, &raw[off..]),
                            vectors: Vec::new(),
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

    /// Maps BAR `index`'s areas where the root routes it (`bar.at`), if the device decodes
    /// memory and direct mappings are allowed: vfio-pci revokes the mmaps while it does not,
    /// and a KVM slot over a revoked mmap faults in KVM_RUN. Areas already mapped stay (a
    /// slot must not leak); what fails stays trapped, and the first failure is returned for
    /// the caller's rate-limited log.
    fn attach_bar(&mut self, index: usize) -> Result<(), BarMapError> {
        if !self.mem_decode() || !self.direct {
            return Ok(());
        }
        let Some(bar) = self.bars.get_mut(&index) else {
            return Ok(());
        };
        let Some(addr) = bar.at else {
            return Ok(());
        };
        let mut first = Ok(());
        for a in &mut bar.areas {
            if a.handle.is_some() {
                continue;
            }
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
    /// Where the root routes the BAR is kept: [`PassthroughPci::attach_bar`] maps there again
    /// when the device decodes memory again.
    fn detach_bar(&mut self, index: usize) -> Result<(), BarMapError> {
        let Some(bar) = self.bars.get_mut(&index) else {
            return Ok(());
        };
        let was = bar.at.unwrap_or(0);
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

    /// Enables `mode` in VFIO (nothing else may be enabled) and attaches what KVM needs
    /// for it; on failure undoes its own steps and leaves everything off.
    fn vfio_enable(&mut self, mode: IrqMode) -> io::Result<()> {
        match mode {
            IrqMode::Off => Ok(()),
            IrqMode::Intx => {
                let Some(i) = self.intx.as_ref() else {
                    return Err(io::Error::from_raw_os_error(libc::ENODEV));
                };
                self.router
                    .register_resample_irqfd(&i.trigger, &i.resample, i.gsi)?;
                let r = self
                    .dev
                    .enable_irqs(INTX_IRQ, &[&i.trigger])
                    .and_then(|()| self.dev.set_intx_unmask_fd(&i.resample));
                if r.is_err() {
                    let _ = self.dev.disable_irqs(INTX_IRQ);
                    let _ = self.router.unregister_irqfd(&i.trigger, i.gsi);
                }
                r
            }
            IrqMode::Msi(n) => {
                let Some(m) = self.msi.as_mut() else {
                    return Err(io::Error::from_raw_os_error(libc::ENODEV));
                };
                while (m.vectors.len() as u32) < n {
                    m.vectors.push(MsiVector {
                        gsi: self.router.allocate_gsi()?,
                        irqfd: EventFd::new(libc::EFD_NONBLOCK)?,
                        attached: false,
                    });
                }
                let fds: Vec<&EventFd> = m
                    .vectors
                    .iter()
                    .take(n as usize)
                    .map(|v| &v.irqfd)
                    .collect();
                self.dev.enable_irqs(MSI_IRQ, &fds)
            }
            IrqMode::Msix => {
                let Some(x) = self.msix.as_ref() else {
                    return Err(io::Error::from_raw_os_error(libc::ENODEV));
                };
                let fds = (0..x.table.count())
                    .filter_map(|v| x.table.irqfd(v))
                    .collect::<io::Result<Vec<EventFd>>>()?;
                let refs: Vec<&EventFd> = fds.iter().collect();
                self.dev.enable_irqs(MSIX_IRQ, &refs)
            }
        }
    }

    /// Disables what VFIO has enabled; `self.irq` is `Off` only if VFIO agreed.
    fn vfio_disable(&mut self) -> io::Result<()> {
        match self.irq {
            IrqMode::Off => {}
            IrqMode::Intx => {
                self.dev.disable_irqs(INTX_IRQ)?;
                if let Some(i) = self.intx.as_ref() {
                    self.router.unregister_irqfd(&i.trigger, i.gsi)?;
                }
            }
            IrqMode::Msi(_) => self.dev.disable_irqs(MSI_IRQ)?,
            IrqMode::Msix => self.dev.disable_irqs(MSIX_IRQ)?,
        }
        self.irq = IrqMode::Off;
        Ok(())
    }

    /// INTx may be on: the device has a pin and the guest has not set INTx Disable.
    fn intx_allowed(&self) -> bool {
        self.intx.is_some() && self.command & COMMAND_INTX_DISABLE == 0
    }

    /// Brings VFIO in line with what the guest asks (MSI-X, else MSI, else INTx unless
    /// disabled in the command register), one kind at a time. `wrote`: the capability the
    /// guest just enabled, refused if the other one is enabled. Whatever VFIO refuses
    /// shows as disabled to the guest, so the capability, VFIO and `self.irq` agree.
    fn irq_update(&mut self, wrote: Option<IrqMode>) {
        let msix_on = self.msix.as_ref().is_some_and(|x| x.table.enabled());
        let msi_on = self.msi.as_ref().is_some_and(|m| m.cap.enabled());
        if msix_on && msi_on {
            let refused = if wrote == Some(IrqMode::Msix) {
                "MSI-X"
            } else {
                "MSI"
            };
            self.errors.record(
                guest_error::IRQ_CONFLICT,
                format_args!("MSI and MSI-X enabled at once: the {refused} enable is refused"),
            );
            if wrote == Some(IrqMode::Msix) {
                self.set_msix_enable(false);
            } else {
                self.set_msi_enable(false);
            }
        }
        let want = if self.msix.as_ref().is_some_and(|x| x.table.enabled()) {
            IrqMode::Msix
        } else if let Some(m) = self.msi.as_ref().filter(|m| m.cap.enabled()) {
            IrqMode::Msi(m.cap.vectors().min(m.max.max(1)))
        } else if self.intx_allowed() {
            IrqMode::Intx
        } else {
            IrqMode::Off
        };
        if want != self.irq {
            self.irq_switch(want);
        }
        // The guest sees enabled what VFIO has enabled, nothing else.
        let irq = self.irq;
        if self.msi.as_ref().is_some_and(|m| m.cap.enabled()) && !matches!(irq, IrqMode::Msi(_)) {
            self.set_msi_enable(false);
        }
        if self.msix.as_ref().is_some_and(|x| x.table.enabled()) && irq != IrqMode::Msix {
            self.set_msix_enable(false);
        }
        self.msi_routes();
    }

    /// Switches VFIO from `self.irq` to `want`; on refusal falls back to INTx if allowed.
    fn irq_switch(&mut self, want: IrqMode) {
        if let Err(e) = self.vfio_disable() {
            self.errors.record(
                guest_error::IRQ_REFUSED,
                format_args!(
                    "VFIO cannot disable {:?} to switch to {want:?}: {e}",
                    self.irq
                ),
            );
            return;
        }
        match self.vfio_enable(want) {
            Ok(()) => self.irq = want,
            Err(e) => {
                self.errors.record(
                    guest_error::IRQ_REFUSED,
                    format_args!("VFIO refused {want:?}: {e}; the guest sees it disabled"),
                );
                if want != IrqMode::Intx && self.intx_allowed() {
                    match self.vfio_enable(IrqMode::Intx) {
                        Ok(()) => self.irq = IrqMode::Intx,
                        Err(e) => {
                            self.errors.record(
                                guest_error::IRQ_REFUSED,
                                format_args!("VFIO refused INTx as well: {e}; no interrupts"),
                            );
                        }
                    }
                }
            }
        }
    }

    fn set_msi_enable(&mut self, on: bool) {
        if let Some(m) = self.msi.as_mut() {
            m.cap.bytes[2] = (m.cap.bytes[2] & !1) | u8::from(on);
        }
    }

    fn set_msix_enable(&mut self, on: bool) {
        if let Some(x) = self.msix.as_mut() {
            let c = x.table.control_bits() & !MSIX_ENABLE;
            x.table.set_control(c | if on { MSIX_ENABLE } else { 0 });
        }
    }

    /// MSI vectors: routed while MSI is on in VFIO, attached (deliverable) while unmasked.
    fn msi_routes(&mut self) {
        let Some(m) = self.msi.as_mut() else {
            return;
        };
        let n = match self.irq {
            IrqMode::Msi(n) => n,
            _ => 0,
        };
        let mut failed = None;
        for (i, v) in m.vectors.iter_mut().enumerate() {
            let i = i as u32;
            let live = i < n && !m.cap.masked(i);
            let r = if live {
                let r = self.router.set_msi_route(v.gsi, m.cap.message(i));
                if r.is_ok() && !v.attached {
                    self.router
                        .register_irqfd(&v.irqfd, v.gsi)
                        .map(|()| v.attached = true)
                } else {
                    r
                }
            } else if v.attached {
                v.attached = false;
                self.router.unregister_irqfd(&v.irqfd, v.gsi)
            } else {
                Ok(())
            };
            if let Err(e) = r {
                failed = Some((i, v.gsi, e));
            }
        }
        if let Some((i, gsi, e)) = failed {
            self.errors.record(
                guest_error::IRQ_REFUSED,
                format_args!("cannot route MSI vector {i} (gsi {gsi}): {e}"),
            );
        }
    }

    /// Forwards a guest write to the device's config space, following what it changes in
    /// the command register and the power state: the direct BAR mappings go before the
    /// device stops decoding memory (vfio-pci then revokes its mmaps, and a guest access
    /// through a KVM slot would fault in KVM_RUN) and come back once it decodes again, so
    /// that meanwhile the guest's accesses are trapped; INTx follows INTx Disable. Where
    /// they go is the root's to say: it routes the BARs after Memory Space Enable comes on
    /// (and unroutes them after it goes off); leaving D3hot maps them where they are routed.
    fn config_forward(&mut self, start: usize, data: &[u8]) {
        let overlay = |cur: u16, at: usize| -> u16 {
            let mut b = cur.to_le_bytes();
            for (k, x) in data.iter().enumerate() {
                if let Some(i) = (start + k).checked_sub(at).filter(|&i| i < 2) {
                    b[i] = *x;
                }
            }
            u16::from_le_bytes(b)
        };
        let command = overlay(self.command, 4);
        let pmcsr = self.pm.map_or(self.pmcsr, |pm| overlay(self.pmcsr, pm + 4));
        let was = self.mem_decode();
        let will = command & COMMAND_MEMORY != 0 && pmcsr & 3 != PM_D3HOT;
        if was && !will {
            self.set_decode(false);
        }
        self.dev.write(CONFIG_REGION, start as u64, data);
        let intx_changed = (command ^ self.command) & COMMAND_INTX_DISABLE != 0;
        self.command = command;
        self.pmcsr = pmcsr;
        if !was && will {
            self.direct = true;
            self.set_decode(true);
        }
        if intx_changed {
            self.irq_update(None);
        }
    }

    /// The device decodes its memory BARs: Memory Space Enable and not in D3hot.
    fn mem_decode(&self) -> bool {
        self.command & COMMAND_MEMORY != 0 && self.pmcsr & 3 != PM_D3HOT
    }

    fn io_decode(&self) -> bool {
        self.command & COMMAND_IO != 0 && self.pmcsr & 3 != PM_D3HOT
    }

    /// Maps (`true`) or unmaps the direct areas of every memory BAR where the root routes
    /// it: the device started or stopped decoding memory. The routed addresses stay; the root
    /// changes them ([`PciDevice::bar_mapping`]).
    fn set_decode(&mut self, on: bool) {
        let indices: Vec<usize> = self.bars.keys().copied().collect();
        for index in indices {
            let r = if on {
                self.attach_bar(index)
            } else {
                self.detach_bar(index)
            };
            // The guest can place a BAR where KVM refuses a slot and toggle decoding to
            // retry as often as it likes: rate-limited. (What the root asks for through
            // `bar_mapping` is logged by the root instead.)
            if let Err(e) = r {
                self.errors
                    .record(guest_error::MAP_REFUSED, format_args!("{e}: {}", e.source));
            }
        }
    }

    /// Whether a trapped access of `len` bytes at `offset` of BAR `index` may reach the
    /// device: it decodes that BAR now and the access lies inside what the device has (a
    /// BAR can be larger than its region). vfio-pci fails the others, and vfio-ioctls logs
    /// each failure: they are answered here (reads all ones, writes dropped) and counted.
    fn bar_access_ok(&mut self, index: usize, offset: u64, len: usize) -> bool {
        let decode = match self.bar_kind.get(index).copied().flatten() {
            None => false,
            Some(BarKind::Io) => self.io_decode(),
            Some(_) if index == ROM_BAR => {
                self.mem_decode() && self.rom.as_ref().is_some_and(|r| r.enabled)
            }
            Some(_) => self.mem_decode(),
        };
        if !decode {
            self.errors.record(
                guest_error::NO_DECODE,
                format_args!(
                    "BAR {index} access at {offset:#x} while the device does not decode it \
                     (command {:#06x}, power state D{}): reads all ones, writes dropped",
                    self.command,
                    self.pmcsr & 3
                ),
            );
            return false;
        }
        if let Some(x) = &self.msix {
            // Emulated: never forwarded.
            if x.in_table(index, offset) || x.in_pba(index, offset) {
                return true;
            }
        }
        let size = self.region_size.get(index).copied().unwrap_or(0);
        if offset.checked_add(len as u64).is_none_or(|end| end > size) {
            self.errors.record(
                guest_error::OUT_OF_RANGE,
                format_args!(
                    "BAR {index} access at {offset:#x}+{len} beyond the device's {size:#x} \
                     bytes: reads all ones, writes dropped"
                ),
            );
            return false;
        }
        true
    }

    /// A guest access through a direct mapping faulted in KVM_RUN (EFAULT), at guest
    /// physical `gpa` when KVM says where: vfio-pci revoked the BAR mmaps because the device
    /// stopped decoding memory in a way the vmm did not follow (a reset, a power state
    /// change). If that is this device (the address is in its mapped areas, or without an
    /// address, the device itself has memory decoding off), its direct mappings go, so
    /// that the access, retried, is trapped; the command register and power state are
    /// re-read from the device; the mappings come back when the guest turns memory
    /// decoding off and on again. Returns whether it was this device.
    pub fn mapping_fault(&mut self, gpa: Option<u64>) -> bool {
        let mapped = self.mapped_ranges();
        if mapped.is_empty() {
            return false;
        }
        let command = self.dev_u32(4) as u16;
        let pmcsr = self.pm.map_or(self.pmcsr, |pm| self.dev_u32(pm + 4) as u16);
        let ours = match gpa {
            Some(g) => mapped.iter().any(|&(s, l)| g >= s && g - s < l),
            None => command & COMMAND_MEMORY == 0 || pmcsr & 3 == PM_D3HOT,
        };
        if !ours {
            return false;
        }
        self.set_decode(false);
        self.direct = false;
        let decode = COMMAND_MEMORY | COMMAND_IO;
        self.command = (self.command & !decode) | (command & decode);
        self.pmcsr = pmcsr;
        self.errors.record(
            guest_error::MAPPING_FAULT,
            format_args!(
                "a guest access to a mapped BAR faulted{}: the device does not decode it \
                 (command {command:#06x}, power state D{}); its BARs are trapped until the \
                 guest turns memory decoding off and on again",
                gpa.map_or(String::new(), |g| format!(" at {g:#x}")),
                pmcsr & 3
            ),
        );
        true
    }

    /// The interrupt kind VFIO has enabled.
    pub fn irq_mode(&self) -> IrqMode {
        self.irq
    }

    /// GSIs whose irqfd should be attached now: the unmasked vectors of the enabled kind
    /// (INTx's line included). For consistency checks.
    pub fn live_gsis(&self) -> Vec<u32> {
        match self.irq {
            IrqMode::Off => Vec::new(),
            IrqMode::Intx => self.intx.iter().map(|i| i.gsi).collect(),
            IrqMode::Msi(n) => self.msi.as_ref().map_or(Vec::new(), |m| {
                m.vectors
                    .iter()
                    .enumerate()
                    .filter(|&(i, _)| (i as u32) < n && !m.cap.masked(i as u32))
                    .map(|(_, v)| v.gsi)
                    .collect()
            }),
            IrqMode::Msix => self
                .msix
                .as_ref()
                .map_or(Vec::new(), |x| x.table.live_gsis()),
        }
    }

    /// How many times a guest error of `kind` ([`guest_error`]) happened.
    pub fn guest_errors(&self, kind: usize) -> u64 {
        self.errors.count(kind)
    }

    fn msix_control(&mut self, control: u16) {
        let Some(x) = self.msix.as_mut() else {
            return;
        };
        let was = x.table.enabled();
        x.table
            .set_control(control & (MSIX_ENABLE | MSIX_FUNCTION_MASK));
        let wrote = (!was && x.table.enabled()).then_some(IrqMode::Msix);
        self.irq_update(wrote);
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
        let was = m.cap.enabled();
        for (k, b) in data.iter().enumerate() {
            let Some(rel) = (start + k).checked_sub(m.cap.offset) else {
                continue;
            };
            if rel < m.cap.bytes.len() {
                let w = m.cap.wmask[rel];
                m.cap.bytes[rel] = (m.cap.bytes[rel] & !w) | (b & w);
            }
        }
        let wrote = (!was && m.cap.enabled()).then_some(IrqMode::Msi(0));
        self.irq_update(wrote);
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
                self.msix_control(control);
                return;
            }
        }
        if self.hidden.iter().any(|&(s, l)| start < s + l && end > s) {
            return;
        }
        let mut data = data.to_vec();
        // Bus Master Enable: the device may DMA from now on, so guest RAM must be mapped.
        if start <= 4 && end > 4 && data[4 - start] & COMMAND_BUS_MASTER != 0 {
            if let Some(gate) = self.dma.clone() {
                match gate.wait() {
                    Err(why) => {
                        self.errors.record(
                            guest_error::DMA_REFUSED,
                            format_args!(
                                "Bus Master Enable refused: guest RAM is not mapped for DMA: {why}"
                            ),
                        );
                        data[4 - start] &= !COMMAND_BUS_MASTER;
                    }
                    // Mapped: nothing to wait for any more.
                    Ok(()) => self.dma = None,
                }
            }
        }
        self.config_forward(start, &data);
    }

    fn write_config_wait(
        &self,
        reg: usize,
        offset: u64,
        data: &[u8],
    ) -> Option<Box<dyn FnOnce() + Send>> {
        // The write that would wait in write_config: Bus Master Enable set while the mapping
        // goes on. The root waits for it with no lock held; write_config then finds the gate
        // done.
        // The command register's low byte is byte 0 of register 1.
        if reg != 1 || offset != 0 || data.first().is_none_or(|b| b & COMMAND_BUS_MASTER == 0) {
            return None;
        }
        let gate = self.dma.clone().filter(|g| !g.is_done())?;
        Some(Box::new(move || {
            let _ = gate.wait();
        }))
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
        if !self.bar_access_ok(index, offset, data.len()) {
            data.fill(0xff);
            return;
        }
        if index == ROM_BAR {
            self.dev.read(crate::vfio::ROM_REGION, offset, data);
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
        // The ROM is read-only: writes to it are dropped like those the device ignores.
        if !self.bar_access_ok(index, offset, data.len()) || index == ROM_BAR {
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
        if let Some(bar) = self.bars.get_mut(&index) {
            bar.at = at;
        }
        // Mapped now only while the device decodes memory; otherwise when it does again
        // (`config_forward`). The root logs what fails, rate-limited.
        let attached = self.attach_bar(index);
        detached.and(attached)
    }
}

impl Drop for PassthroughPci {
    fn drop(&mut self) {
        if let Err(e) = self.vfio_disable() {
            log::debug!(
                "{}: cannot disable {:?} at teardown: {e}",
                self.name,
                self.irq
            );
        }
        if let Some(m) = self.msi.as_mut() {
            for v in &m.vectors {
                if v.attached {
                    let _ = self.router.unregister_irqfd(&v.irqfd, v.gsi);
                }
                let _ = self.router.release_gsi(v.gsi);
            }
        }
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
    use crate::fuzzing::{fake_dev, FakeDev, FakeMapper, Rig, MB, PM_CAP};
    use crate::interrupt::fake::FakeRouter;

    fn rig(with_msix: bool) -> Rig {
        crate::fuzzing::rig(with_msix, false, None)
    }

    fn rig_with(with_msix: bool, rom: bool) -> Rig {
        crate::fuzzing::rig(with_msix, rom, None)
    }

    fn rig_gated(with_msix: bool, rom: bool, dma: Option<Arc<DmaGate>>) -> Rig {
        crate::fuzzing::rig(with_msix, rom, dma)
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

    /// The guest sets the command register's decode bits (`COMMAND_MEMORY`, `COMMAND_IO`),
    /// through the root (which routes or unroutes the BARs after the write).
    fn decode(r: &mut Rig, bits: u16) {
        r.cfg_write(0x04, &bits.to_le_bytes());
    }

    /// A config write straight to a device with no root around it.
    fn cfg_write(p: &mut PassthroughPci, off: usize, v: &[u8]) {
        p.write_config(off / 4, (off % 4) as u64, v)
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
        r.cfg_write(0x10, &[0xff; 4]);
        assert_eq!(cfg_read(&mut r.pci, 0x10), !((128u32 << 10) - 1));
        r.cfg_write(0x18, &[0xff; 4]);
        assert_eq!(cfg_read(&mut r.pci, 0x18), !31u32 | 1);
        // 64-bit: both halves, type and prefetch bits kept.
        r.cfg_write(0x20, &[0xff; 4]);
        r.cfg_write(0x24, &[0xff; 4]);
        assert_eq!(cfg_read(&mut r.pci, 0x20), !(MB as u32 - 1) | 0xc);
        assert_eq!(cfg_read(&mut r.pci, 0x24), 0xffff_ffff);
        // Unused BAR registers read 0, the ROM BAR is hidden.
        assert_eq!(cfg_read(&mut r.pci, 0x14), 0);
        assert_eq!(cfg_read(&mut r.pci, 0x30), 0);
        r.cfg_write(0x30, &[0xff; 4]);
        assert_eq!(cfg_read(&mut r.pci, 0x30), 0);
        assert!(r.dev.config_writes.lock().unwrap().is_empty());
    }

    #[test]
    fn bar_relocation_moves_the_guest_mappings() {
        let mut r = rig(true);
        // Nothing is mapped until decoding is on and the root routes the BARs.
        assert!(
            r.pci.mapped_ranges().is_empty(),
            "nothing mapped before decoding"
        );
        assert!(r.mapper.maps.lock().unwrap().is_empty());
        decode(&mut r, COMMAND_MEMORY | COMMAND_IO);
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
        // Move BAR0 to 0xd000_0000 the way Linux does (sizing, then the new address). While
        // its register reads the size mask the root routes it nowhere: no slot of it left.
        r.cfg_write(0x10, &[0xff; 4]);
        assert!(!r.routed.contains_key(&0));
        assert_eq!(r.pci.mapped_ranges(), vec![(0xc010_0000, MB)]);
        r.cfg_write(0x10, &0xd000_0000u32.to_le_bytes());
        assert_eq!(r.pci.bars()[0].addr, 0xd000_0000);
        assert_eq!(r.routed.get(&0), Some(&0xd000_0000));
        let after = r.pci.mapped_ranges();
        assert!(after.contains(&(0xd000_0000, 0x10000)), "{after:x?}");
        assert!(after.contains(&(0xd001_1000, 0x7000)));
        let live: Vec<(u64, u64)> = r.mapper.maps.lock().unwrap().values().copied().collect();
        assert!(!live
            .iter()
            .any(|&(g, _)| (0xc000_0000..0xc002_0000).contains(&g)));
        assert_eq!(live.len(), 4);
        // A 64-bit move above 4 GiB: low half, then high half (the half-written address is
        // routed and mapped in between, as the root sees it).
        r.cfg_write(0x20, &0u32.to_le_bytes());
        r.cfg_write(0x24, &1u32.to_le_bytes());
        assert_eq!(r.pci.bars()[2].addr, 0x1_0000_0000);
        assert!(r.pci.mapped_ranges().contains(&(0x1_0000_0000, MB)));
        assert_eq!(r.mapper.maps.lock().unwrap().len(), 4);
        // Unrouted (decoding off): no KVM slot of any BAR is left anywhere.
        decode(&mut r, COMMAND_IO);
        assert!(r.pci.mapped_ranges().is_empty());
        assert!(r.mapper.maps.lock().unwrap().is_empty());
        decode(&mut r, COMMAND_MEMORY | COMMAND_IO);
        assert_eq!(r.mapper.maps.lock().unwrap().len(), 4);
        // Routing a BAR again at the same address maps it once.
        r.pci.bar_mapping(0, Some(0xd000_0000)).unwrap();
        r.pci.bar_mapping(0, Some(0xd000_0000)).unwrap();
        assert_eq!(r.mapper.maps.lock().unwrap().len(), 4);
        assert!(r.map_errors.is_empty(), "{:?}", r.map_errors);
        assert!(
            r.mapper.late.lock().unwrap().is_empty(),
            "{:?}",
            r.mapper.late
        );
        // Dropping the device unmaps what is left.
        let mapper = r.mapper.clone();
        drop(r);
        assert!(mapper.maps.lock().unwrap().is_empty());
    }

    #[test]
    fn a_bar_routed_while_memory_decoding_is_off_is_mapped_when_it_comes_on() {
        let mut r = rig(true);
        let bar0 = |base: u64| {
            vec![
                (base, 0x10000),
                (base + 0x11000, 0x7000),
                (base + 0x19000, 0x7000),
            ]
        };
        // The guest puts the function in D3hot, then sets Memory Space Enable: the root
        // routes the memory BARs (it knows no power states), but vfio-pci revoked the
        // mmaps: no slot yet.
        r.cfg_write(PM_CAP + 4, &3u16.to_le_bytes());
        decode(&mut r, COMMAND_MEMORY);
        assert_eq!(r.routed.keys().copied().collect::<Vec<_>>(), vec![0, 4]);
        assert!(r.mapper.maps.lock().unwrap().is_empty());
        // Back in D0: mapped where the root routes them, with no word from the root.
        r.cfg_write(PM_CAP + 4, &0u16.to_le_bytes());
        let mut want = bar0(0xc000_0000);
        want.push((0xc010_0000, MB));
        assert_eq!(r.pci.mapped_ranges(), want);
        // Moved in D3hot: the new address is remembered and mapped at D0.
        r.cfg_write(PM_CAP + 4, &3u16.to_le_bytes());
        r.cfg_write(0x10, &0xd000_0000u32.to_le_bytes());
        assert_eq!(r.routed.get(&0), Some(&0xd000_0000));
        assert!(r.mapper.maps.lock().unwrap().is_empty());
        r.cfg_write(PM_CAP + 4, &0u16.to_le_bytes());
        let mut want = bar0(0xd000_0000);
        want.push((0xc010_0000, MB));
        assert_eq!(r.pci.mapped_ranges(), want);
        assert!(
            r.mapper.late.lock().unwrap().is_empty(),
            "{:?}",
            r.mapper.late
        );
        assert!(r.map_errors.is_empty(), "{:?}", r.map_errors);
        // The device's own contract, with no root: routed while Memory Space Enable is off,
        // mapped when it comes on; off again unmaps but keeps the address; unrouted while
        // off, nothing comes back.
        let mut r = rig(true);
        r.pci.bar_mapping(0, Some(0xd000_0000)).unwrap();
        assert!(r.mapper.maps.lock().unwrap().is_empty());
        cfg_write(&mut r.pci, 0x04, &COMMAND_MEMORY.to_le_bytes());
        assert_eq!(r.pci.mapped_ranges(), bar0(0xd000_0000));
        cfg_write(&mut r.pci, 0x04, &0u16.to_le_bytes());
        assert!(r.mapper.maps.lock().unwrap().is_empty());
        cfg_write(&mut r.pci, 0x04, &COMMAND_MEMORY.to_le_bytes());
        assert_eq!(r.pci.mapped_ranges(), bar0(0xd000_0000));
        cfg_write(&mut r.pci, 0x04, &0u16.to_le_bytes());
        r.pci.bar_mapping(0, None).unwrap();
        cfg_write(&mut r.pci, 0x04, &COMMAND_MEMORY.to_le_bytes());
        assert!(r.mapper.maps.lock().unwrap().is_empty());
        assert!(
            r.mapper.late.lock().unwrap().is_empty(),
            "{:?}",
            r.mapper.late
        );
    }

    #[test]
    fn unmappable_placement_stays_trapped_and_forwards() {
        let mut r = rig(true);
        decode(&mut r, COMMAND_MEMORY | COMMAND_IO);
        *r.mapper.refuse_below.lock().unwrap() = u64::MAX;
        r.cfg_write(0x10, &[0xff; 4]);
        r.cfg_write(0x10, &0xd000_0000u32.to_le_bytes());
        // The failure is reported to the root (which logs it, rate-limited), not logged by
        // the device as well.
        assert_eq!(r.map_errors.len(), 1, "{:?}", r.map_errors);
        assert_eq!(r.map_errors[0].at, 0xd000_0000);
        assert_eq!(r.pci.guest_errors(guest_error::MAP_REFUSED), 0);
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
        // The guest retries by toggling decoding: the root routes both memory BARs again
        // each time and hears each refusal once (one report per BAR).
        for _ in 0..100 {
            decode(&mut r, 0);
            decode(&mut r, COMMAND_MEMORY | COMMAND_IO);
        }
        assert_eq!(r.map_errors.len(), 1 + 100 * 2);
        assert_eq!(r.pci.guest_errors(guest_error::MAP_REFUSED), 0);
        assert!(r.mapper.maps.lock().unwrap().is_empty());
        // Leaving D3hot maps the routed BARs without the root: the device's own
        // rate-limited log counts those refusals (one per BAR).
        r.cfg_write(PM_CAP + 4, &3u16.to_le_bytes());
        r.cfg_write(PM_CAP + 4, &0u16.to_le_bytes());
        assert_eq!(r.pci.guest_errors(guest_error::MAP_REFUSED), 2);
        assert_eq!(r.map_errors.len(), 1 + 100 * 2);
        assert!(r.mapper.maps.lock().unwrap().is_empty());
    }

    #[test]
    fn msix_table_is_intercepted_and_vectors_routed() {
        let mut r = rig(true);
        // At assignment: reset, INTx wired with a resample fd.
        assert_eq!(*r.dev.resets.lock().unwrap(), 1);
        assert_eq!(r.dev.enabled.lock().unwrap().get(&INTX_IRQ), Some(&1));
        assert!(*r.dev.unmask_fd.lock().unwrap());
        assert!(r.router.resample.lock().unwrap().contains(&17));
        decode(&mut r, COMMAND_MEMORY);
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
        r.cfg_write(0x7a, &(0xc004u16).to_le_bytes());
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
        r.cfg_write(0x7a, &(0x8004u16).to_le_bytes());
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
        r.cfg_write(0x7a, &(0x0004u16).to_le_bytes());
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
        r.cfg_write(0x52, &[1, 2]);
        assert!(r.dev.config_writes.lock().unwrap().is_empty());
        // Single function, whatever the host says; extended space empty.
        assert_eq!((cfg_read(&mut r.pci, 0x0c) >> 16) & 0x80, 0);
        assert_eq!(cfg_read(&mut r.pci, 0x100), 0);
        r.cfg_write(0x100, &[0xff; 4]);
        // Interrupt pin from the device, line = the GSI, writable line.
        assert_eq!(cfg_read(&mut r.pci, 0x3c) & 0xffff, 0x0111);
        r.cfg_write(0x3c, &[0x0b]);
        assert_eq!(cfg_read(&mut r.pci, 0x3c) & 0xffff, 0x010b);
        // The command register is forwarded (memory, bus master).
        r.cfg_write(0x04, &0x0006u16.to_le_bytes());
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
        r.cfg_write(0x04, &0x0002u16.to_le_bytes());
        assert_eq!(
            r.dev.config_writes.lock().unwrap().as_slice(),
            &[(4, vec![2, 0])]
        );
        // The root asks first: a Bus Master Enable (byte, word or dword write of the command
        // register) has something to wait for, with no lock held; other writes do not.
        for data in [&[6u8][..], &[6, 0], &[6, 0, 0, 0]] {
            assert!(r.pci.write_config_wait(1, 0, data).is_some(), "{data:?}");
        }
        assert!(r.pci.write_config_wait(1, 0, &[2, 0]).is_none());
        assert!(r.pci.write_config_wait(1, 1, &[4]).is_none());
        assert!(r.pci.write_config_wait(3, 0, &[4]).is_none());
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
        // Mapped: nothing to wait for.
        assert!(pci.write_config_wait(1, 0, &[6, 0]).is_none());
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
        r.cfg_write(0x04, &0x0000_0006u32.to_le_bytes());
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
        r.cfg_write(0x30, &[0xfe, 0xff, 0xff, 0xff]);
        assert_eq!(cfg_read(&mut r.pci, 0x30), !0x7fffu32);
        r.cfg_write(0x30, &rom_addr.to_le_bytes());
        assert!(!r.pci.bars().iter().any(|b| b.index == ROM_BAR));
        // Disabled: reads float; enabled: the device's ROM; writes are dropped.
        decode(&mut r, COMMAND_MEMORY);
        let mut d = [0u8; 4];
        r.pci.read_bar(ROM_BAR, 0x10, &mut d);
        assert_eq!(d, [0xff; 4]);
        r.cfg_write(0x30, &(rom_addr | 1).to_le_bytes());
        let on = *r.pci.bars().iter().find(|b| b.index == ROM_BAR).unwrap();
        assert_eq!((on.addr, on.size), (u64::from(rom_addr), 0x8000));
        r.pci.read_bar(ROM_BAR, 0x10, &mut d);
        assert_eq!(d, [0x10, 0x11, 0x12, 0x13]);
        r.pci.write_bar(ROM_BAR, 0, &[0; 4]);
        assert!(r.dev.bar_writes.lock().unwrap().is_empty());
        // The guest moves it: the BAR the root maps follows.
        r.cfg_write(0x30, &0xd800_0001u32.to_le_bytes());
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
        r.cfg_write(0x64, &0xfee0_0000u32.to_le_bytes());
        r.cfg_write(0x68, &0u32.to_le_bytes());
        r.cfg_write(0x6c, &0x60u32.to_le_bytes());
        // Mask vector 1 (per-vector masking).
        r.cfg_write(0x70, &2u32.to_le_bytes());
        let ctrl = (1u16 << 8) | (1 << 7) | (2 << 1) | (2 << 4) | 1;
        r.cfg_write(0x62, &ctrl.to_le_bytes());
        assert_eq!(cfg_read(&mut r.pci, 0x60) >> 16, u32::from(ctrl));
        assert_eq!(cfg_read(&mut r.pci, 0x6c), 0x60);
        {
            let en = r.dev.enabled.lock().unwrap();
            assert_eq!(en.get(&MSI_IRQ), Some(&4));
            assert!(!en.contains_key(&INTX_IRQ));
        }
        // Vector 1 masked: neither routed nor attached.
        let routes = r.router.routes.lock().unwrap().clone();
        let datas: Vec<u32> = routes.values().map(|m| m.data).collect();
        assert_eq!(datas, vec![0x60, 0x62, 0x63]);
        let gsis: Vec<u32> = routes.keys().copied().collect();
        let irqfds = r.router.irqfds.lock().unwrap().clone();
        assert_eq!(irqfds.get(&gsis[0]), Some(&true));
        assert_eq!(
            irqfds.get(&(gsis[0] + 1)),
            None,
            "vector 1 masked: not attached"
        );
        // Unmask vector 1.
        r.cfg_write(0x70, &0u32.to_le_bytes());
        let routes = r.router.routes.lock().unwrap().clone();
        let datas: Vec<u32> = routes.values().map(|m| m.data).collect();
        assert_eq!(datas, vec![0x60, 0x61, 0x62, 0x63]);
        assert_eq!(
            r.router.irqfds.lock().unwrap().get(&(gsis[0] + 1)),
            Some(&true)
        );
        // Nothing of the emulated capability reached the device.
        assert!(r.dev.config_writes.lock().unwrap().is_empty());
        // Disable: MSI off in VFIO, INTx back on.
        r.cfg_write(0x62, &0u16.to_le_bytes());
        let en = r.dev.enabled.lock().unwrap();
        assert!(!en.contains_key(&MSI_IRQ));
        assert_eq!(en.get(&INTX_IRQ), Some(&1));
    }

    #[test]
    fn teardown_releases_everything_and_resets() {
        let mut r = rig(true);
        decode(&mut r, COMMAND_MEMORY);
        let Rig {
            dev, mapper, pci, ..
        } = r;
        assert!(!mapper.maps.lock().unwrap().is_empty());
        drop(pci);
        assert!(mapper.maps.lock().unwrap().is_empty());
        assert!(dev.enabled.lock().unwrap().is_empty());
        assert_eq!(*dev.resets.lock().unwrap(), 2);
    }

    /// What VFIO has enabled, as the fake records it.
    fn vfio_irqs(r: &Rig) -> Vec<u32> {
        r.dev.enabled.lock().unwrap().keys().copied().collect()
    }

    /// GSIs whose irqfd is attached in the fake router.
    fn attached(r: &Rig) -> Vec<u32> {
        let v = r.router.irqfds.lock().unwrap();
        v.iter().filter(|(_, &on)| on).map(|(&g, _)| g).collect()
    }

    /// MSI (4 vectors, all unmasked) programmed and enabled by the guest.
    fn enable_msi(r: &mut Rig) {
        r.cfg_write(0x64, &0xfee0_0000u32.to_le_bytes());
        r.cfg_write(0x6c, &0x60u32.to_le_bytes());
        let ctrl = (1u16 << 8) | (1 << 7) | (2 << 1) | (2 << 4) | 1;
        r.cfg_write(0x62, &ctrl.to_le_bytes());
    }

    fn disable_msi(r: &mut Rig) {
        r.cfg_write(0x62, &0u16.to_le_bytes());
    }

    /// MSI-X enabled with entry 0 programmed and unmasked.
    fn enable_msix(r: &mut Rig) {
        decode(r, COMMAND_MEMORY);
        r.pci.write_bar(0, 0x10000, &0xfee0_0000u32.to_le_bytes());
        r.pci.write_bar(0, 0x10008, &0x70u32.to_le_bytes());
        r.pci.write_bar(0, 0x1000c, &0u32.to_le_bytes());
        r.cfg_write(0x7a, &0x8004u16.to_le_bytes());
    }

    fn msix_enabled_bit(r: &mut Rig) -> bool {
        cfg_read(&mut r.pci, 0x78) & (1 << 31) != 0
    }

    fn msi_enabled_bit(r: &mut Rig) -> bool {
        cfg_read(&mut r.pci, 0x60) & (1 << 16) != 0
    }

    #[test]
    fn msix_enable_while_msi_is_on_is_refused_and_msi_off_brings_intx_back() {
        let mut r = rig(true);
        enable_msi(&mut r);
        assert_eq!(vfio_irqs(&r), vec![MSI_IRQ]);
        let msi_gsis = attached(&r);
        assert_eq!(msi_gsis.len(), 4);
        // The guest enables MSI-X on top: refused, the capability says so, nothing of
        // MSI-X is routed, MSI keeps working.
        enable_msix(&mut r);
        assert_eq!(vfio_irqs(&r), vec![MSI_IRQ]);
        assert!(
            !msix_enabled_bit(&mut r),
            "a refused MSI-X enable reads back disabled"
        );
        assert!(msi_enabled_bit(&mut r));
        assert_eq!(attached(&r), msi_gsis, "no MSI-X vector attached");
        assert_eq!(r.pci.guest_errors(guest_error::IRQ_CONFLICT), 1);
        // MSI off: INTx back (not disabled in the command register), MSI vectors detached.
        disable_msi(&mut r);
        assert_eq!(vfio_irqs(&r), vec![INTX_IRQ]);
        assert_eq!(attached(&r), vec![17]);
        // Now MSI-X can be enabled.
        r.cfg_write(0x7a, &0x0004u16.to_le_bytes());
        r.cfg_write(0x7a, &0x8004u16.to_le_bytes());
        assert_eq!(vfio_irqs(&r), vec![MSIX_IRQ]);
        assert!(msix_enabled_bit(&mut r));
        assert_eq!(attached(&r).len(), 1, "MSI-X entry 0 only");
    }

    #[test]
    fn msi_enable_while_msix_is_on_is_refused_and_msi_off_leaves_msix_alone() {
        let mut r = rig(true);
        enable_msix(&mut r);
        assert_eq!(vfio_irqs(&r), vec![MSIX_IRQ]);
        let msix_gsis = attached(&r);
        assert_eq!(msix_gsis.len(), 1);
        enable_msi(&mut r);
        assert_eq!(vfio_irqs(&r), vec![MSIX_IRQ]);
        assert!(
            !msi_enabled_bit(&mut r),
            "a refused MSI enable reads back disabled"
        );
        assert_eq!(attached(&r), msix_gsis, "no MSI vector attached");
        // Disabling MSI must not bring INTx back while MSI-X is on.
        disable_msi(&mut r);
        assert_eq!(vfio_irqs(&r), vec![MSIX_IRQ]);
        assert_eq!(attached(&r), msix_gsis);
        assert!(msix_enabled_bit(&mut r));
        assert_eq!(r.pci.irq_mode(), IrqMode::Msix);
    }

    #[test]
    fn an_enable_vfio_refuses_reads_back_disabled_and_intx_stays() {
        let mut r = rig(true);
        r.dev.refuse.lock().unwrap().insert(MSIX_IRQ);
        enable_msix(&mut r);
        assert_eq!(vfio_irqs(&r), vec![INTX_IRQ], "INTx kept");
        assert!(!msix_enabled_bit(&mut r));
        assert_eq!(attached(&r), vec![17], "no MSI-X vector attached");
        assert_eq!(r.pci.irq_mode(), IrqMode::Intx);
        assert_eq!(r.pci.guest_errors(guest_error::IRQ_REFUSED), 1);
        // MSI refused too, from INTx: INTx again.
        r.dev.refuse.lock().unwrap().insert(MSI_IRQ);
        enable_msi(&mut r);
        assert_eq!(vfio_irqs(&r), vec![INTX_IRQ]);
        assert!(!msi_enabled_bit(&mut r));
        assert_eq!(attached(&r), vec![17]);
        // Accepted later: MSI on, INTx off.
        r.dev.refuse.lock().unwrap().clear();
        enable_msi(&mut r);
        assert_eq!(vfio_irqs(&r), vec![MSI_IRQ]);
        assert_eq!(attached(&r).len(), 4);
    }

    #[test]
    fn intx_comes_back_only_when_not_disabled_in_the_command_register() {
        let mut r = rig(false);
        assert_eq!(vfio_irqs(&r), vec![INTX_IRQ]);
        // Linux: INTx Disable set, then MSI enabled; at shutdown MSI off first.
        r.cfg_write(0x04, &COMMAND_INTX_DISABLE.to_le_bytes());
        assert!(vfio_irqs(&r).is_empty(), "INTx off once disabled");
        assert!(attached(&r).is_empty());
        enable_msi(&mut r);
        assert_eq!(vfio_irqs(&r), vec![MSI_IRQ]);
        disable_msi(&mut r);
        assert!(vfio_irqs(&r).is_empty(), "INTx Disable still set: no INTx");
        assert!(attached(&r).is_empty());
        r.cfg_write(0x04, &0u16.to_le_bytes());
        assert_eq!(vfio_irqs(&r), vec![INTX_IRQ]);
        assert_eq!(attached(&r), vec![17]);
    }

    #[test]
    fn bar_accesses_the_device_would_fail_are_answered_here() {
        let mut r = rig_with(true, true);
        let mut d = [0u8; 4];
        // Memory decoding off (after reset): BAR0 registers, the MSI-X table, BAR4, I/O.
        r.pci.read_bar(0, 0x100, &mut d);
        assert_eq!(d, [0xff; 4]);
        r.pci.write_bar(0, 0x100, &[1; 4]);
        r.pci.read_bar(4, 0, &mut d);
        r.pci.read_bar(2, 0, &mut d);
        r.pci.write_bar(2, 0, &[1; 4]);
        r.pci.read_bar(0, 0x10000, &mut d);
        assert_eq!(d, [0xff; 4], "the MSI-X table does not decode either");
        assert!(
            r.dev.bad_accesses.lock().unwrap().is_empty(),
            "{:?}",
            r.dev.bad_accesses
        );
        assert!(r.dev.bar_writes.lock().unwrap().is_empty());
        assert_eq!(r.pci.guest_errors(guest_error::NO_DECODE), 6);
        // Memory on, I/O still off.
        decode(&mut r, COMMAND_MEMORY);
        r.pci.read_bar(2, 0, &mut d);
        assert_eq!(d, [0xff; 4]);
        r.pci.read_bar(0, 0x100, &mut d);
        assert_eq!(d, [0, 1, 2, 3]);
        // The ROM: 24 KiB in a 32 KiB BAR; beyond the region and wrapping offsets.
        let rom = cfg_read(&mut r.pci, 0x30);
        r.cfg_write(0x30, &(rom | 1).to_le_bytes());
        assert_eq!(r.routed.get(&ROM_BAR), Some(&u64::from(rom)));
        r.pci.read_bar(ROM_BAR, 0x5ffc, &mut d);
        assert_eq!(d, [0xfc, 0xfd, 0xfe, 0xff]);
        r.pci.read_bar(ROM_BAR, 0x5ffe, &mut d);
        assert_eq!(d, [0xff; 4]);
        r.pci.read_bar(ROM_BAR, u64::MAX - 1, &mut d);
        r.pci.read_bar(0, u64::MAX - 1, &mut d);
        // A BAR index the device does not have.
        r.pci.read_bar(1, 0, &mut d);
        r.pci.write_bar(5, 0, &[0; 4]);
        assert!(
            r.dev.bad_accesses.lock().unwrap().is_empty(),
            "{:?}",
            r.dev.bad_accesses
        );
        assert_eq!(r.pci.guest_errors(guest_error::OUT_OF_RANGE), 3);
        // D3hot: nothing decodes.
        r.cfg_write(PM_CAP + 4, &3u16.to_le_bytes());
        r.pci.read_bar(0, 0x100, &mut d);
        assert_eq!(d, [0xff; 4]);
        assert!(
            r.dev.bad_accesses.lock().unwrap().is_empty(),
            "{:?}",
            r.dev.bad_accesses
        );
    }

    #[test]
    fn a_flood_of_undecoded_accesses_logs_a_few_lines() {
        let mut r = rig(true);
        let mut d = [0u8; 4];
        for _ in 0..100_000 {
            r.pci.read_bar(0, 0x100, &mut d);
        }
        // All counted in the rate-limited log; none reached vfio-ioctls, which would log
        // each one.
        assert_eq!(r.pci.guest_errors(guest_error::NO_DECODE), 100_000);
        assert!(r.dev.bad_accesses.lock().unwrap().is_empty());
    }

    fn maps(r: &Rig) -> Vec<(u64, u64)> {
        r.mapper.maps.lock().unwrap().values().copied().collect()
    }

    #[test]
    fn bars_are_mapped_only_while_the_device_decodes_memory() {
        let mut r = rig(true);
        assert!(maps(&r).is_empty());
        decode(&mut r, COMMAND_MEMORY);
        let on = maps(&r);
        assert_eq!(on.len(), 4);
        // Memory Space Enable cleared: the KVM slots go, accesses are trapped and answered.
        decode(&mut r, COMMAND_IO);
        assert!(maps(&r).is_empty());
        let mut d = [0u8; 4];
        r.pci.read_bar(0, 0x2000, &mut d);
        assert_eq!(d, [0xff; 4]);
        assert!(r.dev.bad_accesses.lock().unwrap().is_empty());
        decode(&mut r, COMMAND_MEMORY);
        assert_eq!(maps(&r), on);
        // Slots went before the device stopped decoding and came after it started again.
        assert!(
            r.mapper.late.lock().unwrap().is_empty(),
            "{:?}",
            r.mapper.late
        );
        // D3hot and back.
        r.cfg_write(PM_CAP + 4, &3u16.to_le_bytes());
        assert!(maps(&r).is_empty());
        r.cfg_write(PM_CAP + 4, &0u16.to_le_bytes());
        assert_eq!(maps(&r), on);
        // A BAR moved while decoding is off is mapped at its new place once it is on.
        decode(&mut r, 0);
        r.cfg_write(0x10, &[0xff; 4]);
        r.cfg_write(0x10, &0xd000_0000u32.to_le_bytes());
        assert!(maps(&r).is_empty(), "nothing mapped while decoding is off");
        assert!(!r.routed.contains_key(&0), "nor routed");
        decode(&mut r, COMMAND_MEMORY);
        assert!(
            maps(&r).contains(&(0xd000_0000, 0x10000)),
            "{:x?}",
            maps(&r)
        );
        assert_eq!(maps(&r).len(), 4);
        assert!(
            r.mapper.late.lock().unwrap().is_empty(),
            "{:?}",
            r.mapper.late
        );
    }

    #[test]
    fn a_faulting_mapping_is_dropped_and_the_bars_trapped() {
        let mut r = rig(true);
        decode(&mut r, COMMAND_MEMORY);
        let on = maps(&r);
        // Not this device's address: not its fault.
        assert!(!r.pci.mapping_fault(Some(0x1000)));
        // Decoding as far as the device knows and no address: not its fault either.
        assert!(!r.pci.mapping_fault(None));
        assert_eq!(maps(&r), on);
        // The device stopped decoding behind the vmm's back (a reset it did not see).
        r.dev.config.lock().unwrap()[4] = 0;
        assert!(r.pci.mapping_fault(None));
        assert!(maps(&r).is_empty());
        assert_eq!(r.pci.guest_errors(guest_error::MAPPING_FAULT), 1);
        // The retried access is trapped and not forwarded to a device that would fail it.
        let mut d = [0u8; 4];
        r.pci.read_bar(4, 0x10, &mut d);
        assert_eq!(d, [0xff; 4]);
        assert!(r.dev.bad_accesses.lock().unwrap().is_empty());
        // Nothing left to drop: a second fault is not this device's.
        assert!(!r.pci.mapping_fault(None));
        // The guest turns decoding on again: mapped again.
        decode(&mut r, COMMAND_MEMORY);
        assert_eq!(maps(&r), on);
        // With KVM's address of the fault.
        assert!(r.pci.mapping_fault(Some(on[0].0 + 8)));
        assert!(maps(&r).is_empty());
        // Decoding on as far as the device knows: trapped but forwarded until the guest
        // turns decoding off and on.
        r.pci.read_bar(0, 0x100, &mut d);
        assert_eq!(d, [0, 1, 2, 3]);
        decode(&mut r, 0);
        decode(&mut r, COMMAND_MEMORY);
        assert_eq!(maps(&r), on);
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
