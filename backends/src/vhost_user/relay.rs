//! Copies vhost-user messages between a frontend and the vhost-user daemon, with their fds.
//!
//! Messages from the frontend are read whole (12-byte header, then the body it announces),
//! so that the fds stay with their message and a header announcing more than
//! `MAX_MSG_SIZE` bytes ends the connection. Each one goes through [`Conn::inspect`], a
//! `match` on the request code calling one small function per request, with the state of
//! the connection (what was negotiated and installed) in [`Conn`]:
//! - SET_MEM_TABLE / ADD_MEM_REG are checked before vhost-user-backend maps them
//!   ([`super::memory`]); REM_MEM_REG updates the installed set.
//! - SET_VRING_NUM must be a power of two; SET_VRING_ADDR's rings must lie inside the
//!   installed regions (whole, once the queue size is known).
//! - A frontend that sends SET_VRING_ENABLE before SET_FEATURES (QEMU's `-netdev
//!   vhost-user` does, for the queues it disables) gets a SET_FEATURES with only
//!   VHOST_USER_F_PROTOCOL_FEATURES injected first, without reply, since the vhost crate
//!   refuses SET_VRING_ENABLE until that bit is acked. The frontend's own SET_FEATURES later
//!   acks the real set.
//!
//! - Inflight I/O tracking (INFLIGHT_SHMFD), for a back-end that records what it takes
//!   ([`InflightHook`]): the relay offers the protocol feature in the back-end's
//!   GET_PROTOCOL_FEATURES reply (and keeps it out of the SET_PROTOCOL_FEATURES the
//!   back-end sees: vhost-user-backend refuses the messages that go with it), answers
//!   GET_INFLIGHT_FD itself with a new region, and maps the one SET_INFLIGHT_FD brings back
//!   (checked against its file first) for the back-end's queues.
//!
//! A refused message is logged (one line: which request, which region, why), answered with
//! a failure status when the frontend asked for one (NEED_REPLY with REPLY_ACK acked), and
//! ends the connection: the back-end never sees it.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::Duration;

use vhost::vhost_user::message::MAX_MSG_SIZE;

use super::memory::Installed;
use crate::inflight::{InflightMessage, InflightRegion};

/// Hands a connection's inflight region to the back-end (its queues record what they take
/// and complete in it, and resume from it when they start).
pub type InflightHook = Arc<dyn Fn(InflightRegion) + Send + Sync>;

/// What the frontend does to a vring, told to the back-end before its handler sees the
/// message ([`StopHook`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VringEvent {
    /// GET_VRING_BASE: the handler then waits for the vring's lock, which a worker kept
    /// busy by the guest would otherwise take back each time.
    Stopping(u32),
    /// SET_VRING_ENABLE (index, enabled): a virtio-net frontend that keeps the control
    /// queue itself (QEMU) says this way which queue pairs the driver uses.
    Enabling(u32, bool),
}

/// Tells the back-end what the frontend does to its vrings ([`VringEvent`]).
pub type StopHook = Arc<dyn Fn(VringEvent) + Send + Sync>;

/// Size of the vhost-user header: request, flags, size (u32 each).
pub const HEADER: usize = 12;
/// Most fds one message may carry.
pub const MAX_FDS: usize = 8;
/// VHOST_USER_SET_FEATURES.
pub const SET_FEATURES: u32 = 2;
/// VHOST_USER_SET_MEM_TABLE.
pub const SET_MEM_TABLE: u32 = 5;
/// VHOST_USER_SET_VRING_NUM.
pub const SET_VRING_NUM: u32 = 8;
/// VHOST_USER_SET_VRING_ADDR.
pub const SET_VRING_ADDR: u32 = 9;
/// VHOST_USER_SET_PROTOCOL_FEATURES.
pub const SET_PROTOCOL_FEATURES: u32 = 16;
/// VHOST_USER_SET_VRING_ENABLE.
pub const SET_VRING_ENABLE: u32 = 18;
/// VHOST_USER_GET_VRING_BASE.
pub const GET_VRING_BASE: u32 = 11;
/// VHOST_USER_ADD_MEM_REG.
pub const ADD_MEM_REG: u32 = 37;
/// VHOST_USER_REM_MEM_REG.
pub const REM_MEM_REG: u32 = 38;
/// VHOST_USER_GET_PROTOCOL_FEATURES.
pub const GET_PROTOCOL_FEATURES: u32 = 15;
/// VHOST_USER_GET_INFLIGHT_FD.
pub const GET_INFLIGHT_FD: u32 = 31;
/// VHOST_USER_SET_INFLIGHT_FD.
pub const SET_INFLIGHT_FD: u32 = 32;
/// VHOST_USER_PROTOCOL_F_REPLY_ACK.
pub const PROTOCOL_F_REPLY_ACK: u64 = 1 << 3;
/// VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD.
pub const PROTOCOL_F_INFLIGHT_SHMFD: u64 = 1 << 12;
/// The largest split virtqueue.
const MAX_QUEUE_SIZE: u32 = 32768;
/// VHOST_USER_F_PROTOCOL_FEATURES.
pub const PROTOCOL_FEATURES: u64 = 1 << 30;
/// Version 1 in the flags.
const VERSION: u32 = 0x1;
const VERSION_MASK: u32 = 0x3;
/// The reply flag.
const REPLY: u32 = 0x4;
/// The frontend asks for a REPLY_ACK status.
const NEED_REPLY: u32 = 0x8;

