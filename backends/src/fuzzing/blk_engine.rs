//! The stateful virtio-blk engine harness (`blk_engine` fuzz target): the input decodes into
//! a guest memory of several regions with holes, a queue of 1 to 32768 entries, a disk
//! (buffered or O_DIRECT, sync or io_uring) and a sequence of driver and host operations:
//! descriptors and requests written anywhere (aliasing, self-re-arming chains, indirect
//! tables), chains made available, queue passes, completions after some I/O finished,
//! polling rounds, drains, resets, back-end restarts resumed from an inflight region, and
//! memory regions unplugged and plugged again.
//!
//! After every call into the engine it asserts what the engine promises a hostile guest:
//! - at most [`MAX_CHAINS_PER_CALL`] chains taken from the available ring per call;
//! - the used index moves by what the call reports, and by at most what was in flight plus
//!   what the call took (so by at most the queue size plus the budget);
//! - in-flight requests never exceed the queue size; bounce buffers never exceed
//!   [`BOUNCE_BUDGET`] per queue;
//! - with [`super::heap::CountingAlloc`] installed: the heap the engine holds is at most its
//!   bounce buffers plus a fixed allowance per in-flight request, and what one call
//!   allocates at once is bounded too;
//! - while no device-writable buffer aliases a ring or a descriptor table (the harness
//!   checks before each call; an aliased ring can re-arm itself, and then which heads are
//!   available is the disk's business): every used id is a head that was made available
//!   and not used since, so no head completes twice.
//!
//! The encoding is written by [`Script`] (seeds and tests) and read by [`fuzz_blk_engine`];
//! every byte string is a valid input (missing bytes read as zero).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use virtio_bindings::virtio_blk::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};
use vmm_sys_util::tempfile::TempFile;

use super::heap;
use crate::block::{
    BlockBackend, BlockOptions, BlockQueue, EngineChoice, BOUNCE_BUDGET, BOUNCE_CHUNK,
    MAX_CHAINS_PER_CALL, MAX_CHAIN_DESCS, MAX_IOVECS,
};
use crate::inflight::InflightRegion;

type Mem = GuestMemoryMmap<()>;
type Region = GuestRegionMmap<()>;
type Engine = BlockQueue<Arc<Mem>>;

const PAGE: u64 = 4096;
/// Operations per input, and bytes of disk I/O, after which the input ends (quick runs).
const MAX_OPS: usize = 64;
const MAX_IO_BYTES: u64 = 1 << 30;
/// Disk sizes to choose from: the largest is more than the bounce budget (the chunked path).
const DISK_SIZES: [u64; 4] = [64 << 10, 1 << 20, 4 << 20, BOUNCE_BUDGET + (4 << 20)];
/// Buffer lengths the compact length encoding picks from.
const LENS: [u32; 12] = [
    0,
    1,
    15,
    16,
    17,
    511,
    512,
    513,
    4096,
    1 << 20,
    (1 << 20) + 1,
    16 << 20,
];
/// Request types the compact type encoding picks from (the last is unknown to virtio-blk).
const TYPES: [u32; 7] = [
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_WRITE_ZEROES,
    0x7f,
];

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// Header flags (byte 0 of an input).
pub mod flags {
    /// io_uring engine (else synchronous).
    pub const IO_URING: u8 = 1;
    /// Disk opened with O_DIRECT: misaligned buffers bounce.
    pub const DIRECT: u8 = 2;
    /// VIRTIO_RING_F_EVENT_IDX negotiated.
    pub const EVENT_IDX: u8 = 4;
    /// The host busy-polls (notifications stay off after a pass).
    pub const POLLING: u8 = 8;
    /// Read-only disk.
    pub const READONLY: u8 = 0x10;
    /// The back-end keeps a vhost-user inflight region.
    pub const INFLIGHT: u8 = 0x20;
    /// The disk is a file in the temporary directory (else a memfd).
    pub const DISK_FILE: u8 = 0x40;
    /// The rings are placed back to back at the start of region 0 (else the input says).
    pub const AUTO_RINGS: u8 = 0x80;
}

/// Operation codes.
pub mod op {
    /// Write one descriptor of the table: index, address, length, flags, next.
    pub const DESC: u8 = 0;
    /// Write a whole request (header, data, status descriptors and the header) at a head.
    pub const REQUEST: u8 = 1;
    /// The same, through an indirect table the head points to.
    pub const INDIRECT: u8 = 2;
    /// Make heads available: count, first head, step.
    pub const PUBLISH: u8 = 3;
    /// Write bytes anywhere in guest memory.
    pub const WRITE: u8 = 4;
    /// Set the available index to any value.
    pub const AVAIL_IDX: u8 = 5;
    /// `process_queue` (a doorbell).
    pub const PROCESS: u8 = 6;
    /// Wait up to some milliseconds for io_uring completions, then `process_completions`.
    pub const COMPLETE: u8 = 7;
    /// `poll_round`, then `rearm` when the input says.
    pub const POLL: u8 = 8;
    /// `drain`.
    pub const DRAIN: u8 = 9;
    /// Device reset by the driver: drain, new engine, rings zeroed.
    pub const RESET: u8 = 10;
    /// The back-end restarts: with an inflight region it dies with requests in flight and
    /// the next one resumes from the region; without, a vhost-user stop and start.
    pub const RESTART: u8 = 11;
    /// Unplug or plug a memory region (`set_memory`), drained first or not.
    pub const MEMORY: u8 = 12;
    /// Write `count` u16 values `value + k * inc` every `stride` bytes from an address.
    pub const FILL: u8 = 13;
    /// Number of operations.
    pub const COUNT: u8 = 14;
}

/// Address encodings: a selector byte then the offset.
pub mod addr {
    /// Selector bit: align the offset down to 512 (O_DIRECT friendly).
    pub const ALIGNED: u8 = 0x80;
    /// Selectors from this one on take a raw 64-bit address (anywhere, holes included).
    pub const RAW: u8 = 0xf8;
}

/// What a run saw, for the seed tests.
#[derive(Clone, Copy, Debug, Default)]
pub struct Summary {
    /// Engine calls made.
    pub calls: u32,
    /// Used entries added, all calls together.
    pub used: u64,
    /// Calls that reported `more` (stopped at the budget).
    pub more: u32,
    /// The most chains one call took.
    pub max_taken: u32,
    /// The most bounce bytes any engine held at once.
    pub bounce_peak: u64,
    /// Requests that went through a bounce buffer.
    pub bounced: u64,
    /// Requests completed with an OK status (reads, writes, flushes...).
    pub ok_io: u64,
    /// Requests executed again from an inflight region.
    pub resubmitted: u32,
    /// The used ids were checked against the heads made available all along.
    pub strict: bool,
    /// Engine calls that returned an error (the host would set NEEDS_RESET).
    pub errors: u32,
}

