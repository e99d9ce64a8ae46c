//! virtio-blk: the disk image and the per-queue request engine.
//!
//! Host flow (in-VMM device thread or vhost-user daemon):
//! 1. `let disk = Arc::new(BlockBackend::open(&opts)?)`; offer [`block_features`] and serve
//!    [`block_config_space`] to the driver.
//! 2. At DRIVER_OK, per queue: `queue.set_event_idx(event_idx_negotiated)` and
//!    `BlockQueue::new(disk.clone(), mem, queue.size())`.
//! 3. Kick eventfd readable -> [`BlockQueue::process_queue`]; [`BlockQueue::completion_fd`]
//!    readable -> [`BlockQueue::process_completions`]. Signal the guest when the returned
//!    outcome says `notify`; set NEEDS_RESET on `Err`.
//! 4. Reset / memory change: [`BlockQueue::drain`] first.
//!
//! With io_uring on a buffered (not O_DIRECT) image, an IN request is first tried with
//! `preadv2(RWF_NOWAIT)` on the queue thread: if the page cache holds all of it, it completes
//! there (no io_uring entry, completion or wake-up; counted in `BlockStats::cached_reads`);
//! otherwise it goes to io_uring as usual. File systems without `RWF_NOWAIT` turn it off.

mod config;
mod disk;
mod queue;
mod request;

pub use config::{
    block_config_space, block_features, seg_max, CONFIG_SPACE_LEN, MAX_CHAIN_DESCS,
    MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, SIZE_MAX,
};
pub use disk::{
    probe_io_uring, BlockBackend, BlockError, BlockOptions, EngineChoice, EngineKind, MAX_IOVECS,
    SECTOR_SIZE,
};
pub use queue::{
    BlockCounters, BlockQueue, BlockStats, InflightResume, BLOCK_STATS, BOUNCE_BUDGET,
    BOUNCE_CHUNK, MAX_CHAINS_PER_CALL, MAX_SYNC_BYTES_PER_CALL,
};
pub use request::{BlkFault, BLK_FAULT_KINDS, MAX_REQUEST_BYTES};

#[cfg(test)]
mod tests;
