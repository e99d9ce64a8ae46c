//! The virtio-pci modern transport (virtio 1.2, section 4.1): common, notify, ISR and
//! device configuration in BAR 0, MSI-X, one KVM ioeventfd per queue notify address.
//!
//! Two notify capabilities: first a port I/O one (BAR 2, four ports, multiplier 0: every
//! queue's doorbell is a 16-bit write of its index to the same port, told apart by KVM's
//! datamatch), then the memory one in BAR 0. A driver takes the first it can use: Linux
//! takes the port. On AMD hosts (and nested: the lab) a write to an MMIO doorbell is a
//! nested page fault that KVM must decode and emulate, while an `out` exit carries its port,
//! size and next RIP: the port doorbell is the cheaper exit. A driver that wants memory
//! (the ring-3 probe guest) skips the port capability and uses BAR 0.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::EventFd;

use super::{
    Activation, ActiveQueue, DeviceShared, Irq, Memory, VirtioDevice, STATUS_DRIVER_OK,
    STATUS_FAILED, STATUS_FEATURES_OK, STATUS_NEEDS_RESET, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::interrupt::InterruptRouter;
use crate::pci::msix::Msix;
use crate::pci::{BarKind, BarMapError, BarRange, ConfigSpace, PciDevice};

/// Where a queue's doorbell rings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Doorbell {
    /// A write of any size to this guest physical address.
    Mmio(u64),
    /// A 16-bit write of `queue` to this I/O port.
    Pio { port: u64, queue: u16 },
}

/// Registers queue doorbells with the hypervisor; faked in unit tests.
pub trait IoEvents: Send + Sync {
    fn register(&self, fd: &EventFd, at: Doorbell) -> io::Result<()>;
    fn unregister(&self, fd: &EventFd, at: Doorbell) -> io::Result<()>;
}

/// KVM ioeventfds: MMIO addresses (any access size), or ports with a 16-bit datamatch.
pub struct KvmIoEvents(pub Arc<VmFd>);

impl IoEvents for KvmIoEvents {
    fn register(&self, fd: &EventFd, at: Doorbell) -> io::Result<()> {
        match at {
            Doorbell::Mmio(addr) => {
                self.0
                    .register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            }
            Doorbell::Pio { port, queue } => {
                self.0
                    .register_ioevent(fd, &IoEventAddress::Pio(port), queue)
            }
        }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }

