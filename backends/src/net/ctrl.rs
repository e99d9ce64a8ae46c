//! The virtio-net control queue.

use virtio_bindings::virtio_net::*;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddressSpace, GuestMemory};

use crate::chain::{parse_chain, read_segments, split_last_byte};
use crate::ratelimit::GuestErrorLog;
use crate::{check_queue, finish_batch, QueueError, QueueOutcome};

/// Result of [`CtrlQueue::process`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtrlOutcome {
    /// Used entries and whether to signal the guest for the control queue.
    pub queue: QueueOutcome,
    /// The driver set this many queue pairs (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, validated to
    /// 1..=max_pairs): the host enables the first N pairs.
    pub vq_pairs: Option<u16>,
}

/// Handles the control queue: MQ pairs (validated), RX mode and MAC table (accepted and
/// ignored), everything else answered VIRTIO_NET_ERR.
pub struct CtrlQueue<S: GuestAddressSpace> {
    mem: S,
    max_pairs: u16,
    log: GuestErrorLog<2>,
}

/// The most control commands one [`CtrlQueue::process`] call handles.
pub const CTRL_BUDGET: u32 = 64;
const OK: u8 = VIRTIO_NET_OK as u8;
const ERR: u8 = VIRTIO_NET_ERR as u8;

impl<S: GuestAddressSpace> CtrlQueue<S> {
    /// A control queue for a device with `max_pairs` queue pairs.
    pub fn new(mem: S, max_pairs: u16) -> Self {
        CtrlQueue {
            mem,
            max_pairs: max_pairs.max(1),
            log: GuestErrorLog::new("virtio-net ctrl"),
        }
    }

    /// Replaces the guest memory handle.
    pub fn set_memory(&mut self, mem: S) {
        self.mem = mem;
    }

    /// Refused commands and malformed chains so far.
    pub fn errors(&self) -> u64 {
        self.log.total()
    }

    /// Processes every available control command.
    pub fn process(&mut self, queue: &mut Queue) -> Result<CtrlOutcome, QueueError> {
        let guard = self.mem.memory();
        let mem: &S::M = &guard;
        check_queue(queue, mem)?;
        let max_descs = usize::from(queue.size()).min(crate::net::MAX_CHAIN_DESCS);
        let mut out = CtrlOutcome::default();
        let mut used = 0;
        let mut more = false;
        loop {
            if used >= CTRL_BUDGET {
                more = true;
                break;
            }
            let Some(chain) = queue.iter(mem).map_err(QueueError::Ring)?.next() else {
                break;
            };
            let parsed = parse_chain(chain, mem, max_descs);
            let head = parsed.head;
            // A faulted chain's ack byte is its own last byte, not the last writable byte
            // the walk saw before the fault.
            let ack = if parsed.fault.is_some() {
                parsed.fault_status
            } else {
                split_last_byte(&parsed.writable).map(|(_, a)| a)
            };
            let (code, pairs) = match (parsed.fault, ack) {
                (Some(f), _) => {
                    self.log.record(0, format_args!("chain {head}: {f}"));
                    (ERR, None)
                }
                (None, None) => {
                    self.log
                        .record(0, format_args!("chain {head}: no ack byte"));
                    (ERR, None)
                }
                (None, Some(_)) => self.command(mem, &parsed),
            };
            let len = match ack {
                Some(a) if mem.write_obj(code, a).is_ok() => 1,
                _ => 0,
            };
            if pairs.is_some() {
                out.vq_pairs = pairs;
            }
            queue.add_used(mem, head, len).map_err(QueueError::Ring)?;
            used += 1;
        }
        out.queue = finish_batch(queue, mem, used)?;
        out.queue.more = more;
        Ok(out)
    }

    fn command<M: GuestMemory>(
        &mut self,
        mem: &M,
        parsed: &crate::chain::ParsedChain,
    ) -> (u8, Option<u16>) {
        let mut buf = [0u8; 4];
        let n = read_segments(mem, &parsed.readable, &mut buf).unwrap_or(0);
        if n < 2 {
            self.log.record(
                1,
                format_args!("chain {}: command header of {n} bytes", parsed.head),
            );
            return (ERR, None);
        }
        let (class, cmd) = (u32::from(buf[0]), u32::from(buf[1]));
        match (class, cmd) {
            (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) => {
                if n < 4 {
                    self.log
                        .record(1, format_args!("VQ_PAIRS_SET without its argument"));
                    return (ERR, None);
                }
                let pairs = u16::from_le_bytes([buf[2], buf[3]]);
                if pairs == 0 || pairs > self.max_pairs {
                    self.log.record(
                        1,
                        format_args!("VQ_PAIRS_SET {pairs} outside 1..={}", self.max_pairs),
                    );
                    return (ERR, None);
                }
                (OK, Some(pairs))
            }
            (VIRTIO_NET_CTRL_RX, _) | (VIRTIO_NET_CTRL_MAC, _) => (OK, None),
            _ => {
                self.log.record(
                    1,
                    format_args!("unsupported control command class {class} cmd {cmd}"),
                );
                (ERR, None)
            }
        }
    }
}
