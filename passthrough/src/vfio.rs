//! The VFIO side: the [`Vfio`] trait the PCI logic of an assigned device talks to, its
//! implementation on a real VFIO device ([`HostDevice`]), and the [`Container`] that owns the
//! IOMMU domain (one for the whole VM) and the DMA map of guest RAM.
//!
//! The trait is the seam for unit tests: [`crate::device`] is tested against a fake device
//! that records what it is asked (`device::tests`).

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

use vfio_bindings::bindings::vfio::{
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioDeviceFd, VfioRegionInfoCap};
use vmm_sys_util::eventfd::EventFd;

/// VFIO region indices of a PCI device (`VFIO_PCI_*_REGION_INDEX`).
pub const ROM_REGION: u32 = 6;
pub const CONFIG_REGION: u32 = 7;
/// VFIO interrupt indices of a PCI device (`VFIO_PCI_*_IRQ_INDEX`).
pub const INTX_IRQ: u32 = 0;
pub const MSI_IRQ: u32 = 1;
pub const MSIX_IRQ: u32 = 2;

/// A region of the device as VFIO describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegionInfo {
    pub size: u64,
    pub readable: bool,
    pub writable: bool,
    /// The region (or the `areas`) may be mmapped.
    pub mmappable: bool,
    /// Sparse mmap: only these `(offset, size)` areas may be mmapped. Empty: all of it.
    pub areas: Vec<(u64, u64)>,
}

/// What the PCI logic of an assigned device needs from VFIO.
pub trait Vfio: Send + Sync {
    fn region(&self, index: u32) -> RegionInfo;
    /// Reads `data.len()` bytes at `offset` of region `index`; all ones when that fails.
    fn read(&self, index: u32, offset: u64, data: &mut [u8]);
    fn write(&self, index: u32, offset: u64, data: &[u8]);
    /// Maps `size` bytes of region `index` from `offset` into this process.
    fn mmap(&self, index: u32, offset: u64, size: u64) -> io::Result<Mapping>;
    /// How many interrupts of kind `index` the device has.
    fn irq_count(&self, index: u32) -> u32;
    /// Enables interrupts of kind `index`, vector `i` signalling `fds[i]`.
    fn enable_irqs(&self, index: u32, fds: &[&EventFd]) -> io::Result<()>;
    fn disable_irqs(&self, index: u32) -> io::Result<()>;
    /// For INTx: VFIO unmasks the host line when `fd` is signalled (KVM's resample fd).
    fn set_intx_unmask_fd(&self, fd: &EventFd) -> io::Result<()>;
    /// Resets the device with the method the kernel offers (FLR, PM, bus reset).
    fn reset(&self) -> io::Result<()>;
}