    fn unregister(&self, fd: &EventFd, at: Doorbell) -> io::Result<()> {
        match at {
            Doorbell::Mmio(addr) => {
                self.0
                    .unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            }
            Doorbell::Pio { port, queue } => {
                self.0
                    .unregister_ioevent(fd, &IoEventAddress::Pio(port), queue)
            }
        }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}

// BAR 0 layout.
pub const BAR_SIZE: u64 = 0x1_0000;
const COMMON_OFFSET: u64 = 0x0000;
const COMMON_SIZE: u64 = 0x38;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_CFG_OFFSET: u64 = 0x2000;
const DEVICE_CFG_SIZE: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u32 = 4;
const NOTIFY_SIZE: u64 = 0x1000;
const MSIX_TABLE_OFFSET: u64 = 0x8000;
const MSIX_PBA_OFFSET: u64 = 0xc000;
/// The port I/O notify BAR: its index (BAR 0 is 64-bit and takes 0 and 1) and size.
pub const PIO_BAR_INDEX: usize = 2;
pub const PIO_BAR_SIZE: u64 = 4;

const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

// virtio_pci_cap cfg_type values.
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_PCI_CFG: u8 = 5;
const PCI_CAP_ID_VNDR: u8 = 0x09;
const PCI_CAP_ID_MSIX: u8 = 0x11;

#[derive(Clone, Copy)]
struct QueueRegs {
    max: u16,
    size: u16,
    ready: bool,
    vector: u16,
    desc: u64,
    avail: u64,
    used: u64,
}

impl QueueRegs {
    fn new(max: u16) -> Self {
        QueueRegs {
            max,
            size: max,
            ready: false,
            vector: VIRTIO_MSI_NO_VECTOR,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }
}

fn set_lo(v: &mut u64, lo: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(lo);
}

fn set_hi(v: &mut u64, hi: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(hi) << 32);
}

pub struct VirtioPciDevice {
    name: String,
    config: ConfigSpace,
    device: Box<dyn VirtioDevice>,
    msix: Msix,
    msix_cap: usize,
    pci_cfg_cap: usize,
    /// Where the PCI root routes BAR 0 and the port I/O notify BAR (its first port) now;
    /// `None` while a BAR decodes nothing.
    bar: Option<u64>,
    pio_bar: Option<u64>,
    ioevents: Arc<dyn IoEvents>,
    kicks: Vec<EventFd>,
    /// The doorbell ioeventfds registered now, with the queue each kicks.
    doorbells: BTreeMap<Doorbell, usize>,
    mem: Memory,
    // Common configuration.
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    msix_config: u16,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    queues: Vec<QueueRegs>,
    shared: Option<Arc<DeviceShared>>,
    /// `vm.pause` is on: a device activated meanwhile starts paused.
    paused: bool,
    /// The status before a reset the device has not finished (0: none pending).
    resetting: u8,
    /// Queue notifications that reached userspace (no ioeventfd caught them).
    notify_exits: Arc<AtomicU64>,
    faults: backends::ratelimit::GuestErrorLog<3>,
}

impl VirtioPciDevice {
    /// Wraps `device` with BAR 0 at `bar` (64 KiB, naturally aligned) and the port I/O
    /// notify BAR at port `pio_bar` ([`PIO_BAR_SIZE`] ports, naturally aligned). The
    /// doorbell ioeventfds are registered when the PCI root maps the BARs.
    pub fn new(
        name: &str,
        device: Box<dyn VirtioDevice>,
        (bar, pio_bar): (u64, u64),
        mem: Memory,
        router: Arc<dyn InterruptRouter>,
        ioevents: Arc<dyn IoEvents>,
    ) -> io::Result<Self> {
        let max_sizes = device.queue_max_sizes();
        let nq = max_sizes.len();
        let vectors = (nq + 1) as u16;
        let msix = Msix::new(vectors, router)?;
        let dev_id = 0x1040 + device.device_type();
        let mut config = ConfigSpace::new(0x1af4, dev_id, device.pci_class(), 0);
        // Revision 1 (modern only); subsystem vendor/ID.
        config.set(2, (device.pci_class() << 8) | 1, 0);
        config.set(11, (u32::from(dev_id) << 16) | 0x1af4, 0);
        config.add_bar(BarRange {
            index: 0,
            kind: BarKind::Mem64,
            addr: bar,
            size: BAR_SIZE,
            prefetchable: false,
        });
        config.add_bar(BarRange {
            index: PIO_BAR_INDEX,
            kind: BarKind::Io,
            addr: pio_bar,
            size: PIO_BAR_SIZE,
            prefetchable: false,
        });
        let cap = |cfg_type: u8, bar: u8, offset: u64, length: u64, extra: &[u8]| {
            let mut b = vec![
                PCI_CAP_ID_VNDR,
                0,
                (16 + extra.len()) as u8,
                cfg_type,
                bar,
                0,
                0,
                0,
            ];
            b.extend_from_slice(&(offset as u32).to_le_bytes());
            b.extend_from_slice(&(length as u32).to_le_bytes());
            b.extend_from_slice(extra);
            b
        };
        let vcap = |cfg_type: u8, offset: u64, length: u64, extra: &[u8]| {
            cap(cfg_type, 0, offset, length, extra)
        };
        // The port doorbell first: a driver takes the first notify capability it can use.
        config.add_capability(
            &cap(
                CAP_NOTIFY,
                PIO_BAR_INDEX as u8,
                0,
                PIO_BAR_SIZE,
                &0u32.to_le_bytes(),
            ),
            &[],
        );
        config.add_capability(&vcap(CAP_COMMON, COMMON_OFFSET, COMMON_SIZE, &[]), &[]);
        config.add_capability(
            &vcap(
                CAP_NOTIFY,
                NOTIFY_OFFSET,
                NOTIFY_SIZE,
                &NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
            &[],
        );
        config.add_capability(&vcap(CAP_ISR, ISR_OFFSET, 1, &[]), &[]);
        config.add_capability(
            &vcap(CAP_DEVICE, DEVICE_CFG_OFFSET, DEVICE_CFG_SIZE, &[]),
            &[],
        );
        // VIRTIO_PCI_CAP_PCI_CFG: a window into the BARs through config space. Writable:
        // bar (byte 4), offset, length, data.
        let pci_cfg_cap = config.add_capability(
            &vcap(CAP_PCI_CFG, 0, 0, &[0; 4]),
            &[0, 0x0000_00ff, 0xffff_ffff, 0xffff_ffff, 0xffff_ffff],
        );
        let mut msix_body = vec![PCI_CAP_ID_MSIX, 0];
        msix_body.extend_from_slice(&(vectors - 1).to_le_bytes());
        msix_body.extend_from_slice(&(MSIX_TABLE_OFFSET as u32).to_le_bytes());
        msix_body.extend_from_slice(&(MSIX_PBA_OFFSET as u32).to_le_bytes());
        let msix_cap = config.add_capability(&msix_body, &[0xc000_0000]);

        let kicks = (0..nq)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(VirtioPciDevice {
            name: name.to_string(),
            config,
            device,
            msix,
            msix_cap,
            pci_cfg_cap,
            bar: None,
            pio_bar: None,
            ioevents,
            kicks,
            doorbells: BTreeMap::new(),
            mem,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            msix_config: VIRTIO_MSI_NO_VECTOR,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues: max_sizes.into_iter().map(QueueRegs::new).collect(),
            shared: None,
            paused: false,
            resetting: 0,
            notify_exits: Arc::new(AtomicU64::new(0)),
            faults: backends::ratelimit::GuestErrorLog::new(name),
        })
    }

    pub fn notify_exits(&self) -> Arc<AtomicU64> {
        self.notify_exits.clone()
    }

    fn status(&mut self) -> u8 {
        if self.resetting != 0 {
            if self.device.reset_pending() {
                return self.resetting;
            }
            self.resetting = 0;
        }
        let reset = self.shared.as_ref().is_some_and(|s| s.needs_reset());
        self.status | if reset { STATUS_NEEDS_RESET } else { 0 }
    }

    fn vector_irq(&self, v: u16) -> Irq {
        if v == VIRTIO_MSI_NO_VECTOR {
            return Irq::default();
        }
        match self.msix.irqfd(v) {
            Some(Ok(fd)) => Irq::new(Some(fd)),
            _ => Irq::default(),
        }
    }

    fn reset(&mut self) {
        let old = self.status();
        self.device.reset();
        if self.device.reset_pending() {
            self.resetting = old;
        }
        self.shared = None;
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.msix_config = VIRTIO_MSI_NO_VECTOR;
        self.queue_select = 0;
        for q in &mut self.queues {
            *q = QueueRegs::new(q.max);
        }
        // Drop notifications that arrived before the reset.
        for k in &self.kicks {
            let _ = k.read();
        }
    }

    fn fault(&mut self, what: &'static str, detail: String) {
        let kind = match what {
            "invalid queue" => 0,
            "features refused" => 1,
            _ => 2,
        };
        self.faults.record(kind, format_args!("{what}: {detail}"));
    }

    fn activate(&mut self) {
        let acked = self.driver_features;
        let mut queues = Vec::new();
        let mem = self.mem.memory();
        for (i, r) in self.queues.iter().enumerate() {
            if !r.ready {
                continue;
            }
            let mut q = match Queue::new(r.max) {
                Ok(q) => q,
                Err(e) => {
                    log::error!("{}: queue {i}: {e:?}", self.name);
                    continue;
                }
            };
            q.set_size(r.size);
            q.set_desc_table_address(Some(r.desc as u32), Some((r.desc >> 32) as u32));
            q.set_avail_ring_address(Some(r.avail as u32), Some((r.avail >> 32) as u32));
            q.set_used_ring_address(Some(r.used as u32), Some((r.used >> 32) as u32));
            q.set_event_idx(acked & VIRTIO_RING_F_EVENT_IDX != 0);
            q.set_ready(true);
            // virtio-queue keeps its old value (0) for a size or a ring address it refuses
            // (misaligned): compare, so that such a queue is refused, not moved to 0.
            let taken = q.size() == r.size
                && q.desc_table() == r.desc
                && q.avail_ring() == r.avail
                && q.used_ring() == r.used;
            if !taken || !q.is_valid(&*mem) {
                let detail = format!(
                    "queue {i}: size {} (max {}), rings at {:#x}/{:#x}/{:#x} are not usable",
                    r.size, r.max, r.desc, r.avail, r.used
                );
                self.fault("invalid queue", detail);
                let shared = Arc::new(DeviceShared::new(self.vector_irq(self.msix_config)));
                shared.set_needs_reset();
                self.shared = Some(shared);
                return;
            }
            let kick = match self.kicks[i].try_clone() {
                Ok(k) => k,
                Err(e) => {
                    log::error!("{}: cannot duplicate the notify eventfd: {e}", self.name);
                    return;
                }
            };
            queues.push(ActiveQueue {
                index: i as u16,
                queue: q,
                kick,
                irq: self.vector_irq(r.vector),
            });
        }
        let shared = Arc::new(DeviceShared::new(self.vector_irq(self.msix_config)));
        shared.pause.set(self.paused);
        self.shared = Some(shared.clone());
        let activation = Activation {
            mem: self.mem.clone(),
            acked_features: acked,
            queues,
            shared: shared.clone(),
        };
        if let Err(e) = self.device.activate(activation) {
            log::error!("{}: cannot start the device: {e}", self.name);
            shared.set_needs_reset();
        }
    }

    fn write_status(&mut self, v: u8) {
        if v == 0 {
            self.reset();
            return;
        }
        // A driver that goes on without waiting for the reset sees its own writes.
        self.resetting = 0;
        let mut v = v;
        if v & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let offered = self.device.features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                let detail = format!(
                    "driver features {:#x} not a subset of {offered:#x} with VERSION_1",
                    self.driver_features
                );
                self.fault("features refused", detail);
                v &= !STATUS_FEATURES_OK;
            }
        }
        let activate = v & STATUS_DRIVER_OK != 0
            && self.status & STATUS_DRIVER_OK == 0
            && v & STATUS_FEATURES_OK != 0
            && v & STATUS_FAILED == 0;
        self.status = v;
        if activate {
            self.activate();
        }
    }

