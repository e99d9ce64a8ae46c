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
//!   bytes (clipped to the register); the BARs are then routed as the PCI root does (where
//!   programmed while their decode bit is on and they are not being sized; no windows)
//! - 5: read configuration register `(b & 3):a`
//! - 6: a doorbell for queue `a % 8`: with `op >> 3 & 1` clear a 16-bit write to its BAR 0
//!   notify address; set, a write of `b:a` (2 bytes; 4 or 1 with `op >> 4 & 3` = 1 or 2) to the
//!   port doorbell, taken by a registered ioeventfd when KVM's datamatch would take it,
//!   else handed to the transport (an exit)
//! - 7: write `a` to device_status
//!
//! The fake ioeventfd registry checks, after every operation, that exactly the doorbells of
//! the BARs' routed addresses are registered (none for a BAR routed nowhere) (each queue: its MMIO notify address and the
//! port with its index as datamatch), none twice; and a doorbell for an existing queue
//! kicks that queue's eventfd, whichever way it went.
#![no_main]

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm::interrupt::fake::FakeRouter;
use vmm::pci::{BarKind, PciDevice, COMMAND_IO, COMMAND_MEMORY};
use vmm::virtio::pci::{Doorbell, IoEvents, VirtioPciDevice, PIO_BAR_INDEX};
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

/// The ioeventfds registered, as KVM keeps them: one fd per doorbell, a second
/// registration of the same doorbell refused (EEXIST), an unknown one not removable.
#[derive(Default)]
struct IoEventRegistry(Mutex<BTreeMap<Doorbell, EventFd>>);

