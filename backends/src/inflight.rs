//! Inflight I/O tracking for split virtqueues (vhost-user `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`,
//! the "Inflight I/O tracking" section of the vhost-user specification).
//!
//! The back-end keeps, in a shared memory region the frontend holds on to across back-end
//! restarts, which descriptor heads it took from the available ring and has not completed
//! yet. A restarted back-end reads it back and executes exactly those requests again, in the
//! order they were first taken, before it serves the ring: a back-end that completes out of
//! order (a page-cached read before an earlier flush) then neither completes a head twice nor
//! loses one, which resuming at the used index alone cannot promise.
//!
//! Layout (QEMU's libvhost-user, which every frontend that offers the feature interoperates
//! with): one region per queue, each `ALIGN_UP(16 * queue_size + 2, 64)` bytes, back to back:
//!
//! ```text
//! u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
//! desc[desc_num]: { u8 inflight; u8 padding[5]; u16 next; u64 counter; }
//! ```
//!
//! Per request: [`QueueInflight::taken`] when the head is popped (a fresh `counter`,
//! `inflight = 1`); [`QueueInflight::completing`] right before its used element is published
//! (`last_batch_head`); [`QueueInflight::completed`] after the used index moved (`inflight = 0`,
//! then `used_idx`). A crash between the last two leaves `used_idx` behind the ring's: the
//! recovery then knows the entry at `last_batch_head` was completed.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{fence, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

/// The region format version this code writes and reads.
pub const INFLIGHT_VERSION: u16 = 1;
/// Alignment of each queue's region.
pub const INFLIGHT_ALIGNMENT: usize = 64;
/// The largest split virtqueue.
const MAX_QUEUE_SIZE: u16 = 32768;
/// The most queues a region may describe (vhost-user's own bound on queues).
pub const MAX_INFLIGHT_QUEUES: u16 = 256;
const HEADER: usize = 16;
const DESC: usize = 16;

/// Bytes of one queue's region for a queue of `queue_size` entries.
pub fn queue_region_size(queue_size: u16) -> usize {
    (DESC * usize::from(queue_size) + 2).next_multiple_of(INFLIGHT_ALIGNMENT)
}

/// Bytes of the whole region for `num_queues` queues of `queue_size` entries.
pub fn region_size(num_queues: u16, queue_size: u16) -> usize {
    usize::from(num_queues) * queue_region_size(queue_size)
}

/// A shared mapping, unmapped when the last handle goes.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; every access goes through atomics (another
// process writes it too), so handles may move to and be used from any thread.
unsafe impl Send for Mapping {}
// SAFETY: as above: only atomic accesses, no interior references handed out but to atomics.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are a mapping this object made and nobody else unmaps; no
        // reference into it outlives the last handle (they all hold the Arc).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

impl Mapping {
    fn map(fd: BorrowedFd<'_>, len: usize, offset: u64) -> io::Result<Mapping> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a new shared mapping of `len` bytes of an fd we hold; the kernel picks the
        // address, so no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { ptr: p.cast(), len })
    }

    /// The atomic of type `T` at `off`, which must be in the mapping and aligned for `T`.
    fn at<T>(&self, off: usize) -> &T {
        assert!(off + std::mem::size_of::<T>() <= self.len);
        // SAFETY: `off` is inside the mapping (asserted), mmap returns page-aligned memory
        // and every caller passes an offset aligned for `T` (the layout's fields are
        // naturally aligned, queue regions are 64-byte aligned); `T` is an atomic integer,
        // valid for every bit pattern, and the mapping lives as long as `self`.
        unsafe { &*self.ptr.add(off).cast::<T>() }
    }
}

/// Why a region handed over by a frontend was refused.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// The size or queue geometry does not match what the region must hold.
    #[error("inflight region: {0}")]
    Geometry(String),
    /// The fd could not be examined or mapped.
    #[error("inflight region: cannot map it")]
    Map(#[source] io::Error),
}