    fn read_common(&mut self, offset: u64, data: &mut [u8]) {
        let q = self.queues.get(usize::from(self.queue_select)).copied();
        let features = self.device.features();
        let v: u64 = match offset {
            0x00 => u64::from(self.device_feature_select),
            0x04 => match self.device_feature_select {
                0 => features & 0xffff_ffff,
                1 => features >> 32,
                _ => 0,
            },
            0x08 => u64::from(self.driver_feature_select),
            0x0c => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(self.msix_config),
            0x12 => self.queues.len() as u64,
            0x14 => u64::from(self.status()),
            0x15 => u64::from(self.config_generation),
            0x16 => u64::from(self.queue_select),
            0x18 => q.map_or(0, |q| u64::from(q.size)),
            0x1a => q.map_or(u64::from(VIRTIO_MSI_NO_VECTOR), |q| u64::from(q.vector)),
            0x1c => q.map_or(0, |q| u64::from(q.ready)),
            0x1e => u64::from(self.queue_select),
            0x20 => q.map_or(0, |q| q.desc & 0xffff_ffff),
            0x24 => q.map_or(0, |q| q.desc >> 32),
            0x28 => q.map_or(0, |q| q.avail & 0xffff_ffff),
            0x2c => q.map_or(0, |q| q.avail >> 32),
            0x30 => q.map_or(0, |q| q.used & 0xffff_ffff),
            0x34 => q.map_or(0, |q| q.used >> 32),
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let mut b = [0u8; 8];
        let n = data.len().min(8);
        b[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(b);
        let (v32, v16) = (v as u32, v as u16);
        let qs = usize::from(self.queue_select);
        // Queue registers are frozen once the queue is enabled, and the device's
        // configuration once DRIVER_OK is set (except status).
        let running = self.status & STATUS_DRIVER_OK != 0;
        match offset {
            0x00 => self.device_feature_select = v32,
            0x08 => self.driver_feature_select = v32,
            0x0c if self.status & STATUS_FEATURES_OK == 0 => match self.driver_feature_select {
                0 => set_lo(&mut self.driver_features, v32),
                1 => set_hi(&mut self.driver_features, v32),
                _ => {}
            },
            0x10 => {
                self.msix_config = if v16 < self.msix.count() {
                    v16
                } else {
                    VIRTIO_MSI_NO_VECTOR
                }
            }
            0x14 => self.write_status(v as u8),
            0x16 => self.queue_select = v16,
            _ if running => {
                self.fault("write after DRIVER_OK", format!("offset {offset:#x}"));
            }
            _ => {
                let count = self.msix.count();
                let Some(q) = self.queues.get_mut(qs) else {
                    return;
                };
                if q.ready && offset != 0x1c {
                    return;
                }
                match offset {
                    0x18 => q.size = v16,
                    0x1a => {
                        q.vector = if v16 < count {
                            v16
                        } else {
                            VIRTIO_MSI_NO_VECTOR
                        }
                    }
                    0x1c => q.ready = v16 == 1,
                    0x20 => set_lo(&mut q.desc, v32),
                    0x24 => set_hi(&mut q.desc, v32),
                    0x28 => set_lo(&mut q.avail, v32),
                    0x2c => set_hi(&mut q.avail, v32),
                    0x30 => set_lo(&mut q.used, v32),
                    0x34 => set_hi(&mut q.used, v32),
                    _ => {}
                }
            }
        }
    }

    fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_SIZE => self.read_common(o - COMMON_OFFSET, data),
            o if o == ISR_OFFSET => {
                // With MSI-X the ISR is unused; reading it clears it.
                data.fill(0);
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE).contains(&o) => {
                self.device.read_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + self.msix.table_size()).contains(&o) => {
                self.msix.read_table(o - MSIX_TABLE_OFFSET, data)
            }
            o if (MSIX_PBA_OFFSET..MSIX_PBA_OFFSET + self.msix.pba_size()).contains(&o) => {
                self.msix.read_pba(o - MSIX_PBA_OFFSET, data)
            }
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_SIZE => self.write_common(o - COMMON_OFFSET, data),
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE).contains(&o) => {
                self.device.write_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + NOTIFY_SIZE).contains(&o) => {
                // Only without an ioeventfd (or through the PCI_CFG window) does a notify
                // get here: forward it to the queue's eventfd.
                self.notify_exits.fetch_add(1, Ordering::Relaxed);
                let q = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if let Some(k) = self.kicks.get(q) {
                    let _ = k.write(1);
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + self.msix.table_size()).contains(&o) => {
                self.msix.write_table(o - MSIX_TABLE_OFFSET, data)
            }
            _ => {}
        }
    }

