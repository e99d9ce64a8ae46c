//! Boot: the PVH entry, the CPU tables, the switch to ring 3, and the exception stubs.
//!
//! Ring 0 is emulated (slow) on the hosts this guest is made for, so everything the CPU
//! needs is built at compile time: [`BootTables`] is a `const` value placed by the linker
//! script at [`TABLES_ADDR`], and the ISR stubs sit at [`ISR_STUBS_ADDR`], so that even the
//! address-splitting descriptors (GDT TSS entry, IDT gates) are precomputed. The ring-0 path
//! is a straight line of 18 instructions from `pvh_entry` to `iretq`.
//!
//! Entry state (PVH boot ABI): 32-bit protected mode, paging off, flat CS/DS/ES/SS,
//! EBX = physical address of `struct hvm_start_info`. Nothing else is assumed: CR0, CR4
//! and EFER are written whole, no stack is needed before `iretq`.

use core::arch::global_asm;
use core::cell::UnsafeCell;
use core::mem::{offset_of, size_of};

/// The address the image starts at (physical = virtual); `.boot_tables` is first.
pub const TABLES_ADDR: u64 = 0x10_0000;

/// Identity map 0..4 GiB with 2 MiB pages.
const MAPPED_GIB: usize = 4;
/// From here to 4 GiB (the 32-bit PCI hole: BARs, IOAPIC, LAPIC) pages are uncached.
pub const PCI_HOLE_START: u64 = 0xC000_0000;
const PAGE_2M: u64 = 1 << 21;

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_PWT: u64 = 1 << 3;
const PTE_PCD: u64 = 1 << 4;
const PTE_HUGE: u64 = 1 << 7;
const PTE_TABLE: u64 = PTE_PRESENT | PTE_WRITABLE | PTE_USER;

/// GDT selectors. User data precedes user code, the order SYSRET expects.
pub const KERNEL_CS: u16 = 0x08;
pub const KERNEL_DS: u16 = 0x10;
pub const USER_DS: u16 = 0x18 | 3;
pub const USER_CS: u16 = 0x20 | 3;
pub const TSS_SEL: u16 = 0x28;
const GDT_ENTRIES: usize = 8;

/// Vectors with an IDT gate: the CPU exceptions.
pub const IDT_VECTORS: usize = 32;
/// Every ISR stub is 16-byte aligned and at most 16 bytes long.
const ISR_STUB_SIZE: u64 = 16;
/// Ports covered by the TSS I/O permission bitmap (all of them).
const IOMAP_BYTES: usize = 65536 / 8;
const KSTACK_SIZE: usize = 4096;
const USER_STACK_SIZE: usize = 64 * 1024;

const CR0_PE: u32 = 1 << 0;
const CR0_MP: u32 = 1 << 1;
const CR0_ET: u32 = 1 << 4;
const CR0_NE: u32 = 1 << 5;
const CR0_PG: u32 = 1 << 31;
const CR4_PAE: u32 = 1 << 5;
const CR4_OSFXSR: u32 = 1 << 9;
const CR4_OSXMMEXCPT: u32 = 1 << 10;
const MSR_EFER: u32 = 0xC000_0080;
const EFER_LME: u32 = 1 << 8;
/// RFLAGS for ring 3: only the always-one bit 1; IF=0, IOPL=0 (ports are opened by the TSS).
const USER_RFLAGS: u64 = 1 << 1;

#[repr(C, align(4096))]
struct PageTable([u64; 512]);

/// The operand of `lgdt`/`lidt` (limit at offset 6, so that the base is 8-byte aligned).
#[repr(C, align(8))]
struct DescriptorPointer {
    _pad: [u16; 3],
    limit: u16,
    base: u64,
}

/// A 64-bit interrupt gate.
#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct Gate {
    low: u64,
    high: u64,
}

