//! The virtio-blk request engine for one virtqueue.

use std::io;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use io_uring::{opcode, squeue, types, IoUring};
use log::{debug, warn};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemory};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::disk::{
    advance_iovecs, iovecs_aligned, is_unsupported, read_cached, rw_all, write_zeroes_mode,
    AlignedBuf, BlockBackend, BlockError, EngineKind, DIRECT_MEM_ALIGN, MAX_IOVECS, SECTOR_SIZE,
};
use super::request::{parse, BlkFault, Rejected, ReqOp, Request, BLK_FAULT_KINDS, S_IOERR, S_OK};
use crate::chain::{
    host_iovecs, parse_chain, parse_descs, read_segments, total_len, write_segments, HeadChain,
    Segment,
};
use crate::inflight::QueueInflight;
use crate::ratelimit::GuestErrorLog;
use crate::stats::{Latency, Published, QueueReport};
use crate::{check_queue, finish_batch, QueueError, QueueOutcome};

/// Counters of one queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct BlockStats {
    /// Completed IN requests.
    pub reads: u64,
    /// Completed OUT requests.
    pub writes: u64,
    /// Bytes read for the guest.
    pub bytes_read: u64,
    /// Bytes written for the guest.
    pub bytes_written: u64,
    /// Completed FLUSH requests.
    pub flushes: u64,
    /// Completed DISCARD requests (including the ones the filesystem ignored).
    pub discards: u64,
    /// Completed WRITE_ZEROES requests.
    pub write_zeroes: u64,
    /// Requests answered IOERR or UNSUPP (guest faults and host I/O errors).
    pub errors: u64,
    /// Requests that went through an O_DIRECT bounce buffer.
    pub bounced: u64,
    /// IN requests served on the queue thread straight from the page cache
    /// (`preadv2(RWF_NOWAIT)`), without an io_uring round trip.
    pub cached_reads: u64,
}

/// How many counters [`BlockStats`] has (what a [`BlockCounters`] publishes).
pub const BLOCK_STATS: usize = 10;

/// The live counters of one virtio-blk queue: [`BlockQueue::counters`].
pub type BlockCounters = Published<BLOCK_STATS>;

impl BlockStats {
    fn to_array(self) -> [u64; BLOCK_STATS] {
        [
            self.reads,
            self.writes,
            self.bytes_read,
            self.bytes_written,
            self.flushes,
            self.discards,
            self.write_zeroes,
            self.errors,
            self.bounced,
            self.cached_reads,
        ]
    }

    fn from_array(a: [u64; BLOCK_STATS]) -> Self {
        let [reads, writes, bytes_read, bytes_written, flushes, discards, write_zeroes, errors, bounced, cached_reads] =
            a;
        BlockStats {
            reads,
            writes,
            bytes_read,
            bytes_written,
            flushes,
            discards,
            write_zeroes,
            errors,
            bounced,
            cached_reads,
        }
    }

    /// The published counters of a queue as one JSON-ready report.
    pub fn report(queue: usize, c: &BlockCounters) -> QueueReport<BlockStats> {
        let (values, latency) = c.load();
        QueueReport {
            queue,
            notifications: c.kicks(),
            interrupts: c.interrupts(),
            engine: BlockStats::from_array(values),
            latency_us: latency.summary(),
        }
    }
}

/// A prepared IN/OUT transfer: iovecs into guest memory, or one iovec into a bounce buffer.
#[derive(Debug)]
struct PreparedIo {
    iovecs: Vec<libc::iovec>,
    bounce: Option<AlignedBuf>,
    guest: Vec<Segment>,
    offset: u64,
    len: u64,
    write: bool,
}

// SAFETY: the iovecs point into guest memory kept mapped by the `mem` snapshot of the
// `InFlight` that owns this transfer, or into `bounce`, owned here; neither depends on the
// thread. The kernel (io_uring) and the thread that owns the queue engine are the only ones
// that use them, so the engine may move to the thread that serves the queue.
unsafe impl Send for PreparedIo {}

/// A request submitted to the io_uring, waiting for its completion. `mem` keeps the guest
/// memory snapshot its iovecs point into alive until then.
struct InFlight<T> {
    head: u16,
    /// When the request was taken off the available ring.
    taken: Instant,
    status: GuestAddress,
    op: ReqOp,
    io: Option<PreparedIo>,
    mem: T,
}

struct Uring<T> {
    ring: IoUring,
    eventfd: EventFd,
    slots: Vec<Option<InFlight<T>>>,
    free: Vec<usize>,
    completions: Vec<(u64, i32)>,
}