    /// The VIRTIO_PCI_CAP_PCI_CFG window: (bar, offset, length) from the capability.
    fn pci_cfg_window(&self) -> (u8, u64, usize) {
        let base = self.pci_cfg_cap / 4;
        let bar = (self.config.read(base + 1) & 0xff) as u8;
        let offset = u64::from(self.config.read(base + 2));
        let len = self.config.read(base + 3) as usize;
        (bar, offset, len)
    }
}

impl PciDevice for VirtioPciDevice {
    fn pause(&mut self, paused: bool) -> Option<Box<dyn Fn() -> bool + Send>> {
        self.paused = paused;
        self.device.pause(paused);
        let shared = self.shared.clone()?;
        shared.pause.set(paused);
        if !paused {
            return None;
        }
        // Each queue thread sleeping in epoll wakes to see the pause (the guest's vCPUs are
        // parked: a spurious kick only makes the thread look at its ring).
        for k in &self.kicks {
            let _ = k.write(1);
        }
        Some(Box::new(move || shared.pause.quiesced()))
    }

    fn read_config(&mut self, reg: usize) -> u32 {
        if reg == self.msix_cap / 4 {
            let v = self.config.read(reg);
            return (v & 0x3fff_ffff) | (u32::from(self.msix.control_bits()) << 16);
        }
        if reg == self.pci_cfg_cap / 4 + 4 {
            let (bar, offset, len) = self.pci_cfg_window();
            let mut d = [0u8; 4];
            if bar == 0 && matches!(len, 1 | 2 | 4) && offset + len as u64 <= BAR_SIZE {
                self.bar_read(offset, &mut d[..len]);
            }
            return u32::from_le_bytes(d);
        }
        self.config.read(reg)
    }