/// One message as read from a socket.
pub struct Message {
    /// Header and body.
    pub bytes: Vec<u8>,
    /// The fds that came with it (closed when dropped).
    pub fds: Vec<OwnedFd>,
}

impl Message {
    /// The request code.
    pub fn request(&self) -> u32 {
        u32_at(&self.bytes, 0).unwrap_or(0)
    }

    /// The header flags.
    pub fn flags(&self) -> u32 {
        u32_at(&self.bytes, 4).unwrap_or(0)
    }

    /// The body (after the header).
    pub fn body(&self) -> &[u8] {
        self.bytes.get(HEADER..).unwrap_or(&[])
    }
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8)
        .map(|s| u64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]))
}

/// A whole message: the header (`request`, `flags`, the body's size) and `body`.
pub fn encode(request: u32, flags: u32, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(HEADER + body.len());
    m.extend_from_slice(&request.to_le_bytes());
    m.extend_from_slice(&flags.to_le_bytes());
    m.extend_from_slice(&(body.len() as u32).to_le_bytes());
    m.extend_from_slice(body);
    m
}

/// A reply to `request` carrying `body`.
pub fn reply(request: u32, body: &[u8]) -> Vec<u8> {
    encode(request, VERSION | REPLY, body)
}

/// A reply to `request` carrying one u64 (REPLY_ACK status: 0 success, else failure).
pub fn reply_u64(request: u32, value: u64) -> Vec<u8> {
    reply(request, &value.to_le_bytes())
}

/// The SET_FEATURES message injected before an early SET_VRING_ENABLE.
pub fn protocol_features_message() -> Vec<u8> {
    encode(SET_FEATURES, VERSION, &PROTOCOL_FEATURES.to_le_bytes())
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Reads into `buf` until it is full or the peer closes; fds that arrive go to `fds`.
/// Returns the bytes read.
fn read_full(s: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut off = 0;
    while off < buf.len() {
        // Room for more than MAX_FDS so that a frontend sending too many is seen (the
        // extra ones are closed with the rest); MSG_CTRUNC if even more.
        let mut cmsg = [0u64; 10];
        let mut iov = libc::iovec {
            iov_base: buf[off..].as_mut_ptr().cast(),
            iov_len: buf.len() - off,
        };
        // SAFETY: msghdr is plain data; all-zero is a valid empty header.
        let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        mh.msg_control = cmsg.as_mut_ptr().cast();
        mh.msg_controllen = std::mem::size_of_val(&cmsg) as _;
        // SAFETY: `mh` points at `iov` (inside `buf`) and `cmsg`, both alive and of the
        // lengths given, for the duration of the call.
        let r = unsafe { libc::recvmsg(s.as_raw_fd(), &mut mh, libc::MSG_CMSG_CLOEXEC) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // SAFETY: `mh` was filled in by recvmsg; the CMSG macros walk the control
        // buffer within `msg_controllen`, and SCM_RIGHTS data is an array of fds that
        // this process now owns.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&mh);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c).cast::<RawFd>();
                    let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    for i in 0..len / std::mem::size_of::<RawFd>() {
                        let fd = std::ptr::read_unaligned(data.add(i));
                        fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
                c = libc::CMSG_NXTHDR(&mh, c);
            }
        }
        if mh.msg_flags & libc::MSG_CTRUNC != 0 || fds.len() > MAX_FDS {
            return Err(bad(format!("more than {MAX_FDS} fds in one message")));
        }
        if r == 0 {
            break;
        }
        off += r as usize;
    }
    Ok(off)
}

/// Reads one whole message. None: the peer closed between two messages.
pub fn read_message(s: &UnixStream) -> io::Result<Option<Message>> {
    let mut bytes = vec![0u8; HEADER];
    let mut fds = Vec::new();
    match read_full(s, &mut bytes, &mut fds)? {
        0 => return Ok(None),
        HEADER => {}
        n => return Err(bad(format!("closed after {n} bytes of a header"))),
    }
    let word = |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    let (request, flags, size) = (word(0), word(4), word(8) as usize);
    if flags & VERSION_MASK != VERSION {
        return Err(bad(format!(
            "request {request}: bad flags {flags:#x} (not version 1)"
        )));
    }
    if size > MAX_MSG_SIZE {
        return Err(bad(format!(
            "request {request}: {size}-byte body (at most {MAX_MSG_SIZE})"
        )));
    }
    bytes.resize(HEADER + size, 0);
    let got = read_full(s, &mut bytes[HEADER..], &mut fds)?;
    if got < size {
        return Err(bad(format!(
            "request {request}: closed after {got} of {size} body bytes"
        )));
    }
    Ok(Some(Message { bytes, fds }))
}

/// Sends `bytes` with `fds` attached to the first byte.
pub fn send_message(s: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut off = 0;
    let mut fds = fds;
    while off < bytes.len() {
        let mut cmsg = [0u64; 8];
        let mut iov = libc::iovec {
            iov_base: bytes[off..].as_ptr() as *mut libc::c_void,
            iov_len: bytes.len() - off,
        };
        // SAFETY: msghdr is plain data; all-zero is a valid empty header.
        let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        if !fds.is_empty() {
            let n = std::mem::size_of_val(fds);
            // SAFETY: CMSG_SPACE only computes a size.
            let space = unsafe { libc::CMSG_SPACE(n as u32) } as usize;
            if space > std::mem::size_of_val(&cmsg) {
                return Err(bad(format!("{} fds in one message", fds.len())));
            }
            mh.msg_control = cmsg.as_mut_ptr().cast();
            mh.msg_controllen = space as _;
            // SAFETY: the control buffer holds `space` bytes (checked above): one cmsg
            // header followed by `n` bytes of fds, copied from `fds`.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&mh);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(n as u32) as _;
                std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), n);
            }
        }
        // SAFETY: `mh` points at `iov` (inside `bytes`) and the control buffer, both
        // alive for the duration of the call.
        let r = unsafe { libc::sendmsg(s.as_raw_fd(), &mh, libc::MSG_NOSIGNAL) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        off += r as usize;
        fds = &[];
    }
    Ok(())
}

