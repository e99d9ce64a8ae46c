//! vhost-user frontends: the device runs in a back-end process; the VMM negotiates
//! features, shares guest memory (the memfd) and hands the back-end each queue's ioeventfd
//! (kick) and MSI-X irqfd (call), so it stays off the data path.
//!
//! When the back-end goes away the VMM stays up: a watcher thread sees the socket hang up,
//! reconnects as soon as the back-end listens again, replays the setup and resumes every
//! queue from the used index in guest memory (requests that were in flight are executed
//! again by the new back-end). For [`OUTAGE_GRACE`] the guest's requests wait in the rings,
//! so a quick restart costs the guest nothing; after that the VMM completes them itself with
//! an error (block: VIRTIO_BLK_S_IOERR; net: transmitted frames are dropped) until the
//! back-end is back, so a guest is told instead of left waiting.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::{Activation, VirtioDevice};

/// The vhost-user bit in the feature word; never offered to the guest.
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
const VIRTIO_NET_F_CTRL_VQ: u64 = 1 << 17;

#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    #[error(
        "cannot connect to vhost-user back-end '{0}': is its daemon running and listening there?"
    )]
    Connect(PathBuf, #[source] vhost::Error),
    #[error("vhost-user back-end '{path}' refused {what}")]
    Protocol {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("vhost-user back-end '{path}' lacks {what}, which this frontend needs")]
    Missing { path: PathBuf, what: &'static str },
    #[error("cannot create the eventfd of the vhost-user reconnect watcher")]
    Wake(#[source] io::Error),
}

/// Which device the back-end implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Block,
    Net,
}

/// One memory region as the back-end must map it.
#[derive(Clone, Copy)]
pub struct SharedRegion {
    pub guest_addr: u64,
    pub size: u64,
    pub host_addr: u64,
    pub file_offset: u64,
}

/// Everything needed to (re)configure a back-end.
struct Setup {
    acked: u64,
    queues: Vec<QueueSetup>,
    mem: super::Memory,
}

struct QueueSetup {
    index: usize,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    kick: EventFd,
    call: Option<EventFd>,
}

struct Conn {
    frontend: Frontend,
    protocol: VhostUserProtocolFeatures,
}

struct Inner {
    conn: Option<Conn>,
    setup: Option<Setup>,
}

pub struct VhostUserDevice {
    name: String,
    path: PathBuf,
    kind: Kind,
    features: u64,
    queue_sizes: Vec<u16>,
    config: Vec<u8>,
    memfd: RawFd,
    regions: Vec<SharedRegion>,
    inner: Arc<Mutex<Inner>>,
    stop: Arc<AtomicBool>,
    /// Wakes the watcher: the device is going away, or the connection was dropped here.
    wake: Arc<EventFd>,
    watcher: Option<thread::JoinHandle<()>>,
}

fn protocol_err<'a>(
    path: &'a Path,
    what: &'static str,
) -> impl FnOnce(vhost::Error) -> VhostUserError + 'a {
    move |source| VhostUserError::Protocol {
        path: path.to_path_buf(),
        what,
        source,
    }
}

/// Connects and negotiates the protocol; returns the connection and the back-end's virtio
/// features.
fn connect(path: &Path, max_queues: u64) -> Result<(Conn, u64), VhostUserError> {
    let mut fe = Frontend::connect(path, max_queues)
        .map_err(|e| VhostUserError::Connect(path.to_path_buf(), e))?;
    fe.set_owner().map_err(protocol_err(path, "SET_OWNER"))?;
    let features = fe
        .get_features()
        .map_err(protocol_err(path, "GET_FEATURES"))?;
    let mut protocol = VhostUserProtocolFeatures::empty();
    if features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
        let offered = fe
            .get_protocol_features()
            .map_err(protocol_err(path, "GET_PROTOCOL_FEATURES"))?;
        protocol = offered
            & (VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK);
        fe.set_protocol_features(protocol)
            .map_err(protocol_err(path, "SET_PROTOCOL_FEATURES"))?;
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            fe.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
        }
    }
    Ok((
        Conn {
            frontend: fe,
            protocol,
        },
        features,
    ))
}