use super::input;

type Input<'a> = input::Input<&'a [u8]>;

/// A request length from one byte: one of [`LENS`], a multiple of 512, or any.
trait Lengths {
    fn len(&mut self) -> u32;
}

impl Lengths for Input<'_> {
    fn len(&mut self) -> u32 {
        let b = self.u8();
        match b >> 6 {
            0 => LENS[usize::from(b) % LENS.len()],
            1 => u32::from(b & 63) * 512,
            _ => self.u32(),
        }
    }
}

/// The disk file: a memfd (tmpfs), or a file in the temporary directory.
enum DiskFile {
    Memfd(OwnedFd),
    Temp(TempFile),
}

impl DiskFile {
    fn new(on_fs: bool, size: u64) -> Option<DiskFile> {
        let f = if on_fs {
            DiskFile::Temp(TempFile::new().ok()?)
        } else {
            // SAFETY: the name is a NUL-terminated literal; memfd_create returns a new fd or -1.
            let fd = unsafe { libc::memfd_create(c"blk-engine-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
            if fd < 0 {
                return None;
            }
            // SAFETY: a new fd nothing else owns.
            DiskFile::Memfd(unsafe { OwnedFd::from_raw_fd(fd) })
        };
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(f.path())
            .ok()?;
        file.set_len(size).ok()?;
        Some(f)
    }

    fn path(&self) -> PathBuf {
        match self {
            DiskFile::Memfd(fd) => PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())),
            DiskFile::Temp(t) => t.as_path().into(),
        }
    }
}

/// Which engine call is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Call {
    Process,
    Complete,
    Poll,
    Rearm,
    Drain,
    Resume,
}

struct Harness {
    regions: Vec<Arc<Region>>,
    present: Vec<bool>,
    mem: Arc<Mem>,
    qsize: u16,
    desc: u64,
    avail: u64,
    used: u64,
    event_idx: bool,
    polling: bool,
    disk: Arc<BlockBackend>,
    _file: DiskFile,
    inflight: Option<InflightRegion>,
    engine: Engine,
    queue: Queue,
    /// The queue failed: the host set NEEDS_RESET and waits for a reset.
    broken: bool,
    /// The driver's available index.
    avail_idx: u16,
    /// Per head: times made available and not used since.
    outstanding: Vec<u32>,
    strict: bool,
    /// Heap bytes the current engine's calls allocated and have not freed.
    held: i64,
    /// Counters of the engines replaced so far.
    totals: Totals,
    summary: Summary,
}

/// Counters summed over engines.
#[derive(Clone, Copy, Default)]
struct Totals {
    io_bytes: u64,
    bounced: u64,
    ok_io: u64,
}

impl Totals {
    fn with(self, e: &Engine) -> Totals {
        let s = e.stats();
        Totals {
            io_bytes: self.io_bytes + s.bytes_read + s.bytes_written,
            bounced: self.bounced + s.bounced,
            ok_io: self.ok_io + s.reads + s.writes + s.flushes + s.discards + s.write_zeroes,
        }
    }
}

/// An address: in region `sel % regions` at an offset up to a little past its end, or raw.
fn decode_addr(regions: &[Arc<Region>], inp: &mut Input) -> u64 {
    let sel = inp.u8();
    if sel >= addr::RAW {
        return inp.u64();
    }
    let r = &regions[usize::from(sel & 0x7f) % regions.len()];
    let mut off = u64::from(inp.u32()) % (r.len() + 64);
    if sel & addr::ALIGNED != 0 {
        off &= !511;
    }
    r.start_addr().raw_value().wrapping_add(off)
}