/// A writer to one side shared by both pumps: the frontend gets the back-end's replies from
/// one pump and the relay's own answers from the other, a whole message at a time.
struct Writer {
    s: UnixStream,
    lock: Mutex<()>,
}

impl Writer {
    fn send(&self, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        send_message(&self.s, bytes, fds)
    }
}

/// What the relay knows of one connection: what was negotiated and installed, as seen
/// going from the frontend to the back-end. Owned by the frontend -> back-end pump.
struct Conn {
    /// The connection number, for the logs.
    n: u64,
    /// The frontend, for the answers the relay gives itself.
    frontend: Arc<Writer>,
    /// Whether SET_FEATURES went through (or was injected).
    features_seen: bool,
    /// The protocol features the frontend acked (SET_PROTOCOL_FEATURES).
    protocol_features: u64,
    /// Queue sizes set by SET_VRING_NUM, by queue index.
    queue_sizes: HashMap<u32, u32>,
    /// The memory regions installed on this connection.
    mem: Installed,
    /// The back-end keeps inflight records: the relay offers INFLIGHT_SHMFD for it.
    inflight: Option<InflightHook>,
    /// Called with the index of every GET_VRING_BASE before it is forwarded.
    stopping: Option<StopHook>,
}

/// What to do with a message from the frontend.
enum Verdict {
    /// Forward it to the back-end.
    Forward,
    /// Refuse it: log why, answer a failure if the frontend asked for one, close both sides.
    Refuse(String),
    /// Forward these bytes instead (the same fds).
    Replace(Vec<u8>),
    /// The relay handled it (and answered it if an answer was due): nothing to forward.
    Handled,
}

impl Conn {
    fn new(
        n: u64,
        frontend: Arc<Writer>,
        inflight: Option<InflightHook>,
        stopping: Option<StopHook>,
    ) -> Conn {
        Conn {
            n,
            frontend,
            features_seen: false,
            protocol_features: 0,
            queue_sizes: HashMap::new(),
            mem: Installed::default(),
            inflight,
            stopping,
        }
    }

