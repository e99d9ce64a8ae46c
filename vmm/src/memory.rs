//! Guest RAM: one memfd, mapped shared, so that vhost-user back-ends can map the same pages.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;

use thiserror::Error;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use crate::layout;

pub type GuestMemory = GuestMemoryMmap<()>;

#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("cannot create the memfd that backs guest RAM")]
    Memfd(#[source] io::Error),
    #[error("cannot size the guest RAM memfd to {0} bytes")]
    Truncate(u64, #[source] io::Error),
    #[error("cannot map {size} bytes of guest RAM at {addr:#x}")]
    Map {
        addr: u64,
        size: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("invalid guest memory layout")]
    Layout(#[source] vm_memory::GuestRegionCollectionError),
}

/// Guest RAM plus the memfd behind it.
pub struct Ram {
    pub memory: GuestMemory,
    pub file: File,
    /// (guest address, size, offset in `file`) of every RAM range.
    pub ranges: Vec<(GuestAddress, u64, u64)>,
}

/// Says how to get huge pages for guest RAM when the host's shmem THP is off.
pub fn log_huge_page_hint() {
    if let Ok(mode) = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled") {
        if mode.contains("[never]") || mode.contains("[deny]") {
            log::info!(
                "guest RAM (a memfd, shareable with vhost-user back-ends) gets 4 KiB pages: shmem \
                 huge pages are off on this host; for faster guests run \
                 'echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled'"
            );
        }
    }
}

/// Creates guest RAM of `size` bytes laid out around the MMIO hole.
pub fn create_ram(size: u64) -> Result<Ram, MemoryError> {
    let name = CString::new("vmm-guest-ram").expect("static name has no NUL");
    // SAFETY: memfd_create takes a valid NUL-terminated name and flags; the returned fd
    // is checked before use.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(io::Error::last_os_error()));
    }
    // SAFETY: fd is a freshly created descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|e| MemoryError::Truncate(size, e))?;

    let mut regions = Vec::new();
    let mut ranges = Vec::new();
    let mut offset = 0u64;
    for (addr, len) in layout::ram_ranges(size) {
        let clone = file.try_clone().map_err(MemoryError::Memfd)?;
        let region =
            GuestRegionMmap::from_range(addr, len as usize, Some(FileOffset::new(clone, offset)))
                .map_err(|source| MemoryError::Map {
                addr: addr.0,
                size: len,
                source,
            })?;
        regions.push(region);
        ranges.push((addr, len, offset));
        offset += len;
    }
    let memory = GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Layout)?;
    for region in memory.iter() {
        if let Ok(host) = region.get_host_address(vm_memory::MemoryRegionAddress(0)) {
            // Huge pages where the host allows them (shmem THP: shmem_enabled=advise or
            // always): far fewer nested page faults while the guest touches its RAM.
            // SAFETY: the range is exactly one mapping of guest RAM owned by `memory`;
            // MADV_HUGEPAGE only changes how the kernel backs it.
            let r =
                unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_HUGEPAGE) };
            if r != 0 {
                log::debug!(
                    "madvise(MADV_HUGEPAGE) on guest RAM: {}",
                    io::Error::last_os_error()
                );
            }
        }
    }
    Ok(Ram {
        memory,
        file,
        ranges,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn ram_is_shared_through_the_memfd() {
        let ram = create_ram(64 << 20).unwrap();
        assert_eq!(ram.memory.num_regions(), 1);
        ram.memory
            .write_obj(0xdead_beefu32, GuestAddress(0x1000))
            .unwrap();
        // The same bytes are visible through the file, as a vhost-user back-end sees them.
        let mut buf = [0u8; 4];
        use std::os::unix::fs::FileExt;
        ram.file.read_exact_at(&mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
    }

    #[test]
    fn ram_above_4g() {
        // Only address space is reserved (MAP_NORESERVE on a sparse memfd).
        let ram = create_ram(5 << 30).unwrap();
        assert_eq!(ram.memory.num_regions(), 2);
        let hi = ram.memory.iter().nth(1).unwrap();
        assert_eq!(hi.start_addr(), GuestAddress(4 << 30));
        assert_eq!(hi.len(), 2 << 30);
        assert_eq!(ram.ranges[1].2, 3 << 30);
        ram.memory
            .write_obj(7u8, GuestAddress((6 << 30) - 1))
            .unwrap();
        assert!(ram.memory.write_obj(7u8, GuestAddress(3 << 30)).is_err());
    }
}
