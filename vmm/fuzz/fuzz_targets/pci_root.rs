//! `cargo fuzz` target: the PCI root driven by guest configuration accesses through
//! 0xCF8/0xCFC and ECAM, with the fixed devices of a VM on its buses, two fake devices with
//! BARs of every kind and a real virtio-pci transport (fake ioeventfd registry).
//!
//! After every operation the bus invariants hold:
//! - no two ranges on a bus overlap, and the fixed devices (0xCF8, ECAM, serial, i8042,
//!   CMOS, ACPI PM) are all still there;
//! - every other range is one the root mapped, for a BAR whose device decodes it now (its
//!   command bit on, its register holding that address, not being sized), inside the PCI
//!   windows and off guest RAM, ECAM, the IOAPIC and the LAPIC;
//! - each device was told exactly where its BARs are routed, and the transport's
//!   registered doorbells are exactly those of its routed BARs.
//!
//! Input: operations `[op, a, b]`, then the bytes they write. `op & 7`:
//! - 0: select a register at 0xCF8: device `a % 6`, register `b` (dword), enable bit set
//!   unless `op >> 3 & 1`
//! - 1: write `1 << (op >> 3 & 3)` bytes (1, 2, 4; clipped at the dword) at 0xCFC +
//!   `op >> 5 & 3`
//! - 2: read 0xCFC the same way
//! - 3: write through ECAM: device `a % 6`, register `b`, sizes as op 1
//! - 4: read through ECAM
//! - 5: write BAR register `4 + b % 6` of device `a % 6` with an interesting address
//!   (`op >> 3`: the fixed ports, ECAM, RAM, another BAR's address, window edges, all ones)
//! - 6: write the command register of device `a % 6`: `b & 7`; with `op >> 3` all ones, the
//!   guest ejects slot `a % 6` instead (`PciRoot::remove`) and the device is added back
//! - 7: an access of `1 << (op >> 3 & 3)` bytes at a BAR the root mapped (`a` picks it,
//!   `b` the offset), a write when `op >> 5 & 1`
#![no_main]

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm::bus::{Bus, BusDevice};
use vmm::interrupt::fake::FakeRouter;
use vmm::layout;
use vmm::pci::{
    BarKind, BarMapError, BarRange, ConfigSpace, PciConfigIo, PciConfigMmio, PciDevice, PciRoot,
    PciWindows, COMMAND_IO, COMMAND_MEMORY,
};
use vmm::virtio::pci::{Doorbell, IoEvents, VirtioPciDevice, PIO_BAR_INDEX};
use vmm::virtio::{Activation, VirtioDevice};
use vmm_sys_util::eventfd::EventFd;

const MEMORY: u64 = 512 << 20;
/// The slot of a device that left the bus for good (no slot has this number).
const NO_SLOT: u8 = 0xff;
const QUEUES: usize = 2;

/// A device with the BARs it is given, recording where the root routes them.
struct FakeDev {
    config: ConfigSpace,
    routed: BTreeMap<usize, u64>,
}

impl PciDevice for FakeDev {
    fn read_config(&mut self, reg: usize) -> u32 {
        self.config.read(reg)
    }
    fn write_config(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.config.write(reg, offset, data)
    }
    fn bars(&self) -> Vec<BarRange> {
        self.config.bars()
    }
    fn read_bar(&mut self, index: usize, _offset: u64, data: &mut [u8]) {
        assert!(
            self.routed.contains_key(&index),
            "access to unrouted BAR {index}"
        );
        data.fill(index as u8);
    }
    fn write_bar(&mut self, index: usize, _offset: u64, _data: &[u8]) {
        assert!(
            self.routed.contains_key(&index),
            "access to unrouted BAR {index}"
        );
    }
    fn bar_mapping(&mut self, index: usize, at: Option<u64>) -> Result<(), BarMapError> {
        match at {
            Some(a) => assert!(self.routed.insert(index, a) != Some(a), "routed twice"),
            None => assert!(self.routed.remove(&index).is_some(), "unrouted twice"),
        }
        Ok(())
    }
}

fn fake(bars: &[(usize, BarKind, u64, u64)]) -> FakeDev {
    let mut config = ConfigSpace::new(0x1234, 0x5678, 0xff_00_00, 0);
    for &(index, kind, addr, size) in bars {
        config.add_bar(BarRange {
            index,
            kind,
            addr,
            size,
            prefetchable: kind == BarKind::Mem64,
        });
    }
    FakeDev {
        config,
        routed: BTreeMap::new(),
    }
}

struct Blk;

