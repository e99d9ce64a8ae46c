//! virtio-net: taps and the per-queue-pair RX/TX engine, plus the control queue.
//!
//! Host flow (in-VMM device thread or vhost-user daemon), per queue pair:
//! 1. `Tap::open_queues(name, pairs)` (or `Tap::from_fd`); after feature negotiation
//!    `tap.set_offloads(acked_features)`.
//! 2. `NetQueuePair::new(tap, mem, acked_features)`; `queue.set_event_idx(..)` on both queues.
//! 3. TX kick (or tap writable after `tap_full`) -> [`NetQueuePair::process_tx`].
//!    Tap readable or RX kick -> [`NetQueuePair::process_rx`]; when it answers
//!    [`RxWait::GuestBuffers`] stop polling the tap for input until the next RX kick.
//! 4. Control queue kick -> [`CtrlQueue::process`]; apply `vq_pairs` when set
//!    ([`use_pairs`]: the driver uses one pair until it sets more, and none of MQ without
//!    VIRTIO_NET_F_MQ).
//! 5. Signal the guest when an outcome says `notify`; set NEEDS_RESET on `Err`.

mod config;
mod ctrl;
mod queue;
mod tap;

pub use config::{net_config_space, net_features, NetOptions, NET_CONFIG_SPACE_LEN};
pub use ctrl::{CtrlOutcome, CtrlQueue, CTRL_BUDGET};
pub use queue::{
    NetCounters, NetFault, NetQueuePair, NetStats, RxOutcome, RxStats, RxWait, TxOutcome, TxStats,
    MAX_CHAIN_DESCS, MAX_RX_CHAINS_PER_FRAME, NET_FAULT_KINDS, RX_BUDGET, TX_BUDGET,
};
pub use tap::{tap_offload_flags, Tap, TapError};

/// Size of the virtio-net header with VERSION_1 (`struct virtio_net_hdr_v1`), which is also
/// the tap's vnet header size.
pub const VNET_HDR_LEN: usize = 12;
/// The largest frame (header included) accepted on TX or read from the tap: a 64 KiB GSO
/// frame plus Ethernet and virtio-net headers.
pub const MAX_FRAME_LEN: usize = 65562;

/// Attaches the tap queues of the first `pairs` queue pairs and detaches the rest (a
/// multi-queue tap steers incoming frames to every attached queue: one whose rings the
/// driver does not use would swallow its share). Returns the first error with its queue.
pub fn use_pairs<T: AsRef<Tap>>(taps: &[T], pairs: usize) -> Result<(), (usize, std::io::Error)> {
    attach_queues(taps, |i| i < pairs)
}

/// Attaches the tap queue of every pair `used` says the driver uses and detaches the others;
/// the first stays attached whatever `used` says (a tap keeps one queue all along, and it
/// is attached first). Returns the first error with its queue.
pub fn attach_queues<T: AsRef<Tap>>(
    taps: &[T],
    used: impl Fn(usize) -> bool,
) -> Result<(), (usize, std::io::Error)> {
    if taps.len() < 2 {
        return Ok(());
    }
    let on = |i: usize| i == 0 || used(i);
    for (i, t) in taps.iter().enumerate().filter(|(i, _)| on(*i)) {
        t.as_ref().set_queue_attached(true).map_err(|e| (i, e))?;
    }
    for (i, t) in taps.iter().enumerate().filter(|(i, _)| !on(*i)) {
        t.as_ref().set_queue_attached(false).map_err(|e| (i, e))?;
    }
    Ok(())
}

impl AsRef<Tap> for Tap {
    fn as_ref(&self) -> &Tap {
        self
    }
}

#[cfg(test)]
mod tests;