    fn write_config(&mut self, reg: usize, offset: u64, data: &[u8]) {
        if reg == self.pci_cfg_cap / 4 + 4 {
            let (bar, off, len) = self.pci_cfg_window();
            if bar == 0 && matches!(len, 1 | 2 | 4) && off + len as u64 <= BAR_SIZE {
                let mut d = [0u8; 4];
                let n = data.len().min(4);
                d[offset as usize..(offset as usize + n).min(4)]
                    .copy_from_slice(&data[..n.min(4 - offset as usize)]);
                self.bar_write(off, &d[..len]);
            }
            return;
        }
        self.config.write(reg, offset, data);
        if reg == self.msix_cap / 4 {
            let ctrl = (self.config.read(reg) >> 16) as u16;
            self.msix.set_control(ctrl);
        }
    }

    fn bars(&self) -> Vec<BarRange> {
        self.config.bars()
    }

    fn read_bar(&mut self, index: usize, offset: u64, data: &mut [u8]) {
        match index {
            0 => self.bar_read(offset, data),
            PIO_BAR_INDEX => data.fill(0),
            _ => data.fill(0xff),
        }
    }

    fn write_bar(&mut self, index: usize, offset: u64, data: &[u8]) {
        match index {
            0 => self.bar_write(offset, data),
            PIO_BAR_INDEX if offset == 0 && data.len() >= 2 => {
                // A doorbell KVM's datamatch did not take (another size, or a queue that
                // does not exist): the low 16 bits name the queue.
                self.notify_exits.fetch_add(1, Ordering::Relaxed);
                let q = usize::from(u16::from_le_bytes([data[0], data[1]]));
                if let Some(k) = self.kicks.get(q) {
                    let _ = k.write(1);
                }
            }
            _ => {}
        }
    }