fn ranges_overlap(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    alen > 0 && blen > 0 && a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

impl Harness {
    fn mem_of(regions: &[Arc<Region>], present: &[bool]) -> Option<Arc<Mem>> {
        let v: Vec<Arc<Region>> = regions
            .iter()
            .zip(present)
            .filter(|(_, &p)| p)
            .map(|(r, _)| r.clone())
            .collect();
        Mem::from_arc_regions(v).ok().map(Arc::new)
    }

    fn new_queue(&self) -> Queue {
        let mut q = match Queue::new(self.qsize) {
            Ok(q) => q,
            // The size was checked (a power of two up to 32768) when the input was decoded.
            Err(_) => unreachable!("queue size {} refused", self.qsize),
        };
        q.set_size(self.qsize);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_event_idx(self.event_idx);
        q.set_ready(true);
        q
    }

    fn new_engine(&self) -> Option<Engine> {
        let mut e = BlockQueue::new(self.disk.clone(), self.mem.clone(), self.qsize).ok()?;
        e.set_polling(self.polling);
        if let Some(r) = &self.inflight {
            e.set_inflight(r.queue(0)?);
        }
        Some(e)
    }

    fn addr(&self, inp: &mut Input) -> u64 {
        decode_addr(&self.regions, inp)
    }

    /// A write by the driver (the harness). Writing the rings' indexes or entries behind the
    /// tracker's back makes it lose track of what is available.
    fn write(&mut self, at: u64, bytes: &[u8]) {
        let n = bytes.len() as u64;
        if ranges_overlap(at, n, self.avail, 6 + 2 * u64::from(self.qsize))
            || ranges_overlap(at, n, self.used, 6 + 8 * u64::from(self.qsize))
        {
            self.strict = false;
        }
        let _ = self.mem.write_slice(bytes, GuestAddress(at));
    }

    fn write_desc(&mut self, table: u64, i: u64, addr: u64, len: u32, fl: u16, next: u16) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&fl.to_le_bytes());
        b[14..16].copy_from_slice(&next.to_le_bytes());
        self.write(table.wrapping_add(16 * i), &b);
    }

    /// A request: header, data descriptors, status. In the table from `head` on (indexes
    /// wrap), or in an indirect table at `table` that descriptor `head` points to.
    fn request(&mut self, inp: &mut Input, indirect: bool) {
        let q = u64::from(self.qsize);
        let head = u64::from(inp.u16()) % q;
        let table = if indirect { self.addr(inp) } else { self.desc };
        let t = inp.u8();
        let typ = match usize::from(t & 7) {
            7 => inp.u32(),
            i => TYPES[i],
        };
        let sector = u64::from(inp.u32());
        let hdr = self.addr(inp);
        let c = inp.u8();
        let ndata = if c < 0x80 {
            u64::from(c % 9)
        } else {
            u64::from(c & 0x7f) * 32
        };
        let data = self.addr(inp);
        let dlen = inp.len();
        let stride = u64::from(inp.u16());
        let status = self.addr(inp);
        let mut data_w = matches!(typ, VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID);
        if t & 8 != 0 {
            data_w = !data_w;
        }
        let split = t & 0x20 != 0;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&typ.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.write(hdr, &h);
        // Descriptor positions: in the table they wrap around the queue.
        let (base, modulo) = if indirect { (0, u64::MAX) } else { (head, q) };
        let pos = |k: u64| (base + k) % modulo;
        let mut descs: Vec<(u64, u32, u16)> = Vec::new();
        if split {
            descs.push((hdr, 8, 0));
            descs.push((hdr.wrapping_add(8), 8, 0));
        } else {
            descs.push((hdr, 16, 0));
        }
        for k in 0..ndata {
            let w = if data_w { F_WRITE } else { 0 };
            descs.push((data.wrapping_add(k.wrapping_mul(stride)), dlen, w));
        }
        let sw = if t & 0x10 != 0 { 0 } else { F_WRITE };
        descs.push((status, 1, sw));
        let n = descs.len() as u64;
        for (k, &(a, l, w)) in descs.iter().enumerate() {
            let k = k as u64;
            let last = k + 1 == n;
            let fl = w | if last { 0 } else { F_NEXT };
            let next = if last { 0 } else { pos(k + 1) as u16 };
            self.write_desc(table, pos(k), a, l, fl, next);
        }
        if indirect {
            self.write_desc(self.desc, head, table, (16 * n) as u32, F_INDIRECT, 0);
        }
    }

    fn publish(&mut self, inp: &mut Input) {
        let c = inp.u8();
        let n = if c < 0x80 {
            u32::from(c) + 1
        } else {
            (u32::from(c & 0x7f) + 1) * 256
        };
        let base = inp.u16();
        let step = u32::from(inp.u8());
        let q = u32::from(self.qsize);
        for k in 0..n {
            let head = if base >= 0xff00 {
                // Out of the table on purpose.
                q + u32::from(base & 0xff)
            } else {
                (u32::from(base) + k * step) % q
            };
            let slot = 4 + 2 * u64::from(self.avail_idx % self.qsize);
            // Written directly: the tracker knows these entries.
            let _ = self
                .mem
                .write_obj(head as u16, GuestAddress(self.avail.wrapping_add(slot)));
            if let Some(c) = self.outstanding.get_mut(head as usize) {
                *c += 1;
            }
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        let _ = self
            .mem
            .write_obj(self.avail_idx, GuestAddress(self.avail.wrapping_add(2)));
    }

    /// Before a call: does any device-writable buffer alias a ring or a descriptor table?
    /// Then the engine's own writes may change what is available or used during the call.
    fn check_aliasing(&mut self) {
        if !self.strict {
            return;
        }
        let q = u64::from(self.qsize);
        let mut tables = vec![
            (self.desc, 16 * q),
            (self.avail, 6 + 2 * q),
            (self.used, 6 + 8 * q),
        ];
        let read = |at: u64| -> Option<(u64, u32, u16)> {
            let b: [u8; 16] = self.mem.read_obj(GuestAddress(at)).ok()?;
            Some((
                u64::from_le_bytes(b[0..8].try_into().ok()?),
                u32::from_le_bytes(b[8..12].try_into().ok()?),
                u16::from_le_bytes(b[12..14].try_into().ok()?),
            ))
        };
        let mut writable = Vec::new();
        for i in 0..q {
            let Some((a, l, f)) = read(self.desc.wrapping_add(16 * i)) else {
                continue;
            };
            if f & F_INDIRECT != 0 {
                tables.push((a, u64::from(l)));
            } else if f & F_WRITE != 0 {
                writable.push((a, u64::from(l)));
            }
        }
        let mut budget = 1u64 << 16;
        for &(t, l) in &tables[3..] {
            for i in 0..(l / 16).min(budget) {
                if let Some((a, l, f)) = read(t.wrapping_add(16 * i)) {
                    if f & F_WRITE != 0 {
                        writable.push((a, u64::from(l)));
                    }
                }
            }
            budget = budget.saturating_sub(l / 16);
            if budget == 0 {
                self.strict = false;
                return;
            }
        }
        if writable
            .iter()
            .any(|&(a, l)| tables.iter().any(|&(t, tl)| ranges_overlap(a, l, t, tl)))
        {
            self.strict = false;
        }
    }

    fn used_idx_in_memory(&self) -> Option<u16> {
        self.mem
            .read_obj::<u16>(GuestAddress(self.used.wrapping_add(2)))
            .ok()
    }

    fn call(&mut self, call: Call) {
        if self.broken && call != Call::Drain {
            return;
        }
        self.check_aliasing();
        let avail0 = self.queue.next_avail();
        let used0 = if call == Call::Resume {
            self.used_idx_in_memory().unwrap_or(0)
        } else {
            self.queue.next_used()
        };
        let in_flight0 = self.engine.in_flight();
        let heap0 = heap::live();
        heap::reset_peak();
        let mut resubmitted = 0;
        let r = match call {
            Call::Process => self.engine.process_queue(&mut self.queue).map(Some),
            Call::Complete => self.engine.process_completions(&mut self.queue).map(Some),
            Call::Poll => self.engine.poll_round(&mut self.queue),
            Call::Rearm => self.engine.rearm(&mut self.queue).map(|_| None),
            Call::Drain => self.engine.drain(&mut self.queue).map(Some),
            Call::Resume => self.engine.resume_inflight(&mut self.queue).map(|r| {
                resubmitted = r.resubmitted;
                Some(r.outcome)
            }),
        };
        let peak = heap::peak();
        let heap1 = heap::live();
        self.summary.calls += 1;
        let q = u32::from(self.qsize);
        let taken = u32::from(self.queue.next_avail().wrapping_sub(avail0));
        let used = u32::from(self.queue.next_used().wrapping_sub(used0));
        let in_flight = self.engine.in_flight();
        // BLK_ENGINE_TRACE=1 (when reproducing a crash by hand): every call and its effect.
        if std::env::var_os("BLK_ENGINE_TRACE").is_some() {
            eprintln!(
                "{call:?}: taken {taken} used {used} in flight {in_flight0} -> {in_flight}, \
                 bounce {} peak {}, {:?} {:?}",
                self.engine.bounce_bytes(),
                self.engine.bounce_peak(),
                r.as_ref().map_err(|e| e.to_string()),
                self.engine.stats(),
            );
        }
        match call {
            Call::Resume => {
                assert!(
                    resubmitted <= q,
                    "{resubmitted} heads resubmitted, queue of {q}"
                );
            }
            _ => assert!(
                taken <= MAX_CHAINS_PER_CALL,
                "{call:?} took {taken} chains in one call (budget {MAX_CHAINS_PER_CALL})"
            ),
        }
        self.summary.max_taken = self.summary.max_taken.max(taken);
        self.summary.resubmitted += resubmitted;
        let bound = in_flight0 as u32
            + if call == Call::Resume {
                resubmitted
            } else {
                taken
            };
        assert!(
            used <= bound,
            "{call:?}: the used index moved by {used}, with {in_flight0} in flight before and \
             {taken} chains taken (resubmitted {resubmitted})"
        );
        assert!(
            in_flight <= usize::from(self.qsize),
            "{in_flight} in flight"
        );
        let bounce = self.engine.bounce_bytes();
        assert!(
            bounce <= BOUNCE_BUDGET && self.engine.bounce_peak() <= BOUNCE_BUDGET,
            "{bounce} bytes of bounce buffers now, {} at most (budget {BOUNCE_BUDGET})",
            self.engine.bounce_peak()
        );
        self.summary.bounce_peak = self.summary.bounce_peak.max(self.engine.bounce_peak());
        match r {
            Ok(out) => {
                let out = out.unwrap_or_default();
                if call != Call::Resume {
                    assert_eq!(
                        out.used, used,
                        "{call:?} reported {} used entries, the used index moved by {used}",
                        out.used
                    );
                }
                self.summary.more += u32::from(out.more);
            }
            Err(_) => {
                self.summary.errors += 1;
                self.broken = true;
            }
        }
        self.summary.used += u64::from(used);
        self.check_used_ids(used0, used);
        if heap::installed() {
            self.check_heap(call, heap0, peak, heap1, in_flight);
        }
    }

    fn check_used_ids(&mut self, from: u16, n: u32) {
        if !self.strict {
            return;
        }
        if n > u32::from(self.qsize) {
            // Entries were overwritten before this harness could read them.
            self.strict = false;
            return;
        }
        for k in 0..n {
            let i = from.wrapping_add(k as u16) % self.qsize;
            let at = self.used.wrapping_add(4 + 8 * u64::from(i));
            let Ok(id) = self.mem.read_obj::<u32>(GuestAddress(at)) else {
                self.strict = false;
                return;
            };
            let c = self.outstanding.get_mut(id as usize);
            match c {
                Some(c) if *c > 0 => *c -= 1,
                _ => panic!(
                    "used entry {} has id {id}: not a head made available and not used since \
                     (a head completed twice, or a made-up one)",
                    from.wrapping_add(k as u16)
                ),
            }
        }
    }

    /// What an in-flight request may hold on the heap besides its bounce buffer: its iovec
    /// array (at most [`MAX_IOVECS`] + 1 entries, doubled for growth) and bookkeeping.
    const PER_REQUEST: usize = 2 * (MAX_IOVECS + 1) * std::mem::size_of::<libc::iovec>() + 1024;
    /// Fixed allowance (log lines, counters).
    const SLACK: usize = 256 << 10;

    fn check_heap(
        &mut self,
        call: Call,
        before: usize,
        peak: usize,
        after: usize,
        in_flight: usize,
    ) {
        self.held += after as i64 - before as i64;
        let bounce = self.engine.bounce_bytes() as usize;
        let allowed = bounce + in_flight * Self::PER_REQUEST + Self::SLACK;
        assert!(
            self.held <= allowed as i64,
            "{call:?}: the engine holds {} heap bytes with {in_flight} requests in flight and \
             {bounce} bounce bytes (allowed {allowed})",
            self.held
        );
        let max_descs = usize::from(self.qsize).max(MAX_CHAIN_DESCS);
        // Within one call: the bounce budget, one chunk, the requests it may take, and the
        // segment lists of one chain being parsed and split.
        let transient = BOUNCE_BUDGET as usize
            + BOUNCE_CHUNK
            + (in_flight + MAX_CHAINS_PER_CALL as usize) * Self::PER_REQUEST
            + max_descs * 128
            + Self::SLACK;
        let grew = peak.saturating_sub(before);
        assert!(
            grew <= transient,
            "{call:?}: {grew} heap bytes allocated at once (allowed {transient})"
        );
    }

    /// Replaces the engine (and the queue object) after the old one is dropped.
    fn replace_engine(&mut self) -> bool {
        let Some(e) = self.new_engine() else {
            return false;
        };
        // The old engine waits for its I/O in its Drop before the new one starts.
        self.totals = self.totals.with(&self.engine);
        self.engine = e;
        self.held = 0;
        self.queue = self.new_queue();
        true
    }

    fn reset(&mut self) -> bool {
        self.call(Call::Drain);
        if self.inflight.is_some() {
            self.inflight = InflightRegion::create(1, self.qsize).ok();
        }
        // Drop the old engine before the driver rewrites the rings.
        let Some(e) = self.new_engine() else {
            return false;
        };
        self.totals = self.totals.with(&self.engine);
        drop(std::mem::replace(&mut self.engine, e));
        self.held = 0;
        for at in [self.avail, self.used] {
            let _ = self.mem.write_obj(0u32, GuestAddress(at));
        }
        self.queue = self.new_queue();
        self.avail_idx = 0;
        self.outstanding.iter_mut().for_each(|c| *c = 0);
        self.strict = true;
        self.broken = false;
        self.call(Call::Resume);
        true
    }

    fn restart(&mut self) -> bool {
        if self.inflight.is_some() {
            // Dies with requests in flight: nothing completes; the next one resumes.
            if !self.replace_engine() {
                return false;
            }
            self.broken = false;
            self.call(Call::Resume);
            return true;
        }
        // GET_VRING_BASE: the back-end stops (drains) and reports its position.
        self.call(Call::Drain);
        let (a, u) = (self.queue.next_avail(), self.queue.next_used());
        if !self.replace_engine() {
            return false;
        }
        self.queue.set_next_avail(a);
        self.queue.set_next_used(u);
        true
    }

    fn memory(&mut self, inp: &mut Input) {
        let sel = inp.u8();
        let k = usize::from(sel & 3) % self.regions.len();
        if sel & 4 != 0 {
            self.call(Call::Drain);
        }
        let mut present = self.present.clone();
        present[k] = !present[k];
        if let Some(m) = Self::mem_of(&self.regions, &present) {
            self.present = present;
            self.mem = m;
            self.engine.set_memory(self.mem.clone());
        }
    }

    fn wait_completions(&mut self, inp: &mut Input) {
        let ms = i32::from(inp.u8() % 5);
        if let Some(fd) = self.engine.completion_fd() {
            if self.engine.in_flight() > 0 {
                let mut p = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut p, 1, ms) };
            }
        }
        self.call(Call::Complete);
    }

    fn step(&mut self, inp: &mut Input) -> bool {
        match inp.u8() % op::COUNT {
            op::DESC => {
                let i = u64::from(inp.u16() % self.qsize);
                let a = self.addr(inp);
                let l = inp.len();
                let f = u16::from(inp.u8() & 7);
                let n = inp.u16();
                self.write_desc(self.desc, i, a, l, f, n);
            }
            op::REQUEST => self.request(inp, false),
            op::INDIRECT => self.request(inp, true),
            op::PUBLISH => self.publish(inp),
            op::WRITE => {
                let a = self.addr(inp);
                let n = usize::from(inp.u8() % 64);
                let bytes: Vec<u8> = (0..n).map(|_| inp.u8()).collect();
                self.write(a, &bytes);
            }
            op::AVAIL_IDX => {
                self.avail_idx = inp.u16();
                self.strict = false;
                let _ = self
                    .mem
                    .write_obj(self.avail_idx, GuestAddress(self.avail.wrapping_add(2)));
            }
            op::PROCESS => self.call(Call::Process),
            op::COMPLETE => self.wait_completions(inp),
            op::POLL => {
                self.call(Call::Poll);
                if inp.u8() & 1 != 0 {
                    self.call(Call::Rearm);
                }
            }
            op::DRAIN => self.call(Call::Drain),
            op::RESET => return self.reset(),
            op::RESTART => return self.restart(),
            op::MEMORY => self.memory(inp),
            _ => {
                let a = self.addr(inp);
                let n = inp.u16();
                let stride = u64::from(inp.u16());
                let (v, inc) = (inp.u16(), inp.u16());
                for k in 0..n {
                    let x = v.wrapping_add(inc.wrapping_mul(k));
                    self.write(a.wrapping_add(stride * u64::from(k)), &x.to_le_bytes());
                }
            }
        }
        true
    }
}

