//! Copies vhost-user messages between a frontend and the vhost-user daemon, with their fds.
//!
//! Messages from the frontend are read whole (12-byte header, then the body it announces),
//! so that the fds stay with their message and a header announcing more than
//! `MAX_MSG_SIZE` bytes ends the connection. One thing is changed: a frontend that sends
//! SET_VRING_ENABLE before SET_FEATURES (QEMU's `-netdev vhost-user` does, for the queues it
//! disables) gets a SET_FEATURES with only VHOST_USER_F_PROTOCOL_FEATURES injected first,
//! without reply, since the vhost crate refuses SET_VRING_ENABLE until that bit is acked.
//! The frontend's own SET_FEATURES later acks the real set.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use vhost::vhost_user::message::MAX_MSG_SIZE;

/// Size of the vhost-user header: request, flags, size (u32 each).
pub const HEADER: usize = 12;
/// Most fds one message may carry.
pub const MAX_FDS: usize = 8;
/// VHOST_USER_SET_FEATURES.
pub const SET_FEATURES: u32 = 2;
/// VHOST_USER_SET_VRING_ENABLE.
pub const SET_VRING_ENABLE: u32 = 18;
/// VHOST_USER_SET_VRING_NUM.
pub const SET_VRING_NUM: u32 = 8;
/// The largest split virtqueue.
const MAX_QUEUE_SIZE: u32 = 32768;
/// VHOST_USER_F_PROTOCOL_FEATURES.
pub const PROTOCOL_FEATURES: u64 = 1 << 30;
/// Version 1 in the flags.
const VERSION: u32 = 0x1;
const VERSION_MASK: u32 = 0x3;

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
        u32::from_le_bytes([self.bytes[0], self.bytes[1], self.bytes[2], self.bytes[3]])
    }
}

/// The SET_FEATURES message injected before an early SET_VRING_ENABLE.
pub fn protocol_features_message() -> Vec<u8> {
    let mut m = Vec::with_capacity(HEADER + 8);
    m.extend_from_slice(&SET_FEATURES.to_le_bytes());
    m.extend_from_slice(&VERSION.to_le_bytes());
    m.extend_from_slice(&8u32.to_le_bytes());
    m.extend_from_slice(&PROTOCOL_FEATURES.to_le_bytes());
    m
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

/// Copies messages from `from` to `to` until either fails or closes. `to_backend`:
/// the frontend -> daemon direction, where SET_FEATURES is injected when needed.
fn pump(n: u64, from: &UnixStream, to: &UnixStream, to_backend: bool) {
    let (src, dst) = if to_backend {
        ("frontend", "back-end")
    } else {
        ("back-end", "frontend")
    };
    let mut features_seen = false;
    loop {
        let m = match read_message(from) {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                log::warn!("connection {n}: message from the {src}: {e}; closing");
                return;
            }
            Err(e) => {
                log::debug!("connection {n}: reading from the {src}: {e}");
                return;
            }
        };
        log::trace!(
            "connection {n}: {src} -> {dst}: request {}, {} bytes, {} fd(s)",
            m.request(),
            m.bytes.len(),
            m.fds.len()
        );
        if to_backend {
            match m.request() {
                SET_VRING_NUM => {
                    // virtio-queue would ignore a size that is not a power of two and
                    // keep the old one; refuse it like every other bad queue size.
                    let word = |i: usize| {
                        m.bytes
                            .get(HEADER + i..HEADER + i + 4)
                            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    };
                    match (word(0), word(4)) {
                        (Some(_), Some(num)) if num.is_power_of_two() && num <= MAX_QUEUE_SIZE => {}
                        (q, num) => {
                            log::warn!(
                                "connection {n}: SET_VRING_NUM {num:?} for queue {q:?}: not a \
                                 power of two from 1 to {MAX_QUEUE_SIZE}; closing"
                            );
                            return;
                        }
                    }
                }
                SET_FEATURES => features_seen = true,
                SET_VRING_ENABLE if !features_seen => {
                    log::debug!(
                        "connection {n}: SET_VRING_ENABLE before SET_FEATURES: acking \
                         PROTOCOL_FEATURES first"
                    );
                    if let Err(e) = send_message(to, &protocol_features_message(), &[]) {
                        log::debug!("connection {n}: writing to the {dst}: {e}");
                        return;
                    }
                    features_seen = true;
                }
                _ => {}
            }
        }
        let fds: Vec<RawFd> = m.fds.iter().map(AsRawFd::as_raw_fd).collect();
        if let Err(e) = send_message(to, &m.bytes, &fds) {
            log::debug!("connection {n}: writing to the {dst}: {e}");
            return;
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
    pub fn start(n: u64, frontend: UnixStream, inner: UnixStream) -> io::Result<Relay> {
        let (fe, inn) = (frontend.try_clone()?, inner.try_clone()?);
        let to_backend = thread::Builder::new()
            .name(format!("relay-in-{n}"))
            .spawn(move || {
                pump(n, &fe, &inn, true);
                close(&fe, &inn);
            })?;
        let (fe, inn) = (frontend.try_clone()?, inner.try_clone()?);
        let (tx, to_frontend_done) = mpsc::channel();
        let to_frontend =
            match thread::Builder::new()
                .name(format!("relay-out-{n}"))
                .spawn(move || {
                    pump(n, &inn, &fe, false);
                    close(&fe, &inn);
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
