//! Hostile I/O modes (`hostile=loop|bounce|sane`): the guest attacks a virtio-blk device
//! the way a hostile guest can, then checks that the device still answers a reset at once
//! and that a sane request (on the reset device and on another disk) completes. The host
//! test (`tests/tests/hostile_io.rs`) watches the VMM and the back-end meanwhile: CPU, peak
//! RSS, log lines, and how fast SIGTERM ends them.
//!
//! The hostile disk is the virtio-blk device with the most sectors; every other one is a
//! sane disk. Keys besides `hostile=`: `hold_ms=N` (how long the attack runs before the
//! reset, default 2000), `tsc_mhz=N` (the TSC rate, which the host measures; default 2600).
//!
//! - `loop`: the disk-driven request loop. Sector `s` of the hostile disk (written by the
//!   guest first, 65536 sectors) holds an image of the available ring with one more entry
//!   than the device has taken (index `s + 2`, every entry head 0) and, at byte 64, the
//!   header of a read of sector `s + 1`. Head 0 reads one sector into the available ring
//!   itself (header included): every completed read re-arms the ring from the disk, and the
//!   index wraps with the 65536 sectors, so the loop never ends by itself. The guest only
//!   watches the used index (and re-arms if it ever stops moving).
//! - `bounce`: a ring (256 entries) full of misaligned reads of 254 MiB (the first 192 heads)
//!   and 8 MiB whose data descriptors all alias one 1 MiB guest buffer (indirect tables): on an
//!   O_DIRECT disk every one of them needs a bounce buffer of its full length. Completed
//!   heads are made available again at once.
//! - `sane`: only the sane check, on every virtio-blk device.
//! - `netflood`: on the first virtio-net device, 256 RX buffers posted once and not refilled
//!   while the host floods the tap; meanwhile the guest sends frame after frame on TX and a
//!   control command every 64 frames, each of which must complete. Then for as long again
//!   every RX buffer goes back at once (RX always has frames and buffers) while TX and
//!   control commands go on; then the reset. The re-initialised device must deliver a flood
//!   frame and send one; then the guest stops refilling RX again and keeps sending until
//!   stopped.
//!
//! After `hold_ms` of the attack the guest writes status 0 to the hostile device and prints
//! how many cycles the write took and how many until the status read back 0; then a read on
//! the reset (and re-initialised) hostile device and a stamped write + verified read on each
//! sane disk; then it arms the attack again and prints `hostile: attacking until stopped`:
//! the host ends the VMM from there. Results are `hostile-result KEY=VALUE...` lines.
//! Any failure prints `hostile: FAILED: ...` and exits with [`EXIT_HOSTILE_FAILED`].

use crate::probe::rdtsc;
use crate::probe_shared::{sector_matches, stamp_sector, BLOCK_SIZE, WORDS_PER_SECTOR};
use crate::virtio::{self, Device, Dma, Virtq, DESC_F_NEXT, DESC_F_WRITE};
use crate::{exit, println};

/// Exit code when a hostile-mode check failed.
pub const EXIT_HOSTILE_FAILED: u32 = 0x73;

const BLK_T_IN: u32 = 0;
const BLK_T_OUT: u32 = 1;
const DESC_F_INDIRECT: u16 = 4;
const F_INDIRECT_DESC: u64 = 1 << 28;
const SECTOR: u64 = 512;

/// Sectors of the self-arming loop: the available index wraps with them.
const LOOP_SECTORS: u64 = 65536;
/// Queue size of the loop: the ring image (6 + 2 * 16 bytes) and the header at byte 64 fit
/// in the one sector each request reads.
const LOOP_QUEUE: u16 = 16;
/// Where the next request's header sits in the ring image.
const LOOP_HDR: u64 = 64;
/// Sectors written per request while laying out the loop (1 MiB, the device's size_max).
const WRITE_CHUNK: u64 = 2048;

/// Bounce flood: the data descriptors' one guest buffer (misaligned by 512 bytes for
/// O_DIRECT) and the request sizes, in buffers.
const ALIAS_LEN: u64 = 1 << 20;
const BIG_SEGS: u64 = 254;
const SMALL_SEGS: u64 = 8;
const FLOOD_QUEUE: u16 = 256;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Loop,
    Bounce,
    Sane,
    NetFlood,
}

