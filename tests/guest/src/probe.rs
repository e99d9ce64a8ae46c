//! The latency probe (`probe=blk|net`): runs its tests on a virtio-pci device with the
//! polling driver of [`crate::virtio`], times every operation with `rdtsc`, and prints one
//! machine-readable line per test on COM1:
//!
//! ```text
//! probe-result {"test":"blk-read-qd1","n":1000,"qd":1,"warmup":100,"verify_failures":0,"errors":0,"notifies":1100,"notifies_suppressed":0,"elapsed_cycles":123,"cycles":{"min":1,"p50":2,"p90":3,"p99":4,"p999":5,"max":6}}
//! ```
//!
//! `n` counts the measured operations (warm-up ones excluded), `cycles` are nearest-rank
//! percentiles of their latencies in TSC cycles (see [`crate::probe_shared`]), `elapsed_cycles`
//! spans the measured part of the test, `notifies`/`notifies_suppressed` count the doorbells
//! rung and skipped (measured part and warm-up). The host parses the line (tests::probe).
//!
//! blk tests: `blk-read-qd1` and `blk-write-qd1` (random 4 KiB blocks, one at a time), and
//! `blk-read-qd<N>` (random 4 KiB reads, N in flight; a sample is the time from the batch that
//! submitted a request to its completion). Every read is checked against the stamp format of
//! [`crate::probe_shared`]; every write writes its block's stamp. Any verify failure or I/O
//! error ends the run with [`EXIT_PROBE_FAILED`].

use core::arch::asm;

use crate::cmdline::{Args, Probe, TEST_QD, TEST_READ, TEST_WRITE};
use crate::probe_shared::{
    percentile, sector_matches, stamp_sector, XorShift, BLOCK_SIZE, PERCENTILES_PER_MILLE,
    SECTORS_PER_BLOCK, WORDS_PER_SECTOR,
};
use crate::virtio::{
    self, Device, Dma, Virtq, DESC_F_NEXT, DESC_F_WRITE, SAMPLES_BASE, SAMPLES_END,
};
use crate::{exit, print, println};

/// Exit code when a probe test failed (a verify failure, an I/O error, a lost reply).
pub const EXIT_PROBE_FAILED: u32 = 0x72;
/// A request not completed after this many cycles (about 10 s at 2.6 GHz) ends the run.
pub const TIMEOUT_CYCLES: u64 = 26_000_000_000;

