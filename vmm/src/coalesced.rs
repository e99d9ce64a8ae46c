//! Coalesced port writes: for the ports registered here KVM appends guest writes to a ring page
//! (one per VM, shared by all vCPUs) instead of exiting to userspace. Whichever vCPU thread
//! exits next applies them, in order, before it handles its own exit.
//!
//! Only the PCI configuration address register (0xCF8) is coalesced, as QEMU does on its PC
//! machines: configuration mechanism #1 costs two port exits per access (select the register
//! at 0xCF8, then read or write it at 0xCFC), and the second one always exits, so the address
//! it uses is applied before it is read. Linux selects registers through it tens of thousands
//! of times per boot (on AMD CPUs it also scans every bus and slot for an AGP bridge): Debian's
//! generic kernel boots with ~18,000 exits to userspace instead of ~35,000.
//! Writes to 0xCF9..0xCFB land in the ring too; no device of ours uses them (the reset
//! register is ACPI's, at another port).

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use kvm_bindings::{kvm_coalesced_mmio, KVM_COALESCED_MMIO_PAGE_OFFSET};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};

use passthrough::vfio::Mapping;

use crate::bus::Bus;

/// The ring header: `first` (userspace's read index) and `last` (KVM's write index).
const HEADER: usize = 8;
const ENTRY: usize = std::mem::size_of::<kvm_coalesced_mmio>();

/// KVM's coalesced I/O ring.
pub struct CoalescedRing {
    /// The ring page (KVM's, mapped from a vCPU fd; anonymous memory in tests).
    _page: Mapping,
    base: NonNull<u8>,
    entries: u32,
    /// One drainer at a time: the ring is shared by every vCPU thread.
    lock: Mutex<()>,
}

// SAFETY: the ring page is plain shared memory; the indices are accessed atomically and
// entries are only read by the thread holding `lock`.
unsafe impl Send for CoalescedRing {}
// SAFETY: as above.
unsafe impl Sync for CoalescedRing {}

impl CoalescedRing {
    /// Registers the PCI configuration address port for coalescing and maps the ring from
    /// `vcpu`. `None` when KVM cannot coalesce port writes (every write then exits as usual).
    pub fn for_pci_config_address(kvm: &Kvm, vm: &VmFd, vcpu: &VcpuFd, port: u16) -> Option<Self> {
        if !kvm.check_extension(Cap::CoalescedPio) {
            log::debug!("KVM has no KVM_CAP_COALESCED_PIO: PCI config address writes exit");
            return None;
        }
        let ring = match Self::map(vcpu) {
            Ok(r) => r,
            Err(e) => {
                log::debug!(
                    "cannot map KVM's coalesced I/O ring: {e}; PCI config address writes exit"
                );
                return None;
            }
        };
        if let Err(e) = vm.register_coalesced_mmio(IoEventAddress::Pio(u64::from(port)), 4) {
            log::debug!("cannot coalesce writes to port {port:#x}: {e}; they exit");
            return None;
        }
        Some(ring)
    }

    fn map(vcpu: &VcpuFd) -> std::io::Result<Self> {
        // SAFETY: sysconf has no memory side effects.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let len = u64::try_from(page).map_err(|_| std::io::Error::last_os_error())?;
        // KVM's documented place for the ring: page KVM_COALESCED_MMIO_PAGE_OFFSET of the
        // vCPU fd (one ring per VM, whichever vCPU maps it).
        let offset = u64::from(KVM_COALESCED_MMIO_PAGE_OFFSET) * len;
        Self::new(Mapping::from_fd(vcpu, offset, len)?)
    }

    fn new(page: Mapping) -> std::io::Result<Self> {
        let base = NonNull::new(page.addr())
            .ok_or_else(|| std::io::Error::other("coalesced ring mapped at address 0"))?;
        let entries = (page.len().saturating_sub(HEADER) / ENTRY) as u32;
        if entries < 2 {
            return Err(std::io::Error::other("coalesced ring page too small"));
        }
        Ok(CoalescedRing {
            _page: page,
            base,
            entries,
            lock: Mutex::new(()),
        })
    }

    fn index(&self, offset: usize) -> &AtomicU32 {
        // SAFETY: offset is 0 or 4, inside the page, and 4-byte aligned (the page is).
        unsafe { AtomicU32::from_ptr(self.base.as_ptr().add(offset).cast::<u32>()) }
    }

