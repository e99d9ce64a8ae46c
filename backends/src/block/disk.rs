//! The disk image: a raw file (or block device) opened once and shared by all queues of a
//! device. Synchronous I/O lives here; the io_uring path is in `queue.rs`, per queue.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use log::info;
use thiserror::Error;

/// virtio-blk sectors are always 512 bytes.
pub const SECTOR_SIZE: u64 = 512;
/// Memory alignment used for O_DIRECT bounce buffers and the "is this buffer aligned" test.
pub const DIRECT_MEM_ALIGN: usize = 4096;
/// Length/offset alignment required for O_DIRECT without a bounce buffer.
pub const DIRECT_LEN_ALIGN: usize = 512;
/// The most iovecs handed to one preadv/pwritev/io_uring operation.
pub const MAX_IOVECS: usize = 1024;

/// Which I/O engine the queues use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EngineChoice {
    /// io_uring when the kernel offers it (probed at open), else synchronous.
    #[default]
    Auto,
    /// io_uring or fail to open.
    IoUring,
    /// Synchronous preadv/pwritev/fdatasync on the queue thread.
    Sync,
}

/// The engine in use after the probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    /// Requests are submitted to a per-queue io_uring and completed later.
    IoUring,
    /// Requests complete inside the call that popped them.
    Sync,
}

/// How to open a disk image.
#[derive(Clone, Debug, Default)]
pub struct BlockOptions {
    /// Path of the raw image file or block device.
    pub path: PathBuf,
    /// Open read-only, offer VIRTIO_BLK_F_RO and refuse writes.
    pub readonly: bool,
    /// Open with O_DIRECT (bypass the host page cache). Unaligned guest buffers go through
    /// an aligned bounce buffer.
    pub direct: bool,
    /// Engine preference.
    pub engine: EngineChoice,
    /// Serial returned by VIRTIO_BLK_T_GET_ID (at most 20 bytes are used). Default: derived
    /// from the image's device and inode numbers.
    pub serial: Option<String>,
}

