//! PCI root complex: bus 0 behind configuration mechanism #1 (0xCF8/0xCFC) and ECAM, BARs
//! placed in the PCI windows and followed when the guest moves them, and MSI-X.
//!
//! What a BAR decodes is decided here, as on real hardware: a BAR decodes at the address its
//! register holds while the command register's I/O or Memory Space bit for its kind is on.
//! The root keeps, per slot, the ranges it actually mapped on the buses and, after every
//! configuration write, reconciles them with what the device says is programmed: it unmaps
//! what moved or lost decode, maps what is valid and free, and tells the device
//! ([`PciDevice::bar_mapping`]) so that it moves or drops its ioeventfds and KVM slots. A BAR
//! that cannot be mapped (outside the PCI windows, on RAM, the IOAPIC, ECAM, another range)
//! decodes nothing; its register still reads what the guest wrote, and it is mapped as soon
//! as its range becomes valid and free. The root removes only ranges it mapped itself (the
//! bus checks the owner), so a guest cannot take 0xCF8, ECAM or a legacy device off a bus.

pub mod msix;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};

use backends::ratelimit::GuestErrorLog;

use crate::bus::{Bus, BusDevice, BusError};
use crate::layout;

pub use passthrough::pci::{
    BarKind, BarMapError, BarRange, ConfigSpace, PciDevice, COMMAND_IO, COMMAND_MEMORY,
    PCI_CONFIG_DWORDS,
};

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

    fn write_config(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.config.write(reg, offset, data);
    }
}

/// Why a BAR decodes nothing although the guest programmed it and switched decoding on.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("it overlaps {0}")]
    Platform(&'static str),
    #[error("it is outside the PCI windows")]
    OutsideWindows,
    #[error(transparent)]
    Occupied(BusError),
}

#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error("no free slot on PCI bus 0 (31 devices at most)")]
    NoSlot,
    #[error("cannot map BAR {index} of '{name}' at {addr:#x}+{size:#x}")]
    Bar {
        name: String,
        index: usize,
        addr: u64,
        size: u64,
        #[source]
        why: Refused,
    },
}