struct Params {
    mode: Mode,
    hold_ms: u64,
    tsc_mhz: u64,
}

/// Whether `cmdline` names a `hostile=` mode.
pub fn wanted(cmdline: &[u8]) -> bool {
    cmdline
        .split(|b| b.is_ascii_whitespace())
        .any(|w| w.starts_with(b"hostile="))
}

fn params(cmdline: &[u8]) -> Params {
    let mut p = Params {
        mode: Mode::Sane,
        hold_ms: 2000,
        tsc_mhz: 2600,
    };
    for w in cmdline.split(|b| b.is_ascii_whitespace()) {
        let Some(eq) = w.iter().position(|&b| b == b'=') else {
            continue;
        };
        let (k, v) = (&w[..eq], &w[eq + 1..]);
        match k {
            b"hostile" => {
                p.mode = match v {
                    b"loop" => Mode::Loop,
                    b"bounce" => Mode::Bounce,
                    b"sane" => Mode::Sane,
                    b"netflood" => Mode::NetFlood,
                    _ => fail("hostile=: expected loop, bounce, sane or netflood"),
                }
            }
            b"hold_ms" => {
                p.hold_ms = crate::cmdline::parse_u64(v).unwrap_or_else(|| fail("bad hold_ms="))
            }
            b"tsc_mhz" => {
                p.tsc_mhz = crate::cmdline::parse_u64(v)
                    .filter(|&m| m > 0)
                    .unwrap_or_else(|| fail("bad tsc_mhz="))
            }
            _ => {}
        }
    }
    p
}

fn fail(why: &str) -> ! {
    println!("hostile: FAILED: {why}");
    exit::exit(EXIT_HOSTILE_FAILED)
}