    /// Applies every buffered write, oldest first, to `pio` (port writes) or `mmio` (which
    /// count them: [`Bus::buffered`]); returns how many. Call it before handling any exit.
    pub fn drain(&self, pio: &Bus, mmio: &Bus) -> usize {
        let (first_idx, last_idx) = (self.index(0), self.index(4));
        // Cheap check without the lock: nearly every exit finds the ring empty.
        if first_idx.load(Ordering::Relaxed) == last_idx.load(Ordering::Acquire) {
            return 0;
        }
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut first = first_idx.load(Ordering::Relaxed);
        // KVM fills an entry before it moves `last` past it.
        let last = last_idx.load(Ordering::Acquire);
        let mut n = 0;
        while first != last {
            if first >= self.entries || last >= self.entries {
                // Indices KVM would never write: drop what is there rather than read outside
                // the page.
                log::error!("coalesced I/O ring indices out of range ({first}, {last}); dropped");
                first_idx.store(last, Ordering::Release);
                break;
            }
            // SAFETY: first < entries, so the entry lies inside the page; KVM wrote it before
            // publishing `last` (acquire above) and does not touch it until `first` moves on.
            let e: kvm_coalesced_mmio = unsafe {
                self.base
                    .as_ptr()
                    .add(HEADER + first as usize * ENTRY)
                    .cast::<kvm_coalesced_mmio>()
                    .read_volatile()
            };
            let len = (e.len as usize).min(e.data.len());
            // SAFETY: `pio` is the union member KVM sets for zones registered as port I/O;
            // both members are a u32.
            let is_pio = unsafe { e.__bindgen_anon_1.pio } != 0;
            let bus = if is_pio { pio } else { mmio };
            bus.write_buffered(e.phys_addr, &e.data[..len]);
            first = (first + 1) % self.entries;
            // Hand the slot back to KVM.
            first_idx.store(first, Ordering::Release);
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use std::sync::{Arc, Mutex as StdMutex};

    /// Writes a device saw: (offset, bytes).
    type Writes = Arc<StdMutex<Vec<(u64, Vec<u8>)>>>;

    struct Log(Writes);
    impl BusDevice for Log {
        fn read(&mut self, _: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().push((offset, data.to_vec()));
        }
    }

    /// A 4 KiB ring in plain memory, and a "KVM" that appends entries to it.
    fn ring() -> CoalescedRing {
        CoalescedRing::new(Mapping::anonymous(4096).unwrap()).unwrap()
    }

    fn push(r: &CoalescedRing, addr: u64, data: &[u8], pio: bool) {
        let last = r.index(4).load(Ordering::Relaxed);
        let mut e = kvm_coalesced_mmio {
            phys_addr: addr,
            len: data.len() as u32,
            ..Default::default()
        };
        e.__bindgen_anon_1.pio = pio as u32;
        e.data[..data.len()].copy_from_slice(data);
        // SAFETY: last < entries: inside the test's page.
        unsafe {
            r.base
                .as_ptr()
                .add(HEADER + last as usize * ENTRY)
                .cast::<kvm_coalesced_mmio>()
                .write(e)
        };
        r.index(4).store((last + 1) % r.entries, Ordering::Release);
    }

    fn buses() -> (Bus, Bus, Writes) {
        let log = Arc::new(StdMutex::new(Vec::new()));
        let pio = Bus::new();
        pio.insert(
            "pci-config",
            Arc::new(StdMutex::new(Log(log.clone()))),
            0xcf8,
            8,
        )
        .unwrap();
        (pio, Bus::new(), log)
    }

    #[test]
    fn writes_are_applied_in_order_and_not_counted_as_exits() {
        let r = ring();
        let (pio, mmio, log) = buses();
        assert_eq!(r.drain(&pio, &mmio), 0);
        push(&r, 0xcf8, &0x8000_0800u32.to_le_bytes(), true);
        push(&r, 0xcf8, &0x8000_1000u32.to_le_bytes(), true);
        assert_eq!(r.drain(&pio, &mmio), 2);
        assert_eq!(
            *log.lock().unwrap(),
            vec![
                (0, 0x8000_0800u32.to_le_bytes().to_vec()),
                (0, 0x8000_1000u32.to_le_bytes().to_vec())
            ]
        );
        assert_eq!(r.drain(&pio, &mmio), 0);
        // Applied writes are not exits: the device's exit counter stays at 0.
        assert_eq!(pio.counters().0["pci-config"], 0);
        assert_eq!(pio.buffered(), 2);
    }

    #[test]
    fn the_ring_wraps_around() {
        let r = ring();
        let (pio, mmio, log) = buses();
        let n = r.entries as usize;
        // Fill and drain past the end of the ring three times.
        for round in 0..3u32 {
            for i in 0..n - 1 {
                push(&r, 0xcf8, &(round * 1000 + i as u32).to_le_bytes(), true);
            }
            assert_eq!(r.drain(&pio, &mmio), n - 1);
        }
        let log = log.lock().unwrap();
        assert_eq!(log.len(), 3 * (n - 1));
        assert_eq!(log.last().unwrap().1, (2000 + n as u32 - 2).to_le_bytes());
    }

    #[test]
    fn corrupt_indices_do_not_read_outside_the_page() {
        let r = ring();
        let (pio, mmio, log) = buses();
        r.index(4).store(r.entries + 7, Ordering::Release);
        assert_eq!(r.drain(&pio, &mmio), 0);
        assert!(log.lock().unwrap().is_empty());
        assert_eq!(r.index(0).load(Ordering::Relaxed), r.entries + 7);
    }

    #[test]
    fn mmio_entries_go_to_the_mmio_bus_and_lengths_are_clamped() {
        let r = ring();
        let (pio, mmio, _) = buses();
        let mlog = Arc::new(StdMutex::new(Vec::new()));
        mmio.insert(
            "dev",
            Arc::new(StdMutex::new(Log(mlog.clone()))),
            0x1000,
            0x100,
        )
        .unwrap();
        push(&r, 0x1010, &[1, 2], false);
        // A length beyond the entry's 8 data bytes is clamped.
        push(&r, 0x1020, &[3; 8], false);
        let last = r.index(4).load(Ordering::Relaxed);
        // SAFETY: the entry just written, inside the page.
        unsafe {
            let p = r
                .base
                .as_ptr()
                .add(HEADER + (last as usize - 1) * ENTRY)
                .cast::<kvm_coalesced_mmio>();
            (*p).len = 100;
        }
        assert_eq!(r.drain(&pio, &mmio), 2);
        assert_eq!(
            *mlog.lock().unwrap(),
            vec![(0x10, vec![1, 2]), (0x20, vec![3; 8])]
        );
    }
}