impl VhostUserDevice {
    /// Connects to the back-end at `path` and reads what the guest will see.
    pub fn new(
        cfg: &crate::config::VhostUserConfig,
        memfd: RawFd,
        regions: Vec<SharedRegion>,
    ) -> Result<Self, VhostUserError> {
        let (name, path, queues, queue_size, mac) = (
            cfg.id.as_str(),
            cfg.socket.as_path(),
            cfg.queues,
            cfg.queue_size,
            cfg.mac,
        );
        let kind = if cfg.net { Kind::Net } else { Kind::Block };
        let (mut conn, features) = connect(path, 64)?;
        let fe = &mut conn.frontend;
        let mut nq = match kind {
            Kind::Block => usize::from(queues),
            Kind::Net => {
                usize::from(queues) * 2 + usize::from(features & VIRTIO_NET_F_CTRL_VQ != 0)
            }
        };
        if conn.protocol.contains(VhostUserProtocolFeatures::MQ) {
            let max = fe
                .get_queue_num()
                .map_err(protocol_err(path, "GET_QUEUE_NUM"))?;
            nq = nq.min(max as usize);
        } else {
            nq = nq.min(match kind {
                Kind::Block => 1,
                Kind::Net => 2 + usize::from(features & VIRTIO_NET_F_CTRL_VQ != 0),
            });
        }
        let config_len = match kind {
            Kind::Block => 60,
            Kind::Net => 12,
        };
        let mut config = vec![0u8; config_len];
        if conn.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            let (_, payload) = fe
                .get_config(
                    0,
                    config_len as u32,
                    VhostUserConfigFlags::WRITABLE,
                    &config,
                )
                .map_err(protocol_err(path, "GET_CONFIG"))?;
            let n = payload.len().min(config_len);
            config[..n].copy_from_slice(&payload[..n]);
        } else if kind == Kind::Block {
            return Err(VhostUserError::Missing {
                path: path.to_path_buf(),
                what: "the CONFIG protocol feature (the disk's capacity comes from it)",
            });
        }
        let mut features = features & !VHOST_USER_F_PROTOCOL_FEATURES;
        if let (Kind::Net, Some(mac)) = (kind, mac) {
            config[..6].copy_from_slice(&mac);
            features |= 1 << 5; // VIRTIO_NET_F_MAC
        }
        log::info!(
            "{name}: vhost-user back-end {} ({:?}), {nq} queues, features {features:#x}, protocol {:?}",
            path.display(),
            kind,
            conn.protocol
        );
        Ok(VhostUserDevice {
            name: name.to_string(),
            path: path.to_path_buf(),
            kind,
            features,
            queue_sizes: vec![queue_size; nq],
            config,
            memfd,
            regions,
            inner: Arc::new(Mutex::new(Inner {
                conn: Some(conn),
                setup: None,
            })),
            stop: Arc::new(AtomicBool::new(false)),
            wake: Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(VhostUserError::Wake)?),
            watcher: None,
        })
    }

    fn start_watcher(&mut self) {
        if self.watcher.is_some() {
            return;
        }
        let inner = self.inner.clone();
        let stop = self.stop.clone();
        let wake = self.wake.clone();
        let path = self.path.clone();
        let name = self.name.clone();
        let memfd = self.memfd;
        let regions = self.regions.clone();
        let nq = self.queue_sizes.len() as u64;
        let kind = self.kind;
        let t = thread::Builder::new()
            .name(format!("{}-vu", self.name))
            .spawn(move || {
                watch(
                    &name,
                    kind,
                    &path,
                    nq,
                    memfd,
                    &regions,
                    &inner,
                    (&stop, &wake),
                )
            });
        match t {
            Ok(t) => self.watcher = Some(t),
            Err(e) => log::error!("{}: cannot start the reconnect thread: {e}", self.name),
        }
    }
}

/// Sends the memory table and every queue to the back-end.
fn configure(
    conn: &mut Conn,
    setup: &Setup,
    memfd: RawFd,
    regions: &[SharedRegion],
    resume: bool,
) -> Result<(), vhost::Error> {
    let fe = &mut conn.frontend;
    let acked = setup.acked
        | if conn.protocol.is_empty() {
            0
        } else {
            VHOST_USER_F_PROTOCOL_FEATURES
        };
    fe.set_features(acked)?;
    let table: Vec<VhostUserMemoryRegionInfo> = regions
        .iter()
        .map(|r| VhostUserMemoryRegionInfo {
            guest_phys_addr: r.guest_addr,
            memory_size: r.size,
            userspace_addr: r.host_addr,
            mmap_offset: r.file_offset,
            mmap_handle: memfd,
        })
        .collect();
    fe.set_mem_table(&table)?;
    let mem = setup.mem.memory();
    let host = |ga: u64| -> Result<u64, vhost::Error> {
        mem.get_host_address(GuestAddress(ga))
            .map(|p| p as u64)
            .map_err(|_| vhost::Error::InvalidGuestMemory)
    };
    for q in &setup.queues {
        fe.set_vring_num(q.index, q.size)?;
        fe.set_vring_addr(
            q.index,
            &VringConfigData {
                queue_max_size: q.size,
                queue_size: q.size,
                flags: 0,
                desc_table_addr: host(q.desc)?,
                used_ring_addr: host(q.used)?,
                avail_ring_addr: host(q.avail)?,
                log_addr: None,
            },
        )?;
        // A fresh queue starts at 0; after a reconnect, at the used index in guest memory,
        // so requests the old back-end took but never completed run again.
        let base = if resume {
            mem.read_obj::<u16>(GuestAddress(q.used + 2)).unwrap_or(0)
        } else {
            0
        };
        fe.set_vring_base(q.index, base)?;
        if let Some(call) = &q.call {
            fe.set_vring_call(q.index, call)?;
        }
        fe.set_vring_kick(q.index, &q.kick)?;
        if !conn.protocol.is_empty() {
            fe.set_vring_enable(q.index, true)?;
        }
        if resume {
            // Wake the new back-end for requests queued while it was away.
            let _ = q.kick.write(1);
        }
    }
    Ok(())
}

