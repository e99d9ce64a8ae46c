//! The vhost-user serving layer driven by a frontend built from fuzzer bytes: a sequence of
//! messages with fds (memfds of chosen sizes and contents, eventfds, sockets) sent over a
//! socketpair into the real [`Relay`] (its threads, its whole-message reader,
//! [`Conn::inspect`](crate::vhost_user::relay), the memory-table checks, the inflight
//! handling), with either a fake back-end that records what the relay forwards
//! ([`fuzz_vhost_user_relay`]) or a real vhost-user-backend daemon behind it
//! ([`fuzz_vhost_user_serve`]).
//!
//! What the fake back-end mode asserts (a panic is a finding):
//! - what reaches the back-end is, in order, what the frontend sent (SET_PROTOCOL_FEATURES
//!   without INFLIGHT_SHMFD, GET/SET_INFLIGHT_FD answered by the relay and never forwarded, a
//!   SET_FEATURES injected only right before an early SET_VRING_ENABLE), up to the first
//!   message it refused: nothing after a refusal, and a failure status answered only for
//!   a message that was not forwarded;
//! - every forwarded memory region lies inside its file (size > 0, no overflow, the fd a
//!   regular file holding offset + size) and overlaps no other installed region; a forwarded
//!   ring lies inside the installed regions; a forwarded queue size is a power of two;
//! - every inflight region the relay accepts (SET_INFLIGHT_FD) or creates (GET_INFLIGHT_FD)
//!   is read and written whole through its mapping (a mapping past the end of its file
//!   would die of SIGBUS), and a GET_INFLIGHT_FD answer describes its file;
//! - the back-end's replies reach the frontend unchanged but for INFLIGHT_SHMFD added to
//!   GET_PROTOCOL_FEATURES.
//!
//! Input: byte 0 holds flags (bit 0: the back-end keeps no inflight records; bit 1: the
//! back-end sends replies first, built from the next bytes), then operations, each an
//! opcode byte and its arguments (see [`Gen::message`]); missing bytes read as zero.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread;

use crate::inflight::{region_size, InflightMessage, InflightRegion};
use crate::vhost_user::relay::{
    self, encode, read_message, send_message, Message, Relay, ADD_MEM_REG, GET_INFLIGHT_FD,
    GET_PROTOCOL_FEATURES, HEADER, PROTOCOL_FEATURES, PROTOCOL_F_INFLIGHT_SHMFD,
    PROTOCOL_F_REPLY_ACK, REM_MEM_REG, SET_FEATURES, SET_INFLIGHT_FD, SET_MEM_TABLE,
    SET_PROTOCOL_FEATURES, SET_VRING_ADDR, SET_VRING_ENABLE, SET_VRING_NUM,
};
use crate::vhost_user::{Frontends, Served, Stop};

const VERSION: u32 = 1;
const REPLY: u32 = 4;
const NEED_REPLY: u32 = 8;
const SET_OWNER: u32 = 3;
const SET_VRING_BASE: u32 = 10;
const SET_VRING_KICK: u32 = 12;
const MAX_MESSAGES: usize = 48;
const MAX_REPLIES: usize = 8;
const MIB: u64 = 1 << 20;
/// Where the frontend's regions are mapped, in its address space (uaddr).
const UADDR: u64 = 0x7f00_0000_0000;

/// Reads the input; bytes past its end read as zero.
struct Bytes<'a> {
    d: &'a [u8],
    i: usize,
}

impl Bytes<'_> {
    fn done(&self) -> bool {
        self.i >= self.d.len()
    }
    fn u8(&mut self) -> u8 {
        let b = self.d.get(self.i).copied().unwrap_or(0);
        self.i += 1;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | u32::from(self.u16()) << 16
    }
    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let from = self.i.min(self.d.len());
        let to = (from + n).min(self.d.len());
        self.i = from + n;
        &self.d[from..to]
    }
}

