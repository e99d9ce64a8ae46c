//! A tiny PVH guest for tests: minimal ring-0 set-up (all tables built at compile time, see
//! [`boot`]), then the payload runs in ring 3.
//!
//! The payload reads the command line (`exit=N`, `msg=TEXT`, see [`cmdline`]), prints
//! `test-guest: hello from ring 3 (cpl=3)` on COM1 and ends the run through the debug-exit
//! port with code N. A panic prints `test-guest: PANIC: ...` and exits with
//! [`exit::EXIT_PANIC`]; a CPU exception prints `test-guest: EXCEPTION <vector> ...` and exits
//! with [`exit::EXIT_EXCEPTION`].
//!
//! With `probe=blk` or `probe=net` it then runs the latency probe of [`probe`] (a polling
//! ring-3 virtio-pci driver, see [`virtio`]) and exits with 0x72 if a probe test failed.
//! With `hostile=loop|bounce|sane` it attacks a virtio-blk device instead (see [`hostile_io`]).
//!
//! Built for the host target as a freestanding static ELF by the `tests` package's build
//! script (see `tests/build.rs`), linked by `link.ld`.

#![no_std]
#![no_main]

mod boot;
mod cmdline;
mod exit;
mod hostile_io;
mod hostile_pci;
mod mem;
mod net;
mod pci;
mod pio;
mod probe;
mod probe_shared;
mod serial;
mod start_info;
mod trap;
mod virtio;

use core::arch::asm;

use start_info::StartInfo;

/// The privilege level the code runs at, from the RPL of CS.
fn current_cpl() -> u16 {
    let cs: u16;
    // SAFETY: reading CS has no side effects.
    unsafe { asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) };
    cs & 3
}

/// The ring-3 entry: `boot` irets here with RDI = the `hvm_start_info` address.
pub extern "C" fn ring3_main(start_info: u64) -> ! {
    println!("hello from ring 3 (cpl={})", current_cpl());

    // SAFETY: RDI holds what the PVH loader passed in EBX; memory below 4 GiB is identity
    // mapped and the loader's data is not touched by anyone else.
    let info = match unsafe { StartInfo::new(start_info) } {
        Ok(info) => info,
        Err(magic) => panic!(
            "no PVH start_info at {start_info:#x}: magic {magic:#x}, expected {:#x}",
            start_info::MAGIC
        ),
    };
    let cmdline = info.cmdline();
    let args = match cmdline::parse(cmdline) {
        Ok(args) => args,
        Err(e) => panic!("bad command line: {e}"),
    };
    if let Some(msg) = args.msg {
        print!("test-guest: msg: ");
        let _ = cmdline::write_escaped(&mut serial::Serial, msg);
        print!("\n");
    }
    println!("start_info v{}, exit={}", info.version(), args.exit);
    if let Some(fault) = args.fault {
        cause(fault);
    }
    if hostile_io::wanted(cmdline) {
        exit::exit(hostile_io::run(cmdline));
    }
    if (args.probe.is_some() || args.hostile_pci.is_some())
        && info.ram_covers(virtio::DMA_BASE, virtio::SAMPLES_END) == Some(false)
    {
        println!(
            "probe: guest RAM must cover {:#x}..{:#x} (give the guest at least 64 MiB)",
            virtio::DMA_BASE,
            virtio::SAMPLES_END
        );
        exit::exit(probe::EXIT_PROBE_FAILED);
    }
    if let Some(list) = args.hostile_pci {
        hostile_pci::run(list, args.seed);
    }
    exit::exit(probe::run(&args))
}

/// Fails on purpose (`fault=`), to test the panic and exception paths.
fn cause(fault: cmdline::Failure) {
    use cmdline::Failure;
    println!("causing {fault:?}");
    match fault {
        Failure::Panic => panic!("on request (fault=panic)"),
        // SAFETY: none of these return normally; each raises the exception it names, which
        // ends the run in `trap::handle`.
        Failure::InvalidOpcode => unsafe { asm!("ud2", options(nomem, nostack)) },
        // SAFETY: as above; the address is above the 4 GiB identity map.
        Failure::PageFault => unsafe {
            asm!("mov {0}, qword ptr [{1}]", out(reg) _, in(reg) 0x1_0000_0000u64 + 0x1000, options(nostack, readonly))
        },
        // SAFETY: as above.
        Failure::Breakpoint => unsafe { asm!("int3", options(nomem, nostack)) },
        // SAFETY: as above (`hlt` is privileged).
        Failure::GeneralProtection => unsafe { asm!("hlt", options(nomem, nostack)) },
        Failure::TripleFault => {
            trap::TRIPLE_FAULT.store(true, core::sync::atomic::Ordering::SeqCst);
            // SAFETY: as above; the handler then triple-faults on purpose.
            unsafe { asm!("ud2", options(nomem, nostack)) }
        }
        Failure::Spin => loop {
            core::hint::spin_loop();
        },
        Failure::HaltInterruptsOff => {
            trap::HALT.store(true, core::sync::atomic::Ordering::SeqCst);
            // SAFETY: as above; the handler then halts with interrupts off, for good.
            unsafe { asm!("int3", options(nomem, nostack)) }
        }
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    println!("PANIC: {info}");
    exit::exit(exit::EXIT_PANIC)
}

/// The prebuilt `core` of the host target is compiled for unwinding and references the
/// personality routine from its (discarded) unwind tables. With `panic=abort` it is never
/// called.
#[no_mangle]
extern "C" fn rust_eh_personality() {}