    /// Inspects one message from the frontend before it is forwarded; may inject messages
    /// to the back-end first (`to`).
    fn inspect(&mut self, m: &Message, to: &UnixStream) -> Verdict {
        let body = m.body();
        match m.request() {
            SET_FEATURES => {
                self.features_seen = true;
                Verdict::Forward
            }
            SET_PROTOCOL_FEATURES => self.set_protocol_features(m),
            GET_INFLIGHT_FD if self.inflight.is_some() => self.get_inflight_fd(m),
            SET_INFLIGHT_FD if self.inflight.is_some() => self.set_inflight_fd(m),
            SET_VRING_NUM => self.set_vring_num(body),
            SET_VRING_ADDR => self.set_vring_addr(body),
            SET_VRING_ENABLE if !self.features_seen => {
                self.vring_enabling(body);
                self.ack_protocol_features_first(to)
            }
            SET_VRING_ENABLE => {
                self.vring_enabling(body);
                Verdict::Forward
            }
            SET_MEM_TABLE => self.set_mem_table(m),
            ADD_MEM_REG => self.add_mem_reg(m),
            REM_MEM_REG => {
                self.mem.remove(body);
                Verdict::Forward
            }
            GET_VRING_BASE => {
                // A bad body is the back-end's to refuse.
                if let (Some(hook), Some(index)) = (&self.stopping, u32_at(body, 0)) {
                    hook(VringEvent::Stopping(index));
                }
                Verdict::Forward
            }
            _ => Verdict::Forward,
        }
    }

    /// SET_VRING_ENABLE's `struct vhost_vring_state` (index, num: 1 enables) to the hook;
    /// a bad body is the back-end's to refuse.
    fn vring_enabling(&self, body: &[u8]) {
        if let (Some(hook), Some(index), Some(num), 8) =
            (&self.stopping, u32_at(body, 0), u32_at(body, 4), body.len())
        {
            hook(VringEvent::Enabling(index, num != 0));
        }
    }

    fn set_protocol_features(&mut self, m: &Message) -> Verdict {
        let body = m.body();
        // A bad body is the back-end's to refuse; only a well-formed one counts as acked.
        let Some(v) = u64_at(body, 0).filter(|_| body.len() == 8) else {
            return Verdict::Forward;
        };
        self.protocol_features = v;
        if self.inflight.is_some() && v & PROTOCOL_F_INFLIGHT_SHMFD != 0 {
            // The relay implements it; the back-end's vhost handler does not know of it.
            let mut bytes = m.bytes.clone();
            let stripped = v & !PROTOCOL_F_INFLIGHT_SHMFD;
            bytes[HEADER..HEADER + 8].copy_from_slice(&stripped.to_le_bytes());
            return Verdict::Replace(bytes);
        }
        Verdict::Forward
    }

    /// GET_INFLIGHT_FD: a new zeroed region for the geometry the frontend asks for, which
    /// the back-end's queues record in from now on; the frontend keeps its fd and sends it
    /// back (SET_INFLIGHT_FD) to this and every later back-end.
    fn get_inflight_fd(&mut self, m: &Message) -> Verdict {
        let Some(want) = InflightMessage::parse(m.body()) else {
            return Verdict::Refuse(format!(
                "GET_INFLIGHT_FD with a {}-byte body",
                m.body().len()
            ));
        };
        let region = match InflightRegion::create(want.num_queues, want.queue_size) {
            Ok(r) => r,
            Err(e) => return Verdict::Refuse(format!("GET_INFLIGHT_FD: {e}")),
        };
        let body = InflightMessage {
            mmap_size: region.mmap_size(),
            mmap_offset: 0,
            num_queues: region.num_queues(),
            queue_size: region.queue_size(),
        }
        .to_bytes();
        let mut reply = Vec::with_capacity(HEADER + body.len());
        reply.extend_from_slice(&GET_INFLIGHT_FD.to_le_bytes());
        reply.extend_from_slice(&(VERSION | REPLY).to_le_bytes());
        reply.extend_from_slice(&(body.len() as u32).to_le_bytes());
        reply.extend_from_slice(&body);
        if let Err(e) = self.frontend.send(&reply, &[region.fd().as_raw_fd()]) {
            return Verdict::Refuse(format!("answering GET_INFLIGHT_FD: {e}"));
        }
        log::info!(
            "connection {}: inflight region for {} queue(s) of {} entries ({} bytes) handed to \
             the frontend",
            self.n,
            want.num_queues,
            want.queue_size,
            region.mmap_size()
        );
        if let Some(hook) = &self.inflight {
            hook(region);
        }
        Verdict::Handled
    }