/// Decodes and runs one input; panics when the engine breaks one of its promises.
pub fn fuzz_blk_engine(data: &[u8]) -> Summary {
    run(data).unwrap_or_default()
}

fn run(data: &[u8]) -> Option<Summary> {
    let mut inp = Input::new(data);
    let fl = inp.u8();
    let qsize = 1u16 << (inp.u8() % 16);
    let disk_size = DISK_SIZES[usize::from(inp.u8() % 4)];
    let nregions = usize::from(inp.u8() % 4) + 1;
    let q = u64::from(qsize);
    let rings_len = 16 * q + (6 + 2 * q).next_multiple_of(4) + 6 + 8 * q;
    let mut regions = Vec::new();
    let mut at = 0u64;
    for i in 0..nregions {
        let gap = u64::from(inp.u8() % 64) * PAGE;
        let mut size = (u64::from(inp.u16() % 1024) + 1) * PAGE;
        if i == 0 && fl & flags::AUTO_RINGS != 0 {
            size = size.max((rings_len + PAGE).next_multiple_of(PAGE));
        }
        at += gap;
        regions.push(Arc::new(
            Region::from_range(GuestAddress(at), size as usize, None).ok()?,
        ));
        at += size;
    }
    let present = vec![true; nregions];
    let mem = Harness::mem_of(&regions, &present)?;

    let file = DiskFile::new(fl & flags::DISK_FILE != 0, disk_size)?;
    let opts = |direct| BlockOptions {
        path: file.path(),
        readonly: fl & flags::READONLY != 0,
        direct,
        engine: if fl & flags::IO_URING != 0 {
            EngineChoice::Auto
        } else {
            EngineChoice::Sync
        },
        serial: None,
    };
    let direct = fl & flags::DIRECT != 0;
    let disk = BlockBackend::open(&opts(direct))
        .or_else(|_| BlockBackend::open(&opts(false)))
        .ok()?;
    let inflight = if fl & flags::INFLIGHT != 0 {
        Some(InflightRegion::create(1, qsize).ok()?)
    } else {
        None
    };
    let (desc, avail, used) = if fl & flags::AUTO_RINGS != 0 {
        let base = regions[0].start_addr().raw_value();
        let avail = base + 16 * q;
        (base, avail, (avail + 6 + 2 * q).next_multiple_of(4))
    } else {
        (
            decode_addr(&regions, &mut inp) & !15,
            decode_addr(&regions, &mut inp) & !1,
            decode_addr(&regions, &mut inp) & !3,
        )
    };
    let disk = Arc::new(disk);
    let mut engine = BlockQueue::new(disk.clone(), mem.clone(), qsize).ok()?;
    engine.set_polling(fl & flags::POLLING != 0);
    if let Some(r) = &inflight {
        engine.set_inflight(r.queue(0)?);
    }
    let mut h = Harness {
        regions,
        present,
        mem,
        qsize,
        desc,
        avail,
        used,
        event_idx: fl & flags::EVENT_IDX != 0,
        polling: fl & flags::POLLING != 0,
        disk,
        _file: file,
        inflight,
        engine,
        queue: Queue::new(1).ok()?,
        broken: false,
        avail_idx: 0,
        outstanding: vec![0; usize::from(qsize)],
        strict: true,
        held: 0,
        totals: Totals::default(),
        summary: Summary::default(),
    };
    h.queue = h.new_queue();
    h.call(Call::Resume);
    for _ in 0..MAX_OPS {
        if inp.done() {
            break;
        }
        if !h.step(&mut inp) {
            break;
        }
        if h.totals.with(&h.engine).io_bytes > MAX_IO_BYTES {
            break;
        }
    }
    h.call(Call::Drain);
    let t = h.totals.with(&h.engine);
    h.summary.bounced = t.bounced;
    h.summary.ok_io = t.ok_io;
    h.summary.strict = h.strict;
    Some(h.summary)
}

