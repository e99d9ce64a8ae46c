//! Fakes of what an assigned device talks to, for unit tests and fuzz targets: a VFIO
//! device that behaves like vfio-pci where a guest can tell ([`FakeDev`]), a hypervisor
//! that maps BARs into the guest ([`FakeMapper`]), and a [`Rig`] that assigns an
//! e1000e-like function with all of them (the router is [`FakeRouter`]).
//!
//! What [`FakeDev`] models from vfio-pci: one interrupt kind enabled at a time (enabling
//! another fails with EINVAL), the command register's decode bits and the power state
//! (a BAR access while the device decodes nothing fails, as it does in vfio-pci, which is
//! where vfio-ioctls would log: [`FakeDev::bad_accesses`] counts such calls), and region
//! bounds.
//!
//! [`Rig::write_config`] writes as the vmm's PCI root does: the write, then the root's
//! reconciliation, which routes a BAR ([`PciDevice::bar_mapping`]) at the address its
//! register holds while the command register's bit for its kind is on, and unroutes it
//! otherwise. The model leaves out what only the root cares about (the PCI windows, ranges
//! taken by other devices): the device maps exactly where and when it is routed.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use crate::device::{DmaGate, GuestMapper, PassthroughPci, Placement};
use crate::interrupt::fake::FakeRouter;
use crate::pci::{BarKind, BarMapError, PciDevice, COMMAND_IO, COMMAND_MEMORY};
use crate::vfio::{Mapping, RegionInfo, Vfio, CONFIG_REGION, ROM_REGION};

pub const MB: u64 = 1 << 20;

/// Capability offsets of [`config`].
pub const PM_CAP: usize = 0x40;
pub const VPD_CAP: usize = 0x50;
pub const MSI_CAP: usize = 0x60;
pub const MSIX_CAP: usize = 0x78;
pub const PCIE_CAP: usize = 0xa0;

/// A VFIO device made of a config space and region sizes, recording what it is asked.
pub struct FakeDev {
    pub config: Mutex<Vec<u8>>,
    pub regions: BTreeMap<u32, RegionInfo>,
    pub irqs: [u32; 3],
    /// Interrupt kind -> vectors enabled.
    pub enabled: Mutex<BTreeMap<u32, usize>>,
    /// Interrupt kinds whose enabling fails (as when the host runs out of vectors).
    pub refuse: Mutex<BTreeSet<u32>>,
    pub unmask_fd: Mutex<bool>,
    pub config_writes: Mutex<Vec<(u64, Vec<u8>)>>,
    pub bar_writes: Mutex<Vec<(u32, u64, Vec<u8>)>>,
    /// Region accesses vfio-pci would fail (decode off, D3hot, out of bounds, read-only).
    pub bad_accesses: Mutex<Vec<String>>,
    pub resets: Mutex<u32>,
}

/// Command register bits the fake keeps (what vfio-pci lets a user drive).
const COMMAND_BITS: u16 = 0x0407;

impl FakeDev {
    fn u16_at(&self, off: usize) -> u16 {
        let c = self.config.lock().unwrap();
        u16::from_le_bytes([c[off], c[off + 1]])
    }

    /// The command register as the device has it.
    pub fn command(&self) -> u16 {
        self.u16_at(4)
    }

    /// The device is in D3hot (PMCSR power state 3).
    pub fn d3(&self) -> bool {
        self.u16_at(PM_CAP + 4) & 3 == 3
    }

    /// Whether region `index` is an I/O BAR (from the device's own BAR register).
    fn is_io(&self, index: u32) -> bool {
        index < 6 && {
            let c = self.config.lock().unwrap();
            c[0x10 + index as usize * 4] & 1 != 0
        }
    }

