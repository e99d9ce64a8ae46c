//! A polling virtio-pci modern driver (virtio 1.2, sections 2.7 and 4.1): finds a device on
//! bus 0, negotiates VERSION_1 plus what the caller asks for, sets up split virtqueues in guest
//! RAM, and runs without interrupts: MSI-X vectors are NO_VECTOR, the avail ring asks for no
//! interrupts, and completions are found by polling the used ring. A notify is skipped while
//! the device says it does not need one (VIRTQ_USED_F_NO_NOTIFY, e.g. a polling iothread).

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{compiler_fence, fence, Ordering};

use crate::pci::{self, Function};

pub const VENDOR_VIRTIO: u16 = 0x1af4;
pub const TYPE_NET: u16 = 1;
pub const TYPE_BLOCK: u16 = 2;
pub const F_VERSION_1: u64 = 1 << 32;

const PCI_CAP_ID_VNDR: u8 = 0x09;
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;

// Common configuration registers.
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const MSIX_CONFIG: u64 = 0x10;
const DEVICE_STATUS: u64 = 0x14;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

const STATUS_ACKNOWLEDGE: u8 = 1;
const STATUS_DRIVER: u8 = 2;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_NEEDS_RESET: u8 = 0x40;
const STATUS_FAILED: u8 = 0x80;
const NO_VECTOR: u16 = 0xffff;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;

/// Guest RAM the probe owns for rings and buffers: well above the ELF (link.ld asserts the
/// image ends below it) and below the sample area ([`SAMPLES_BASE`]).
pub const DMA_BASE: u64 = 0x0200_0000;
pub const DMA_END: u64 = 0x0300_0000;
/// Where the timing samples are kept (16 MiB: 2 Mi u64 samples).
pub const SAMPLES_BASE: u64 = 0x0300_0000;
pub const SAMPLES_END: u64 = 0x0400_0000;

fn mmio_read8(addr: u64) -> u8 {
    // SAFETY: `addr` is inside a BAR region of a device this driver owns (uncached, identity
    // mapped); reads of virtio registers have no side effects beyond the ISR, never read here.
    unsafe { read_volatile(addr as *const u8) }
}
fn mmio_read16(addr: u64) -> u16 {
    // SAFETY: as for `mmio_read8`.
    unsafe { read_volatile(addr as *const u16) }
}
fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: as for `mmio_read8`.
    unsafe { read_volatile(addr as *const u32) }
}
fn mmio_write8(addr: u64, v: u8) {
    // SAFETY: `addr` is a register of a device this driver owns; the write is what the driver
    // means to do.
    unsafe { write_volatile(addr as *mut u8, v) }
}
fn mmio_write16(addr: u64, v: u16) {
    // SAFETY: as for `mmio_write8`.
    unsafe { write_volatile(addr as *mut u16, v) }
}
fn mmio_write32(addr: u64, v: u32) {
    // SAFETY: as for `mmio_write8`.
    unsafe { write_volatile(addr as *mut u32, v) }
}

/// A bump allocator over [`DMA_BASE`, `DMA_END`): zeroed, aligned blocks, never freed.
pub struct Dma {
    next: u64,
}

impl Dma {
    pub fn new() -> Self {
        Dma { next: DMA_BASE }
    }

    /// `size` zeroed bytes aligned to `align` (a power of two).
    pub fn alloc(&mut self, size: u64, align: u64) -> u64 {
        let at = self.next.next_multiple_of(align);
        if at + size > DMA_END {
            panic!("probe DMA area exhausted ({size} bytes wanted at {at:#x})");
        }
        self.next = at + size;
        // SAFETY: [at, at + size) is in the probe's own RAM area (see DMA_BASE), identity
        // mapped, and handed out once.
        unsafe { core::ptr::write_bytes(at as *mut u8, 0, size as usize) };
        at
    }
}

/// A virtio-pci modern device on bus 0.
pub struct Device {
    pub func: Function,
    common: u64,
    notify_base: u64,
    notify_mul: u32,
    pub device_cfg: u64,
}

/// Why a device cannot be used.
pub type Error = &'static str;

impl Device {
    /// The first virtio device of `device_type` on bus 0 (modern ID 0x1040 + type, or a
    /// transitional ID whose subsystem ID is the type).
    pub fn find(device_type: u16) -> Result<Device, Error> {
        Device::find_nth(device_type, 0)
    }

    /// The `nth` (from 0, in bus order) virtio device of `device_type` on bus 0.
    pub fn find_nth(device_type: u16, nth: usize) -> Result<Device, Error> {
        let mut found = None;
        let mut seen = 0;
        pci::scan_bus0(|f| {
            let (vendor, device) = f.vendor_device();
            let matches = vendor == VENDOR_VIRTIO
                && (device == 0x1040 + device_type
                    || ((0x1000..0x1040).contains(&device) && f.subsystem_id() == device_type));
            if matches {
                if seen == nth {
                    found = Some(f);
                }
                seen += 1;
            }
        });
        Device::open(found.ok_or("no virtio device of this type on PCI bus 0")?)
    }