/// An address in the input encoding.
#[derive(Clone, Copy, Debug)]
pub enum At {
    /// In region `.0` at offset `.1`.
    In(u8, u32),
    /// The same, the offset aligned down to 512.
    Aligned(u8, u32),
    /// Anywhere.
    Raw(u64),
}

/// A buffer length in the input encoding.
#[derive(Clone, Copy, Debug)]
pub enum Len {
    /// `n` sectors of 512 bytes (up to 63).
    Sectors(u8),
    /// Any length.
    Raw(u32),
}

/// A request for [`Script::request`].
#[derive(Clone, Copy, Debug)]
pub struct Req {
    /// Index into the type table (0 IN, 1 OUT, 2 FLUSH, 3 GET_ID, 4 DISCARD, 5 WRITE_ZEROES,
    /// 6 unknown) plus the modifier bits (8: data the other way, 0x10: status not writable,
    /// 0x20: header split in two).
    pub kind: u8,
    /// First sector.
    pub sector: u32,
    /// Where the header goes.
    pub hdr: At,
    /// Data descriptors: 0 to 8, or a multiple of 32 up to 4064.
    pub ndata: u16,
    /// The first data buffer.
    pub data: At,
    /// Length of every data buffer.
    pub len: Len,
    /// Bytes between data buffers (0: all alias one buffer).
    pub stride: u16,
    /// Where the status byte goes.
    pub status: At,
}