/// A shared mapping of a region of a device fd (a VFIO BAR; KVM's coalesced I/O ring page) or
/// of anonymous memory (tests); unmapped on drop.
pub struct Mapping {
    addr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; the pointer is only
// handed to KVM and never dereferenced as a Rust reference.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` at `offset`, shared, read-write.
    pub fn from_fd(fd: &impl AsRawFd, offset: u64, len: u64) -> io::Result<Mapping> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mmap offset too large"))?;
        let len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mmap size too large"))?;
        // SAFETY: a fresh shared mapping chosen by the kernel; no existing memory is touched.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            addr: addr.cast(),
            len,
        })
    }

    /// Anonymous shared memory, standing in for a BAR in tests.
    pub fn anonymous(len: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh anonymous mapping chosen by the kernel.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            addr: addr.cast(),
            len,
        })
    }

    pub fn addr(&self) -> *mut u8 {
        self.addr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping this value created and owns.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

/// Errors of the VFIO container and devices.
#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    #[error("cannot open the VFIO container /dev/vfio/vfio")]
    Container(#[source] vfio_ioctls::VfioError),
    #[error("cannot open VFIO device {0}")]
    Device(String, #[source] vfio_ioctls::VfioError),
    #[error("cannot map guest RAM [{iova:#x}, +{size:#x}) for device DMA (VFIO_IOMMU_MAP_DMA)")]
    DmaMap {
        iova: u64,
        size: u64,
        #[source]
        source: vfio_ioctls::VfioError,
    },
}

/// One VFIO container (IOMMU domain) for the whole VM: every group joins it, and all guest
/// RAM is identity mapped (IOVA = guest physical address) once for all devices.
pub struct Container {
    inner: Arc<VfioContainer>,
    dma: Mutex<Vec<(u64, u64)>>,
}

impl Container {
    /// `kvm_device`: the KVM VFIO pseudo device every group is added to (it tells KVM that
    /// a device may do non-coherent DMA and lets it use posted interrupts).
    pub fn new(kvm_device: Option<Arc<VfioDeviceFd>>) -> Result<Container, VfioError> {
        Ok(Container {
            inner: Arc::new(VfioContainer::new(kvm_device).map_err(VfioError::Container)?),
            dma: Mutex::new(Vec::new()),
        })
    }

    /// Maps `[iova, iova + size)` to host memory at `host` for device DMA.
    ///
    /// # Safety
    /// `host..host + size` must stay mapped (guest RAM) until this container is dropped; the
    /// device may read and write it at any time.
    pub unsafe fn map_dma(&self, iova: u64, size: u64, host: *mut u8) -> Result<(), VfioError> {
        let len = usize::try_from(size).map_err(|_| VfioError::DmaMap {
            iova,
            size,
            source: vfio_ioctls::VfioError::InvalidPath,
        })?;
        // SAFETY: the caller keeps the range mapped for the container's lifetime.
        unsafe { self.inner.vfio_dma_map(iova, len, host) }
            .map_err(|source| VfioError::DmaMap { iova, size, source })?;
        self.dma
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((iova, size));
        Ok(())
    }

    /// Opens the device at `sysfs` (its group joins this container once) and resets it.
    pub fn open(&self, sysfs: &Path) -> Result<HostDevice, VfioError> {
        let dev = VfioDevice::new(sysfs, self.inner.clone(), false)
            .map_err(|e| VfioError::Device(sysfs.display().to_string(), e))?;
        Ok(HostDevice { dev })
    }
}

impl Container {
    /// Removes every DMA mapping: call it once the devices are quiesced and before their
    /// groups leave the container (dropping the devices), which tears down the IOMMU domain.
    pub fn unmap_all(&self) {
        for (iova, size) in self.dma.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            if let Err(e) = self.inner.vfio_dma_unmap(iova, size as usize) {
                log::warn!("vfio: cannot unmap DMA [{iova:#x}, +{size:#x}): {e}");
            }
        }
    }
}

vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_RESET, 0x3b, 100 + 11);

/// A real device opened through VFIO.
pub struct HostDevice {
    dev: VfioDevice,
}

fn vfio_io(e: vfio_ioctls::VfioError) -> io::Error {
    io::Error::other(e)
}

impl Vfio for HostDevice {
    fn region(&self, index: u32) -> RegionInfo {
        let flags = self.dev.get_region_flags(index);
        let size = if flags == 0 {
            0
        } else {
            self.dev.get_region_size(index)
        };
        let mut info = RegionInfo {
            size,
            readable: flags & VFIO_REGION_INFO_FLAG_READ != 0,
            writable: flags & VFIO_REGION_INFO_FLAG_WRITE != 0,
            mmappable: flags & VFIO_REGION_INFO_FLAG_MMAP != 0,
            areas: Vec::new(),
        };
        if size != 0 {
            for cap in self.dev.get_region_caps(index) {
                if let VfioRegionInfoCap::SparseMmap(s) = cap {
                    info.areas = s.areas.iter().map(|a| (a.offset, a.size)).collect();
                }
            }
        }
        info
    }

    fn read(&self, index: u32, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        self.dev.region_read(index, data, offset);
    }

    fn write(&self, index: u32, offset: u64, data: &[u8]) {
        self.dev.region_write(index, data, offset);
    }

    fn mmap(&self, index: u32, offset: u64, size: u64) -> io::Result<Mapping> {
        Mapping::from_fd(&self.dev, self.dev.get_region_offset(index) + offset, size)
    }

    fn irq_count(&self, index: u32) -> u32 {
        self.dev.get_irq_info(index).map_or(0, |i| i.count)
    }

    fn enable_irqs(&self, index: u32, fds: &[&EventFd]) -> io::Result<()> {
        self.dev.enable_irq(index, fds.to_vec()).map_err(vfio_io)
    }

    fn disable_irqs(&self, index: u32) -> io::Result<()> {
        self.dev.disable_irq(index).map_err(vfio_io)
    }

    fn set_intx_unmask_fd(&self, fd: &EventFd) -> io::Result<()> {
        self.dev
            .set_irq_resample_fd(INTX_IRQ, vec![fd])
            .map_err(vfio_io)
    }

    fn reset(&self) -> io::Result<()> {
        // SAFETY: VFIO_DEVICE_RESET takes no argument; the fd is this VFIO device's.
        let r = unsafe { vmm_sys_util::ioctl::ioctl(&self.dev, VFIO_DEVICE_RESET()) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