fn write32(addr: u64, v: u32) {
    // SAFETY: `addr` is in guest RAM this guest owns (the DMA area), identity mapped; a
    // device may read it concurrently, which is what a hostile guest does.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}
fn write64(addr: u64, v: u64) {
    // SAFETY: as for `write32`.
    unsafe { core::ptr::write_volatile(addr as *mut u64, v) }
}
fn write16(addr: u64, v: u16) {
    // SAFETY: as for `write32`.
    unsafe { core::ptr::write_volatile(addr as *mut u16, v) }
}
fn read8(addr: u64) -> u8 {
    // SAFETY: as for `write32` (a read of the guest's own RAM).
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}
fn read64(addr: u64) -> u64 {
    // SAFETY: as for `read8`.
    unsafe { core::ptr::read_volatile(addr as *const u64) }
}

/// A descriptor in a table at `table` (main or indirect).
fn desc(table: u64, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let d = table + 16 * i;
    write64(d, addr);
    write32(d + 8, len);
    write16(d + 12, flags);
    write16(d + 14, next);
}

/// The blk devices on bus 0 with their capacities; the largest is the hostile one.
struct Disks {
    devs: [Option<(usize, u64)>; 4],
    hostile: usize,
}

fn capacity(d: &Device) -> u64 {
    u64::from(d.config_read32(0)) | (u64::from(d.config_read32(4)) << 32)
}

fn disks() -> Disks {
    let mut devs = [None; 4];
    let mut hostile = 0;
    let mut best = 0;
    for (n, slot) in devs.iter_mut().enumerate() {
        let Ok(d) = Device::find_nth(virtio::TYPE_BLOCK, n) else {
            break;
        };
        let cap = capacity(&d);
        println!(
            "hostile: virtio-blk #{n} at 00:{:02x}.{}: {cap} sectors",
            d.func.dev, d.func.func
        );
        if cap > best {
            best = cap;
            hostile = n;
        }
        *slot = Some((n, cap));
    }
    if devs[0].is_none() {
        fail("no virtio-blk device on PCI bus 0");
    }
    Disks { devs, hostile }
}

fn open(n: usize, features: u64, queue: u16, dma: &mut Dma) -> (Device, Virtq) {
    let d = Device::find_nth(virtio::TYPE_BLOCK, n).unwrap_or_else(|e| fail(e));
    d.negotiate(features).unwrap_or_else(|e| fail(e));
    let q = d.setup_queue(0, queue, dma).unwrap_or_else(|e| fail(e));
    d.driver_ok().unwrap_or_else(|e| fail(e));
    (d, q)
}

/// One request (descriptors 0..3: header, one data buffer, status); waits up to 10 s for it.
/// Returns the status byte.
fn request(q: &mut Virtq, io: &Io, kind: u32, sector: u64, buf: u64, len: u32, tsc_mhz: u64) -> u8 {
    write32(io.hdr, kind);
    write32(io.hdr + 4, 0);
    write64(io.hdr + 8, sector);
    // SAFETY: the status byte of this guest's request memory.
    unsafe { core::ptr::write_volatile(io.status as *mut u8, 0xff) };
    let data_flags = DESC_F_NEXT | if kind == BLK_T_IN { DESC_F_WRITE } else { 0 };
    q.set_desc(0, io.hdr, 16, DESC_F_NEXT, 1);
    q.set_desc(1, buf, len, data_flags, 2);
    q.set_desc(2, io.status, 1, DESC_F_WRITE, 0);
    q.push(0);
    q.publish_and_notify();
    let t0 = rdtsc();
    loop {
        if q.poll_used().is_some() {
            return read8(io.status);
        }
        if rdtsc().wrapping_sub(t0) > 10_000 * 1000 * tsc_mhz {
            fail("a request got no completion in 10 s");
        }
        core::hint::spin_loop();
    }
}

/// Header and status memory of the plain requests.
struct Io {
    hdr: u64,
    status: u64,
}

impl Io {
    fn new(dma: &mut Dma) -> Io {
        Io {
            hdr: dma.alloc(16, 16),
            status: dma.alloc(1, 16),
        }
    }
}

/// A stamped 4 KiB write and a verified read on sane disk `n`.
fn sane_check(n: usize, cap: u64, dma: &mut Dma, io: &Io, p: &Params) {
    let blocks = cap / (BLOCK_SIZE as u64 / SECTOR);
    if blocks == 0 {
        fail("a sane disk smaller than 4 KiB");
    }
    let (_d, mut q) = open(n, 0, 16, dma);
    let buf = dma.alloc(BLOCK_SIZE as u64, 4096);
    let block = (rdtsc() >> 4) % blocks;
    let sector = block * (BLOCK_SIZE as u64 / SECTOR);
    let seed = 0x5eed_1234;
    let sectors = BLOCK_SIZE / 512;
    let words = |i: usize| -> &'static mut [u64; WORDS_PER_SECTOR] {
        // SAFETY: sector `i` (< 8) of `buf`, 4 KiB of the guest's DMA memory the device does
        // not own while this reference is used.
        unsafe { &mut *((buf + 512 * i as u64) as *mut [u64; WORDS_PER_SECTOR]) }
    };
    for i in 0..sectors {
        stamp_sector(words(i), seed, sector + i as u64);
    }
    let t0 = rdtsc();
    let s = request(
        &mut q,
        io,
        BLK_T_OUT,
        sector,
        buf,
        BLOCK_SIZE as u32,
        p.tsc_mhz,
    );
    if s != 0 {
        fail("a write to a sane disk failed");
    }
    for i in 0..sectors {
        words(i)[0] = 0;
    }
    let s = request(
        &mut q,
        io,
        BLK_T_IN,
        sector,
        buf,
        BLOCK_SIZE as u32,
        p.tsc_mhz,
    );
    let t1 = rdtsc();
    if s != 0 || !(0..sectors).all(|i| sector_matches(words(i), seed, sector + i as u64)) {
        fail("a read from a sane disk did not return what was written");
    }
    println!(
        "hostile-result phase=sane disk={n} sector={sector} cycles={}",
        t1 - t0
    );
}

/// Writes status 0 and measures the write and the time until the status reads 0.
fn timed_reset(d: &Device, p: &Params) {
    let t0 = rdtsc();
    d.set_status(0);
    let t1 = rdtsc();
    loop {
        if d.status() == 0 {
            break;
        }
        if rdtsc().wrapping_sub(t0) > 10_000 * 1000 * p.tsc_mhz {
            fail("the device status did not read 0 within 10 s of the reset");
        }
        core::hint::spin_loop();
    }
    let t2 = rdtsc();
    println!(
        "hostile-result phase=reset write_cycles={} done_cycles={}",
        t1 - t0,
        t2 - t0
    );
}