fn memfd(size: u64, fill: &[u8]) -> Option<OwnedFd> {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let raw = unsafe { libc::memfd_create(c"fuzz-mem".as_ptr(), libc::MFD_CLOEXEC) };
    if raw < 0 {
        return None;
    }
    // SAFETY: `raw` is a new fd nothing else owns.
    let f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(raw) });
    f.set_len(size).ok()?;
    let n = fill.len().min(usize::try_from(size).unwrap_or(usize::MAX));
    (&f).write_all(&fill[..n]).ok()?;
    Some(f.into())
}

fn eventfd(signalled: bool) -> Option<OwnedFd> {
    // SAFETY: eventfd returns a new fd or -1 (checked).
    let raw = unsafe { libc::eventfd(u32::from(signalled), libc::EFD_CLOEXEC) };
    // SAFETY: `raw` is a new fd nothing else owns.
    (raw >= 0).then(|| unsafe { OwnedFd::from_raw_fd(raw) })
}

/// The size of the regular file behind `fd`; None for anything else.
fn file_size(fd: BorrowedFd<'_>) -> Option<u64> {
    // SAFETY: libc::stat is plain data, all-zero valid.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open for the call; `st` is a valid out pointer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return None;
    }
    (st.st_mode & libc::S_IFMT == libc::S_IFREG).then_some(st.st_size as u64)
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

#[derive(Clone, Copy, Debug)]
struct Region {
    gpa: u64,
    size: u64,
    uaddr: u64,
    offset: u64,
}

impl Region {
    fn bytes(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        for (i, v) in [self.gpa, self.size, self.uaddr, self.offset]
            .into_iter()
            .enumerate()
        {
            b[8 * i..8 * i + 8].copy_from_slice(&v.to_le_bytes());
        }
        b
    }
    fn parse(b: &[u8]) -> Option<Region> {
        Some(Region {
            gpa: u64_at(b, 0)?,
            size: u64_at(b, 8)?,
            uaddr: u64_at(b, 16)?,
            offset: u64_at(b, 24)?,
        })
    }
}

/// One message as sent by the frontend.
struct Sent {
    bytes: Vec<u8>,
    fds: usize,
    /// A whole message (header and the body it announces), not loose bytes.
    framed: bool,
}

impl Sent {
    fn code(&self) -> u32 {
        u32_at(&self.bytes, 0).unwrap_or(0)
    }
}

/// Builds messages from the input.
struct Gen<'a> {
    r: Bytes<'a>,
    /// Regions generated so far (for REM_MEM_REG and ring addresses).
    regions: Vec<Region>,
    /// Fill the memfds with input bytes (for a real back-end to serve requests from).
    fill: bool,
}

