//! ACPI hotplug: the Generic Event Device's event register and the PCI slot register block,
//! one small port-I/O device the DSDT's AML reads and writes (see [`crate::acpi`]).
//!
//! The vmm sets a bit and raises the GED's interrupt; the guest's GED driver runs `_EVT`,
//! which reads the event register and acts on each bit:
//! - [`EVENT_PCI`]: `PSCN` reads the slots that appeared (`PCIU`, Notify 1: device check,
//!   Linux's acpiphp scans the slot and binds its driver) and the slots the vmm wants back
//!   (`PCID`, Notify 3: eject request, acpiphp unbinds the driver, removes the device and
//!   runs the slot's `_EJ0`, which writes the slot's bit to `B0EJ`);
//! - [`EVENT_POWER_BUTTON`]: Notify 0x80 on the power button device (PNP0C0C): Linux's
//!   `button` driver reports KEY_POWER, on which the guest's init shuts down.
//!
//! Registers (32 bits each, little endian, at [`layout::HOTPLUG_PORT`]):
//!
//! | offset | name | access | meaning |
//! |---|---|---|---|
//! | 0x0 | GEVT | read, clears | pending events |
//! | 0x4 | PCIU | read, clears | slots with a device added since the last read |
//! | 0x8 | PCID | read, clears | slots the vmm asks the guest to eject |
//! | 0xc | B0EJ | write | slots the guest ejected: the vmm takes their devices off the bus |
//!
//! Like QEMU's `pcihp` and Cloud Hypervisor's register block, but not their layout.
//! A guest controls every access: a read or write of another size or offset is refused
//! (rate-limited log line), an eject of an empty slot or the host bridge is ignored.

use backends::ratelimit::GuestErrorLog;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
#[cfg(doc)]
use crate::layout;

/// GEVT bit: PCIU or PCID has bits to look at.
pub const EVENT_PCI: u32 = 1 << 0;
/// GEVT bit: the power button was pressed.
pub const EVENT_POWER_BUTTON: u32 = 1 << 1;

pub const REG_GEVT: u64 = 0x0;
pub const REG_PCIU: u64 = 0x4;
pub const REG_PCID: u64 = 0x8;
pub const REG_B0EJ: u64 = 0xc;
/// Bytes of port space the block takes.
pub const LEN: u64 = 0x10;

/// Slots a device can be hot-added to or ejected from: all but the host bridge's.
pub const SLOTS: std::ops::RangeInclusive<u8> = 1..=31;

const LOG_ACCESS: usize = 0;
const LOG_EJECT: usize = 1;

/// What the guest's `_EJ0` asks: take the device in `slot` off the bus. Returns whether a
/// device was there.
pub type EjectFn = Box<dyn FnMut(u8) -> bool + Send>;

/// The register block.
pub struct Hotplug {
    events: u32,
    up: u32,
    down: u32,
    irq: EventFd,
    on_eject: EjectFn,
    faults: GuestErrorLog<2>,
}

impl Hotplug {
    /// `irq` is the GED's interrupt (an irqfd, edge-triggered); `on_eject` runs on the vCPU
    /// thread that wrote `B0EJ`: it must only take the device off the bus and hand it to
    /// the control thread, never wait for it.
    pub fn new(irq: EventFd, on_eject: EjectFn) -> Self {
        Hotplug {
            events: 0,
            up: 0,
            down: 0,
            irq,
            on_eject,
            faults: GuestErrorLog::new("acpi-hotplug"),
        }
    }

    fn raise(&mut self, event: u32) {
        self.events |= event;
        if let Err(e) = self.irq.write(1) {
            log::warn!("acpi-hotplug: cannot raise the GED interrupt: {e}");
        }
    }

    /// A device was put in `slot`: tell the guest to scan it.
    pub fn device_added(&mut self, slot: u8) {
        let bit = slot_bit(slot);
        self.up |= bit;
        self.down &= !bit;
        self.raise(EVENT_PCI);
    }

    /// Ask the guest to eject `slot` (again, if it was asked before).
    pub fn request_eject(&mut self, slot: u8) {
        let bit = slot_bit(slot);
        self.down |= bit;
        self.up &= !bit;
        self.raise(EVENT_PCI);
    }

    /// The ACPI power button.
    pub fn press_power_button(&mut self) {
        self.raise(EVENT_POWER_BUTTON);
    }

    /// Events, added and to-eject slots not yet read by the guest.
    pub fn pending(&self) -> (u32, u32, u32) {
        (self.events, self.up, self.down)
    }

    pub fn flush_log(&mut self) {
        self.faults.flush();
    }
}

fn slot_bit(slot: u8) -> u32 {
    if SLOTS.contains(&slot) {
        1 << slot
    } else {
        0
    }
}