/// The TSC, after all earlier instructions have completed (LFENCE; RDTSC).
#[inline(always)]
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: LFENCE and RDTSC only read the time-stamp counter (CR4.TSD is clear: ring 3 may).
    unsafe {
        asm!("lfence", "rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// The sample area as a slice of `n` u64.
pub fn samples(n: u32) -> &'static mut [u64] {
    let cap = ((SAMPLES_END - SAMPLES_BASE) / 8) as usize;
    let n = n as usize;
    if n > cap {
        panic!("n={n} is more than the {cap} samples the probe can keep");
    }
    // SAFETY: [SAMPLES_BASE, SAMPLES_END) is guest RAM reserved for the probe (below the
    // e820 top the tests give the guest; link.ld keeps the image below it); one test at a time
    // uses it, and `n` is within it.
    unsafe { core::slice::from_raw_parts_mut(SAMPLES_BASE as *mut u64, n) }
}

/// What a test reports besides its samples.
pub struct Outcome {
    pub qd: u32,
    pub warmup: u32,
    pub verify_failures: u64,
    pub errors: u64,
    pub notifies: u64,
    pub suppressed: u64,
    pub elapsed: u64,
}

/// Sorts `samples` and prints the test's `probe-result` line.
pub fn report(test: &str, samples: &mut [u64], o: &Outcome) {
    samples.sort_unstable();
    let p = |pm: u32| percentile(samples, pm).unwrap_or(0);
    let [p50, p90, p99, p999] = PERCENTILES_PER_MILLE;
    print!(
        "probe-result {{\"test\":\"{test}\",\"n\":{},\"qd\":{},\"warmup\":{},\"verify_failures\":{},\"errors\":{},\"notifies\":{},\"notifies_suppressed\":{},\"elapsed_cycles\":{},\"cycles\":{{\"min\":{},\"p50\":{},\"p90\":{},\"p99\":{},\"p999\":{},\"max\":{}}}}}\n",
        samples.len(),
        o.qd,
        o.warmup,
        o.verify_failures,
        o.errors,
        o.notifies,
        o.suppressed,
        o.elapsed,
        p(0),
        p(p50),
        p(p90),
        p(p99),
        p(p999),
        p(1000)
    );
}

/// Runs the probe `args.probe` names; returns the exit code.
pub fn run(args: &Args<'_>) -> u32 {
    let failed = match args.probe {
        Some(Probe::Blk) => blk(args),
        Some(Probe::Net) => crate::net::run(args),
        None => return args.exit,
    };
    if failed {
        println!("probe: FAILED");
        EXIT_PROBE_FAILED
    } else {
        println!("probe: done");
        args.exit
    }
}

/// Ends the run on a device that cannot be used.
pub fn fatal(what: &str, e: virtio::Error) -> ! {
    println!("probe: {what}: {e}");
    exit::exit(EXIT_PROBE_FAILED)
}

const BLK_T_IN: u32 = 0;
const BLK_T_OUT: u32 = 1;
const BLK_F_RO: u64 = 1 << 5;
/// Descriptors per request: header, data, status.
const CHAIN: u16 = 3;

/// The blk queue and the per-slot request memory: slot `s` uses descriptors 3s..3s+3, a
/// 16-byte header, a 4 KiB buffer and a status byte.
struct Blk {
    q: Virtq,
    hdr: u64,
    data: u64,
    status: u64,
    blocks: u64,
    seed: u64,
}

impl Blk {
    fn data(
        &self,
        slot: u16,
    ) -> &'static mut [[u64; WORDS_PER_SECTOR]; SECTORS_PER_BLOCK as usize] {
        // SAFETY: slot < the number of slots allocated in `blk`; the buffer is the probe's own
        // RAM, not touched by the device while this reference is used (the request is done or
        // not yet submitted).
        unsafe { &mut *((self.data + u64::from(slot) * BLOCK_SIZE as u64) as *mut _) }
    }

    fn status_ptr(&self, slot: u16) -> *mut u8 {
        (self.status + u64::from(slot)) as *mut u8
    }

    /// Prepares slot `slot` for a request of `kind` on a random block; returns its head.
    fn prepare(&mut self, slot: u16, kind: u32, rng: &mut XorShift) -> u16 {
        let block = rng.below(self.blocks);
        let sector = block * SECTORS_PER_BLOCK;
        let hdr = self.hdr + 16 * u64::from(slot);
        // SAFETY: the slot's header and status byte in the probe's DMA memory; the device does
        // not own the slot until it is pushed.
        unsafe {
            core::ptr::write_volatile(hdr as *mut u32, kind);
            core::ptr::write_volatile((hdr + 4) as *mut u32, 0);
            core::ptr::write_volatile((hdr + 8) as *mut u64, sector);
            core::ptr::write_volatile(self.status_ptr(slot), 0xff);
        }
        let buf = self.data(slot);
        if kind == BLK_T_OUT {
            for (i, s) in buf.iter_mut().enumerate() {
                stamp_sector(s, self.seed, sector + i as u64);
            }
        } else {
            // A read that returns without writing the buffer must not pass as a good one.
            for s in buf.iter_mut() {
                s[0] = 0;
            }
        }
        let head = slot * CHAIN;
        let data_flags = DESC_F_NEXT | if kind == BLK_T_IN { DESC_F_WRITE } else { 0 };
        let data = self.data + u64::from(slot) * BLOCK_SIZE as u64;
        self.q.set_desc(head, hdr, 16, DESC_F_NEXT, head + 1);
        self.q
            .set_desc(head + 1, data, BLOCK_SIZE as u32, data_flags, head + 2);
        self.q
            .set_desc(head + 2, self.status + u64::from(slot), 1, DESC_F_WRITE, 0);
        // Remember the sector in the slot's header (read back by `check`).
        head
    }

    /// Checks a completed slot: (I/O error, verify failure).
    /// The sector is read back from the slot's header, which the device does not write.
    fn check(&self, slot: u16, kind: u32) -> (bool, bool) {
        let hdr = self.hdr + 16 * u64::from(slot);
        // SAFETY: the slot's header and status, which the device has finished with.
        let (sector, status) = unsafe {
            (
                core::ptr::read_volatile((hdr + 8) as *const u64),
                core::ptr::read_volatile(self.status_ptr(slot)),
            )
        };
        if status != 0 {
            return (true, false);
        }
        if kind != BLK_T_IN {
            return (false, false);
        }
        let bad = self
            .data(slot)
            .iter()
            .enumerate()
            .any(|(i, s)| !sector_matches(s, self.seed, sector + i as u64));
        (false, bad)
    }
}