/// The 64-bit TSS (104 bytes), immediately followed by its I/O permission bitmap.
#[repr(C, packed(4))]
struct Tss {
    _reserved0: u32,
    rsp: [u64; 3],
    _reserved1: u64,
    ist: [u64; 7],
    _reserved2: u64,
    _reserved3: u16,
    iomap_base: u16,
}

#[repr(C, align(16))]
struct KernelStack([u8; KSTACK_SIZE]);

/// Everything the CPU reads from memory, fully computed at compile time for [`TABLES_ADDR`].
#[repr(C, align(4096))]
pub struct BootTables {
    pml4: PageTable,
    pdpt: PageTable,
    pd: [PageTable; MAPPED_GIB],
    gdt: [u64; GDT_ENTRIES],
    gdtr: DescriptorPointer,
    idtr: DescriptorPointer,
    idt: [Gate; IDT_VECTORS],
    tss: Tss,
    /// All zero (every port allowed) plus the terminating 0xff byte the CPU requires.
    iomap: [u8; IOMAP_BYTES + 1],
    /// Ring-0 stack (TSS.RSP0): exception handlers run on it.
    kstack: KernelStack,
}

const fn addr_of(offset: usize) -> u64 {
    TABLES_ADDR + offset as u64
}

/// Where the ISR stubs are: the first page after the tables (see link.ld).
pub const ISR_STUBS_ADDR: u64 = TABLES_ADDR + size_of::<BootTables>() as u64;
const GDTR_ADDR: u64 = addr_of(offset_of!(BootTables, gdtr) + 6);
const IDTR_ADDR: u64 = addr_of(offset_of!(BootTables, idtr) + 6);
const PML4_ADDR: u64 = addr_of(offset_of!(BootTables, pml4));
const RSP0: u64 = addr_of(offset_of!(BootTables, kstack) + KSTACK_SIZE);

/// Flat segment descriptor: base 0, limit 4 GiB, `access` byte, `flags` nibble (G, D/B, L).
const fn segment(access: u64, flags: u64) -> u64 {
    0xffff | (access << 40) | (0xf << 48) | (flags << 52)
}

/// Vectors whose exception pushes an error code (the stub pushes a 0 for the others).
const fn has_error_code(vector: usize) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