impl<T> Uring<T> {
    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Submits queued entries; errors other than "busy" are returned.
    fn submit(&self) -> io::Result<()> {
        match self.ring.submit() {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn collect_completions(&mut self) {
        self.completions.clear();
        let cq = self.ring.completion();
        self.completions
            .extend(cq.map(|c| (c.user_data(), c.result())));
    }
}

impl<T> Drop for Uring<T> {
    fn drop(&mut self) {
        // The kernel may still write into buffers owned by in-flight slots: wait for them.
        while self.in_flight() > 0 {
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                warn!("virtio-blk: cannot wait for in-flight I/O at teardown: {e}");
                // Leak the buffers rather than free memory the kernel may still write.
                std::mem::forget(std::mem::take(&mut self.slots));
                return;
            }
            self.collect_completions();
            for i in 0..self.completions.len() {
                let slot = self.completions[i].0 as usize;
                if let Some(s) = self.slots.get_mut(slot) {
                    if s.take().is_some() {
                        self.free.push(slot);
                    }
                }
            }
        }
    }
}

/// The virtio-blk engine of one queue: one per queue thread, no locks on the data path.
///
/// The host calls [`process_queue`](Self::process_queue) when the queue's kick eventfd fires
/// and, with io_uring, [`process_completions`](Self::process_completions) when
/// [`completion_fd`](Self::completion_fd) is readable. Both return a [`QueueOutcome`]: if
/// `notify` is set the host signals the guest. An `Err(QueueError)` means the queue is broken:
/// the host sets DEVICE_NEEDS_RESET.
pub struct BlockQueue<S: GuestAddressSpace> {
    disk: Arc<BlockBackend>,
    mem: S,
    uring: Option<Uring<S::T>>,
    stalled: bool,
    /// The host busy-polls the queue: leave guest notifications disabled after popping.
    polling: bool,
    log: GuestErrorLog<BLK_FAULT_KINDS>,
    stats: BlockStats,
    /// Request latencies, published with `stats` at the end of every call.
    latency: Latency,
    published: Arc<BlockCounters>,
    /// When the request being handled was taken off the available ring.
    taken: Instant,
    /// Try IN requests with `preadv2(RWF_NOWAIT)` before submitting them (io_uring engine,
    /// buffered disk, until the file system says it does not support the flag).
    cached_reads: bool,
    /// The iovecs of the request being tried from the page cache.
    scratch: IovScratch,
    /// The vhost-user inflight record of this queue, when the frontend keeps one.
    inflight: Option<QueueInflight>,
    /// The last pop stopped at [`MAX_CHAINS_PER_CALL`] or [`MAX_SYNC_BYTES_PER_CALL`] with
    /// chains still available.
    budget_spent: bool,
    /// Data bytes of the requests this pop executed on the queue thread.
    sync_bytes: u64,
    /// Bytes of bounce buffers held by requests in io_uring (at most [`BOUNCE_BUDGET`]).
    bounce_in_use: u64,
    /// The most `bounce_in_use` ever was.
    bounce_peak: u64,
    /// The last chain popped needs more bounce memory than is free: it went back to the
    /// ring, and popping waits for completions.
    bounce_wait: bool,
    /// [`BlockQueue::resume_inflight`] is executing requests again: they come from the
    /// inflight record, not from the ring position, so none may go back to the ring.
    resuming: bool,
}

/// The most descriptor chains one call takes from the available ring. A guest can keep its
/// ring full forever (or make each request re-arm the ring through its own data buffers):
/// the host must get back to its event loop (stop, reset, teardown) between batches.
pub const MAX_CHAINS_PER_CALL: u32 = 256;

/// The most data bytes one call moves on the queue thread (the sync engine, reads from the
/// page cache, requests bounced piece by piece): a chain can ask for 256 MiB, so 256 of them
/// would keep the thread away from its event loop for many seconds. A call stops after the
/// request that reaches this, so the wait for the event loop is one request at most.
pub const MAX_SYNC_BYTES_PER_CALL: u64 = 32 << 20;

/// The most bytes of O_DIRECT bounce buffers one queue holds at a time. Misaligned requests
/// (or ones with more segments than an iovec array takes) need one of their full length,
/// up to 256 MiB each, while their descriptors may all alias one small guest buffer: past
/// this, requests wait for in-flight ones to free theirs, and one larger than it all is
/// executed on the queue thread through a [`BOUNCE_CHUNK`] buffer.
pub const BOUNCE_BUDGET: u64 = 16 << 20;
/// The buffer of a request bounced piece by piece.
pub const BOUNCE_CHUNK: usize = 1 << 20;

/// What [`BlockQueue::resume_inflight`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InflightResume {
    /// Requests executed again (taken by an earlier back-end and never completed).
    pub resubmitted: u32,
    /// A completion the earlier back-end published just before it died (not executed again).
    pub finished_last_batch: bool,
    /// The region was new: the ring position the frontend set stands.
    pub fresh: bool,
    /// What the resubmission put in the used ring now (cached reads, refused chains).
    pub outcome: QueueOutcome,
}

/// Scratch iovecs, filled and used within one call on the queue thread.
struct IovScratch(Vec<libc::iovec>);

// SAFETY: the iovecs are raw pointers into guest memory, filled and used within one call of
// the engine on the thread that owns it and never dereferenced afterwards (they are cleared
// before the next use), so the engine may move to the thread that serves the queue.
unsafe impl Send for IovScratch {}

impl<S: GuestAddressSpace> BlockQueue<S> {
    /// Creates the engine of one queue of `queue_size` entries (the size the driver chose).
    /// With the io_uring engine this creates the queue's ring and completion eventfd.
    pub fn new(disk: Arc<BlockBackend>, mem: S, queue_size: u16) -> Result<Self, BlockError> {
        if queue_size == 0 || queue_size > 32768 || !queue_size.is_power_of_two() {
            return Err(BlockError::QueueSize(queue_size));
        }
        let uring = match disk.engine() {
            EngineKind::Sync => None,
            EngineKind::IoUring => {
                let eventfd = EventFd::new(EFD_NONBLOCK).map_err(BlockError::QueueSetup)?;
                let ring = restricted_ring(
                    u32::from(queue_size),
                    Some(disk.fd()),
                    Some(eventfd.as_raw_fd()),
                )
                .map_err(BlockError::QueueSetup)?;
                let n = usize::from(queue_size);
                Some(Uring {
                    ring,
                    eventfd,
                    slots: (0..n).map(|_| None).collect(),
                    free: (0..n).rev().collect(),
                    completions: Vec::with_capacity(n),
                })
            }
        };
        let cached_reads = uring.is_some() && !disk.direct();
        Ok(BlockQueue {
            disk,
            mem,
            uring,
            stalled: false,
            polling: false,
            log: GuestErrorLog::new("virtio-blk"),
            stats: BlockStats::default(),
            latency: Latency::default(),
            published: Arc::default(),
            taken: Instant::now(),
            cached_reads,
            scratch: IovScratch(Vec::with_capacity(8)),
            inflight: None,
            budget_spent: false,
            sync_bytes: 0,
            bounce_in_use: 0,
            bounce_peak: 0,
            bounce_wait: false,
            resuming: false,
        })
    }

