//! MSI-X table emulation, shared with VFIO passthrough: see [`passthrough::msix`].
pub use passthrough::msix::*;