impl BootTables {
    const fn new() -> Self {
        let mut t = BootTables {
            pml4: PageTable([0; 512]),
            pdpt: PageTable([0; 512]),
            pd: [const { PageTable([0; 512]) }; MAPPED_GIB],
            gdt: [0; GDT_ENTRIES],
            gdtr: DescriptorPointer {
                _pad: [0; 3],
                limit: (size_of::<[u64; GDT_ENTRIES]>() - 1) as u16,
                base: addr_of(offset_of!(BootTables, gdt)),
            },
            idtr: DescriptorPointer {
                _pad: [0; 3],
                limit: (size_of::<[Gate; IDT_VECTORS]>() - 1) as u16,
                base: addr_of(offset_of!(BootTables, idt)),
            },
            idt: [Gate { low: 0, high: 0 }; IDT_VECTORS],
            tss: Tss {
                _reserved0: 0,
                rsp: [RSP0, 0, 0],
                _reserved1: 0,
                ist: [0; 7],
                _reserved2: 0,
                _reserved3: 0,
                iomap_base: size_of::<Tss>() as u16,
            },
            iomap: [0; IOMAP_BYTES + 1],
            kstack: KernelStack([0; KSTACK_SIZE]),
        };
        t.iomap[IOMAP_BYTES] = 0xff;

        // Page tables: PML4[0] -> PDPT, PDPT[0..4] -> PD[0..4], 2 MiB pages, all user-accessible.
        t.pml4.0[0] = addr_of(offset_of!(BootTables, pdpt)) | PTE_TABLE;
        let mut gib = 0;
        while gib < MAPPED_GIB {
            let pd = offset_of!(BootTables, pd) + gib * size_of::<PageTable>();
            t.pdpt.0[gib] = addr_of(pd) | PTE_TABLE;
            let mut i = 0;
            while i < 512 {
                let phys = ((gib * 512 + i) as u64) * PAGE_2M;
                let mut entry = phys | PTE_PRESENT | PTE_WRITABLE | PTE_USER | PTE_HUGE;
                if phys >= PCI_HOLE_START {
                    entry |= PTE_PCD | PTE_PWT;
                }
                t.pd[gib].0[i] = entry;
                i += 1;
            }
            gib += 1;
        }

        // GDT.
        t.gdt[(KERNEL_CS >> 3) as usize] = segment(0x9a, 0b1010); // P, DPL0, code; G, L
        t.gdt[(KERNEL_DS >> 3) as usize] = segment(0x92, 0b1100); // P, DPL0, data; G, D/B
        t.gdt[(USER_DS >> 3) as usize] = segment(0xf2, 0b1100); // P, DPL3, data; G, D/B
        t.gdt[(USER_CS >> 3) as usize] = segment(0xfa, 0b1010); // P, DPL3, code; G, L
        let tss_base = addr_of(offset_of!(BootTables, tss));
        let tss_limit = (size_of::<Tss>() + IOMAP_BYTES) as u64; // last byte: the 0xff
        t.gdt[(TSS_SEL >> 3) as usize] = (tss_limit & 0xffff)
            | ((tss_base & 0xff_ffff) << 16)
            | (0x89 << 40) // P, DPL0, available 64-bit TSS
            | (((tss_limit >> 16) & 0xf) << 48)
            | (((tss_base >> 24) & 0xff) << 56);
        t.gdt[(TSS_SEL >> 3) as usize + 1] = tss_base >> 32;

        // IDT: interrupt gates (IF cleared) to the stubs. #BP and #OF are DPL3 so that
        // `int3`/`into` in ring 3 report their own vector instead of #GP.
        let mut v = 0;
        while v < IDT_VECTORS {
            let handler = ISR_STUBS_ADDR + v as u64 * ISR_STUB_SIZE;
            let dpl: u64 = if v == 3 || v == 4 { 3 } else { 0 };
            t.idt[v] = Gate {
                low: (handler & 0xffff)
                    | ((KERNEL_CS as u64) << 16)
                    | ((0x8e | (dpl << 5)) << 40)
                    | (((handler >> 16) & 0xffff) << 48),
                high: handler >> 32,
            };
            v += 1;
        }
        t
    }
}

/// The tables, shared with the CPU (which writes A/D bits and the TSS busy bit).
#[repr(transparent)]
pub struct CpuShared<T>(UnsafeCell<T>);

// SAFETY: the guest has one CPU and Rust code never reads or writes the tables; only the
// hardware does, through the addresses precomputed above.
unsafe impl<T> Sync for CpuShared<T> {}

#[no_mangle]
#[link_section = ".boot_tables"]
pub static BOOT_TABLES: CpuShared<BootTables> = CpuShared(UnsafeCell::new(BootTables::new()));