impl VirtioDevice for Blk {
    fn device_type(&self) -> u16 {
        2
    }
    fn pci_class(&self) -> u32 {
        0x01_80_00
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![64; QUEUES]
    }
    fn features(&self) -> u64 {
        1 << 32
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(&mut self, _a: Activation) -> io::Result<()> {
        Ok(())
    }
    fn reset(&mut self) {}
}

/// KVM's ioeventfds as the transport registers them: a doorbell twice is refused.
#[derive(Default)]
struct Registry(Mutex<BTreeMap<Doorbell, i32>>);

impl IoEvents for Registry {
    fn register(&self, fd: &EventFd, at: Doorbell) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let mut m = self.0.lock().unwrap();
        if m.contains_key(&at) {
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        m.insert(at, fd.as_raw_fd());
        Ok(())
    }
    fn unregister(&self, _fd: &EventFd, at: Doorbell) -> io::Result<()> {
        match self.0.lock().unwrap().remove(&at) {
            Some(_) => Ok(()),
            None => Err(io::Error::from_raw_os_error(libc::ENOENT)),
        }
    }
}

/// A fixed device of the platform.
struct Fixed;

impl BusDevice for Fixed {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xee);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// (bus is PIO, base, length, name)
const FIXED: [(bool, u64, u64, &str); 6] = [
    (true, 0xcf8, 8, "pci-config"),
    (true, 0x3f8, 8, "serial"),
    (true, 0x60, 5, "i8042"),
    (true, 0x70, 2, "cmos"),
    (true, 0x600, 2, "acpi-pm"),
    (false, layout::PCI_ECAM_START, 1 << 20, "pci-ecam"),
];

/// Addresses worth writing to a BAR.
fn interesting(k: u8, others: &[u64]) -> u64 {
    const FIXED_ADDRS: [u64; 20] = [
        0xcf8,
        0xcfc,
        0x3f8,
        0x60,
        0x70,
        0x600,
        0,
        0xffff_ffff,
        0x10_0000,
        0xbfff_f000,
        layout::MMIO32_START,
        layout::PCI_ECAM_START - 0x1_0000,
        layout::PCI_ECAM_START,
        layout::IOAPIC_START,
        layout::APIC_START,
        0xc000,
        0xfffc,
        0x1_0000_0000,
        0x1_0000_0000 + (64 << 30) - 0x1_0000,
        0xffff_ffff_ffff_fff0,
    ];
    let k = usize::from(k);
    if k < FIXED_ADDRS.len() {
        FIXED_ADDRS[k]
    } else if others.is_empty() {
        0
    } else {
        others[(k - FIXED_ADDRS.len()) % others.len()]
    }
}

struct Rig {
    root: Arc<Mutex<PciRoot>>,
    mmio: Arc<Bus>,
    pio: Arc<Bus>,
    cf8: PciConfigIo,
    ecam: PciConfigMmio,
    /// Slot number, device.
    devs: Vec<(u8, Arc<Mutex<dyn PciDevice>>)>,
    fakes: Vec<(u8, Arc<Mutex<FakeDev>>)>,
    virtio: (u8, Arc<Mutex<VirtioPciDevice>>),
    registry: Arc<Registry>,
}

fn rig() -> Rig {
    let mmio = Arc::new(Bus::new());
    let pio = Arc::new(Bus::new());
    for (is_pio, base, len, name) in FIXED {
        let bus = if is_pio { &pio } else { &mmio };
        bus.insert(name, Arc::new(Mutex::new(Fixed)), base, len)
            .unwrap();
    }
    let root = Arc::new(Mutex::new(PciRoot::new(
        mmio.clone(),
        pio.clone(),
        PciWindows::for_guest(MEMORY),
    )));
    let mut devs: Vec<(u8, Arc<Mutex<dyn PciDevice>>)> = Vec::new();
    let mut fakes = Vec::new();
    for bars in [
        &[
            (0, BarKind::Mem32, 0xc000_0000, 0x1000),
            (1, BarKind::Io, 0xc000, 0x20),
        ][..],
        &[
            (0, BarKind::Mem64, 0x1_0000_0000, 0x10_0000),
            (2, BarKind::Io, 0xc020, 4),
            (3, BarKind::Mem32, 0xc010_0000, 0x10),
        ][..],
    ] {
        let d = Arc::new(Mutex::new(fake(bars)));
        let slot = root.lock().unwrap().add("fake", d.clone()).unwrap();
        devs.push((slot, d.clone()));
        fakes.push((slot, d));
    }
    let registry = Arc::new(Registry::default());
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
    let virtio = Arc::new(Mutex::new(
        VirtioPciDevice::new(
            "virtio",
            Box::new(Blk),
            (0xc020_0000, 0xc040),
            GuestMemoryAtomic::new(mem),
            Arc::new(FakeRouter::default()),
            registry.clone(),
        )
        .unwrap(),
    ));
    let vslot = root.lock().unwrap().add("virtio", virtio.clone()).unwrap();
    devs.push((vslot, virtio.clone()));
    Rig {
        cf8: PciConfigIo::new(root.clone()),
        ecam: PciConfigMmio::new(root.clone()),
        root,
        mmio,
        pio,
        devs,
        fakes,
        virtio: (vslot, virtio),
        registry,
    }
}

/// Whether `[base, base + len)` overlaps a range where no BAR may decode.
fn forbidden(kind: BarKind, base: u64, len: u64) -> bool {
    let end = base + len;
    if kind == BarKind::Io {
        // The host bridge's I/O window (the DSDT's _CRS): from 0xD00, after the config
        // ports; below are the legacy devices.
        return base < layout::PCI_IO_WINDOW_START || end > layout::PCI_IO_END;
    }
    let (w64, s64) = layout::mmio64_window(MEMORY);
    let in32 = base >= layout::MMIO32_START && end <= layout::MMIO32_START + layout::MMIO32_SIZE;
    let in64 = base >= w64 && end <= w64 + s64;
    !(in32 || in64) || base < MEMORY
}

impl Rig {
    fn check(&self) {
        let mapped = self.root.lock().unwrap().mapped();
        for (is_pio, bus) in [(true, &self.pio), (false, &self.mmio)] {
            let ranges = bus.ranges();
            for w in ranges.windows(2) {
                assert!(w[0].0 + w[0].1 <= w[1].0, "overlap: {w:x?}");
            }
            for (p, base, len, name) in FIXED {
                if p == is_pio {
                    assert!(
                        ranges.contains(&(base, len, name.to_string())),
                        "{name} taken off its bus"
                    );
                }
            }
            for (base, len, name) in &ranges {
                if FIXED.iter().any(|f| f.3 == name) {
                    continue;
                }
                let m = mapped
                    .iter()
                    .find(|m| (m.kind == BarKind::Io) == is_pio && m.base == *base)
                    .unwrap_or_else(|| panic!("{name} at {base:#x} is not the root's"));
                assert_eq!(m.size, *len);
                assert!(
                    !forbidden(m.kind, m.base, m.size),
                    "{m:x?} on a forbidden range"
                );
            }
        }
        for m in &mapped {
            let (_, dev) = self.devs.iter().find(|(s, _)| *s == m.slot).unwrap();
            let mut d = dev.lock().unwrap();
            let command = d.read_config(1) as u16;
            let bit = if m.kind == BarKind::Io {
                COMMAND_IO
            } else {
                COMMAND_MEMORY
            };
            assert_ne!(command & bit, 0, "{m:x?} mapped with decode off");
            let b = d.bars().into_iter().find(|b| b.index == m.index).unwrap();
            assert_eq!((b.addr, b.size, b.kind), (m.base, m.size, m.kind));
            assert!(!b.is_sizing());
        }
        // Each device knows exactly where its BARs are routed.
        for (slot, f) in &self.fakes {
            let want: BTreeMap<usize, u64> = mapped
                .iter()
                .filter(|m| m.slot == *slot)
                .map(|m| (m.index, m.base))
                .collect();
            assert_eq!(f.lock().unwrap().routed, want);
        }
        let (vslot, _) = self.virtio;
        let mut want: Vec<Doorbell> = Vec::new();
        for m in mapped.iter().filter(|m| m.slot == vslot) {
            for q in 0..QUEUES as u64 {
                want.push(match m.index {
                    PIO_BAR_INDEX => Doorbell::Pio {
                        port: m.base,
                        queue: q as u16,
                    },
                    _ => Doorbell::Mmio(m.base + 0x3000 + 4 * q),
                });
            }
        }
        want.sort();
        let got: Vec<Doorbell> = self.registry.0.lock().unwrap().keys().copied().collect();
        assert_eq!(
            got, want,
            "doorbells registered differ from the routed BARs"
        );
    }
}

fn size_of(op: u8) -> usize {
    1 << (op >> 3 & 3).min(2)
}

fuzz_target!(|data: &[u8]| {
    let mut r = rig();
    r.check();
    let mut i = 0;
    while i + 3 <= data.len() {
        let (op, a, b) = (data[i], data[i + 1], data[i + 2]);
        i += 3;
        let dev = u32::from(a % 6);
        match op & 7 {
            0 => {
                let enable = if op >> 3 & 1 == 0 { 0x8000_0000 } else { 0 };
                let addr = enable | dev << 11 | u32::from(b) << 2;
                r.cf8.write(0, &addr.to_le_bytes());
            }
            1 | 3 => {
                let off = u64::from(op >> 5 & 3);
                let n = size_of(op).min(4 - off as usize).min(data.len() - i);
                let bytes = &data[i..i + n];
                i += n;
                if op & 7 == 1 {
                    r.cf8.write(4 + off, bytes);
                } else {
                    let at = u64::from(dev) << 15 | u64::from(b) << 2 | off;
                    r.ecam.write(at, bytes);
                }
            }
            2 | 4 => {
                let off = u64::from(op >> 5 & 3);
                let mut buf = [0u8; 4];
                let n = size_of(op);
                if op & 7 == 2 {
                    r.cf8.read(4 + off, &mut buf[..n]);
                } else {
                    let at = u64::from(dev) << 15 | u64::from(b) << 2 | off;
                    r.ecam.read(at, &mut buf[..n]);
                }
            }
            5 => {
                let others: Vec<u64> = r
                    .root
                    .lock()
                    .unwrap()
                    .mapped()
                    .iter()
                    .flat_map(|m| [m.base, m.base >> 32])
                    .collect();
                let v = interesting(op >> 3, &others);
                let reg = 4 + u64::from(b % 6);
                r.ecam
                    .write(u64::from(dev) << 15 | reg << 2, &(v as u32).to_le_bytes());
                if op >> 7 & 1 == 1 {
                    // And the high dword, as a 64-bit relocation does.
                    let hi = ((v >> 32) as u32).to_le_bytes();
                    r.ecam.write(u64::from(dev) << 15 | (reg + 1) << 2, &hi);
                }
            }
            6 if op >> 3 == 0x1f => {
                // The guest ejects slot `dev` (its _EJ0): the device leaves the bus with
                // nothing of it routed or registered, and comes back (a hot-add) in the
                // first free slot.
                let slot = dev as u8;
                let taken = r.root.lock().unwrap().remove(slot);
                if let Some((name, d)) = taken {
                    assert!(r.root.lock().unwrap().mapped().iter().all(|m| m.slot != slot));
                    for (s, f) in &r.fakes {
                        if *s == slot {
                            assert!(f.lock().unwrap().routed.is_empty(), "still routed");
                        }
                    }
                    if r.virtio.0 == slot {
                        assert!(
                            r.registry.0.lock().unwrap().is_empty(),
                            "doorbells left registered"
                        );
                    }
                    // Its BARs are where the guest left them: the root refuses to add it
                    // back when one of them cannot decode there (nothing of it mapped).
                    // The vmm never re-adds a device object; a hot-add is a new device.
                    let added = r.root.lock().unwrap().add(&name, d);
                    let new = added.unwrap_or(NO_SLOT);
                    for (s, _) in r.devs.iter_mut() {
                        if *s == slot {
                            *s = new;
                        }
                    }
                    for (s, _) in r.fakes.iter_mut() {
                        if *s == slot {
                            *s = new;
                        }
                    }
                    if r.virtio.0 == slot {
                        r.virtio.0 = new;
                    }
                }
            }
            6 => {
                r.ecam
                    .write(u64::from(dev) << 15 | 4, &u16::from(b & 7).to_le_bytes());
            }
            _ => {
                let mapped = r.root.lock().unwrap().mapped();
                if !mapped.is_empty() {
                    let m = mapped[usize::from(a) % mapped.len()];
                    let n = size_of(op);
                    let at = m.base + (u64::from(b) % m.size.max(1)).min(m.size - 1);
                    let bus = if m.kind == BarKind::Io {
                        &r.pio
                    } else {
                        &r.mmio
                    };
                    let mut buf = [0u8; 4];
                    if op >> 5 & 1 == 1 {
                        bus.write(at, &buf[..n]);
                    } else {
                        bus.read(at, &mut buf[..n]);
                    }
                }
            }
        }
        r.check();
    }
    // Teardown leaves nothing of the devices on the buses or in the registry.
    let taken = r.root.lock().unwrap().take_devices();
    drop(taken);
    assert!(r.root.lock().unwrap().mapped().is_empty());
    assert!(
        r.registry.0.lock().unwrap().is_empty(),
        "doorbells left registered"
    );
    for (_, f) in &r.fakes {
        assert!(f.lock().unwrap().routed.is_empty());
    }
    let names: Vec<String> = r
        .pio
        .ranges()
        .into_iter()
        .chain(r.mmio.ranges())
        .map(|x| x.2)
        .collect();
    assert_eq!(names.len(), FIXED.len(), "left on the buses: {names:?}");
});
