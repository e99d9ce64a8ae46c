//! Turning a validated descriptor chain into a virtio-blk request (or a refusal).

use virtio_bindings::virtio_blk::*;
use vm_memory::{ByteValued, GuestAddress, GuestMemory};

use super::config::{MAX_DISCARD_SECTORS, MAX_DISCARD_SEG};
use super::disk::{BlockBackend, SECTOR_SIZE};
use crate::chain::{read_segments, split_at, split_last_byte, total_len, ParsedChain, Segment};

/// Status byte values.
pub(crate) const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
pub(crate) const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
pub(crate) const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// Size of `struct virtio_blk_outhdr`.
const HEADER_LEN: u64 = 16;
/// Size of `struct virtio_blk_discard_write_zeroes`.
const DWZ_SEG_LEN: u64 = 16;
/// The largest IN/OUT data transfer accepted in one request.
pub const MAX_REQUEST_BYTES: u64 = 256 << 20;

/// Kinds of guest-caused faults (indexes into the rate-limited log).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum BlkFault {
    /// Malformed descriptor chain (loop, too long, outside memory, order of flags).
    Chain = 0,
    /// No device-writable byte for the status.
    NoStatus,
    /// Fewer than 16 device-readable bytes for the request header.
    HeaderTooShort,
    /// Data length not a multiple of 512, or wrong buffer direction.
    BadLength,
    /// Sectors past the end of the disk.
    OutOfRange,
    /// A write to a read-only disk.
    ReadOnly,
    /// Unknown request type.
    Unsupported,
    /// Malformed DISCARD / WRITE_ZEROES segment.
    BadDiscard,
    /// The host I/O failed (EIO, ENOSPC...): the guest got IOERR.
    HostIo,
    /// Guest memory could not be accessed while executing.
    GuestMemory,
    /// A request larger than [`MAX_REQUEST_BYTES`].
    TooBig,
}

/// Number of [`BlkFault`] kinds.
pub const BLK_FAULT_KINDS: usize = 11;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReqOp {
    In {
        sector: u64,
    },
    Out {
        sector: u64,
    },
    Flush,
    GetId,
    Discard {
        sector: u64,
        sectors: u32,
    },
    WriteZeroes {
        sector: u64,
        sectors: u32,
        unmap: bool,
    },
}

#[derive(Debug)]
pub(crate) struct Request {
    pub head: u16,
    pub status: GuestAddress,
    pub op: ReqOp,
    /// IN: device-writable data; OUT: device-readable data; GET_ID: the id buffer.
    pub data: Vec<Segment>,
}