impl BusDevice for Hotplug {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 4 {
            data.fill(0);
            self.faults.record(
                LOG_ACCESS,
                format_args!(
                    "{}-byte read at offset {offset:#x} refused (32-bit registers)",
                    data.len()
                ),
            );
            return;
        }
        let v = match offset {
            REG_GEVT => std::mem::take(&mut self.events),
            REG_PCIU => std::mem::take(&mut self.up),
            REG_PCID => std::mem::take(&mut self.down),
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.faults.record(
                LOG_ACCESS,
                format_args!(
                    "{}-byte write at offset {offset:#x} refused (32-bit registers)",
                    data.len()
                ),
            );
            return;
        };
        if offset != REG_B0EJ {
            self.faults.record(
                LOG_ACCESS,
                format_args!("write at offset {offset:#x} refused (only B0EJ at 0xc is writable)"),
            );
            return;
        }
        let v = u32::from_le_bytes(bytes);
        for slot in SLOTS {
            if v & (1 << slot) == 0 {
                continue;
            }
            self.down &= !(1 << slot);
            if !(self.on_eject)(slot) {
                self.faults.record(
                    LOG_EJECT,
                    format_args!("the guest ejected slot {slot}, which holds no device"),
                );
            }
        }
        if v & 1 != 0 {
            self.faults.record(
                LOG_EJECT,
                format_args!("the guest asked to eject slot 0, the host bridge: ignored"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn hp() -> (Hotplug, EventFd, Arc<Mutex<Vec<u8>>>) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let ejected = Arc::new(Mutex::new(Vec::new()));
        let e = ejected.clone();
        let h = Hotplug::new(
            irq.try_clone().unwrap(),
            Box::new(move |slot| {
                e.lock().unwrap().push(slot);
                slot == 3 || slot == 31
            }),
        );
        (h, irq, ejected)
    }

    fn rd(h: &mut Hotplug, off: u64) -> u32 {
        let mut b = [0u8; 4];
        h.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn add_scan_eject_cycle() {
        let (mut h, irq, ejected) = hp();
        assert!(irq.read().is_err(), "no interrupt before an event");
        h.device_added(3);
        assert_eq!(irq.read().unwrap(), 1, "the GED interrupt is raised");
        // _EVT: the event, then the slots; each read clears.
        assert_eq!(rd(&mut h, REG_GEVT), EVENT_PCI);
        assert_eq!(rd(&mut h, REG_GEVT), 0);
        assert_eq!(rd(&mut h, REG_PCIU), 1 << 3);
        assert_eq!(rd(&mut h, REG_PCIU), 0);
        assert_eq!(rd(&mut h, REG_PCID), 0);
        h.request_eject(3);
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(rd(&mut h, REG_GEVT), EVENT_PCI);
        assert_eq!(rd(&mut h, REG_PCID), 1 << 3);
        // _EJ0 of slot 3.
        h.write(REG_B0EJ, &(1u32 << 3).to_le_bytes());
        assert_eq!(*ejected.lock().unwrap(), vec![3]);
        assert_eq!(h.pending(), (0, 0, 0));
    }

    #[test]
    fn eject_asked_again_and_power_button() {
        let (mut h, irq, ejected) = hp();
        h.request_eject(31);
        h.request_eject(31);
        h.press_power_button();
        assert_eq!(irq.read().unwrap(), 3);
        assert_eq!(rd(&mut h, REG_GEVT), EVENT_PCI | EVENT_POWER_BUTTON);
        // The guest ejects without reading PCID first (its own unplug): PCID forgets it.
        h.write(REG_B0EJ, &(1u32 << 31).to_le_bytes());
        assert_eq!(rd(&mut h, REG_PCID), 0);
        assert_eq!(*ejected.lock().unwrap(), vec![31]);
    }

    #[test]
    fn hostile_accesses_do_nothing() {
        let (mut h, _irq, ejected) = hp();
        h.device_added(5);
        // Other sizes, other offsets, writes to read-only registers, slot 0, empty slots.
        let mut b = [0u8; 2];
        h.read(REG_PCIU, &mut b);
        assert_eq!(b, [0, 0]);
        h.write(REG_PCIU, &0u32.to_le_bytes());
        h.write(REG_B0EJ, &[0xff]);
        h.write(0x100, &u32::MAX.to_le_bytes());
        let mut big = [0u8; 8];
        h.read(0, &mut big);
        assert_eq!(big, [0; 8]);
        assert_eq!(h.pending(), (EVENT_PCI, 1 << 5, 0), "nothing was consumed");
        assert!(ejected.lock().unwrap().is_empty());
        h.write(REG_B0EJ, &1u32.to_le_bytes());
        assert!(
            ejected.lock().unwrap().is_empty(),
            "slot 0 is never ejected"
        );
        // Every slot at once: each one's handler runs once; empty ones are only logged.
        h.write(REG_B0EJ, &u32::MAX.to_le_bytes());
        assert_eq!(*ejected.lock().unwrap(), (1..=31).collect::<Vec<u8>>());
        assert_eq!(rd(&mut h, 0x3c), 0, "an offset with no register reads 0");
        assert!(h.faults.count(LOG_EJECT) >= 30);
    }
}