/// Runs the hostile mode the command line names; returns the exit code.
pub fn run(cmdline: &[u8]) -> u32 {
    let p = params(cmdline);
    if p.mode == Mode::NetFlood {
        net_flood(&p);
    }
    let disks = disks();
    let mut dma = Dma::new();
    let io = Io::new(&mut dma);
    if p.mode == Mode::Sane {
        for &(n, cap) in disks.devs.iter().flatten() {
            sane_check(n, cap, &mut dma, &io, &p);
        }
        println!("hostile: done");
        return 0;
    }
    let (h, cap) = disks.devs[disks.hostile].unwrap_or_else(|| fail("no hostile disk"));
    match p.mode {
        Mode::Loop => {
            if cap < LOOP_SECTORS {
                fail("the hostile disk needs 65536 sectors (32 MiB) for the loop");
            }
            lay_out_loop(h, &mut dma, &io, &p);
        }
        _ => {
            if cap < BIG_SEGS * ALIAS_LEN / SECTOR {
                fail("the hostile disk needs 254 MiB for the bounce flood");
            }
        }
    }
    let d = attack(h, &mut dma, &p, true);
    timed_reset(&d, &p);
    // The reset device serves a plain read again.
    let (_d, mut q) = open(h, 0, 16, &mut dma);
    let buf = dma.alloc(BLOCK_SIZE as u64, 4096);
    let sector = 12345;
    let s = request(&mut q, &io, BLK_T_IN, sector, buf, 512, p.tsc_mhz);
    if s != 0 {
        fail("a read on the reset hostile device failed");
    }
    if p.mode == Mode::Loop && read64(buf + LOOP_HDR + 8) != sector + 1 {
        fail("a read on the reset hostile device returned the wrong sector");
    }
    println!("hostile-result phase=reset-device-read status={s}");
    for &(n, cap) in disks.devs.iter().flatten() {
        if n != h {
            sane_check(n, cap, &mut dma, &io, &p);
        }
    }
    println!("hostile: attacking until stopped");
    attack(h, &mut dma, &p, false);
    fail("the attack ended")
}

/// Writes the loop's 65536 sectors (1 MiB per request).
fn lay_out_loop(h: usize, dma: &mut Dma, io: &Io, p: &Params) {
    let (_d, mut q) = open(h, 0, 16, dma);
    let buf = dma.alloc(WRITE_CHUNK * SECTOR, 4096);
    let t0 = rdtsc();
    let mut s = 0;
    while s < LOOP_SECTORS {
        for i in 0..WRITE_CHUNK {
            let sec = buf + i * SECTOR;
            // SAFETY: one sector of the guest's DMA buffer, not owned by the device now.
            unsafe { core::ptr::write_bytes(sec as *mut u8, 0, SECTOR as usize) };
            // Avail ring image: flags NO_INTERRUPT, index s + 2, every entry head 0.
            write16(sec, 1);
            write16(sec + 2, ((s + i + 2) % LOOP_SECTORS) as u16);
            // Header at LOOP_HDR: IN (0), the next sector.
            write64(sec + LOOP_HDR + 8, (s + i + 1) % LOOP_SECTORS);
        }
        let st = request(
            &mut q,
            io,
            BLK_T_OUT,
            s,
            buf,
            (WRITE_CHUNK * SECTOR) as u32,
            p.tsc_mhz,
        );
        if st != 0 {
            fail("writing the loop's sectors failed");
        }
        s += WRITE_CHUNK;
    }
    println!(
        "hostile: loop laid out: {LOOP_SECTORS} sectors in {} cycles",
        rdtsc() - t0
    );
}

