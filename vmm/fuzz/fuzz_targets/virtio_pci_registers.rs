//! `cargo fuzz` target: the virtio-pci transport's register file (configuration space and
//! BAR 0) driven by an arbitrary sequence of guest accesses, with a fake device, interrupt
//! router and ioeventfd registry.
//!
//! Besides "no panic", the fake device checks what the transport hands it at DRIVER_OK:
//! every queue has a valid size and aligned rings inside guest memory, and, read back
//! through the common configuration right after, exactly the size and ring addresses the
//! driver programmed (a queue the transport "fixed" silently is a bug).
//!
//! Input: a sequence of operations, each `[op, a, b]` followed by the data bytes it writes.
//! `op & 7` picks the kind:
//! - 0: write `1 + (op >> 3 & 7)` bytes to the common configuration at `a % 0x40`
//! - 1: write `1 + (op >> 3 & 7)` bytes anywhere in BAR 0 at offset `b:a` (16 bits)
//! - 2: read `1 + (op >> 3 & 7)` bytes of BAR 0 at `b:a`
//! - 3: read `1 + (op >> 3 & 7)` bytes of the common configuration at `a % 0x40`
//! - 4: write configuration register `(b & 3):a` at byte `op >> 3 & 3`, `1 + (op >> 5 & 3)`
//!   bytes (clipped to the register); a BAR move is followed as the PCI root does
//! - 5: read configuration register `(b & 3):a`
//! - 6: 16-bit notify of queue `a % 8` through BAR 0
//! - 7: write `a` to device_status
#![no_main]

use std::io;
use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm::interrupt::fake::FakeRouter;
use vmm::pci::PciDevice;
use vmm::virtio::pci::{IoEvents, VirtioPciDevice};
use vmm::virtio::{Activation, VirtioDevice};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: u64 = 1 << 20;
const MAX_SIZES: [u16; 3] = [256, 64, 1024];

/// A queue as activated: index, size, descriptor table, available ring, used ring.
type Got = (u16, u16, u64, u64, u64);

struct Device {
    mem: GuestMemoryMmap<()>,
    activated: Arc<Mutex<Vec<Got>>>,
}

impl VirtioDevice for Device {
    fn device_type(&self) -> u16 {
        2
    }
    fn pci_class(&self) -> u32 {
        0x01_80_00
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        MAX_SIZES.to_vec()
    }
    fn features(&self) -> u64 {
        (1 << 32) | (1 << 29) | 0x3
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        backends::read_config(&[0x5a; 24], offset, data);
    }
    fn activate(&mut self, a: Activation) -> io::Result<()> {
        assert_eq!(
            a.acked_features & !self.features(),
            0,
            "unoffered feature acked"
        );
        for aq in &a.queues {
            let q = &aq.queue;
            let max = MAX_SIZES[usize::from(aq.index)];
            let size = q.size();
            assert!(size.is_power_of_two() && size <= max, "queue size {size}");
            assert!(q.ready());
            assert_eq!(q.desc_table() % 16, 0);
            assert_eq!(q.avail_ring() % 2, 0);
            assert_eq!(q.used_ring() % 4, 0);
            assert!(q.is_valid(&self.mem), "queue {} outside memory", aq.index);
            self.activated.lock().unwrap().push((
                aq.index,
                size,
                q.desc_table(),
                q.avail_ring(),
                q.used_ring(),
            ));
        }
        Ok(())
    }
    fn reset(&mut self) {}
}

struct NoIoEvents;

impl IoEvents for NoIoEvents {
    fn register(&self, _fd: &EventFd, _addr: u64) -> io::Result<()> {
        Ok(())
    }
    fn unregister(&self, _fd: &EventFd, _addr: u64) -> io::Result<()> {
        Ok(())
    }
}

fn read(dev: &mut VirtioPciDevice, off: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    dev.read_bar(0, off, &mut b[..len]);
    u64::from_le_bytes(b)
}

/// Checks the activated queues against the registers the driver programmed.
fn check_registers(dev: &mut VirtioPciDevice, got: &[Got]) {
    let select = read(dev, 0x16, 2) as u16;
    for &(index, size, desc, avail, used) in got {
        dev.write_bar(0, 0x16, &index.to_le_bytes());
        let reg64 =
            |dev: &mut VirtioPciDevice, off| read(dev, off, 4) | read(dev, off + 4, 4) << 32;
        let regs = (
            index,
            read(dev, 0x18, 2) as u16,
            reg64(dev, 0x20),
            reg64(dev, 0x28),
            reg64(dev, 0x30),
        );
        assert_eq!(
            regs,
            (index, size, desc, avail, used),
            "activated queue differs from its registers"
        );
    }
    dev.write_bar(0, 0x16, &select.to_le_bytes());
}

fuzz_target!(|data: &[u8]| {
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
    else {
        return;
    };
    let activated = Arc::new(Mutex::new(Vec::new()));
    let Ok(mut dev) = VirtioPciDevice::new(
        "fuzz",
        Box::new(Device {
            mem: mem.clone(),
            activated: activated.clone(),
        }),
        0xd000_0000,
        GuestMemoryAtomic::new(mem),
        Arc::new(FakeRouter::default()),
        Arc::new(NoIoEvents),
    ) else {
        return;
    };
    let mut i = 0;
    while i + 3 <= data.len() {
        let (op, a, b) = (data[i], data[i + 1], data[i + 2]);
        i += 3;
        let len = 1 + usize::from(op >> 3 & 7);
        let bar_off = u64::from(u16::from_le_bytes([a, b]));
        let reg = usize::from(b & 3) << 8 | usize::from(a);
        let mut buf = [0u8; 8];
        match op & 7 {
            0 | 1 => {
                let n = len.min(data.len() - i);
                let off = if op & 7 == 0 {
                    u64::from(a % 0x40)
                } else {
                    bar_off
                };
                dev.write_bar(0, off, &data[i..i + n]);
                i += n;
            }
            2 => dev.read_bar(0, bar_off, &mut buf[..len]),
            3 => dev.read_bar(0, u64::from(a % 0x40), &mut buf[..len]),
            4 => {
                let off = usize::from(op >> 3 & 3);
                let n = (1 + usize::from(op >> 5 & 3))
                    .min(4 - off)
                    .min(data.len() - i);
                if let Some(m) = dev.write_config(reg, off as u64, &data[i..i + n]) {
                    dev.bar_moved(&m);
                }
                i += n;
            }
            5 => {
                let _ = dev.read_config(reg);
            }
            6 => dev.write_bar(0, 0x3000 + u64::from(a % 8) * 4, &[a, 0]),
            _ => dev.write_bar(0, 0x14, &[a]),
        }
        let got = std::mem::take(&mut *activated.lock().unwrap());
        if !got.is_empty() {
            check_registers(&mut dev, &got);
        }
    }
});
