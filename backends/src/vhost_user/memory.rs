//! The frontend's memory tables, checked by the relay before vhost-user-backend sees them.
//!
//! vhost-user-backend mmaps every region of a SET_MEM_TABLE / ADD_MEM_REG at once, and
//! vm-memory maps past the end of a file without complaint: a region larger than its memfd
//! is live from then on, and the first worker that touches a page past the end of the file
//! dies of SIGBUS, with the whole daemon. So the relay parses the table, checks every region
//! against its fd and against the other regions, and only forwards a table that is sound.
//! It keeps the regions installed on the connection ([`Installed`]), which ADD_MEM_REG
//! grows, REM_MEM_REG shrinks and SET_MEM_TABLE replaces, so that ADD_MEM_REG and the ring
//! addresses of SET_VRING_ADDR are checked against them.

use std::fmt;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Most regions one SET_MEM_TABLE carries (one fd each; QEMU's baseline is 8 too).
pub const MAX_TABLE_REGIONS: usize = 8;
/// Most regions installed at once: what vhost-user-backend answers to GET_MAX_MEM_SLOTS.
pub const MAX_SLOTS: usize = 509;
/// Size of one region descriptor on the wire.
const REGION: usize = 32;

/// One region as the frontend describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// Guest physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// The frontend's virtual address of the region (what ring addresses are given in).
    pub uaddr: u64,
    /// Offset of the region in its fd.
    pub offset: u64,
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "guest {:#x}, {:#x} bytes, frontend address {:#x}, fd offset {:#x}",
            self.gpa, self.size, self.uaddr, self.offset
        )
    }
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8)
        .map(|s| u64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]))
}

fn region_at(b: &[u8], at: usize) -> Option<Region> {
    Some(Region {
        gpa: u64_at(b, at)?,
        size: u64_at(b, at + 8)?,
        uaddr: u64_at(b, at + 16)?,
        offset: u64_at(b, at + 24)?,
    })
}

/// The regions of a SET_MEM_TABLE body (u32 count, u32 padding, the regions).
pub fn parse_table(body: &[u8]) -> Result<Vec<Region>, String> {
    let n = body
        .get(0..4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as usize)
        .ok_or_else(|| format!("{}-byte body, shorter than its header", body.len()))?;
    if n == 0 || n > MAX_TABLE_REGIONS {
        return Err(format!("{n} regions (expected 1 to {MAX_TABLE_REGIONS})"));
    }
    if body.len() != 8 + n * REGION {
        return Err(format!(
            "{}-byte body for {n} regions (expected {})",
            body.len(),
            8 + n * REGION
        ));
    }
    Ok((0..n)
        .filter_map(|i| region_at(body, 8 + i * REGION))
        .collect())
}

/// The region of an ADD_MEM_REG / REM_MEM_REG body (u64 padding, one region).
pub fn parse_single(body: &[u8]) -> Result<Region, String> {
    if body.len() != 8 + REGION {
        return Err(format!(
            "{}-byte body (expected {})",
            body.len(),
            8 + REGION
        ));
    }
    region_at(body, 8).ok_or_else(|| "truncated region".to_string())
}

/// Why a region is refused, as one phrase.
fn check_alone(r: &Region, fd: BorrowedFd<'_>) -> Result<(), String> {
    if r.size == 0 {
        return Err("size 0".into());
    }
    let end = |base: u64, what: &str| {
        base.checked_add(r.size)
            .ok_or_else(|| format!("{what} + size overflows 64 bits"))
    };
    end(r.gpa, "guest address")?;
    end(r.uaddr, "frontend address")?;
    let file_end = end(r.offset, "fd offset")?;
    // SAFETY: libc::stat is plain data; fstat fills it in and only reads `fd`, which is open
    // for the duration of the call (borrowed).
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `st` is a valid out pointer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(format!("fstat: {}", std::io::Error::last_os_error()));
    }
    let len = match st.st_mode & libc::S_IFMT {
        // memfd, tmpfs, hugetlbfs, a plain file: pages past its end are SIGBUS.
        libc::S_IFREG => st.st_size as u64,
        // A block device maps like a file of its size.
        libc::S_IFBLK => block_device_size(fd)?,
        // Character devices (device DAX, /dev/mem-like) check the range in their own mmap
        // and refuse it there: no SIGBUS to fear, nothing to compare against.
        libc::S_IFCHR => return Ok(()),
        _ => {
            return Err(
                "its fd is not a file or a device (sockets, pipes, eventfds cannot \
                        be guest memory)"
                    .into(),
            )
        }
    };
    if file_end > len {
        return Err(format!(
            "runs past the end of its file (fd offset + size = {file_end:#x}, file size \
             {len:#x})"
        ));
    }
    Ok(())
}