/// The frame pushed by the CPU on an exception, plus the vector and error code from the stub.
#[repr(C)]
#[derive(Debug)]
pub struct TrapFrame {
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

global_asm!(
    // The PVH note: XEN_ELFNOTE_PHYS32_ENTRY (18), name "Xen", the 32-bit entry as a
    // 64-bit value (QEMU reads 8 bytes on a 64-bit ELF, linux-loader reads 4).
    r#"
    .pushsection .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .balign 4
    .quad pvh_entry
    .popsection
    "#,
    // The ring-0 path.
    r#"
    .pushsection .text.boot, "ax"
    .code32
    .globl pvh_entry
pvh_entry:
    lgdt ({gdtr})
    movl ${cr4}, %eax
    movl %eax, %cr4
    movl ${pml4}, %eax
    movl %eax, %cr3
    movl ${efer_msr}, %ecx
    movl ${efer}, %eax
    xorl %edx, %edx
    wrmsr
    movl ${cr0}, %eax
    movl %eax, %cr0
    ljmpl ${kernel_cs}, $1f
    .code64
1:
    movw ${tss_sel}, %ax
    ltr %ax
    lidt ({idtr})
    movl %ebx, %edi
    movl $iret_frame, %esp
    iretq
    .popsection
    "#,
    // What `iretq` pops: RIP, CS, RFLAGS, RSP, SS. The user stack top is offset by 8 so that
    // the entry function sees the stack alignment of a normal call.
    r#"
    .pushsection .rodata.iret_frame, "a"
    .balign 8
iret_frame:
    .quad {ring3_entry}
    .quad {user_cs}
    .quad {user_rflags}
    .quad user_stack_top - 8
    .quad {user_ds}
    .popsection

    .pushsection .bss.user_stack, "aw", @nobits
    .balign 16
    .skip {user_stack_size}
user_stack_top:
    .popsection
    "#,
    // ISR stubs, one per 16 bytes from `isr_stubs` (the IDT points at them): push a 0 where the
    // CPU pushes no error code, push the vector, go to the common part, which calls the Rust
    // handler with a pointer to the `TrapFrame`.
    r#"
    .pushsection .text.isr, "ax"
    .code64
    .balign 16
    .globl isr_stubs
isr_stubs:
    .set vector, 0
    .rept {idt_vectors}
    .balign 16
    .if (vector != 8) && (vector < 10 || vector > 14) && (vector != 17) && (vector != 21) && (vector != 29) && (vector != 30)
    pushq $0
    .endif
    pushq $vector
    jmp isr_common
    .set vector, vector + 1
    .endr
    .balign 16
    .globl isr_common
isr_common:
    cld
    movq %rsp, %rdi
    andq $-16, %rsp
    call {trap_handler}
    ud2
    .popsection

    .globl __layout_boot_tables
    .set __layout_boot_tables, {tables_addr}
    .globl __layout_boot_tables_size
    .set __layout_boot_tables_size, {tables_size}
    .globl __layout_isr_stubs
    .set __layout_isr_stubs, {isr_stubs_addr}
    .globl __layout_isr_stubs_size
    .set __layout_isr_stubs_size, {isr_stubs_size}
    "#,
    gdtr = const GDTR_ADDR,
    idtr = const IDTR_ADDR,
    cr4 = const CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT,
    pml4 = const PML4_ADDR,
    efer_msr = const MSR_EFER,
    efer = const EFER_LME,
    cr0 = const CR0_PG | CR0_NE | CR0_ET | CR0_MP | CR0_PE,
    kernel_cs = const KERNEL_CS,
    tss_sel = const TSS_SEL,
    ring3_entry = sym crate::ring3_main,
    user_cs = const USER_CS,
    user_ds = const USER_DS,
    user_rflags = const USER_RFLAGS,
    user_stack_size = const USER_STACK_SIZE,
    idt_vectors = const IDT_VECTORS,
    trap_handler = sym crate::trap::handle,
    tables_addr = const TABLES_ADDR,
    tables_size = const size_of::<BootTables>(),
    isr_stubs_addr = const ISR_STUBS_ADDR,
    isr_stubs_size = const IDT_VECTORS as u64 * ISR_STUB_SIZE,
    options(att_syntax)
);

// The stub layout above encodes the same list as `has_error_code`; check they agree on the
// count at least (8, 10..=14, 17, 21, 29, 30).
const _: () = {
    let mut n = 0;
    let mut v = 0;
    while v < IDT_VECTORS {
        if has_error_code(v) {
            n += 1;
        }
        v += 1;
    }
    assert!(n == 10);
    assert!(size_of::<Tss>() == 104);
    assert!(offset_of!(BootTables, iomap) == offset_of!(BootTables, tss) + size_of::<Tss>());
    assert!(ISR_STUBS_ADDR & 0xfff == 0);
};