/// Sets up the hostile device and attacks it: for `hold_ms` and returns the device
/// (`timed`), or forever.
fn attack(h: usize, dma: &mut Dma, p: &Params, timed: bool) -> Device {
    let hold = p.hold_ms * 1000 * p.tsc_mhz;
    match p.mode {
        Mode::Loop => {
            let (d, q) = open(h, 0, LOOP_QUEUE, dma);
            let (table, avail, _) = q.rings();
            let status = dma.alloc(1, 16);
            // Head 0: the header inside the ring image, one sector into the available ring
            // itself (header included), the status byte.
            desc(table, 0, avail + LOOP_HDR, 16, DESC_F_NEXT, 1);
            desc(
                table,
                1,
                avail,
                SECTOR as u32,
                DESC_F_NEXT | DESC_F_WRITE,
                2,
            );
            desc(table, 2, status, 1, DESC_F_WRITE, 0);
            let mut q = q;
            let arm = |q: &mut Virtq, next: u16| {
                write32(avail + LOOP_HDR, BLK_T_IN);
                write32(avail + LOOP_HDR + 4, 0);
                write64(avail + LOOP_HDR + 8, u64::from(next));
                for i in 0..u64::from(LOOP_QUEUE) {
                    write16(avail + 4 + 2 * i, 0);
                }
                core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
                write16(avail + 2, next.wrapping_add(1));
                core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
                q.notify();
            };
            arm(&mut q, 0);
            println!("hostile: loop armed");
            let t0 = rdtsc();
            let first = q.used_idx();
            let (mut last, mut last_move, mut served, mut rearms) = (first, t0, 0u64, 0u64);
            loop {
                let now = rdtsc();
                let u = q.used_idx();
                if u != last {
                    served += u64::from(u.wrapping_sub(last));
                    last = u;
                    last_move = now;
                } else if now.wrapping_sub(last_move) > 1000 * p.tsc_mhz {
                    // Stopped moving for 1 ms: arm it again from where it is.
                    arm(&mut q, u);
                    rearms += 1;
                    last_move = now;
                }
                if timed && now.wrapping_sub(t0) > hold {
                    println!(
                        "hostile-result phase=attack mode=loop requests={served} rearms={rearms} cycles={}",
                        now - t0
                    );
                    return d;
                }
                core::hint::spin_loop();
            }
        }
        _ => {
            let (d, mut q) = open(h, F_INDIRECT_DESC, FLOOD_QUEUE, dma);
            let buf = dma.alloc(ALIAS_LEN + 4096, 4096);
            let hdr = dma.alloc(16, 16);
            let status = dma.alloc(1, 16);
            write32(hdr, BLK_T_IN);
            write32(hdr + 4, 0);
            write64(hdr + 8, 0);
            // Two indirect tables: a 254 MiB read (256 descriptors, a chain as long as the
            // ring) and an 8 MiB read,
            // every data descriptor on the same misaligned 1 MiB.
            let mut tables = [(0u64, 0u32); 2];
            for (t, segs) in tables.iter_mut().zip([BIG_SEGS, SMALL_SEGS]) {
                let n = segs + 2;
                let at = dma.alloc(16 * n, 16);
                desc(at, 0, hdr, 16, DESC_F_NEXT, 1);
                for i in 1..=segs {
                    let flags = DESC_F_NEXT | DESC_F_WRITE;
                    desc(at, i, buf + 512, ALIAS_LEN as u32, flags, (i + 1) as u16);
                }
                desc(at, segs + 1, status, 1, DESC_F_WRITE, 0);
                *t = (at, (16 * n) as u32);
            }
            let size = q.size;
            // The first three quarters of the ring are 254 MiB reads: a device that serves a
            // ring's worth of them in one go keeps away from its event loop for seconds.
            let small = |head: u16| head >= size / 4 * 3;
            for head in 0..size {
                let (at, len) = tables[usize::from(small(head))];
                q.set_desc(head, at, len, DESC_F_INDIRECT, 0);
                q.push(head);
            }
            q.publish_and_notify();
            println!("hostile: bounce flood armed ({size} requests)");
            let t0 = rdtsc();
            let (mut done, mut bytes, mut ok) = (0u64, 0u64, 0u64);
            loop {
                let mut pushed = false;
                while let Some((id, len)) = q.poll_used() {
                    done += 1;
                    // A served read wrote its data and the status byte; a refused one only
                    // the status.
                    ok += u64::from(len > 1);
                    bytes += if small(id) { SMALL_SEGS } else { BIG_SEGS } * ALIAS_LEN;
                    q.push(id % size);
                    pushed = true;
                }
                if pushed {
                    q.publish_and_notify();
                }
                let now = rdtsc();
                if timed && now.wrapping_sub(t0) > hold {
                    println!(
                        "hostile-result phase=attack mode=bounce requests={done} served={ok} bytes={bytes} cycles={}",
                        now - t0
                    );
                    return d;
                }
                core::hint::spin_loop();
            }
        }
    }
}