/// Errors opening or using a disk image.
#[derive(Debug, Error)]
pub enum BlockError {
    /// The image could not be opened.
    #[error("cannot open disk image '{path}'")]
    Open {
        /// The image path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The size of the image could not be read.
    #[error("cannot read the size of disk image '{path}'")]
    Size {
        /// The image path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// io_uring was requested but the kernel refused it.
    #[error("io_uring is not available for disk image '{path}'")]
    IoUringUnavailable {
        /// The image path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Creating a queue's io_uring or its eventfd failed.
    #[error("cannot set up the io_uring of a virtio-blk queue")]
    QueueSetup(#[source] io::Error),
    /// The queue size is not a power of two in 1..=32768.
    #[error("invalid virtio-blk queue size {0} (must be a power of two, at most 32768)")]
    QueueSize(u16),
}

/// A raw disk image shared by the queues of one virtio-blk device (`Arc<BlockBackend>`).
#[derive(Debug)]
pub struct BlockBackend {
    file: File,
    path: PathBuf,
    size: u64,
    readonly: bool,
    direct: bool,
    engine: EngineKind,
    id: [u8; 20],
}

impl BlockBackend {
    /// Opens the image, probes io_uring (per `opts.engine`) and logs which engine is used.
    pub fn open(opts: &BlockOptions) -> Result<Self, BlockError> {
        let path = opts.path.clone();
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.readonly);
        let mut flags = libc::O_CLOEXEC;
        if opts.direct {
            flags |= libc::O_DIRECT;
        }
        oo.custom_flags(flags);
        let mut file = oo.open(&path).map_err(|source| BlockError::Open {
            path: path.clone(),
            source,
        })?;
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: path.clone(),
                source,
            })?;
        let engine = match opts.engine {
            EngineChoice::Sync => EngineKind::Sync,
            EngineChoice::Auto => match probe_io_uring() {
                Ok(()) => EngineKind::IoUring,
                Err(e) => {
                    info!(
                        "disk '{}': io_uring unavailable ({e}), using synchronous I/O",
                        path.display()
                    );
                    EngineKind::Sync
                }
            },
            EngineChoice::IoUring => {
                probe_io_uring().map_err(|source| BlockError::IoUringUnavailable {
                    path: path.clone(),
                    source,
                })?;
                EngineKind::IoUring
            }
        };
        let id = make_id(opts.serial.as_deref(), &file);
        info!(
            "disk '{}': {} bytes, {}{}engine {:?}",
            path.display(),
            size,
            if opts.readonly { "read-only, " } else { "" },
            if opts.direct { "O_DIRECT, " } else { "" },
            engine
        );
        Ok(BlockBackend {
            file,
            path,
            size,
            readonly: opts.readonly,
            direct: opts.direct,
            engine,
            id,
        })
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Size in bytes (a trailing partial sector is not addressable by the guest).
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Capacity in 512-byte sectors (the `capacity` config field).
    pub fn capacity_sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }
    /// Whether the image is read-only.
    pub fn readonly(&self) -> bool {
        self.readonly
    }
    /// Whether the image was opened with O_DIRECT.
    pub fn direct(&self) -> bool {
        self.direct
    }
    /// The engine the queues use.
    pub fn engine(&self) -> EngineKind {
        self.engine
    }
    /// The 20-byte GET_ID answer.
    pub fn id(&self) -> &[u8; 20] {
        &self.id
    }
    pub(crate) fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// fdatasync of the image: durable once it returns.
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Deallocates a byte range (PUNCH_HOLE | KEEP_SIZE). `Ok(false)` when the filesystem
    /// does not support it (discard is a hint, the guest gets OK).
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<bool> {
        match fallocate(
            self.fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(true),
            Err(e) if is_unsupported(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Zeroes a byte range: ZERO_RANGE (or PUNCH_HOLE when `unmap`), falling back to writing
    /// zeroes when the filesystem supports neither.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let mode = write_zeroes_mode(unmap);
        match fallocate(self.fd(), mode, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if is_unsupported(&e) => self.write_zeroes_by_writing(offset, len),
            Err(e) => Err(e),
        }
    }

    /// Writes zero-filled buffers over the range (the fallback for WRITE_ZEROES).
    pub(crate) fn write_zeroes_by_writing(&self, offset: u64, len: u64) -> io::Result<()> {
        const CHUNK: usize = 1 << 20;
        let mut buf = AlignedBuf::new(CHUNK.min(len as usize).max(1));
        let mut done = 0u64;
        while done < len {
            let n = ((len - done) as usize).min(CHUNK);
            let mut iov = [buf.iovec(n)];
            rw_all(self.fd(), &mut iov, offset + done, true)?;
            done += n as u64;
        }
        Ok(())
    }
}

pub(crate) fn write_zeroes_mode(unmap: bool) -> i32 {
    if unmap {
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
    } else {
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
    }
}

pub(crate) fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let l = i64::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    loop {
        // SAFETY: fallocate only takes integers; an invalid fd or range is reported as an
        // error, it cannot corrupt our memory.
        let r = unsafe { libc::fallocate(fd, mode, off, l) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn make_id(serial: Option<&str>, file: &File) -> [u8; 20] {
    let mut id = [0u8; 20];
    let s = match serial {
        Some(s) => s.to_string(),
        None => match file.metadata() {
            Ok(m) => format!("{:x}-{:x}", m.dev(), m.ino()),
            Err(_) => String::from("backends-blk"),
        },
    };
    let b = s.as_bytes();
    let n = b.len().min(id.len());
    id[..n].copy_from_slice(&b[..n]);
    id
}

/// Checks that io_uring can be created, supports the opcodes the engine uses, and can be
/// restricted to them (IORING_SETUP_R_DISABLED and IORING_REGISTER_RESTRICTIONS, Linux
/// 5.10): the engine's rings are (`queue::restricted_ring`).
pub fn probe_io_uring() -> io::Result<()> {
    use io_uring::{IoUring, Probe};
    let ring = IoUring::new(4)?;
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    drop(ring);
    super::queue::restricted_ring(4, None, None)?;
    for code in super::queue::RING_OPS {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring opcode {code} not supported"),
            ));
        }
    }
    Ok(())
}

/// A heap buffer whose start is aligned to [`DIRECT_MEM_ALIGN`] (for O_DIRECT).
#[derive(Debug)]
pub(crate) struct AlignedBuf {
    vec: Vec<u8>,
    off: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn new(len: usize) -> Self {
        // Round the length up so that an O_DIRECT transfer of the whole buffer stays aligned.
        let vec = vec![0u8; len + DIRECT_MEM_ALIGN];
        let addr = vec.as_ptr() as usize;
        let off = (DIRECT_MEM_ALIGN - addr % DIRECT_MEM_ALIGN) % DIRECT_MEM_ALIGN;
        AlignedBuf { vec, off, len }
    }
    pub fn as_slice(&self) -> &[u8] {
        &self.vec[self.off..self.off + self.len]
    }
    /// Bytes allocated for it.
    pub fn capacity(&self) -> usize {
        self.vec.len()
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.vec[self.off..self.off + self.len]
    }
    /// An iovec over the first `n` bytes (`n` is clamped to the length).
    pub fn iovec(&mut self, n: usize) -> libc::iovec {
        let n = n.min(self.len);
        libc::iovec {
            iov_base: self.as_mut_slice().as_mut_ptr().cast(),
            iov_len: n,
        }
    }
}

/// Whether every iovec satisfies O_DIRECT alignment.
pub(crate) fn iovecs_aligned(iovs: &[libc::iovec]) -> bool {
    iovs.iter()
        .all(|v| (v.iov_base as usize) % DIRECT_MEM_ALIGN == 0 && v.iov_len % DIRECT_LEN_ALIGN == 0)
}

/// Drops the first `n` bytes from `iovs`, returning the index of the first non-empty iovec.
pub(crate) fn advance_iovecs(iovs: &mut [libc::iovec], mut n: usize) -> usize {
    let mut i = 0;
    while i < iovs.len() && n > 0 {
        let v = &mut iovs[i];
        if n >= v.iov_len {
            n -= v.iov_len;
            v.iov_len = 0;
            i += 1;
        } else {
            v.iov_base = (v.iov_base as *mut u8).wrapping_add(n).cast();
            v.iov_len -= n;
            n = 0;
        }
    }
    while i < iovs.len() && iovs[i].iov_len == 0 {
        i += 1;
    }
    i
}

/// preadv/pwritev all of `iovs` at `offset`, retrying short transfers and EINTR. A read that
/// hits the end of the file fails with `UnexpectedEof`.
///
/// The iovecs must describe memory that is valid for the transfer (guest memory validated by
/// `host_iovecs`, or an owned buffer).
pub(crate) fn rw_all(
    fd: RawFd,
    iovs: &mut [libc::iovec],
    mut offset: u64,
    write: bool,
) -> io::Result<()> {
    let mut start = advance_iovecs(iovs, 0);
    while start < iovs.len() {
        let end = (start + MAX_IOVECS).min(iovs.len());
        let chunk = &iovs[start..end];
        let off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let r = if write {
            // SAFETY: the iovecs point to memory readable for their length (see the function
            // contract); the kernel only reads from it.
            unsafe { libc::pwritev(fd, chunk.as_ptr(), chunk.len() as i32, off) }
        } else {
            // SAFETY: the iovecs point to memory writable for their length (guest memory
            // checked for write, or an owned buffer); the kernel writes only within it.
            unsafe { libc::preadv(fd, chunk.as_ptr(), chunk.len() as i32, off) }
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(if write {
                io::Error::from(io::ErrorKind::WriteZero)
            } else {
                io::Error::from(io::ErrorKind::UnexpectedEof)
            });
        }
        offset += r as u64;
        start += advance_iovecs(&mut iovs[start..], r as usize);
    }
    Ok(())
}

/// One `preadv2(RWF_NOWAIT)` of `iovs` at `offset`: reads only what the page cache holds,
/// never waits for the disk. `Ok(n)`: `n` bytes read (fewer than asked when part of the range
/// is not cached); `Err(EAGAIN)`: nothing cached at `offset`; `Err(EOPNOTSUPP)`: the file
/// system does not support the flag.
///
/// The iovecs must describe memory writable for their length (guest memory validated by
/// `host_iovecs`, or an owned buffer), and be at most [`MAX_IOVECS`].
pub(crate) fn read_cached(fd: RawFd, iovs: &[libc::iovec], offset: u64) -> io::Result<usize> {
    let off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let n = i32::try_from(iovs.len().min(MAX_IOVECS))
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    loop {
        // SAFETY: the iovecs point to memory writable for their length (see the function
        // contract); the kernel writes only within it and keeps no reference after returning.
        let r = unsafe { libc::preadv2(fd, iovs.as_ptr(), n, off, libc::RWF_NOWAIT) };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempfile::TempFile;

    #[test]
    fn advance_iovecs_partial() {
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        let mut iovs = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: 8,
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: 8,
            },
        ];
        assert_eq!(advance_iovecs(&mut iovs, 10), 1);
        assert_eq!(iovs[1].iov_len, 6);
        assert_eq!(iovs[1].iov_base as usize, b.as_ptr() as usize + 2);
        assert_eq!(advance_iovecs(&mut iovs, 16), 2);
    }

    #[test]
    fn aligned_buf_is_aligned() {
        for len in [1, 512, 4096, 10000] {
            let mut b = AlignedBuf::new(len);
            assert_eq!(b.as_slice().len(), len);
            assert_eq!(b.iovec(len).iov_base as usize % DIRECT_MEM_ALIGN, 0);
        }
    }

    #[test]
    fn open_missing_image_is_a_clear_error() {
        let e = BlockBackend::open(&BlockOptions {
            path: "/nonexistent/disk.img".into(),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/disk.img"), "{e}");
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn write_zeroes_fallback_writes_zeroes() {
        let f = TempFile::new().unwrap();
        std::fs::write(f.as_path(), vec![0xaau8; 8192]).unwrap();
        let d = BlockBackend::open(&BlockOptions {
            path: f.as_path().into(),
            engine: EngineChoice::Sync,
            ..Default::default()
        })
        .unwrap();
        d.write_zeroes_by_writing(512, 1024).unwrap();
        let data = std::fs::read(f.as_path()).unwrap();
        assert!(data[..512].iter().all(|&b| b == 0xaa));
        assert!(data[512..1536].iter().all(|&b| b == 0));
        assert!(data[1536..].iter().all(|&b| b == 0xaa));
    }
}