    /// The virtio device at `func`, with the addresses its BARs hold now (a BAR left
    /// unassigned gets one).
    pub fn open(func: Function) -> Result<Device, Error> {
        let mut bars: [Option<u64>; 6] = [None; 6];
        let mut bar_addr = |index: u8| -> Result<u64, Error> {
            let slot = bars
                .get_mut(usize::from(index))
                .ok_or("capability names BAR > 5")?;
            if slot.is_none() {
                *slot = Some(pci::memory_bar(func, index).ok_or("BAR is not a usable memory BAR")?);
            }
            slot.ok_or("BAR")
        };
        let (mut common, mut notify, mut isr, mut device_cfg) = (None, None, None, None);
        let mut notify_mul = 0;
        for (at, id) in func.capabilities() {
            if id != PCI_CAP_ID_VNDR {
                continue;
            }
            let cfg_type = func.read8(at + 3);
            let bar = func.read8(at + 4);
            let offset = u64::from(func.read32(at + 8));
            let slot = match cfg_type {
                CAP_COMMON => &mut common,
                CAP_NOTIFY => &mut notify,
                CAP_ISR => &mut isr,
                CAP_DEVICE => &mut device_cfg,
                _ => continue,
            };
            if slot.is_none() {
                match bar_addr(bar) {
                    Ok(base) => {
                        *slot = Some(base + offset);
                        if cfg_type == CAP_NOTIFY {
                            notify_mul = func.read32(at + 16);
                        }
                    }
                    // A doorbell in port I/O space (our vmm offers one before the memory
                    // one): this driver rings memory doorbells only, so it takes the next.
                    Err(_) if cfg_type == CAP_NOTIFY => continue,
                    Err(e) => return Err(e),
                }
            }
        }
        let _ = isr;
        Ok(Device {
            func,
            common: common.ok_or("no common configuration capability")?,
            notify_base: notify.ok_or("no notify capability")?,
            notify_mul,
            device_cfg: device_cfg.unwrap_or(0),
        })
    }

    pub fn status(&self) -> u8 {
        mmio_read8(self.common + DEVICE_STATUS)
    }

    pub fn set_status(&self, s: u8) {
        mmio_write8(self.common + DEVICE_STATUS, s);
    }

    /// Reset, acknowledge, and negotiate `wanted & offered`; VERSION_1 is required and
    /// always taken. Returns the negotiated features.
    pub fn negotiate(&self, wanted: u64) -> Result<u64, Error> {
        self.set_status(0);
        let mut spins = 0u32;
        while self.status() != 0 {
            spins += 1;
            if spins > 1_000_000 {
                return Err("device does not finish its reset");
            }
            core::hint::spin_loop();
        }
        self.set_status(STATUS_ACKNOWLEDGE);
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        mmio_write32(self.common + DEVICE_FEATURE_SELECT, 0);
        let lo = mmio_read32(self.common + DEVICE_FEATURE);
        mmio_write32(self.common + DEVICE_FEATURE_SELECT, 1);
        let hi = mmio_read32(self.common + DEVICE_FEATURE);
        let offered = (u64::from(hi) << 32) | u64::from(lo);
        if offered & F_VERSION_1 == 0 {
            self.set_status(STATUS_FAILED);
            return Err("device does not offer VIRTIO_F_VERSION_1");
        }
        let take = offered & (wanted | F_VERSION_1);
        mmio_write32(self.common + DRIVER_FEATURE_SELECT, 0);
        mmio_write32(self.common + DRIVER_FEATURE, take as u32);
        mmio_write32(self.common + DRIVER_FEATURE_SELECT, 1);
        mmio_write32(self.common + DRIVER_FEATURE, (take >> 32) as u32);
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        if self.status() & STATUS_FEATURES_OK == 0 {
            self.set_status(STATUS_FAILED);
            return Err("device refused the features (FEATURES_OK not kept)");
        }
        mmio_write16(self.common + MSIX_CONFIG, NO_VECTOR);
        Ok(take)
    }

    /// Sets up queue `index` with at most `max_size` entries (a power of two) in `dma`.
    pub fn setup_queue(&self, index: u16, max_size: u16, dma: &mut Dma) -> Result<Virtq, Error> {
        let c = self.common;
        mmio_write16(c + QUEUE_SELECT, index);
        let dev_max = mmio_read16(c + QUEUE_SIZE);
        if dev_max == 0 {
            return Err("queue not available");
        }
        let size = dev_max.min(max_size);
        mmio_write16(c + QUEUE_SIZE, size);
        mmio_write16(c + QUEUE_MSIX_VECTOR, NO_VECTOR);
        let n = u64::from(size);
        let desc = dma.alloc(16 * n, 4096);
        let avail = dma.alloc(6 + 2 * n, 4096);
        let used = dma.alloc(6 + 8 * n, 4096);
        for (reg, addr) in [
            (QUEUE_DESC, desc),
            (QUEUE_DRIVER, avail),
            (QUEUE_DEVICE, used),
        ] {
            mmio_write32(c + reg, addr as u32);
            mmio_write32(c + reg + 4, (addr >> 32) as u32);
        }
        let notify_off = mmio_read16(c + QUEUE_NOTIFY_OFF);
        mmio_write16(c + QUEUE_ENABLE, 1);
        let q = Virtq {
            index,
            size,
            desc,
            avail,
            used,
            notify: self.notify_base + u64::from(notify_off) * u64::from(self.notify_mul),
            avail_idx: 0,
            last_used: 0,
            notifies: 0,
            suppressed: 0,
        };
        // No interrupts: this driver polls.
        q.write_avail16(0, AVAIL_F_NO_INTERRUPT);
        Ok(q)
    }