    /// The engine this queue uses.
    pub fn engine(&self) -> EngineKind {
        if self.uring.is_some() {
            EngineKind::IoUring
        } else {
            EngineKind::Sync
        }
    }

    /// The eventfd that becomes readable when io_uring completions are ready (io_uring
    /// engine only). The host adds it to its epoll set and calls
    /// [`process_completions`](Self::process_completions); the engine clears it.
    pub fn completion_fd(&self) -> Option<RawFd> {
        self.uring.as_ref().map(|u| u.eventfd.as_raw_fd())
    }

    /// Requests submitted and not completed yet.
    pub fn in_flight(&self) -> usize {
        self.uring.as_ref().map_or(0, Uring::in_flight)
    }

    /// Replaces the guest memory handle (vhost-user SET_MEM_TABLE). In-flight requests keep
    /// the snapshot they were submitted with.
    pub fn set_memory(&mut self, mem: S) {
        self.mem = mem;
    }

    /// Records what this queue takes and completes in `inflight` (vhost-user
    /// INFLIGHT_SHMFD). Call [`resume_inflight`](Self::resume_inflight) before the first
    /// [`process_queue`](Self::process_queue).
    pub fn set_inflight(&mut self, inflight: QueueInflight) {
        self.inflight = Some(inflight);
    }

    /// When the queue starts with an inflight record: executes again, oldest first, every
    /// request an earlier back-end took from this ring and never completed, and continues the
    /// ring after them (available position = used index + their number), so that no request
    /// completes twice and none is lost, whatever order the earlier back-end completed in.
    /// A new record is initialized and the position the frontend set stands.
    pub fn resume_inflight(&mut self, queue: &mut Queue) -> Result<InflightResume, QueueError> {
        let r = self.resume_inflight_calls(queue);
        self.publish();
        r
    }

    fn resume_inflight_calls(&mut self, queue: &mut Queue) -> Result<InflightResume, QueueError> {
        let guard = self.mem.memory();
        let mem: &S::M = &guard;
        check_queue(queue, mem)?;
        let Some(infl) = self.inflight.as_mut() else {
            return Ok(InflightResume {
                fresh: true,
                ..Default::default()
            });
        };
        let used = queue
            .used_idx(mem, Ordering::Acquire)
            .map_err(QueueError::Ring)?
            .0;
        let rec = infl.recover(used);
        let mut out = InflightResume {
            fresh: rec.fresh,
            finished_last_batch: rec.finished_last_batch.is_some(),
            ..Default::default()
        };
        if rec.fresh {
            return Ok(out);
        }
        // Heads beyond the ring the driver set up now cannot have been taken from it.
        let size = queue.size();
        let heads: Vec<u16> = rec.resubmit.into_iter().filter(|&h| h < size).collect();
        let n = u16::try_from(heads.len()).unwrap_or(u16::MAX);
        queue.set_next_used(used);
        queue.set_next_avail(used.wrapping_add(n));
        let max_descs = super::config::MAX_CHAIN_DESCS;
        let table = GuestAddress(queue.desc_table());
        let mut done = 0;
        self.resuming = true;
        for head in heads {
            self.taken = Instant::now();
            if let Some(i) = self.inflight.as_mut() {
                i.taken(head);
            }
            let parsed = parse_descs(head, HeadChain::new(mem, table, size, head), mem, max_descs);
            match self.handle(queue, &guard, parsed) {
                Ok(n) => done += n,
                Err(e) => {
                    self.resuming = false;
                    return Err(e);
                }
            }
            out.resubmitted += 1;
        }
        self.resuming = false;
        self.submit()?;
        out.outcome = finish_batch(queue, mem, done)?;
        Ok(out)
    }

    /// Bytes of O_DIRECT bounce buffers held by requests in flight now.
    pub fn bounce_bytes(&self) -> u64 {
        self.bounce_in_use
    }

    /// The most bytes of bounce buffers this queue ever held at once.
    pub fn bounce_peak(&self) -> u64 {
        self.bounce_peak
    }