    /// Whether vfio-pci would serve this access; records it when not.
    fn check(&self, index: u32, offset: u64, len: usize, write: bool) -> bool {
        let info = self.region(index);
        let decode = if self.is_io(index) {
            self.command() & 1 != 0
        } else {
            self.command() & 2 != 0 && !self.d3()
        };
        let why = if info.size == 0 {
            Some("no such region")
        } else if offset.checked_add(len as u64).is_none_or(|e| e > info.size) {
            Some("out of bounds")
        } else if write && !info.writable {
            Some("read-only")
        } else if !decode {
            Some("not decoding")
        } else {
            None
        };
        if let Some(why) = why {
            self.bad_accesses.lock().unwrap().push(format!(
                "region {index} {} {offset:#x}+{len}: {why}",
                if write { "write" } else { "read" }
            ));
            return false;
        }
        true
    }
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
        } else if self.check(index, offset, data.len(), false) {
            // BAR contents: the low byte of the offset, to see forwarding.
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(i as u8);
            }
        } else {
            data.fill(0xff);
        }
    }
    fn write(&self, index: u32, offset: u64, data: &[u8]) {
        if index == CONFIG_REGION {
            self.config_writes
                .lock()
                .unwrap()
                .push((offset, data.to_vec()));
            // The command register's decode bits and the PM power state take effect.
            let mut c = self.config.lock().unwrap();
            for (k, b) in data.iter().enumerate() {
                let at = offset as usize + k;
                let mask = match at {
                    4 => COMMAND_BITS as u8,
                    5 => (COMMAND_BITS >> 8) as u8,
                    a if a == PM_CAP + 4 => 3,
                    _ => 0,
                };
                if let Some(x) = c.get_mut(at) {
                    *x = (*x & !mask) | (b & mask);
                }
            }
        } else if self.check(index, offset, data.len(), true) {
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
        if e.keys().any(|&k| k != index) || self.refuse.lock().unwrap().contains(&index) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        if fds.is_empty() || fds.len() > self.irq_count(index) as usize {
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

/// A hypervisor's memory slots for BAR mappings.
#[derive(Default)]
pub struct FakeMapper {
    pub next: Mutex<u32>,
    /// handle -> (guest address, size)
    pub maps: Mutex<BTreeMap<u32, (u64, u64)>>,
    /// Mapping below this guest address fails (as KVM does over an existing slot).
    pub refuse_below: Mutex<u64>,
    /// The device whose BARs are mapped: a slot mapped, or still there, while it decodes
    /// no memory is a window in which a guest access faults in KVM_RUN (`late`).
    pub device: Mutex<Option<Arc<FakeDev>>>,
    /// Slots mapped or unmapped while the device did not decode memory.
    pub late: Mutex<Vec<String>>,
}

impl FakeMapper {
    fn watch(&self, what: &str, gpa: u64) {
        if let Some(d) = self.device.lock().unwrap().as_ref() {
            if d.command() & 2 == 0 || d.d3() {
                self.late.lock().unwrap().push(format!(
                    "{what} {gpa:#x} while the device decodes no memory"
                ));
            }
        }
    }
}

impl GuestMapper for FakeMapper {
    fn map(&self, gpa: u64, size: u64, _host: *mut u8) -> io::Result<u32> {
        if gpa < *self.refuse_below.lock().unwrap() {
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        self.watch("mapped", gpa);
        let mut n = self.next.lock().unwrap();
        *n += 1;
        self.maps.lock().unwrap().insert(*n, (gpa, size));
        Ok(*n)
    }
    fn unmap(&self, handle: u32) -> io::Result<()> {
        let (gpa, _) = self
            .maps
            .lock()
            .unwrap()
            .remove(&handle)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        self.watch("unmapped", gpa);
        Ok(())
    }
}

fn put(c: &mut [u8], off: usize, v: &[u8]) {
    c[off..off + v.len()].copy_from_slice(v);
}

/// An e1000e-like function: BAR0 128 KiB with the MSI-X table at 0x10000 and the PBA
/// at 0x18000 (an NVMe-like layout: the table shares a BAR with registers), BAR2 I/O,
/// BAR4/5 a 64-bit prefetchable 1 MiB BAR; capabilities PM, VPD (hidden), MSI (64-bit,
/// per-vector masks, 4 vectors), MSI-X (5 vectors), PCIe; INTx pin A; multifunction.
pub fn config(with_msix: bool) -> Vec<u8> {
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
    c[0x34] = PM_CAP as u8;
    c[0x3d] = 1;
    put(&mut c, PM_CAP, &[0x01, VPD_CAP as u8, 0x03, 0x00]);
    // VPD: must be hidden.
    put(&mut c, VPD_CAP, &[0x03, MSI_CAP as u8, 0, 0]);
    // MSI: 64-bit, per-vector masking, 4 vectors capable.
    let msi_ctrl: u16 = (1 << 8) | (1 << 7) | (2 << 1);
    let after_msi = if with_msix { MSIX_CAP } else { PCIE_CAP };
    put(&mut c, MSI_CAP, &[0x05, after_msi as u8]);
    put(&mut c, MSI_CAP + 2, &msi_ctrl.to_le_bytes());
    if with_msix {
        put(&mut c, MSIX_CAP, &[0x11, PCIE_CAP as u8]);
        put(&mut c, MSIX_CAP + 2, &4u16.to_le_bytes());
        put(&mut c, MSIX_CAP + 4, &0x10000u32.to_le_bytes());
        put(&mut c, MSIX_CAP + 8, &0x18000u32.to_le_bytes());
    }
    put(&mut c, PCIE_CAP, &[0x10, 0x00, 0x02, 0x00]);
    c
}

/// The device of [`config`] with its regions: BAR0 128 KiB, BAR2 32 bytes of I/O, BAR4
/// 1 MiB, a 24 KiB ROM.
pub fn fake_dev(with_msix: bool) -> Arc<FakeDev> {
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
        ROM_REGION,
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
        refuse: Mutex::new(BTreeSet::new()),
        unmask_fd: Mutex::new(false),
        config_writes: Mutex::new(Vec::new()),
        bar_writes: Mutex::new(Vec::new()),
        bad_accesses: Mutex::new(Vec::new()),
        resets: Mutex::new(0),
    })
}

/// An assigned [`fake_dev`] and the fakes it talks to.
pub struct Rig {
    pub dev: Arc<FakeDev>,
    pub router: Arc<FakeRouter>,
    pub mapper: Arc<FakeMapper>,
    pub pci: PassthroughPci,
    /// Where the root routes each BAR now (BAR index -> address).
    pub routed: BTreeMap<usize, u64>,
    /// What the device reported from `bar_mapping` (the root logs these, rate-limited).
    pub map_errors: Vec<BarMapError>,
}

impl Rig {
    /// A guest configuration write through the root: the device's write, then the root's
    /// reconciliation.
    pub fn write_config(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.pci.write_config(reg, offset, data);
        self.reconcile();
    }

    /// [`Rig::write_config`] at config byte `off`.
    pub fn cfg_write(&mut self, off: usize, data: &[u8]) {
        self.write_config(off / 4, (off % 4) as u64, data);
    }

    /// The root's reconciliation: unroutes what moved or stopped decoding, then routes what
    /// decodes (as `vmm::pci`'s `reconcile`, without its windows and occupancy checks).
    pub fn reconcile(&mut self) {
        let command = self.pci.read_config(1) as u16;
        let want: BTreeMap<usize, u64> = self
            .pci
            .bars()
            .into_iter()
            .filter(|b| {
                let bit = match b.kind {
                    BarKind::Io => COMMAND_IO,
                    _ => COMMAND_MEMORY,
                };
                command & bit != 0 && b.addr != 0 && b.size != 0 && !b.is_sizing()
            })
            .map(|b| (b.index, b.addr))
            .collect();
        let stale: Vec<usize> = self
            .routed
            .iter()
            .filter(|&(i, a)| want.get(i) != Some(a))
            .map(|(&i, _)| i)
            .collect();
        for index in stale {
            self.routed.remove(&index);
            if let Err(e) = self.pci.bar_mapping(index, None) {
                self.map_errors.push(e);
            }
        }
        for (index, addr) in want {
            if self.routed.insert(index, addr).is_none() {
                if let Err(e) = self.pci.bar_mapping(index, Some(addr)) {
                    self.map_errors.push(e);
                }
            }
        }
    }
}

/// Assigns [`fake_dev`]`(with_msix)`: memory BARs from 0xc000_0000, I/O from 0xc000, INTx
/// on GSI 17, the ROM shown if `rom`, Bus Master Enable behind `dma`.
pub fn rig(with_msix: bool, rom: bool, dma: Option<Arc<DmaGate>>) -> Rig {
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
            dma,
        },
    )
    .expect("the fake device is assigned");
    *mapper.device.lock().unwrap() = Some(dev.clone());
    Rig {
        dev,
        router,
        mapper,
        pci,
        routed: BTreeMap::new(),
        map_errors: Vec::new(),
    }
}
