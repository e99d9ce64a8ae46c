//! The PVH `struct hvm_start_info` (xen/include/public/arch-x86/hvm/start_info.h).

/// `hvm_start_info.magic`.
pub const MAGIC: u32 = 0x336e_c578;
const OFFSET_MAGIC: usize = 0;
const OFFSET_VERSION: usize = 4;
const OFFSET_CMDLINE_PADDR: usize = 24;
const OFFSET_MEMMAP_PADDR: usize = 40;
const OFFSET_MEMMAP_ENTRIES: usize = 48;
const MEMMAP_ENTRY_SIZE: usize = 24;
const E820_RAM: u32 = 1;
/// Longest command line read (the rest is ignored).
const CMDLINE_MAX: usize = 4096;

/// A validated start_info in identity-mapped guest memory.
pub struct StartInfo {
    addr: u64,
}

impl StartInfo {
    /// # Safety
    /// `addr` must be the `hvm_start_info` the loader passed in EBX: at least 56 readable
    /// bytes, and `cmdline_paddr` (if not 0) a NUL-terminated string, all in mapped memory
    /// that nothing writes while the guest runs.
    pub unsafe fn new(addr: u64) -> Result<Self, u32> {
        let info = StartInfo { addr };
        // SAFETY: the caller guarantees `addr` is readable.
        let magic = unsafe { info.read::<u32>(OFFSET_MAGIC) };
        if magic == MAGIC {
            Ok(info)
        } else {
            Err(magic)
        }
    }

    /// # Safety
    /// `offset` plus the size of `T` must be within the structure.
    unsafe fn read<T: Copy>(&self, offset: usize) -> T {
        // SAFETY: the caller keeps the read within start_info, which `new` required readable.
        unsafe { core::ptr::read_unaligned((self.addr as usize + offset) as *const T) }
    }

    pub fn version(&self) -> u32 {
        // SAFETY: `version` is a u32 inside the structure.
        unsafe { self.read(OFFSET_VERSION) }
    }

    /// The kernel command line (empty if there is none), without its NUL.
    pub fn cmdline(&self) -> &'static [u8] {
        // SAFETY: `cmdline_paddr` is a u64 inside the structure.
        let paddr: u64 = unsafe { self.read(OFFSET_CMDLINE_PADDR) };
        if paddr == 0 {
            return &[];
        }
        let start = paddr as usize as *const u8;
        let mut len = 0;
        // SAFETY: `new` required the string to be NUL-terminated in mapped, unchanging memory;
        // the scan stops at the NUL or at CMDLINE_MAX.
        unsafe {
            while len < CMDLINE_MAX && *start.add(len) != 0 {
                len += 1;
            }
            core::slice::from_raw_parts(start, len)
        }
    }

    /// Whether one RAM entry of the PVH memory map (start_info version 1) covers
    /// `[start, end)`; `None` when there is no memory map.
    pub fn ram_covers(&self, start: u64, end: u64) -> Option<bool> {
        if self.version() < 1 {
            return None;
        }
        // SAFETY: version >= 1: memmap_paddr and memmap_entries are inside the structure.
        let (paddr, entries): (u64, u32) = unsafe {
            (
                self.read(OFFSET_MEMMAP_PADDR),
                self.read(OFFSET_MEMMAP_ENTRIES),
            )
        };
        if paddr == 0 || entries == 0 {
            return None;
        }
        let covered = (0..entries.min(128) as usize).any(|i| {
            let e = paddr as usize + i * MEMMAP_ENTRY_SIZE;
            // SAFETY: the loader's memory map has `entries` entries of 24 bytes at `paddr`
            // (identity mapped, unchanging, as `new` requires of the loader's data).
            let (addr, size, kind) = unsafe {
                (
                    core::ptr::read_unaligned(e as *const u64),
                    core::ptr::read_unaligned((e + 8) as *const u64),
                    core::ptr::read_unaligned((e + 16) as *const u32),
                )
            };
            kind == E820_RAM && addr <= start && addr.saturating_add(size) >= end
        });
        Some(covered)
    }
}
