//! Device logic shared by the VMM's in-VMM virtio devices and the vhost-user daemons.
//!
//! The same engines run in both hosts, so a comparison across device models measures the
//! model and not two implementations:
//!
//! - [`block`]: [`block::BlockBackend`] (a raw image file, io_uring or synchronous I/O) and
//!   [`block::BlockQueue`], the virtio-blk request engine for one virtqueue.
//! - [`net`]: [`net::Tap`] and [`net::NetQueuePair`], the virtio-net RX/TX engine for one
//!   queue pair, plus [`net::CtrlQueue`] for the control queue.
//! - [`inflight`]: the vhost-user inflight region (which requests a back-end took and has not
//!   completed), so that a restarted back-end executes exactly those again.
//! - [`poll`]: the bounded busy-polling loop both hosts run after work (`poll_us=`,
//!   `--poll-us`).
//! - [`vhost_user`]: the serving layer of the vhost-user daemons (`vhost-user-blk`,
//!   `vhost-user-net`): the socket, the accept loop and the message relay.
//!
//! Every engine is generic over the guest memory handle (`S: GuestAddressSpace`, e.g.
//! `GuestMemoryAtomic<GuestMemoryMmap<B>>`, `Arc<GuestMemoryMmap>` or `&GuestMemoryMmap`)
//! and works on a `&mut virtio_queue::Queue` handed in on each call. Engines never own the
//! interrupt: they return whether the guest must be notified (EVENT_IDX aware), and a
//! [`QueueError`] when the queue is broken beyond repair (the host sets DEVICE_NEEDS_RESET).

pub mod block;
mod chain;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod inflight;
pub mod net;
pub mod poll;
pub mod ratelimit;
pub mod sandbox;
pub mod stats;
pub mod vhost_user;

pub use chain::ChainError;

use thiserror::Error;

/// A queue that the device cannot go on with. The host should stop processing the queue and
/// set `VIRTIO_CONFIG_S_NEEDS_RESET` in the device status (and signal a config change).
#[derive(Debug, Error)]
pub enum QueueError {
    /// The driver has not set the queue ready (or the queue was reset).
    #[error("the virtqueue is not ready")]
    NotReady,
    /// The descriptor table or a ring is not inside guest memory, or the size is invalid.
    #[error(
        "the virtqueue layout is invalid (size {size}, rings outside guest memory or misaligned)"
    )]
    InvalidLayout {
        /// The queue size the driver selected.
        size: u16,
    },
    /// Reading the available ring or writing the used ring failed (e.g. the available index
    /// moved by more than the queue size).
    #[error("cannot access the virtqueue rings")]
    Ring(#[source] virtio_queue::Error),
    /// The host I/O engine itself failed (io_uring submission).
    #[error("the host I/O engine failed")]
    Io(#[source] std::io::Error),
}

/// Reads a device configuration space: `data.len()` bytes of `config` from `offset`, zero
/// past its end (a driver or frontend may read a newer, longer layout). Both hosts use it.
pub fn read_config(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}

/// What one call into an engine did, for the host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueOutcome {
    /// Descriptor chains returned to the used ring by this call.
    pub used: u32,
    /// The host must signal the guest (irqfd / call fd) for this queue. Computed with
    /// `Queue::needs_notification`, so EVENT_IDX suppression is already applied.
    pub notify: bool,
    /// The call stopped at its budget with chains still available (a guest that keeps its
    /// ring full, or re-arms it from the requests themselves): the host must call again soon,
    /// after it has looked at its other events (stop, reset), and no doorbell may come for
    /// them (notifications stay off meanwhile).
    pub more: bool,
}

impl QueueOutcome {
    pub(crate) fn merge(&mut self, other: QueueOutcome) {
        self.used += other.used;
        self.notify |= other.notify;
        self.more |= other.more;
    }
}

/// Checks that `queue` can be processed against `mem` (ready, valid layout).
pub(crate) fn check_queue<M: vm_memory::GuestMemory>(
    queue: &virtio_queue::Queue,
    mem: &M,
) -> Result<(), QueueError> {
    use virtio_queue::QueueT;
    if !queue.ready() {
        return Err(QueueError::NotReady);
    }
    if !queue.is_valid(mem) {
        return Err(QueueError::InvalidLayout { size: queue.size() });
    }
    Ok(())
}

/// Computes whether the guest needs a notification after `used` entries were added.
pub(crate) fn finish_batch<M: vm_memory::GuestMemory>(
    queue: &mut virtio_queue::Queue,
    mem: &M,
    used: u32,
) -> Result<QueueOutcome, QueueError> {
    use virtio_queue::QueueT;
    if used == 0 {
        return Ok(QueueOutcome::default());
    }
    let notify = queue.needs_notification(mem).map_err(QueueError::Ring)?;
    Ok(QueueOutcome {
        used,
        notify,
        more: false,
    })
}

#[cfg(test)]
mod config_tests {
    #[test]
    fn read_config_windows() {
        let c = [1u8, 2, 3, 4];
        let mut d = [9u8; 3];
        super::read_config(&c, 2, &mut d);
        assert_eq!(d, [3, 4, 0]);
        super::read_config(&c, u64::MAX, &mut d);
        assert_eq!(d, [0, 0, 0]);
    }
}
