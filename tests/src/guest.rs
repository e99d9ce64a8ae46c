//! The ring-3 PVH test guest (`tests/guest`), built by this package's build script.
//!
//! A static ELF64 loaded at 1 MiB with a `XEN_ELFNOTE_PHYS32_ENTRY` note. Command line:
//! `exit=N` (debug-exit code, default 0), `msg=TEXT`, `fault=panic|ud|pf|bp|gp`. It prints
//! `test-guest: hello from ring 3 (cpl=3)` on COM1 and writes N to the debug-exit port 0xf4
//! (QEMU's `isa-debug-exit` then exits with status `(N << 1) | 1`).
//!
//! With `probe=blk|net` (and `n=`, `warmup=`, `seed=`, `tests=read,write,qd32`, `qd=`,
//! `ip=`, `peer=`, `size=`) it runs the latency probe instead; see [`crate::probe`]. With
//! `hostile=loop|bounce|sane` (and `hold_ms=`, `tsc_mhz=`) it attacks a virtio-blk device
//! the way a hostile guest can (`tests/guest/src/hostile_io.rs`, `tests/tests/hostile_io.rs`).

use std::path::PathBuf;

/// Debug-exit port the guest writes its exit code to (32-bit `out`).
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Exit code the guest writes after a panic in its payload.
pub const EXIT_PANIC: u32 = 0x70;
/// Exit code the guest writes after a CPU exception.
pub const EXIT_EXCEPTION: u32 = 0x71;
/// The line that proves the payload runs in ring 3.
pub const RING3_LINE: &str = "test-guest: hello from ring 3 (cpl=3)";

/// Path of the built guest ELF (in the build's OUT_DIR).
pub fn test_guest_elf() -> PathBuf {
    PathBuf::from(env!("TEST_GUEST_ELF"))
}
