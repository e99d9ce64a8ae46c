//! The virtio-net engine of one queue pair: TX (guest -> tap) and RX (tap -> guest).

use std::io;
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemory};

use super::{MAX_FRAME_LEN, VNET_HDR_LEN};
use crate::chain::{host_iovecs, parse_chain, total_len, write_segments, ParsedChain, Segment};
use crate::ratelimit::GuestErrorLog;
use crate::stats::{Latency, Published, QueueReport};
use crate::{check_queue, finish_batch, QueueError, QueueOutcome};

/// Frames handled per `process_rx` call before yielding to the host's event loop.
pub const RX_BUDGET: u32 = 256;

/// The longest RX or TX descriptor chain accepted (QEMU's limit too): Linux builds chains
/// of a few descriptors (at most MAX_SKB_FRAGS + 2). A longer one is dropped unwalked past
/// this, whatever the queue size, so that one chain costs a bounded walk.
pub const MAX_CHAIN_DESCS: usize = 1024;

/// The most RX chains one frame is spread over with MRG_RXBUF (QEMU's limit too): a 64 KiB
/// frame in page-sized buffers takes 17; a guest posting one-byte buffers gets the frame
/// dropped instead of a walk of the whole ring per frame.
pub const MAX_RX_CHAINS_PER_FRAME: usize = 1024;
/// The most TX chains one [`NetQueuePair::process_tx`] call sends: a guest can keep its TX
/// ring full for ever, and the host must get back to its other events (RX, stop, reset).
pub const TX_BUDGET: u32 = 256;

/// Kinds of dropped chains and frames (indexes into the rate-limited log).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum NetFault {
    /// Malformed descriptor chain (loop, too long, outside memory).
    Chain = 0,
    /// A TX chain with device-writable buffers, or an RX chain with device-readable ones.
    WrongDirection,
    /// A TX chain shorter than the virtio-net header.
    HeaderTooShort,
    /// A TX frame larger than [`MAX_FRAME_LEN`], or one with too many segments.
    TxTooBig,
    /// Writing to the tap failed (not EAGAIN): the frame was dropped.
    TapWrite,
    /// Reading from the tap failed (not EAGAIN).
    TapRead,
    /// A frame from the tap larger than the guest's buffers (no MRG_RXBUF): dropped.
    RxTooBig,
    /// A frame from the tap shorter than the vnet header: dropped.
    RxRunt,
}

/// Number of [`NetFault`] kinds.
pub const NET_FAULT_KINDS: usize = 8;

/// Counters of one queue pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames written to the tap.
    pub tx_frames: u64,
    /// Bytes written to the tap (vnet headers included).
    pub tx_bytes: u64,
    /// TX chains dropped (returned with len 0).
    pub tx_dropped: u64,
    /// Times TX stopped because the tap would block.
    pub tx_tap_full: u64,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Bytes delivered (vnet headers included).
    pub rx_bytes: u64,
    /// Frames read from the tap and dropped.
    pub rx_dropped: u64,
    /// Times RX stopped for lack of guest buffers.
    pub rx_no_buffers: u64,
}

/// The counters of a TX queue as published.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TxStats {
    /// Frames written to the tap.
    pub frames: u64,
    /// Bytes written to the tap (vnet headers included).
    pub bytes: u64,
    /// Chains dropped (malformed, or the tap refused them).
    pub dropped: u64,
    /// Times TX stopped because the tap would block.
    pub tap_full: u64,
}

/// The counters of an RX queue as published.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RxStats {
    /// Frames delivered to the guest.
    pub frames: u64,
    /// Bytes delivered (vnet headers included).
    pub bytes: u64,
    /// Frames read from the tap and dropped.
    pub dropped: u64,
    /// Times RX stopped for lack of guest buffers.
    pub no_buffers: u64,
}

/// The live counters of one virtio-net queue pair ([`NetQueuePair::counters`]): RX (queue
/// 2k) and TX (queue 2k+1), each with the host's notification and interrupt counts; the TX
/// latency histogram times a frame from taking its chain to posting it used (RX buffers wait
/// for frames, so RX has none).
#[derive(Debug, Default)]
pub struct NetCounters {
    /// The RX queue.
    pub rx: Arc<Published<4>>,
    /// The TX queue.
    pub tx: Arc<Published<4>>,
}

