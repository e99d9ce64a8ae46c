//! Boot-time vCPU state: segments, page tables, control registers, MSRs, FPU, LAPIC.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Address, Bytes, GuestMemoryBackend};

use crate::layout::{self, GDT_START, IDT_START, PDE_START, PDPTE_START, PML4_START};

/// Builds a GDT entry from flags (the high 4 bits of byte 6 and byte 5), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Turns a GDT entry into the segment KVM loads for selector `index * 8`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(present == 0),
    }
}

/// Which protocol the kernel entry expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootMode {
    /// 64-bit Linux boot protocol: long mode, paging with an identity map.
    Linux64,
    /// PVH: 32-bit protected mode, paging off.
    Pvh,
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// The GDT written to guest memory for each boot mode.
pub fn gdt(mode: BootMode) -> [u64; 4] {
    match mode {
        BootMode::Linux64 => [
            gdt_entry(0, 0, 0),
            gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
            gdt_entry(0xc093, 0, 0xfffff), // data
            gdt_entry(0x808b, 0, 0xfffff), // TSS
        ],
        BootMode::Pvh => [
            gdt_entry(0, 0, 0),
            gdt_entry(0xc09b, 0, 0xfffff), // 32-bit flat code
            gdt_entry(0xc093, 0, 0xfffff), // flat data
            gdt_entry(0x008b, 0, 0x67),    // TSS
        ],
    }
}

/// Writes the GDT, an empty IDT and (for 64-bit boot) the identity-mapped page tables, and
/// fills `sregs` accordingly.
pub fn setup_sregs<M: GuestMemoryBackend>(
    mem: &M,
    mode: BootMode,
    sregs: &mut kvm_sregs,
) -> Result<(), vm_memory::GuestMemoryError> {
    let table = gdt(mode);
    for (i, entry) in table.iter().enumerate() {
        mem.write_obj(*entry, GDT_START.unchecked_add(i as u64 * 8))?;
    }
    mem.write_obj(0u64, IDT_START)?;

    let code = segment_from_gdt(table[1], 1);
    let data = segment_from_gdt(table[2], 2);
    let tss = segment_from_gdt(table[3], 3);
    sregs.gdt.base = GDT_START.0;
    sregs.gdt.limit = (table.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_START.0;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    match mode {
        BootMode::Linux64 => {
            setup_page_tables(mem)?;
            sregs.cr3 = PML4_START.0;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        BootMode::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    Ok(())
}

/// Identity-maps the first 4 GiB with 2 MiB pages (PML4 -> PDPT -> 4 page directories).
fn setup_page_tables<M: GuestMemoryBackend>(mem: &M) -> Result<(), vm_memory::GuestMemoryError> {
    // Present | writable.
    const P_RW: u64 = 0x3;
    const PS: u64 = 0x80;
    mem.write_obj(PDPTE_START.0 | P_RW, PML4_START)?;
    for pd in 0..4u64 {
        let pd_addr = PDE_START.0 + pd * 0x1000;
        mem.write_obj(pd_addr | P_RW, PDPTE_START.unchecked_add(pd * 8))?;
        for i in 0..512u64 {
            let phys = (pd << 30) | (i << 21);
            mem.write_obj(phys | P_RW | PS, vm_memory::GuestAddress(pd_addr + i * 8))?;
        }
    }
    Ok(())
}

/// General registers at the kernel entry.
pub fn boot_regs(mode: BootMode, entry: u64) -> kvm_regs {
    match mode {
        BootMode::Linux64 => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: layout::BOOT_STACK_POINTER,
            rbp: layout::BOOT_STACK_POINTER,
            rsi: layout::ZERO_PAGE_START.0,
            ..Default::default()
        },
        BootMode::Pvh => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rbx: layout::PVH_INFO_START.0,
            ..Default::default()
        },
    }
}

/// MSRs every vCPU starts with (as on a freshly reset CPU, fast strings on).
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// x87 and SSE state at reset.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(state: &kvm_lapic_state, off: usize) -> u32 {
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = state.regs[off + i] as u8;
    }
    u32::from_le_bytes(b)
}

fn set_lapic_reg(state: &mut kvm_lapic_state, off: usize, value: u32) {
    for (i, x) in value.to_le_bytes().iter().enumerate() {
        state.regs[off + i] = *x as _;
    }
}