/// How long guest requests wait for a back-end that went away before they fail.
pub const OUTAGE_GRACE: Duration = Duration::from_secs(8);
const VIRTIO_BLK_S_IOERR: u8 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

/// Completes every request the guest queued on `setup`'s queues with an error, as the
/// device would while its back-end is gone. Starts at the used index in guest memory, so
/// requests the dead back-end took but never finished are failed too; a later reconnect
/// resumes at the new used index. Returns how many requests failed.
fn fail_pending(kind: Kind, setup: &Setup) -> u32 {
    let mem = setup.mem.memory();
    let mut failed = 0;
    for q in &setup.queues {
        // Net: only transmit queues (odd indexes) carry requests to fail; RX buffers wait.
        let net_tx = q.index % 2 == 1;
        if kind == Kind::Net && !net_tx {
            continue;
        }
        let Ok(mut queue) = virtio_queue::Queue::new(q.size) else {
            continue;
        };
        queue.set_size(q.size);
        queue.set_desc_table_address(Some(q.desc as u32), Some((q.desc >> 32) as u32));
        queue.set_avail_ring_address(Some(q.avail as u32), Some((q.avail >> 32) as u32));
        queue.set_used_ring_address(Some(q.used as u32), Some((q.used >> 32) as u32));
        queue.set_event_idx(setup.acked & super::VIRTIO_RING_F_EVENT_IDX != 0);
        queue.set_ready(true);
        if !queue.is_valid(&*mem) {
            continue;
        }
        let Ok(used) = mem.read_obj::<u16>(GuestAddress(q.used + 2)) else {
            continue;
        };
        queue.set_next_avail(used);
        queue.set_next_used(used);
        let mut done = 0;
        loop {
            let chain = match queue.iter(&*mem) {
                Ok(mut it) => it.next(),
                Err(_) => None,
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let mut len = 0;
            if kind == Kind::Block {
                // The status byte is the last byte of the last device-writable descriptor.
                if let Some(d) = chain.clone().last() {
                    if d.flags() & VRING_DESC_F_WRITE != 0 && d.len() > 0 {
                        let at = GuestAddress(d.addr().0.wrapping_add(u64::from(d.len()) - 1));
                        if mem.write_obj(VIRTIO_BLK_S_IOERR, at).is_ok() {
                            len = 1;
                        }
                    }
                }
            }
            if queue.add_used(&*mem, head, len).is_err() {
                break;
            }
            done += 1;
        }
        if done > 0 {
            failed += done;
            if let Some(call) = &q.call {
                let _ = call.write(1);
            }
        }
    }
    failed
}

/// Sleeps until the back-end's socket `fd` hangs up (true), `wake` is written, or
/// `timeout_ms` passes (false; -1: no timeout). With `fd` < 0 it only waits for `wake`.
/// No timer runs while the back-end is connected: an idle VMM does not wake up.
fn wait_hangup(fd: RawFd, wake: &EventFd, timeout_ms: i32) -> bool {
    let mut pfds = [
        libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd,
            events: libc::POLLRDHUP,
            revents: 0,
        },
    ];
    // SAFETY: polls two pollfds of a live local array (poll ignores a negative fd).
    let r = unsafe { libc::poll(pfds.as_mut_ptr(), 2, timeout_ms) };
    if r <= 0 {
        return false;
    }
    if pfds[0].revents & libc::POLLIN != 0 {
        // Drain it; the caller looks at why it was woken.
        let _ = wake.read();
    }
    pfds[1].revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

#[allow(clippy::too_many_arguments)]
fn watch(
    name: &str,
    kind: Kind,
    path: &Path,
    nq: u64,
    memfd: RawFd,
    regions: &[SharedRegion],
    inner: &Mutex<Inner>,
    (stop, wake): (&AtomicBool, &EventFd),
) {
    let mut down_since: Option<std::time::Instant> = None;
    let mut failed_total = 0u64;
    while !stop.load(Ordering::Acquire) {
        let fd = inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .conn
            .as_ref()
            .map(|c| c.frontend.as_raw_fd());
        match fd {
            Some(fd) => {
                if !wait_hangup(fd, wake, -1) {
                    continue;
                }
                log::warn!(
                    "{name}: vhost-user back-end {} went away; reconnecting when it is back",
                    path.display()
                );
                inner.lock().unwrap_or_else(|p| p.into_inner()).conn = None;
                down_since = Some(std::time::Instant::now());
                failed_total = 0;
            }
            None => {
                // Try to reconnect every 100 ms while the back-end is away.
                wait_hangup(-1, wake, 100);
                if stop.load(Ordering::Acquire) {
                    break;
                }
                if down_since.is_some_and(|t| t.elapsed() >= OUTAGE_GRACE) {
                    let g = inner.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(setup) = &g.setup {
                        let n = fail_pending(kind, setup);
                        if n > 0 && failed_total == 0 {
                            log::warn!(
                                "{name}: back-end {} still away after {} s: failing guest requests until it is back",
                                path.display(),
                                OUTAGE_GRACE.as_secs()
                            );
                        }
                        failed_total += u64::from(n);
                    }
                }
                let Ok((mut conn, _)) = connect(path, nq) else {
                    continue;
                };
                let mut g = inner.lock().unwrap_or_else(|p| p.into_inner());
                let result = match &g.setup {
                    Some(setup) => configure(&mut conn, setup, memfd, regions, true),
                    None => Ok(()),
                };
                match result {
                    Ok(()) => {
                        log::info!(
                            "{name}: reconnected to {}, queues resumed ({failed_total} requests failed meanwhile)",
                            path.display()
                        );
                        g.conn = Some(conn);
                        down_since = None;
                    }
                    Err(e) => log::warn!("{name}: reconnect to {} failed: {e}", path.display()),
                }
            }
        }
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u16 {
        match self.kind {
            Kind::Net => 1,
            Kind::Block => 2,
        }
    }

    fn pci_class(&self) -> u32 {
        match self.kind {
            Kind::Net => 0x02_00_00,
            Kind::Block => 0x01_80_00,
        }
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        self.queue_sizes.clone()
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        backends::read_config(&self.config, offset, data);
    }

    fn activate(&mut self, a: Activation) -> io::Result<()> {
        let mut queues = Vec::new();
        for q in a.queues {
            queues.push(QueueSetup {
                index: usize::from(q.index),
                size: q.queue.size(),
                desc: q.queue.desc_table(),
                avail: q.queue.avail_ring(),
                used: q.queue.used_ring(),
                kick: q.kick,
                call: q.irq.fd().map(|f| f.try_clone()).transpose()?,
            });
        }
        let setup = Setup {
            acked: a.acked_features & self.features,
            queues,
            mem: a.mem,
        };
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(conn) = g.conn.as_mut() {
            if let Err(e) = configure(conn, &setup, self.memfd, &self.regions, false) {
                log::warn!(
                    "{}: vhost-user back-end {} failed during setup: {e}; waiting for it to come back",
                    self.name,
                    self.path.display()
                );
                g.conn = None;
                // The watcher may be waiting on the socket just closed.
                let _ = self.wake.write(1);
            }
        }
        g.setup = Some(setup);
        drop(g);
        self.start_watcher();
        Ok(())
    }

    fn reset(&mut self) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let setup = g.setup.take();
        if let (Some(conn), Some(setup)) = (g.conn.as_mut(), setup) {
            // GET_VRING_BASE stops each ring in the back-end.
            for q in &setup.queues {
                let _ = conn.frontend.get_vring_base(q.index);
            }
        }
    }
}

impl Drop for VhostUserDevice {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.wake.write(1);
        if let Some(t) = self.watcher.take() {
            let _ = t.join();
        }
    }
}

/// The regions of guest RAM as a back-end maps them (host addresses of this process).
pub fn shared_regions(ram: &crate::memory::Ram) -> Vec<SharedRegion> {
    ram.memory
        .iter()
        .zip(&ram.ranges)
        .filter_map(|(r, (ga, size, off))| {
            let host = r.get_host_address(vm_memory::MemoryRegionAddress(0)).ok()?;
            Some(SharedRegion {
                guest_addr: ga.0,
                size: *size,
                host_addr: host as u64,
                file_offset: *off,
            })
        })
        .collect()
}
