//! Guest physical address map (x86_64).
//!
//! ```text
//! 0x0000_0500  GDT                     0x0000_0520  IDT (empty)
//! 0x0000_6000  PVH hvm_start_info      0x0000_6040  PVH module list
//! 0x0000_7000  zero page / PVH memmap  0x0000_8ff0  boot stack top
//! 0x0000_9000  PML4  0xa000 PDPT  0xb000-0xefff four PDs (identity map of 4 GiB)
//! 0x0002_0000  kernel command line (up to 64 KiB)
//! 0x000e_0000  RSDP, then the other ACPI tables (up to 0x10_0000)
//! 0x0010_0000  kernel
//! ...          RAM up to min(memory, 3 GiB); initramfs at the top of low RAM
//! 0xc000_0000  32-bit PCI MMIO window (512 MiB)
//! 0xe000_0000  PCI ECAM (bus 0..=255, 256 MiB)
//! 0xfec0_0000  IOAPIC   0xfee0_0000 LAPIC
//! 0x1_0000_0000 RAM above 4 GiB when memory > 3 GiB, then the 64-bit PCI window
//! ```

use vm_memory::GuestAddress;

pub const GDT_START: GuestAddress = GuestAddress(0x500);
pub const IDT_START: GuestAddress = GuestAddress(0x520);
pub const PVH_INFO_START: GuestAddress = GuestAddress(0x6000);
pub const PVH_MODLIST_START: GuestAddress = GuestAddress(0x6040);
pub const PVH_MEMMAP_START: GuestAddress = GuestAddress(0x7000);
pub const ZERO_PAGE_START: GuestAddress = GuestAddress(0x7000);
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: GuestAddress = GuestAddress(0x9000);
pub const PDPTE_START: GuestAddress = GuestAddress(0xa000);
pub const PDE_START: GuestAddress = GuestAddress(0xb000);
pub const CMDLINE_START: GuestAddress = GuestAddress(0x2_0000);
pub const CMDLINE_MAX_SIZE: usize = 0x1_0000;
/// Legacy BIOS area start: e820 RAM below this.
pub const EBDA_START: u64 = 0xa_0000;
pub const RSDP_START: GuestAddress = GuestAddress(0xe_0000);
pub const ACPI_END: u64 = 0x10_0000;
pub const HIMEM_START: GuestAddress = GuestAddress(0x10_0000);

pub const MMIO32_START: u64 = 0xc000_0000;
pub const MMIO32_SIZE: u64 = 0x2000_0000;
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 0x1000_0000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM needs three pages for the TSS on Intel; put them just below the IOAPIC.
pub const KVM_TSS_START: u64 = 0xfffb_d000;
pub const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;
/// End of low RAM: everything from here to 4 GiB is MMIO.
pub const LOW_RAM_END: u64 = MMIO32_START;
/// Size of the 64-bit PCI window placed above RAM.
pub const MMIO64_SIZE: u64 = 64 << 30;

/// Debug-exit port (the same as `-device isa-debug-exit,iobase=0xf4,iosize=4` in QEMU).
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// ACPI hardware-reduced sleep control register (FADT SLEEP_CONTROL_REG).
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
/// ACPI reset register (FADT RESET_REG).
pub const ACPI_RESET_PORT: u16 = 0x601;
pub const ACPI_RESET_VALUE: u8 = 1;
/// The ACPI hotplug register block (GED events, PCI slots): see [`crate::hotplug`].
pub const HOTPLUG_PORT: u16 = 0x610;
/// The Generic Event Device's interrupt (ISA IRQ 5, edge-triggered, active high).
pub const GED_IRQ: u32 = 5;
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const I8042_PORT: u16 = 0x60;
pub const CMOS_PORT: u16 = 0x70;
pub const RTC_IRQ: u32 = 8;
pub const PCI_CONFIG_ADDRESS_PORT: u16 = 0xcf8;
/// IOAPIC pins: GSIs 0..24 are the in-kernel IOAPIC's; MSI routes start above.
pub const IOAPIC_PINS: u32 = 24;
/// IOAPIC pins wired to PCI INTx lines (level-triggered, active low, listed in _PRT).
pub const PCI_INTX_GSI_FIRST: u32 = 16;
pub const PCI_INTX_GSIS: u32 = 8;
/// I/O port window for I/O BARs.
pub const PCI_IO_START: u64 = 0xc000;
/// Where the host bridge's upper I/O window starts (the DSDT's `_CRS`: 0xD00-0xFFFF, after
/// the config ports): I/O BARs are accepted from here.
pub const PCI_IO_WINDOW_START: u64 = 0xd00;
pub const PCI_IO_END: u64 = 0x1_0000;

