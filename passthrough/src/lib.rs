//! VFIO passthrough of host PCI devices, and the PCI interrupt pieces the vmm's own devices
//! share with it.
//!
//! - [`interrupt`]: the small trait through which PCI interrupt emulation asks the
//!   hypervisor for MSI routes and irqfds (the vmm implements it on KVM).
//! - [`msix`]: the MSI-X table and PBA as the guest sees them.

pub mod device;
pub mod interrupt;
pub mod msix;
pub mod pci;
pub mod vfio;
