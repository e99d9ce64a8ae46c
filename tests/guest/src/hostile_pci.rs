//! Hostile BAR moves against the VMM's PCI root (`hostile_pci=LIST`), with two virtio-blk
//! disks on bus 0: A (the first) is the one moved, B (the second) is the sane device whose
//! requests must keep completing.
//!
//! Modes (comma-separated, run in the order given):
//! - `cf8`: A's port doorbell BAR onto the configuration port 0xCF8, then onto COM1; both
//!   must keep working while it is there and after it moved back, and A's doorbell port
//!   must ring A again.
//! - `ecam`: A's memory BAR onto the ECAM window; ECAM must keep answering.
//! - `overlap`: A's memory BAR onto B's, then elsewhere, then back; A's port BAR the same
//!   way over B's doorbell port. B must answer at every step, A wherever it decodes.
//! - `ram`: A's memory BAR onto guest RAM: the RAM there is unchanged and still RAM.
//! - `reloc64`: A's 64-bit BAR moved as Linux does (Memory Space off, low dword, high dword,
//!   on), passing through B's base on the way; and back the same way.
//! - `storm:N`: N refused moves in a row (onto B, RAM, ECAM, 0xCF8, B's port, far above
//!   the 64-bit window), B checked
//!   every 500; the time per move is reported, and that of a move the VMM maps.
//! - `churn`: not a mode of its own: after `done`, A's BAR keeps moving (see [`linger`]).
//!
//! A "check" of a disk re-reads its BARs, resets it, sets up a queue and does three requests:
//! a read of a stamped sector (the image's seed is `seed=` for A, `seed=`+1 for B), a write
//! of a sector at the end of the disk stamped with [`WRITE_SEED`] (the host verifies those
//! after the run), and a read back of that write. The doorbell is either the memory one or a
//! 16-bit `out` to the disk's port BAR.
//!
//! Output, one line per mode, then a summary:
//! ```text
//! test-guest: hostile-pci: mode=overlap verdict=pass checks_a=3 checks_b=5
//! test-guest: hostile-pci: mode=overlap verdict=FAIL step=... why=...
//! test-guest: hostile-pci: done checks_a=N checks_b=M
//! ```
//! After `done` the guest keeps doing requests on B (so that the host's SIGTERM finds I/O in
//! flight; with `churn`, BAR moves too) and exits with [`EXIT_GAVE_UP`] if nobody stopped it within [`LINGER_CYCLES`].

use core::ptr::{read_volatile, write_volatile};

use crate::pci::{self, Function};
use crate::pio;
use crate::probe::rdtsc;
use crate::probe_shared::{sector_matches, stamp_sector, WORDS_PER_SECTOR};
use crate::virtio::{self, Device, Dma, Virtq, DESC_F_NEXT, DESC_F_WRITE};
use crate::{exit, println};

/// Nothing stopped the guest after `done`.
pub const EXIT_GAVE_UP: u32 = 0x73;
/// The set-up failed (fewer than two disks, a disk that does not work before any move).
pub const EXIT_SETUP: u32 = 0x74;
/// The seed of the sectors checks write (the host looks for them in B's image).
pub const WRITE_SEED: u64 = 0x5752_4954_4553_5421;
/// How long the guest lingers after `done` (about 20 s at 2.6 GHz).
const LINGER_CYCLES: u64 = 52_000_000_000;
/// How long a request may take before the check fails (about 4 s at 2.6 GHz; the host is
/// shared and the device thread may wait for a core).
const REQUEST_CYCLES: u64 = 10_000_000_000;
/// Sectors at the end of a disk that checks write (cyclically).
const WRITE_SECTORS: u64 = 32;