/// RAM ranges of a guest of `memory` bytes: low RAM up to the MMIO hole, the rest above 4 GiB.
pub fn ram_ranges(memory: u64) -> Vec<(GuestAddress, u64)> {
    if memory <= LOW_RAM_END {
        vec![(GuestAddress(0), memory)]
    } else {
        vec![
            (GuestAddress(0), LOW_RAM_END),
            (GuestAddress(FIRST_ADDR_PAST_32BITS), memory - LOW_RAM_END),
        ]
    }
}

/// The 64-bit PCI window: above RAM (and above 4 GiB), 1 GiB aligned.
pub fn mmio64_window(memory: u64) -> (u64, u64) {
    let ram_end = match ram_ranges(memory).last() {
        Some((a, s)) => a.0 + s,
        None => 0,
    };
    let start = ram_end
        .max(FIRST_ADDR_PAST_32BITS)
        .next_multiple_of(1 << 30);
    (start, MMIO64_SIZE)
}

// The fixed boot areas must not overlap each other or the kernel.
const _: () = assert!(PDE_START.0 + 4 * 0x1000 <= CMDLINE_START.0);
const _: () = assert!(CMDLINE_START.0 + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
const _: () = assert!(PCI_ECAM_START + PCI_ECAM_SIZE <= IOAPIC_START);
const _: () = assert!(MMIO32_START + MMIO32_SIZE == PCI_ECAM_START);

/// e820 entry types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// The e820 map a guest of `memory` bytes sees: (address, size, type).
pub fn e820_map(memory: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![(0, EBDA_START, E820_RAM)];
    map.push((RSDP_START.0, ACPI_END - RSDP_START.0, E820_RESERVED));
    for (addr, size) in ram_ranges(memory) {
        if addr.0 == 0 {
            map.push((HIMEM_START.0, size - HIMEM_START.0, E820_RAM));
        } else {
            map.push((addr.0, size, E820_RAM));
        }
    }
    map.push((PCI_ECAM_START, PCI_ECAM_SIZE, E820_RESERVED));
    map.sort_by_key(|e| e.0);
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_range() {
        assert_eq!(ram_ranges(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
        assert_eq!(ram_ranges(3 << 30), vec![(GuestAddress(0), 3 << 30)]);
    }

    #[test]
    fn large_guest_skips_the_hole() {
        let r = ram_ranges(6 << 30);
        assert_eq!(r[0], (GuestAddress(0), 3 << 30));
        assert_eq!(r[1], (GuestAddress(4 << 30), 3 << 30));
        assert_eq!(mmio64_window(6 << 30).0, 7 << 30);
        assert_eq!(mmio64_window(512 << 20).0, 4 << 30);
    }

    #[test]
    fn e820_small() {
        let m = e820_map(512 << 20);
        assert_eq!(
            m,
            vec![
                (0, 0xa0000, E820_RAM),
                (0xe0000, 0x20000, E820_RESERVED),
                (0x100000, (512 << 20) - 0x100000, E820_RAM),
                (PCI_ECAM_START, PCI_ECAM_SIZE, E820_RESERVED),
            ]
        );
    }

    #[test]
    fn e820_large_has_no_overlap_and_covers_all_ram() {
        let mem = 5u64 << 30;
        let m = e820_map(mem);
        for w in m.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "overlap in {m:x?}");
        }
        let ram: u64 = m.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        // Everything but the legacy hole between 640 KiB and 1 MiB is RAM.
        assert_eq!(ram, mem - (HIMEM_START.0 - EBDA_START));
        assert!(m.iter().any(|e| e.0 == 4 << 30 && e.1 == 2 << 30));
    }
}
