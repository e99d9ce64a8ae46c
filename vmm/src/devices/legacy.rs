//! Small port-I/O devices that end the VM: debug exit, ACPI sleep/reset, i8042 reset.

use vm_superio::{I8042Device, Trigger};

use crate::bus::BusDevice;
use crate::exit::{ExitHandle, VmExit};
use crate::layout;

fn le_value(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

/// `out` of N to port 0xf4 ends the VM with exit code (N << 1) | 1, as QEMU's isa-debug-exit.
pub struct DebugExit {
    exit: ExitHandle,
}

impl DebugExit {
    pub fn new(exit: ExitHandle) -> Self {
        DebugExit { exit }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        self.exit.request(VmExit::DebugExit(le_value(data)));
    }
}

/// The hardware-reduced ACPI sleep control register and the reset register (see the FADT).
pub struct AcpiPm {
    exit: ExitHandle,
}

impl AcpiPm {
    pub fn new(exit: ExitHandle) -> Self {
        AcpiPm { exit }
    }
}

const SLP_EN: u8 = 1 << 5;
const S5: u8 = 5;

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let v = data.first().copied().unwrap_or(0);
        let port = layout::ACPI_SLEEP_CONTROL_PORT as u64 + offset;
        if port == layout::ACPI_SLEEP_CONTROL_PORT as u64 {
            if v & SLP_EN != 0 && (v >> 2) & 0x7 == S5 {
                self.exit.request(VmExit::PowerOff);
            }
        } else if port == layout::ACPI_RESET_PORT as u64 && v == layout::ACPI_RESET_VALUE {
            self.exit.request(VmExit::Reboot);
        }
    }
}

/// Trigger used by the i8042 for its CPU reset line.
pub struct ResetTrigger(pub ExitHandle);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(VmExit::Reboot);
        Ok(())
    }
}

/// The i8042 controller as far as Linux needs it: the 0xFE reset command.
pub struct I8042 {
    dev: I8042Device<ResetTrigger>,
}

impl I8042 {
    pub fn new(exit: ExitHandle) -> Self {
        I8042 {
            dev: I8042Device::new(ResetTrigger(exit)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = self.dev.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&b) = data.first() {
            let _ = self.dev.write(offset as u8, b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_exit_value() {
        let (h, rx) = ExitHandle::new();
        let mut d = DebugExit::new(h);
        d.write(0, &[42, 0, 0, 0]);
        d.write(0, &[7]);
        assert_eq!(rx.recv().unwrap().exit(), Some(VmExit::DebugExit(42)));
        assert_eq!(rx.recv().unwrap().exit(), Some(VmExit::DebugExit(7)));
    }

    #[test]
    fn acpi_poweroff_and_reset() {
        let (h, rx) = ExitHandle::new();
        let mut pm = AcpiPm::new(h);
        // SLP_TYP = 5 without SLP_EN: nothing.
        pm.write(0, &[5 << 2]);
        // S3 with SLP_EN: not a power-off.
        pm.write(0, &[(3 << 2) | SLP_EN]);
        assert!(rx.try_recv().is_err());
        pm.write(0, &[(5 << 2) | SLP_EN]);
        assert_eq!(rx.recv().unwrap().exit(), Some(VmExit::PowerOff));
        pm.write(1, &[0]);
        assert!(rx.try_recv().is_err());
        pm.write(1, &[layout::ACPI_RESET_VALUE]);
        assert_eq!(rx.recv().unwrap().exit(), Some(VmExit::Reboot));
    }

    #[test]
    fn i8042_reset_command() {
        let (h, rx) = ExitHandle::new();
        let mut k = I8042::new(h);
        k.write(4, &[0xfe]);
        assert_eq!(rx.recv().unwrap().exit(), Some(VmExit::Reboot));
    }
}