    /// SET_INFLIGHT_FD: the region a frontend kept, checked against its file before it is
    /// mapped (a region past the end of its file would be SIGBUS at the first record), then
    /// handed to the back-end; queues that start afterwards resume from it.
    fn set_inflight_fd(&mut self, m: &Message) -> Verdict {
        let Some(msg) = InflightMessage::parse(m.body()) else {
            return Verdict::Refuse(format!(
                "SET_INFLIGHT_FD with a {}-byte body",
                m.body().len()
            ));
        };
        let fd = match m.fds.as_slice() {
            [fd] => fd.try_clone(),
            fds => {
                return Verdict::Refuse(format!(
                    "SET_INFLIGHT_FD with {} fds (expected 1)",
                    fds.len()
                ))
            }
        };
        let region = match fd
            .map_err(crate::inflight::InflightError::Map)
            .and_then(|fd| {
                InflightRegion::open(
                    fd,
                    msg.mmap_size,
                    msg.mmap_offset,
                    msg.num_queues,
                    msg.queue_size,
                )
            }) {
            Ok(r) => r,
            Err(e) => return Verdict::Refuse(format!("SET_INFLIGHT_FD refused: {e}")),
        };
        log::debug!(
            "connection {}: inflight region of the frontend: {} queue(s) of {} entries",
            self.n,
            msg.num_queues,
            msg.queue_size
        );
        if let Some(hook) = &self.inflight {
            hook(region);
        }
        if self.protocol_features & PROTOCOL_F_REPLY_ACK != 0 && m.flags() & NEED_REPLY != 0 {
            if let Err(e) = self.frontend.send(&reply_u64(SET_INFLIGHT_FD, 0), &[]) {
                return Verdict::Refuse(format!("answering SET_INFLIGHT_FD: {e}"));
            }
        }
        Verdict::Handled
    }

    fn set_vring_num(&mut self, body: &[u8]) -> Verdict {
        // virtio-queue would ignore a size that is not a power of two and keep the old one;
        // refuse it like every other bad queue size.
        match (u32_at(body, 0), u32_at(body, 4)) {
            (Some(q), Some(num)) if num.is_power_of_two() && num <= MAX_QUEUE_SIZE => {
                self.queue_sizes.insert(q, num);
                Verdict::Forward
            }
            (q, num) => Verdict::Refuse(format!(
                "SET_VRING_NUM {num:?} for queue {q:?}: not a power of two from 1 to \
                 {MAX_QUEUE_SIZE}"
            )),
        }
    }

    /// Rings must lie in the installed regions, whole when the queue size is known (the
    /// back-end itself only looks at where each ring starts). Before any memory table,
    /// the back-end refuses ring addresses itself.
    fn set_vring_addr(&mut self, body: &[u8]) -> Verdict {
        let (Some(q), Some(desc), Some(used), Some(avail)) = (
            u32_at(body, 0),
            u64_at(body, 8),
            u64_at(body, 16),
            u64_at(body, 24),
        ) else {
            return Verdict::Forward;
        };
        if self.mem.is_empty() {
            return Verdict::Forward;
        }
        let n = u64::from(self.queue_sizes.get(&q).copied().unwrap_or(0));
        let rings = [
            ("descriptor table", desc, 16 * n),
            ("available ring", avail, 6 + 2 * n),
            ("used ring", used, 6 + 8 * n),
        ];
        for (what, addr, len) in rings {
            if !self.mem.covers(addr, len.max(1)) {
                return Verdict::Refuse(format!(
                    "SET_VRING_ADDR for queue {q}: the {what} at frontend address {addr:#x} \
                     ({len} bytes for {n} entries) is not inside the memory table"
                ));
            }
        }
        Verdict::Forward
    }

    /// The vhost crate refuses SET_VRING_ENABLE until PROTOCOL_FEATURES is acked; a
    /// frontend that sends it before SET_FEATURES (QEMU's `-netdev vhost-user` does) gets
    /// a SET_FEATURES with only that bit injected first, without reply.
    fn ack_protocol_features_first(&mut self, to: &UnixStream) -> Verdict {
        log::debug!(
            "connection {}: SET_VRING_ENABLE before SET_FEATURES: acking PROTOCOL_FEATURES \
             first",
            self.n
        );
        if let Err(e) = send_message(to, &protocol_features_message(), &[]) {
            return Verdict::Refuse(format!("writing to the back-end: {e}"));
        }
        self.features_seen = true;
        Verdict::Forward
    }

    fn set_mem_table(&mut self, m: &Message) -> Verdict {
        let fds: Vec<BorrowedFd<'_>> = m.fds.iter().map(AsFd::as_fd).collect();
        match self.mem.set_table(m.body(), &fds) {
            Ok(()) => Verdict::Forward,
            Err(e) => Verdict::Refuse(format!("SET_MEM_TABLE refused: {e}")),
        }
    }