    fn bar_mapping(&mut self, index: usize, at: Option<u64>) -> Result<(), BarMapError> {
        let slot = match index {
            0 => &mut self.bar,
            PIO_BAR_INDEX => &mut self.pio_bar,
            _ => return Ok(()),
        };
        if *slot == at {
            return Ok(());
        }
        *slot = at;
        let is_pio = index == PIO_BAR_INDEX;
        let of_bar = |d: &Doorbell| matches!(d, Doorbell::Pio { .. }) == is_pio;
        let mut first: Result<(), BarMapError> = Ok(());
        // Drop every doorbell of this BAR: none may ring where the BAR no longer decodes.
        let old: Vec<(Doorbell, usize)> = self
            .doorbells
            .iter()
            .filter(|(d, _)| of_bar(d))
            .map(|(d, q)| (*d, *q))
            .collect();
        for (d, q) in old {
            self.doorbells.remove(&d);
            if let Err(source) = self.ioevents.unregister(&self.kicks[q], d) {
                first = first.and(Err(BarMapError {
                    what: format!("cannot remove queue {q}'s doorbell ioeventfd"),
                    at: doorbell_addr(d),
                    source,
                }));
            }
        }
        let Some(base) = at else {
            return first;
        };
        for (q, k) in self.kicks.iter().enumerate() {
            let d = if is_pio {
                Doorbell::Pio {
                    port: base,
                    queue: q as u16,
                }
            } else {
                Doorbell::Mmio(base + NOTIFY_OFFSET + q as u64 * u64::from(NOTIFY_MULTIPLIER))
            };
            match self.ioevents.register(k, d) {
                Ok(()) => {
                    self.doorbells.insert(d, q);
                }
                Err(source) => {
                    first = first.and(Err(BarMapError {
                        what: format!("cannot register queue {q}'s doorbell ioeventfd"),
                        at: doorbell_addr(d),
                        source,
                    }))
                }
            }
        }
        first
    }
}

fn doorbell_addr(d: Doorbell) -> u64 {
    match d {
        Doorbell::Mmio(a) => a,
        Doorbell::Pio { port, .. } => port,
    }
}

impl Drop for VirtioPciDevice {
    fn drop(&mut self) {
        self.device.reset();
        for (d, q) in std::mem::take(&mut self.doorbells) {
            let _ = self.ioevents.unregister(&self.kicks[q], d);
        }
    }
}
