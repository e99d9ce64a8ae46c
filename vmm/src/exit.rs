//! Why a VM stops, and the process exit code for it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

/// An event that ends the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// ACPI S5 (`poweroff`).
    PowerOff,
    /// ACPI reset register, i8042 reset or a KVM reset event.
    Reboot,
    /// A value written to the debug-exit port.
    DebugExit(u32),
    /// The guest crashed: triple fault, KVM internal error, failed entry.
    /// `state`: the vCPU's registers and events at that point, on one line.
    Crash {
        vcpu: u8,
        reason: String,
        state: String,
    },
    /// The VMM itself failed while running.
    VmmError(String),
    /// SIGTERM or SIGINT reached the VMM.
    Signal(i32),
    /// `vm.shutdown` or `vmm.shutdown` on the control API.
    ApiShutdown,
}

pub const EXIT_OK: i32 = 0;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_GUEST_CRASH: i32 = 4;
pub const EXIT_VMM_ERROR: i32 = 6;

impl VmExit {
    /// The process exit code, documented in `vmm --help`.
    pub fn code(&self) -> i32 {
        match self {
            VmExit::PowerOff | VmExit::Reboot | VmExit::Signal(_) | VmExit::ApiShutdown => EXIT_OK,
            // As QEMU's isa-debug-exit; the OS keeps the low 8 bits.
            VmExit::DebugExit(v) => (((v << 1) | 1) & 0xff) as i32,
            VmExit::Crash { .. } => EXIT_GUEST_CRASH,
            VmExit::VmmError(_) => EXIT_VMM_ERROR,
        }
    }
}

/// Lets devices and vCPUs ask for the VM to stop. The first request wins; from then on
/// every vCPU stops at its next exit instead of running the guest further.
#[derive(Clone)]
pub struct ExitHandle {
    tx: mpsc::Sender<VmExit>,
    stopping: Arc<AtomicBool>,
}

impl ExitHandle {
    pub fn new() -> (Self, mpsc::Receiver<VmExit>) {
        let (tx, rx) = mpsc::channel();
        (
            ExitHandle {
                tx,
                stopping: Arc::new(AtomicBool::new(false)),
            },
            rx,
        )
    }

    pub fn request(&self, exit: VmExit) {
        self.stopping.store(true, Ordering::Release);
        // The receiver is gone only while the VMM is already tearing down.
        let _ = self.tx.send(exit);
    }

    /// The flag vCPU threads check before re-entering the guest.
    pub fn stopping(&self) -> Arc<AtomicBool> {
        self.stopping.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        assert_eq!(VmExit::PowerOff.code(), 0);
        assert_eq!(VmExit::Reboot.code(), 0);
        assert_eq!(VmExit::DebugExit(0).code(), 1);
        assert_eq!(VmExit::DebugExit(42).code(), 85);
        assert_eq!(VmExit::DebugExit(0x80).code(), 1);
        assert_eq!(
            VmExit::Crash {
                vcpu: 0,
                reason: String::new(),
                state: String::new(),
            }
            .code(),
            4
        );
        assert_eq!(VmExit::VmmError(String::new()).code(), 6);
    }

    #[test]
    fn handle_delivers() {
        let (h, rx) = ExitHandle::new();
        let stopping = h.stopping();
        assert!(!stopping.load(Ordering::Acquire));
        h.clone().request(VmExit::PowerOff);
        assert_eq!(rx.recv().unwrap(), VmExit::PowerOff);
        assert!(stopping.load(Ordering::Acquire));
    }
}