/// Polls `q` until one element is used; ends the run after [`TIMEOUT_CYCLES`].
#[inline(always)]
fn wait_used(q: &mut Virtq, since: u64) -> (u16, u32) {
    loop {
        if let Some(e) = q.poll_used() {
            return e;
        }
        if rdtsc().wrapping_sub(since) > TIMEOUT_CYCLES {
            println!(
                "probe: queue {}: no completion after {TIMEOUT_CYCLES} cycles",
                q.index
            );
            exit::exit(EXIT_PROBE_FAILED)
        }
        core::hint::spin_loop();
    }
}

/// The blk probe; returns whether any test failed.
fn blk(args: &Args<'_>) -> bool {
    let dev = Device::find(virtio::TYPE_BLOCK).unwrap_or_else(|e| fatal("virtio-blk", e));
    let features = dev.negotiate(0).unwrap_or_else(|e| fatal("virtio-blk", e));
    let qd = args.qd.clamp(1, 64) as u16;
    let mut dma = Dma::new();
    let q = dev
        .setup_queue(0, 256, &mut dma)
        .unwrap_or_else(|e| fatal("virtio-blk queue 0", e));
    let slots = (q.size / CHAIN).min(qd);
    dev.driver_ok().unwrap_or_else(|e| fatal("virtio-blk", e));
    let capacity = u64::from(dev.config_read32(0)) | (u64::from(dev.config_read32(4)) << 32);
    let blocks = capacity / SECTORS_PER_BLOCK;
    println!(
        "probe: virtio-blk at 00:{:02x}.{}: {capacity} sectors, queue size {}, features {features:#x}",
        dev.func.dev, dev.func.func, q.size
    );
    if blocks == 0 {
        fatal("virtio-blk", "the disk is smaller than one 4 KiB block");
    }
    let n_slots = u64::from(qd.max(1));
    let mut blk = Blk {
        q,
        hdr: dma.alloc(16 * n_slots, 4096),
        data: dma.alloc(BLOCK_SIZE as u64 * n_slots, 4096),
        status: dma.alloc(n_slots, 64),
        blocks,
        seed: args.seed,
    };
    let mut failed = false;
    // One random sequence per test, derived from the seed, so that tests can be selected
    // independently and still do the same I/O.
    if args.tests & TEST_READ != 0 {
        let mut rng = XorShift::new(args.seed ^ 0x7265_6164);
        failed |= blk_qd1(&mut blk, "blk-read-qd1", BLK_T_IN, args, &mut rng);
    }
    if args.tests & TEST_WRITE != 0 {
        if features & BLK_F_RO != 0 {
            println!("probe: blk-write-qd1: the disk is read-only");
            failed = true;
        } else {
            let mut rng = XorShift::new(args.seed ^ 0x7772_6974);
            failed |= blk_qd1(&mut blk, "blk-write-qd1", BLK_T_OUT, args, &mut rng);
        }
    }
    if args.tests & TEST_QD != 0 {
        if slots < qd {
            println!(
                "probe: queue size {} holds only {slots} requests of 3 descriptors",
                blk.q.size
            );
        }
        let mut rng = XorShift::new(args.seed ^ 0x7164);
        failed |= blk_qd(&mut blk, slots.max(1), args, &mut rng);
    }
    failed
}