const F_NET_MAC: u64 = 1 << 5;
const F_NET_CTRL_VQ: u64 = 1 << 17;
const NET_HDR: u64 = 12;
const RX_BUFS: u16 = 256;
const RX_BUF: u64 = 2048;
/// The TX frame: the virtio-net header, then a 60-byte broadcast Ethernet frame of the local
/// experimental EtherType.
const TX_LEN: u64 = NET_HDR + 60;

/// A virtio-net device set up for the flood: RX buffers posted once, TX, control queue.
struct NetDev {
    dev: Device,
    rx: Virtq,
    tx: Virtq,
    ctrl: Virtq,
    tx_buf: u64,
    ctrl_buf: u64,
}

fn net_open(dma: &mut Dma) -> NetDev {
    let dev = Device::find(virtio::TYPE_NET).unwrap_or_else(|e| fail(e));
    let features = dev
        .negotiate(F_NET_MAC | F_NET_CTRL_VQ)
        .unwrap_or_else(|e| fail(e));
    if features & F_NET_CTRL_VQ == 0 {
        fail("the net device offers no control queue");
    }
    let mut rx = dev.setup_queue(0, 256, dma).unwrap_or_else(|e| fail(e));
    let tx = dev.setup_queue(1, 256, dma).unwrap_or_else(|e| fail(e));
    let ctrl = dev.setup_queue(2, 16, dma).unwrap_or_else(|e| fail(e));
    dev.driver_ok().unwrap_or_else(|e| fail(e));
    let bufs = dma.alloc(RX_BUF * u64::from(RX_BUFS), 4096);
    for i in 0..RX_BUFS.min(rx.size) {
        rx.set_desc(
            i,
            bufs + RX_BUF * u64::from(i),
            RX_BUF as u32,
            DESC_F_WRITE,
            0,
        );
        rx.push(i);
    }
    rx.publish_and_notify();
    let tx_buf = dma.alloc(TX_LEN, 64);
    let mac = [0u64, 1, 2, 3, 4, 5].map(|i| dev.config_read8(i));
    // SAFETY: the TX buffer just allocated in the guest's DMA memory, TX_LEN bytes.
    let frame = unsafe { core::slice::from_raw_parts_mut(tx_buf as *mut u8, TX_LEN as usize) };
    frame.fill(0);
    let eth = &mut frame[NET_HDR as usize..];
    eth[..6].fill(0xff);
    eth[6..12].copy_from_slice(&mac);
    eth[12..14].copy_from_slice(&[0x88, 0xb5]);
    NetDev {
        dev,
        rx,
        tx,
        ctrl,
        tx_buf,
        ctrl_buf: dma.alloc(4, 16),
    }
}

/// Waits up to 10 s for one completion on `q`.
fn completes(q: &mut Virtq, p: &Params) -> Option<(u16, u32)> {
    let t0 = rdtsc();
    loop {
        if let Some(e) = q.poll_used() {
            return Some(e);
        }
        if rdtsc().wrapping_sub(t0) > 10_000 * 1000 * p.tsc_mhz {
            return None;
        }
        core::hint::spin_loop();
    }
}

impl NetDev {
    /// Sends the frame; fails the run if TX does not complete it.
    fn send(&mut self, p: &Params) {
        self.tx.set_desc(0, self.tx_buf, TX_LEN as u32, 0, 0);
        self.tx.push(0);
        self.tx.publish_and_notify();
        if completes(&mut self.tx, p).is_none() {
            fail("a TX frame was not sent within 10 s");
        }
    }