    fn add_mem_reg(&mut self, m: &Message) -> Verdict {
        let fds: Vec<BorrowedFd<'_>> = m.fds.iter().map(AsFd::as_fd).collect();
        match self.mem.add(m.body(), &fds) {
            Ok(()) => Verdict::Forward,
            Err(e) => Verdict::Refuse(format!("ADD_MEM_REG refused: {e}")),
        }
    }

    /// Answers `m` with a failure status if the frontend asked for a reply (NEED_REPLY with
    /// REPLY_ACK acked), as the back-end does for a request it refuses.
    fn nack(&self, m: &Message) {
        if self.protocol_features & PROTOCOL_F_REPLY_ACK != 0 && m.flags() & NEED_REPLY != 0 {
            let _ = self.frontend.send(&reply_u64(m.request(), 1), &[]);
        }
    }
}

/// Copies messages from the frontend to the back-end until either fails or closes, or a
/// message is refused.
fn pump_to_backend(conn: &mut Conn, from: &UnixStream, to: &UnixStream) {
    let n = conn.n;
    while let Some(m) = read_or_log(n, from, "frontend") {
        log::trace!(
            "connection {n}: frontend -> back-end: request {}, {} bytes, {} fd(s)",
            m.request(),
            m.bytes.len(),
            m.fds.len()
        );
        let replaced = match conn.inspect(&m, to) {
            Verdict::Refuse(why) => {
                log::warn!("connection {n}: {why}; closing");
                conn.nack(&m);
                return;
            }
            Verdict::Handled => continue,
            Verdict::Replace(bytes) => Some(bytes),
            Verdict::Forward => None,
        };
        let bytes = replaced.as_deref().unwrap_or(&m.bytes);
        let fds: Vec<RawFd> = m.fds.iter().map(AsRawFd::as_raw_fd).collect();
        if let Err(e) = send_message(to, bytes, &fds) {
            log::debug!("connection {n}: writing to the back-end: {e}");
            return;
        }
    }
}

/// Copies messages (the replies) from the back-end to the frontend until either fails or
/// closes.
fn pump_to_frontend(n: u64, from: &UnixStream, to: &Writer, offer_inflight: bool) {
    while let Some(mut m) = read_or_log(n, from, "back-end") {
        if offer_inflight
            && m.request() == GET_PROTOCOL_FEATURES
            && m.flags() & REPLY != 0
            && m.body().len() == 8
        {
            if let Some(v) = u64_at(m.body(), 0) {
                let v = v | PROTOCOL_F_INFLIGHT_SHMFD;
                m.bytes[HEADER..HEADER + 8].copy_from_slice(&v.to_le_bytes());
            }
        }
        let fds: Vec<RawFd> = m.fds.iter().map(AsRawFd::as_raw_fd).collect();
        if let Err(e) = to.send(&m.bytes, &fds) {
            log::debug!("connection {n}: writing to the frontend: {e}");
            return;
        }
    }
}

/// The next message from `from`, or None (logged) when it closed or misbehaved.
fn read_or_log(n: u64, from: &UnixStream, src: &str) -> Option<Message> {
    match read_message(from) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            log::warn!("connection {n}: message from the {src}: {e}; closing");
            None
        }
        Err(e) => {
            log::debug!("connection {n}: reading from the {src}: {e}");
            None
        }
    }
}

/// The two copying threads of one connection.
pub struct Relay {
    frontend: UnixStream,
    inner: UnixStream,
    to_backend: thread::JoinHandle<()>,
    to_frontend: thread::JoinHandle<()>,
    to_frontend_done: mpsc::Receiver<()>,
}

fn close(a: &UnixStream, b: &UnixStream) {
    let _ = a.shutdown(std::net::Shutdown::Both);
    let _ = b.shutdown(std::net::Shutdown::Both);
}

impl Relay {
    /// Starts copying between `frontend` and `inner` (the daemon's connection). When
    /// either side closes or misbehaves, both are closed.
    /// `inflight`: the back-end keeps inflight records (the relay offers INFLIGHT_SHMFD).
    pub fn start(
        n: u64,
        frontend: UnixStream,
        inner: UnixStream,
        inflight: Option<InflightHook>,
    ) -> io::Result<Relay> {
        Relay::start_with_stop(n, frontend, inner, inflight, None)
    }

