//! VFIO passthrough: give a guest a host PCI device (a NIC, an NVMe) through VFIO and the
//! IOMMU.
//!
//! - [`host`]: host preparation. Reads sysfs to explain, in one line each, what blocks an
//!   assignment (no such device, IOMMU off, device bound to a host driver, IOMMU group not
//!   viable, no `/dev/vfio/N`, memlock limit too low for the guest's RAM), and binds a device
//!   to or unbinds it from `vfio-pci` through `driver_override`. The VMM calls
//!   [`host::Host::preflight`] before it opens VFIO; the `passthrough` binary
//!   (`passthrough check|bind|unbind`) is the same code for people.

pub mod host;
