//! Entry points for `cargo fuzz` targets (feature `fuzzing`): raw bytes in, one pass of an
//! engine over a guest memory built from them. They must never panic.
//!
//! Layout of the 64 KiB guest memory, which starts as a copy of the input: the descriptor
//! table of a 16-entry queue at 0x0, the available ring at 0x100, the used ring at 0x200;
//! everything else is buffer space the descriptors may point to (or past, on purpose).

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

use crate::block::{BlockBackend, BlockOptions, BlockQueue, EngineChoice};
use crate::net::{CtrlQueue, NetQueuePair};

pub mod blk_engine;
pub mod heap;
pub mod input;
mod vhost_user;
pub use blk_engine::{fuzz_blk_engine, Summary as BlkEngineSummary};
pub use vhost_user::{fuzz_vhost_user_relay, fuzz_vhost_user_serve};

const MEM_SIZE: usize = 0x1_0000;
const QSIZE: u16 = 16;

fn setup(data: &[u8]) -> Option<(GuestMemoryMmap<()>, Queue)> {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).ok()?;
    let n = data.len().min(MEM_SIZE);
    mem.write_slice(&data[..n], GuestAddress(0)).ok()?;
    let mut q = Queue::new(QSIZE).ok()?;
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x100), Some(0));
    q.set_used_ring_address(Some(0x200), Some(0));
    q.set_event_idx(data.first().is_some_and(|b| b & 0x80 != 0));
    q.set_ready(true);
    Some((mem, q))
}

fn socketpair() -> Option<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: socketpair writes two fds into the array.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r != 0 {
        return None;
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Some(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Runs the available requests of a queue built from `data` through the virtio-blk engine
/// (a 64 KiB temporary image; io_uring when bit 0 of the first byte is set, else sync).
pub fn fuzz_block_request(data: &[u8]) {
    let Some((mem, mut q)) = setup(data) else {
        return;
    };
    let Ok(img) = TempFile::new() else { return };
    if img.as_file().set_len(MEM_SIZE as u64).is_err() {
        return;
    }
    let engine = if data.first().is_some_and(|b| b & 1 != 0) {
        EngineChoice::Auto
    } else {
        EngineChoice::Sync
    };
    let readonly = data.first().is_some_and(|b| b & 2 != 0);
    let Ok(disk) = BlockBackend::open(&BlockOptions {
        path: img.as_path().into(),
        readonly,
        engine,
        ..Default::default()
    }) else {
        return;
    };
    let Ok(mut bq) = BlockQueue::new(Arc::new(disk), &mem, QSIZE) else {
        return;
    };
    let _ = bq.process_queue(&mut q);
    let _ = bq.drain(&mut q);
}

/// Runs the TX queue built from `data` through the virtio-net engine into a socketpair.
pub fn fuzz_net_tx(data: &[u8]) {
    let Some((mem, mut q)) = setup(data) else {
        return;
    };
    let Some((a, _b)) = socketpair() else { return };
    let mut np = NetQueuePair::new(a, &mem, 0);
    let _ = np.process_tx(&mut q);
}

/// Sends `data[0x8000..]` as a frame from the "tap" and runs the RX queue built from `data`
/// (MRG_RXBUF when bit 0 of the first byte is set).
pub fn fuzz_net_rx(data: &[u8]) {
    let Some((mem, mut q)) = setup(data) else {
        return;
    };
    let Some((a, b)) = socketpair() else { return };
    let frame = data.get(0x8000..).unwrap_or(&[]);
    let frame = &frame[..frame.len().min(crate::net::MAX_FRAME_LEN)];
    // SAFETY: writes from a valid slice.
    let _ = unsafe {
        libc::write(
            std::os::fd::AsRawFd::as_raw_fd(&b),
            frame.as_ptr().cast(),
            frame.len(),
        )
    };
    let features = if data.first().is_some_and(|b| b & 1 != 0) {
        1u64 << virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF
    } else {
        0
    };
    let mut np = NetQueuePair::new(a, &mem, features);
    let _ = np.process_rx(&mut q);
}

/// Runs the control queue built from `data`.
pub fn fuzz_net_ctrl(data: &[u8]) {
    let Some((mem, mut q)) = setup(data) else {
        return;
    };
    let mut c = CtrlQueue::new(&mem, 4);
    let _ = c.process(&mut q);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small deterministic generator, so the smoke tests need no extra crate.
    pub(crate) fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn random_inputs_do_not_panic() {
        for seed in 0..200u64 {
            let mut d = bytes(seed, MEM_SIZE);
            // Keep avail.idx small half of the time so that chains are actually walked.
            if seed % 2 == 0 {
                d[0x102] = (seed % 5) as u8;
                d[0x103] = 0;
            }
            fuzz_block_request(&d);
            fuzz_net_tx(&d);
            fuzz_net_rx(&d);
            fuzz_net_ctrl(&d);
        }
        for f in [fuzz_block_request, fuzz_net_tx, fuzz_net_rx, fuzz_net_ctrl] {
            f(&[]);
            f(&[0xff; 7]);
        }
    }

    #[test]
    fn random_message_sequences_keep_the_relay_invariants() {
        for seed in 0..300u64 {
            let mut d = bytes(seed, 64 + (seed as usize % 7) * 64);
            // Mostly the fake back-end with inflight records.
            d[0] &= 0x3e;
            fuzz_vhost_user_relay(&d);
        }
        fuzz_vhost_user_relay(&[]);
        fuzz_vhost_user_relay(&[0xff; 9]);
    }

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
    }

    #[test]
    fn the_relay_harness_leaks_no_fd() {
        let before = open_fds();
        for seed in 0..1000u64 {
            let mut d = bytes(seed, 64 + (seed as usize % 7) * 64);
            d[0] &= 0x3e;
            fuzz_vhost_user_relay(&d);
        }
        let after = open_fds();
        assert!(after <= before + 4, "{before} fds before, {after} after");
    }
}