const COMMAND: u8 = 0x04;
const CMD_IO: u32 = 1 << 0;
const CMD_MEMORY: u32 = 1 << 1;
const BAR0: u8 = 0x10;
const BAR0_HI: u8 = 0x14;
const BAR2: u8 = 0x18;
/// The platform ranges the VMM puts at fixed places (its `layout`).
const CONFIG_PORT: u16 = 0xcf8;
const COM1: u16 = 0x3f8;
const ECAM: u64 = 0xe000_0000;
/// Guest RAM the probe keeps for samples (unused here): a BAR is moved onto it.
const RAM_TARGET: u64 = virtio::SAMPLES_BASE;
/// A free place in the 32-bit PCI window and in the port window (the VMM allocates from
/// the bottom of both).
const ELSEWHERE: u64 = 0xd000_0000;
const ELSEWHERE_PORT: u16 = 0xd000;

const BLK_T_IN: u32 = 0;
const BLK_T_OUT: u32 = 1;
const SECTOR: u32 = 512;

/// The sector buffer at `data`.
fn sector_at(data: u64) -> &'static mut [u64; WORDS_PER_SECTOR] {
    // SAFETY: `data` is a 512-byte, 512-aligned block of the DMA area handed to one session
    // only, and the device does not use it between requests (the only time it is touched).
    unsafe { &mut *(data as *mut [u64; WORDS_PER_SECTOR]) }
}

/// Which doorbell a check rings.
#[derive(Clone, Copy)]
enum Bell {
    Mmio,
    Port(u16),
}

/// A failed step: what was being done, and why it failed.
struct Failed {
    step: &'static str,
    why: &'static str,
}

type Step = Result<(), Failed>;

fn fail(step: &'static str, why: &'static str) -> Failed {
    Failed { step, why }
}

/// One of the two disks.
struct Disk {
    func: Function,
    /// Where the VMM placed BAR 0 (64-bit memory) and the port doorbell BAR at boot.
    bar0: u64,
    port: u16,
    seed: u64,
    checks: u32,
}

impl Disk {
    fn new(func: Function, seed: u64) -> Disk {
        let lo = func.read32(BAR0) & !0xf;
        let hi = func.read32(BAR0_HI);
        Disk {
            func,
            bar0: (u64::from(hi) << 32) | u64::from(lo),
            port: (func.read32(BAR2) & !0x3) as u16,
            seed,
            checks: 0,
        }
    }

    /// Writes BAR 0 as Linux does: the low dword, then the high one.
    fn set_bar0(&self, addr: u64) {
        self.func.write32(BAR0, addr as u32);
        self.func.write32(BAR0_HI, (addr >> 32) as u32);
    }

    fn set_port(&self, port: u16) {
        self.func.write32(BAR2, u32::from(port));
    }

    fn command(&self) -> u32 {
        self.func.read32(COMMAND) & 0xffff
    }

    fn set_command(&self, cmd: u32) {
        self.func.write32(COMMAND, cmd & 0xffff);
    }

    /// BAR 0 back at its boot address, the port BAR too, both decoding.
    fn restore(&self) {
        self.set_bar0(self.bar0);
        self.set_port(self.port);
        self.set_command(self.command() | CMD_IO | CMD_MEMORY);
    }
}

/// A disk set up for requests: one queue, one request's buffers.
struct Session {
    q: Virtq,
    hdr: u64,
    data: u64,
    status: u64,
    capacity: u64,
    seed: u64,
    k: u64,
}