/// QD1: one request at a time; a sample is submit (publish + doorbell) to used.
fn blk_qd1(blk: &mut Blk, test: &str, kind: u32, args: &Args<'_>, rng: &mut XorShift) -> bool {
    let samples = samples(args.n);
    let total = args.warmup + args.n;
    let (n0, s0) = (blk.q.notifies, blk.q.suppressed);
    let (mut errors, mut bad) = (0u64, 0u64);
    let mut start = 0;
    let mut end = 0;
    for i in 0..total {
        let head = blk.prepare(0, kind, rng);
        let t0 = rdtsc();
        if i == args.warmup {
            start = t0;
        }
        blk.q.push(head);
        blk.q.publish_and_notify();
        let (id, _) = wait_used(&mut blk.q, t0);
        let t1 = rdtsc();
        end = t1;
        if id != head {
            errors += 1;
        }
        let (err, verify) = blk.check(0, kind);
        errors += u64::from(err);
        bad += u64::from(verify);
        if i >= args.warmup {
            samples[(i - args.warmup) as usize] = t1 - t0;
        }
    }
    let o = Outcome {
        qd: 1,
        warmup: args.warmup,
        verify_failures: bad,
        errors,
        notifies: blk.q.notifies - n0,
        suppressed: blk.q.suppressed - s0,
        elapsed: end.wrapping_sub(start),
    };
    report(test, samples, &o);
    bad != 0 || errors != 0
}

/// Random reads with `qd` in flight: completions are refilled in batches, one doorbell per
/// batch. A sample is the time from its batch's publish to the poll that found it used.
fn blk_qd(blk: &mut Blk, qd: u16, args: &Args<'_>, rng: &mut XorShift) -> bool {
    let samples = samples(args.n);
    let total = u64::from(args.warmup) + u64::from(args.n);
    let (n0, s0) = (blk.q.notifies, blk.q.suppressed);
    let (mut errors, mut bad) = (0u64, 0u64);
    let mut submitted_at = [0u64; 64];
    let mut batch = [0u16; 64];
    let mut submitted = 0u64;
    let mut completed = 0u64;
    let mut start = rdtsc();
    let mut end = start;
    let mut nb = 0;
    for slot in 0..qd {
        if submitted < total {
            let head = blk.prepare(slot, BLK_T_IN, rng);
            blk.q.push(head);
            batch[nb] = slot;
            nb += 1;
            submitted += 1;
        }
    }
    let mut last_progress = rdtsc();
    loop {
        if nb > 0 {
            let t = rdtsc();
            for &s in &batch[..nb] {
                submitted_at[usize::from(s)] = t;
            }
            blk.q.publish_and_notify();
            nb = 0;
        }
        if completed == total {
            break;
        }
        while let Some((id, _)) = blk.q.poll_used() {
            let now = rdtsc();
            last_progress = now;
            let slot = id / CHAIN;
            if id % CHAIN != 0 || slot >= qd {
                errors += 1;
                continue;
            }
            let lat = now - submitted_at[usize::from(slot)];
            let (err, verify) = blk.check(slot, BLK_T_IN);
            errors += u64::from(err);
            bad += u64::from(verify);
            if completed >= u64::from(args.warmup) {
                samples[(completed - u64::from(args.warmup)) as usize] = lat;
            }
            completed += 1;
            if completed == u64::from(args.warmup) {
                start = now;
            }
            end = now;
            if submitted < total {
                let head = blk.prepare(slot, BLK_T_IN, rng);
                blk.q.push(head);
                batch[nb] = slot;
                nb += 1;
                submitted += 1;
            }
        }
        if nb == 0 && rdtsc().wrapping_sub(last_progress) > TIMEOUT_CYCLES {
            println!(
                "probe: blk qd{qd}: {} requests never completed",
                submitted - completed
            );
            exit::exit(EXIT_PROBE_FAILED)
        }
    }
    let o = Outcome {
        qd: u32::from(qd),
        warmup: args.warmup,
        verify_failures: bad,
        errors,
        notifies: blk.q.notifies - n0,
        suppressed: blk.q.suppressed - s0,
        elapsed: end.wrapping_sub(start),
    };
    let mut name = [0u8; 16];
    let name = fmt_name(&mut name, qd);
    report(name, samples, &o);
    bad != 0 || errors != 0
}

/// `blk-read-qd<N>` in `buf`.
fn fmt_name(buf: &mut [u8; 16], qd: u16) -> &str {
    let prefix = b"blk-read-qd";
    buf[..prefix.len()].copy_from_slice(prefix);
    let mut len = prefix.len();
    let mut digits = [0u8; 5];
    let mut nd = 0;
    let mut v = qd;
    loop {
        digits[nd] = b'0' + (v % 10) as u8;
        nd += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for d in digits[..nd].iter().rev() {
        buf[len] = *d;
        len += 1;
    }
    core::str::from_utf8(&buf[..len]).unwrap_or("blk-read-qd")
}
