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

/// What a thread running a [`BlockQueue`] calls, wherever it runs (the vmm's queue threads,
/// the daemon's vring workers): waiting on its epoll (kicks, completions, stop), eventfds
/// (the kick drained, the guest's interrupt), the queue's io_uring (its set-up when the
/// engine makes the ring on the first request, then enter), and the synchronous engine's
/// I/O. Each host adds what its own thread does besides. Found by running the tests, the lab
/// and QEMU's vhost-user-blk under `--seccomp log`.
pub const ENGINE_SYSCALLS: &[crate::sandbox::Rule] = &[
    crate::sandbox::allow(libc::SYS_epoll_wait),
    crate::sandbox::allow(libc::SYS_epoll_pwait),
    crate::sandbox::allow(libc::SYS_epoll_ctl),
    crate::sandbox::allow(libc::SYS_read),
    crate::sandbox::allow(libc::SYS_write),
    crate::sandbox::allow(libc::SYS_eventfd2),
    crate::sandbox::allow(libc::SYS_close),
    crate::sandbox::allow(libc::SYS_io_uring_setup),
    crate::sandbox::allow(libc::SYS_io_uring_register),
    crate::sandbox::allow(libc::SYS_io_uring_enter),
    crate::sandbox::allow(libc::SYS_getrandom),
    crate::sandbox::allow(libc::SYS_preadv),
    crate::sandbox::allow(libc::SYS_preadv2),
    crate::sandbox::allow(libc::SYS_pwritev),
    crate::sandbox::allow(libc::SYS_pwritev2),
    crate::sandbox::allow(libc::SYS_pread64),
    crate::sandbox::allow(libc::SYS_pwrite64),
    crate::sandbox::allow(libc::SYS_fdatasync),
    crate::sandbox::allow(libc::SYS_fsync),
    crate::sandbox::allow(libc::SYS_fallocate),
];

#[cfg(test)]
mod tests;
