//! Kernel loading: bzImage (64-bit Linux boot protocol) or ELF with a PVH note.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{self, Elf, PvhBootCapability};
use linux_loader::loader::{self, KernelLoader};
use thiserror::Error;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::regs::BootMode;
use crate::layout;

#[derive(Debug, Error)]
pub enum BootError {
    #[error("cannot open kernel '{0}'")]
    OpenKernel(PathBuf, #[source] io::Error),
    #[error("kernel '{0}' is a directory; pass the kernel image file (e.g. /boot/vmlinuz-...)")]
    KernelIsDirectory(PathBuf),
    #[error("kernel '{0}' is neither a bzImage nor an ELF with a PVH note; pass a bzImage (arch/x86/boot/bzImage) or a vmlinux built with CONFIG_PVH=y")]
    UnknownKernelFormat(PathBuf),
    #[error("kernel '{0}' is an ELF without a PVH entry note; build it with CONFIG_PVH=y or pass its bzImage")]
    ElfWithoutPvh(PathBuf),
    #[error("cannot load kernel '{path}': {what}")]
    LoadKernel { path: PathBuf, what: String },
    #[error("cannot open initramfs '{0}'")]
    OpenInitramfs(PathBuf, #[source] io::Error),
    #[error("initramfs '{path}' ({size} MiB) does not fit in guest RAM below {limit:#x} after the kernel; raise --memory")]
    InitramfsTooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("cannot read initramfs '{0}' into guest memory")]
    ReadInitramfs(PathBuf, #[source] vm_memory::GuestMemoryError),
    #[error("kernel command line is {0} bytes; the limit is {max}", max = layout::CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("cannot write boot structures to guest memory")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// Where and how the kernel starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootEntry {
    pub mode: BootMode,
    pub entry: GuestAddress,
}

struct Loaded {
    mode: BootMode,
    entry: GuestAddress,
    kernel_end: u64,
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
}

fn load_kernel<M: GuestMemoryBackend>(mem: &M, path: &Path) -> Result<Loaded, BootError> {
    let mut f = File::open(path).map_err(|e| BootError::OpenKernel(path.to_path_buf(), e))?;
    if f.metadata().is_ok_and(|m| m.is_dir()) {
        return Err(BootError::KernelIsDirectory(path.to_path_buf()));
    }
    match Elf::load(mem, None, &mut f, Some(layout::HIMEM_START)) {
        Ok(r) => match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(entry) => {
                return Ok(Loaded {
                    mode: BootMode::Pvh,
                    entry,
                    kernel_end: r.kernel_end,
                    setup_header: None,
                })
            }
            _ => return Err(BootError::ElfWithoutPvh(path.to_path_buf())),
        },
        // Not an ELF (or too short to be one): try bzImage.
        Err(loader::Error::Elf(elf::Error::InvalidElfMagicNumber | elf::Error::ReadElfHeader)) => {}
        Err(e) => {
            return Err(BootError::LoadKernel {
                path: path.to_path_buf(),
                what: e.to_string(),
            })
        }
    }
    match BzImage::load(mem, None, &mut f, Some(layout::HIMEM_START)) {
        Ok(r) => Ok(Loaded {
            mode: BootMode::Linux64,
            // The 64-bit entry point is 0x200 bytes into the protected-mode kernel.
            entry: r.kernel_load.unchecked_add(0x200),
            kernel_end: r.kernel_end,
            setup_header: r.setup_header,
        }),
        Err(loader::Error::Bzimage(
            linux_loader::loader::bzimage::Error::InvalidBzImage
            | linux_loader::loader::bzimage::Error::ReadBzImageHeader
            | linux_loader::loader::bzimage::Error::SeekBzImageHeader,
        )) => Err(BootError::UnknownKernelFormat(path.to_path_buf())),
        Err(e) => Err(BootError::LoadKernel {
            path: path.to_path_buf(),
            what: e.to_string(),
        }),
    }
}

/// Places the initramfs at the top of low RAM below `max_end`, above `kernel_end`.
fn load_initramfs<M: GuestMemoryBackend>(
    mem: &M,
    path: &Path,
    kernel_end: u64,
    max_end: u64,
) -> Result<(GuestAddress, u64), BootError> {
    let mut f = File::open(path).map_err(|e| BootError::OpenInitramfs(path.to_path_buf(), e))?;
    let size = f
        .metadata()
        .map_err(|e| BootError::OpenInitramfs(path.to_path_buf(), e))?
        .len();
    let too_large = || BootError::InitramfsTooLarge {
        path: path.to_path_buf(),
        size: size.div_ceil(1 << 20),
        limit: max_end,
    };
    let addr = max_end.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < kernel_end {
        return Err(too_large());
    }
    let gaddr = GuestAddress(addr);
    mem.read_exact_volatile_from(gaddr, &mut f, size as usize)
        .map_err(|e| BootError::ReadInitramfs(path.to_path_buf(), e))?;
    Ok((gaddr, size))
}

/// Loads kernel, initramfs and command line and writes the boot protocol structures.
pub fn load<M: GuestMemoryBackend>(
    mem: &M,
    memory_size: u64,
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &str,
) -> Result<BootEntry, BootError> {
    if cmdline.len() >= layout::CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    if cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    let k = load_kernel(mem, kernel)?;
    let low_end = memory_size.min(layout::LOW_RAM_END);
    mem.write_slice(cmdline.as_bytes(), layout::CMDLINE_START)?;
    mem.write_obj(
        0u8,
        layout::CMDLINE_START.unchecked_add(cmdline.len() as u64),
    )?;

    let e820 = layout::e820_map(memory_size);
    match k.mode {
        BootMode::Linux64 => {
            let mut params = boot_params::default();
            if let Some(hdr) = k.setup_header {
                params.hdr = hdr;
            }
            let initrd_max = match params.hdr.initrd_addr_max {
                0 => 0x37ff_ffff,
                m => u64::from(m),
            };
            let initrd = match initramfs {
                Some(p) => Some(load_initramfs(
                    mem,
                    p,
                    k.kernel_end,
                    low_end.min(initrd_max + 1),
                )?),
                None => None,
            };
            fill_boot_params(&mut params, cmdline.len(), initrd, &e820);
            mem.write_obj(params, layout::ZERO_PAGE_START)?;
        }
        BootMode::Pvh => {
            let initrd = match initramfs {
                Some(p) => Some(load_initramfs(mem, p, k.kernel_end, low_end)?),
                None => None,
            };
            write_pvh_start_info(mem, initrd, &e820)?;
        }
    }
    Ok(BootEntry {
        mode: k.mode,
        entry: k.entry,
    })
}

/// Fills the zero page: loader id, command line, initramfs, e820 and the RSDP address.
pub fn fill_boot_params(
    params: &mut boot_params,
    cmdline_len: usize,
    initrd: Option<(GuestAddress, u64)>,
    e820: &[(u64, u64, u32)],
) {
    const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
    const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
    const KERNEL_LOADER_OTHER: u8 = 0xff;
    const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START.0 as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr.0 as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = layout::RSDP_START.0;
    let n = e820.len().min(params.e820_table.len());
    for (slot, &(addr, size, type_)) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
    }
    params.e820_entries = n as u8;
}