    /// [`Relay::start`], calling `stopping` with the index of every GET_VRING_BASE before
    /// the back-end's handler gets it.
    pub fn start_with_stop(
        n: u64,
        frontend: UnixStream,
        inner: UnixStream,
        inflight: Option<InflightHook>,
        stopping: Option<StopHook>,
    ) -> io::Result<Relay> {
        let writer = Arc::new(Writer {
            s: frontend.try_clone()?,
            lock: Mutex::new(()),
        });
        let offer_inflight = inflight.is_some();
        let mut conn = Conn::new(n, writer.clone(), inflight, stopping);
        let (fe, inn) = (frontend.try_clone()?, inner.try_clone()?);
        let to_backend = thread::Builder::new()
            .name(format!("relay-in-{n}"))
            .spawn(move || {
                pump_to_backend(&mut conn, &fe, &inn);
                close(&fe, &inn);
            })?;
        let inn = inner.try_clone()?;
        let (tx, to_frontend_done) = mpsc::channel();
        let to_frontend =
            match thread::Builder::new()
                .name(format!("relay-out-{n}"))
                .spawn(move || {
                    pump_to_frontend(n, &inn, &writer, offer_inflight);
                    close(&writer.s, &inn);
                    let _ = tx.send(());
                }) {
                Ok(t) => t,
                Err(e) => {
                    close(&frontend, &inner);
                    let _ = to_backend.join();
                    return Err(e);
                }
            };
        Ok(Relay {
            frontend,
            inner,
            to_backend,
            to_frontend,
            to_frontend_done,
        })
    }