impl NetCounters {
    /// The RX queue's report, as queue `queue` of the device.
    pub fn rx_report(&self, queue: usize) -> QueueReport<RxStats> {
        let (v, latency) = self.rx.load();
        QueueReport {
            queue,
            notifications: self.rx.kicks(),
            interrupts: self.rx.interrupts(),
            engine: RxStats {
                frames: v[0],
                bytes: v[1],
                dropped: v[2],
                no_buffers: v[3],
            },
            latency_us: latency.summary(),
        }
    }

    /// The TX queue's report, as queue `queue` of the device.
    pub fn tx_report(&self, queue: usize) -> QueueReport<TxStats> {
        let (v, latency) = self.tx.load();
        QueueReport {
            queue,
            notifications: self.tx.kicks(),
            interrupts: self.tx.interrupts(),
            engine: TxStats {
                frames: v[0],
                bytes: v[1],
                dropped: v[2],
                tap_full: v[3],
            },
            latency_us: latency.summary(),
        }
    }
}

/// Result of [`NetQueuePair::process_tx`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxOutcome {
    /// Used entries and whether to signal the guest for the TX queue.
    pub queue: QueueOutcome,
    /// The tap would block: wait for it to become writable (EPOLLOUT), then call again.
    pub tap_full: bool,
}

/// Why [`NetQueuePair::process_rx`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxWait {
    /// The tap has no more frames: wait for it to become readable.
    TapEmpty,
    /// A frame is waiting for guest buffers: wait for the RX queue kick (and stop polling the
    /// tap for input meanwhile).
    GuestBuffers,
    /// The per-call budget ran out; more frames may be ready: call again soon.
    Budget,
}

/// Result of [`NetQueuePair::process_rx`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxOutcome {
    /// Used entries and whether to signal the guest for the RX queue.
    pub queue: QueueOutcome,
    /// Frames delivered by this call.
    pub frames: u32,
    /// What to wait for next.
    pub wait: RxWait,
}

/// The virtio-net engine of one queue pair, between guest memory and a tap-like fd.
///
/// `T` is anything with an fd that keeps frame boundaries on `read`/`writev` and carries the
/// 12-byte vnet header in front of each frame: a [`super::Tap`], or in tests one end of a
/// `socketpair(AF_UNIX, SOCK_SEQPACKET)`. The fd should be non-blocking.
pub struct NetQueuePair<S: GuestAddressSpace, T: AsRawFd> {
    tap: T,
    mem: S,
    mrg_rxbuf: bool,
    rx_buf: Vec<u8>,
    rx_pending: Option<usize>,
    /// The host busy-polls the TX queue: leave its notifications disabled after popping.
    polling: bool,
    /// RX notifications are (as far as we know) enabled: the driver kicks when it adds
    /// buffers. Only needed while we are out of them, so they are turned off as soon as a
    /// chain is popped and on again when the ring runs dry (vhost-net's RX pattern).
    rx_notify: bool,
    /// Descriptors read by RX in the current call ([`crate::chain::MAX_DESCS_PER_CALL`]).
    rx_descs: u64,
    /// That budget stopped the current call between frames.
    rx_descs_spent: bool,
    iovecs: IoVecScratch,
    log: GuestErrorLog<NET_FAULT_KINDS>,
    stats: NetStats,
    tx_latency: Latency,
    published: Arc<NetCounters>,
}

/// Scratch space for the iovecs of one TX frame, kept to avoid an allocation per frame.
#[derive(Default)]
struct IoVecScratch(Vec<libc::iovec>);

// SAFETY: the raw pointers in the vector are only dereferenced (by writev) during the call
// that filled them from a borrowed guest memory; every use clears the vector first. Moving
// the scratch to another thread between calls is therefore as safe as moving a Vec of
// integers: no pointer in it is ever used again.
unsafe impl Send for IoVecScratch {}

enum Delivery {
    Delivered(u32),
    /// The frame was dropped; `used` chains were returned with len 0.
    Dropped(u32),
    /// No (more) guest buffers; the frame stays pending. `used` bad chains were returned.
    NoBuffers(u32),
}

