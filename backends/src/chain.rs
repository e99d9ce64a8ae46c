//! Descriptor chain parsing shared by the engines: walk a chain once, validate every
//! descriptor against guest memory, and split it into device-readable and device-writable
//! byte ranges ("segments"). Everything after this works on validated segments.

use thiserror::Error;
use virtio_queue::desc::split::Descriptor;
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
    /// With a fault: the last byte of the chain's final descriptor, when that descriptor is
    /// device-writable and inside guest memory (where a virtio-blk status byte goes). The
    /// walk continues past the fault to find it, so that an error status never lands in a
    /// data buffer the walk happened to stop in.
    pub fault_status: Option<GuestAddress>,
    /// Descriptors read, the walk past a fault included: the work the chain cost.
    pub descs: u32,
}

/// The most descriptors one call of an engine reads, over every chain it takes (checked
/// between chains): with chains of up to `max_descs` each, a ring full of the longest ones
/// would otherwise keep a queue thread from its event loop for seconds. The call stops
/// there and says `more`, as at its chain budget.
pub const MAX_DESCS_PER_CALL: u64 = 64 * 1024;

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
    let head = chain.head_index();
    parse_descs(head, chain, mem, max_descs)
}

/// The descriptors of the chain starting at `head` in the descriptor table at `table` of a
/// queue of `size` entries, as virtio-queue's `DescriptorChain` yields them (indirect tables
/// followed, not nested; at most `size` direct or table-length indirect descriptors; the
/// walk ends at an unreadable descriptor, a bad table or 4 GiB of buffers). For a chain that
/// is not popped from the available ring: one a restarted back-end executes again from its
/// inflight record. virtio-queue builds chains only from the available ring.
pub(crate) struct HeadChain<'a, M> {
    mem: &'a M,
    table: GuestAddress,
    size: u16,
    next: u16,
    ttl: u16,
    indirect: bool,
    bytes: u32,
}

impl<'a, M: GuestMemory> HeadChain<'a, M> {
    pub(crate) fn new(mem: &'a M, table: GuestAddress, size: u16, head: u16) -> Self {
        HeadChain {
            mem,
            table,
            size,
            next: head,
            ttl: size,
            indirect: false,
            bytes: 0,
        }
    }
}

impl<M: GuestMemory> Iterator for HeadChain<'_, M> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        if self.ttl == 0 || self.next >= self.size {
            return None;
        }
        let at = self.table.checked_add(u64::from(self.next) * 16)?;
        let desc: Descriptor = self.mem.read_obj(at).ok()?;
        if desc.refers_to_indirect_table() {
            let len = desc.len();
            if self.indirect || len % 16 != 0 || len / 16 > u32::from(u16::MAX) {
                self.ttl = 0;
                return None;
            }
            self.table = desc.addr();
            self.size = (len / 16) as u16;
            self.next = 0;
            self.ttl = self.size;
            self.indirect = true;
            return self.next();
        }
        self.bytes = self.bytes.checked_add(desc.len())?;
        if desc.has_next() {
            self.next = desc.next();
            self.ttl -= 1;
        } else {
            self.ttl = 0;
        }
        Some(desc)
    }
}

/// [`parse_chain`] for any walk of a chain's descriptors.
pub(crate) fn parse_descs<M: GuestMemory>(
    head: u16,
    chain: impl Iterator<Item = Descriptor>,
    mem: &M,
    max_descs: usize,
) -> ParsedChain {
    let mut parsed = ParsedChain {
        head,
        ..Default::default()
    };
    let mut count = 0usize;
    let mut last_has_next = false;
    let mut total: u64 = 0;
    // The final descriptor seen (address, length, writable): after a fault the walk goes on
    // without recording segments, to find where the status byte is.
    let mut last = None;
    for desc in chain {
        count += 1;
        last_has_next = desc.has_next();
        last = Some((desc.addr(), desc.len(), desc.is_write_only()));
        if parsed.fault.is_some() {
            // virtio-queue's iterator ends by itself: after the queue size for a direct
            // chain, after the table's length for an indirect one (the engines' budget of
            // descriptors per call, MAX_DESCS_PER_CALL, bounds what such walks cost).
            continue;
        }
        if count > max_descs {
            parsed.fault = Some(ChainError::TooLong(max_descs));
            continue;
        }
        total += u64::from(desc.len());
        if total > u64::from(u32::MAX) {
            parsed.fault = Some(ChainError::TooBig);
            continue;
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
                continue;
            }
        }
        if writable {
            if seg.len > 0 {
                parsed.writable.push(seg);
            }
        } else if !parsed.writable.is_empty() {
            parsed.fault = Some(ChainError::ReadableAfterWritable);
            continue;
        } else if seg.len > 0 {
            parsed.readable.push(seg);
        }
    }
    parsed.descs = u32::try_from(count).unwrap_or(u32::MAX);
    if count == 0 {
        parsed.fault = Some(ChainError::Empty);
    } else if last_has_next {
        // Cut short (a loop, a bad next index or indirect table): no final descriptor.
        parsed.fault.get_or_insert(ChainError::Unterminated);
        return parsed;
    }
    if parsed.fault.is_some() {
        parsed.fault_status = last.and_then(|(addr, len, writable)| {
            let at = addr.checked_add(u64::from(len).checked_sub(1)?)?;
            (writable && mem.check_range(at, 1, Permissions::Write)).then_some(at)
        });
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