impl Session {
    fn open(disk: &Disk, dma: &mut Dma) -> Result<Session, Failed> {
        if disk.func.vendor_device().0 != virtio::VENDOR_VIRTIO {
            return Err(fail("open", "its configuration space is gone"));
        }
        // Where BAR 0 is programmed must decode (the common configuration is at its start):
        // else the driver's reset would poll all ones a million times.
        let bar0 =
            (u64::from(disk.func.read32(BAR0_HI)) << 32) | u64::from(disk.func.read32(BAR0) & !0xf);
        if bar0 >= 1 << 32 {
            return Err(fail(
                "open",
                "BAR 0 is above 4 GiB, where this guest maps nothing",
            ));
        }
        // SAFETY: below 4 GiB, identity mapped; the dword at 0x14 of the common
        // configuration (status, generation, queue select) reads without side effects.
        if unsafe { read_volatile((bar0 + 0x14) as *const u32) } == 0xffff_ffff {
            return Err(fail("open", "nothing decodes at BAR 0"));
        }
        let dev = Device::open(disk.func).map_err(|e| fail("open", e))?;
        dev.negotiate(0).map_err(|e| fail("negotiate", e))?;
        let q = dev
            .setup_queue(0, 4, dma)
            .map_err(|e| fail("queue set-up", e))?;
        dev.driver_ok().map_err(|e| fail("driver ok", e))?;
        let capacity = u64::from(dev.config_read32(0)) | (u64::from(dev.config_read32(4)) << 32);
        if capacity <= 2 * WRITE_SECTORS {
            return Err(fail("capacity", "the disk is too small"));
        }
        Ok(Session {
            q,
            hdr: dma.alloc(16, 16),
            data: dma.alloc(u64::from(SECTOR), 512),
            status: dma.alloc(1, 1),
            capacity,
            seed: disk.seed,
            // Each check writes the next of the last sectors.
            k: u64::from(disk.checks),
        })
    }

    fn words(&self) -> &'static mut [u64; WORDS_PER_SECTOR] {
        sector_at(self.data)
    }

    /// One request of `kind` for `sector` with the data buffer; returns its status.
    fn request(&mut self, bell: Bell, kind: u32, sector: u64) -> Result<u8, Failed> {
        // SAFETY: the header and status bytes are this session's DMA blocks, not in use
        // by the device between requests.
        unsafe {
            write_volatile(self.hdr as *mut u32, kind);
            write_volatile((self.hdr + 4) as *mut u32, 0);
            write_volatile((self.hdr + 8) as *mut u64, sector);
            write_volatile(self.status as *mut u8, 0xff);
        }
        let data_flags = DESC_F_NEXT | if kind == BLK_T_IN { DESC_F_WRITE } else { 0 };
        self.q.set_desc(0, self.hdr, 16, DESC_F_NEXT, 1);
        self.q.set_desc(1, self.data, SECTOR, data_flags, 2);
        self.q.set_desc(2, self.status, 1, DESC_F_WRITE, 0);
        self.q.push(0);
        match bell {
            Bell::Mmio => self.q.publish_and_notify(),
            Bell::Port(port) => {
                if self.q.publish() {
                    // SAFETY: the disk's doorbell port: a 16-bit write of the queue index.
                    unsafe { pio::outw(port, self.q.index) };
                }
            }
        }
        let t0 = rdtsc();
        let (id, _) = loop {
            if let Some(e) = self.q.poll_used() {
                break e;
            }
            if rdtsc().wrapping_sub(t0) > REQUEST_CYCLES {
                return Err(fail("request", "no completion"));
            }
            core::hint::spin_loop();
        };
        if id != 0 {
            return Err(fail("request", "the device returned another chain"));
        }
        // SAFETY: as above; the device has finished with the chain.
        Ok(unsafe { read_volatile(self.status as *const u8) })
    }

    /// Read a stamped sector, write one at the end, read it back.
    fn check(&mut self, bell: Bell) -> Step {
        self.k += 1;
        let read_at = (self.k * 7919) % (self.capacity - WRITE_SECTORS);
        if self.request(bell, BLK_T_IN, read_at)? != 0 {
            return Err(fail("read", "I/O error"));
        }
        if !sector_matches(self.words(), self.seed, read_at) {
            return Err(fail("read", "the data is not the disk's"));
        }
        let write_at = self.capacity - 1 - self.k % WRITE_SECTORS;
        stamp_sector(self.words(), WRITE_SEED, write_at);
        if self.request(bell, BLK_T_OUT, write_at)? != 0 {
            return Err(fail("write", "I/O error"));
        }
        self.words().fill(0);
        if self.request(bell, BLK_T_IN, write_at)? != 0 {
            return Err(fail("read back", "I/O error"));
        }
        if !sector_matches(self.words(), WRITE_SEED, write_at) {
            return Err(fail("read back", "not what was written"));
        }
        Ok(())
    }
}