impl IoEvents for IoEventRegistry {
    fn register(&self, fd: &EventFd, at: Doorbell) -> io::Result<()> {
        let mut m = self.0.lock().unwrap();
        if m.contains_key(&at) {
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        m.insert(at, fd.try_clone()?);
        Ok(())
    }
    fn unregister(&self, _fd: &EventFd, at: Doorbell) -> io::Result<()> {
        match self.0.lock().unwrap().remove(&at) {
            Some(_) => Ok(()),
            None => Err(io::Error::from_raw_os_error(libc::ENOENT)),
        }
    }
}

impl IoEventRegistry {
    /// The fd KVM would signal for a port write of `value` (`len` bytes) at `port`.
    fn port_hit(&self, port: u64, len: usize, value: u64) -> Option<EventFd> {
        if len != 2 {
            return None;
        }
        let at = Doorbell::Pio {
            port,
            queue: value as u16,
        };
        self.0
            .lock()
            .unwrap()
            .get(&at)
            .and_then(|f| f.try_clone().ok())
    }
}

/// The doorbells that must be registered with BAR 0 routed at `bar` and the port BAR at
/// `port`.
fn expected(bar: Option<u64>, port: Option<u64>) -> Vec<Doorbell> {
    let mut v: Vec<Doorbell> = (0..MAX_SIZES.len() as u16)
        .flat_map(|i| {
            let mmio = bar.map(|bar| Doorbell::Mmio(bar + 0x3000 + 4 * u64::from(i)));
            let pio = port.map(|port| Doorbell::Pio { port, queue: i });
            mmio.into_iter().chain(pio)
        })
        .collect();
    v.sort();
    v
}

/// Routes the BARs as the PCI root does (without its windows and bus): each where it is
/// programmed while it decodes. Returns where BAR 0 and the port BAR are routed.
fn route(dev: &mut VirtioPciDevice) -> (Option<u64>, Option<u64>) {
    let command = dev.read_config(1) as u16;
    let mut at = (None, None);
    let bars = dev.bars();
    assert!(bars
        .iter()
        .any(|b| b.index == PIO_BAR_INDEX && b.kind == BarKind::Io));
    for b in bars {
        let bit = if b.kind == BarKind::Io {
            COMMAND_IO
        } else {
            COMMAND_MEMORY
        };
        let to = (command & bit != 0 && b.addr != 0 && !b.is_sizing()).then_some(b.addr);
        // The fake registry refuses nothing a single device asks for.
        dev.bar_mapping(b.index, to).expect("doorbells registered");
        match b.index {
            0 => at.0 = to,
            PIO_BAR_INDEX => at.1 = to,
            _ => {}
        }
    }
    at
}

/// Drains the kick eventfds: which queues were kicked.
fn kicked(kicks: &[EventFd]) -> Vec<bool> {
    kicks.iter().map(|k| k.read().is_ok()).collect()
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

/// After a doorbell for queue `q`: exactly that queue was kicked (none if no such queue).
fn check_kicks(kicks: &[EventFd], q: Option<usize>) {
    let got = kicked(kicks);
    for (i, k) in got.iter().enumerate() {
        assert_eq!(*k, q == Some(i), "doorbell for queue {q:?}: kicks {got:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
    else {
        return;
    };
    let activated = Arc::new(Mutex::new(Vec::new()));
    let ioevents = Arc::new(IoEventRegistry::default());
    let Ok(mut dev) = VirtioPciDevice::new(
        "fuzz",
        Box::new(Device {
            mem: mem.clone(),
            activated: activated.clone(),
        }),
        (0xd000_0000, 0xc000),
        GuestMemoryAtomic::new(mem),
        Arc::new(FakeRouter::default()),
        ioevents.clone(),
    ) else {
        return;
    };
    // Decoding on, as the root leaves a device it adds.
    dev.write_config(1, 0, &(COMMAND_IO | COMMAND_MEMORY).to_le_bytes());
    let mut routed = route(&mut dev);
    // The kick eventfd of each queue, as registered for its MMIO doorbell.
    let kicks: Vec<EventFd> = {
        let bar = routed.0.expect("BAR 0 routed");
        let m = ioevents.0.lock().unwrap();
        (0..MAX_SIZES.len() as u64)
            .map(|i| {
                m.get(&Doorbell::Mmio(bar + 0x3000 + 4 * i))
                    .expect("every queue's doorbell registered")
                    .try_clone()
                    .unwrap()
            })
            .collect()
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
                dev.write_config(reg, off as u64, &data[i..i + n]);
                routed = route(&mut dev);
                i += n;
            }
            5 => {
                let _ = dev.read_config(reg);
            }
            6 if op >> 3 & 1 == 0 => {
                // As an exit would (no ioeventfd took it): the transport kicks the queue.
                let q = usize::from(a % 8);
                kicked(&kicks);
                dev.write_bar(0, 0x3000 + q as u64 * 4, &[a % 8, 0]);
                check_kicks(&kicks, Some(q));
            }
            6 => {
                let n = [2, 4, 1, 2][usize::from(op >> 4 & 3)];
                let value = u64::from(u16::from_le_bytes([a, b]));
                kicked(&kicks);
                match routed.1 {
                    // The port BAR decodes nothing: the write reaches no one.
                    None => check_kicks(&kicks, None),
                    Some(port) => {
                        match ioevents.port_hit(port, n, value) {
                            // KVM's datamatch takes it: no exit.
                            Some(fd) => {
                                let _ = fd.write(1);
                            }
                            None => {
                                let bytes = value.to_le_bytes();
                                dev.write_bar(PIO_BAR_INDEX, 0, &bytes[..n]);
                            }
                        }
                        // A 1-byte write names no queue.
                        check_kicks(&kicks, (n >= 2).then_some(usize::from(value as u16)));
                    }
                }
            }
            _ => dev.write_bar(0, 0x14, &[a]),
        }
        let (bar, port) = routed;
        let registered: Vec<Doorbell> = ioevents.0.lock().unwrap().keys().copied().collect();
        assert_eq!(
            registered,
            expected(bar, port),
            "registered doorbells differ from the BARs' (BAR 0 {bar:x?}, port {port:x?})"
        );
        let got = std::mem::take(&mut *activated.lock().unwrap());
        if !got.is_empty() {
            check_registers(&mut dev, &got);
        }
    }
});