impl<S: GuestAddressSpace, T: AsRawFd> NetQueuePair<S, T> {
    /// Creates the engine; `acked_features` are the negotiated features (MRG_RXBUF matters).
    pub fn new(tap: T, mem: S, acked_features: u64) -> Self {
        NetQueuePair {
            tap,
            mem,
            mrg_rxbuf: acked_features & (1u64 << VIRTIO_NET_F_MRG_RXBUF) != 0,
            rx_buf: vec![0u8; MAX_FRAME_LEN],
            rx_pending: None,
            polling: false,
            rx_notify: true,
            rx_descs: 0,
            rx_descs_spent: false,
            iovecs: IoVecScratch::default(),
            log: GuestErrorLog::new("virtio-net"),
            stats: NetStats::default(),
            tx_latency: Latency::default(),
            published: Arc::default(),
        }
    }

    /// The tap.
    pub fn tap(&self) -> &T {
        &self.tap
    }

    /// Replaces the guest memory handle (vhost-user SET_MEM_TABLE).
    pub fn set_memory(&mut self, mem: S) {
        self.mem = mem;
    }

    /// Counters.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// The live counters this engine publishes at the end of every call, for any thread.
    pub fn counters(&self) -> Arc<NetCounters> {
        self.published.clone()
    }

    /// Publishes into `counters` from now on, continuing from what they hold (a queue pair
    /// the driver set up again keeps counting where the previous engine stopped).
    pub fn set_counters(&mut self, counters: Arc<NetCounters>) {
        let (rx, _) = counters.rx.load();
        let (tx, tx_latency) = counters.tx.load();
        let s = &mut self.stats;
        [s.rx_frames, s.rx_bytes, s.rx_dropped, s.rx_no_buffers] = rx;
        [s.tx_frames, s.tx_bytes, s.tx_dropped, s.tx_tap_full] = tx;
        self.tx_latency = tx_latency;
        self.published = counters;
    }

    fn publish_tx(&self) {
        let s = &self.stats;
        self.published.tx.store(
            &[s.tx_frames, s.tx_bytes, s.tx_dropped, s.tx_tap_full],
            &self.tx_latency,
        );
    }

    fn publish_rx(&self) {
        let s = &self.stats;
        self.published.rx.store(
            &[s.rx_frames, s.rx_bytes, s.rx_dropped, s.rx_no_buffers],
            &Latency::default(),
        );
    }

    /// How many faults of `kind` were seen.
    pub fn faults(&self, kind: NetFault) -> u64 {
        self.log.count(kind as usize)
    }

    /// Whether a frame read from the tap waits for guest buffers.
    pub fn rx_pending(&self) -> bool {
        self.rx_pending.is_some()
    }

    /// Polling mode (see [`crate::poll`]): while on, [`process_tx`](Self::process_tx) leaves
    /// the TX queue's notifications disabled after emptying it, so the driver skips its
    /// doorbell; the host calls [`rearm_tx`](Self::rearm_tx) before it sleeps.
    pub fn set_polling(&mut self, on: bool) {
        self.polling = on;
    }

    /// Whether the TX queue has chains the device has not popped (no system call).
    pub fn tx_pending(&self, queue: &Queue) -> Result<bool, QueueError> {
        let guard = self.mem.memory();
        let mem: &S::M = &guard;
        check_queue(queue, mem)?;
        let avail = queue
            .avail_idx(mem, Ordering::Acquire)
            .map_err(QueueError::Ring)?;
        Ok(avail != Wrapping(queue.next_avail()))
    }

    /// Re-enables TX notifications before the host sleeps. `Ok(true)`: the driver added
    /// chains meanwhile; process them (a doorbell may not come).
    pub fn rearm_tx(&mut self, queue: &mut Queue) -> Result<bool, QueueError> {
        let guard = self.mem.memory();
        let mem: &S::M = &guard;
        check_queue(queue, mem)?;
        queue.enable_notification(mem).map_err(QueueError::Ring)
    }

    /// Sends every available TX chain to the tap. Call on a TX kick, and when the tap becomes
    /// writable after an outcome with `tap_full`.
    pub fn process_tx(&mut self, queue: &mut Queue) -> Result<TxOutcome, QueueError> {
        let r = self.tx_calls(queue);
        self.publish_tx();
        r
    }

