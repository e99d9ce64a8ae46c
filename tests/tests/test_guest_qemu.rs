//! Boots the ring-3 PVH test guest under QEMU + KVM and checks its output and exit status.
//!
//! Needs `qemu-system-x86_64` with qboot (Debian: qemu-system-x86) and /dev/kvm; a missing
//! QEMU is a failure, not a skip.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const QEMU: &str = "qemu-system-x86_64";
const QBOOT: &str = "/usr/share/qemu/qboot.rom";
const TIMEOUT: Duration = Duration::from_secs(30);
const RING3_LINE: &str = "test-guest: hello from ring 3 (cpl=3)";
const EXIT_PANIC: i32 = 0x70;
const EXIT_EXCEPTION: i32 = 0x71;

/// Kills the QEMU child (by its PID, through `Child::kill`) unless it has been reaped.
struct QemuGuard(Option<Child>);

impl Drop for QemuGuard {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct Run {
    status: ExitStatus,
    serial: String,
    stderr: String,
    elapsed: Duration,
}

/// Boots the guest with `cmdline`; returns QEMU's exit status and what it wrote.
fn boot(cmdline: &str) -> Run {
    let elf = Path::new(env!("TEST_GUEST_ELF"));
    assert!(elf.is_file(), "test guest ELF missing at {}", elf.display());
    assert!(
        Path::new(QBOOT).is_file(),
        "{QBOOT} missing: install qemu-system-x86 (Debian) to run the QEMU test-guest tests"
    );
    let start = Instant::now();
    let child = Command::new(QEMU)
        .args(["-accel", "kvm", "-cpu", "qemu64", "-m", "64"])
        .args(["-nodefaults", "-nographic", "-no-reboot"])
        .args(["-bios", QBOOT])
        .arg("-kernel")
        .arg(elf)
        .args(["-append", cmdline])
        .args(["-serial", "stdio"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start {QEMU}: {e} (install qemu-system-x86 to run this test)")
        });
    let mut guard = QemuGuard(Some(child));
    let child = guard.0.as_mut().expect("child");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });

    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for QEMU") {
            break status;
        }
        if start.elapsed() > TIMEOUT {
            drop(guard); // kills QEMU, so the readers finish
            let serial = out_reader.join().unwrap_or_default();
            let stderr = err_reader.join().unwrap_or_default();
            panic!("QEMU did not exit within {TIMEOUT:?}\nserial:\n{serial}\nstderr:\n{stderr}");
        }
        thread::sleep(Duration::from_millis(2));
    };
    let elapsed = start.elapsed();
    guard.0 = None; // reaped
    let serial = out_reader.join().expect("stdout reader");
    let stderr = err_reader.join().expect("stderr reader");
    eprintln!("test guest `{cmdline}`: {status} after {elapsed:?}\n{serial}");
    Run {
        status,
        serial,
        stderr,
        elapsed,
    }
}

/// QEMU's isa-debug-exit status for guest code `code`.
fn debug_exit_status(code: i32) -> i32 {
    (code << 1) | 1
}

fn assert_exit(run: &Run, code: i32) {
    assert_eq!(
        run.status.code(),
        Some(debug_exit_status(code)),
        "expected guest exit code {code} (QEMU status {}), got {}\nserial:\n{}\nstderr:\n{}",
        debug_exit_status(code),
        run.status,
        run.serial,
        run.stderr
    );
}

#[test]
fn ring3_guest_exits_with_requested_code() {
    let run = boot("exit=42 msg=\"from the test\"");
    assert!(
        run.serial.contains(RING3_LINE),
        "no ring-3 line in serial output:\n{}\nstderr:\n{}",
        run.serial,
        run.stderr
    );
    assert!(
        run.serial.contains("test-guest: msg: from the test"),
        "{}",
        run.serial
    );
    assert_exit(&run, 42);
    assert!(
        run.elapsed < Duration::from_secs(5),
        "slow boot: {:?}",
        run.elapsed
    );
}

#[test]
fn ring3_guest_default_exit_code_is_zero() {
    let run = boot("");
    assert!(run.serial.contains(RING3_LINE), "{}", run.serial);
    assert_exit(&run, 0);
}

#[test]
fn ring3_guest_panic_is_reported() {
    let run = boot("exit=3 fault=panic");
    assert!(run.serial.contains("test-guest: PANIC: "), "{}", run.serial);
    assert_exit(&run, EXIT_PANIC);
}

#[test]
fn ring3_guest_exception_is_reported() {
    let run = boot("fault=ud");
    assert!(
        run.serial.contains("test-guest: EXCEPTION 6 (#UD)"),
        "{}",
        run.serial
    );
    assert!(
        run.serial.contains("cs=0x23"),
        "not from ring 3:\n{}",
        run.serial
    );
    assert_exit(&run, EXIT_EXCEPTION);
}

/// The ELF is what a PVH loader expects: ELF64 x86-64, PT_LOAD at >= 1 MiB with
/// p_paddr == p_vaddr, and a PT_NOTE holding XEN_ELFNOTE_PHYS32_ENTRY whose entry is loaded.
#[test]
fn test_guest_elf_layout() {
    let elf = std::fs::read(env!("TEST_GUEST_ELF")).expect("reading the test guest ELF");
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap());
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap());
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!(elf[4], 2, "ELFCLASS64");
    assert_eq!(u16_at(18), 62, "EM_X86_64");
    let (phoff, phentsize, phnum) = (u64_at(32) as usize, u16_at(54) as usize, u16_at(56));
    let mut loads = Vec::new();
    let mut pvh_entry = None;
    for i in 0..phnum as usize {
        let ph = phoff + i * phentsize;
        let (p_type, offset, vaddr, paddr, filesz, memsz) = (
            u32_at(ph),
            u64_at(ph + 8) as usize,
            u64_at(ph + 16),
            u64_at(ph + 24),
            u64_at(ph + 32) as usize,
            u64_at(ph + 40),
        );
        match p_type {
            1 => {
                assert!(paddr >= 0x10_0000, "PT_LOAD below 1 MiB: {paddr:#x}");
                assert_eq!(paddr, vaddr);
                loads.push(paddr..paddr + memsz);
            }
            4 => {
                let mut n = offset;
                while n < offset + filesz {
                    let (namesz, descsz, ntype) = (u32_at(n), u32_at(n + 4), u32_at(n + 8));
                    let name = n + 12;
                    let desc = name + (namesz as usize).next_multiple_of(4);
                    if ntype == 18 && &elf[name..name + namesz as usize] == b"Xen\0" {
                        pvh_entry = Some(u32_at(desc));
                    }
                    n = desc + (descsz as usize).next_multiple_of(4);
                }
            }
            _ => {}
        }
    }
    let entry = pvh_entry.expect("no XEN_ELFNOTE_PHYS32_ENTRY note");
    assert!(
        loads.iter().any(|r| r.contains(&u64::from(entry))),
        "PVH entry {entry:#x} is not in a PT_LOAD segment {loads:x?}"
    );
}
