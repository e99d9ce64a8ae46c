//! Ending the run through the debug-exit port (QEMU's `isa-debug-exit`, iobase 0xf4).
//!
//! Writing `code` makes QEMU exit with status `(code << 1) | 1`; the project's VMM does
//! the same. So status 1 means `exit=0`, and no code can produce status 0.

use crate::pio;

/// The debug-exit port.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Exit code after a Rust panic (QEMU status 225).
pub const EXIT_PANIC: u32 = 0x70;
/// Exit code after a CPU exception (QEMU status 227).
pub const EXIT_EXCEPTION: u32 = 0x71;

/// Writes `code` to the debug-exit port. If the VM keeps running (no such device), says so
/// once and spins: `hlt` is not available in ring 3.
pub fn exit(code: u32) -> ! {
    // SAFETY: the debug-exit port only ends the VM.
    unsafe { pio::outl(DEBUG_EXIT_PORT, code) };
    crate::println!("debug-exit on port {DEBUG_EXIT_PORT:#x} did not stop the VM; spinning");
    loop {
        core::hint::spin_loop();
    }
}