    /// Completes a request validated against `mem`, the snapshot of this call.
    fn complete_now<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        head: u16,
        status: GuestAddress,
        code: u8,
        len: u32,
    ) -> Result<(), QueueError> {
        self.latency.record(self.taken.elapsed());
        complete(
            queue,
            self.inflight.as_ref(),
            mem,
            head,
            status,
            code,
            len,
            mem,
        )
    }

    /// Counters.
    pub fn stats(&self) -> BlockStats {
        self.stats
    }

    /// Request latencies.
    pub fn latency(&self) -> Latency {
        self.latency
    }

    /// The live counters this engine publishes at the end of every call, for any thread.
    pub fn counters(&self) -> Arc<BlockCounters> {
        self.published.clone()
    }

    /// Publishes into `counters` from now on, continuing from what they hold (a queue the
    /// driver set up again keeps counting where the previous engine stopped).
    pub fn set_counters(&mut self, counters: Arc<BlockCounters>) {
        let (values, latency) = counters.load();
        self.stats = BlockStats::from_array(values);
        self.latency = latency;
        self.published = counters;
    }

    fn publish(&self) {
        self.published.store(&self.stats.to_array(), &self.latency);
    }

    /// How many guest faults of `kind` were seen.
    pub fn faults(&self, kind: BlkFault) -> u64 {
        self.log.count(kind as usize)
    }

    /// Handles a queue notification: pops every available chain, executes (sync engine) or
    /// submits (io_uring) it, and returns what was put in the used ring.
    pub fn process_queue(&mut self, queue: &mut Queue) -> Result<QueueOutcome, QueueError> {
        let guard = self.mem.memory();
        let mem: &S::M = &guard;
        check_queue(queue, mem)?;
        let used = self.pop_requests(queue, &guard);
        self.publish();
        let used = used?;
        self.submit()?;
        let mut out = finish_batch(queue, mem, used)?;
        out.more = self.budget_spent;
        Ok(out)
    }

    /// Handles the completion eventfd: reaps io_uring completions, writes status bytes, adds
    /// used entries, and resumes popping the queue if it had stopped for lack of slots.
    pub fn process_completions(&mut self, queue: &mut Queue) -> Result<QueueOutcome, QueueError> {
        let r = self.reap(queue, true);
        self.publish();
        r
    }

    /// [`process_completions`](Self::process_completions); `clear_event`: read the
    /// completion eventfd first (not while polling: [`rearm`](Self::rearm) clears it once
    /// before the host sleeps, a system call per completion saved).
    fn reap(&mut self, queue: &mut Queue, clear_event: bool) -> Result<QueueOutcome, QueueError> {
        let guard = self.mem.memory();
        let mem: &S::M = &guard;
        let Some(u) = self.uring.as_mut() else {
            return Ok(QueueOutcome::default());
        };
        // Clear the eventfd before reaping so that a completion arriving now re-arms it.
        if clear_event {
            let _ = u.eventfd.read();
        }
        u.collect_completions();
        let now = Instant::now();
        let mut used = 0;
        for i in 0..u.completions.len() {
            let (user_data, res) = u.completions[i];
            let slot = user_data as usize;
            let Some(inflight) = u.slots.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            u.free.push(slot);
            if let Some(b) = inflight.io.as_ref().and_then(|io| io.bounce.as_ref()) {
                self.bounce_in_use = self.bounce_in_use.saturating_sub(b.capacity() as u64);
            }
            let (code, len) =
                finish_async(&self.disk, &mut self.log, &mut self.stats, &inflight, res);
            self.latency
                .record(now.saturating_duration_since(inflight.taken));
            complete(
                queue,
                self.inflight.as_ref(),
                &*inflight.mem,
                inflight.head,
                inflight.status,
                code,
                len,
                mem,
            )?;
            used += 1;
        }
        let mut more = false;
        if self.stalled && queue.ready() {
            used += self.pop_requests(queue, &guard)?;
            self.submit()?;
            more = self.budget_spent;
        }
        let mut out = finish_batch(queue, mem, used)?;
        out.more = more;
        Ok(out)
    }

    /// Polling mode (see [`crate::poll`]): while on, the engine leaves guest notifications
    /// disabled after emptying the available ring, so the driver skips its doorbell; the
    /// host calls [`rearm`](Self::rearm) before it sleeps. Off (the default): notifications
    /// are re-enabled after every batch.
    pub fn set_polling(&mut self, on: bool) {
        self.polling = on;
    }

    /// One polling round: processes new available chains and ready io_uring completions,
    /// without a system call when there is neither. `Ok(None)`: nothing to do.
    pub fn poll_round(&mut self, queue: &mut Queue) -> Result<Option<QueueOutcome>, QueueError> {
        let r = self.poll_round_calls(queue);
        self.publish();
        r
    }

    fn poll_round_calls(&mut self, queue: &mut Queue) -> Result<Option<QueueOutcome>, QueueError> {
        let pending = {
            let guard = self.mem.memory();
            let mem: &S::M = &guard;
            check_queue(queue, mem)?;
            let avail = queue
                .avail_idx(mem, Ordering::Acquire)
                .map_err(QueueError::Ring)?;
            avail != Wrapping(queue.next_avail())
        };
        let mut out = None::<QueueOutcome>;
        if pending && !self.stalled {
            out = Some(self.process_queue(queue)?);
        }
        let completed = self
            .uring
            .as_mut()
            .is_some_and(|u| !u.ring.completion().is_empty());
        if completed {
            let o = self.reap(queue, false)?;
            out.get_or_insert_with(QueueOutcome::default).merge(o);
        }
        Ok(out)
    }

    /// Re-enables guest notifications and clears the completion eventfd before the host
    /// sleeps. `Ok(true)`: the driver added chains or completions arrived meanwhile; call
    /// [`poll_round`](Self::poll_round) (no doorbell or eventfd may come for them).
    pub fn rearm(&mut self, queue: &mut Queue) -> Result<bool, QueueError> {
        let guard = self.mem.memory();
        let mem: &S::M = &guard;
        check_queue(queue, mem)?;
        let mut more = false;
        if let Some(u) = self.uring.as_mut() {
            let _ = u.eventfd.read();
            more = !u.ring.completion().is_empty();
        }
        let pending = queue.enable_notification(mem).map_err(QueueError::Ring)?;
        Ok(more || pending)
    }

    /// Waits for every in-flight request and completes it (before a queue reset, a memory
    /// change or teardown).
    pub fn drain(&mut self, queue: &mut Queue) -> Result<QueueOutcome, QueueError> {
        let r = self.drain_calls(queue);
        self.publish();
        r
    }

    fn drain_calls(&mut self, queue: &mut Queue) -> Result<QueueOutcome, QueueError> {
        let mut out = QueueOutcome::default();
        while let Some(u) = self.uring.as_ref() {
            if u.in_flight() == 0 {
                break;
            }
            match u.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(QueueError::Io(e)),
            }
            let stalled = std::mem::replace(&mut self.stalled, false);
            out.merge(self.process_completions(queue)?);
            self.stalled = stalled;
        }
        Ok(out)
    }

    fn submit(&mut self) -> Result<(), QueueError> {
        match self.uring.as_ref() {
            Some(u) => u.submit().map_err(QueueError::Io),
            None => Ok(()),
        }
    }

    fn pop_requests(&mut self, queue: &mut Queue, guard: &S::T) -> Result<u32, QueueError> {
        let mem: &S::M = guard;
        // Whatever the queue size: what seg_max allows (a longer chain is refused unwalked).
        let max_descs = super::config::MAX_CHAIN_DESCS;
        let mut used = 0;
        let mut popped = 0;
        let mut descs = 0u64;
        self.budget_spent = false;
        self.sync_bytes = 0;
        self.bounce_wait = false;
        loop {
            queue.disable_notification(mem).map_err(QueueError::Ring)?;
            loop {
                if self.uring.as_ref().is_some_and(|u| u.free.is_empty()) {
                    // Out of slots: completions will resume popping.
                    self.stalled = true;
                    return Ok(used);
                }
                if self.bounce_wait {
                    // Completions free bounce memory and resume popping.
                    self.stalled = true;
                    return Ok(used);
                }
                if popped >= MAX_CHAINS_PER_CALL
                    || self.sync_bytes >= MAX_SYNC_BYTES_PER_CALL
                    || descs >= crate::chain::MAX_DESCS_PER_CALL
                {
                    // Notifications stay off: the host calls again (`more`).
                    self.budget_spent = true;
                    self.stalled = false;
                    return Ok(used);
                }
                let Some(chain) = queue.iter(mem).map_err(QueueError::Ring)?.next() else {
                    break;
                };
                popped += 1;
                self.taken = Instant::now();
                if let Some(i) = self.inflight.as_mut() {
                    i.taken(chain.head_index());
                }
                let parsed = parse_chain(chain, mem, max_descs);
                descs += u64::from(parsed.descs);
                used += self.handle(queue, guard, parsed)?;
            }
            if self.polling {
                break;
            }
            if !queue.enable_notification(mem).map_err(QueueError::Ring)? {
                break;
            }
        }
        self.stalled = false;
        Ok(used)
    }

    /// Handles one chain; returns how many used entries it added now (0 when submitted).
    fn handle(
        &mut self,
        queue: &mut Queue,
        guard: &S::T,
        parsed: crate::chain::ParsedChain,
    ) -> Result<u32, QueueError> {
        let mem: &S::M = guard;
        let req = match parse(parsed, mem, &self.disk) {
            Ok(r) => r,
            Err(rej) => {
                self.reject(queue, mem, rej)?;
                return Ok(1);
            }
        };
        match req.op {
            ReqOp::GetId => {
                let id = self.disk.id();
                let n = match write_segments(mem, &req.data, id) {
                    Ok(n) => n as u32,
                    Err(_) => 0,
                };
                self.complete_now(queue, mem, req.head, req.status, S_OK, n + 1)?;
                Ok(1)
            }
            _ if self.uring.is_some() => {
                let bytes = crate::chain::total_len(&req.data);
                let done = self.submit_async(queue, guard, req)?;
                // Completed at once: executed on this thread (or refused, counted alike).
                if done > 0 {
                    self.sync_bytes = self.sync_bytes.saturating_add(bytes);
                }
                Ok(done)
            }
            _ => {
                self.sync_bytes = self
                    .sync_bytes
                    .saturating_add(crate::chain::total_len(&req.data));
                let (code, len) =
                    execute_sync(&self.disk, &mut self.log, &mut self.stats, mem, &req);
                self.complete_now(queue, mem, req.head, req.status, code, len)?;
                Ok(1)
            }
        }
    }

    fn reject(&mut self, queue: &mut Queue, mem: &S::M, rej: Rejected) -> Result<(), QueueError> {
        self.stats.errors += 1;
        self.log.record(
            rej.fault as usize,
            format_args!("request (head {}) refused: {}", rej.head, rej.detail),
        );
        match rej.status {
            Some(status) => self.complete_now(queue, mem, rej.head, status, rej.code, 1),
            None => add_used(queue, self.inflight.as_ref(), mem, rej.head, 0),
        }
    }

    fn submit_async(
        &mut self,
        queue: &mut Queue,
        guard: &S::T,
        req: Request,
    ) -> Result<u32, QueueError> {
        let mem: &S::M = guard;
        if let ReqOp::In { sector } = req.op {
            if self.cached_reads {
                if let Some(bytes) = self.read_from_cache(mem, &req, sector * SECTOR_SIZE) {
                    let (code, len) = ok_len(&req.op, bytes);
                    self.complete_now(queue, mem, req.head, req.status, code, len)?;
                    return Ok(1);
                }
            }
        }
        let io = match req.op {
            ReqOp::In { sector } | ReqOp::Out { sector } => {
                let write = matches!(req.op, ReqOp::Out { .. });
                let limit = BOUNCE_BUDGET.saturating_sub(self.bounce_in_use);
                match prepare_rw(
                    &self.disk,
                    mem,
                    &req.data,
                    sector * SECTOR_SIZE,
                    write,
                    limit,
                ) {
                    Ok(Prepared::Io(io)) => {
                        if let Some(b) = &io.bounce {
                            self.stats.bounced += 1;
                            self.bounce_in_use += b.capacity() as u64;
                            self.bounce_peak = self.bounce_peak.max(self.bounce_in_use);
                        }
                        Some(io)
                    }
                    Ok(Prepared::NeedsBounce) if self.bounce_in_use > 0 && !self.resuming => {
                        // Wait for in-flight requests to free their bounce buffers. (Not a
                        // request executed again after a restart: it is not at the ring
                        // position, which would then be taken again; the guest may have
                        // made it larger since, so it goes piece by piece below.)
                        queue.go_to_previous_position();
                        self.bounce_wait = true;
                        return Ok(0);
                    }
                    Ok(Prepared::NeedsBounce) => {
                        // Larger than the whole budget (or resubmitted after a restart and
                        // larger than what is left): piece by piece, on this thread.
                        let (code, len) =
                            execute_sync(&self.disk, &mut self.log, &mut self.stats, mem, &req);
                        self.complete_now(queue, mem, req.head, req.status, code, len)?;
                        return Ok(1);
                    }
                    Err(e) => {
                        self.stats.errors += 1;
                        self.log.record(
                            BlkFault::GuestMemory as usize,
                            format_args!("request (head {}): guest memory: {e}", req.head),
                        );
                        self.complete_now(queue, mem, req.head, req.status, S_IOERR, 1)?;
                        return Ok(1);
                    }
                }
            }
            _ => None,
        };
        // The image is the ring's only registered file (`restricted_ring`).
        let fd = types::Fixed(IMAGE_FILE_INDEX);
        let Some(u) = self.uring.as_mut() else {
            return Ok(0);
        };
        let Some(slot) = u.free.pop() else {
            return Ok(0);
        };
        let entry = match (&req.op, &io) {
            (ReqOp::In { .. }, Some(io)) => {
                opcode::Readv::new(fd, io.iovecs.as_ptr(), io.iovecs.len() as u32)
                    .offset(io.offset)
                    .build()
            }
            (ReqOp::Out { .. }, Some(io)) => {
                opcode::Writev::new(fd, io.iovecs.as_ptr(), io.iovecs.len() as u32)
                    .offset(io.offset)
                    .build()
            }
            (ReqOp::Discard { sector, sectors }, _) => {
                opcode::Fallocate::new(fd, u64::from(*sectors) * SECTOR_SIZE)
                    .offset(sector * SECTOR_SIZE)
                    .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                    .build()
            }
            (
                ReqOp::WriteZeroes {
                    sector,
                    sectors,
                    unmap,
                },
                _,
            ) => opcode::Fallocate::new(fd, u64::from(*sectors) * SECTOR_SIZE)
                .offset(sector * SECTOR_SIZE)
                .mode(write_zeroes_mode(*unmap))
                .build(),
            _ => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
        .user_data(slot as u64);
        u.slots[slot] = Some(InFlight {
            head: req.head,
            taken: self.taken,
            status: req.status,
            op: req.op,
            io,
            mem: guard.clone(),
        });
        let mut pushed = push(&mut u.ring, &entry);
        if !pushed {
            // The submission queue is full: flush it to the kernel and retry once.
            u.submit().map_err(QueueError::Io)?;
            pushed = push(&mut u.ring, &entry);
        }
        if pushed {
            return Ok(0);
        }
        // Still no room: execute synchronously.
        let Some(inflight) = u.slots[slot].take() else {
            return Ok(0);
        };
        u.free.push(slot);
        if let Some(b) = inflight.io.as_ref().and_then(|io| io.bounce.as_ref()) {
            self.bounce_in_use = self.bounce_in_use.saturating_sub(b.capacity() as u64);
        }
        let retry = Request {
            head: inflight.head,
            status: inflight.status,
            op: inflight.op,
            data: req.data,
        };
        drop(inflight);
        let (code, len) = execute_sync(&self.disk, &mut self.log, &mut self.stats, mem, &retry);
        self.complete_now(queue, mem, retry.head, retry.status, code, len)?;
        Ok(1)
    }
}