/// The size of a block device (BLKGETSIZE64: does not move the file offset the frontend
/// shares with us, as lseek would).
fn block_device_size(fd: BorrowedFd<'_>) -> Result<u64, String> {
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at `size`.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), BLKGETSIZE64 as _, &mut size) };
    if r != 0 {
        return Err(format!("BLKGETSIZE64: {}", std::io::Error::last_os_error()));
    }
    Ok(size)
}

/// Whether [a, a + alen) and [b, b + blen) share a byte (both ends known not to overflow).
fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    a < b + blen && b < a + alen
}

/// Why `r` cannot sit beside `other`.
fn check_pair(r: &Region, other: &Region) -> Result<(), String> {
    if overlaps(r.gpa, r.size, other.gpa, other.size) {
        return Err(format!(
            "its guest addresses overlap those of the region at guest {:#x} ({:#x} bytes)",
            other.gpa, other.size
        ));
    }
    if overlaps(r.uaddr, r.size, other.uaddr, other.size) {
        return Err(format!(
            "its frontend addresses overlap those of the region at guest {:#x} (frontend \
             address {:#x}, {:#x} bytes)",
            other.gpa, other.uaddr, other.size
        ));
    }
    Ok(())
}

/// A refused table: which region, and why.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    /// The region's index in its message (0 for ADD_MEM_REG), if one region is at fault.
    pub index: Option<usize>,
    /// The region, if one is at fault.
    pub region: Option<Region>,
    /// Why.
    pub why: String,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.index, &self.region) {
            (Some(i), Some(r)) => write!(f, "region {i} ({r}): {}", self.why),
            _ => f.write_str(&self.why),
        }
    }
}

fn refuse(index: usize, r: &Region, why: String) -> Refused {
    Refused {
        index: Some(index),
        region: Some(*r),
        why,
    }
}

/// The regions installed on one connection, as the relay let them through.
#[derive(Debug, Default)]
pub struct Installed {
    regions: Vec<Region>,
}

impl Installed {
    /// Checks a SET_MEM_TABLE (its regions and fds) and, when sound, records it as the table
    /// that replaces the installed one.
    pub fn set_table(&mut self, body: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), Refused> {
        let regions = parse_table(body).map_err(|why| Refused {
            index: None,
            region: None,
            why,
        })?;
        if fds.len() != regions.len() {
            return Err(Refused {
                index: None,
                region: None,
                why: format!("{} regions but {} fds", regions.len(), fds.len()),
            });
        }
        for (i, (r, fd)) in regions.iter().zip(fds).enumerate() {
            check_alone(r, *fd).map_err(|why| refuse(i, r, why))?;
            for other in &regions[..i] {
                check_pair(r, other).map_err(|why| refuse(i, r, why))?;
            }
        }
        self.regions = regions;
        Ok(())
    }

