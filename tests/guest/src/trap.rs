//! CPU exceptions: report on COM1 and end the run. Runs in ring 0 (the IDT's stubs call
//! [`handle`] on the TSS.RSP0 stack), so it is slow on PVM hosts, but only runs on failure.

use core::arch::asm;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::boot::TrapFrame;
use crate::exit::{exit, EXIT_EXCEPTION};

const NAMES: [&str; 32] = [
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "#9", "#TS", "#NP", "#SS",
    "#GP", "#PF", "#15", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "#22", "#23", "#24", "#25",
    "#26", "#27", "#HV", "#VC", "#SX", "#31",
];

/// Set by `fault=triple`: the next exception makes the CPU shut down (triple fault).
pub static TRIPLE_FAULT: AtomicBool = AtomicBool::new(false);

/// Set by `fault=halt`: the next exception halts the CPU with interrupts off, for good.
pub static HALT: AtomicBool = AtomicBool::new(false);

/// Called by `isr_common` with the frame on the ring-0 stack.
pub extern "C" fn handle(frame: &TrapFrame) -> ! {
    if HALT.load(Ordering::SeqCst) {
        crate::println!("halting with interrupts off on request");
        loop {
            // SAFETY: runs in ring 0; stops this CPU until an NMI (none comes), which is
            // the point.
            unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
        }
    }
    if TRIPLE_FAULT.load(Ordering::SeqCst) {
        crate::println!("triple fault on request");
        let empty: [u16; 5] = [0; 5];
        // SAFETY: runs in ring 0. With an IDT of limit 0, `ud2` cannot be delivered, nor can
        // the #GP and #DF that follow: the CPU shuts down, which is the point.
        unsafe {
            asm!("lidt [{0}]", "ud2", in(reg) empty.as_ptr(), options(nostack, noreturn));
        }
    }
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects; this runs in ring 0.
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) };
    let name = NAMES.get(frame.vector as usize).copied().unwrap_or("?");
    crate::println!(
        "EXCEPTION {} ({name}) error={:#x} rip={:#x} cs={:#x} rflags={:#x} rsp={:#x} cr2={:#x}",
        frame.vector,
        frame.error_code,
        frame.rip,
        frame.cs,
        frame.rflags,
        frame.rsp,
        cr2
    );
    exit(EXIT_EXCEPTION)
}