#[derive(Debug)]
pub(crate) struct Rejected {
    pub head: u16,
    /// Where to write the status, when the chain has a device-writable byte.
    pub status: Option<GuestAddress>,
    pub code: u8,
    pub fault: BlkFault,
    pub detail: String,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct OutHdr {
    type_: u32,
    ioprio: u32,
    sector: u64,
}
// SAFETY: plain old data, every bit pattern is valid, no padding (4 + 4 + 8 bytes).
unsafe impl ByteValued for OutHdr {}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DwzSeg {
    sector: u64,
    num_sectors: u32,
    flags: u32,
}
// SAFETY: plain old data, every bit pattern is valid, no padding (8 + 4 + 4 bytes).
unsafe impl ByteValued for DwzSeg {}

fn check_range(disk: &BlockBackend, sector: u64, sectors: u64) -> bool {
    sector
        .checked_add(sectors)
        .is_some_and(|end| end <= disk.capacity_sectors())
}

pub(crate) fn parse<M: GuestMemory>(
    chain: ParsedChain,
    mem: &M,
    disk: &BlockBackend,
) -> Result<Request, Rejected> {
    let head = chain.head;
    let status_split = split_last_byte(&chain.writable);
    let reject = |status: Option<GuestAddress>, code, fault, detail: String| Rejected {
        head,
        status,
        code,
        fault,
        detail,
    };
    if let Some(fault) = chain.fault {
        // Not the last writable byte of the segments recorded before the fault: that may
        // be a data buffer (a guest that reads its stale status as OK would take an
        // unfilled buffer as data).
        return Err(reject(
            chain.fault_status,
            S_IOERR,
            BlkFault::Chain,
            fault.to_string(),
        ));
    }
    let Some((wdata, status)) = status_split else {
        return Err(reject(
            None,
            S_IOERR,
            BlkFault::NoStatus,
            "no device-writable status byte".into(),
        ));
    };
    let st = Some(status);
    if chain.readable_len() < HEADER_LEN {
        return Err(reject(
            st,
            S_IOERR,
            BlkFault::HeaderTooShort,
            format!("request header of {} bytes", chain.readable_len()),
        ));
    }
    let mut hdr = OutHdr::default();
    if read_segments(mem, &chain.readable, hdr.as_mut_slice()).is_err() {
        return Err(reject(
            st,
            S_IOERR,
            BlkFault::GuestMemory,
            "cannot read the request header".into(),
        ));
    }
    let type_ = u32::from_le(hdr.type_);
    let sector = u64::from_le(hdr.sector);
    let (_, rdata) = split_at(&chain.readable, HEADER_LEN);

    let rw = |data: Vec<Segment>, write: bool| -> Result<Request, Rejected> {
        let len = total_len(&data);
        if write && disk.readonly() {
            return Err(reject(
                st,
                S_IOERR,
                BlkFault::ReadOnly,
                "write to a read-only disk".into(),
            ));
        }
        if len % SECTOR_SIZE != 0 {
            return Err(reject(
                st,
                S_IOERR,
                BlkFault::BadLength,
                format!("data length {len} is not a multiple of 512"),
            ));
        }
        if len > MAX_REQUEST_BYTES {
            return Err(reject(
                st,
                S_IOERR,
                BlkFault::TooBig,
                format!("request of {len} bytes"),
            ));
        }
        if !check_range(disk, sector, len / SECTOR_SIZE) {
            return Err(reject(
                st,
                S_IOERR,
                BlkFault::OutOfRange,
                format!(
                    "sectors {sector}+{} past the end ({} sectors)",
                    len / SECTOR_SIZE,
                    disk.capacity_sectors()
                ),
            ));
        }
        let op = if write {
            ReqOp::Out { sector }
        } else {
            ReqOp::In { sector }
        };
        Ok(Request {
            head,
            status,
            op,
            data,
        })
    };

    match type_ {
        VIRTIO_BLK_T_IN => {
            if !rdata.is_empty() {
                return Err(reject(
                    st,
                    S_IOERR,
                    BlkFault::BadLength,
                    "read request with device-readable data buffers".into(),
                ));
            }
            rw(wdata, false)
        }
        VIRTIO_BLK_T_OUT => {
            if !wdata.is_empty() {
                return Err(reject(
                    st,
                    S_IOERR,
                    BlkFault::BadLength,
                    "write request with device-writable data buffers".into(),
                ));
            }
            rw(rdata, true)
        }
        VIRTIO_BLK_T_FLUSH => Ok(Request {
            head,
            status,
            op: ReqOp::Flush,
            data: Vec::new(),
        }),
        VIRTIO_BLK_T_GET_ID => {
            if wdata.is_empty() {
                return Err(reject(
                    st,
                    S_IOERR,
                    BlkFault::BadLength,
                    "GET_ID without a device-writable id buffer".into(),
                ));
            }
            Ok(Request {
                head,
                status,
                op: ReqOp::GetId,
                data: wdata,
            })
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = type_ == VIRTIO_BLK_T_DISCARD;
            if disk.readonly() {
                return Err(reject(
                    st,
                    S_IOERR,
                    BlkFault::ReadOnly,
                    "discard/write-zeroes on a read-only disk".into(),
                ));
            }
            let len = total_len(&rdata);
            if len == 0 || len % DWZ_SEG_LEN != 0 || len / DWZ_SEG_LEN > u64::from(MAX_DISCARD_SEG)
            {
                return Err(reject(
                    st,
                    S_IOERR,
                    BlkFault::BadDiscard,
                    format!("discard/write-zeroes payload of {len} bytes"),
                ));
            }
            let mut seg = DwzSeg::default();
            if read_segments(mem, &rdata, seg.as_mut_slice()).is_err() {
                return Err(reject(
                    st,
                    S_IOERR,
                    BlkFault::GuestMemory,
                    "cannot read the discard segment".into(),
                ));
            }
            let dsector = u64::from_le(seg.sector);
            let sectors = u32::from_le(seg.num_sectors);
            let flags = u32::from_le(seg.flags);
            let allowed_flags = if discard {
                0
            } else {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            };
            if flags & !allowed_flags != 0 {
                return Err(reject(
                    st,
                    S_UNSUPP,
                    BlkFault::BadDiscard,
                    format!("discard/write-zeroes flags {flags:#x}"),
                ));
            }
            if sectors > MAX_DISCARD_SECTORS {
                return Err(reject(
                    st,
                    S_IOERR,
                    BlkFault::BadDiscard,
                    format!("discard/write-zeroes of {sectors} sectors"),
                ));
            }
            if !check_range(disk, dsector, u64::from(sectors)) {
                return Err(reject(
                    st,
                    S_IOERR,
                    BlkFault::OutOfRange,
                    format!("discard/write-zeroes {dsector}+{sectors} past the end"),
                ));
            }
            let op = if discard {
                ReqOp::Discard {
                    sector: dsector,
                    sectors,
                }
            } else {
                ReqOp::WriteZeroes {
                    sector: dsector,
                    sectors,
                    unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                }
            };
            Ok(Request {
                head,
                status,
                op,
                data: Vec::new(),
            })
        }
        other => Err(reject(
            st,
            S_UNSUPP,
            BlkFault::Unsupported,
            format!("unsupported request type {other}"),
        )),
    }
}
