//! Interrupt routing as PCI devices need it: an MSI message, and the small trait through
//! which MSI/MSI-X/INTx emulation asks the hypervisor for GSI routes and irqfds. The vmm
//! implements it on KVM; unit tests use [`fake::FakeRouter`].

use std::io;

use vmm_sys_util::eventfd::EventFd;

/// An MSI message as the guest programs it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MsiMessage {
    pub addr_lo: u32,
    pub addr_hi: u32,
    pub data: u32,
}

/// What MSI/MSI-X emulation needs from the hypervisor; faked in unit tests.
pub trait InterruptRouter: Send + Sync {
    /// Reserves a GSI for an MSI route.
    fn allocate_gsi(&self) -> io::Result<u32>;
    /// Points `gsi` at `msg` (adds or replaces the route).
    fn set_msi_route(&self, gsi: u32, msg: MsiMessage) -> io::Result<()>;
    /// Removes the route of `gsi`, if any.
    fn remove_route(&self, gsi: u32) -> io::Result<()>;
    /// Gives `gsi` back for a later [`InterruptRouter::allocate_gsi`] (its route removed):
    /// a device that goes away frees its GSIs, so that hotplug cycles do not run out.
    fn release_gsi(&self, gsi: u32) -> io::Result<()> {
        self.remove_route(gsi)
    }
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()>;
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()>;
    /// Attaches a level-triggered irqfd: `fd` asserts the line of `gsi`; when the guest
    /// EOIs it, the line is deasserted and `resample` is signalled (PCI INTx).
    fn register_resample_irqfd(&self, fd: &EventFd, resample: &EventFd, gsi: u32)
        -> io::Result<()>;
}

#[cfg(any(test, feature = "testing"))]
pub mod fake {
    //! A router that records what it was asked, for unit tests.
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    /// GSIs below this are the IOAPIC pins, as on KVM.
    pub const FIRST_MSI_GSI: u32 = 24;

    #[derive(Default)]
    pub struct FakeRouter {
        pub next: Mutex<u32>,
        pub routes: Mutex<BTreeMap<u32, MsiMessage>>,
        pub irqfds: Mutex<BTreeMap<u32, bool>>,
        /// GSIs attached as level-triggered (INTx) irqfds.
        pub resample: Mutex<std::collections::BTreeSet<u32>>,
    }

    impl InterruptRouter for FakeRouter {
        fn allocate_gsi(&self) -> io::Result<u32> {
            let mut n = self.next.lock().unwrap();
            *n += 1;
            Ok(FIRST_MSI_GSI + *n - 1)
        }
        fn set_msi_route(&self, gsi: u32, msg: MsiMessage) -> io::Result<()> {
            self.routes.lock().unwrap().insert(gsi, msg);
            Ok(())
        }
        fn remove_route(&self, gsi: u32) -> io::Result<()> {
            self.routes.lock().unwrap().remove(&gsi);
            Ok(())
        }
        fn register_irqfd(&self, _fd: &EventFd, gsi: u32) -> io::Result<()> {
            self.irqfds.lock().unwrap().insert(gsi, true);
            Ok(())
        }
        fn unregister_irqfd(&self, _fd: &EventFd, gsi: u32) -> io::Result<()> {
            self.irqfds.lock().unwrap().insert(gsi, false);
            Ok(())
        }
        fn register_resample_irqfd(
            &self,
            _fd: &EventFd,
            _resample: &EventFd,
            gsi: u32,
        ) -> io::Result<()> {
            self.irqfds.lock().unwrap().insert(gsi, true);
            self.resample.lock().unwrap().insert(gsi);
            Ok(())
        }
    }
}