    /// Once the daemon closed its end: lets the last replies through (up to a second,
    /// for a frontend that does not read them), closes both sides, joins the threads.
    pub fn finish(self) {
        let _ = self.to_frontend_done.recv_timeout(Duration::from_secs(1));
        close(&self.frontend, &self.inner);
        let _ = self.to_frontend.join();
        let _ = self.to_backend.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Read;

    fn memfd(size: u64) -> File {
        // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"relay-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` was just created and is owned by nobody else.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(size).unwrap();
        f
    }

    /// A relay between a test frontend and a test back-end: (frontend, back-end, relay).
    fn relay() -> (UnixStream, UnixStream, Relay) {
        let (fe, relay_fe) = UnixStream::pair().unwrap();
        let (relay_be, be) = UnixStream::pair().unwrap();
        let r = Relay::start(1, relay_fe, relay_be, None).unwrap();
        for s in [&fe, &be] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        (fe, be, r)
    }

    /// The back-end learns that a vring is being stopped before its handler gets the
    /// GET_VRING_BASE (which then waits for the vring's lock a busy worker holds).
    #[test]
    fn get_vring_base_calls_the_stop_hook_before_it_is_forwarded() {
        let (fe, relay_fe) = UnixStream::pair().unwrap();
        let (relay_be, be) = UnixStream::pair().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let hook: StopHook = Arc::new(move |e| s.lock().unwrap().push(e));
        let r = Relay::start_with_stop(1, relay_fe, relay_be, None, Some(hook)).unwrap();
        let msg = |request: u32, body: &[u8]| {
            let mut m = request.to_le_bytes().to_vec();
            m.extend_from_slice(&VERSION.to_le_bytes());
            m.extend_from_slice(&(body.len() as u32).to_le_bytes());
            m.extend_from_slice(body);
            m
        };
        be.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut body = 3u32.to_le_bytes().to_vec();
        body.extend_from_slice(&0u32.to_le_bytes());
        send_message(&fe, &msg(GET_VRING_BASE, &body), &[]).unwrap();
        let got = read_message(&be).unwrap().unwrap();
        assert_eq!(got.request(), GET_VRING_BASE);
        assert_eq!(
            *seen.lock().unwrap(),
            vec![VringEvent::Stopping(3)],
            "the hook ran before the forward"
        );
        // Other messages and a GET_VRING_BASE without a body do not call it.
        // GET_FEATURES (1), carrying what would be a vring index.
        send_message(&fe, &msg(1, &body), &[]).unwrap();
        send_message(&fe, &msg(GET_VRING_BASE, &[]), &[]).unwrap();
        assert_eq!(read_message(&be).unwrap().unwrap().request(), 1);
        assert_eq!(
            read_message(&be).unwrap().unwrap().request(),
            GET_VRING_BASE
        );
        assert_eq!(*seen.lock().unwrap(), vec![VringEvent::Stopping(3)]);
        // SET_VRING_ENABLE: index and whether enabled (before and after SET_FEATURES).
        let mut on = 4u32.to_le_bytes().to_vec();
        on.extend_from_slice(&1u32.to_le_bytes());
        send_message(&fe, &msg(SET_VRING_ENABLE, &on), &[]).unwrap();
        send_message(&fe, &msg(SET_FEATURES, &[0u8; 8]), &[]).unwrap();
        send_message(&fe, &msg(SET_VRING_ENABLE, &body), &[]).unwrap();
        for _ in 0..5 {
            if read_message(&be).unwrap().unwrap().request() == SET_VRING_ENABLE
                && seen.lock().unwrap().len() == 3
            {
                break;
            }
        }
        assert_eq!(
            seen.lock().unwrap()[1..],
            [
                VringEvent::Enabling(4, true),
                VringEvent::Enabling(3, false)
            ]
        );
        drop(fe);
        drop(be);
        r.finish();
    }

    #[test]
    fn a_refused_table_is_nacked_and_never_reaches_the_back_end() {
        let (fe, be, r) = relay();
        let ack = (PROTOCOL_F_REPLY_ACK).to_le_bytes();
        send_message(&fe, &encode(SET_PROTOCOL_FEATURES, VERSION, &ack), &[]).unwrap();
        let got = read_message(&be).unwrap().unwrap();
        assert_eq!(got.request(), SET_PROTOCOL_FEATURES);
        // One region of 1 MiB on a 4 KiB memfd, asking for a reply.
        let small = memfd(4096);
        let mut body = 1u32.to_le_bytes().to_vec();
        body.extend_from_slice(&[0; 4]);
        for v in [0u64, 1 << 20, 0x7000_0000, 0] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        let m = encode(SET_MEM_TABLE, VERSION | NEED_REPLY, &body);
        send_message(&fe, &m, &[small.as_raw_fd()]).unwrap();
        let reply = read_message(&fe).unwrap().expect("a reply");
        assert_eq!(reply.request(), SET_MEM_TABLE);
        assert_eq!(reply.flags() & REPLY, REPLY);
        assert_eq!(u64_at(reply.body(), 0), Some(1), "failure status");
        // Then both sides are closed, and the back-end got nothing more.
        let mut rest = Vec::new();
        assert_eq!(
            (&be).read_to_end(&mut rest).unwrap(),
            0,
            "forwarded: {rest:?}"
        );
        assert!(read_message(&fe).unwrap().is_none());
        r.finish();
    }

    #[test]
    fn add_mem_reg_is_checked_against_its_fd_and_the_installed_regions() {
        let (fe, be, r) = relay();
        let (mem, small) = (memfd(1 << 20), memfd(4096));
        let region = |gpa: u64, uaddr: u64| {
            let mut b = vec![0u8; 8];
            for v in [gpa, 1 << 20, uaddr, 0] {
                b.extend_from_slice(&v.to_le_bytes());
            }
            encode(ADD_MEM_REG, VERSION, &b)
        };
        send_message(&fe, &region(0, 0x7000_0000), &[mem.as_raw_fd()]).unwrap();
        assert_eq!(read_message(&be).unwrap().unwrap().request(), ADD_MEM_REG);
        // Beside the first one, but 1 MiB on a 4 KiB memfd: never forwarded.
        send_message(&fe, &region(1 << 20, 0x7010_0000), &[small.as_raw_fd()]).unwrap();
        assert!(read_message(&be).unwrap().is_none(), "forwarded");
        r.finish();
    }

    #[test]
    fn rings_must_fit_in_the_installed_regions() {
        let (fe, be, r) = relay();
        let mem = memfd(64 << 10);
        let mut table = 1u32.to_le_bytes().to_vec();
        table.extend_from_slice(&[0; 4]);
        for v in [0u64, 64 << 10, 0x7000_0000, 0] {
            table.extend_from_slice(&v.to_le_bytes());
        }
        send_message(
            &fe,
            &encode(SET_MEM_TABLE, VERSION, &table),
            &[mem.as_raw_fd()],
        )
        .unwrap();
        assert_eq!(read_message(&be).unwrap().unwrap().request(), SET_MEM_TABLE);
        let mut num = 0u32.to_le_bytes().to_vec();
        num.extend_from_slice(&256u32.to_le_bytes());
        send_message(&fe, &encode(SET_VRING_NUM, VERSION, &num), &[]).unwrap();
        assert_eq!(read_message(&be).unwrap().unwrap().request(), SET_VRING_NUM);
        let addr = |desc: u64| {
            let mut b = 0u32.to_le_bytes().to_vec();
            b.extend_from_slice(&[0; 4]);
            for v in [desc, 0x7000_2000u64, 0x7000_1000, 0] {
                b.extend_from_slice(&v.to_le_bytes());
            }
            encode(SET_VRING_ADDR, VERSION, &b)
        };
        // 256 descriptors (4 KiB) from 0x7000_3000 fit; from 16 bytes before the end not.
        send_message(&fe, &addr(0x7000_3000), &[]).unwrap();
        assert_eq!(
            read_message(&be).unwrap().unwrap().request(),
            SET_VRING_ADDR
        );
        send_message(&fe, &addr(0x7000_0000 + (64 << 10) - 16), &[]).unwrap();
        assert!(read_message(&be).unwrap().is_none(), "forwarded");
        r.finish();
    }
}