impl Gen<'_> {
    fn flags(&mut self) -> u32 {
        let f = self.r.u8();
        match f >> 6 {
            // Rarely, any flags at all (a bad version ends the connection).
            3 if f & 1 != 0 => self.r.u32(),
            _ => VERSION | if f & 1 != 0 { NEED_REPLY } else { 0 },
        }
    }

    fn file_size(&mut self) -> u64 {
        let c = self.r.u8();
        let n = u64::from(c & 63);
        match c >> 6 {
            0 => n * 4096,
            1 => n * 64 * 1024,
            2 => n * 4096 + u64::from(self.r.u16()),
            _ => MIB,
        }
    }

    fn mem_fd(&mut self) -> (Option<OwnedFd>, u64) {
        let kind = self.r.u8();
        let size = self.file_size();
        let fd = match kind % 16 {
            0 => eventfd(false),
            1 => UnixStream::pair().ok().map(|(a, _)| a.into()),
            _ => {
                let fill = if self.fill {
                    let n = usize::from(self.r.u16() % 4096);
                    self.r.take(n).to_vec()
                } else {
                    Vec::new()
                };
                memfd(size, &fill)
            }
        };
        (fd, size)
    }

    /// A region for a file of `file` bytes, in slot `slot` unless the input says otherwise.
    fn region(&mut self, file: u64, slot: u64) -> Region {
        let m = self.r.u8();
        let size = match m & 3 {
            0 => file,
            1 => file.saturating_sub(4096 * u64::from(self.r.u8())),
            2 => file + 4096 * u64::from(1 + self.r.u8() % 4),
            _ => self.r.u64(),
        };
        let offset = match m >> 2 & 3 {
            0 => 0,
            1 => 4096 * u64::from(self.r.u8()),
            2 => file.saturating_sub(size),
            _ => self.r.u64(),
        };
        let gpa = match m >> 4 & 3 {
            0 => slot * 16 * MIB,
            1 => u64::from(self.r.u8()) * MIB,
            2 => self.r.u64(),
            _ => u64::MAX - u64::from(self.r.u16()),
        };
        let uaddr = match m >> 6 {
            0 => UADDR + slot * 16 * MIB,
            1 => UADDR + u64::from(self.r.u8()) * MIB,
            2 => self.r.u64(),
            _ => UADDR.wrapping_add(gpa),
        };
        let r = Region {
            gpa,
            size,
            uaddr,
            offset,
        };
        if self.regions.len() < 64 {
            self.regions.push(r);
        }
        r
    }

    /// An address near a generated region (for rings).
    fn ring_addr(&mut self) -> u64 {
        let c = self.r.u8();
        if c == 0xff || self.regions.is_empty() {
            return self.r.u64();
        }
        let r = self.regions[usize::from(c) % self.regions.len()];
        let off = u64::from(self.r.u16()) * 16;
        match c >> 6 {
            3 => r.uaddr.wrapping_add(r.size).wrapping_sub(off),
            _ => r.uaddr.wrapping_add(off),
        }
    }

    fn geometry(&mut self) -> (u16, u16) {
        let c = self.r.u8();
        let nq = match c & 3 {
            3 => self.r.u16(),
            n => 1 + u16::from(n),
        };
        let qs = match c >> 2 & 3 {
            3 => self.r.u16(),
            _ => 1u16 << (self.r.u8() % 16),
        };
        (nq, qs)
    }

    /// The next message: bytes, fds, and whether the bytes frame one message. None at the
    /// end of the input.
    fn message(&mut self) -> Option<(Vec<u8>, Vec<OwnedFd>, bool)> {
        if self.r.done() {
            return None;
        }
        let op = self.r.u8();
        let flags = self.flags();
        let mut fds = Vec::new();
        let bytes = match op % 12 {
            // Any request, any body, a few fds.
            0 => {
                let code = u32::from(self.r.u8());
                let len = usize::from(self.r.u8());
                let body = self.r.take(len).to_vec();
                for i in 0..self.r.u8() % 4 {
                    fds.extend(if i % 2 == 0 {
                        eventfd(false)
                    } else {
                        memfd(4096, &[])
                    });
                }
                encode(code, flags, &body)
            }
            1 => {
                let c = self.r.u8();
                let n = 1 + usize::from(c % 9);
                let mut body = (n as u32).to_le_bytes().to_vec();
                body.extend_from_slice(&[0; 4]);
                for slot in 0..n {
                    let (fd, size) = self.mem_fd();
                    body.extend_from_slice(&self.region(size, slot as u64).bytes());
                    fds.extend(fd);
                }
                match c >> 4 {
                    0 => drop(fds.pop()),
                    1 => fds.extend(memfd(4096, &[])),
                    2 => drop(body.pop()),
                    _ => {}
                }
                encode(SET_MEM_TABLE, flags, &body)
            }
            2 | 3 => {
                let c = self.r.u8();
                let (fd, size) = self.mem_fd();
                let slot = u64::from(c % 32);
                let mut body = vec![0u8; 8];
                body.extend_from_slice(&self.region(size, slot).bytes());
                fds.extend(fd);
                match c >> 5 {
                    0 => drop(fds.pop()),
                    1 => fds.extend(memfd(4096, &[])),
                    2 => drop(body.pop()),
                    _ => {}
                }
                encode(ADD_MEM_REG, flags, &body)
            }
            4 => {
                let c = self.r.u8();
                let r = match self.regions.get(usize::from(c)) {
                    Some(r) => *r,
                    None => self.region(0, u64::from(c % 32)),
                };
                let mut body = vec![0u8; 8];
                body.extend_from_slice(&r.bytes());
                encode(REM_MEM_REG, flags, &body)
            }
            5 => {
                let q = u32::from(self.r.u8() % 4);
                let c = self.r.u8();
                let num = if c & 0x80 != 0 {
                    u32::from(self.r.u16())
                } else {
                    1 << (c % 17)
                };
                let mut body = q.to_le_bytes().to_vec();
                body.extend_from_slice(&num.to_le_bytes());
                encode(SET_VRING_NUM, flags, &body)
            }
            6 => {
                let q = u32::from(self.r.u8() % 4);
                let mut body = q.to_le_bytes().to_vec();
                body.extend_from_slice(&0u32.to_le_bytes());
                for _ in 0..3 {
                    let a = self.ring_addr();
                    body.extend_from_slice(&a.to_le_bytes());
                }
                body.extend_from_slice(&0u64.to_le_bytes());
                encode(SET_VRING_ADDR, flags, &body)
            }
            7 => {
                let c = self.r.u8();
                let v = if c == 0xff {
                    self.r.u64()
                } else {
                    [PROTOCOL_F_REPLY_ACK, PROTOCOL_F_INFLIGHT_SHMFD, 1, 1 << 9]
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| c >> i & 1 != 0)
                        .fold(0, |v, (_, b)| v | b)
                };
                encode(SET_PROTOCOL_FEATURES, flags, &v.to_le_bytes())
            }
            8 => {
                let (nq, qs) = self.geometry();
                let mut body = InflightMessage {
                    mmap_size: 0,
                    mmap_offset: 0,
                    num_queues: nq,
                    queue_size: qs,
                }
                .to_bytes()
                .to_vec();
                if self.r.u8() & 7 == 0 {
                    body.pop();
                }
                encode(GET_INFLIGHT_FD, flags, &body)
            }
            9 => {
                let (nq, qs) = self.geometry();
                let need = region_size(nq, qs) as u64;
                let c = self.r.u8();
                let offset = match c & 3 {
                    0 => 0,
                    1 => 4096 * u64::from(self.r.u8() % 4),
                    2 => u64::from(self.r.u16()),
                    _ => self.r.u64(),
                };
                let file = match c >> 2 & 3 {
                    0 => need.saturating_add(offset),
                    1 => need
                        .saturating_add(offset)
                        .saturating_sub(1 + u64::from(self.r.u8())),
                    2 => need
                        .saturating_add(offset)
                        .checked_next_multiple_of(4096)
                        .unwrap_or(u64::MAX),
                    _ => self.file_size(),
                };
                let mmap_size = match c >> 4 & 3 {
                    0 => need,
                    1 => need.saturating_sub(1),
                    2 => file,
                    _ => self.r.u64(),
                };
                let body = InflightMessage {
                    mmap_size,
                    mmap_offset: offset,
                    num_queues: nq,
                    queue_size: qs,
                }
                .to_bytes();
                match c >> 6 {
                    0 => fds.extend(eventfd(false)),
                    1 => {}
                    _ => fds.extend(memfd(file.min(64 * MIB), &[])),
                }
                encode(SET_INFLIGHT_FD, flags, &body)
            }
            10 => {
                // SET_VRING_KICK / CALL / ERR: an eventfd, or the invalid-fd flag.
                let code = SET_VRING_KICK + u32::from(self.r.u8() % 3);
                let c = self.r.u8();
                let v = u64::from(c % 4) | if c & 0x80 != 0 { 0x100 } else { 0 };
                if c & 0x80 == 0 {
                    fds.extend(eventfd(self.fill));
                }
                encode(code, flags, &v.to_le_bytes())
            }
            _ => {
                let c = self.r.u8();
                match c % 6 {
                    0 => {
                        let v = if c & 0x80 != 0 {
                            self.r.u64()
                        } else {
                            PROTOCOL_FEATURES | 1 << 32
                        };
                        encode(SET_FEATURES, flags, &v.to_le_bytes())
                    }
                    1 => {
                        let mut body = u32::from(self.r.u8() % 4).to_le_bytes().to_vec();
                        body.extend_from_slice(&u32::from(c >> 7).to_le_bytes());
                        encode(SET_VRING_ENABLE, flags, &body)
                    }
                    2 => {
                        let mut body = u32::from(self.r.u8() % 4).to_le_bytes().to_vec();
                        body.extend_from_slice(&u32::from(self.r.u16()).to_le_bytes());
                        encode(SET_VRING_BASE, flags, &body)
                    }
                    3 => encode(SET_OWNER, flags, &[]),
                    // GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM.
                    4 => encode(
                        [1, GET_PROTOCOL_FEATURES, 17][usize::from(c >> 3) % 3],
                        flags,
                        &[],
                    ),
                    // Bytes that need not frame a message: the last thing sent.
                    _ => {
                        let n = usize::from(self.r.u8());
                        let b = self.r.take(n).to_vec();
                        self.r.i = self.r.d.len();
                        return Some((b, Vec::new(), false));
                    }
                }
            }
        };
        Some((bytes, fds, true))
    }
}