    /// Checks an ADD_MEM_REG against its fd and the installed regions; records it when sound.
    pub fn add(&mut self, body: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), Refused> {
        let r = parse_single(body).map_err(|why| Refused {
            index: None,
            region: None,
            why,
        })?;
        let [fd] = fds else {
            return Err(refuse(0, &r, format!("{} fds (expected 1)", fds.len())));
        };
        if self.regions.len() >= MAX_SLOTS {
            return Err(refuse(
                0,
                &r,
                format!("{MAX_SLOTS} regions already installed"),
            ));
        }
        check_alone(&r, *fd).map_err(|why| refuse(0, &r, why))?;
        for other in &self.regions {
            check_pair(&r, other).map_err(|why| refuse(0, &r, why))?;
        }
        self.regions.push(r);
        Ok(())
    }

    /// Forgets the region a REM_MEM_REG removes (vhost-user-backend matches it by guest
    /// address and size; one it does not find ends the connection there).
    pub fn remove(&mut self, body: &[u8]) {
        if let Ok(r) = parse_single(body) {
            self.regions
                .retain(|x| !(x.gpa == r.gpa && x.size == r.size));
        }
    }

    /// Whether any region is installed.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// Whether the frontend addresses [uaddr, uaddr + len) all lie in installed regions.
    pub fn covers(&self, uaddr: u64, len: u64) -> bool {
        let Some(end) = uaddr.checked_add(len).filter(|_| len > 0) else {
            return false;
        };
        let mut at = uaddr;
        // Regions are disjoint: walk from region to region while they are contiguous.
        while at < end {
            match self
                .regions
                .iter()
                .find(|r| r.uaddr <= at && at - r.uaddr < r.size)
            {
                Some(r) => at = r.uaddr + r.size,
                None => return false,
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::{AsFd, FromRawFd};

    fn memfd(size: u64) -> File {
        // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"memory-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` was just created and is owned by nobody else.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(size).unwrap();
        f
    }

    fn table(regions: &[Region]) -> Vec<u8> {
        let mut b = (regions.len() as u32).to_le_bytes().to_vec();
        b.extend_from_slice(&[0; 4]);
        for r in regions {
            for v in [r.gpa, r.size, r.uaddr, r.offset] {
                b.extend_from_slice(&v.to_le_bytes());
            }
        }
        b
    }

    fn single(r: Region) -> Vec<u8> {
        let mut b = vec![0u8; 8];
        b.extend_from_slice(&table(&[r])[8..]);
        b
    }

    const MIB: u64 = 1 << 20;

    fn reg(gpa: u64, size: u64, uaddr: u64, offset: u64) -> Region {
        Region {
            gpa,
            size,
            uaddr,
            offset,
        }
    }

    #[test]
    fn sound_table_is_installed_and_covers_its_range() {
        let (a, b) = (memfd(MIB), memfd(2 * MIB));
        let mut inst = Installed::default();
        let t = table(&[reg(0, MIB, 0x7000_0000, 0), reg(MIB, MIB, 0x7010_0000, MIB)]);
        inst.set_table(&t, &[a.as_fd(), b.as_fd()]).unwrap();
        assert!(inst.covers(0x7000_0000, 2 * MIB), "contiguous regions");
        assert!(!inst.covers(0x7000_0000, 2 * MIB + 1));
        assert!(!inst.covers(0x6fff_ffff, 2));
        assert!(!inst.covers(u64::MAX, 2));
    }

    #[test]
    fn region_past_the_end_of_its_file_is_refused() {
        let small = memfd(4096);
        let mut inst = Installed::default();
        let e = inst
            .set_table(&table(&[reg(0, MIB, 0x7000_0000, 0)]), &[small.as_fd()])
            .unwrap_err();
        assert_eq!(e.index, Some(0));
        assert!(e.why.contains("past the end of its file"), "{e}");
        // Within the size, but the offset pushes it past the end.
        let f = memfd(MIB);
        let e = inst
            .set_table(&table(&[reg(0, MIB, 0x7000_0000, 4096)]), &[f.as_fd()])
            .unwrap_err();
        assert!(e.why.contains("past the end"), "{e}");
        assert!(inst.is_empty(), "nothing recorded from refused tables");
    }

    #[test]
    fn bad_counts_sizes_and_overflows_are_refused() {
        let a = memfd(MIB);
        let mut inst = Installed::default();
        let one = table(&[reg(0, MIB, 0x7000_0000, 0)]);
        assert!(inst.set_table(&one, &[]).unwrap_err().why.contains("0 fds"));
        assert!(inst
            .set_table(&one, &[a.as_fd(), a.as_fd()])
            .unwrap_err()
            .why
            .contains("2 fds"));
        assert!(inst
            .set_table(&table(&[]), &[])
            .unwrap_err()
            .why
            .contains("0 regions"));
        let nine = table(&[reg(0, 1, 0, 0); 9]);
        assert!(inst
            .set_table(&nine, &[])
            .unwrap_err()
            .why
            .contains("9 regions"));
        assert!(inst
            .set_table(&one[..one.len() - 1], &[a.as_fd()])
            .unwrap_err()
            .why
            .contains("body"));
        for (r, want) in [
            (reg(0, 0, 0x7000_0000, 0), "size 0"),
            (reg(u64::MAX - 100, 4096, 0x7000_0000, 0), "guest address"),
            (reg(0, 4096, u64::MAX - 100, 0), "frontend address"),
            (reg(0, 4096, 0x7000_0000, u64::MAX - 100), "fd offset"),
        ] {
            let e = inst.set_table(&table(&[r]), &[a.as_fd()]).unwrap_err();
            assert!(e.why.contains(want), "{r}: {e}");
        }
    }

    #[test]
    fn overlaps_are_refused() {
        let (a, b) = (memfd(MIB), memfd(MIB));
        let mut inst = Installed::default();
        let gpa = table(&[
            reg(0, MIB, 0x7000_0000, 0),
            reg(MIB / 2, MIB, 0x8000_0000, 0),
        ]);
        let e = inst.set_table(&gpa, &[a.as_fd(), b.as_fd()]).unwrap_err();
        assert_eq!(e.index, Some(1));
        assert!(e.why.contains("guest addresses overlap"), "{e}");
        let ua = table(&[reg(0, MIB, 0x7000_0000, 0), reg(MIB, MIB, 0x7008_0000, 0)]);
        let e = inst.set_table(&ua, &[a.as_fd(), b.as_fd()]).unwrap_err();
        assert!(e.why.contains("frontend addresses overlap"), "{e}");
    }

    #[test]
    fn add_and_remove_track_the_installed_regions() {
        let (a, b, small) = (memfd(MIB), memfd(MIB), memfd(4096));
        let mut inst = Installed::default();
        inst.add(&single(reg(0, MIB, 0x7000_0000, 0)), &[a.as_fd()])
            .unwrap();
        let e = inst
            .add(&single(reg(MIB / 2, MIB, 0x8000_0000, 0)), &[b.as_fd()])
            .unwrap_err();
        assert!(e.why.contains("guest addresses overlap"), "{e}");
        let e = inst
            .add(&single(reg(4 * MIB, MIB, 0x9000_0000, 0)), &[small.as_fd()])
            .unwrap_err();
        assert!(e.why.contains("past the end"), "{e}");
        let e = inst
            .add(&single(reg(4 * MIB, MIB, 0x9000_0000, 0)), &[])
            .unwrap_err();
        assert!(e.why.contains("0 fds"), "{e}");
        // Once the first region is removed, its range is free again.
        inst.remove(&single(reg(0, MIB, 0x7000_0000, 0)));
        assert!(inst.is_empty());
        inst.add(&single(reg(MIB / 2, MIB, 0x8000_0000, 0)), &[b.as_fd()])
            .unwrap();
        assert!(inst.covers(0x8000_0000, MIB));
    }

    #[test]
    fn fds_that_are_not_memory_are_refused() {
        let (sock, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut inst = Installed::default();
        let e = inst
            .set_table(&table(&[reg(0, 4096, 0x7000_0000, 0)]), &[sock.as_fd()])
            .unwrap_err();
        assert!(e.why.contains("not a file or a device"), "{e}");
    }
}