struct Run {
    a: Disk,
    b: Disk,
    dma: Dma,
}

impl Run {
    /// A full check of `which` disk (A: true) with `bell`.
    fn check(&mut self, a: bool, bell: Bell, step: &'static str) -> Step {
        let disk = if a { &mut self.a } else { &mut self.b };
        let mut s = Session::open(disk, &mut self.dma).map_err(|f| fail(step, f.why))?;
        s.check(bell).map_err(|f| fail(step, f.why))?;
        disk.checks += 1;
        Ok(())
    }

    /// B with both its doorbells.
    fn check_b(&mut self, step: &'static str) -> Step {
        self.check(false, Bell::Mmio, step)?;
        let port = self.b.port;
        self.check(false, Bell::Port(port), step)
    }

    /// A at its boot addresses, with both doorbells.
    fn check_a(&mut self, step: &'static str) -> Step {
        self.check(true, Bell::Mmio, step)?;
        let port = self.a.port;
        self.check(true, Bell::Port(port), step)
    }

    /// Configuration mechanism #1 still reaches both disks.
    fn config_ok(&self, step: &'static str) -> Step {
        let mut disks = 0;
        pci::scan_bus0(|f| {
            let (vendor, device) = f.vendor_device();
            if vendor == virtio::VENDOR_VIRTIO && device == 0x1040 + virtio::TYPE_BLOCK {
                disks += 1;
            }
        });
        if disks != 2 {
            return Err(fail(step, "configuration through 0xCF8 lost a disk"));
        }
        Ok(())
    }

    /// ECAM still reaches B.
    fn ecam_ok(&self, step: &'static str) -> Step {
        let f = self.b.func;
        let at = ECAM | (u64::from(f.dev) << 15) | (u64::from(f.func) << 12);
        // SAFETY: ECAM of bus 0 (identity mapped, uncached MMIO); reading a vendor/device
        // ID has no side effects.
        let id = unsafe { read_volatile(at as *const u32) };
        if id != u32::from(virtio::VENDOR_VIRTIO) | (u32::from(0x1040 + virtio::TYPE_BLOCK) << 16) {
            return Err(fail(step, "ECAM no longer answers for B"));
        }
        Ok(())
    }

    /// Nothing decodes at `addr` (A's BAR 0 left it): the common configuration's status
    /// dword reads all ones.
    fn nothing_at(&self, addr: u64, step: &'static str) -> Step {
        // SAFETY: `addr` is in the PCI window, identity mapped; a read of an address
        // nothing decodes returns all ones and has no side effect.
        let v = unsafe { read_volatile((addr + 0x14) as *const u32) };
        if v != 0xffff_ffff {
            return Err(fail(step, "A still decodes where it was"));
        }
        Ok(())
    }

    fn cf8(&mut self) -> Step {
        let (a_port, b_port) = (self.a.port, self.b.port);
        self.a.set_port(CONFIG_PORT);
        self.config_ok("port BAR on 0xCF8: config")?;
        if self.a.func.read32(BAR2) != u32::from(CONFIG_PORT) | 1 {
            return Err(fail(
                "port BAR on 0xCF8",
                "the BAR does not read what was written",
            ));
        }
        self.check(false, Bell::Port(b_port), "port BAR on 0xCF8: B")?;
        self.check(false, Bell::Mmio, "port BAR on 0xCF8: B")?;
        // A without its port BAR: the memory doorbell still works.
        self.check(true, Bell::Mmio, "port BAR on 0xCF8: A")?;
        self.a.set_port(a_port);
        self.config_ok("port BAR back: config")?;
        self.check_a("port BAR back: A")?;
        // Onto COM1 (8 ports; the BAR takes 4 of them), then back: the console must stay.
        self.a.set_port(COM1);
        println!("hostile-pci: this line went out while A's port BAR was on COM1");
        self.a.set_port(a_port);
        println!("hostile-pci: this line went out after A's port BAR left COM1");
        self.check_a("port BAR back from COM1: A")?;
        self.check_b("port BAR back from COM1: B")
    }