/// Replies the fake back-end sends first (no INFLIGHT codes; bodies of 8 bytes only for
/// GET_PROTOCOL_FEATURES, so that they cannot pass for the relay's own answers).
fn backend_replies(r: &mut Bytes<'_>) -> Vec<Vec<u8>> {
    let n = usize::from(r.u8()) % MAX_REPLIES;
    (0..n)
        .map(|_| {
            let c = r.u8();
            let flags = if c & 0x40 != 0 {
                r.u32()
            } else {
                VERSION | REPLY
            };
            if c & 1 == 0 {
                let v = r.u64();
                encode(GET_PROTOCOL_FEATURES, flags, &v.to_le_bytes())
            } else {
                let code = [1u32, 11, 17, 24][usize::from(c >> 1 & 3)];
                let mut len = usize::from(r.u8() % 64);
                if len == 8 {
                    len = 9;
                }
                let mut body = r.take(len).to_vec();
                if body.len() == 8 {
                    body.push(0);
                }
                encode(code, flags, &body)
            }
        })
        .collect()
}

fn send_all(fe: &UnixStream, g: &mut Gen<'_>) -> Vec<Sent> {
    let mut sent = Vec::new();
    while sent.len() < MAX_MESSAGES {
        let Some((bytes, fds, framed)) = g.message() else {
            break;
        };
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        if send_message(fe, &bytes, &raw).is_err() {
            // The relay closed the connection (a refusal): nothing more goes through.
            break;
        }
        sent.push(Sent {
            bytes,
            fds: fds.len(),
            framed,
        });
    }
    sent
}