impl<S: GuestAddressSpace> BlockQueue<S> {
    /// Serves an IN request from the page cache on this thread if all of it is cached:
    /// `preadv2(RWF_NOWAIT)` costs about as much as preparing an io_uring entry, and saves
    /// the submission, the completion and a wake-up. `Some(bytes)`: done. `None`: not (all)
    /// cached, or the request does not qualify (too many segments): the caller submits it,
    /// and the io_uring read overwrites whatever part this one copied.
    fn read_from_cache(&mut self, mem: &S::M, req: &Request, offset: u64) -> Option<u64> {
        let len = total_len(&req.data);
        let iovecs = &mut self.scratch.0;
        iovecs.clear();
        if host_iovecs(mem, &req.data, true, iovecs).is_err() || iovecs.len() > MAX_IOVECS {
            // Guest memory errors are reported by the submission path.
            iovecs.clear();
            return None;
        }
        let r = read_cached(self.disk.fd(), iovecs, offset);
        iovecs.clear();
        match r {
            Ok(n) if n as u64 == len => {
                self.stats.cached_reads += 1;
                account(&mut self.stats, &req.op, len);
                Some(len)
            }
            Ok(_) => None,
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
                ) =>
            {
                debug!(
                    "virtio-blk: {}: reads from the page cache without io_uring are not \
                     supported here ({e}); every read goes through io_uring",
                    self.disk.path().display()
                );
                self.cached_reads = false;
                None
            }
            Err(_) => None,
        }
    }
}