    fn ecam(&mut self) -> Step {
        self.a.set_bar0(ECAM);
        self.ecam_ok("memory BAR on ECAM")?;
        self.config_ok("memory BAR on ECAM: config")?;
        self.nothing_at(self.a.bar0, "memory BAR on ECAM")?;
        self.check_b("memory BAR on ECAM: B")?;
        self.a.set_bar0(self.a.bar0);
        self.ecam_ok("memory BAR back from ECAM")?;
        self.check_a("memory BAR back from ECAM: A")?;
        self.check_b("memory BAR back from ECAM: B")
    }

    fn overlap(&mut self) -> Step {
        let (a0, b0) = (self.a.bar0, self.b.bar0);
        self.a.set_bar0(b0);
        self.nothing_at(a0, "memory BAR on B's")?;
        self.check_b("memory BAR on B's: B")?;
        // Elsewhere: A decodes there (with its doorbells), B stays.
        self.a.set_bar0(ELSEWHERE);
        self.check(true, Bell::Mmio, "memory BAR moved on: A")?;
        self.check_b("memory BAR moved on: B")?;
        self.a.set_bar0(a0);
        self.nothing_at(ELSEWHERE, "memory BAR back")?;
        self.check_a("memory BAR back: A")?;
        self.check_b("memory BAR back: B")?;
        // The port BAR onto B's doorbell port, on, back.
        let (ap, bp) = (self.a.port, self.b.port);
        self.a.set_port(bp);
        self.check_b("port BAR on B's: B")?;
        self.check(true, Bell::Mmio, "port BAR on B's: A")?;
        self.a.set_port(ELSEWHERE_PORT);
        self.check(true, Bell::Port(ELSEWHERE_PORT), "port BAR moved on: A")?;
        self.check_b("port BAR moved on: B")?;
        self.a.set_port(ap);
        self.check_a("port BAR back: A")?;
        self.check_b("port BAR back: B")
    }