fn read_all(s: UnixStream) -> thread::JoinHandle<Vec<Message>> {
    thread::spawn(move || {
        let mut v = Vec::new();
        while let Ok(Some(m)) = read_message(&s) {
            v.push(m);
        }
        v
    })
}

/// Reads and writes every byte of every queue of `region` (a mapping past the end of its
/// file dies of SIGBUS here), after checking its file holds what is mapped.
fn exercise(region: &InflightRegion) {
    let size = file_size(region.fd()).expect("an inflight region is a regular file");
    assert!(
        size >= region.mmap_size(),
        "inflight region of {} bytes on a {size}-byte file",
        region.mmap_size()
    );
    assert_eq!(
        region.mmap_size(),
        region_size(region.num_queues(), region.queue_size()) as u64
    );
    for i in 0..region.num_queues() {
        let mut q = region.queue(i).expect("a queue of the region");
        let _ = q.recover(0);
        let last = q.desc_num() - 1;
        q.taken(last);
        q.completing(last);
        q.completed(last, 1);
        let _ = q.pending();
    }
    assert!(region.queue(region.num_queues()).is_none());
}

/// The fake back-end's view of what was installed through the relay.
#[derive(Default)]
struct Oracle {
    regions: Vec<Region>,
    queue_sizes: HashMap<u32, u32>,
}

fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    a < b + blen && b < a + alen
}

impl Oracle {
    /// A region the back-end is about to map: inside its file, overlapping nothing.
    fn check_region(r: &Region, fd: BorrowedFd<'_>, others: &[Region]) {
        assert!(r.size > 0, "forwarded a region of size 0: {r:?}");
        let end = |b: u64| b.checked_add(r.size).is_some();
        assert!(
            end(r.gpa) && end(r.uaddr),
            "forwarded an overflowing region {r:?}"
        );
        let file_end = r.offset.checked_add(r.size);
        let size = file_size(fd);
        assert!(
            matches!((file_end, size), (Some(e), Some(s)) if e <= s),
            "forwarded a region past the end of its file (or not on a file): {r:?}, file \
             size {size:?}"
        );
        for o in others {
            assert!(
                !overlaps(r.gpa, r.size, o.gpa, o.size)
                    && !overlaps(r.uaddr, r.size, o.uaddr, o.size),
                "forwarded a region {r:?} overlapping {o:?}"
            );
        }
    }

    fn covers(&self, uaddr: u64, len: u64) -> bool {
        let Some(end) = uaddr.checked_add(len) else {
            return false;
        };
        let mut at = uaddr;
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

    /// Checks one message the back-end received and records what it installs.
    fn forwarded(&mut self, m: &Message, inflight: bool) {
        let body = m.body();
        match m.request() {
            SET_MEM_TABLE => {
                let n = u32_at(body, 0).unwrap_or(0) as usize;
                assert!(
                    (1..=8).contains(&n) && body.len() == 8 + 32 * n && m.fds.len() == n,
                    "forwarded a malformed table: {n} regions, {} bytes, {} fds",
                    body.len(),
                    m.fds.len()
                );
                let mut table: Vec<Region> = Vec::new();
                for (i, fd) in m.fds.iter().enumerate() {
                    let r = Region::parse(&body[8 + 32 * i..]).unwrap();
                    Self::check_region(&r, fd.as_fd(), &table);
                    table.push(r);
                }
                self.regions = table;
            }
            ADD_MEM_REG => {
                assert!(
                    body.len() == 40 && m.fds.len() == 1,
                    "forwarded a malformed ADD_MEM_REG: {} bytes, {} fds",
                    body.len(),
                    m.fds.len()
                );
                let r = Region::parse(&body[8..]).unwrap();
                Self::check_region(&r, m.fds[0].as_fd(), &self.regions);
                self.regions.push(r);
            }
            REM_MEM_REG => {
                if let Some(r) = body.get(8..).and_then(Region::parse) {
                    if body.len() == 40 {
                        self.regions
                            .retain(|x| !(x.gpa == r.gpa && x.size == r.size));
                    }
                }
            }
            SET_VRING_NUM => {
                let (q, num) = (u32_at(body, 0), u32_at(body, 4));
                let (Some(q), Some(num)) = (q, num) else {
                    panic!("forwarded SET_VRING_NUM with a {}-byte body", body.len());
                };
                assert!(
                    num.is_power_of_two() && num <= 32768,
                    "forwarded queue size {num}"
                );
                self.queue_sizes.insert(q, num);
            }
            SET_VRING_ADDR => {
                if let (Some(q), Some(desc), Some(used), Some(avail)) = (
                    u32_at(body, 0),
                    u64_at(body, 8),
                    u64_at(body, 16),
                    u64_at(body, 24),
                ) {
                    if !self.regions.is_empty() {
                        let n = u64::from(self.queue_sizes.get(&q).copied().unwrap_or(0));
                        for (a, len) in [(desc, 16 * n), (avail, 6 + 2 * n), (used, 6 + 8 * n)] {
                            assert!(
                                self.covers(a, len.max(1)),
                                "forwarded ring {a:#x} ({len} bytes) outside the installed \
                                 regions {:?}",
                                self.regions
                            );
                        }
                    }
                }
            }
            GET_INFLIGHT_FD | SET_INFLIGHT_FD if inflight => {
                panic!("forwarded request {} the relay handles", m.request())
            }
            SET_PROTOCOL_FEATURES if inflight => {
                let v = u64_at(body, 0).unwrap_or(0);
                assert!(
                    body.len() != 8 || v & PROTOCOL_F_INFLIGHT_SHMFD == 0,
                    "INFLIGHT_SHMFD reached the back-end"
                );
            }
            _ => {}
        }
    }
}

/// Whether the relay handles `code` itself (never forwards it).
fn handled(code: u32, inflight: bool) -> bool {
    inflight && matches!(code, GET_INFLIGHT_FD | SET_INFLIGHT_FD)
}

/// Whether the forwarded `f` is the sent `s` (as the relay may rewrite it).
fn same(f: &Message, s: &Sent, inflight: bool) -> bool {
    if f.fds.len() != s.fds || f.bytes.len() != s.bytes.len() {
        return false;
    }
    if inflight && s.code() == SET_PROTOCOL_FEATURES && s.bytes.len() == HEADER + 8 {
        let v = u64_at(&s.bytes, HEADER).unwrap_or(0) & !PROTOCOL_F_INFLIGHT_SHMFD;
        return f.bytes[..HEADER] == s.bytes[..HEADER] && u64_at(&f.bytes, HEADER) == Some(v);
    }
    f.bytes == s.bytes
}

/// One pass of the relay with a fake back-end; see the module documentation.
pub fn fuzz_vhost_user_relay(data: &[u8]) {
    let mut r = Bytes { d: data, i: 0 };
    let flags = r.u8();
    let inflight = flags & 1 == 0;
    let replies = if flags & 2 != 0 {
        backend_replies(&mut r)
    } else {
        Vec::new()
    };
    let Ok((fe, relay_fe)) = UnixStream::pair() else {
        return;
    };
    let Ok((relay_be, be)) = UnixStream::pair() else {
        return;
    };
    for m in &replies {
        if send_message(&be, m, &[]).is_err() {
            return;
        }
    }
    let regions = Arc::new(Mutex::new(0usize));
    let hook: Option<relay::InflightHook> = inflight.then(|| {
        let regions = regions.clone();
        let hook: relay::InflightHook = Arc::new(move |region: InflightRegion| {
            exercise(&region);
            *regions.lock().unwrap() += 1;
        });
        hook
    });
    let Ok(relay) = Relay::start(1, relay_fe, relay_be, hook) else {
        return;
    };
    let (Ok(be_r), Ok(fe_r)) = (be.try_clone(), fe.try_clone()) else {
        return;
    };
    let backend = read_all(be_r);
    let frontend = read_all(fe_r);
    let mut g = Gen {
        r,
        regions: Vec::new(),
        fill: false,
    };
    let sent = send_all(&fe, &mut g);
    let _ = fe.shutdown(std::net::Shutdown::Write);
    let forwarded = backend.join().expect("the back-end reader");
    let answers = frontend.join().expect("the frontend reader");
    relay.finish();

    // What reached the back-end: sound, and in order what the frontend sent.
    let mut oracle = Oracle::default();
    let mut p = 0;
    let mut features_seen = false;
    // Index in `sent` of the last forwarded message + 1.
    let mut consumed = 0;
    for f in &forwarded {
        oracle.forwarded(f, inflight);
    }
    for (k, f) in forwarded.iter().enumerate() {
        while p < sent.len() && handled(sent[p].code(), inflight) {
            p += 1;
        }
        let Some(s) = sent.get(p) else {
            panic!(
                "forwarded message {k} (request {}) was never sent",
                f.request()
            );
        };
        if !s.framed {
            // Loose bytes (the last thing sent) may read as anything.
            break;
        }
        if same(f, s, inflight) {
            features_seen |= s.code() == SET_FEATURES;
            p += 1;
            consumed = p;
            continue;
        }
        let injected = f.bytes == relay::protocol_features_message()
            && f.fds.is_empty()
            && s.code() == SET_VRING_ENABLE
            && !features_seen;
        if injected {
            features_seen = true;
            continue;
        }
        panic!(
            "forwarded message {k} (request {}, {} bytes, {} fds) is not the next one sent \
             (request {}, {} bytes, {} fds)",
            f.request(),
            f.bytes.len(),
            f.fds.len(),
            s.code(),
            s.bytes.len(),
            s.fds
        );
    }

    // What the frontend got: the back-end's replies (a prefix, GET_PROTOCOL_FEATURES with
    // INFLIGHT_SHMFD added), the relay's own answers, at most one failure status, for a
    // message that was not forwarded.
    let mut from_backend = Vec::new();
    let mut nacks = Vec::new();
    for a in &answers {
        match a.request() {
            // Back-end replies of 8 bytes are only GET_PROTOCOL_FEATURES ones.
            code if code != GET_PROTOCOL_FEATURES && a.body() == 1u64.to_le_bytes() => {
                nacks.push(code)
            }
            GET_INFLIGHT_FD if inflight => {
                let info = InflightMessage::parse(a.body()).expect("a GET_INFLIGHT_FD answer");
                assert_eq!(a.fds.len(), 1, "GET_INFLIGHT_FD answered without its fd");
                let size = file_size(a.fds[0].as_fd()).expect("the inflight fd is a file");
                assert!(info.mmap_offset == 0 && info.mmap_size <= size);
                assert_eq!(
                    info.mmap_size,
                    region_size(info.num_queues, info.queue_size) as u64
                );
            }
            SET_INFLIGHT_FD if inflight && a.body() == 0u64.to_le_bytes() => {}
            _ => from_backend.push(a),
        }
    }
    assert!(nacks.len() <= 1, "more than one failure status: {nacks:?}");
    if let Some(&code) = nacks.first() {
        assert!(
            sent[consumed..].iter().any(|s| s.code() == code),
            "failure status for request {code}, which was forwarded (or never sent)"
        );
    }
    assert!(from_backend.len() <= replies.len());
    for (got, want) in from_backend.iter().zip(&replies) {
        let mut want = want.clone();
        let code = u32_at(&want, 0).unwrap_or(0);
        let flags = u32_at(&want, 4).unwrap_or(0);
        if inflight && code == GET_PROTOCOL_FEATURES && flags & REPLY != 0 && want.len() == 20 {
            let v = u64_at(&want, HEADER).unwrap_or(0) | PROTOCOL_F_INFLIGHT_SHMFD;
            want[HEADER..].copy_from_slice(&v.to_le_bytes());
        }
        assert_eq!(got.bytes, want, "a back-end reply changed on its way");
    }
}

/// One connection of a real vhost-user daemon (the accept loop's [`serve`](crate::vhost_user::serve)
/// with a back-end from `make`) fed the messages built from `data` (as
/// [`fuzz_vhost_user_relay`], with memfds filled from the input and kick eventfds
/// signalled, so that the back-end serves whatever requests the rings hold). Asserts that
/// the daemon neither panics nor dies, and that the connection ends.
pub fn fuzz_vhost_user_serve<B, F>(data: &[u8], make: F)
where
    B: Served,
    F: FnMut() -> std::io::Result<B> + Send + 'static,
{
    let mut r = Bytes { d: data, i: 0 };
    let _flags = r.u8();
    let Ok((fe, theirs)) = UnixStream::pair() else {
        return;
    };
    let Ok(stop) = Stop::new() else { return };
    let daemon = thread::spawn(move || {
        let mut frontends = Frontends::Connected(Some(theirs));
        crate::vhost_user::serve("fuzz", &mut frontends, &stop, make)
    });
    let Ok(fe_r) = fe.try_clone() else { return };
    let frontend = read_all(fe_r);
    let mut g = Gen {
        r,
        regions: Vec::new(),
        fill: true,
    };
    let _ = send_all(&fe, &mut g);
    let _ = fe.shutdown(std::net::Shutdown::Write);
    let _ = frontend.join().expect("the frontend reader");
    let served = daemon.join().expect("the daemon thread panicked");
    assert!(served.is_ok(), "serve failed: {:?}", served.err());
}
