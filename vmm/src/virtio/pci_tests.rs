//! Unit tests of the virtio-pci transport, driven as a Linux driver and as a hostile guest
//! would: configuration space, capabilities and BAR 0 registers, with a fake device, a fake
//! interrupt router and fake ioeventfd registration.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::pci::{Doorbell, IoEvents, VirtioPciDevice, BAR_SIZE, PIO_BAR_INDEX, PIO_BAR_SIZE};
use super::{
    Activation, ActiveQueue, DeviceShared, Memory, VirtioDevice, STATUS_ACKNOWLEDGE, STATUS_DRIVER,
    STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK, STATUS_NEEDS_RESET, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::interrupt::fake::FakeRouter;
use crate::pci::PciDevice;

// BAR 0 layout and common configuration offsets, from the virtio 1.2 spec (4.1.4.3) and the
// layout the transport documents; written out here so that the tests check it.
const BAR: u64 = 0xd000_0000;
const PIO: u64 = 0xc040;
const ISR: u64 = 0x1000;
const DEVCFG: u64 = 0x2000;
const NOTIFY: u64 = 0x3000;
const NOTIFY_MULT: u64 = 4;
const MSIX_TABLE: u64 = 0x8000;
const MSIX_PBA: u64 = 0xc000;

const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const MSIX_CONFIG: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

const NO_VECTOR: u16 = 0xffff;
const MEM_SIZE: usize = 1 << 20;
const MAX_SIZES: [u16; 3] = [256, 128, 64];
/// Offered: two device bits, EVENT_IDX, VERSION_1 and one more high bit.
const FEATURES: u64 = 1 | (1 << 5) | VIRTIO_RING_F_EVENT_IDX | VIRTIO_F_VERSION_1 | (1 << 35);
const DEVICE_TYPE: u16 = 2;

/// What the fake device saw.
#[derive(Default)]
struct Record {
    activations: Vec<(u64, Vec<ActiveQueue>, Arc<DeviceShared>)>,
    resets: usize,
    /// What the device answers to `reset_pending`.
    reset_pending: bool,
    config_writes: Vec<(u64, Vec<u8>)>,
}

struct FakeDevice {
    rec: Arc<Mutex<Record>>,
    fail_activate: bool,
}

impl FakeDevice {
    /// The record, even after a failed assertion poisoned it (the transport's destructor
    /// resets the device while a failing test unwinds).
    fn rec(&self) -> std::sync::MutexGuard<'_, Record> {
        self.rec.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }
    fn pci_class(&self) -> u32 {
        0x01_00_00
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        MAX_SIZES.to_vec()
    }
    fn features(&self) -> u64 {
        FEATURES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg: Vec<u8> = (0u8..64).map(|i| 0xa0 ^ i).collect();
        backends::read_config(&cfg, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.rec().config_writes.push((offset, data.to_vec()));
    }
    fn activate(&mut self, a: Activation) -> io::Result<()> {
        self.rec()
            .activations
            .push((a.acked_features, a.queues, a.shared));
        if self.fail_activate {
            return Err(io::Error::other("refused"));
        }
        Ok(())
    }
    fn reset(&mut self) {
        self.rec().resets += 1;
    }
    fn reset_pending(&self) -> bool {
        self.rec().reset_pending
    }
}

/// Doorbells registered, keyed by where they ring, with the eventfd's raw fd.
#[derive(Default)]
struct FakeIoEvents {
    live: Mutex<BTreeMap<Doorbell, i32>>,
    unregistered: Mutex<Vec<Doorbell>>,
}

impl IoEvents for FakeIoEvents {
    fn register(&self, fd: &EventFd, addr: Doorbell) -> io::Result<()> {
        let mut live = self.live.lock().unwrap();
        if live.contains_key(&addr) {
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        live.insert(addr, fd.as_raw_fd());
        Ok(())
    }
    fn unregister(&self, fd: &EventFd, addr: Doorbell) -> io::Result<()> {
        let mut live = self.live.lock().unwrap();
        match live.get(&addr) {
            Some(&raw) if raw == fd.as_raw_fd() => {
                live.remove(&addr);
                self.unregistered.lock().unwrap().push(addr);
                Ok(())
            }
            _ => Err(io::Error::from_raw_os_error(libc::ENOENT)),
        }
    }
}

struct T {
    dev: VirtioPciDevice,
    rec: Arc<Mutex<Record>>,
    router: Arc<FakeRouter>,
    io: Arc<FakeIoEvents>,
}

fn memory() -> Memory {
    GuestMemoryAtomic::new(
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
    )
}

fn new_t(fail_activate: bool) -> T {
    let rec = Arc::new(Mutex::new(Record::default()));
    let router = Arc::new(FakeRouter::default());
    let io = Arc::new(FakeIoEvents::default());
    let mut dev = VirtioPciDevice::new(
        "test",
        Box::new(FakeDevice {
            rec: rec.clone(),
            fail_activate,
        }),
        (BAR, PIO),
        memory(),
        router.clone(),
        io.clone(),
    )
    .unwrap();
    // Nothing is registered until the PCI root routes the BARs; route them as it does.
    assert!(io.live.lock().unwrap().is_empty());
    dev.bar_mapping(0, Some(BAR)).unwrap();
    dev.bar_mapping(PIO_BAR_INDEX, Some(PIO)).unwrap();
    T {
        dev,
        rec,
        router,
        io,
    }
}

fn t() -> T {
    new_t(false)
}

/// Ring addresses of queue `i` inside guest memory.
fn rings(i: u16) -> (u64, u64, u64) {
    let base = 0x1_0000 * (u64::from(i) + 1);
    (base, base + 0x1000, base + 0x2000)
}

impl T {
    fn read(&mut self, off: u64, len: usize) -> u64 {
        let mut d = [0u8; 8];
        self.dev.read_bar(0, off, &mut d[..len]);
        u64::from_le_bytes(d)
    }
    fn r8(&mut self, off: u64) -> u8 {
        self.read(off, 1) as u8
    }
    fn r16(&mut self, off: u64) -> u16 {
        self.read(off, 2) as u16
    }
    fn r32(&mut self, off: u64) -> u32 {
        self.read(off, 4) as u32
    }
    fn w8(&mut self, off: u64, v: u8) {
        self.dev.write_bar(0, off, &[v]);
    }
    fn w16(&mut self, off: u64, v: u16) {
        self.dev.write_bar(0, off, &v.to_le_bytes());
    }
    fn w32(&mut self, off: u64, v: u32) {
        self.dev.write_bar(0, off, &v.to_le_bytes());
    }
    fn w64_split(&mut self, off: u64, v: u64) {
        self.w32(off, v as u32);
        self.w32(off + 4, (v >> 32) as u32);
    }
    fn r64_split(&mut self, off: u64) -> u64 {
        u64::from(self.r32(off)) | (u64::from(self.r32(off + 4)) << 32)
    }

    fn cfg_byte(&mut self, off: usize) -> u8 {
        (self.dev.read_config(off / 4) >> ((off % 4) * 8)) as u8
    }
    fn cfg_u32(&mut self, off: usize) -> u32 {
        assert_eq!(off % 4, 0);
        self.dev.read_config(off / 4)
    }

    fn status(&mut self) -> u8 {
        self.r8(DEVICE_STATUS)
    }

    fn write_features(&mut self, f: u64) {
        self.w32(DRIVER_FEATURE_SELECT, 0);
        self.w32(DRIVER_FEATURE, f as u32);
        self.w32(DRIVER_FEATURE_SELECT, 1);
        self.w32(DRIVER_FEATURE, (f >> 32) as u32);
    }

    /// ACKNOWLEDGE, DRIVER, features, FEATURES_OK; returns the status read back.
    fn negotiate(&mut self, f: u64) -> u8 {
        self.w8(DEVICE_STATUS, 0);
        self.w8(DEVICE_STATUS, STATUS_ACKNOWLEDGE);
        self.w8(DEVICE_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        self.write_features(f);
        self.w8(
            DEVICE_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        self.status()
    }

    fn setup_queue(&mut self, i: u16, size: u16, (desc, avail, used): (u64, u64, u64)) {
        self.w16(QUEUE_SELECT, i);
        self.w16(QUEUE_SIZE, size);
        self.w64_split(QUEUE_DESC, desc);
        self.w64_split(QUEUE_DRIVER, avail);
        self.w64_split(QUEUE_DEVICE, used);
        self.w16(QUEUE_ENABLE, 1);
    }

    fn driver_ok(&mut self) {
        self.w8(
            DEVICE_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
    }

    fn activations(&self) -> usize {
        self.rec.lock().unwrap().activations.len()
    }

    /// A full bring-up of queue 0 (and `more` queues), as Linux does it.
    fn bring_up(&mut self, queues: &[u16]) {
        assert_ne!(
            self.negotiate(VIRTIO_F_VERSION_1) & STATUS_FEATURES_OK,
            0,
            "FEATURES_OK refused"
        );
        for &q in queues {
            self.setup_queue(q, MAX_SIZES[usize::from(q)], rings(q));
        }
        self.driver_ok();
        assert_eq!(self.activations(), 1);
        assert_eq!(self.status() & STATUS_NEEDS_RESET, 0);
    }

    fn config_write(&mut self, off: usize, data: &[u8]) {
        let bars = self.dev.bars();
        self.dev.write_config(off / 4, (off % 4) as u64, data);
        assert_eq!(self.dev.bars(), bars, "a capability write moved a BAR");
    }
}

/// The capability list as a Linux driver walks it: (offset, id, bytes of the capability).
fn capabilities(t: &mut T) -> Vec<(usize, u8)> {
    assert_ne!(t.dev.read_config(1) & (1 << 20), 0, "no capability list");
    let mut caps = Vec::new();
    let mut p = usize::from(t.cfg_byte(0x34)) & !3;
    while p != 0 {
        assert!(caps.len() < 48, "capability loop");
        assert!((0x40..0x100).contains(&p), "capability at {p:#x}");
        caps.push((p, t.cfg_byte(p)));
        p = usize::from(t.cfg_byte(p + 1)) & !3;
    }
    caps
}

/// The vendor capabilities of `cfg_type` in list order: (offset, bar, region offset,
/// region length).
fn vendor_caps(t: &mut T, cfg_type: u8) -> Vec<(usize, u8, u32, u32)> {
    let caps = capabilities(t);
    let found: Vec<_> = caps
        .iter()
        .filter(|&&(p, id)| id == 0x09 && t.cfg_byte(p + 3) == cfg_type)
        .map(|&(p, _)| p)
        .collect();
    found
        .into_iter()
        .map(|p| (p, t.cfg_byte(p + 4), t.cfg_u32(p + 8), t.cfg_u32(p + 12)))
        .collect()
}

/// The one vendor capability of `cfg_type`.
fn vendor_cap(t: &mut T, cfg_type: u8) -> (usize, u8, u32, u32) {
    let found = vendor_caps(t, cfg_type);
    assert_eq!(found.len(), 1, "cfg_type {cfg_type}: {found:?}");
    found[0]
}

#[test]
fn identity_and_bar() {
    let mut t = t();
    assert_eq!(t.dev.read_config(0), 0x1af4 | (0x1042 << 16));
    // Revision 1 (modern), class from the device.
    assert_eq!(t.dev.read_config(2), (0x01_00_00 << 8) | 1);
    assert_eq!(t.dev.read_config(11), 0x1af4 | (0x1042 << 16));
    // BAR 0: 64-bit memory at BAR, 64 KiB by sizing.
    assert_eq!(t.dev.read_config(4), BAR as u32 | 0x4);
    assert_eq!(t.dev.read_config(5), 0);
    t.dev.write_config(4, 0, &[0xff; 4]);
    t.dev.write_config(5, 0, &[0xff; 4]);
    assert!(t.dev.bars()[0].is_sizing());
    let size =
        !(u64::from(t.dev.read_config(4) & !0xf) | (u64::from(t.dev.read_config(5)) << 32)) + 1;
    assert_eq!(size, BAR_SIZE);
    // Restored, the BAR holds its address again.
    t.dev.write_config(4, 0, &(BAR as u32).to_le_bytes());
    t.dev.write_config(5, 0, &[0; 4]);
    // BAR 2: the doorbell ports, I/O space, 4 ports by sizing.
    assert_eq!(t.dev.read_config(4 + PIO_BAR_INDEX), PIO as u32 | 0x1);
    t.dev.write_config(4 + PIO_BAR_INDEX, 0, &[0xff; 4]);
    let size = !(t.dev.read_config(4 + PIO_BAR_INDEX) & !0x3) + 1;
    assert_eq!(u64::from(size), PIO_BAR_SIZE);
    t.dev
        .write_config(4 + PIO_BAR_INDEX, 0, &(PIO as u32).to_le_bytes());
    let bars = t.dev.bars();
    assert_eq!(bars.len(), 2);
    assert_eq!(
        (bars[0].index, bars[0].addr, bars[0].size),
        (0, BAR, BAR_SIZE)
    );
    assert_eq!(
        (bars[1].index, bars[1].addr, bars[1].size),
        (PIO_BAR_INDEX, PIO, PIO_BAR_SIZE)
    );
    assert_eq!(bars[1].kind, crate::pci::BarKind::Io);
    // Other BARs are not there.
    let mut d = [0u8; 4];
    t.dev.read_bar(4, 0, &mut d);
    assert_eq!(d, [0xff; 4]);
    t.dev.write_bar(4, 0x14, &[0]);
}

#[test]
fn capability_list_as_linux_walks_it() {
    let mut t = t();
    let caps = capabilities(&mut t);
    let ids: Vec<u8> = caps.iter().map(|c| c.1).collect();
    assert_eq!(ids.iter().filter(|&&i| i == 0x09).count(), 6);
    assert_eq!(ids.iter().filter(|&&i| i == 0x11).count(), 1);

    let (p, bar, off, len) = vendor_cap(&mut t, 1);
    assert_eq!((bar, off, len), (0, 0, 0x38), "common cfg");
    assert!(t.cfg_byte(p + 2) >= 16);
    // Two notify capabilities; Linux takes the first whose BAR it can use: the ports.
    let notify = vendor_caps(&mut t, 2);
    assert_eq!(notify.len(), 2, "{notify:?}");
    let (p, bar, off, len) = notify[0];
    assert_eq!(
        (usize::from(bar), off, u64::from(len)),
        (PIO_BAR_INDEX, 0, PIO_BAR_SIZE),
        "port notify cfg"
    );
    assert!(t.cfg_byte(p + 2) >= 20, "notify cap carries the multiplier");
    assert_eq!(t.cfg_u32(p + 16), 0, "one port for every queue");
    let (p, bar, off, len) = notify[1];
    assert_eq!((bar, off), (0, NOTIFY as u32), "notify cfg");
    assert!(t.cfg_byte(p + 2) >= 20, "notify cap carries the multiplier");
    let mult = t.cfg_u32(p + 16);
    assert_eq!(u64::from(mult), NOTIFY_MULT);
    // Every queue's notify address is inside the notify region.
    for q in 0..MAX_SIZES.len() as u16 {
        t.w16(QUEUE_SELECT, q);
        let noff = u32::from(t.r16(QUEUE_NOTIFY_OFF));
        assert!(
            noff * mult + 2 <= len,
            "queue {q} notify outside the region"
        );
    }
    let (_, bar, off, len) = vendor_cap(&mut t, 3);
    assert_eq!((bar, off as u64), (0, ISR), "isr cfg");
    assert!(len >= 1);
    let (_, bar, off, len) = vendor_cap(&mut t, 4);
    assert_eq!((bar, off as u64), (0, DEVCFG), "device cfg");
    assert!(len > 0 && u64::from(off + len) <= NOTIFY);
    let (p, _, _, _) = vendor_cap(&mut t, 5);
    assert!(
        t.cfg_byte(p + 2) >= 20,
        "pci cfg cap carries the data window"
    );

    // MSI-X: one vector per queue plus config, table and PBA in BAR 0, disabled at reset.
    let p = caps.iter().find(|c| c.1 == 0x11).unwrap().0;
    let ctrl = (t.dev.read_config(p / 4) >> 16) as u16;
    assert_eq!(usize::from(ctrl & 0x7ff) + 1, MAX_SIZES.len() + 1);
    assert_eq!(ctrl & 0xc000, 0);
    assert_eq!(t.cfg_u32(p + 4), MSIX_TABLE as u32, "table offset, BIR 0");
    assert_eq!(t.cfg_u32(p + 8), MSIX_PBA as u32, "PBA offset, BIR 0");
    // The table size is read-only; enable and function mask are writable.
    t.config_write(p + 2, &0xffffu16.to_le_bytes());
    let ctrl = (t.dev.read_config(p / 4) >> 16) as u16;
    assert_eq!(ctrl, 0xc000 | MAX_SIZES.len() as u16);
}

#[test]
fn feature_select_windows() {
    let mut t = t();
    t.w32(DEVICE_FEATURE_SELECT, 0);
    assert_eq!(t.r32(DEVICE_FEATURE), FEATURES as u32);
    t.w32(DEVICE_FEATURE_SELECT, 1);
    assert_eq!(t.r32(DEVICE_FEATURE_SELECT), 1);
    assert_eq!(t.r32(DEVICE_FEATURE), (FEATURES >> 32) as u32);
    for sel in [2, 3, 0xffff_ffff] {
        t.w32(DEVICE_FEATURE_SELECT, sel);
        assert_eq!(t.r32(DEVICE_FEATURE), 0, "select {sel:#x}");
    }
    // Device features are read-only.
    t.w32(DEVICE_FEATURE_SELECT, 0);
    t.w32(DEVICE_FEATURE, 0);
    assert_eq!(t.r32(DEVICE_FEATURE), FEATURES as u32);

    t.write_features(0x0000_1234_0000_0021);
    t.w32(DRIVER_FEATURE_SELECT, 0);
    assert_eq!(t.r32(DRIVER_FEATURE), 0x21);
    t.w32(DRIVER_FEATURE_SELECT, 1);
    assert_eq!(t.r32(DRIVER_FEATURE), 0x1234);
    // Selects beyond the second word neither store nor disturb anything.
    t.w32(DRIVER_FEATURE_SELECT, 7);
    t.w32(DRIVER_FEATURE, 0xffff_ffff);
    assert_eq!(t.r32(DRIVER_FEATURE), 0);
    t.w32(DRIVER_FEATURE_SELECT, 0);
    assert_eq!(t.r32(DRIVER_FEATURE), 0x21);
    t.w32(DRIVER_FEATURE_SELECT, 1);
    assert_eq!(t.r32(DRIVER_FEATURE), 0x1234);
    assert_eq!(t.r16(NUM_QUEUES), MAX_SIZES.len() as u16);
}

#[test]
fn features_ok_only_for_offered_features_with_version_1() {
    let mut t = t();
    // A feature not offered.
    let s = t.negotiate(VIRTIO_F_VERSION_1 | (1 << 7));
    assert_eq!(s & STATUS_FEATURES_OK, 0, "status {s:#x}");
    assert_eq!(s & (STATUS_ACKNOWLEDGE | STATUS_DRIVER), 3);
    // A high word feature not offered.
    let s = t.negotiate(VIRTIO_F_VERSION_1 | (1 << 63));
    assert_eq!(s & STATUS_FEATURES_OK, 0, "status {s:#x}");
    // Legacy: no VERSION_1.
    let s = t.negotiate(1);
    assert_eq!(s & STATUS_FEATURES_OK, 0, "status {s:#x}");
    // Refused FEATURES_OK together with DRIVER_OK does not activate.
    t.setup_queue(0, 256, rings(0));
    t.driver_ok();
    assert_eq!(t.activations(), 0);
    assert_eq!(t.status() & STATUS_FEATURES_OK, 0);

    // A subset with VERSION_1 is accepted, and features freeze after FEATURES_OK.
    let s = t.negotiate(FEATURES & !(1 << 5));
    assert_ne!(s & STATUS_FEATURES_OK, 0, "status {s:#x}");
    t.w32(DRIVER_FEATURE_SELECT, 0);
    t.w32(DRIVER_FEATURE, 0xffff_ffff);
    assert_eq!(t.r32(DRIVER_FEATURE), (FEATURES & !(1 << 5)) as u32);
    t.setup_queue(0, 256, rings(0));
    t.driver_ok();
    let rec = t.rec.lock().unwrap();
    assert_eq!(rec.activations.len(), 1);
    assert_eq!(rec.activations[0].0, FEATURES & !(1 << 5));
}

#[test]
fn driver_ok_activates_exactly_the_enabled_queues() {
    let mut t = t();
    let s = t.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
    assert_ne!(s & STATUS_FEATURES_OK, 0);
    // Queue 1 is configured but not enabled; queues 0 and 2 use smaller sizes.
    t.setup_queue(0, 128, rings(0));
    t.w16(QUEUE_SELECT, 1);
    t.w16(QUEUE_SIZE, 64);
    t.w64_split(QUEUE_DESC, rings(1).0);
    t.setup_queue(2, 16, (0x8_0000, 0x8_1000, 0x8_2004));
    assert_eq!(t.activations(), 0, "activated before DRIVER_OK");
    t.driver_ok();
    assert_eq!(t.status() & STATUS_NEEDS_RESET, 0);
    assert_ne!(t.status() & STATUS_DRIVER_OK, 0);
    let rec = t.rec.lock().unwrap();
    assert_eq!(rec.activations.len(), 1);
    let (acked, queues, _) = &rec.activations[0];
    assert_eq!(*acked, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
    let got: Vec<_> = queues
        .iter()
        .map(|a| {
            (
                a.index,
                a.queue.size(),
                a.queue.desc_table(),
                a.queue.avail_ring(),
                a.queue.used_ring(),
                a.queue.ready(),
                a.queue.event_idx_enabled(),
            )
        })
        .collect();
    let (d, a, u) = rings(0);
    assert_eq!(
        got,
        vec![
            (0, 128, d, a, u, true, true),
            (2, 16, 0x8_0000, 0x8_1000, 0x8_2004, true, true),
        ]
    );
    // No vector was given: no interrupt fd.
    assert!(queues.iter().all(|a| a.irq.0.is_none()));
    drop(rec);
    // A second DRIVER_OK write does not activate again.
    t.driver_ok();
    assert_eq!(t.activations(), 1);
}

#[test]
fn driver_ok_without_features_ok_does_not_activate() {
    let mut t = t();
    t.w8(DEVICE_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    t.write_features(VIRTIO_F_VERSION_1);
    t.setup_queue(0, 256, rings(0));
    t.w8(
        DEVICE_STATUS,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK,
    );
    assert_eq!(t.activations(), 0);
    // Nor with FAILED.
    t.negotiate(VIRTIO_F_VERSION_1);
    t.setup_queue(0, 256, rings(0));
    t.w8(
        DEVICE_STATUS,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED,
    );
    assert_eq!(t.activations(), 0);
}

/// Brings queue 0 up with `size` and the given rings; asserts NEEDS_RESET and no
/// activation.
fn assert_refused(size: u16, r: (u64, u64, u64)) {
    let mut t = t();
    assert_ne!(t.negotiate(VIRTIO_F_VERSION_1) & STATUS_FEATURES_OK, 0);
    t.setup_queue(1, 128, rings(1));
    t.setup_queue(0, size, r);
    t.driver_ok();
    let s = t.status();
    assert_ne!(
        s & STATUS_NEEDS_RESET,
        0,
        "size {size}, rings {r:x?}: status {s:#x}"
    );
    assert_eq!(
        t.activations(),
        0,
        "size {size}, rings {r:x?}: device activated"
    );
    // A reset clears NEEDS_RESET, and a good bring-up then works.
    t.w8(DEVICE_STATUS, 0);
    assert_eq!(t.status(), 0);
    t.bring_up(&[0]);
}

#[test]
fn bad_queue_sizes_need_reset() {
    for size in [0, 3, 100, 255, 512, 0x8000, 0xffff] {
        assert_refused(size, rings(0));
    }
}

#[test]
fn rings_outside_guest_memory_need_reset() {
    let end = MEM_SIZE as u64;
    let (d, a, u) = rings(0);
    for r in [
        (end, a, u),
        (d, end - 2, u),
        (d, a, end - 4),
        // The descriptor table crosses the end of memory.
        (end - 0x800, a, u),
        (d, a, 0x1_0000_0000 + u),
        (d, 0xffff_ffff_ffff_f000, u),
        (0xffff_ffff_ffff_fff0, a, u),
    ] {
        assert_refused(256, r);
    }
}

#[test]
fn misaligned_rings_need_reset() {
    let (d, a, u) = rings(0);
    // virtio 1.2 2.7: descriptor table 16-byte, available ring 2-byte, used ring 4-byte
    // aligned.
    for r in [(d + 8, a, u), (d, a + 1, u), (d, a, u + 2)] {
        assert_refused(256, r);
    }
}

#[test]
fn queue_select_out_of_range_is_inert() {
    let mut t = t();
    t.negotiate(VIRTIO_F_VERSION_1);
    for sel in [3u16, 4, 0x7fff, 0xffff] {
        t.w16(QUEUE_SELECT, sel);
        assert_eq!(t.r16(QUEUE_SELECT), sel);
        assert_eq!(t.r16(QUEUE_SIZE), 0);
        assert_eq!(t.r16(QUEUE_MSIX_VECTOR), NO_VECTOR);
        assert_eq!(t.r16(QUEUE_ENABLE), 0);
        assert_eq!(t.r64_split(QUEUE_DESC), 0);
        assert_eq!(t.r64_split(QUEUE_DRIVER), 0);
        assert_eq!(t.r64_split(QUEUE_DEVICE), 0);
        t.w16(QUEUE_SIZE, 16);
        t.w16(QUEUE_MSIX_VECTOR, 0);
        t.w64_split(QUEUE_DESC, 0x1000);
        t.w64_split(QUEUE_DRIVER, 0x2000);
        t.w64_split(QUEUE_DEVICE, 0x3000);
        t.w16(QUEUE_ENABLE, 1);
        assert_eq!(t.r16(QUEUE_SIZE), 0);
        assert_eq!(t.r16(QUEUE_ENABLE), 0);
        assert_eq!(t.r64_split(QUEUE_DESC), 0);
    }
    // The real queues are untouched.
    for (q, &max) in MAX_SIZES.iter().enumerate() {
        t.w16(QUEUE_SELECT, q as u16);
        assert_eq!(t.r16(QUEUE_SIZE), max);
        assert_eq!(t.r16(QUEUE_ENABLE), 0);
        assert_eq!(t.r16(QUEUE_MSIX_VECTOR), NO_VECTOR);
        assert_eq!(t.r64_split(QUEUE_DESC), 0);
    }
    t.setup_queue(0, 256, rings(0));
    t.driver_ok();
    let rec = t.rec.lock().unwrap();
    assert_eq!(rec.activations[0].1.len(), 1);
}

#[test]
fn msix_vectors_out_of_range_read_no_vector() {
    let mut t = t();
    let nvec = MAX_SIZES.len() as u16 + 1;
    t.w16(MSIX_CONFIG, 0);
    assert_eq!(t.r16(MSIX_CONFIG), 0);
    for bad in [nvec, nvec + 1, 0x7ff, 0xfffe] {
        t.w16(MSIX_CONFIG, bad);
        assert_eq!(t.r16(MSIX_CONFIG), NO_VECTOR, "config vector {bad}");
        t.w16(QUEUE_SELECT, 1);
        t.w16(QUEUE_MSIX_VECTOR, bad);
        assert_eq!(t.r16(QUEUE_MSIX_VECTOR), NO_VECTOR, "queue vector {bad}");
    }
    t.w16(QUEUE_MSIX_VECTOR, nvec - 1);
    assert_eq!(t.r16(QUEUE_MSIX_VECTOR), nvec - 1);
    t.w16(QUEUE_MSIX_VECTOR, NO_VECTOR);
    assert_eq!(t.r16(QUEUE_MSIX_VECTOR), NO_VECTOR);
}

#[test]
fn queue_registers_freeze_after_enable_and_driver_ok() {
    let mut t = t();
    t.negotiate(VIRTIO_F_VERSION_1);
    t.setup_queue(0, 64, rings(0));
    // Enabled: size, vector and addresses are frozen.
    t.w16(QUEUE_SIZE, 32);
    t.w16(QUEUE_MSIX_VECTOR, 1);
    t.w64_split(QUEUE_DESC, 0x9_0000);
    t.w64_split(QUEUE_DRIVER, 0x9_1000);
    t.w64_split(QUEUE_DEVICE, 0x9_2000);
    assert_eq!(t.r16(QUEUE_SIZE), 64);
    assert_eq!(t.r16(QUEUE_MSIX_VECTOR), NO_VECTOR);
    assert_eq!(t.r64_split(QUEUE_DESC), rings(0).0);
    assert_eq!(t.r64_split(QUEUE_DRIVER), rings(0).1);
    assert_eq!(t.r64_split(QUEUE_DEVICE), rings(0).2);
    // Queue 1 is still open until DRIVER_OK.
    t.w16(QUEUE_SELECT, 1);
    t.w16(QUEUE_SIZE, 32);
    assert_eq!(t.r16(QUEUE_SIZE), 32);
    t.driver_ok();
    assert_eq!(t.activations(), 1);
    // After DRIVER_OK nothing of any queue changes, enable included.
    for q in [0u16, 1] {
        t.w16(QUEUE_SELECT, q);
        t.w16(QUEUE_SIZE, 16);
        t.w16(QUEUE_MSIX_VECTOR, 2);
        t.w16(QUEUE_ENABLE, if q == 0 { 0 } else { 1 });
        t.w64_split(QUEUE_DESC, 0xa_0000);
    }
    t.w16(QUEUE_SELECT, 0);
    assert_eq!(
        (
            t.r16(QUEUE_SIZE),
            t.r16(QUEUE_ENABLE),
            t.r16(QUEUE_MSIX_VECTOR)
        ),
        (64, 1, NO_VECTOR)
    );
    assert_eq!(t.r64_split(QUEUE_DESC), rings(0).0);
    t.w16(QUEUE_SELECT, 1);
    assert_eq!((t.r16(QUEUE_SIZE), t.r16(QUEUE_ENABLE)), (32, 0));
    assert_eq!(t.r64_split(QUEUE_DESC), 0);
    assert_eq!(t.activations(), 1);
}

#[test]
fn notify_writes_reach_the_queue_eventfd() {
    let mut t = t();
    t.bring_up(&[0, 2]);
    let exits = t.dev.notify_exits();
    assert_eq!(exits.load(Ordering::Relaxed), 0);
    for q in [0u16, 2] {
        t.w16(QUEUE_SELECT, q);
        let off = u64::from(t.r16(QUEUE_NOTIFY_OFF)) * NOTIFY_MULT;
        // Linux writes the queue index as 16 bits; any width must do.
        t.w16(NOTIFY + off, q);
        t.w8(NOTIFY + off, 0);
        t.w32(NOTIFY + off, 0);
    }
    assert_eq!(exits.load(Ordering::Relaxed), 6);
    let rec = t.rec.lock().unwrap();
    let queues = &rec.activations[0].1;
    for aq in queues {
        assert_eq!(aq.kick.read().unwrap(), 3, "queue {}", aq.index);
    }
    drop(rec);
    // A notify for a queue that does not exist, or one not enabled, wakes nobody.
    t.w16(NOTIFY + 1000 * NOTIFY_MULT, 0);
    t.w16(NOTIFY + NOTIFY_MULT, 1);
    t.w16(NOTIFY + 0xfff, 1);
    let rec = t.rec.lock().unwrap();
    for aq in &rec.activations[0].1 {
        assert!(aq.kick.read().is_err(), "queue {} woken", aq.index);
    }
}

/// A port doorbell KVM's datamatch did not take (a 32-bit `out`, say) reaches the device:
/// the low 16 bits name the queue; other widths, offsets and queues wake nobody.
#[test]
fn port_doorbells_that_exit_reach_the_queue_eventfd() {
    let mut t = t();
    t.bring_up(&[0, 2]);
    let exits = t.dev.notify_exits();
    for q in [0u16, 2] {
        t.dev.write_bar(PIO_BAR_INDEX, 0, &q.to_le_bytes());
        t.dev
            .write_bar(PIO_BAR_INDEX, 0, &u32::from(q).to_le_bytes());
    }
    assert_eq!(exits.load(Ordering::Relaxed), 4);
    {
        let rec = t.rec.lock().unwrap();
        for aq in &rec.activations[0].1 {
            assert_eq!(aq.kick.read().unwrap(), 2, "queue {}", aq.index);
        }
    }
    t.dev.write_bar(PIO_BAR_INDEX, 0, &1000u16.to_le_bytes());
    t.dev.write_bar(PIO_BAR_INDEX, 0, &[0]);
    t.dev.write_bar(PIO_BAR_INDEX, 2, &0u16.to_le_bytes());
    let mut d = [0xaau8; 2];
    t.dev.read_bar(PIO_BAR_INDEX, 0, &mut d);
    assert_eq!(d, [0, 0]);
    let rec = t.rec.lock().unwrap();
    for aq in &rec.activations[0].1 {
        assert!(aq.kick.read().is_err(), "queue {} woken", aq.index);
    }
}

#[test]
fn notify_before_driver_ok_is_harmless() {
    let mut t = t();
    // Before anything, and while queues are being set up.
    t.w16(NOTIFY, 0);
    t.negotiate(VIRTIO_F_VERSION_1);
    t.setup_queue(0, 256, rings(0));
    t.w16(NOTIFY, 0);
    assert_eq!(t.activations(), 0);
    assert_eq!(t.status() & (STATUS_DRIVER_OK | STATUS_NEEDS_RESET), 0);
    // A reset drops them: the device started afterwards is not woken by stale kicks.
    t.w8(DEVICE_STATUS, 0);
    t.bring_up(&[0]);
    let rec = t.rec.lock().unwrap();
    assert!(rec.activations[0].1[0].kick.read().is_err());
}

#[test]
fn a_reset_the_device_has_not_finished_reads_as_the_old_status() {
    let mut t = t();
    t.negotiate(VIRTIO_F_VERSION_1);
    t.setup_queue(0, 256, rings(0));
    t.driver_ok();
    let running = t.status();
    assert_ne!(running & STATUS_DRIVER_OK, 0);
    // The device hands the reset to its own thread: the write returns at once and a
    // driver polling the status (Linux's vp_reset) reads the old status meanwhile.
    t.rec.lock().unwrap().reset_pending = true;
    t.w8(DEVICE_STATUS, 0);
    assert_eq!(t.status(), running);
    assert_eq!(t.status(), running);
    t.rec.lock().unwrap().reset_pending = false;
    assert_eq!(t.status(), 0);
    // Once seen done it stays done.
    t.rec.lock().unwrap().reset_pending = true;
    assert_eq!(t.status(), 0);
    t.rec.lock().unwrap().reset_pending = false;
    // A driver that goes on without waiting sees its own writes.
    t.negotiate(VIRTIO_F_VERSION_1);
    t.rec.lock().unwrap().reset_pending = true;
    t.w8(DEVICE_STATUS, 0);
    t.w8(DEVICE_STATUS, STATUS_ACKNOWLEDGE);
    assert_eq!(t.status(), STATUS_ACKNOWLEDGE);
}

#[test]
fn reset_calls_the_device_and_clears_the_registers() {
    let mut t = t();
    t.negotiate(VIRTIO_F_VERSION_1);
    t.w16(MSIX_CONFIG, 0);
    t.w16(QUEUE_SELECT, 0);
    t.w16(QUEUE_MSIX_VECTOR, 1);
    t.w32(DEVICE_FEATURE_SELECT, 1);
    t.setup_queue(0, 256, rings(0));
    t.setup_queue(1, 64, rings(1));
    t.driver_ok();
    assert_eq!(t.activations(), 1);
    let resets = t.rec.lock().unwrap().resets;
    t.w16(QUEUE_SELECT, 1);
    t.w8(DEVICE_STATUS, 0);
    assert_eq!(t.rec.lock().unwrap().resets, resets + 1);
    assert_eq!(t.status(), 0);
    assert_eq!(t.r32(DEVICE_FEATURE_SELECT), 0);
    assert_eq!(t.r16(QUEUE_SELECT), 0);
    assert_eq!(t.r16(MSIX_CONFIG), NO_VECTOR);
    t.w32(DRIVER_FEATURE_SELECT, 1);
    assert_eq!(t.r32(DRIVER_FEATURE), 0);
    for (q, &max) in MAX_SIZES.iter().enumerate() {
        t.w16(QUEUE_SELECT, q as u16);
        assert_eq!(t.r16(QUEUE_SIZE), max);
        assert_eq!(t.r16(QUEUE_ENABLE), 0);
        assert_eq!(t.r16(QUEUE_MSIX_VECTOR), NO_VECTOR);
        assert_eq!(t.r64_split(QUEUE_DESC), 0);
        assert_eq!(t.r64_split(QUEUE_DRIVER), 0);
        assert_eq!(t.r64_split(QUEUE_DEVICE), 0);
    }
    // The device comes up again after the reset.
    t.rec.lock().unwrap().activations.clear();
    t.bring_up(&[1]);
}

#[test]
fn device_needs_reset_shows_in_status() {
    // The device refuses to start.
    let mut t = new_t(true);
    t.negotiate(VIRTIO_F_VERSION_1);
    t.setup_queue(0, 256, rings(0));
    t.driver_ok();
    assert_ne!(t.status() & STATUS_NEEDS_RESET, 0);
    // The device reports a fault while running.
    let mut t = self::t();
    t.bring_up(&[0]);
    let shared = t.rec.lock().unwrap().activations[0].2.clone();
    assert_eq!(t.status() & STATUS_NEEDS_RESET, 0);
    shared.set_needs_reset();
    assert_ne!(t.status() & STATUS_NEEDS_RESET, 0);
    // Only a reset clears it.
    t.driver_ok();
    assert_ne!(t.status() & STATUS_NEEDS_RESET, 0);
    t.w8(DEVICE_STATUS, 0);
    assert_eq!(t.status(), 0);
}

#[test]
fn device_config_is_forwarded() {
    let mut t = t();
    assert_eq!(t.r8(DEVCFG), 0xa0);
    assert_eq!(
        t.r32(DEVCFG + 4),
        u32::from_le_bytes([0xa4, 0xa5, 0xa6, 0xa7])
    );
    assert_eq!(t.read(DEVCFG + 62, 4), (0xa0 ^ 62) | ((0xa0 ^ 63) << 8));
    assert_eq!(t.r32(DEVCFG + 0xffc), 0);
    t.w16(DEVCFG + 6, 0xbeef);
    assert_eq!(
        t.rec.lock().unwrap().config_writes,
        vec![(6, vec![0xef, 0xbe])]
    );
    // The ISR reads zero with MSI-X.
    assert_eq!(t.r8(ISR), 0);
}

#[test]
fn msix_table_and_pba_through_bar0() {
    let mut t = t();
    let caps = capabilities(&mut t);
    let p = caps.iter().find(|c| c.1 == 0x11).unwrap().0;
    // Entry 1: address, data, unmasked.
    t.w32(MSIX_TABLE + 16, 0xfee0_0000);
    t.w32(MSIX_TABLE + 20, 0);
    t.w32(MSIX_TABLE + 24, 0x45);
    t.w32(MSIX_TABLE + 28, 0);
    assert_eq!(t.r32(MSIX_TABLE + 16), 0xfee0_0000);
    assert_eq!(t.r32(MSIX_TABLE + 24), 0x45);
    assert_eq!(t.r32(MSIX_TABLE + 12), 1, "entry 0 masked");
    t.config_write(p + 2, &0x8000u16.to_le_bytes());
    assert_eq!((t.dev.read_config(p / 4) >> 16) & 0xc000, 0x8000);
    let routes = t.router.routes.lock().unwrap().clone();
    assert_eq!(routes.len(), 1);
    assert_eq!(routes.values().next().unwrap().data, 0x45);
    assert!(t.router.irqfds.lock().unwrap().values().all(|&a| a));

    // Queue 0 on vector 1 (unmasked), queue 1 on vector 2 (masked), config on vector 0.
    t.negotiate(VIRTIO_F_VERSION_1);
    t.w16(MSIX_CONFIG, 0);
    t.w16(QUEUE_SELECT, 0);
    t.w16(QUEUE_MSIX_VECTOR, 1);
    t.w16(QUEUE_SELECT, 1);
    t.w16(QUEUE_MSIX_VECTOR, 2);
    t.setup_queue(0, 256, rings(0));
    t.setup_queue(1, 128, rings(1));
    t.driver_ok();
    let rec = t.rec.lock().unwrap();
    let (_, queues, shared) = &rec.activations[0];
    assert!(queues.iter().all(|q| q.irq.0.is_some()));
    // A raise of masked vector 2 shows in the PBA; the config vector (masked) too.
    queues[1].irq.trigger();
    shared.set_needs_reset();
    drop(rec);
    assert_eq!(t.r8(MSIX_PBA), 0b101);
    assert_eq!(t.read(MSIX_PBA + 1, 7), 0);
}

#[test]
fn pci_cfg_window_reaches_bar0() {
    let mut t = t();
    let (p, _, _, _) = vendor_cap(&mut t, 5);
    let set = |t: &mut T, bar: u8, off: u32, len: u32| {
        t.config_write(p + 4, &[bar]);
        t.config_write(p + 8, &off.to_le_bytes());
        t.config_write(p + 12, &len.to_le_bytes());
        assert_eq!(t.cfg_byte(p + 4), bar);
        assert_eq!(t.cfg_u32(p + 8), off);
        assert_eq!(t.cfg_u32(p + 12), len);
    };
    let data = p + 16;
    // Read the device feature word 1.
    set(&mut t, 0, DEVICE_FEATURE_SELECT as u32, 4);
    t.config_write(data, &1u32.to_le_bytes());
    set(&mut t, 0, DEVICE_FEATURE as u32, 4);
    assert_eq!(t.cfg_u32(data), (FEATURES >> 32) as u32);
    // Write the status byte, read it back both ways.
    set(&mut t, 0, DEVICE_STATUS as u32, 1);
    t.config_write(data, &[STATUS_ACKNOWLEDGE]);
    assert_eq!(t.cfg_u32(data), u32::from(STATUS_ACKNOWLEDGE));
    assert_eq!(t.status(), STATUS_ACKNOWLEDGE);
    // 16-bit: the queue size.
    set(&mut t, 0, QUEUE_SIZE as u32, 2);
    assert_eq!(t.cfg_u32(data), u32::from(MAX_SIZES[0]));
    // A notify through the window is forwarded and counted.
    t.bring_up(&[0]);
    let resets = t.rec.lock().unwrap().resets;
    set(&mut t, 0, NOTIFY as u32, 2);
    t.config_write(data, &[0, 0]);
    assert_eq!(t.dev.notify_exits().load(Ordering::Relaxed), 1);
    assert_eq!(
        t.rec.lock().unwrap().activations[0].1[0]
            .kick
            .read()
            .unwrap(),
        1
    );
    // Bad windows read zero and write nothing: another BAR, odd lengths, past the end.
    for (bar, off, len) in [
        (1u8, DEVICE_STATUS as u32, 1u32),
        (0xff, DEVICE_STATUS as u32, 1),
        (0, DEVICE_STATUS as u32, 3),
        (0, DEVICE_STATUS as u32, 0),
        (0, DEVICE_STATUS as u32, 8),
        (0, BAR_SIZE as u32 - 1, 2),
        (0, 0xffff_fffe, 4),
        (0, u32::MAX, 1),
    ] {
        set(&mut t, bar, off, len);
        assert_eq!(t.cfg_u32(data), 0, "window {bar} {off:#x} {len}");
        t.config_write(data, &[0, 0, 0, 0]);
    }
    assert_ne!(
        t.status() & STATUS_DRIVER_OK,
        0,
        "a bad window reset the device"
    );
    assert_eq!(t.rec.lock().unwrap().resets, resets);
    // Sub-dword writes to the data register at every byte offset.
    set(&mut t, 0, MSIX_CONFIG as u32, 2);
    for off in 0..4 {
        for len in 1..=4 {
            t.dev.write_config(data / 4, off, &[0u8, 0, 0, 0][..len]);
            let _ = t.dev.read_config(data / 4);
        }
    }
}

#[test]
fn bar_relocation_moves_the_ioeventfds() {
    let addrs = |t: &T| {
        t.io.live
            .lock()
            .unwrap()
            .keys()
            .copied()
            .collect::<Vec<_>>()
    };
    // BTreeMap order: the MMIO doorbells, then the port ones.
    let expect_at = |base: u64, port: u64| {
        let mmio =
            (0..MAX_SIZES.len() as u64).map(|i| Doorbell::Mmio(base + NOTIFY + i * NOTIFY_MULT));
        let pio = (0..MAX_SIZES.len() as u16).map(|queue| Doorbell::Pio { port, queue });
        mmio.chain(pio).collect::<Vec<_>>()
    };
    let expect = |base: u64| expect_at(base, PIO);
    let mut t = t();
    assert_eq!(addrs(&t), expect(BAR));
    let fds: Vec<i32> = t.io.live.lock().unwrap().values().copied().collect();
    // Below 4 GiB.
    t.dev.bar_mapping(0, Some(0xe000_0000)).unwrap();
    assert_eq!(addrs(&t), expect(0xe000_0000));
    // Above 4 GiB.
    t.dev.bar_mapping(0, Some(0x1_e000_0000)).unwrap();
    assert_eq!(addrs(&t), expect(0x1_e000_0000));
    // The same eventfds, in queue order.
    let now: Vec<i32> = t.io.live.lock().unwrap().values().copied().collect();
    assert_eq!(now, fds);
    // The port BAR moves its doorbells too, and leaves the MMIO ones where they are.
    t.dev.bar_mapping(PIO_BAR_INDEX, Some(0xd000)).unwrap();
    assert_eq!(addrs(&t), expect_at(0x1_e000_0000, 0xd000));
    let now: Vec<i32> = t.io.live.lock().unwrap().values().copied().collect();
    assert_eq!(now, fds);
    // Unrouted (decoding off, or a refused move): none of the BAR's doorbells is left,
    // and a notify that reaches the transport still kicks its queue.
    t.dev.bar_mapping(0, None).unwrap();
    assert_eq!(
        addrs(&t),
        expect_at(0x1_e000_0000, 0xd000)[MAX_SIZES.len()..].to_vec()
    );
    t.dev.bar_mapping(PIO_BAR_INDEX, None).unwrap();
    assert!(addrs(&t).is_empty());
    t.dev.bar_mapping(0, Some(0x1_e000_0000)).unwrap();
    // A running device keeps working and its kicks follow.
    t.bring_up(&[0]);
    // Dropping the device releases them all.
    let io = t.io.clone();
    drop(t);
    assert!(io.live.lock().unwrap().is_empty());
    // Unregistered: three MMIO moves (two moves, one unroute), two port ones, then the
    // MMIO ones at the drop.
    assert_eq!(io.unregistered.lock().unwrap().len(), 6 * MAX_SIZES.len());
}

/// A refused registration (KVM says EEXIST) is reported to the root, and nothing of it
/// is unregistered later (it was never registered).
#[test]
fn a_doorbell_that_cannot_be_registered_is_reported() {
    let mut t = t();
    let taken = Doorbell::Mmio(0xe000_0000 + NOTIFY + NOTIFY_MULT);
    let other = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    t.io.register(&other, taken).unwrap();
    let e = t.dev.bar_mapping(0, Some(0xe000_0000)).unwrap_err();
    assert_eq!(e.at, 0xe000_0000 + NOTIFY + NOTIFY_MULT);
    // The other queues' doorbells are there; the taken one is still the other fd's.
    assert_eq!(t.io.live.lock().unwrap()[&taken], other.as_raw_fd());
    t.dev.bar_mapping(0, None).unwrap();
    assert_eq!(t.io.live.lock().unwrap()[&taken], other.as_raw_fd());
}

/// Offsets worth trying in every region: each edge and its neighbours.
fn interesting_offsets() -> Vec<u64> {
    let mut v: Vec<u64> = (0..0x40).collect();
    for edge in [
        ISR,
        DEVCFG,
        DEVCFG + 0x1000,
        NOTIFY,
        NOTIFY + 0x1000,
        MSIX_TABLE,
        MSIX_TABLE + 0x40,
        MSIX_PBA,
        MSIX_PBA + 8,
        BAR_SIZE,
    ] {
        for d in 0..8 {
            v.push(edge + d);
            v.push(edge - 1 - d);
        }
    }
    v.extend([u64::MAX, u64::MAX - 7, 1 << 63, BAR_SIZE * 2]);
    v
}

#[test]
fn odd_access_sizes_and_offsets_never_panic() {
    let mut t = t();
    for off in interesting_offsets() {
        for len in 1..=8 {
            let mut d = [0x55u8; 8];
            t.dev.read_bar(0, off, &mut d[..len]);
            if off >= BAR_SIZE {
                assert_eq!(&d[..len], &[0u8; 8][..len], "read past the end at {off:#x}");
            }
            // Reads of common config fields at offsets no field starts at are zero.
            if off < 0x38 && off % 2 == 1 && off != 0x15 {
                assert_eq!(
                    &d[..len],
                    &[0u8; 8][..len],
                    "read inside a field at {off:#x}"
                );
            }
        }
    }
    // Writes of every size everywhere (except a reset, to keep the device running).
    t.bring_up(&[0]);
    for off in interesting_offsets() {
        for len in 1..=8 {
            let v = if off == DEVICE_STATUS { 0x0f } else { 0xff };
            t.dev.write_bar(0, off, &[v; 8][..len]);
            let mut d = [0u8; 8];
            t.dev.read_bar(0, off, &mut d[..len]);
        }
    }
    // Empty and oversized accesses.
    t.dev.read_bar(0, 0, &mut []);
    t.dev.write_bar(0, DEVICE_STATUS, &[]);
    let mut big = [0u8; 64];
    t.dev.read_bar(0, 0, &mut big);
    t.dev.write_bar(0, MSIX_TABLE, &big);
    // Configuration space: every register, every offset and size the bus can produce.
    for reg in 0..1100 {
        let _ = t.dev.read_config(reg);
    }
    for reg in 0..1100 {
        if reg == 4 || reg == 5 {
            continue;
        }
        for off in 0..4u64 {
            for len in 1..=(4 - off as usize) {
                t.dev.write_config(reg, off, &[0xff; 4][..len]);
            }
        }
    }
    // Identity registers are read-only.
    assert_eq!(t.dev.read_config(0), 0x1af4 | (0x1042 << 16));
}

/// A deterministic storm of random register accesses: must never panic, and the device
/// must still come up cleanly afterwards.
#[test]
fn random_register_storm() {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut t = t();
    let offsets = interesting_offsets();
    for _ in 0..20_000 {
        let r = next();
        let len = 1 + (r >> 8) as usize % 8;
        let off = match r % 4 {
            0 => offsets[(r >> 16) as usize % offsets.len()],
            1 => (r >> 16) % 0x40,
            _ => (r >> 16) % (BAR_SIZE + 0x10),
        };
        let val = next().to_le_bytes();
        match (r >> 60) % 4 {
            0 | 1 => t.dev.write_bar(0, off, &val[..len]),
            2 => {
                let mut d = [0u8; 8];
                t.dev.read_bar(0, off, &mut d[..len]);
            }
            _ => {
                let reg = (r >> 16) as usize % 80;
                let o = (r >> 24) % 4;
                let n = 1 + (r >> 32) as usize % (4 - o as usize);
                t.dev.write_config(reg, o, &val[..n]);
                let _ = t.dev.read_config(reg);
            }
        }
    }
    // Whatever happened, a reset and a proper bring-up work.
    t.w8(DEVICE_STATUS, 0);
    assert_eq!(t.status(), 0);
    let before = t.activations();
    assert_ne!(t.negotiate(VIRTIO_F_VERSION_1) & STATUS_FEATURES_OK, 0);
    t.setup_queue(0, 256, rings(0));
    t.driver_ok();
    assert_eq!(t.activations(), before + 1);
    assert_eq!(t.status() & STATUS_NEEDS_RESET, 0);
}

/// Two transports on a PCI root, driven through 0xCF8/0xCFC as a guest does: the doorbell
/// ioeventfds registered are exactly those of the BARs the root routes, whatever the guest
/// writes to the BARs and the command register.
#[test]
fn doorbells_follow_the_root_through_refused_moves_and_decode() {
    use crate::bus::{Bus, BusDevice};
    use crate::pci::{PciConfigIo, PciRoot, PciWindows};
    let mmio = Arc::new(Bus::new());
    let pio = Arc::new(Bus::new());
    let root = Arc::new(Mutex::new(PciRoot::new(
        mmio.clone(),
        pio.clone(),
        PciWindows::for_guest(512 << 20),
    )));
    let io = Arc::new(FakeIoEvents::default());
    let transport = |bars: (u64, u64)| {
        let rec = Arc::new(Mutex::new(Record::default()));
        let dev = VirtioPciDevice::new(
            "t",
            Box::new(FakeDevice {
                rec,
                fail_activate: false,
            }),
            bars,
            memory(),
            Arc::new(FakeRouter::default()),
            io.clone(),
        )
        .unwrap();
        Arc::new(Mutex::new(dev))
    };
    let a = root
        .lock()
        .unwrap()
        .add("a", transport((BAR, PIO)))
        .unwrap();
    let b = root
        .lock()
        .unwrap()
        .add("b", transport((BAR + BAR_SIZE, PIO + PIO_BAR_SIZE)))
        .unwrap();
    let mut cfg = PciConfigIo::new(root.clone());
    let mut w = |dev: u8, reg: u8, v: u32, len: usize| {
        let addr = 0x8000_0000u32 | (u32::from(dev) << 11) | u32::from(reg);
        cfg.write(0, &addr.to_le_bytes());
        cfg.write(4, &v.to_le_bytes()[..len]);
    };
    let live = |io: &FakeIoEvents| io.live.lock().unwrap().keys().copied().collect::<Vec<_>>();
    let of = |base: Option<u64>, port: Option<u64>| {
        let mut v: Vec<Doorbell> = (0..MAX_SIZES.len() as u64)
            .flat_map(|i| {
                let m = base.map(|b| Doorbell::Mmio(b + NOTIFY + i * NOTIFY_MULT));
                let p = port.map(|port| Doorbell::Pio {
                    port,
                    queue: i as u16,
                });
                m.into_iter().chain(p)
            })
            .collect();
        v.sort();
        v
    };
    let both = |a: (Option<u64>, Option<u64>), b: (Option<u64>, Option<u64>)| {
        let mut v = of(a.0, a.1);
        v.extend(of(b.0, b.1));
        v.sort();
        v
    };
    assert_eq!((a, b), (1, 2));
    let b_at = (Some(BAR + BAR_SIZE), Some(PIO + PIO_BAR_SIZE));
    assert_eq!(live(&io), both((Some(BAR), Some(PIO)), b_at));
    // A's port BAR onto 0xCF8, then onto B's port: refused, no port doorbell of A left.
    w(a, 0x18, 0xcf8, 4);
    assert_eq!(live(&io), both((Some(BAR), None), b_at));
    w(a, 0x18, (PIO + PIO_BAR_SIZE) as u32, 4);
    assert_eq!(live(&io), both((Some(BAR), None), b_at));
    // A's BAR 0 onto guest RAM: no MMIO doorbell of A anywhere.
    w(a, 0x10, 0x10_0000 | 0x4, 4);
    assert_eq!(live(&io), both((None, None), b_at));
    // Back where they were: registered again, B untouched throughout.
    w(a, 0x10, BAR as u32 | 0x4, 4);
    w(a, 0x18, PIO as u32 | 1, 4);
    assert_eq!(live(&io), both((Some(BAR), Some(PIO)), b_at));
    // Decode off (Memory only): the MMIO doorbells go, the port ones stay.
    w(a, 0x04, 0x1, 2);
    assert_eq!(live(&io), both((None, Some(PIO)), b_at));
    w(a, 0x04, 0x3, 2);
    assert_eq!(live(&io), both((Some(BAR), Some(PIO)), b_at));
    // The buses agree: A's notify area reaches A, 0xCF8 is not A's.
    let mut d = [0u8; 2];
    assert!(mmio.read(BAR + QUEUE_SELECT, &mut d));
    let fixed: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(PciConfigIo::new(root.clone())));
    pio.insert("pci-config", fixed.clone(), 0xcf8, 8).unwrap();
    w(a, 0x18, 0xcf8, 4);
    w(a, 0x18, PIO as u32 | 1, 4);
    assert!(pio.owned_by(0xcf8, &fixed));
    // Tearing the root down leaves no doorbell registered.
    let devices = root.lock().unwrap().take_devices();
    drop(devices);
    assert!(live(&io).is_empty());
    assert!(mmio.ranges().is_empty());
}