    fn ram(&mut self) -> Step {
        const WORDS: usize = 0x1_0000 / 8;
        let ram = RAM_TARGET as *mut u64;
        let pattern = |i: usize, salt: u64| (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ salt;
        let fill = |salt: u64| {
            for i in 0..WORDS {
                // SAFETY: [RAM_TARGET, +64 KiB) is guest RAM this mode owns (the probe's
                // sample area, unused here), identity mapped.
                unsafe { write_volatile(ram.add(i), pattern(i, salt)) };
            }
        };
        let holds = |salt: u64| {
            // SAFETY: as above.
            (0..WORDS).all(|i| unsafe { read_volatile(ram.add(i)) } == pattern(i, salt))
        };
        fill(0x1111);
        self.a.set_bar0(RAM_TARGET);
        if !holds(0x1111) {
            return Err(fail("memory BAR on RAM", "the RAM under it changed"));
        }
        fill(0x2222);
        if !holds(0x2222) {
            return Err(fail(
                "memory BAR on RAM",
                "the RAM under it is no longer RAM",
            ));
        }
        self.nothing_at(self.a.bar0, "memory BAR on RAM")?;
        self.check_b("memory BAR on RAM: B")?;
        self.a.set_bar0(self.a.bar0);
        if !holds(0x2222) {
            return Err(fail("memory BAR back from RAM", "the RAM changed"));
        }
        self.check_a("memory BAR back from RAM: A")?;
        self.check_b("memory BAR back from RAM: B")
    }

    fn reloc64(&mut self) -> Step {
        let (a0, b0) = (self.a.bar0, self.b.bar0);
        if (a0 >> 32) != (b0 >> 32) {
            return Err(fail(
                "64-bit relocation",
                "A and B are not in the same 4 GiB",
            ));
        }
        let up = (1u64 << 32) | (b0 & 0xffff_ffff);
        let cmd = self.a.command();
        // Decode off, low dword: A's BAR now holds B's base.
        self.a.set_command(cmd & !CMD_MEMORY);
        self.a.func.write32(BAR0, b0 as u32);
        self.check_b("64-bit relocation, through B's base: B")?;
        self.a.func.write32(BAR0_HI, (up >> 32) as u32);
        self.a.set_command(cmd | CMD_MEMORY);
        // A decodes above 4 GiB, where this guest has no mapping: only B can be checked.
        self.nothing_at(a0, "64-bit relocation")?;
        self.check_b("64-bit relocation, A above 4 GiB: B")?;
        // And back the same way (through 0x1_xxxx_xxxx with A's low dword).
        self.a.set_command(cmd & !CMD_MEMORY);
        self.a.func.write32(BAR0, a0 as u32);
        self.a.func.write32(BAR0_HI, (a0 >> 32) as u32);
        self.a.set_command(cmd | CMD_MEMORY);
        self.check_a("64-bit relocation back: A")?;
        self.check_b("64-bit relocation back: B")
    }

    fn storm(&mut self, moves: u32) -> Step {
        let (b0, bp) = (self.b.bar0, self.b.port);
        let t0 = rdtsc();
        let mut check_cycles = 0;
        for i in 0..moves {
            match i % 6 {
                0 => self.a.set_bar0(b0),
                1 => self.a.set_bar0(RAM_TARGET),
                2 => self.a.set_bar0(ECAM),
                3 => self.a.set_port(CONFIG_PORT),
                4 => self.a.set_port(bp),
                // Far above the 64-bit window (a high dword of all ones would read as
                // sizing, which decodes nothing without a word).
                _ => self.a.set_bar0(0x8000_0000_0000_0000),
            }
            if i % 500 == 499 {
                let c0 = rdtsc();
                self.check_b("storm: B")?;
                check_cycles += rdtsc() - c0;
            }
        }
        let cycles = rdtsc() - t0 - check_cycles;
        println!(
            "hostile-pci: storm moves={moves} cycles_per_move={}",
            cycles / u64::from(moves.max(1))
        );
        self.config_ok("storm: config")?;
        self.ecam_ok("storm: ECAM")?;
        self.a.restore();
        // For comparison: moves the root maps (A's BAR 0 between two free places).
        let t0 = rdtsc();
        let valid = 100u32;
        for i in 0..valid {
            self.a
                .set_bar0(if i % 2 == 0 { ELSEWHERE } else { self.a.bar0 });
        }
        println!(
            "hostile-pci: storm valid_moves={valid} cycles_per_valid_move={}",
            (rdtsc() - t0) / u64::from(valid)
        );
        self.check_a("after the storm: A")?;
        self.check_b("after the storm: B")
    }
}

/// The first two virtio-blk functions on bus 0.
fn two_disks() -> Option<(Function, Function)> {
    let mut found: [Option<Function>; 2] = [None, None];
    let mut n = 0;
    pci::scan_bus0(|f| {
        let (vendor, device) = f.vendor_device();
        if vendor == virtio::VENDOR_VIRTIO && device == 0x1040 + virtio::TYPE_BLOCK && n < 2 {
            found[n] = Some(f);
            n += 1;
        }
    });
    Some((found[0]?, found[1]?))
}

/// Runs the modes of `list` (see the module doc); never returns.
pub fn run(list: &[u8], seed: u64) -> ! {
    let Some((fa, fb)) = two_disks() else {
        println!("hostile-pci: setup verdict=FAIL why=two virtio-blk disks are needed");
        exit::exit(EXIT_SETUP)
    };
    let mut run = Run {
        a: Disk::new(fa, seed),
        b: Disk::new(fb, seed.wrapping_add(1)),
        dma: Dma::new(),
    };
    println!(
        "hostile-pci: A at 00:{:02x}.0 BAR0 {:#x} port {:#x}, B at 00:{:02x}.0 BAR0 {:#x} port {:#x}",
        fa.dev, run.a.bar0, run.a.port, fb.dev, run.b.bar0, run.b.port
    );
    if let Err(f) = run
        .check_a("setup: A")
        .and_then(|()| run.check_b("setup: B"))
    {
        println!(
            "hostile-pci: setup verdict=FAIL step={} why={}",
            f.step, f.why
        );
        exit::exit(EXIT_SETUP)
    }
    let mut churn = false;
    for mode in list.split(|&b| b == b',').filter(|m| !m.is_empty()) {
        let (name, arg) = match mode.iter().position(|&b| b == b':') {
            Some(i) => (&mode[..i], Some(&mode[i + 1..])),
            None => (mode, None),
        };
        if name == b"churn" {
            churn = true;
            continue;
        }
        let (a0, b0) = (run.a.checks, run.b.checks);
        let outcome = match name {
            b"cf8" => run.cf8(),
            b"ecam" => run.ecam(),
            b"overlap" => run.overlap(),
            b"ram" => run.ram(),
            b"reloc64" => run.reloc64(),
            b"storm" => {
                let n = arg.and_then(parse_u32).unwrap_or(5000);
                run.storm(n)
            }
            _ => Err(fail(
                "mode",
                "unknown (cf8, ecam, overlap, ram, reloc64, storm:N)",
            )),
        };
        let name = core::str::from_utf8(name).unwrap_or("?");
        match outcome {
            Ok(()) => println!(
                "hostile-pci: mode={name} verdict=pass checks_a={} checks_b={}",
                run.a.checks - a0,
                run.b.checks - b0
            ),
            Err(f) => {
                println!(
                    "hostile-pci: mode={name} verdict=FAIL step={} why={}",
                    f.step, f.why
                );
                // Put A back for the next mode.
                run.a.restore();
            }
        }
    }
    println!(
        "hostile-pci: done checks_a={} checks_b={}",
        run.a.checks, run.b.checks
    );
    linger(&mut run, churn)
}

/// Requests on B until the host stops the VM; with `churn`, A's BAR 0 also keeps moving
/// between two valid places, decode off around each move as Linux does (each move has the
/// VMM move A's doorbell ioeventfd), so that the SIGTERM finds a vCPU in the middle of it.
fn linger(run: &mut Run, churn: bool) -> ! {
    let t0 = rdtsc();
    let cmd = run.a.command();
    let mut moves = 0u64;
    let mut s = match Session::open(&run.b, &mut run.dma) {
        Ok(s) => s,
        Err(f) => {
            println!("hostile-pci: linger: B: {}: {}", f.step, f.why);
            exit::exit(EXIT_GAVE_UP)
        }
    };
    while rdtsc().wrapping_sub(t0) < LINGER_CYCLES {
        if churn {
            run.a.set_command(cmd & !CMD_MEMORY);
            run.a.set_bar0(if moves.is_multiple_of(2) {
                ELSEWHERE
            } else {
                run.a.bar0
            });
            run.a.set_command(cmd | CMD_MEMORY);
            moves += 1;
            if moves.is_multiple_of(16) {
                println!("hostile-pci: churn moves={moves}");
            }
        }
        if let Err(f) = s.check(Bell::Mmio) {
            println!("hostile-pci: linger: B: {}: {}", f.step, f.why);
            exit::exit(EXIT_GAVE_UP)
        }
    }
    println!("hostile-pci: nobody stopped the VM");
    exit::exit(EXIT_GAVE_UP)
}

fn parse_u32(v: &[u8]) -> Option<u32> {
    if v.is_empty() || v.len() > 9 {
        return None;
    }
    v.iter()
        .try_fold(0u32, |n, &d| (d as char).to_digit(10).map(|d| n * 10 + d))
}