/// The io_uring operations the engine submits, and the only ones its rings accept.
pub(crate) const RING_OPS: [u8; 4] = [
    opcode::Readv::CODE,
    opcode::Writev::CODE,
    opcode::Fsync::CODE,
    opcode::Fallocate::CODE,
];

/// Index of the image in a ring's registered files.
const IMAGE_FILE_INDEX: u32 = 0;

/// A ring confined to what the engine does, so that a compromised queue thread cannot use
/// it to reach past its seccomp filter (io_uring operations are not syscalls, and seccomp
/// never sees them): created disabled (IORING_SETUP_R_DISABLED); `image` registered as its
/// only file and `eventfd` as its completion eventfd; then restricted
/// (IORING_REGISTER_RESTRICTIONS) to the opcodes in [`RING_OPS`], with IOSQE_FIXED_FILE
/// required on every entry (so an entry can only name a registered file: the image) and
/// no other entry flag, and no io_uring_register operation at all once enabled; then
/// enabled. An entry outside the restrictions completes with -EACCES.
pub(crate) fn restricted_ring(
    entries: u32,
    image: Option<RawFd>,
    eventfd: Option<RawFd>,
) -> io::Result<IoUring> {
    use io_uring::register::Restriction;
    let ring = IoUring::builder().setup_r_disabled().build(entries)?;
    let sub = ring.submitter();
    if let Some(fd) = image {
        sub.register_files(&[fd])?;
    }
    if let Some(fd) = eventfd {
        sub.register_eventfd(fd)?;
    }
    let fixed = squeue::Flags::FIXED_FILE.bits();
    let mut rules: Vec<Restriction> = RING_OPS.iter().map(|&op| Restriction::sqe_op(op)).collect();
    rules.push(Restriction::sqe_flags_allowed(fixed));
    rules.push(Restriction::sqe_flags_required(fixed));
    sub.register_restrictions(&mut rules)?;
    sub.register_enable_rings()?;
    Ok(ring)
}

