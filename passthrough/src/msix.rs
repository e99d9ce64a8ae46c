//! MSI-X: the vector table and PBA as the guest sees them, each vector backed by a KVM MSI
//! route and an irqfd. Whoever raises a vector (a virtio device thread, VFIO) writes its
//! irqfd; the VMM is not on the interrupt path.
//!
//! Masking: a masked vector (entry mask bit, function mask, or MSI-X disabled) has its
//! irqfd detached from KVM, so a raise only bumps the eventfd counter. Reading the PBA
//! collects such pending raises; unmasking re-attaches the irqfd and re-raises what is
//! pending, which KVM delivers at once.

use std::io;
use std::sync::Arc;

use backends::ratelimit::GuestErrorLog;
use vmm_sys_util::eventfd::EventFd;

use crate::interrupt::{InterruptRouter, MsiMessage};

pub const MSIX_ENTRY_SIZE: u64 = 16;
const ENTRY_MASKED: u32 = 1;
/// Message Control bits of the capability.
pub const MSIX_ENABLE: u16 = 1 << 15;
pub const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// The most vectors a function may have.
pub const MSIX_MAX_VECTORS: u16 = 2048;

#[derive(Debug, Clone, Copy)]
struct Entry {
    msg: MsiMessage,
    ctrl: u32,
}

impl Default for Entry {
    fn default() -> Self {
        Entry {
            msg: MsiMessage::default(),
            ctrl: ENTRY_MASKED,
        }
    }
}

/// One vector: its GSI and the irqfd that raises it.
pub struct Vector {
    pub gsi: u32,
    pub irqfd: EventFd,
    attached: bool,
    pending: bool,
}

pub struct Msix {
    entries: Vec<Entry>,
    vectors: Vec<Vector>,
    enabled: bool,
    function_masked: bool,
    router: Arc<dyn InterruptRouter>,
    /// Routes KVM refused (one kind).
    errors: GuestErrorLog<1>,
}

impl Msix {
    pub fn new(count: u16, router: Arc<dyn InterruptRouter>) -> io::Result<Self> {
        let count = count.clamp(1, MSIX_MAX_VECTORS);
        let mut vectors = Vec::new();
        for _ in 0..count {
            vectors.push(Vector {
                gsi: router.allocate_gsi()?,
                irqfd: EventFd::new(libc::EFD_NONBLOCK)?,
                attached: false,
                pending: false,
            });
        }
        Ok(Msix {
            entries: vec![Entry::default(); usize::from(count)],
            vectors,
            enabled: false,
            function_masked: false,
            router,
            errors: GuestErrorLog::new("msix"),
        })
    }

    pub fn count(&self) -> u16 {
        self.entries.len() as u16
    }

    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * MSIX_ENTRY_SIZE
    }

    pub fn pba_size(&self) -> u64 {
        (self.entries.len() as u64).div_ceil(64) * 8
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The GSI of vector `v`.
    pub fn gsi(&self, v: u16) -> Option<u32> {
        self.vectors.get(usize::from(v)).map(|x| x.gsi)
    }

    /// A duplicate of vector `v`'s irqfd, for the code that raises it.
    pub fn irqfd(&self, v: u16) -> Option<io::Result<EventFd>> {
        self.vectors
            .get(usize::from(v))
            .map(|x| x.irqfd.try_clone())
    }

    /// Message Control written through the capability.
    pub fn set_control(&mut self, control: u16) {
        let enabled = control & MSIX_ENABLE != 0;
        let masked = control & MSIX_FUNCTION_MASK != 0;
        if enabled == self.enabled && masked == self.function_masked {
            return;
        }
        self.enabled = enabled;
        self.function_masked = masked;
        for i in 0..self.entries.len() {
            self.update(i);
        }
    }

    /// The GSIs of the vectors that are deliverable now (enabled, function and entry
    /// unmasked): those whose irqfd must be attached.
    pub fn live_gsis(&self) -> Vec<u32> {
        if !self.enabled || self.function_masked {
            return Vec::new();
        }
        self.entries
            .iter()
            .zip(&self.vectors)
            .filter(|(e, _)| e.ctrl & ENTRY_MASKED == 0)
            .map(|(_, v)| v.gsi)
            .collect()
    }

    /// Route failures so far.
    pub fn route_errors(&self) -> u64 {
        self.errors.count(0)
    }

    pub fn control_bits(&self) -> u16 {
        (if self.enabled { MSIX_ENABLE } else { 0 })
            | (if self.function_masked {
                MSIX_FUNCTION_MASK
            } else {
                0
            })
    }

    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        let idx = (offset / MSIX_ENTRY_SIZE) as usize;
        let field = offset % MSIX_ENTRY_SIZE;
        let Some(e) = self.entries.get(idx) else {
            data.fill(0);
            return;
        };
        let words = [e.msg.addr_lo, e.msg.addr_hi, e.msg.data, e.ctrl];
        let mut bytes = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        let start = field as usize;
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(start + i).copied().unwrap_or(0);
        }
    }

    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let idx = (offset / MSIX_ENTRY_SIZE) as usize;
        let field = (offset % MSIX_ENTRY_SIZE) as usize;
        // Dword or qword accesses within one entry, as the PCI spec allows.
        if !(data.len() == 4 || data.len() == 8) || field % 4 != 0 || field + data.len() > 16 {
            return;
        }
        let Some(e) = self.entries.get_mut(idx) else {
            return;
        };
        for (k, chunk) in data.chunks(4).enumerate() {
            let v = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            match field / 4 + k {
                0 => e.msg.addr_lo = v,
                1 => e.msg.addr_hi = v,
                2 => e.msg.data = v,
                _ => e.ctrl = v & ENTRY_MASKED,
            }
        }
        self.update(idx);
    }

    pub fn read_pba(&mut self, offset: u64, data: &mut [u8]) {
        // Collect raises of masked vectors.
        for v in self.vectors.iter_mut().filter(|v| !v.attached) {
            if v.irqfd.read().is_ok() {
                v.pending = true;
            }
        }
        let mut bytes = vec![0u8; self.pba_size() as usize];
        for (i, v) in self.vectors.iter().enumerate() {
            if v.pending {
                bytes[i / 8] |= 1 << (i % 8);
            }
        }
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn update(&mut self, i: usize) {
        let (Some(e), Some(v)) = (self.entries.get(i), self.vectors.get_mut(i)) else {
            return;
        };
        let deliverable = self.enabled && !self.function_masked && e.ctrl & ENTRY_MASKED == 0;
        let result = if deliverable {
            let r = self.router.set_msi_route(v.gsi, e.msg);
            if r.is_ok() && !v.attached {
                // A raise that happened while masked: keep it for delivery.
                if v.irqfd.read().is_ok() {
                    v.pending = true;
                }
                let r = self.router.register_irqfd(&v.irqfd, v.gsi);
                if r.is_ok() {
                    v.attached = true;
                    if std::mem::take(&mut v.pending) {
                        let _ = v.irqfd.write(1);
                    }
                }
                r
            } else {
                r
            }
        } else if v.attached {
            v.attached = false;
            self.router.unregister_irqfd(&v.irqfd, v.gsi)
        } else {
            Ok(())
        };
        if let Err(e) = result {
            let gsi = v.gsi;
            self.errors
                .record(0, format_args!("cannot route vector {i} (gsi {gsi}): {e}"));
        }
    }
}