/// Writes inputs for [`fuzz_blk_engine`] (seeds, tests).
pub struct Script(Vec<u8>);

impl Script {
    /// The header: `flags` (see [`flags`]), a queue of `1 << qsize_log2` entries, disk size
    /// index (64 KiB, 1 MiB, 4 MiB, budget + 4 MiB), and regions as (gap pages before it,
    /// pages). Without [`flags::AUTO_RINGS`], `rings` places the table, avail and used ring.
    pub fn new(fl: u8, qsize_log2: u8, disk: u8, regions: &[(u8, u16)], rings: [At; 3]) -> Self {
        let mut s = Script(vec![fl, qsize_log2, disk, regions.len() as u8 - 1]);
        for &(gap, pages) in regions {
            s.0.push(gap);
            s.0.extend_from_slice(&(pages - 1).to_le_bytes());
        }
        if fl & flags::AUTO_RINGS == 0 {
            for r in rings {
                s.at(r);
            }
        }
        s
    }

    fn at(&mut self, a: At) {
        match a {
            At::In(r, off) => {
                self.0.push(r);
                self.0.extend_from_slice(&off.to_le_bytes());
            }
            At::Aligned(r, off) => {
                self.0.push(r | addr::ALIGNED);
                self.0.extend_from_slice(&off.to_le_bytes());
            }
            At::Raw(a) => {
                self.0.push(addr::RAW);
                self.0.extend_from_slice(&a.to_le_bytes());
            }
        }
    }

    fn len(&mut self, l: Len) {
        match l {
            Len::Sectors(n) => self.0.push(0x40 | (n & 63)),
            Len::Raw(n) => {
                self.0.push(0xc0);
                self.0.extend_from_slice(&n.to_le_bytes());
            }
        }
    }

    /// A request at descriptor `head` (its descriptors follow, wrapping), or in an indirect
    /// table at `table` that `head` points to.
    pub fn request(&mut self, head: u16, table: Option<At>, r: Req) -> &mut Self {
        self.0.push(if table.is_some() {
            op::INDIRECT
        } else {
            op::REQUEST
        });
        self.0.extend_from_slice(&head.to_le_bytes());
        if let Some(t) = table {
            self.at(t);
        }
        self.0.push(r.kind);
        self.0.extend_from_slice(&r.sector.to_le_bytes());
        self.at(r.hdr);
        self.0.push(if r.ndata <= 8 {
            r.ndata as u8
        } else {
            0x80 | (r.ndata / 32).min(0x7f) as u8
        });
        self.at(r.data);
        self.len(r.len);
        self.0.extend_from_slice(&r.stride.to_le_bytes());
        self.at(r.status);
        self
    }

    /// Makes `n` heads available (1 to 128, or a multiple of 256 up to 32768): `first`,
    /// `first + step`...
    pub fn publish(&mut self, n: u32, first: u16, step: u8) -> &mut Self {
        let c = if n <= 128 {
            (n - 1) as u8
        } else {
            0x80 | (n / 256 - 1).min(0x7f) as u8
        };
        self.0.extend_from_slice(&[op::PUBLISH, c]);
        self.0.extend_from_slice(&first.to_le_bytes());
        self.0.push(step);
        self
    }

    /// Writes up to 63 bytes.
    pub fn write(&mut self, a: At, bytes: &[u8]) -> &mut Self {
        self.0.push(op::WRITE);
        self.at(a);
        self.0.push(bytes.len().min(63) as u8);
        self.0.extend_from_slice(&bytes[..bytes.len().min(63)]);
        self
    }

    /// Writes `n` u16 values `value + k * inc` every `stride` bytes.
    pub fn fill(&mut self, a: At, n: u16, stride: u16, value: u16, inc: u16) -> &mut Self {
        self.0.push(op::FILL);
        self.at(a);
        for v in [n, stride, value, inc] {
            self.0.extend_from_slice(&v.to_le_bytes());
        }
        self
    }

    /// A plain operation without arguments ([`op::PROCESS`], [`op::DRAIN`], [`op::RESET`],
    /// [`op::RESTART`]).
    pub fn op(&mut self, code: u8) -> &mut Self {
        self.0.push(code);
        self
    }

    /// Waits up to `ms` (0 to 4) for completions, then processes them.
    pub fn complete(&mut self, ms: u8) -> &mut Self {
        self.0.extend_from_slice(&[op::COMPLETE, ms]);
        self
    }

    /// A polling round, then `rearm` if asked.
    pub fn poll(&mut self, rearm: bool) -> &mut Self {
        self.0.extend_from_slice(&[op::POLL, u8::from(rearm)]);
        self
    }

    /// Unplugs (or plugs back) region `k`, after a drain if asked.
    pub fn memory(&mut self, k: u8, drain: bool) -> &mut Self {
        self.0
            .extend_from_slice(&[op::MEMORY, (k & 3) | if drain { 4 } else { 0 }]);
        self
    }

    /// The input.
    pub fn bytes(&self) -> Vec<u8> {
        self.0.clone()
    }
}