fn push(ring: &mut IoUring, entry: &squeue::Entry) -> bool {
    // SAFETY: the buffers the entry points to (the iovec array and the memory it describes:
    // guest memory held alive by the slot's snapshot, or the slot's bounce buffer) are owned
    // by the slot indexed by the entry's user_data, which is freed only after its completion
    // is reaped (or after the ring is drained in `Drop`).
    unsafe { ring.submission().push(entry).is_ok() }
}

/// Writes the status byte (through `status_mem`, the snapshot the request was validated
/// against) and adds the used entry (through `mem`, the current one).
#[allow(clippy::too_many_arguments)]
fn complete<M: GuestMemory, N: GuestMemory>(
    queue: &mut Queue,
    infl: Option<&QueueInflight>,
    status_mem: &N,
    head: u16,
    status: GuestAddress,
    code: u8,
    len: u32,
    mem: &M,
) -> Result<(), QueueError> {
    let len = match status_mem.write_obj(code, status) {
        Ok(()) => len,
        Err(_) => 0,
    };
    add_used(queue, infl, mem, head, len)
}

/// Publishes `head`'s used element, recording it in the inflight region around it (see
/// [`crate::inflight`]: a crash in between leaves the region's used index behind the ring's).
fn add_used<M: GuestMemory>(
    queue: &mut Queue,
    infl: Option<&QueueInflight>,
    mem: &M,
    head: u16,
    len: u32,
) -> Result<(), QueueError> {
    if let Some(i) = infl {
        i.completing(head);
    }
    queue.add_used(mem, head, len).map_err(QueueError::Ring)?;
    if let Some(i) = infl {
        i.completed(head, queue.next_used());
    }
    Ok(())
}

/// A transfer ready to go, or one that needs a bounce buffer larger than allowed.
enum Prepared {
    Io(PreparedIo),
    NeedsBounce,
}

/// Prepares an IN/OUT transfer; a bounce buffer of more than `bounce_limit` bytes is not
/// allocated (`NeedsBounce`).
fn prepare_rw<M: GuestMemory>(
    disk: &BlockBackend,
    mem: &M,
    data: &[Segment],
    offset: u64,
    write: bool,
    bounce_limit: u64,
) -> Result<Prepared, vm_memory::GuestMemoryError> {
    let len = total_len(data);
    let mut iovecs = Vec::with_capacity(data.len().min(MAX_IOVECS + 1));
    host_iovecs(mem, data, !write, &mut iovecs)?;
    let mut bounce = None;
    if iovecs.len() > MAX_IOVECS || (disk.direct() && !iovecs_aligned(&iovecs)) {
        if len.saturating_add(DIRECT_MEM_ALIGN as u64) > bounce_limit {
            return Ok(Prepared::NeedsBounce);
        }
        let mut buf = AlignedBuf::new(len as usize);
        if write {
            read_segments(mem, data, buf.as_mut_slice())?;
        }
        iovecs = vec![buf.iovec(len as usize)];
        bounce = Some(buf);
    }
    // Only a bounced read copies back to the guest segments afterwards.
    let guest = if bounce.is_some() && !write {
        data.to_vec()
    } else {
        Vec::new()
    };
    Ok(Prepared::Io(PreparedIo {
        iovecs,
        bounce,
        guest,
        offset,
        len,
        write,
    }))
}

/// An IN/OUT transfer through one [`BOUNCE_CHUNK`] buffer, piece by piece (a request too
/// large to bounce at once). Returns the bytes transferred.
fn rw_chunked<M: GuestMemory>(
    disk: &BlockBackend,
    mem: &M,
    data: &[Segment],
    offset: u64,
    write: bool,
) -> io::Result<u64> {
    let len = total_len(data);
    let mut buf = AlignedBuf::new(BOUNCE_CHUNK.min(len as usize));
    let mut rest = data.to_vec();
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(BOUNCE_CHUNK as u64);
        let (front, back) = crate::chain::split_at(&rest, n);
        let mut iov = [buf.iovec(n as usize)];
        let at = offset + done;
        if write {
            read_segments(mem, &front, &mut buf.as_mut_slice()[..n as usize])
                .map_err(io::Error::other)?;
            rw_all(disk.fd(), &mut iov, at, true)?;
        } else {
            rw_all(disk.fd(), &mut iov, at, false)?;
            write_segments(mem, &front, &buf.as_slice()[..n as usize]).map_err(io::Error::other)?;
        }
        rest = back;
        done += n;
    }
    Ok(len)
}

/// After a successful read into a bounce buffer: copy it to the guest.
fn finish_rw<M: GuestMemory + ?Sized>(
    mem: &M,
    io: &PreparedIo,
) -> Result<(), vm_memory::GuestMemoryError> {
    if let (Some(buf), false) = (&io.bounce, io.write) {
        write_segments(mem, &io.guest, buf.as_slice())?;
    }
    Ok(())
}