    /// VIRTIO_NET_CTRL_RX_PROMISC on or off; fails the run unless it is acked OK.
    fn promisc(&mut self, on: bool, p: &Params) {
        let b = self.ctrl_buf;
        write16(b, 0); // class VIRTIO_NET_CTRL_RX, command PROMISC
                       // SAFETY: bytes 2 and 3 of the control buffer (4 bytes allocated).
        unsafe {
            core::ptr::write_volatile((b + 2) as *mut u8, u8::from(on));
            core::ptr::write_volatile((b + 3) as *mut u8, 0xff);
        }
        self.ctrl.set_desc(0, b, 2, DESC_F_NEXT, 1);
        self.ctrl.set_desc(1, b + 2, 1, DESC_F_NEXT, 2);
        self.ctrl.set_desc(2, b + 3, 1, DESC_F_WRITE, 0);
        self.ctrl.push(0);
        self.ctrl.publish_and_notify();
        if completes(&mut self.ctrl, p).is_none() || read8(b + 3) != 0 {
            fail("a control command was not acked within 10 s");
        }
    }
}

/// The `netflood` mode (see the module doc); never returns.
fn net_flood(p: &Params) -> ! {
    let mut dma = Dma::new();
    let mut n = net_open(&mut dma);
    println!("hostile: net flood armed ({RX_BUFS} RX buffers, never refilled)");
    // The host floods: every buffer fills, then RX has none.
    let mut rx_used = 0;
    while rx_used < RX_BUFS {
        if completes(&mut n.rx, p).is_none() {
            fail("the RX buffers were not filled within 10 s of flooding");
        }
        rx_used += 1;
    }
    println!("hostile-result phase=rx-full frames={rx_used}");
    // Half the time with RX stalled (no buffers), half with every RX buffer handed back at
    // once, so that RX always has frames and buffers: TX and the control queue are served
    // all along.
    let hold = p.hold_ms * 1000 * p.tsc_mhz / 2;
    let (mut sent, mut cmds) = (0u64, 0u64);
    let t0 = rdtsc();
    while rdtsc().wrapping_sub(t0) < hold {
        n.send(p);
        sent += 1;
        if sent % 64 == 0 {
            n.promisc(cmds % 2 == 0, p);
            cmds += 1;
        }
    }
    println!(
        "hostile-result phase=stalled requests={sent} ctrl={cmds} cycles={}",
        rdtsc() - t0
    );
    for i in 0..RX_BUFS.min(n.rx.size) {
        n.rx.push(i);
    }
    n.rx.publish_and_notify();
    // RX is refilled without waiting for anything else; a TX frame is in flight all the
    // time, and its wait is measured.
    let (mut sent, mut cmds, mut frames, mut tx_max) = (0u64, 0u64, 0u64, 0u64);
    let mut tx_since: Option<u64> = None;
    let t0 = rdtsc();
    loop {
        let now = rdtsc();
        if now.wrapping_sub(t0) >= hold && tx_since.is_none() {
            break;
        }
        let mut refilled = false;
        while let Some((id, _)) = n.rx.poll_used() {
            frames += 1;
            n.rx.push(id);
            refilled = true;
        }
        if refilled {
            n.rx.publish_and_notify();
        }
        match tx_since {
            None => {
                n.tx.set_desc(0, n.tx_buf, TX_LEN as u32, 0, 0);
                n.tx.push(0);
                n.tx.publish_and_notify();
                tx_since = Some(now);
            }
            Some(t) => {
                if n.tx.poll_used().is_some() {
                    tx_max = tx_max.max(rdtsc().wrapping_sub(t));
                    tx_since = None;
                    sent += 1;
                    if sent % 16 == 0 {
                        n.promisc(cmds % 2 == 0, p);
                        cmds += 1;
                    }
                } else if now.wrapping_sub(t) > 10_000 * 1000 * p.tsc_mhz {
                    fail("a TX frame was not sent within 10 s while RX was flooded");
                }
            }
        }
    }
    // One more control command with RX still flooded and full of buffers.
    n.promisc(false, p);
    cmds += 1;
    println!(
        "hostile-result phase=attack mode=netflood requests={sent} ctrl={cmds} rx={frames} tx_max_cycles={tx_max} cycles={}",
        rdtsc() - t0
    );
    timed_reset(&n.dev, p);
    // The reset device delivers the flood again and sends.
    let mut n = net_open(&mut dma);
    if completes(&mut n.rx, p).is_none() {
        fail("no frame delivered after the reset");
    }
    n.send(p);
    println!("hostile-result phase=reset-device-read status=0");
    let mut n = net_open(&mut dma);
    println!("hostile: attacking until stopped");
    loop {
        n.send(p);
    }
}