/// Where BARs may decode: the windows the firmware tables give the guest's PCI root bridge,
/// and the platform ranges a refusal names (what a BAR outside the windows landed on).
#[derive(Clone, Debug)]
pub struct PciWindows {
    /// Memory windows, [start, end).
    mem: Vec<(u64, u64)>,
    /// Port windows, [start, end).
    io: Vec<(u64, u64)>,
    /// Memory ranges BARs must stay off, named for the log: [start, end).
    mem_named: Vec<(u64, u64, &'static str)>,
    io_named: Vec<(u64, u64, &'static str)>,
}

impl PciWindows {
    /// The windows of a guest with `memory` bytes of RAM (see [`crate::layout`]): memory
    /// BARs in the 32-bit window below ECAM or in the 64-bit window above RAM, I/O BARs from
    /// 0xD00 to 0xFFFF: the upper I/O window the DSDT gives the host bridge (`_CRS`, as
    /// QEMU's and Cloud Hypervisor's). Below are the legacy ports (the in-kernel PIC and PIT,
    /// serial, i8042, CMOS, ACPI, 0xCF8): the lower window `_CRS` declares (0-0xCF7, the PC's
    /// ISA range behind the host bridge) holds them, and a BAR there is refused.
    pub fn for_guest(memory: u64) -> Self {
        let (start64, size64) = layout::mmio64_window(memory);
        let mut mem_named: Vec<(u64, u64, &'static str)> = layout::ram_ranges(memory)
            .iter()
            .map(|(a, len)| (a.0, a.0 + len, "guest RAM"))
            .collect();
        mem_named.extend([
            (
                layout::PCI_ECAM_START,
                layout::PCI_ECAM_START + layout::PCI_ECAM_SIZE,
                "the PCI ECAM",
            ),
            (
                layout::IOAPIC_START,
                layout::IOAPIC_START + 0x1000,
                "the IOAPIC",
            ),
            (
                layout::APIC_START,
                layout::APIC_START + 0x1000,
                "the local APIC",
            ),
        ]);
        PciWindows {
            mem: vec![
                (
                    layout::MMIO32_START,
                    layout::MMIO32_START + layout::MMIO32_SIZE,
                ),
                (start64, start64 + size64),
            ],
            io: vec![(layout::PCI_IO_WINDOW_START, layout::PCI_IO_END)],
            mem_named,
            io_named: vec![(0, layout::PCI_IO_WINDOW_START, "the legacy I/O ports")],
        }
    }

    /// Whether `b` may decode where it is programmed.
    fn check(&self, b: &BarRange) -> Result<(), Refused> {
        let (windows, named) = match b.kind {
            BarKind::Io => (&self.io, &self.io_named),
            _ => (&self.mem, &self.mem_named),
        };
        let end = b.end().ok_or(Refused::OutsideWindows)?;
        if let Some(&(_, _, what)) = named.iter().find(|&&(s, e, _)| b.addr < e && end > s) {
            return Err(Refused::Platform(what));
        }
        if windows.iter().any(|&(s, e)| b.addr >= s && end <= e) {
            Ok(())
        } else {
            Err(Refused::OutsideWindows)
        }
    }
}

/// A BAR range the root put on a bus.
struct Mapped {
    kind: BarKind,
    base: u64,
    size: u64,
    /// The bus entry's device: the key of an owner-checked removal.
    shim: Arc<Mutex<dyn BusDevice>>,
}

/// A BAR the root mapped, as [`PciRoot::mapped`] lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappedBar {
    pub slot: u8,
    pub index: usize,
    pub kind: BarKind,
    pub base: u64,
    pub size: u64,
}

struct Slot {
    name: String,
    dev: Arc<Mutex<dyn PciDevice>>,
    /// What the root mapped for each BAR index.
    mapped: BTreeMap<usize, Mapped>,
    /// BARs that should decode but could not be mapped: where, to log a refusal once per
    /// new address and to retry when a range is freed.
    refused: BTreeMap<usize, (u64, u64)>,
}

/// What one reconciliation did.
#[derive(Default)]
struct Reconciled {
    /// A range was taken off a bus: a refused BAR elsewhere may fit now.
    freed: bool,
    /// BARs newly refused (not refused at the same place before).
    refused: Vec<(BarRange, Refused)>,
    /// What a device could not register for a BAR it was given or lost.
    degraded: Vec<BarMapError>,
}

/// The BARs of `dev` that decode: programmed (not 0, not being sized) and with the command
/// register's bit for their kind on.
fn decoding(dev: &mut dyn PciDevice) -> BTreeMap<usize, BarRange> {
    let command = dev.read_config(1) as u16;
    dev.bars()
        .into_iter()
        .filter(|b| {
            let bit = match b.kind {
                BarKind::Io => COMMAND_IO,
                _ => COMMAND_MEMORY,
            };
            command & bit != 0 && b.addr != 0 && b.size != 0 && !b.is_sizing()
        })
        .map(|b| (b.index, b))
        .collect()
}

/// Brings `slot`'s bus ranges in line with what its device decodes.
fn reconcile(slot: &mut Slot, mmio: &Bus, pio: &Bus, windows: &PciWindows) -> Reconciled {
    let bus = |kind: BarKind| match kind {
        BarKind::Io => pio,
        _ => mmio,
    };
    let mut out = Reconciled::default();
    let mut dev = slot.dev.lock().unwrap_or_else(|p| p.into_inner());
    let want = decoding(&mut *dev);
    // Unmap what moved, changed or stopped decoding.
    let stale: Vec<usize> = slot
        .mapped
        .iter()
        .filter(|(i, m)| {
            want.get(i)
                .is_none_or(|b| (b.kind, b.addr, b.size) != (m.kind, m.base, m.size))
        })
        .map(|(i, _)| *i)
        .collect();
    for index in stale {
        let Some(m) = slot.mapped.remove(&index) else {
            continue;
        };
        bus(m.kind).remove(m.base, &m.shim);
        out.freed = true;
        if let Err(e) = dev.bar_mapping(index, None) {
            out.degraded.push(e);
        }
    }
    slot.refused.retain(|i, _| want.contains_key(i));
    // Map what decodes and is not mapped yet, where it is valid and free.
    for (&index, b) in &want {
        if slot.mapped.contains_key(&index) {
            continue;
        }
        let shim: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(BarShim {
            dev: Arc::downgrade(&slot.dev),
            index,
        }));
        let placed = windows.check(b).and_then(|()| {
            bus(b.kind)
                .insert(&slot.name, shim.clone(), b.addr, b.size)
                .map_err(Refused::Occupied)
        });
        if let Err(why) = placed {
            if slot.refused.insert(index, (b.addr, b.size)) != Some((b.addr, b.size)) {
                out.refused.push((*b, why));
            }
            continue;
        }
        slot.refused.remove(&index);
        slot.mapped.insert(
            index,
            Mapped {
                kind: b.kind,
                base: b.addr,
                size: b.size,
                shim,
            },
        );
        if let Err(e) = dev.bar_mapping(index, Some(b.addr)) {
            out.degraded.push(e);
        }
    }
    out
}

/// Bus 0: up to 32 single-function devices, their BARs on the MMIO and PIO buses.
/// Bus, device, function, register, write.
type TraceKey = (u8, u8, u8, usize, bool);

/// Kinds of the root's rate-limited guest-error log.
const LOG_REFUSED: usize = 0;
const LOG_DEGRADED: usize = 1;

pub struct PciRoot {
    devices: BTreeMap<u8, Slot>,
    mmio: Arc<Bus>,
    pio: Arc<Bus>,
    windows: PciWindows,
    faults: GuestErrorLog<2>,
    /// With debug logging: configuration accesses per (device, register, write), logged
    /// when the root goes away, to find what a guest driver polls.
    trace: Option<Mutex<BTreeMap<TraceKey, u64>>>,
}

impl PciRoot {
    pub fn new(mmio: Arc<Bus>, pio: Arc<Bus>, windows: PciWindows) -> Self {
        let mut devices = BTreeMap::new();
        let bridge: Arc<Mutex<dyn PciDevice>> = Arc::new(Mutex::new(HostBridge::default()));
        devices.insert(
            0,
            Slot {
                name: "host-bridge".into(),
                dev: bridge,
                mapped: BTreeMap::new(),
                refused: BTreeMap::new(),
            },
        );
        PciRoot {
            devices,
            mmio,
            pio,
            windows,
            faults: GuestErrorLog::new("pci"),
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
    /// As firmware does once it placed the BARs, decoding is switched on for the kinds of
    /// BAR the device has.
    pub fn add(&mut self, name: &str, dev: Arc<Mutex<dyn PciDevice>>) -> Result<u8, PciError> {
        let number = self.next_free_slot().ok_or(PciError::NoSlot)?;
        {
            let mut d = dev.lock().unwrap_or_else(|p| p.into_inner());
            let bars = d.bars();
            let old = d.read_config(1) as u16;
            let mut command = old;
            if bars.iter().any(|b| b.kind == BarKind::Io) {
                command |= COMMAND_IO;
            }
            if bars.iter().any(|b| b.kind != BarKind::Io) {
                command |= COMMAND_MEMORY;
            }
            if command != old {
                d.write_config(1, 0, &command.to_le_bytes());
            }
        }
        let mut slot = Slot {
            name: name.to_string(),
            dev,
            mapped: BTreeMap::new(),
            refused: BTreeMap::new(),
        };
        let done = reconcile(&mut slot, &self.mmio, &self.pio, &self.windows);
        if let Some((b, why)) = done.refused.into_iter().next() {
            self.unmap_all(&mut slot);
            return Err(PciError::Bar {
                name: name.to_string(),
                index: b.index,
                addr: b.addr,
                size: b.size,
                why,
            });
        }
        for e in done.degraded {
            log::warn!("pci: {name}: {e}: {}", e.source);
        }
        self.devices.insert(number, slot);
        Ok(number)
    }

    /// The slot [`PciRoot::add`] gives the next device.
    pub fn next_free_slot(&self) -> Option<u8> {
        (1..32u8).find(|s| !self.devices.contains_key(s))
    }

    /// Takes all of `slot`'s ranges off the buses and tells its device.
    fn unmap_all(&self, slot: &mut Slot) {
        let mut dev = slot.dev.lock().unwrap_or_else(|p| p.into_inner());
        for (index, m) in std::mem::take(&mut slot.mapped) {
            self.bus(m.kind).remove(m.base, &m.shim);
            let _ = dev.bar_mapping(index, None);
        }
        slot.refused.clear();
    }

    /// Reconciles slot `number` and, when that freed a range, every slot with a BAR waiting
    /// for room; logs (rate-limited) what it refused.
    fn reconcile_after_write(&mut self, number: u8) {
        let PciRoot {
            devices,
            mmio,
            pio,
            windows,
            faults,
            ..
        } = self;
        let Some(slot) = devices.get_mut(&number) else {
            return;
        };
        let done = reconcile(slot, mmio, pio, windows);
        let mut reports = vec![(slot.name.clone(), done.refused, done.degraded)];
        if done.freed {
            for (_, other) in devices
                .iter_mut()
                .filter(|(n, s)| **n != number && !s.refused.is_empty())
            {
                let d = reconcile(other, mmio, pio, windows);
                reports.push((other.name.clone(), d.refused, d.degraded));
            }
        }
        for (name, refused, degraded) in reports {
            for (b, why) in refused {
                faults.record(
                    LOG_REFUSED,
                    format_args!(
                        "{name}: BAR {} at {:#x}+{:#x} decodes nothing: {why}",
                        b.index, b.addr, b.size
                    ),
                );
            }
            for e in degraded {
                faults.record(LOG_DEGRADED, format_args!("{name}: {e}: {}", e.source));
            }
        }
    }

    /// Every BAR range the root mapped, by slot and index.
    pub fn mapped(&self) -> Vec<MappedBar> {
        self.devices
            .iter()
            .flat_map(|(&slot, s)| {
                s.mapped.iter().map(move |(&index, m)| MappedBar {
                    slot,
                    index,
                    kind: m.kind,
                    base: m.base,
                    size: m.size,
                })
            })
            .collect()
    }

    /// Guest errors the root counted: BARs refused, devices that could not follow a BAR.
    pub fn fault_counts(&self) -> (u64, u64) {
        (
            self.faults.count(LOG_REFUSED),
            self.faults.count(LOG_DEGRADED),
        )
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

    fn write(&mut self, bus: u8, dev: u8, func: u8, reg: usize, offset: u64, data: &[u8]) {
        self.count((bus, dev, func), reg, true);
        if bus != 0 || func != 0 {
            return;
        }
        let Some(s) = self.devices.get(&dev) else {
            return;
        };
        s.dev
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write_config(reg, offset, data);
        self.reconcile_after_write(dev);
    }
}

/// A configuration write that must wait before it is made ([`PciDevice::write_config_wait`]):
/// the device it is for and what to wait for.
type PendingWrite = (Arc<Mutex<dyn PciDevice>>, Box<dyn FnOnce() + Send>);

impl PciRoot {
    /// What a configuration write must wait for before [`PciRoot::write`] makes it, if
    /// anything: asked of the device under the root's lock, waited for without it.
    fn write_wait(
        &self,
        bus: u8,
        dev: u8,
        func: u8,
        reg: usize,
        offset: u64,
        data: &[u8],
    ) -> Option<PendingWrite> {
        if bus != 0 || func != 0 {
            return None;
        }
        let s = self.devices.get(&dev)?;
        let wait = s
            .dev
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write_config_wait(reg, offset, data)?;
        Some((s.dev.clone(), wait))
    }
}

/// A configuration write from a vCPU (through 0xCF8/0xCFC or ECAM). A write that must wait
/// (a Bus Master Enable while guest RAM is being mapped for DMA, seconds for a large guest)
/// waits with the root unlocked, so that the other vCPUs' configuration accesses and the
/// control API's hot-adds go on; it is then made if the same device is still in the slot
/// (a device removed meanwhile does not see it, and neither does one added in its place).
fn config_write(
    root: &Mutex<PciRoot>,
    (bus, dev, func, reg): (u8, u8, u8, usize),
    offset: u64,
    data: &[u8],
) {
    let mut r = root.lock().unwrap_or_else(|p| p.into_inner());
    let Some((device, wait)) = r.write_wait(bus, dev, func, reg, offset, data) else {
        r.write(bus, dev, func, reg, offset, data);
        return;
    };
    drop(r);
    wait();
    let mut r = root.lock().unwrap_or_else(|p| p.into_inner());
    if r.devices
        .get(&dev)
        .is_some_and(|s| Arc::ptr_eq(&s.dev, &device))
    {
        r.write(bus, dev, func, reg, offset, data);
    }
}

impl PciRoot {
    /// Takes the device in `slot` off the bus (its BARs off the buses, its slot free), for a
    /// guest's eject; the host bridge stays. A BAR of another device that was waiting for
    /// room is placed if it now fits.
    pub fn remove(&mut self, number: u8) -> Option<(String, Arc<Mutex<dyn PciDevice>>)> {
        if number == 0 {
            return None;
        }
        let mut slot = self.devices.remove(&number)?;
        self.unmap_all(&mut slot);
        let waiting: Vec<u8> = self
            .devices
            .iter()
            .filter(|(_, s)| !s.refused.is_empty())
            .map(|(&n, _)| n)
            .collect();
        for n in waiting {
            self.reconcile_after_write(n);
        }
        Some((slot.name, slot.dev))
    }

    /// `vm.pause` / `vm.resume` for every device; for a pause, each device's probe that says
    /// when its threads have finished what they held and parked.
    pub fn pause_all(&self, paused: bool) -> Vec<(String, Box<dyn Fn() -> bool + Send>)> {
        self.devices
            .values()
            .filter_map(|s| {
                let probe = s
                    .dev
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .pause(paused)?;
                Some((s.name.clone(), probe))
            })
            .collect()
    }

    /// Takes every device but the host bridge off the root, for the VM's teardown. The root
    /// and the buses refer to each other (the buses hold the configuration mechanisms,
    /// which hold the root), so dropping the VM's handle to the root frees nothing: the
    /// caller drops what this returns, and each device's Drop stops its threads, drains its
    /// I/O and releases what it holds (a vhost-user socket the vmm created, a VFIO group).
    pub fn take_devices(&mut self) -> Vec<(String, Arc<Mutex<dyn PciDevice>>)> {
        let slots: Vec<u8> = self.devices.keys().copied().filter(|&s| s != 0).collect();
        let mut out = Vec::new();
        for number in slots {
            if let Some(mut slot) = self.devices.remove(&number) {
                self.unmap_all(&mut slot);
                out.push((slot.name, slot.dev));
            }
        }
        out
    }

    /// With debug logging: the most accessed configuration registers.
    /// At exit: the count of every guest error whose latest occurrences were not logged
    /// (the root lives as long as the process: its log is never dropped).
    pub fn flush_fault_log(&mut self) {
        self.faults.flush();
    }

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
        if let Some(target) = self.target() {
            config_write(&self.root, target, offset - 4, data);
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
        config_write(&self.root, (b, d, f, r), o, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PciRoot {
        PciRoot::new(Arc::new(Bus::new()), Arc::new(Bus::new()), windows())
    }

    /// The windows of a 512 MiB guest: RAM below 0x2000_0000, the 64-bit window at 4 GiB.
    fn windows() -> PciWindows {
        PciWindows::for_guest(512 << 20)
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

    /// A device with the BARs it is given; BAR reads return its `id`, and it records
    /// what the root tells it about its BARs.
    struct BarDev {
        id: u8,
        config: ConfigSpace,
        hits: Vec<(usize, u64)>,
        /// Where the root routes each BAR (last told), and how often it was told.
        routed: BTreeMap<usize, Option<u64>>,
        told: usize,
    }

    impl PciDevice for BarDev {
        fn read_config(&mut self, reg: usize) -> u32 {
            self.config.read(reg)
        }
        fn write_config(&mut self, reg: usize, offset: u64, data: &[u8]) {
            self.config.write(reg, offset, data)
        }
        fn bars(&self) -> Vec<BarRange> {
            self.config.bars()
        }
        fn read_bar(&mut self, index: usize, offset: u64, data: &mut [u8]) {
            self.hits.push((index, offset));
            data.fill(self.id);
        }
        fn bar_mapping(&mut self, index: usize, at: Option<u64>) -> Result<(), BarMapError> {
            self.routed.insert(index, at);
            self.told += 1;
            Ok(())
        }
    }

    fn bar(index: usize, kind: BarKind, addr: u64, size: u64) -> BarRange {
        BarRange {
            index,
            kind,
            addr,
            size,
            prefetchable: kind == BarKind::Mem64,
        }
    }

    fn bar_dev(id: u8, bars: &[BarRange]) -> Arc<Mutex<BarDev>> {
        let mut config = ConfigSpace::new(0x1af4, 0x1042, 0x01_80_00, 0);
        for b in bars {
            config.add_bar(*b);
        }
        Arc::new(Mutex::new(BarDev {
            id,
            config,
            hits: vec![],
            routed: BTreeMap::new(),
            told: 0,
        }))
    }

    /// A fixed platform device (the config port, serial, ECAM): reads return 0xee.
    struct Fixed;

    impl BusDevice for Fixed {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(0xee);
        }
        fn write(&mut self, _offset: u64, _data: &[u8]) {}
    }

    /// A root on buses that already hold the fixed devices a VM has.
    struct Platform {
        root: PciRoot,
        mmio: Arc<Bus>,
        pio: Arc<Bus>,
    }

    fn platform() -> Platform {
        let mmio = Arc::new(Bus::new());
        let pio = Arc::new(Bus::new());
        let fixed = || Arc::new(Mutex::new(Fixed));
        pio.insert("pci-config", fixed(), 0xcf8, 8).unwrap();
        pio.insert("serial", fixed(), 0x3f8, 8).unwrap();
        mmio.insert("pci-ecam", fixed(), layout::PCI_ECAM_START, 1 << 20)
            .unwrap();
        let root = PciRoot::new(mmio.clone(), pio.clone(), windows());
        Platform { root, mmio, pio }
    }

    impl Platform {
        fn cfg_write(&mut self, slot: u8, reg: usize, v: u32) {
            self.root.write(0, slot, 0, reg, 0, &v.to_le_bytes());
        }
        fn command(&mut self, slot: u8, v: u16) {
            self.root.write(0, slot, 0, 1, 0, &v.to_le_bytes());
        }
        /// The byte a 1-byte read at `addr` returns (0xff: nothing there).
        fn mem(&self, addr: u64) -> u8 {
            let mut b = [0u8];
            self.mmio.read(addr, &mut b);
            b[0]
        }
        fn port(&self, addr: u64) -> u8 {
            let mut b = [0u8];
            self.pio.read(addr, &mut b);
            b[0]
        }
        /// Bus invariants: every range that is not a fixed device's is a mapping of the
        /// root, decoding at the address the device's BAR holds, with decode on.
        fn check(&self) {
            let mapped = self.root.mapped();
            for (bus, kind_io) in [(&self.mmio, false), (&self.pio, true)] {
                for (base, len, name) in bus.ranges() {
                    if ["pci-config", "serial", "pci-ecam"].contains(&name.as_str()) {
                        continue;
                    }
                    let m = mapped
                        .iter()
                        .find(|m| (m.kind == BarKind::Io) == kind_io && m.base == base)
                        .unwrap_or_else(|| panic!("{name} at {base:#x}: not the root's"));
                    assert_eq!(m.size, len);
                    let slot = &self.root.devices[&m.slot];
                    let mut d = slot.dev.lock().unwrap();
                    let b = decoding(&mut *d);
                    assert_eq!(b.get(&m.index).map(|b| b.addr), Some(base), "{name}");
                }
            }
            for (base, len, name) in [
                (0xcf8, 8, "pci-config"),
                (0x3f8, 8, "serial"),
                (layout::PCI_ECAM_START, 1 << 20, "pci-ecam"),
            ] {
                let bus = if base < 0x1_0000 {
                    &self.pio
                } else {
                    &self.mmio
                };
                assert!(
                    bus.ranges().contains(&(base, len, name.to_string())),
                    "{name} was taken off its bus"
                );
            }
        }
    }

    const A: u8 = 0xa1;
    const B: u8 = 0xb2;

    #[test]
    fn bar_sizing_and_relocation() {
        let mut p = platform();
        let dev = bar_dev(
            A,
            &[
                bar(0, BarKind::Mem64, 0x1_0000_0000, 0x4000),
                bar(2, BarKind::Io, 0xc000, 0x20),
            ],
        );
        let slot = p.root.add("bardev", dev.clone()).unwrap();
        // Decoding is on as firmware leaves it; flags: 64-bit prefetchable memory; I/O.
        assert_eq!(
            p.root.read(0, slot, 0, 1) as u16,
            COMMAND_IO | COMMAND_MEMORY
        );
        assert_eq!(p.root.read(0, slot, 0, 4) & 0xf, 0xc);
        assert_eq!(p.root.read(0, slot, 0, 5), 1);
        assert_eq!(p.root.read(0, slot, 0, 6) & 0x3, 0x1);
        assert_eq!(p.mem(0x1_0000_0010), A);
        // Sizing the 64-bit BAR as Linux does (decode off): the size reads back, and
        // restored, the BAR decodes where it was.
        p.command(slot, COMMAND_IO);
        assert_eq!(p.mem(0x1_0000_0010), 0xff);
        p.cfg_write(slot, 4, 0xffff_ffff);
        assert_eq!(p.root.read(0, slot, 0, 4), 0xffff_c00c);
        p.cfg_write(slot, 5, 0xffff_ffff);
        assert_eq!(p.root.read(0, slot, 0, 5), 0xffff_ffff);
        p.cfg_write(slot, 4, 0x0000_000c);
        p.cfg_write(slot, 5, 1);
        p.command(slot, COMMAND_IO | COMMAND_MEMORY);
        assert_eq!(p.mem(0x1_0000_0010), A);
        // The guest moves it below 4 GiB: the bus follows and the device is told.
        p.cfg_write(slot, 4, 0xc000_0000);
        p.cfg_write(slot, 5, 0);
        assert_eq!(dev.lock().unwrap().routed[&0], Some(0xc000_0000));
        assert_eq!(p.mem(0xc000_0008), A);
        assert_eq!(p.mem(0x1_0000_0010), 0xff);
        // The I/O BAR sizes to 0x20 and moves too.
        p.cfg_write(slot, 6, 0xffff_ffff);
        assert_eq!(p.root.read(0, slot, 0, 6), 0xffff_ffe1);
        p.cfg_write(slot, 6, 0x2000);
        assert_eq!(p.port(0x2004), A);
        assert!(dev.lock().unwrap().hits.contains(&(2, 4)));
        p.check();
        // Sizing with decode on is silent: nothing refused, nothing logged.
        assert_eq!(p.root.fault_counts(), (0, 0));
    }

    #[test]
    fn a_bar_moved_onto_the_config_port_takes_nothing_off_the_bus() {
        let mut p = platform();
        // Four ports, as virtio's doorbell BAR: it can sit exactly on 0xCF8.
        let dev = bar_dev(A, &[bar(2, BarKind::Io, 0xc000, 4)]);
        let slot = p.root.add("a", dev.clone()).unwrap();
        assert_eq!(p.port(0xc000), A);
        // Onto 0xCF8.
        p.cfg_write(slot, 6, 0xcf8);
        assert_eq!(p.port(0xcf8), 0xee, "the config port is gone");
        assert_eq!(p.port(0xc000), 0xff, "still decoding at the old address");
        // The register reads what the guest wrote; the device holds nothing anywhere.
        assert_eq!(p.root.read(0, slot, 0, 6), 0xcf9);
        assert_eq!(dev.lock().unwrap().routed[&2], None);
        // The next move must not remove what is at the refused address.
        p.cfg_write(slot, 6, 0xd000);
        assert_eq!(p.port(0xcf8), 0xee, "the config port is gone");
        assert_eq!(p.port(0xd000), A);
        // And onto the serial port, then away again.
        p.cfg_write(slot, 6, 0x3f8);
        p.cfg_write(slot, 6, 0xd100);
        assert_eq!(p.port(0x3f8), 0xee, "serial is gone");
        assert_eq!(p.port(0xd100), A);
        p.check();
        assert_eq!(p.root.fault_counts().0, 2);
    }

    #[test]
    fn io_bars_decode_in_the_upper_window_the_dsdt_declares_and_not_below() {
        let mut p = platform();
        let dev = bar_dev(A, &[bar(2, BarKind::Io, 0xc000, 4)]);
        let slot = p.root.add("a", dev.clone()).unwrap();
        // The window's first ports (0xD00, right after the config ports) are the device's.
        p.cfg_write(slot, 6, layout::PCI_IO_WINDOW_START as u32);
        assert_eq!(p.port(layout::PCI_IO_WINDOW_START), A);
        assert_eq!(p.root.fault_counts().0, 0);
        // Just below, in the ISA range the lower window holds: refused, logged.
        p.cfg_write(slot, 6, 0xcf0);
        assert_eq!(dev.lock().unwrap().routed[&2], None);
        assert_eq!(p.root.fault_counts().0, 1);
        p.check();
    }

    #[test]
    fn a_bar_moved_onto_another_bar_and_again_leaves_that_bar_alone() {
        let mut p = platform();
        let a = bar_dev(A, &[bar(0, BarKind::Mem32, 0xc000_0000, 0x1_0000)]);
        let b = bar_dev(B, &[bar(0, BarKind::Mem32, 0xc001_0000, 0x1_0000)]);
        let sa = p.root.add("a", a.clone()).unwrap();
        p.root.add("b", b.clone()).unwrap();
        p.cfg_write(sa, 4, 0xc001_0000);
        assert_eq!(p.mem(0xc001_0000), B);
        assert_eq!(p.mem(0xc000_0000), 0xff);
        assert_eq!(p.root.read(0, sa, 0, 4), 0xc001_0000);
        p.cfg_write(sa, 4, 0xc004_0000);
        assert_eq!(p.mem(0xc004_0000), A);
        assert_eq!(p.mem(0xc001_0000), B, "B's BAR was removed");
        assert_eq!(b.lock().unwrap().routed[&0], Some(0xc001_0000));
        p.check();
    }

    #[test]
    fn a_64bit_relocation_with_decode_off_passes_through_another_bar() {
        let mut p = platform();
        let a = bar_dev(A, &[bar(0, BarKind::Mem64, 0xc010_0000, 0x1_0000)]);
        let b = bar_dev(B, &[bar(2, BarKind::Mem32, 0xc000_0000, 0x1_0000)]);
        let sa = p.root.add("a", a.clone()).unwrap();
        p.root.add("b", b.clone()).unwrap();
        // Linux's pci_std_update_resource: decode off, low dword (the BAR now reads
        // 0x0_c000_0000: B's address), high dword, decode back on.
        p.command(sa, 0);
        assert_eq!(p.mem(0xc010_0000), 0xff, "decoding with Memory Space off");
        p.cfg_write(sa, 4, 0xc000_000c);
        assert_eq!(p.mem(0xc000_0000), B);
        p.cfg_write(sa, 5, 1);
        assert_eq!(p.mem(0x1_c000_0000), 0xff, "decoding with Memory Space off");
        p.command(sa, COMMAND_MEMORY);
        assert_eq!(p.mem(0x1_c000_0000), A);
        assert_eq!(p.mem(0xc000_0000), B, "B's BAR was removed");
        assert_eq!(p.mem(0xc010_0000), 0xff);
        // Passing through B with decode off is not a guest error.
        assert_eq!(p.root.fault_counts(), (0, 0));
        p.check();
    }

    #[test]
    fn decode_off_unmaps_and_decode_on_maps_where_the_bar_is_then() {
        let mut p = platform();
        let a = bar_dev(
            A,
            &[
                bar(0, BarKind::Mem64, 0xc000_0000, 0x1_0000),
                bar(2, BarKind::Io, 0xc000, 0x20),
            ],
        );
        let sa = p.root.add("a", a.clone()).unwrap();
        // Memory off: the memory BAR goes (and the device drops its registrations), the
        // I/O BAR stays.
        p.command(sa, COMMAND_IO);
        assert_eq!(p.mem(0xc000_0000), 0xff);
        assert_eq!(p.port(0xc000), A);
        assert_eq!(a.lock().unwrap().routed[&0], None);
        // Moved while off: nothing at the old or the new address.
        p.cfg_write(sa, 4, 0xc008_0000);
        assert_eq!(p.mem(0xc008_0000), 0xff);
        assert_eq!(p.mem(0xc000_0000), 0xff);
        // On: at the new address only.
        p.command(sa, COMMAND_IO | COMMAND_MEMORY);
        assert_eq!(p.mem(0xc008_0000), A);
        assert_eq!(a.lock().unwrap().routed[&0], Some(0xc008_0000));
        // All off; a command write that changes nothing tells the device nothing.
        p.command(sa, 0);
        assert!(p.root.mapped().is_empty());
        let told = a.lock().unwrap().told;
        p.command(sa, 0);
        assert_eq!(a.lock().unwrap().told, told);
        p.check();
    }

    #[test]
    fn a_refused_bar_decodes_once_its_place_is_valid_and_free() {
        let mut p = platform();
        let a = bar_dev(A, &[bar(0, BarKind::Mem32, 0xc000_0000, 0x1_0000)]);
        let b = bar_dev(B, &[bar(0, BarKind::Mem32, 0xc001_0000, 0x1_0000)]);
        let sa = p.root.add("a", a.clone()).unwrap();
        let sb = p.root.add("b", b.clone()).unwrap();
        // Onto B: refused. Then back to where it was: decodes there again.
        p.cfg_write(sa, 4, 0xc001_0000);
        assert_eq!(p.mem(0xc000_0000), 0xff);
        p.cfg_write(sa, 4, 0xc000_0000);
        assert_eq!(p.mem(0xc000_0000), A);
        assert_eq!(p.mem(0xc001_0000), B);
        // Onto B again; then B moves away: A decodes where it is programmed.
        p.cfg_write(sa, 4, 0xc001_0000);
        p.cfg_write(sb, 4, 0xc002_0000);
        assert_eq!(p.mem(0xc001_0000), A);
        assert_eq!(p.mem(0xc002_0000), B);
        assert_eq!(a.lock().unwrap().routed[&0], Some(0xc001_0000));
        p.check();
    }

    #[test]
    fn bars_on_ram_platform_ranges_or_the_window_edges_decode_nothing() {
        let mut p = platform();
        let a = bar_dev(A, &[bar(0, BarKind::Mem64, 0xc000_0000, 0x1_0000)]);
        let sa = p.root.add("a", a.clone()).unwrap();
        let places = [
            (0x10_0000, false),                  // guest RAM
            (0xbfff_0000, false),                // straddling nothing, but below the window
            (0xdfff_0000, true),                 // the last 64 KiB of the 32-bit window
            (layout::PCI_ECAM_START, false),     // ECAM
            (layout::IOAPIC_START, false),       // IOAPIC
            (layout::APIC_START, false),         // LAPIC
            (0xffff_0000, false),                // the top of 4 GiB, outside any window
            (0x1_0000_0000 + (64 << 30), false), // just past the 64-bit window
        ];
        for (i, &(addr, ok)) in places.iter().enumerate() {
            p.cfg_write(sa, 4, addr as u32 | 0xc);
            p.cfg_write(sa, 5, (addr >> 32) as u32);
            assert_eq!(p.mem(addr) == A, ok, "{i}: {addr:#x}");
            p.check();
        }
        // The ECAM device is still there.
        assert_eq!(p.mem(layout::PCI_ECAM_START), 0xee);
        // A storm of refused moves: counted, not unbounded in the log (GuestErrorLog).
        let before = p.root.fault_counts().0;
        for k in 0..2000u32 {
            p.cfg_write(sa, 4, 0x10_0000 + (k % 2) * 0x1_0000);
        }
        assert_eq!(p.root.fault_counts().0, before + 2000);
        p.check();
    }

    #[test]
    fn teardown_takes_the_root_s_ranges_off_the_buses() {
        let mut p = platform();
        let a = bar_dev(A, &[bar(0, BarKind::Mem32, 0xc000_0000, 0x1_0000)]);
        p.root.add("a", a.clone()).unwrap();
        assert_eq!(p.root.take_devices().len(), 1);
        assert_eq!(p.mem(0xc000_0000), 0xff);
        assert_eq!(a.lock().unwrap().routed[&0], None);
        p.check();
    }

    #[test]
    fn a_device_that_cannot_be_placed_is_not_added() {
        let mut p = platform();
        // Its BAR on guest RAM: refused at boot, nothing left on the buses.
        let a = bar_dev(
            A,
            &[
                bar(0, BarKind::Mem32, 0xc000_0000, 0x1_0000),
                bar(2, BarKind::Io, 0x3e0, 0x20),
            ],
        );
        let e = p.root.add("a", a.clone()).unwrap_err();
        assert!(matches!(e, PciError::Bar { index: 2, .. }), "{e}");
        assert!(p.root.mapped().is_empty());
        assert_eq!(p.mem(0xc000_0000), 0xff);
        p.check();
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

    /// A device whose Bus Master Enable waits on a [`passthrough::device::DmaGate`], as an
    /// assigned device's does while guest RAM is being mapped; `waiting` is set once its
    /// write is waiting.
    struct GatedDev {
        config: ConfigSpace,
        gate: Arc<passthrough::device::DmaGate>,
        waiting: Arc<std::sync::atomic::AtomicBool>,
    }

    impl PciDevice for GatedDev {
        fn read_config(&mut self, reg: usize) -> u32 {
            self.config.read(reg)
        }
        fn write_config(&mut self, reg: usize, offset: u64, data: &[u8]) {
            // A write the root did not wait for would block here, holding the root.
            if reg == 1 && data[0] & 4 != 0 {
                let _ = self.gate.wait();
            }
            self.config.write(reg, offset, data)
        }
        fn write_config_wait(
            &self,
            reg: usize,
            _offset: u64,
            data: &[u8],
        ) -> Option<Box<dyn FnOnce() + Send>> {
            if reg != 1 || data[0] & 4 == 0 || self.gate.is_done() {
                return None;
            }
            let (gate, waiting) = (self.gate.clone(), self.waiting.clone());
            Some(Box::new(move || {
                waiting.store(true, std::sync::atomic::Ordering::SeqCst);
                let _ = gate.wait();
            }))
        }
    }

    /// Rig: slot 1 a gated device, slot 2 an ordinary one; a vCPU thread writes Bus Master
    /// Enable to slot 1 through ECAM and is left waiting on the gate.
    #[allow(clippy::type_complexity)]
    fn bme_waiting() -> (
        Arc<Mutex<PciRoot>>,
        Arc<passthrough::device::DmaGate>,
        Arc<Mutex<dyn PciDevice>>,
        std::thread::JoinHandle<()>,
    ) {
        let root = Arc::new(Mutex::new(root()));
        let gate = passthrough::device::DmaGate::new();
        let waiting = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let gated: Arc<Mutex<dyn PciDevice>> = Arc::new(Mutex::new(GatedDev {
            config: ConfigSpace::new(0x8086, 0x10d3, 0x02_00_00, 0),
            gate: gate.clone(),
            waiting: waiting.clone(),
        }));
        assert_eq!(root.lock().unwrap().add("nic", gated.clone()).unwrap(), 1);
        assert_eq!(
            root.lock().unwrap().add("disk", bar_dev(2, &[])).unwrap(),
            2
        );
        let mut ecam = PciConfigMmio::new(root.clone());
        let vcpu = std::thread::spawn(move || ecam.write((1 << 15) | 4, &[0x06, 0]));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !waiting.load(std::sync::atomic::Ordering::SeqCst) {
            assert!(
                std::time::Instant::now() < deadline,
                "the write never waited"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        (root, gate, gated, vcpu)
    }

    /// Tries to lock `m` for up to 5 s: a root or device the waiting write holds fails the
    /// test instead of hanging it.
    fn lock_soon<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            if let Ok(g) = m.try_lock() {
                return g;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "still locked by the vCPU waiting for guest RAM's DMA mapping"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    #[test]
    fn a_bus_master_enable_waiting_for_dma_mapping_holds_neither_the_root_nor_its_device() {
        let (root, gate, gated, vcpu) = bme_waiting();
        // Another vCPU reads and writes configuration; the API hot-adds a device.
        let mut cf8 = PciConfigIo::new(root.clone());
        cf8.write(0, &(0x8000_0000u32 | (2 << 11)).to_le_bytes());
        let mut id = [0u8; 4];
        cf8.read(4, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x1042_1af4);
        cf8.write(0, &(0x8000_0000u32 | (2 << 11) | 4).to_le_bytes());
        cf8.write(4, &[0x02, 0]);
        assert_eq!(lock_soon(&root).add("hot", bar_dev(3, &[])).unwrap(), 3);
        // The device itself answers (its BARs, its other registers); Bus Master is not set.
        assert_eq!(lock_soon(&*gated).read_config(1) & 4, 0);
        assert!(!vcpu.is_finished());
        gate.finish(Ok(()));
        vcpu.join().unwrap();
        assert_eq!(lock_soon(&*gated).read_config(1) & 0x6, 0x6);
    }

    #[test]
    fn a_waiting_bus_master_enable_reaches_no_device_if_its_own_was_removed_meanwhile() {
        let (root, gate, gated, vcpu) = bme_waiting();
        let removed = lock_soon(&root).remove(1).map(|(n, _)| n);
        assert_eq!(removed.as_deref(), Some("nic"));
        // A device added in its place is not the one the guest wrote to.
        assert_eq!(lock_soon(&root).add("new", bar_dev(4, &[])).unwrap(), 1);
        gate.finish(Ok(()));
        vcpu.join().unwrap();
        assert_eq!(lock_soon(&*gated).read_config(1) & 0x6, 0);
        let new = lock_soon(&root).read(0, 1, 0, 1);
        assert_eq!(
            new & 0x6,
            0,
            "the write went to the device added in the slot"
        );
    }
}