fn host_error(
    log: &mut GuestErrorLog<BLK_FAULT_KINDS>,
    stats: &mut BlockStats,
    head: u16,
    what: &str,
    e: &io::Error,
) -> (u8, u32) {
    stats.errors += 1;
    log.record(
        BlkFault::HostIo as usize,
        format_args!("request (head {head}): {what} failed: {e}"),
    );
    (S_IOERR, 1)
}

fn account(stats: &mut BlockStats, op: &ReqOp, bytes: u64) {
    match op {
        ReqOp::In { .. } => {
            stats.reads += 1;
            stats.bytes_read += bytes;
        }
        ReqOp::Out { .. } => {
            stats.writes += 1;
            stats.bytes_written += bytes;
        }
        ReqOp::Flush => stats.flushes += 1,
        ReqOp::Discard { .. } => stats.discards += 1,
        ReqOp::WriteZeroes { .. } => stats.write_zeroes += 1,
        ReqOp::GetId => {}
    }
}

/// Status and used length of a successful request.
fn ok_len(op: &ReqOp, bytes: u64) -> (u8, u32) {
    match op {
        ReqOp::In { .. } => (S_OK, (bytes as u32).saturating_add(1)),
        _ => (S_OK, 1),
    }
}

fn execute_sync<M: GuestMemory>(
    disk: &BlockBackend,
    log: &mut GuestErrorLog<BLK_FAULT_KINDS>,
    stats: &mut BlockStats,
    mem: &M,
    req: &Request,
) -> (u8, u32) {
    let fd = disk.fd();
    let res = match req.op {
        ReqOp::In { sector } | ReqOp::Out { sector } => {
            let write = matches!(req.op, ReqOp::Out { .. });
            let offset = sector * SECTOR_SIZE;
            match prepare_rw(disk, mem, &req.data, offset, write, BOUNCE_CHUNK as u64) {
                Ok(Prepared::Io(mut io)) => {
                    if io.bounce.is_some() {
                        stats.bounced += 1;
                    }
                    let len = io.len;
                    rw_all(fd, &mut io.iovecs, io.offset, write)
                        .and_then(|()| finish_rw(mem, &io).map_err(io::Error::other))
                        .map(|()| len)
                }
                Ok(Prepared::NeedsBounce) => {
                    stats.bounced += 1;
                    rw_chunked(disk, mem, &req.data, offset, write)
                }
                Err(e) => {
                    stats.errors += 1;
                    log.record(
                        BlkFault::GuestMemory as usize,
                        format_args!("request (head {}): guest memory: {e}", req.head),
                    );
                    return (S_IOERR, 1);
                }
            }
        }
        ReqOp::Flush => disk.flush().map(|()| 0),
        ReqOp::Discard { sector, sectors } => disk
            .discard(sector * SECTOR_SIZE, u64::from(sectors) * SECTOR_SIZE)
            .map(|_| 0),
        ReqOp::WriteZeroes {
            sector,
            sectors,
            unmap,
        } => disk
            .write_zeroes(
                sector * SECTOR_SIZE,
                u64::from(sectors) * SECTOR_SIZE,
                unmap,
            )
            .map(|()| 0),
        ReqOp::GetId => Ok(0),
    };
    match res {
        Ok(bytes) => {
            account(stats, &req.op, bytes);
            ok_len(&req.op, bytes)
        }
        Err(e) => host_error(log, stats, req.head, op_name(&req.op), &e),
    }
}

fn op_name(op: &ReqOp) -> &'static str {
    match op {
        ReqOp::In { .. } => "read",
        ReqOp::Out { .. } => "write",
        ReqOp::Flush => "flush",
        ReqOp::GetId => "get-id",
        ReqOp::Discard { .. } => "discard",
        ReqOp::WriteZeroes { .. } => "write-zeroes",
    }
}

/// Turns an io_uring completion into a status and used length.
fn finish_async<T>(
    disk: &BlockBackend,
    log: &mut GuestErrorLog<BLK_FAULT_KINDS>,
    stats: &mut BlockStats,
    inflight: &InFlight<T>,
    res: i32,
) -> (u8, u32)
where
    T: std::ops::Deref,
    T::Target: GuestMemory,
{
    let mem = &*inflight.mem;
    let err = |r: i32| io::Error::from_raw_os_error(-r);
    let res: io::Result<u64> = match (&inflight.op, &inflight.io) {
        (ReqOp::In { .. } | ReqOp::Out { .. }, Some(io)) => {
            if res < 0 {
                Err(err(res))
            } else {
                let done = res as u64;
                let rest = if done < io.len {
                    // Short transfer: finish the remainder synchronously.
                    let mut iovecs = io.iovecs.clone();
                    let start = advance_iovecs(&mut iovecs, done as usize);
                    rw_all(disk.fd(), &mut iovecs[start..], io.offset + done, io.write)
                } else {
                    Ok(())
                };
                rest.and_then(|()| finish_rw(mem, io).map_err(io::Error::other))
                    .map(|()| io.len)
            }
        }
        (ReqOp::Discard { .. }, _) => {
            if res < 0 && !is_unsupported(&err(res)) {
                Err(err(res))
            } else {
                Ok(0)
            }
        }
        (
            ReqOp::WriteZeroes {
                sector, sectors, ..
            },
            _,
        ) => {
            if res < 0 {
                let e = err(res);
                if is_unsupported(&e) {
                    disk.write_zeroes_by_writing(
                        sector * SECTOR_SIZE,
                        u64::from(*sectors) * SECTOR_SIZE,
                    )
                    .map(|()| 0)
                } else {
                    Err(e)
                }
            } else {
                Ok(0)
            }
        }
        _ => {
            if res < 0 {
                Err(err(res))
            } else {
                Ok(0)
            }
        }
    };
    match res {
        Ok(bytes) => {
            account(stats, &inflight.op, bytes);
            ok_len(&inflight.op, bytes)
        }
        Err(e) => host_error(log, stats, inflight.head, op_name(&inflight.op), &e),
    }
}
