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

/// What the VM's control thread is asked to do: stop the VM, or change it while it runs.
pub enum Control {
    /// Stop the VM.
    Exit(VmExit),
    /// The guest ejected `slot` (its `_EJ0`): the device is off the bus already; the
    /// control thread releases it (stops its threads, closes what it holds).
    Ejected {
        slot: u8,
        id: String,
        device: Arc<std::sync::Mutex<dyn crate::pci::PciDevice>>,
    },
    /// A request from the control API, answered on `reply` when it is done.
    Api(crate::api::Command, mpsc::Sender<crate::api::Reply>),
}

impl Control {
    /// The exit this asks for, if it is one.
    pub fn exit(self) -> Option<VmExit> {
        match self {
            Control::Exit(e) => Some(e),
            _ => None,
        }
    }
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Control::Exit(e) => write!(f, "Exit({e:?})"),
            Control::Ejected { slot, id, .. } => write!(f, "Ejected({id} in slot {slot})"),
            Control::Api(c, _) => write!(f, "Api({c:?})"),
        }
    }
}

/// Lets devices and vCPUs ask for the VM to stop, and the API and the hotplug registers
/// reach the control thread. The first exit request wins; from then on every vCPU stops at
/// its next exit instead of running the guest further.
#[derive(Clone)]
pub struct ExitHandle {
    tx: mpsc::Sender<Control>,
    stopping: Arc<AtomicBool>,
}

impl ExitHandle {
    pub fn new() -> (Self, mpsc::Receiver<Control>) {
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
        let _ = self.tx.send(Control::Exit(exit));
    }

    /// Hands `msg` to the control thread (never blocks). False when it is gone (the VM is
    /// being torn down).
    pub fn send(&self, msg: Control) -> bool {
        self.tx.send(msg).is_ok()
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
        assert_eq!(rx.recv().unwrap().exit(), Some(VmExit::PowerOff));
        assert!(stopping.load(Ordering::Acquire));
    }
}