/// The committed seeds of the `blk_engine` target (`backends/fuzz/corpus/blk_engine/`):
/// name and input.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use flags::*;
    let auto = [At::Raw(0); 3];
    // Region 1 follows region 0 without a hole (buffers straddle the two), then holes.
    let regions = [(0, 64), (0, 16), (4, 32), (8, 128)];
    let req = |kind, sector, hdr: u32, data, len, status: u32| Req {
        kind,
        sector,
        hdr: At::In(2, hdr),
        ndata: 1,
        data,
        len,
        stride: 0,
        status: At::In(2, status),
    };
    let mix = |fl| {
        let mut s = Script::new(fl | AUTO_RINGS, 8, 1, &regions, auto);
        s.request(
            0,
            None,
            req(1, 8, 0, At::Aligned(0, 0x1_0000), Len::Sectors(8), 0x100),
        )
        // A read into a buffer that straddles regions 0 and 1.
        .request(
            4,
            None,
            req(0, 8, 0x20, At::In(0, 0x3_f800), Len::Sectors(8), 0x101),
        )
        .request(
            8,
            None,
            req(2, 0, 0x40, At::In(2, 0), Len::Sectors(0), 0x102),
        )
        .request(10, None, req(3, 0, 0x60, At::In(3, 0), Len::Raw(20), 0x103))
        .write(
            At::In(2, 0x200),
            &[16, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0],
        )
        .request(
            13,
            None,
            req(4, 0, 0x80, At::In(2, 0x200), Len::Raw(16), 0x104),
        )
        .request(
            16,
            None,
            req(6, 0, 0xa0, At::In(3, 0), Len::Sectors(1), 0x105),
        );
        for h in [0, 4, 8, 10, 13, 16] {
            s.publish(1, h, 0);
        }
        s.op(op::PROCESS).complete(2).poll(true).op(op::DRAIN);
        s.bytes()
    };
    // Every request re-arms the ring: its data buffers are the available ring and its own
    // header, and the disk holds, per pair of sectors, a ring one entry longer and a header
    // for the next pair (written there by the first request, from a staging area).
    let rearm = |fl| {
        const PAIRS: u16 = 600;
        let rings = [At::In(0, 0), At::In(0, 0x1000), At::In(0, 0x2000)];
        let mut s = Script::new(fl, 4, 2, &[(0, 1024)], rings);
        s.fill(At::In(0, 0x1_0002), PAIRS, 1024, 3, 1)
            .fill(At::In(0, 0x1_0000 + 520), PAIRS, 1024, 2, 2)
            .request(
                8,
                None,
                Req {
                    kind: 1,
                    sector: 0,
                    hdr: At::In(0, 0x3000),
                    ndata: 1,
                    data: At::In(0, 0x1_0000),
                    len: Len::Raw(u32::from(PAIRS) * 1024),
                    stride: 0,
                    status: At::In(0, 0x3100),
                },
            )
            .publish(1, 8, 0)
            .op(op::PROCESS)
            .complete(4)
            .request(
                0,
                None,
                Req {
                    kind: 0,
                    sector: 0,
                    hdr: At::In(0, 0x4000),
                    ndata: 2,
                    data: At::In(0, 0x1000),
                    len: Len::Sectors(1),
                    stride: 0x3000,
                    status: At::In(0, 0x3200),
                },
            )
            .publish(1, 0, 0);
        for _ in 0..3 {
            s.op(op::PROCESS).complete(1);
        }
        s.op(op::DRAIN);
        s.bytes()
    };
    // Misaligned 1 MiB buffers, all aliasing one: requests of 4 MiB (three fit the bounce
    // budget at once), and one of 32 x 512 KiB, more than all of it. With `crash`, the
    // back-end dies with the first ones in flight and the next resumes them.
    let bounce = |fl, crash: bool| {
        let mut s = Script::new(fl | AUTO_RINGS, 6, 3, &[(0, 1024), (1, 512)], auto);
        let big = |sector, kind| Req {
            kind,
            sector,
            hdr: At::In(1, 0x100 + sector / 64),
            ndata: 4,
            data: At::In(0, 0x10_0001),
            len: Len::Raw(1 << 20),
            stride: 0,
            status: At::In(1, 0x10 + sector / 16384),
        };
        let mut head = 0;
        for (sector, kind) in [(0, 0), (16384, 1), (24576, 0), (8192, 1)] {
            s.request(head, None, big(sector, kind));
            head += 12;
        }
        s.request(
            head,
            Some(At::In(1, 0x1000)),
            Req {
                ndata: 32,
                len: Len::Raw(512 << 10),
                ..big(0, 0)
            },
        )
        .publish(5, 0, 12)
        .op(op::PROCESS);
        if crash {
            s.op(op::RESTART);
        }
        // Each drain frees the bounce buffers; the pass after it takes more.
        for _ in 0..5 {
            s.op(op::DRAIN).op(op::PROCESS);
        }
        s.op(op::DRAIN);
        s.bytes()
    };
    // Requests in flight while the region their buffers are in is unplugged, plugged back,
    // a reset, and a buffer in a hole.
    let memory = {
        let mut s = Script::new(IO_URING | DISK_FILE | AUTO_RINGS, 5, 1, &regions, auto);
        for (i, h) in [0u16, 3, 6].into_iter().enumerate() {
            let data = At::Aligned(3, 0x1000 * i as u32);
            s.request(
                h,
                None,
                req(
                    i as u8 % 2,
                    8 * i as u32,
                    0x20 * i as u32,
                    data,
                    Len::Sectors(8),
                    0x40 + i as u32,
                ),
            );
        }
        s.request(
            9,
            None,
            req(
                0,
                0,
                0x80,
                At::Raw(0x4_0000 + 0x1_0000 + 0x10),
                Len::Sectors(1),
                0x50,
            ),
        )
        .publish(4, 0, 3)
        .op(op::PROCESS)
        .memory(3, false)
        .complete(4)
        .memory(3, true)
        .publish(3, 0, 3)
        .op(op::PROCESS)
        .op(op::RESET)
        .request(
            0,
            None,
            req(0, 0, 0, At::In(0, 0x1_0000), Len::Sectors(2), 0x60),
        )
        .publish(1, 0, 0)
        .poll(false)
        .op(op::DRAIN);
        s.bytes()
    };
    // The largest queue, every entry the same head; the budget splits the passes.
    let full_ring = {
        let regions = [(0, 256), (0, 1), (0, 1)];
        let mut s = Script::new(IO_URING | READONLY | AUTO_RINGS, 15, 0, &regions, auto);
        s.request(0, None, req(0, 1, 0, At::In(1, 0), Len::Sectors(1), 0x10))
            .publish(32768, 0, 0);
        for _ in 0..3 {
            s.op(op::PROCESS).complete(0);
        }
        s.op(op::RESTART).op(op::DRAIN);
        s.bytes()
    };
    // Inflight region: requests taken, the back-end dies, the next resumes them.
    let inflight = {
        let mut s = Script::new(
            IO_URING | DIRECT | INFLIGHT | EVENT_IDX | AUTO_RINGS,
            4,
            1,
            &regions,
            auto,
        );
        for h in [0u16, 4, 8] {
            let r = req(
                u8::from(h == 4),
                u32::from(h),
                u32::from(h) * 4,
                At::Aligned(3, u32::from(h) * 0x200),
                Len::Sectors(1),
                0x80 + u32::from(h),
            );
            s.request(h, None, r);
        }
        s.publish(3, 0, 4)
            .op(op::PROCESS)
            .op(op::RESTART)
            .complete(2)
            .op(op::RESTART)
            .op(op::DRAIN);
        s.bytes()
    };
    vec![
        ("mix_io_uring", mix(IO_URING | EVENT_IDX)),
        ("mix_sync_polling", mix(POLLING)),
        ("rearm_sync", rearm(0)),
        ("rearm_io_uring", rearm(IO_URING | DISK_FILE)),
        ("bounce_flood", bounce(IO_URING | DIRECT, false)),
        ("bounce_flood_sync", bounce(DIRECT, false)),
        (
            "bounce_flood_restart",
            bounce(IO_URING | DIRECT | INFLIGHT, true),
        ),
        ("memory_unplug_reset", memory),
        ("full_ring_32768", full_ring),
        ("inflight_restart", inflight),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(name: &str) -> Vec<u8> {
        seeds()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, b)| b)
            .unwrap_or_else(|| panic!("no seed {name}"))
    }

    /// The committed corpus is what [`seeds`] writes (`WRITE_SEEDS=1` rewrites it).
    #[test]
    fn the_committed_seeds_are_current() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/blk_engine");
        let write = std::env::var_os("WRITE_SEEDS").is_some();
        if write {
            std::fs::create_dir_all(&dir).unwrap();
        }
        for (name, bytes) in seeds() {
            let path = dir.join(name);
            if write {
                std::fs::write(&path, &bytes).unwrap();
            }
            let on_disk = std::fs::read(&path).unwrap_or_default();
            assert!(
                on_disk == bytes,
                "{} is stale: run this test with WRITE_SEEDS=1",
                path.display()
            );
        }
    }

    #[test]
    fn the_mix_completes_every_request() {
        for name in ["mix_io_uring", "mix_sync_polling"] {
            let s = fuzz_blk_engine(&seed(name));
            assert_eq!(s.used, 6, "{name}: {s:?}");
            assert!(s.strict, "{name}: {s:?}");
            // Write, read, flush, discard.
            assert_eq!(s.ok_io, 4, "{name}: {s:?}");
            assert_eq!(s.errors, 0, "{name}: {s:?}");
        }
    }

    #[test]
    fn the_rearming_ring_runs_into_the_budget() {
        for name in ["rearm_sync", "rearm_io_uring"] {
            let s = fuzz_blk_engine(&seed(name));
            assert_eq!(s.max_taken, MAX_CHAINS_PER_CALL, "{name}: {s:?}");
            assert!(s.more >= 2, "{name}: {s:?}");
            assert!(!s.strict, "{name}: the ring aliases a data buffer");
            assert!(s.used > 2 * u64::from(MAX_CHAINS_PER_CALL), "{name}: {s:?}");
        }
    }

    #[test]
    fn the_bounce_flood_fills_the_budget() {
        for name in ["bounce_flood", "bounce_flood_sync", "bounce_flood_restart"] {
            let s = fuzz_blk_engine(&seed(name));
            assert_eq!(s.used, 5, "{name}: {s:?}");
            // Resubmitted requests execute (and bounce) again.
            assert!(s.bounced >= 5 && s.ok_io >= 5, "{name}: {s:?}");
            assert_eq!(
                s.resubmitted > 0,
                name.ends_with("restart"),
                "{name}: {s:?}"
            );
            if name != "bounce_flood_sync" {
                assert!(s.bounce_peak > 8 << 20, "{name}: {s:?}");
            }
        }
    }

    #[test]
    fn the_other_seeds_do_what_they_say() {
        let s = fuzz_blk_engine(&seed("full_ring_32768"));
        assert_eq!(s.max_taken, MAX_CHAINS_PER_CALL, "{s:?}");
        assert!(
            s.strict && s.used >= 3 * u64::from(MAX_CHAINS_PER_CALL),
            "{s:?}"
        );
        let s = fuzz_blk_engine(&seed("inflight_restart"));
        assert_eq!(s.used, 3, "{s:?}");
        assert!(s.resubmitted >= 3, "{s:?}");
        let s = fuzz_blk_engine(&seed("memory_unplug_reset"));
        assert!(s.used >= 5 && s.errors == 0, "{s:?}");
    }

    use crate::fuzzing::tests::bytes;

    #[test]
    fn mutated_seeds_keep_the_promises() {
        let seeds = seeds();
        for k in 0..200u64 {
            let (_, s) = &seeds[k as usize % seeds.len()];
            let mut s = s.clone();
            let noise = bytes(k, 8);
            let at = (u64::from(noise[0]) * 7 + k) as usize % s.len().max(1);
            s[at..]
                .iter_mut()
                .zip(&noise[1..])
                .for_each(|(b, n)| *b ^= n);
            fuzz_blk_engine(&s);
        }
        fuzz_blk_engine(&[]);
        fuzz_blk_engine(&[0xff; 64]);
    }

    /// The fuzzer's first find was in the harness: a split header at a raw address near
    /// the top of the address space overflowed `hdr + 8`.
    #[test]
    fn a_split_header_at_the_top_of_the_address_space() {
        let mut s = Script::new(flags::AUTO_RINGS, 2, 0, &[(0, 1)], [At::Raw(0); 3]);
        let r = Req {
            kind: 0x20,
            sector: 0,
            hdr: At::Raw(u64::MAX - 3),
            ndata: 1,
            data: At::In(0, 0x800),
            len: Len::Sectors(1),
            stride: 0,
            status: At::In(0, 0x900),
        };
        s.request(0, None, r).publish(1, 0, 0).op(op::PROCESS);
        let out = fuzz_blk_engine(&s.bytes());
        assert_eq!(out.used, 1, "{out:?}");
    }
}
