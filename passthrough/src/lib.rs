//! VFIO passthrough: give a guest a host PCI device (a NIC, an NVMe) through VFIO and the
//! IOMMU, plus the PCI pieces the vmm's own devices share with it.
//!
//! - [`host`]: host preparation. Reads sysfs to explain, in one line each, what blocks an
//!   assignment (no such device, IOMMU off, device bound to a host driver, IOMMU group not
//!   viable, no `/dev/vfio/N`, memlock limit too low for the guest's RAM), and binds a device
//!   to or unbinds it from `vfio-pci` through `driver_override`. The VMM calls
//!   [`host::Host::preflight`] before it opens VFIO; the `passthrough` binary
//!   (`passthrough check|bind|unbind`) is the same code for people.
//! - [`vfio`]: the [`vfio::Vfio`] trait, its implementation on a real VFIO device, and the
//!   container holding the IOMMU domain and the DMA map of guest RAM.
//! - [`device`]: the PCI logic of an assigned function (config space virtualization, BAR
//!   plan, MSI/MSI-X/INTx), written against [`vfio::Vfio`], [`device::GuestMapper`] and
//!   [`interrupt::InterruptRouter`], so it runs against fakes in unit tests.
//! - [`interrupt`], [`msix`], [`pci`]: MSI routes and irqfds, MSI-X table emulation, config
//!   space with BAR tracking: shared with the vmm's virtio devices.

pub mod device;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod host;
pub mod interrupt;
pub mod msix;
pub mod pci;
pub mod vfio;