fn write_pvh_start_info<M: GuestMemoryBackend>(
    mem: &M,
    initrd: Option<(GuestAddress, u64)>,
    e820: &[(u64, u64, u32)],
) -> Result<(), BootError> {
    const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: layout::CMDLINE_START.0,
        rsdp_paddr: layout::RSDP_START.0,
        memmap_paddr: layout::PVH_MEMMAP_START.0,
        memmap_entries: e820.len() as u32,
        ..Default::default()
    };
    if let Some((addr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr: addr.0,
            size,
            ..Default::default()
        };
        mem.write_obj(module, layout::PVH_MODLIST_START)?;
        info.nr_modules = 1;
        info.modlist_paddr = layout::PVH_MODLIST_START.0;
    }
    for (i, &(addr, size, type_)) in e820.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        };
        mem.write_obj(
            entry,
            layout::PVH_MEMMAP_START
                .unchecked_add((i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64),
        )?;
    }
    mem.write_obj(info, layout::PVH_INFO_START)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::GuestMemoryMmap;

    fn mem(size: u64) -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
    }

    fn tmpfile(name: &str, bytes: &[u8]) -> PathBuf {
        let p = std::env::temp_dir().join(format!("vmm-boot-{}-{name}", std::process::id()));
        File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    #[test]
    fn boot_params_fields() {
        let mut p = boot_params::default();
        let e820 = layout::e820_map(512 << 20);
        fill_boot_params(&mut p, 12, Some((GuestAddress(0x1000_0000), 4096)), &e820);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.cmd_line_ptr }, layout::CMDLINE_START.0 as u32);
        assert_eq!({ p.hdr.cmdline_size }, 12);
        assert_eq!({ p.hdr.ramdisk_image }, 0x1000_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 4096);
        assert_eq!({ p.acpi_rsdp_addr }, layout::RSDP_START.0);
        assert_eq!(p.e820_entries as usize, e820.len());
        let last = p.e820_table[e820.len() - 1];
        assert_eq!({ last.addr }, layout::PCI_ECAM_START);
    }

    #[test]
    fn missing_kernel() {
        let m = mem(16 << 20);
        let e = load(&m, 16 << 20, Path::new("/nonexistent/vmlinuz"), None, "").unwrap_err();
        assert!(matches!(e, BootError::OpenKernel(..)), "{e}");
    }

    #[test]
    fn garbage_kernel_is_unknown_format() {
        let p = tmpfile("garbage", &[0x55u8; 8192]);
        let m = mem(16 << 20);
        let e = load(&m, 16 << 20, &p, None, "").unwrap_err();
        std::fs::remove_file(&p).ok();
        assert!(matches!(e, BootError::UnknownKernelFormat(_)), "{e}");
        assert!(e.to_string().contains("bzImage"));
    }

    #[test]
    fn empty_kernel_is_unknown_format() {
        let p = tmpfile("empty", &[]);
        let m = mem(16 << 20);
        let e = load(&m, 16 << 20, &p, None, "").unwrap_err();
        std::fs::remove_file(&p).ok();
        assert!(matches!(e, BootError::UnknownKernelFormat(_)), "{e}");
    }

    #[test]
    fn long_cmdline() {
        let m = mem(16 << 20);
        let long = "x".repeat(layout::CMDLINE_MAX_SIZE);
        let e = load(&m, 16 << 20, Path::new("/k"), None, &long).unwrap_err();
        assert!(matches!(e, BootError::CmdlineTooLong(_)));
    }

    #[test]
    fn initramfs_at_top_of_ram() {
        let m = mem(16 << 20);
        let p = tmpfile("initrd", &[0xabu8; 10000]);
        let (addr, size) = load_initramfs(&m, &p, 0x20_0000, 16 << 20).unwrap();
        assert_eq!(size, 10000);
        assert_eq!(addr.0 & 0xfff, 0);
        assert!(addr.0 + size <= 16 << 20);
        let b: u8 = m.read_obj(GuestAddress(addr.0 + 9999)).unwrap();
        assert_eq!(b, 0xab);
        let e = load_initramfs(&m, &p, (16 << 20) - 4096, 16 << 20).unwrap_err();
        std::fs::remove_file(&p).ok();
        assert!(matches!(e, BootError::InitramfsTooLarge { .. }));
    }

    #[test]
    fn pvh_start_info_layout() {
        let m = mem(16 << 20);
        let e820 = layout::e820_map(16 << 20);
        write_pvh_start_info(&m, Some((GuestAddress(0x80_0000), 0x1000)), &e820).unwrap();
        let info: hvm_start_info = m.read_obj(layout::PVH_INFO_START).unwrap();
        assert_eq!(info.magic, 0x336e_c578);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.memmap_entries as usize, e820.len());
        let module: hvm_modlist_entry = m.read_obj(layout::PVH_MODLIST_START).unwrap();
        assert_eq!(module.paddr, 0x80_0000);
        let first: hvm_memmap_table_entry = m.read_obj(layout::PVH_MEMMAP_START).unwrap();
        assert_eq!((first.addr, first.type_), (0, layout::E820_RAM));
    }
}