    fn tx_calls(&mut self, queue: &mut Queue) -> Result<TxOutcome, QueueError> {
        let guard = self.mem.memory();
        let mem: &S::M = &guard;
        check_queue(queue, mem)?;
        let max_descs = usize::from(queue.size()).min(MAX_CHAIN_DESCS);
        let mut used = 0;
        let mut descs = 0u64;
        let mut tap_full = false;
        let mut more = false;
        'outer: loop {
            queue.disable_notification(mem).map_err(QueueError::Ring)?;
            loop {
                if used >= TX_BUDGET || descs >= crate::chain::MAX_DESCS_PER_CALL {
                    // Notifications stay off: the host calls again (`more`).
                    more = true;
                    break 'outer;
                }
                let Some(chain) = queue.iter(mem).map_err(QueueError::Ring)?.next() else {
                    break;
                };
                let taken = Instant::now();
                let parsed = parse_chain(chain, mem, max_descs);
                descs += u64::from(parsed.descs);
                let head = parsed.head;
                match self.tx_one(mem, &parsed) {
                    Ok(()) => {}
                    Err(None) => {
                        // EAGAIN: put the chain back and wait for the tap.
                        queue.go_to_previous_position();
                        self.stats.tx_tap_full += 1;
                        tap_full = true;
                        break 'outer;
                    }
                    Err(Some(_)) => self.stats.tx_dropped += 1,
                }
                queue.add_used(mem, head, 0).map_err(QueueError::Ring)?;
                self.tx_latency.record(taken.elapsed());
                used += 1;
            }
            if self.polling {
                break;
            }
            if !queue.enable_notification(mem).map_err(QueueError::Ring)? {
                break;
            }
        }
        let mut out = finish_batch(queue, mem, used)?;
        out.more = more;
        Ok(TxOutcome {
            queue: out,
            tap_full,
        })
    }

    /// Writes one TX chain to the tap. `Err(None)`: the tap would block; `Err(Some(kind))`:
    /// the chain is dropped.
    fn tx_one<M: GuestMemory>(
        &mut self,
        mem: &M,
        parsed: &ParsedChain,
    ) -> Result<(), Option<NetFault>> {
        let head = parsed.head;
        if let Some(fault) = parsed.fault {
            return Err(Some(self.fault(NetFault::Chain, head, &fault.to_string())));
        }
        if !parsed.writable.is_empty() {
            return Err(Some(self.fault(
                NetFault::WrongDirection,
                head,
                "TX chain with device-writable buffers",
            )));
        }
        let len = parsed.readable_len();
        if len < VNET_HDR_LEN as u64 {
            return Err(Some(self.fault(
                NetFault::HeaderTooShort,
                head,
                &format!("TX chain of {len} bytes, shorter than the vnet header"),
            )));
        }
        if len > MAX_FRAME_LEN as u64 {
            return Err(Some(self.fault(
                NetFault::TxTooBig,
                head,
                &format!("TX frame of {len} bytes"),
            )));
        }
        self.iovecs.0.clear();
        if host_iovecs(mem, &parsed.readable, false, &mut self.iovecs.0).is_err()
            || self.iovecs.0.len() > crate::block::MAX_IOVECS
        {
            return Err(Some(self.fault(
                NetFault::TxTooBig,
                head,
                "TX chain with too many segments",
            )));
        }
        loop {
            // SAFETY: the iovecs describe guest memory validated for reading by
            // `host_iovecs`, alive for the duration of the call (`mem` is borrowed).
            let r = unsafe {
                libc::writev(
                    self.tap.as_raw_fd(),
                    self.iovecs.0.as_ptr(),
                    self.iovecs.0.len() as i32,
                )
            };
            if r >= 0 {
                self.stats.tx_frames += 1;
                self.stats.tx_bytes += r as u64;
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Err(None),
                _ => {
                    return Err(Some(self.fault(
                        NetFault::TapWrite,
                        head,
                        &format!("tap write: {e}"),
                    )))
                }
            }
        }
    }

    fn fault(&mut self, kind: NetFault, head: u16, what: &str) -> NetFault {
        self.log
            .record(kind as usize, format_args!("chain {head}: {what}"));
        kind
    }

    /// Moves frames from the tap into the guest's RX buffers. Call when the tap is readable
    /// and on an RX kick (new buffers).
    pub fn process_rx(&mut self, queue: &mut Queue) -> Result<RxOutcome, QueueError> {
        let r = self.rx_calls(queue);
        self.publish_rx();
        r
    }

    fn rx_calls(&mut self, queue: &mut Queue) -> Result<RxOutcome, QueueError> {
        let guard = self.mem.memory();
        let mem: &S::M = &guard;
        check_queue(queue, mem)?;
        let mut used = 0;
        let mut frames = 0;
        // Every frame read counts, delivered or dropped: a flood of frames the guest cannot
        // take must not keep this call going either.
        let mut read = 0;
        self.rx_descs = 0;
        self.rx_descs_spent = false;
        let wait = loop {
            if read >= RX_BUDGET {
                break RxWait::Budget;
            }
            let len = match self.rx_pending {
                Some(len) => len,
                None => match self.read_tap() {
                    Some(len) => len,
                    None => break RxWait::TapEmpty,
                },
            };
            read += 1;
            if len < VNET_HDR_LEN {
                self.stats.rx_dropped += 1;
                self.log.record(
                    NetFault::RxRunt as usize,
                    format_args!("tap frame of {len} bytes"),
                );
                self.rx_pending = None;
                continue;
            }
            self.rx_pending = Some(len);
            match self.deliver(queue, mem, len)? {
                Delivery::Delivered(n) => {
                    used += n;
                    frames += 1;
                    self.stats.rx_frames += 1;
                    self.stats.rx_bytes += len as u64;
                    self.rx_pending = None;
                }
                Delivery::Dropped(n) => {
                    used += n;
                    self.stats.rx_dropped += 1;
                    self.rx_pending = None;
                }
                Delivery::NoBuffers(n) if self.rx_descs_spent => {
                    // Not out of buffers: out of this call's descriptor budget (the frame
                    // stays pending).
                    used += n;
                    break RxWait::Budget;
                }
                Delivery::NoBuffers(n) => {
                    used += n;
                    self.stats.rx_no_buffers += 1;
                    break RxWait::GuestBuffers;
                }
            }
        };
        Ok(RxOutcome {
            queue: finish_batch(queue, mem, used)?,
            frames,
            wait,
        })
    }

    /// Reads one frame into `rx_buf`; `None` when the tap is empty (or failing).
    fn read_tap(&mut self) -> Option<usize> {
        loop {
            // SAFETY: reads at most `rx_buf.len()` bytes into our own buffer.
            let r = unsafe {
                libc::read(
                    self.tap.as_raw_fd(),
                    self.rx_buf.as_mut_ptr().cast(),
                    self.rx_buf.len(),
                )
            };
            if r >= 0 {
                return Some(r as usize);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return None,
                _ => {
                    self.log
                        .record(NetFault::TapRead as usize, format_args!("tap read: {e}"));
                    return None;
                }
            }
        }
    }

    /// Pops the next RX chain, returning bad ones to the used ring. `Ok(None)`: no buffers.
    fn pop_rx_chain<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        dropped: &mut u32,
        may_stop: bool,
    ) -> Result<Option<(u16, Vec<Segment>)>, QueueError> {
        let max_descs = usize::from(queue.size()).min(MAX_CHAIN_DESCS);
        loop {
            if may_stop && self.rx_descs >= crate::chain::MAX_DESCS_PER_CALL {
                // Between frames only: a frame half gathered is finished (its chains are
                // bounded by MAX_RX_CHAINS_PER_FRAME), or it would be gathered again and
                // again.
                self.rx_descs_spent = true;
                return Ok(None);
            }
            let next = queue.iter(mem).map_err(QueueError::Ring)?.next();
            let chain = match next {
                Some(c) => c,
                None => {
                    // Re-arm notifications; if the driver added buffers meanwhile, go on.
                    self.rx_notify = true;
                    if queue.enable_notification(mem).map_err(QueueError::Ring)? {
                        continue;
                    }
                    return Ok(None);
                }
            };
            let parsed = parse_chain(chain, mem, max_descs);
            self.rx_descs += u64::from(parsed.descs);
            let head = parsed.head;
            let bad = if let Some(fault) = parsed.fault {
                Some((NetFault::Chain, fault.to_string()))
            } else if !parsed.readable.is_empty() {
                Some((
                    NetFault::WrongDirection,
                    "RX chain with device-readable buffers".to_string(),
                ))
            } else if parsed.writable.is_empty() {
                Some((
                    NetFault::WrongDirection,
                    "RX chain without buffers".to_string(),
                ))
            } else {
                None
            };
            if let Some((kind, what)) = bad {
                self.fault(kind, head, &what);
                queue.add_used(mem, head, 0).map_err(QueueError::Ring)?;
                *dropped += 1;
                continue;
            }
            if self.rx_notify {
                // Buffers are there: the driver need not ring when it adds more.
                queue.disable_notification(mem).map_err(QueueError::Ring)?;
                self.rx_notify = false;
            }
            return Ok(Some((head, parsed.writable)));
        }
    }

    fn deliver<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        len: usize,
    ) -> Result<Delivery, QueueError> {
        let mut dropped = 0;
        if !self.mrg_rxbuf {
            let Some((head, segs)) = self.pop_rx_chain(queue, mem, &mut dropped, true)? else {
                return Ok(Delivery::NoBuffers(dropped));
            };
            if total_len(&segs) < len as u64 {
                // Too big for the guest's buffers: drop the frame, keep the chain.
                queue.go_to_previous_position();
                self.log.record(
                    NetFault::RxTooBig as usize,
                    format_args!(
                        "frame of {len} bytes, guest buffer of {} bytes (no MRG_RXBUF)",
                        total_len(&segs)
                    ),
                );
                return Ok(Delivery::Dropped(dropped));
            }
            self.rx_buf[10..12].copy_from_slice(&1u16.to_le_bytes());
            let written = write_segments(mem, &segs, &self.rx_buf[..len]).unwrap_or(0);
            queue
                .add_used(mem, head, written as u32)
                .map_err(QueueError::Ring)?;
            return Ok(Delivery::Delivered(dropped + 1));
        }

        // MRG_RXBUF: gather chains until the frame fits.
        let mut chains: Vec<(u16, Vec<Segment>)> = Vec::new();
        let mut room = 0u64;
        while room < len as u64 {
            if chains.len() >= MAX_RX_CHAINS_PER_FRAME {
                // The guest's buffers are too small for this frame within the limit: the
                // frame is dropped, the chains go back empty.
                self.log.record(
                    NetFault::RxTooBig as usize,
                    format_args!(
                        "frame of {len} bytes needs more than {MAX_RX_CHAINS_PER_FRAME} \
                         buffers of the guest's (MRG_RXBUF): dropped"
                    ),
                );
                for (h, _) in chains.drain(..) {
                    queue.add_used(mem, h, 0).map_err(QueueError::Ring)?;
                    dropped += 1;
                }
                return Ok(Delivery::Dropped(dropped));
            }
            let popped_bad_before = dropped;
            let may_stop = chains.is_empty();
            match self.pop_rx_chain(queue, mem, &mut dropped, may_stop)? {
                Some((head, segs)) => {
                    if dropped != popped_bad_before && !chains.is_empty() {
                        // Bad chains were returned between good ones: the good ones can no
                        // longer be rewound in order. Give them back empty; drop the frame.
                        for (h, _) in chains.drain(..) {
                            queue.add_used(mem, h, 0).map_err(QueueError::Ring)?;
                            dropped += 1;
                        }
                        queue.go_to_previous_position();
                        return Ok(Delivery::Dropped(dropped));
                    }
                    if chains.is_empty() && total_len(&segs) < VNET_HDR_LEN as u64 {
                        self.fault(
                            NetFault::WrongDirection,
                            head,
                            "first RX buffer smaller than the vnet header",
                        );
                        queue.add_used(mem, head, 0).map_err(QueueError::Ring)?;
                        dropped += 1;
                        continue;
                    }
                    room += total_len(&segs);
                    chains.push((head, segs));
                }
                None => {
                    if !chains.is_empty() && dropped != popped_bad_before {
                        // Same ordering problem as above.
                        for (h, _) in chains.drain(..) {
                            queue.add_used(mem, h, 0).map_err(QueueError::Ring)?;
                            dropped += 1;
                        }
                        return Ok(Delivery::Dropped(dropped));
                    }
                    for _ in 0..chains.len() {
                        queue.go_to_previous_position();
                    }
                    return Ok(Delivery::NoBuffers(dropped));
                }
            }
        }
        let n = chains.len() as u16;
        self.rx_buf[10..12].copy_from_slice(&n.to_le_bytes());
        let mut off = 0usize;
        for (head, segs) in &chains {
            let take = (len - off).min(total_len(segs) as usize);
            let written = write_segments(mem, segs, &self.rx_buf[off..off + take]).unwrap_or(0);
            off += take;
            queue
                .add_used(mem, *head, written as u32)
                .map_err(QueueError::Ring)?;
        }
        Ok(Delivery::Delivered(dropped + u32::from(n)))
    }
}
