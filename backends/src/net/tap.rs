//! TAP devices: open by name (created if missing) or adopt an fd; vnet header and offloads.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use thiserror::Error;
use virtio_bindings::virtio_net::*;

use super::VNET_HDR_LEN;

/// Errors opening or configuring a tap.
#[derive(Debug, Error)]
pub enum TapError {
    /// /dev/net/tun could not be opened.
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    /// The interface name is empty or longer than 15 bytes.
    #[error("invalid tap name '{0}' (1 to 15 bytes)")]
    InvalidName(String),
    /// TUNSETIFF failed (no CAP_NET_ADMIN, or the interface exists with other flags).
    #[error("cannot attach to tap '{name}'")]
    SetIff {
        /// The interface name.
        name: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// TUNGETIFF on an adopted fd failed (not a tun/tap fd).
    #[error("fd {0} is not an attached tun/tap device")]
    NotTap(RawFd, #[source] io::Error),
    /// The adopted fd is a tun (layer 3) device or lacks IFF_VNET_HDR.
    #[error("fd {fd} is not a tap with IFF_VNET_HDR (flags {flags:#x})")]
    WrongFlags {
        /// The fd.
        fd: RawFd,
        /// Its IFF_* flags.
        flags: i16,
    },
    /// Setting O_NONBLOCK failed.
    #[error("cannot make the tap fd non-blocking")]
    NonBlocking(#[source] io::Error),
    /// TUNSETVNETHDRSZ failed.
    #[error("cannot set the vnet header size of tap '{name}'")]
    VnetHdrSize {
        /// The interface name.
        name: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// TUNSETOFFLOAD failed.
    #[error("cannot set offloads {flags:#x} on tap '{name}'")]
    Offload {
        /// The interface name.
        name: String,
        /// The TUN_F_* flags.
        flags: u32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// `struct ifreq` with the flags member of the union (40 bytes on 64-bit Linux).
#[repr(C)]
#[derive(Clone, Copy)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str, flags: i16) -> Self {
        let mut r = IfReq {
            name: [0; 16],
            flags,
            _pad: [0; 22],
        };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        r
    }
    fn name(&self) -> String {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(16);
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// One queue of a tap interface (an fd), non-blocking, with IFF_VNET_HDR.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

const IFF_TAP: i16 = libc::IFF_TAP as i16;
const IFF_NO_PI: i16 = libc::IFF_NO_PI as i16;
const IFF_VNET_HDR: i16 = libc::IFF_VNET_HDR as i16;
const IFF_MULTI_QUEUE: i16 = libc::IFF_MULTI_QUEUE as i16;

impl Tap {
    /// Opens (creating it if missing) tap `name` with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
    /// (and IFF_MULTI_QUEUE if `multiqueue`), non-blocking, with a 12-byte vnet header.
    /// `name` may contain `%d` for the kernel to pick a number.
    pub fn open(name: &str, multiqueue: bool) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() > 15 || name.contains('\0') {
            return Err(TapError::InvalidName(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let fd = OwnedFd::from(file);
        let mut flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if multiqueue {
            flags |= IFF_MULTI_QUEUE;
        }
        let mut req = IfReq::new(name, flags);
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` is a valid, 40-byte,
        // properly laid out ifreq that lives across the call.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if r < 0 {
            return Err(TapError::SetIff {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        let tap = Tap {
            fd,
            name: req.name(),
        };
        tap.set_vnet_hdr_size(VNET_HDR_LEN as i32)?;
        Ok(tap)
    }

    /// Opens `queues` fds of the same tap (IFF_MULTI_QUEUE when more than one), one per
    /// virtio-net queue pair.
    pub fn open_queues(name: &str, queues: u16) -> Result<Vec<Tap>, TapError> {
        let mq = queues > 1;
        let first = Tap::open(name, mq)?;
        let real = first.name.clone();
        let mut taps = vec![first];
        for _ in 1..queues {
            taps.push(Tap::open(&real, mq)?);
        }
        Ok(taps)
    }

    /// Adopts an already attached tap fd (e.g. passed by a management tool): checks that it
    /// is a tap with IFF_VNET_HDR, makes it non-blocking and sets the vnet header size.
    pub fn from_fd(fd: OwnedFd) -> Result<Tap, TapError> {
        let raw = fd.as_raw_fd();
        let mut req = IfReq::new("", 0);
        // SAFETY: TUNGETIFF writes a `struct ifreq` into `req`, which is valid and 40 bytes.
        let r = unsafe { libc::ioctl(raw, libc::TUNGETIFF, &mut req) };
        if r < 0 {
            return Err(TapError::NotTap(raw, io::Error::last_os_error()));
        }
        if req.flags & IFF_TAP == 0 || req.flags & IFF_VNET_HDR == 0 {
            return Err(TapError::WrongFlags {
                fd: raw,
                flags: req.flags,
            });
        }
        // SAFETY: F_GETFL/F_SETFL on an fd we own; no memory is passed.
        let r = unsafe {
            let fl = libc::fcntl(raw, libc::F_GETFL);
            if fl < 0 {
                fl
            } else {
                libc::fcntl(raw, libc::F_SETFL, fl | libc::O_NONBLOCK)
            }
        };
        if r < 0 {
            return Err(TapError::NonBlocking(io::Error::last_os_error()));
        }
        let tap = Tap {
            fd,
            name: req.name(),
        };
        tap.set_vnet_hdr_size(VNET_HDR_LEN as i32)?;
        Ok(tap)
    }

    /// Attaches or detaches this queue of a multi-queue tap (TUNSETQUEUE): the kernel steers
    /// incoming frames to attached queues only, so a queue no guest ring reads must be
    /// detached or the frames steered to it are lost. A queue already so, or a single-queue
    /// tap (EINVAL for both): nothing to do.
    pub fn set_queue_attached(&self, attached: bool) -> io::Result<()> {
        let flags = if attached {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        } as i16;
        let mut req = IfReq::new("", flags);
        // SAFETY: TUNSETQUEUE reads a `struct ifreq` (its flags); `req` is a valid, 40-byte
        // ifreq that lives across the call.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNSETQUEUE, &mut req) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
        }
        Ok(())
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The IFF_* flags of this queue (TUNGETIFF).
    pub fn flags(&self) -> io::Result<i16> {
        let mut req = IfReq::new("", 0);
        // SAFETY: TUNGETIFF writes a `struct ifreq` into `req`, which is valid and 40 bytes.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNGETIFF, &mut req) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(req.flags)
    }

    /// TUNSETVNETHDRSZ.
    pub fn set_vnet_hdr_size(&self, size: i32) -> Result<(), TapError> {
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which points to `size`.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) };
        if r < 0 {
            return Err(TapError::VnetHdrSize {
                name: self.name.clone(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// TUNSETOFFLOAD from the negotiated guest features: what the guest can receive
    /// (GUEST_CSUM, GUEST_TSO4/6, GUEST_UFO, GUEST_ECN) is what the tap may hand us.
    pub fn set_offloads(&self, guest_features: u64) -> Result<(), TapError> {
        let flags = tap_offload_flags(guest_features);
        // SAFETY: TUNSETOFFLOAD takes an unsigned long by value; no memory is passed.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if r < 0 {
            return Err(TapError::Offload {
                name: self.name.clone(),
                flags,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Gives up the fd.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl IntoRawFd for Tap {
    fn into_raw_fd(self) -> RawFd {
        self.fd.into_raw_fd()
    }
}

/// TUN_F_* flags for negotiated `guest_features`.
pub fn tap_offload_flags(guest_features: u64) -> u32 {
    let has = |bit: u32| guest_features & (1u64 << bit) != 0;
    let mut flags = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        flags |= libc::TUN_F_CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= libc::TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= libc::TUN_F_TSO6;
        }
        if has(VIRTIO_NET_F_GUEST_ECN) {
            flags |= libc::TUN_F_TSO_ECN;
        }
        if has(VIRTIO_NET_F_GUEST_UFO) {
            flags |= libc::TUN_F_UFO;
        }
    }
    flags
}

#[cfg(test)]
impl Tap {
    pub(crate) fn tap_dup(&self) -> OwnedFd {
        self.fd.try_clone().unwrap()
    }
}