/// LINT0 = ExtINT (the PIC), LINT1 = NMI, as firmware leaves them.
pub fn set_lint(state: &mut kvm_lapic_state) {
    let delivery = |reg: u32, mode: u32| (reg & !0x700) | (mode << 8);
    let lvt0 = lapic_reg(state, APIC_LVT0);
    set_lapic_reg(state, APIC_LVT0, delivery(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(state, APIC_LVT1);
    set_lapic_reg(state, APIC_LVT1, delivery(lvt1, APIC_MODE_NMI));
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn gdt_entries_decode() {
        let code = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(code.selector, 8);
        assert_eq!(
            (code.l, code.db, code.g, code.present, code.s),
            (1, 0, 1, 1, 1)
        );
        assert_eq!(code.type_, 0xb);
        assert_eq!(code.limit, 0xffff_ffff);
        let data = segment_from_gdt(gdt_entry(0xc093, 0x1234_5678, 0xfffff), 2);
        assert_eq!(data.base, 0x1234_5678);
        assert_eq!((data.db, data.type_, data.dpl), (1, 3, 0));
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
        let tss = segment_from_gdt(gdt_entry(0x008b, 0, 0x67), 3);
        assert_eq!((tss.limit, tss.g, tss.type_), (0x67, 0, 0xb));
    }

    #[test]
    fn long_mode_sregs() {
        let m = mem();
        let mut s = kvm_sregs::default();
        setup_sregs(&m, BootMode::Linux64, &mut s).unwrap();
        assert_eq!(s.cr3, PML4_START.0);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.efer & EFER_LMA, 0);
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.cs.selector, 8);
        assert_eq!(s.ss.selector, 16);
        let gdt1: u64 = m.read_obj(GuestAddress(GDT_START.0 + 8)).unwrap();
        assert_eq!(gdt1, gdt_entry(0xa09b, 0, 0xfffff));
        // Identity map: PML4[0] -> PDPT, PDPT[3] -> 4th PD, its last entry maps 4G - 2M.
        let pml4: u64 = m.read_obj(PML4_START).unwrap();
        assert_eq!(pml4 & !0xfff, PDPTE_START.0);
        let pdpt3: u64 = m.read_obj(GuestAddress(PDPTE_START.0 + 24)).unwrap();
        assert_eq!(pdpt3 & !0xfff, PDE_START.0 + 0x3000);
        let last: u64 = m
            .read_obj(GuestAddress(PDE_START.0 + 0x3000 + 511 * 8))
            .unwrap();
        assert_eq!(last & !0xfff, (4u64 << 30) - (2 << 20));
        assert_eq!(last & 0x83, 0x83);
    }

    #[test]
    fn pvh_sregs() {
        let m = mem();
        let mut s = kvm_sregs::default();
        setup_sregs(&m, BootMode::Pvh, &mut s).unwrap();
        assert_eq!(s.cr0, X86_CR0_PE | X86_CR0_ET);
        assert_eq!(s.efer, 0);
        assert_eq!((s.cs.l, s.cs.db, s.cs.limit), (0, 1, 0xffff_ffff));
        let r = boot_regs(BootMode::Pvh, 0x10_0000);
        assert_eq!(r.rbx, layout::PVH_INFO_START.0);
        assert_eq!(r.rip, 0x10_0000);
    }

    #[test]
    fn linux_regs() {
        let r = boot_regs(BootMode::Linux64, 0x10_0200);
        assert_eq!(r.rsi, layout::ZERO_PAGE_START.0);
        assert_eq!(r.rflags, 2);
    }

    #[test]
    fn lint_modes() {
        let mut st = kvm_lapic_state::default();
        set_lapic_reg(&mut st, APIC_LVT0, 0x0001_0700);
        set_lint(&mut st);
        assert_eq!(lapic_reg(&st, APIC_LVT0), 0x0001_0700);
        assert_eq!((lapic_reg(&st, APIC_LVT1) >> 8) & 7, APIC_MODE_NMI);
    }

    #[test]
    fn msrs_and_fpu() {
        assert!(boot_msrs().iter().any(|m| m.index == 0x1a0 && m.data == 1));
        assert_eq!(boot_fpu().mxcsr, 0x1f80);
    }
}