impl Drop for Msix {
    fn drop(&mut self) {
        for v in &self.vectors {
            if v.attached {
                let _ = self.router.unregister_irqfd(&v.irqfd, v.gsi);
            }
            let _ = self.router.release_gsi(v.gsi);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::fake::FakeRouter;

    fn write_entry(m: &mut Msix, i: u64, addr: u32, data: u32, ctrl: u32) {
        m.write_table(i * 16, &addr.to_le_bytes());
        m.write_table(i * 16 + 4, &0u32.to_le_bytes());
        m.write_table(i * 16 + 8, &data.to_le_bytes());
        m.write_table(i * 16 + 12, &ctrl.to_le_bytes());
    }

    #[test]
    fn routes_follow_enable_and_masks() {
        let router = Arc::new(FakeRouter::default());
        let mut m = Msix::new(3, router.clone()).unwrap();
        let gsi0 = m.vectors[0].gsi;
        write_entry(&mut m, 0, 0xfee0_0000, 0x41, 0);
        // Not enabled yet: nothing attached.
        assert!(router.irqfds.lock().unwrap().get(&gsi0).is_none());
        m.set_control(MSIX_ENABLE);
        assert!(router.irqfds.lock().unwrap()[&gsi0]);
        assert_eq!(router.routes.lock().unwrap()[&gsi0].data, 0x41);
        // Function mask detaches.
        m.set_control(MSIX_ENABLE | MSIX_FUNCTION_MASK);
        assert!(!router.irqfds.lock().unwrap()[&gsi0]);
        m.set_control(MSIX_ENABLE);
        // Entry mask detaches; reprogramming updates the route.
        write_entry(&mut m, 0, 0xfee0_1000, 0x42, 1);
        assert!(!router.irqfds.lock().unwrap()[&gsi0]);
        write_entry(&mut m, 0, 0xfee0_1000, 0x42, 0);
        assert_eq!(router.routes.lock().unwrap()[&gsi0].addr_lo, 0xfee0_1000);
        assert_eq!(m.control_bits(), MSIX_ENABLE);
    }

    #[test]
    fn pending_while_masked() {
        let router = Arc::new(FakeRouter::default());
        let mut m = Msix::new(2, router).unwrap();
        m.set_control(MSIX_ENABLE);
        // Vector 1 masked (reset state): a raise shows in the PBA.
        m.irqfd(1).unwrap().unwrap().write(1).unwrap();
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        // Unmasking re-raises it on the irqfd KVM now listens to.
        write_entry(&mut m, 1, 0xfee0_0000, 0x30, 0);
        assert_eq!(m.vectors[1].irqfd.read().unwrap(), 1);
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
    }

    #[test]
    fn table_reads_and_hostile_accesses() {
        let router = Arc::new(FakeRouter::default());
        let mut m = Msix::new(2, router).unwrap();
        write_entry(&mut m, 1, 0x1234_5678, 0x9, 0);
        let mut d = [0u8; 4];
        m.read_table(16, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1234_5678);
        m.read_table(12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1, "entry 0 masked at reset");
        // Out of range, misaligned and odd-sized accesses are ignored.
        m.write_table(1 << 20, &[0; 4]);
        m.write_table(17, &[0; 4]);
        m.write_table(16, &[0; 2]);
        m.write_table(12, &[0; 8]);
        m.read_table(1 << 20, &mut d);
        assert_eq!(d, [0; 4]);
        m.read_table(16, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1234_5678);
        // A qword write of address low/high.
        m.write_table(0, &0xaabb_ccdd_1122_3344u64.to_le_bytes());
        m.read_table(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xaabb_ccdd);
        assert_eq!(m.table_size(), 32);
        assert_eq!(m.pba_size(), 8);
    }
}