/// The inflight region of one device: every queue's part, and the fd the frontend keeps.
pub struct InflightRegion {
    map: Arc<Mapping>,
    fd: OwnedFd,
    num_queues: u16,
    queue_size: u16,
}

fn check_geometry(num_queues: u16, queue_size: u16) -> Result<(), InflightError> {
    if num_queues == 0 || num_queues > MAX_INFLIGHT_QUEUES {
        return Err(InflightError::Geometry(format!(
            "{num_queues} queues (expected 1 to {MAX_INFLIGHT_QUEUES})"
        )));
    }
    if queue_size == 0 || queue_size > MAX_QUEUE_SIZE || !queue_size.is_power_of_two() {
        return Err(InflightError::Geometry(format!(
            "queue size {queue_size} (expected a power of two up to {MAX_QUEUE_SIZE})"
        )));
    }
    Ok(())
}

impl InflightRegion {
    /// A new, zeroed region (GET_INFLIGHT_FD): a memfd the frontend will keep.
    pub fn create(num_queues: u16, queue_size: u16) -> Result<InflightRegion, InflightError> {
        check_geometry(num_queues, queue_size)?;
        let len = region_size(num_queues, queue_size);
        // SAFETY: the name is a NUL-terminated literal; memfd_create returns a new fd or -1.
        let raw = unsafe { libc::memfd_create(c"vhost-user-inflight".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(InflightError::Map(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let file = std::fs::File::from(fd);
        file.set_len(len as u64).map_err(InflightError::Map)?;
        let fd = OwnedFd::from(file);
        let map = Mapping::map(fd.as_fd(), len, 0).map_err(InflightError::Map)?;
        Ok(InflightRegion {
            map: Arc::new(map),
            fd,
            num_queues,
            queue_size,
        })
    }

    /// Maps a region the frontend sends back (SET_INFLIGHT_FD), after checking that its
    /// geometry is the one this format needs and that the file holds all of it (mapping
    /// past the end of a file would turn the first access into SIGBUS).
    pub fn open(
        fd: OwnedFd,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<InflightRegion, InflightError> {
        check_geometry(num_queues, queue_size)?;
        let need = region_size(num_queues, queue_size) as u64;
        if mmap_size < need {
            return Err(InflightError::Geometry(format!(
                "{mmap_size} bytes for {num_queues} queues of {queue_size} (need {need})"
            )));
        }
        if mmap_offset % 4096 != 0 {
            return Err(InflightError::Geometry(format!(
                "offset {mmap_offset:#x} is not page aligned"
            )));
        }
        let file = std::fs::File::from(fd);
        let meta = file.metadata().map_err(InflightError::Map)?;
        if !meta.file_type().is_file() {
            return Err(InflightError::Geometry(
                "the fd is not a memory file".into(),
            ));
        }
        if mmap_offset
            .checked_add(need)
            .is_none_or(|end| end > meta.len())
        {
            return Err(InflightError::Geometry(format!(
                "{need} bytes at offset {mmap_offset:#x} run past the end of the file ({} bytes)",
                meta.len()
            )));
        }
        let fd = OwnedFd::from(file);
        let map =
            Mapping::map(fd.as_fd(), need as usize, mmap_offset).map_err(InflightError::Map)?;
        Ok(InflightRegion {
            map: Arc::new(map),
            fd,
            num_queues,
            queue_size,
        })
    }

    /// The fd to hand to the frontend.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Bytes mapped (what GET_INFLIGHT_FD reports as `mmap_size`).
    pub fn mmap_size(&self) -> u64 {
        self.map.len as u64
    }

    /// Queues described.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Entries per queue.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// The part of queue `index`, for the engine that serves it.
    pub fn queue(&self, index: u16) -> Option<QueueInflight> {
        (index < self.num_queues).then(|| QueueInflight {
            map: self.map.clone(),
            base: usize::from(index) * queue_region_size(self.queue_size),
            desc_num: self.queue_size,
            counter: 0,
        })
    }
}

/// What [`QueueInflight::recover`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Heads taken and not completed, oldest first: execute them again, in this order.
    pub resubmit: Vec<u16>,
    /// The region was new (never written): nothing to resubmit, and the frontend's ring
    /// base stands.
    pub fresh: bool,
    /// The last completion's used element was published but the region did not record it
    /// (a crash between the two): that head was not resubmitted.
    pub finished_last_batch: Option<u16>,
}

/// One queue's part of the region, owned by the engine that serves the queue.
pub struct QueueInflight {
    map: Arc<Mapping>,
    base: usize,
    desc_num: u16,
    counter: u64,
}

impl QueueInflight {
    fn version(&self) -> &AtomicU16 {
        self.map.at(self.base + 8)
    }
    fn desc_num_field(&self) -> &AtomicU16 {
        self.map.at(self.base + 10)
    }
    fn last_batch_head(&self) -> &AtomicU16 {
        self.map.at(self.base + 12)
    }
    fn used_idx(&self) -> &AtomicU16 {
        self.map.at(self.base + 14)
    }
    fn flag(&self, head: u16) -> Option<&AtomicU8> {
        (head < self.desc_num).then(|| self.map.at(self.base + HEADER + DESC * usize::from(head)))
    }
    fn counter_of(&self, head: u16) -> Option<&AtomicU64> {
        (head < self.desc_num).then(|| {
            self.map
                .at(self.base + HEADER + DESC * usize::from(head) + 8)
        })
    }

    /// Entries this queue's part holds.
    pub fn desc_num(&self) -> u16 {
        self.desc_num
    }

    /// Reads the queue's state when the queue starts. `used_idx`: the used index in guest
    /// memory now. A new region is initialized; otherwise the heads to execute again are
    /// returned oldest first, and the entry of a completion whose used element was published
    /// just before a crash is cleared first.
    pub fn recover(&mut self, used_idx: u16) -> Recovery {
        let mut out = Recovery::default();
        if self.version().load(Ordering::Acquire) == 0 {
            for h in 0..self.desc_num {
                if let Some(f) = self.flag(h) {
                    f.store(0, Ordering::Relaxed);
                }
            }
            self.desc_num_field()
                .store(self.desc_num, Ordering::Relaxed);
            self.used_idx().store(used_idx, Ordering::Relaxed);
            self.version().store(INFLIGHT_VERSION, Ordering::Release);
            self.counter = 0;
            out.fresh = true;
            return out;
        }
        if self.used_idx().load(Ordering::Acquire) != used_idx {
            let last = self.last_batch_head().load(Ordering::Relaxed);
            if let Some(f) = self.flag(last) {
                if f.swap(0, Ordering::AcqRel) != 0 {
                    out.finished_last_batch = Some(last);
                }
            }
            fence(Ordering::Release);
            self.used_idx().store(used_idx, Ordering::Release);
        }
        let mut pending: Vec<(u64, u16)> = (0..self.desc_num)
            .filter(|&h| self.flag(h).is_some_and(|f| f.load(Ordering::Acquire) == 1))
            .map(|h| {
                let c = self.counter_of(h).map_or(0, |c| c.load(Ordering::Relaxed));
                (c, h)
            })
            .collect();
        pending.sort_unstable();
        self.counter = pending.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        out.resubmit = pending.into_iter().map(|(_, h)| h).collect();
        out
    }

    /// How many heads are marked taken and not completed.
    pub fn pending(&self) -> usize {
        (0..self.desc_num)
            .filter(|&h| self.flag(h).is_some_and(|f| f.load(Ordering::Acquire) == 1))
            .count()
    }

    /// How many heads [`QueueInflight::recover`] would hand back with the ring's used index
    /// at `used_idx`, without changing the region (a frontend's count before it hands the
    /// region to a new back-end).
    pub fn resubmits_at(&self, used_idx: u16) -> usize {
        if self.version().load(Ordering::Acquire) == 0 {
            return 0;
        }
        let finished = (self.used_idx().load(Ordering::Acquire) != used_idx)
            .then(|| self.last_batch_head().load(Ordering::Relaxed));
        (0..self.desc_num)
            .filter(|&h| Some(h) != finished)
            .filter(|&h| self.flag(h).is_some_and(|f| f.load(Ordering::Acquire) == 1))
            .count()
    }

    /// `head` was popped from the available ring (or is executed again after a restart).
    pub fn taken(&mut self, head: u16) {
        let counter = self.counter;
        let (Some(c), Some(f)) = (self.counter_of(head), self.flag(head)) else {
            return;
        };
        c.store(counter, Ordering::Relaxed);
        f.store(1, Ordering::Release);
        self.counter = counter.wrapping_add(1);
    }

    /// `head`'s used element is about to be published.
    pub fn completing(&self, head: u16) {
        if head < self.desc_num {
            self.last_batch_head().store(head, Ordering::Release);
        }
    }

    /// `head`'s used element is published and the used index is now `used_idx`.
    pub fn completed(&self, head: u16, used_idx: u16) {
        if let Some(f) = self.flag(head) {
            f.store(0, Ordering::Release);
        }
        fence(Ordering::Release);
        self.used_idx().store(used_idx, Ordering::Release);
    }
}

/// The body of GET_INFLIGHT_FD / SET_INFLIGHT_FD (`VhostUserInflight`: u64 mmap_size,
/// u64 mmap_offset, u16 num_queues, u16 queue_size, padded to 24 bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InflightMessage {
    /// Bytes of the region.
    pub mmap_size: u64,
    /// Where the region starts in the fd.
    pub mmap_offset: u64,
    /// Queues it describes.
    pub num_queues: u16,
    /// Entries per queue.
    pub queue_size: u16,
}

impl InflightMessage {
    /// Bytes of the body as frontends send it (QEMU and the vhost crate: 24, with padding).
    pub const SIZE: usize = 24;

    /// Parses a body; at least the 20 meaningful bytes (the padding may be left out).
    pub fn parse(body: &[u8]) -> Option<InflightMessage> {
        let u64_at = |i: usize| -> Option<u64> {
            Some(u64::from_le_bytes(body.get(i..i + 8)?.try_into().ok()?))
        };
        let u16_at = |i: usize| -> Option<u16> {
            Some(u16::from_le_bytes(body.get(i..i + 2)?.try_into().ok()?))
        };
        Some(InflightMessage {
            mmap_size: u64_at(0)?,
            mmap_offset: u64_at(8)?,
            num_queues: u16_at(16)?,
            queue_size: u16_at(18)?,
        })
    }

    /// The 24-byte body.
    pub fn to_bytes(self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..8].copy_from_slice(&self.mmap_size.to_le_bytes());
        b[8..16].copy_from_slice(&self.mmap_offset.to_le_bytes());
        b[16..18].copy_from_slice(&self.num_queues.to_le_bytes());
        b[18..20].copy_from_slice(&self.queue_size.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_bodies_round_trip() {
        let m = InflightMessage {
            mmap_size: 4224,
            mmap_offset: 0,
            num_queues: 2,
            queue_size: 128,
        };
        assert_eq!(InflightMessage::parse(&m.to_bytes()), Some(m));
        assert_eq!(InflightMessage::parse(&m.to_bytes()[..20]), Some(m));
        assert_eq!(InflightMessage::parse(&m.to_bytes()[..19]), None);
    }

    #[test]
    fn sizes_follow_libvhost_user() {
        assert_eq!(queue_region_size(128), 2112);
        assert_eq!(queue_region_size(256), 4160);
        assert_eq!(queue_region_size(1), 64);
        assert_eq!(region_size(2, 128), 4224);
    }

    #[test]
    fn a_fresh_region_is_initialized_and_resubmits_nothing() {
        let r = InflightRegion::create(2, 8).unwrap();
        let mut q = r.queue(1).unwrap();
        let rec = q.recover(5);
        assert!(rec.fresh);
        assert!(rec.resubmit.is_empty());
        assert!(r.queue(2).is_none());
    }

    #[test]
    fn taken_and_not_completed_heads_come_back_oldest_first() {
        let r = InflightRegion::create(1, 8).unwrap();
        let mut q = r.queue(0).unwrap();
        q.recover(0);
        for h in [5, 1, 7, 3] {
            q.taken(h);
        }
        // 1 and 3 complete (out of order), used index 0 -> 2.
        q.completing(1);
        q.completed(1, 1);
        q.completing(3);
        q.completed(3, 2);
        // A new engine on the same region (the back-end restarted).
        let mut q2 = r.queue(0).unwrap();
        let rec = q2.recover(2);
        assert!(!rec.fresh);
        assert_eq!(rec.resubmit, vec![5, 7]);
        assert_eq!(rec.finished_last_batch, None);
        // New takes continue after the oldest counters.
        q2.taken(6);
        let mut q3 = r.queue(0).unwrap();
        assert_eq!(q3.recover(2).resubmit, vec![5, 7, 6]);
    }

    #[test]
    fn a_crash_between_publishing_and_recording_is_not_resubmitted() {
        let r = InflightRegion::create(1, 8).unwrap();
        let mut q = r.queue(0).unwrap();
        q.recover(0);
        q.taken(2);
        q.taken(4);
        q.completing(4);
        // The used element of 4 is published (used index 1) and the back-end dies before
        // `completed`.
        let mut q2 = r.queue(0).unwrap();
        // A frontend counting before it hands the region on sees what recovery will do.
        assert_eq!(q2.pending(), 2);
        assert_eq!(q2.resubmits_at(1), 1);
        assert_eq!(q2.resubmits_at(0), 2);
        let rec = q2.recover(1);
        assert_eq!(rec.finished_last_batch, Some(4));
        assert_eq!(rec.resubmit, vec![2]);
    }

    #[test]
    fn a_region_from_the_frontend_is_checked_before_it_is_mapped() {
        let r = InflightRegion::create(1, 8).unwrap();
        let dup = || r.fd().try_clone_to_owned().unwrap();
        let size = r.mmap_size();
        assert!(InflightRegion::open(dup(), size, 0, 1, 8).is_ok());
        // Larger than the file: refused, never mapped.
        assert!(InflightRegion::open(dup(), size, 0, 1, 64).is_err());
        assert!(InflightRegion::open(dup(), 1 << 20, 0, 1, 1024).is_err());
        assert!(InflightRegion::open(dup(), size, 4096, 1, 8).is_err());
        assert!(InflightRegion::open(dup(), size, 1, 1, 8).is_err());
        assert!(InflightRegion::open(dup(), size, 0, 0, 8).is_err());
        assert!(InflightRegion::open(dup(), size, 0, 1, 12).is_err());
        let pipe = {
            let mut fds = [0; 2];
            // SAFETY: `fds` is a valid array of two ints for pipe to fill.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            // SAFETY: the write end is ours and closed here; the read end is owned below.
            unsafe { libc::close(fds[1]) };
            // SAFETY: a new fd nothing else owns.
            unsafe { OwnedFd::from_raw_fd(fds[0]) }
        };
        assert!(InflightRegion::open(pipe, size, 0, 1, 8).is_err());
        // Heads beyond the queue are ignored, never out of bounds.
        let mut q = r.queue(0).unwrap();
        q.recover(0);
        q.taken(8);
        q.taken(u16::MAX);
        q.completed(9, 1);
        assert_eq!(q.pending(), 0);
    }
}