    /// DRIVER_OK; fails if the device then asks for a reset.
    pub fn driver_ok(&self) -> Result<(), Error> {
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        if self.status() & (STATUS_NEEDS_RESET | STATUS_FAILED) != 0 {
            return Err("device needs a reset after DRIVER_OK (queue set-up refused)");
        }
        Ok(())
    }

    pub fn config_read8(&self, offset: u64) -> u8 {
        mmio_read8(self.device_cfg + offset)
    }

    pub fn config_read32(&self, offset: u64) -> u32 {
        mmio_read32(self.device_cfg + offset)
    }
}

/// A split virtqueue driven by polling.
pub struct Virtq {
    pub index: u16,
    pub size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    notify: u64,
    avail_idx: u16,
    last_used: u16,
    /// Doorbells written, and doorbells skipped because the device asked for none.
    pub notifies: u64,
    pub suppressed: u64,
}

impl Virtq {
    /// Guest addresses of the descriptor table, the available ring and the used ring.
    pub fn rings(&self) -> (u64, u64, u64) {
        (self.desc, self.avail, self.used)
    }

    /// The used index the device last published.
    pub fn used_idx(&self) -> u16 {
        self.read_used16(2)
    }

    /// Rings the queue's doorbell.
    pub fn notify(&mut self) {
        self.notifies += 1;
        mmio_write16(self.notify, self.index);
    }

    fn write_avail16(&self, offset: u64, v: u16) {
        // SAFETY: the avail ring was allocated for `size` entries by `setup_queue`; every
        // offset used is within it (flags, idx, ring[i < size]).
        unsafe { write_volatile((self.avail + offset) as *mut u16, v) }
    }

    fn read_used16(&self, offset: u64) -> u16 {
        // SAFETY: the used ring was allocated for `size` entries; flags and idx are in it.
        unsafe { read_volatile((self.used + offset) as *const u16) }
    }

    /// Fills descriptor `i` (< size).
    pub fn set_desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let i = u64::from(i % self.size);
        let d = (self.desc + 16 * i) as *mut u64;
        // SAFETY: descriptor i of the table `setup_queue` allocated (16 bytes each); the device
        // reads it only after the head is published in the avail ring.
        unsafe {
            write_volatile(d, addr);
            write_volatile(d.add(1) as *mut u32, len);
            write_volatile((d as *mut u16).add(6), flags);
            write_volatile((d as *mut u16).add(7), next);
        }
    }

    /// Puts the chain starting at `head` in the avail ring (not yet visible: see `publish`).
    pub fn push(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.write_avail16(4 + 2 * slot, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Makes pushed chains visible to the device and rings its doorbell unless it said it
    /// needs none.
    pub fn publish_and_notify(&mut self) {
        if self.publish() {
            mmio_write16(self.notify, self.index);
        }
    }

    /// Makes pushed chains visible to the device; returns whether it needs a doorbell
    /// (counted in `notifies`), which the caller rings where it chooses.
    pub fn publish(&mut self) -> bool {
        // Descriptors and ring entries before the index (x86 keeps stores in order; this
        // stops the compiler from reordering).
        compiler_fence(Ordering::Release);
        self.write_avail16(2, self.avail_idx);
        // The index store before the read of the device's flags (store-load: a real fence).
        fence(Ordering::SeqCst);
        if self.read_used16(0) & USED_F_NO_NOTIFY == 0 {
            self.notifies += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// The next used element, if the device has returned one: (head id, bytes written).
    #[inline(always)]
    pub fn poll_used(&mut self) -> Option<(u16, u32)> {
        if self.read_used16(2) == self.last_used {
            return None;
        }
        // The element is read after the index that published it.
        compiler_fence(Ordering::Acquire);
        let slot = u64::from(self.last_used % self.size);
        let e = self.used + 4 + 8 * slot;
        // SAFETY: used element `slot` (< size) of the ring `setup_queue` allocated.
        let (id, len) = unsafe {
            (
                read_volatile(e as *const u32),
                read_volatile((e + 4) as *const u32),
            )
        };
        self.last_used = self.last_used.wrapping_add(1);
        Some((id as u16, len))
    }
}
