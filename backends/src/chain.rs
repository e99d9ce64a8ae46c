//! Descriptor chain parsing shared by the engines: walk a chain once, validate every
//! descriptor against guest memory, and split it into device-readable and device-writable
//! byte ranges ("segments"). Everything after this works on validated segments.

use thiserror::Error;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

/// Why a descriptor chain was refused.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum ChainError {
    /// No descriptor could be read (head out of the table, or a bad indirect table).
    #[error("empty or unreadable descriptor chain")]
    Empty,
    /// The chain has more descriptors than the device accepts (the queue size).
    #[error("descriptor chain longer than {0} descriptors")]
    TooLong(usize),
    /// The chain does not terminate: a loop, a `next` index outside the table, an unreadable
    /// descriptor or an invalid indirect table in the middle of the chain.
    #[error("descriptor chain does not terminate (loop, bad next index or bad indirect table)")]
    Unterminated,
    /// A device-readable descriptor follows a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// A buffer is not (entirely) inside guest memory.
    #[error("buffer at {addr:#x} of {len} bytes is outside guest memory")]
    OutsideMemory {
        /// Guest physical address of the buffer.
        addr: u64,
        /// Length of the buffer.
        len: u32,
    },
    /// The chain's buffers add up to more than 4 GiB.
    #[error("descriptor chain buffers add up to more than 4 GiB")]
    TooBig,
}

/// One validated guest buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A chain split into readable and writable segments. When `fault` is set the segments are
/// what could be read before the fault (used only to report an error status, best effort).
#[derive(Debug, Default)]
pub(crate) struct ParsedChain {
    pub head: u16,
    pub readable: Vec<Segment>,
    pub writable: Vec<Segment>,
    pub fault: Option<ChainError>,
}

impl ParsedChain {
    pub fn readable_len(&self) -> u64 {
        total_len(&self.readable)
    }
}

pub(crate) fn total_len(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Walks `chain`, accepting at most `max_descs` descriptors (indirect ones included).
pub(crate) fn parse_chain<M: GuestMemory>(
    chain: DescriptorChain<&M>,
    mem: &M,
    max_descs: usize,
) -> ParsedChain {
    let mut parsed = ParsedChain {
        head: chain.head_index(),
        ..Default::default()
    };
    let mut count = 0usize;
    let mut last_has_next = false;
    let mut total: u64 = 0;
    for desc in chain {
        count += 1;
        if count > max_descs {
            parsed.fault = Some(ChainError::TooLong(max_descs));
            return parsed;
        }
        last_has_next = desc.has_next();
        total += u64::from(desc.len());
        if total > u64::from(u32::MAX) {
            parsed.fault = Some(ChainError::TooBig);
            return parsed;
        }
        let seg = Segment {
            addr: desc.addr(),
            len: desc.len(),
        };
        let writable = desc.is_write_only();
        if seg.len > 0 {
            let perm = if writable {
                Permissions::Write
            } else {
                Permissions::Read
            };
            if !mem.check_range(seg.addr, seg.len as usize, perm) {
                parsed.fault = Some(ChainError::OutsideMemory {
                    addr: seg.addr.raw_value(),
                    len: seg.len,
                });
                return parsed;
            }
        }
        if writable {
            if seg.len > 0 {
                parsed.writable.push(seg);
            }
        } else if !parsed.writable.is_empty() {
            parsed.fault = Some(ChainError::ReadableAfterWritable);
            return parsed;
        } else if seg.len > 0 {
            parsed.readable.push(seg);
        }
    }
    if count == 0 {
        parsed.fault = Some(ChainError::Empty);
    } else if last_has_next {
        parsed.fault = Some(ChainError::Unterminated);
    }
    parsed
}

/// Splits `segs` into the first `at` bytes and the rest. `at` must not exceed the total.
pub(crate) fn split_at(segs: &[Segment], at: u64) -> (Vec<Segment>, Vec<Segment>) {
    let mut front = Vec::new();
    let mut back = Vec::new();
    let mut left = at;
    for s in segs {
        if left == 0 {
            back.push(*s);
        } else if u64::from(s.len) <= left {
            front.push(*s);
            left -= u64::from(s.len);
        } else {
            // left < s.len, so it fits in u32.
            let l = left as u32;
            front.push(Segment {
                addr: s.addr,
                len: l,
            });
            back.push(Segment {
                addr: s.addr.unchecked_add(u64::from(l)),
                len: s.len - l,
            });
            left = 0;
        }
    }
    (front, back)
}

/// The last byte of `segs` (the virtio-blk status byte, the ctrl ack byte) and the segments
/// before it.
pub(crate) fn split_last_byte(segs: &[Segment]) -> Option<(Vec<Segment>, GuestAddress)> {
    let total = total_len(segs);
    if total == 0 {
        return None;
    }
    let (front, back) = split_at(segs, total - 1);
    back.first().map(|b| (front, b.addr))
}

/// Copies the start of `segs` into `buf`; returns the number of bytes copied.
pub(crate) fn read_segments<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    buf: &mut [u8],
) -> Result<usize, vm_memory::GuestMemoryError> {
    let mut done = 0;
    for s in segs {
        if done == buf.len() {
            break;
        }
        let n = (buf.len() - done).min(s.len as usize);
        mem.read_slice(&mut buf[done..done + n], s.addr)?;
        done += n;
    }
    Ok(done)
}

/// Copies `buf` into the start of `segs`; returns the number of bytes copied.
pub(crate) fn write_segments<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    buf: &[u8],
) -> Result<usize, vm_memory::GuestMemoryError> {
    let mut done = 0;
    for s in segs {
        if done == buf.len() {
            break;
        }
        let n = (buf.len() - done).min(s.len as usize);
        mem.write_slice(&buf[done..done + n], s.addr)?;
        done += n;
    }
    Ok(done)
}

/// Host iovecs for `segs`. Device-writable ranges are marked dirty in the memory's bitmap
/// (the vhost-user live-migration log). The pointers stay valid while the memory snapshot
/// that produced them is alive.
pub(crate) fn host_iovecs<M: GuestMemory>(
    mem: &M,
    segs: &[Segment],
    device_writes: bool,
    out: &mut Vec<libc::iovec>,
) -> Result<(), vm_memory::GuestMemoryError> {
    use vm_memory::bitmap::Bitmap;
    use vm_memory::guest_memory::GuestMemorySliceIterator;
    let perm = if device_writes {
        Permissions::Write
    } else {
        Permissions::Read
    };
    for s in segs {
        if s.len == 0 {
            continue;
        }
        let mut got = 0usize;
        for slice in mem
            .get_slices(s.addr, s.len as usize, perm)?
            .stop_on_error()?
        {
            got += slice.len();
            if device_writes {
                slice.bitmap().mark_dirty(0, slice.len());
            }
            out.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
        if got != s.len as usize {
            return Err(vm_memory::GuestMemoryError::InvalidGuestAddress(s.addr));
        }
    }
    Ok(())
}
