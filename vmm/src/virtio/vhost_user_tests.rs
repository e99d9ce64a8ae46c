//! Unit tests of the vhost-user frontend against fake back-ends written here (a listener
//! thread speaking the protocol on a temporary socket, scripted to answer, stall or hang
//! up), and of the ring and inflight-region bookkeeping on hand-built rings. No KVM.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use backends::inflight::{region_size, InflightRegion};
use backends::vhost_user::relay::{self, read_message, send_message};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::config::VhostUserConfig;
use crate::virtio::{ActiveQueue, Irq, Memory};

// Request codes (vhost-user spec).
const GET_FEATURES: u32 = 1;
const GET_PROTOCOL_FEATURES: u32 = 15;
const GET_QUEUE_NUM: u32 = 17;
const GET_CONFIG: u32 = 24;
const GET_VRING_BASE: u32 = 11;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_BASE: u32 = 10;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const GET_INFLIGHT_FD: u32 = 31;
const SET_INFLIGHT_FD: u32 = 32;
const NEED_REPLY: u32 = 0x8;

const P_MQ: u64 = 1;
const P_REPLY_ACK: u64 = 1 << 3;
const P_CONFIG: u64 = 1 << 9;
const P_INFLIGHT: u64 = 1 << 12;

/// One message as the fake back-end saw it.
#[derive(Clone, Debug)]
struct Msg {
    code: u32,
    /// The first u64 of the body (a queue index or value), 0 when shorter.
    arg: u64,
    fds: usize,
    /// Which connection (0: the first).
    conn: usize,
}

/// When each connection was closed by the frontend: (connection, time).
type Hangups = Mutex<Vec<(usize, Instant)>>;

/// How the fake back-end behaves.
#[derive(Clone)]
struct Script {
    protocol: u64,
    /// Answers this many messages on each connection, then stops reading (stalls); None:
    /// all.
    answer: Option<usize>,
    /// Never answers GET_VRING_BASE (stalls there).
    stall_vring_base: bool,
    /// Hangs up connection 0 after it saw this many SET_VRING_KICK.
    hangup_after_kicks: Option<usize>,
    /// Closes each connection when this many messages came, without answering the last.
    close_after: Option<usize>,
    /// A virtio-net back-end with this many queue pairs and a control queue after them
    /// (None: a virtio-blk one with 4 queues).
    net_pairs: Option<u16>,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            protocol: P_CONFIG | P_MQ,
            answer: None,
            stall_vring_base: false,
            hangup_after_kicks: None,
            close_after: None,
            net_pairs: None,
        }
    }
}

struct Fake {
    dir: PathBuf,
    path: PathBuf,
    msgs: Arc<Mutex<Vec<Msg>>>,
    /// When a connection was closed by the frontend, per connection.
    hangups: Arc<Hangups>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tmpdir(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "vmm-vu-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Receives one message: header, body and attached fds. None at EOF.
fn recv_msg(s: &mut UnixStream) -> Option<(u32, u32, Vec<u8>, Vec<OwnedFd>)> {
    let m = read_message(s).ok()??;
    Some((m.request(), m.flags(), m.body().to_vec(), m.fds))
}

fn reply(s: &mut UnixStream, code: u32, body: &[u8], fd: Option<RawFd>) {
    let _ = send_message(s, &relay::reply(code, body), fd.as_slice());
}

/// Serves one connection by the script; returns when the frontend hangs up (or the script
/// hangs up).
fn serve(mut s: UnixStream, conn: usize, script: &Script, fake: (&Mutex<Vec<Msg>>, &Hangups)) {
    let (msgs, hangups) = fake;
    let features: u64 = match script.net_pairs {
        None => (1 << 30) | (1 << 32) | VIRTIO_BLK_F_MQ,
        Some(_) => (1 << 30) | (1 << 32) | VIRTIO_NET_F_MQ | VIRTIO_NET_F_CTRL_VQ,
    };
    let mut seen = 0usize;
    let mut kicks = 0usize;
    let mut stalled = false;
    loop {
        if stalled || script.answer.is_some_and(|n| seen >= n) {
            // Stop reading; only notice the frontend closing the connection.
            let mut p = libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLRDHUP,
                revents: 0,
            };
            // SAFETY: polls one local pollfd.
            unsafe { libc::poll(&mut p, 1, 20_000) };
            hangups.lock().unwrap().push((conn, Instant::now()));
            return;
        }
        let Some((code, flags, body, fds)) = recv_msg(&mut s) else {
            hangups.lock().unwrap().push((conn, Instant::now()));
            return;
        };
        seen += 1;
        let arg = body
            .get(..8)
            .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()));
        msgs.lock().unwrap().push(Msg {
            code,
            arg,
            fds: fds.len(),
            conn,
        });
        if script.close_after == Some(seen) {
            hangups.lock().unwrap().push((conn, Instant::now()));
            return;
        }
        match code {
            GET_FEATURES => reply(&mut s, code, &features.to_le_bytes(), None),
            GET_PROTOCOL_FEATURES => reply(&mut s, code, &script.protocol.to_le_bytes(), None),
            GET_QUEUE_NUM => {
                // At most 4 pairs and the control queue (the vhost crate refuses more than it
                // supports); the config may say more (a back-end that lies).
                let n = script
                    .net_pairs
                    .map_or(4, |p| (2 * u64::from(p) + 1).min(9));
                reply(&mut s, code, &n.to_le_bytes(), None)
            }
            GET_CONFIG if script.net_pairs.is_some() => {
                let mut b = body.clone();
                // max_virtqueue_pairs, after the MAC and the status.
                let pairs = script.net_pairs.unwrap_or(1);
                b[12 + 8..12 + 10].copy_from_slice(&pairs.to_le_bytes());
                reply(&mut s, code, &b, None)
            }
            GET_CONFIG => {
                let mut b = body.clone();
                // capacity 8 sectors, num_queues 4
                b[12..20].copy_from_slice(&8u64.to_le_bytes());
                b[12 + 34..12 + 36].copy_from_slice(&4u16.to_le_bytes());
                reply(&mut s, code, &b, None)
            }
            GET_VRING_BASE if script.stall_vring_base => stalled = true,
            GET_VRING_BASE => {
                let mut b = body.clone();
                b.resize(8, 0);
                reply(&mut s, code, &b, None)
            }
            GET_INFLIGHT_FD => {
                let nq = u16::from_le_bytes(body[16..18].try_into().unwrap());
                let qs = u16::from_le_bytes(body[18..20].try_into().unwrap());
                let size = region_size(nq, qs);
                // SAFETY: creates a memfd; the result is checked.
                let fd = unsafe { libc::memfd_create(c"inflight".as_ptr(), libc::MFD_CLOEXEC) };
                assert!(fd >= 0);
                // SAFETY: a new fd this test owns.
                let f = unsafe { std::fs::File::from_raw_fd(fd) };
                f.set_len(size as u64).unwrap();
                let mut b = Vec::new();
                b.extend_from_slice(&(size as u64).to_le_bytes());
                b.extend_from_slice(&0u64.to_le_bytes());
                b.extend_from_slice(&nq.to_le_bytes());
                b.extend_from_slice(&qs.to_le_bytes());
                b.resize(body.len(), 0);
                reply(&mut s, code, &b, Some(f.as_raw_fd()));
            }
            _ if flags & NEED_REPLY != 0 => reply(&mut s, code, &0u64.to_le_bytes(), None),
            _ => {}
        }
        if code == SET_VRING_KICK {
            kicks += 1;
            if conn == 0 && script.hangup_after_kicks == Some(kicks) {
                hangups.lock().unwrap().push((conn, Instant::now()));
                return;
            }
        }
    }
}

/// A fake back-end listening on a fresh socket, serving each connection in turn.
fn fake(script: Script) -> Fake {
    let dir = tmpdir("fake");
    let path = dir.join("be.sock");
    let l = UnixListener::bind(&path).unwrap();
    let msgs = Arc::new(Mutex::new(Vec::new()));
    let hangups = Arc::new(Mutex::new(Vec::new()));
    let (m, h) = (msgs.clone(), hangups.clone());
    thread::spawn(move || {
        for (conn, s) in l.incoming().enumerate() {
            let Ok(s) = s else { return };
            serve(s, conn, &script, (&m, &h));
        }
    });
    Fake {
        dir,
        path,
        msgs,
        hangups,
    }
}

fn cfg(path: &std::path::Path, timeout_ms: u64) -> VhostUserConfig {
    let mut c = VhostUserConfig::parse(
        &format!("socket={},timeout_ms={timeout_ms}", path.display()),
        false,
        0,
    )
    .unwrap();
    c.queue_size = 8;
    c
}

/// A memfd to stand for guest RAM in SET_MEM_TABLE.
fn memfd() -> OwnedFd {
    // SAFETY: creates a memfd; the result is checked.
    let fd = unsafe { libc::memfd_create(c"ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a new fd this test owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// The one region of "guest RAM" the back-end is told to map.
fn region() -> Vec<SharedRegion> {
    vec![SharedRegion {
        guest_addr: 0,
        size: 0x10000,
        host_addr: 0x7f00_0000_0000,
        file_offset: 0,
    }]
}

const QSIZE: u16 = 8;
/// Queue `i`'s rings.
fn rings(i: u64) -> (u64, u64, u64) {
    let b = 0x1000 + i * 0x1000;
    (b, b + 0x400, b + 0x800)
}

fn guest_mem() -> Memory {
    GuestMemoryAtomic::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap())
}

/// An activation of `n` queues; queue 0 has an irqfd (returned), the others none.
fn activation(mem: &Memory, n: u16, shared: Arc<DeviceShared>) -> (Activation, EventFd) {
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let queues = (0..n)
        .map(|i| {
            let (d, a, u) = rings(u64::from(i));
            let mut q = Queue::new(QSIZE).unwrap();
            q.set_desc_table_address(Some(d as u32), Some(0));
            q.set_avail_ring_address(Some(a as u32), Some(0));
            q.set_used_ring_address(Some(u as u32), Some(0));
            q.set_ready(true);
            ActiveQueue {
                index: i,
                queue: q,
                kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                irq: Irq::new((i == 0).then(|| call.try_clone().unwrap())),
            }
        })
        .collect();
    (
        Activation {
            mem: mem.clone(),
            acked_features: 1 << 32,
            queues,
            shared,
        },
        call,
    )
}

fn shared() -> (Arc<DeviceShared>, EventFd) {
    let cfg_irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    (
        Arc::new(DeviceShared::new(Irq::new(Some(
            cfg_irq.try_clone().unwrap(),
        )))),
        cfg_irq,
    )
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(5));
    }
    f()
}

fn codes(f: &Fake, conn: usize) -> Vec<Msg> {
    f.msgs
        .lock()
        .unwrap()
        .iter()
        .filter(|m| m.conn == conn)
        .cloned()
        .collect()
}

#[test]
fn a_backend_that_stalls_during_activation_costs_the_vcpu_nothing() {
    // Answers the handshake (SET_OWNER, GET_FEATURES, GET_PROTOCOL_FEATURES,
    // SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_CONFIG), then never again: with REPLY_ACK
    // every setup message waits for an answer.
    let f = fake(Script {
        protocol: P_CONFIG | P_MQ | P_REPLY_ACK,
        answer: Some(6),
        ..Script::default()
    });
    let ram = memfd();
    let mut dev = VhostUserDevice::new(&cfg(&f.path, 300), ram.as_raw_fd(), region()).unwrap();
    let mem = guest_mem();
    let (sh, _cfg_irq) = shared();
    let (a, _call) = activation(&mem, 1, sh);
    let t = Instant::now();
    dev.activate(a).unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(50),
        "activate waited {:?}",
        t.elapsed()
    );
    // The reset is queued behind the stalled activation: it reads as pending, and is done
    // once the deadline cut the back-end off.
    dev.reset();
    assert!(dev.reset_pending());
    assert!(wait_until(Duration::from_secs(3), || !f
        .hangups
        .lock()
        .unwrap()
        .is_empty()));
    let cut = f.hangups.lock().unwrap()[0].1 - t;
    assert!(
        cut >= Duration::from_millis(250) && cut < Duration::from_millis(1500),
        "the connection was cut after {cut:?}, the deadline is 300 ms"
    );
    assert!(wait_until(Duration::from_secs(1), || !dev.reset_pending()));
    let t = Instant::now();
    drop(dev);
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "drop took {:?}",
        t.elapsed()
    );
}

#[test]
fn a_reset_waits_for_the_backend_at_most_the_deadline() {
    let f = fake(Script {
        stall_vring_base: true,
        ..Script::default()
    });
    let ram = memfd();
    let mut dev = VhostUserDevice::new(&cfg(&f.path, 400), ram.as_raw_fd(), region()).unwrap();
    let mem = guest_mem();
    let (sh, _c) = shared();
    let (a, _call) = activation(&mem, 1, sh);
    dev.activate(a).unwrap();
    let t = Instant::now();
    dev.reset();
    assert!(t.elapsed() < Duration::from_millis(50));
    assert!(dev.reset_pending());
    thread::sleep(Duration::from_millis(200));
    assert!(dev.reset_pending(), "done before the back-end answered");
    assert!(wait_until(Duration::from_secs(2), || !dev.reset_pending()));
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(350),
        "reset done after {took:?}"
    );
    // The silent back-end was dropped.
    assert!(wait_until(Duration::from_secs(1), || !f
        .hangups
        .lock()
        .unwrap()
        .is_empty()));
}

#[test]
fn drop_is_bounded_whatever_the_deadline() {
    // A deadline far beyond the exit bound: dropping the device cuts the socket instead.
    let f = fake(Script {
        stall_vring_base: true,
        ..Script::default()
    });
    let ram = memfd();
    let mut dev = VhostUserDevice::new(&cfg(&f.path, 60_000), ram.as_raw_fd(), region()).unwrap();
    let mem = guest_mem();
    let (sh, _c) = shared();
    let (a, _call) = activation(&mem, 1, sh);
    dev.activate(a).unwrap();
    dev.reset();
    assert!(wait_until(Duration::from_secs(2), || codes(&f, 0)
        .iter()
        .any(|m| m.code == GET_VRING_BASE)));
    let t = Instant::now();
    drop(dev);
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "drop took {:?}",
        t.elapsed()
    );
}

#[test]
fn a_backend_that_accepts_and_never_answers_fails_boot_after_the_deadline() {
    let f = fake(Script {
        answer: Some(0),
        ..Script::default()
    });
    let ram = memfd();
    let t = Instant::now();
    let e = VhostUserDevice::new(&cfg(&f.path, 200), ram.as_raw_fd(), region())
        .err()
        .unwrap()
        .to_string();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
    assert!(
        e.contains("did not answer GET_FEATURES within 200 ms"),
        "{e}"
    );
}

#[test]
fn a_backend_that_dies_mid_request_is_said_to_have_hung_up_not_refused() {
    // SET_OWNER, then GET_FEATURES: the back-end closes instead of answering.
    let f = fake(Script {
        close_after: Some(2),
        ..Script::default()
    });
    let ram = memfd();
    let e = VhostUserDevice::new(&cfg(&f.path, 2000), ram.as_raw_fd(), region())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("hung up during GET_FEATURES"), "{e}");
    assert!(!e.contains("refused"), "{e}");
}

#[test]
fn every_queue_gets_a_call_fd_also_a_polled_one() {
    let f = fake(Script::default());
    let ram = memfd();
    let mut c = cfg(&f.path, 1000);
    c.queues = 2;
    let mut dev = VhostUserDevice::new(&c, ram.as_raw_fd(), region()).unwrap();
    let mem = guest_mem();
    let (sh, _c) = shared();
    // Queue 1 has no MSI-X vector: the driver polls it.
    let (a, _call) = activation(&mem, 2, sh);
    dev.activate(a).unwrap();
    assert!(wait_until(Duration::from_secs(2), || codes(&f, 0)
        .iter()
        .filter(|m| m.code == SET_VRING_KICK)
        .count()
        == 2));
    let calls: Vec<(u64, usize)> = codes(&f, 0)
        .iter()
        .filter(|m| m.code == SET_VRING_CALL)
        .map(|m| (m.arg, m.fds))
        .collect();
    assert_eq!(calls, vec![(0, 1), (1, 1)]);
}

#[test]
fn a_reconnect_hands_back_the_inflight_region_and_signals_every_queue() {
    let f = fake(Script {
        protocol: P_CONFIG | P_MQ | P_INFLIGHT,
        hangup_after_kicks: Some(1),
        ..Script::default()
    });
    let ram = memfd();
    let mut dev = VhostUserDevice::new(&cfg(&f.path, 1000), ram.as_raw_fd(), region()).unwrap();
    let mem = guest_mem();
    let (_, a, u) = rings(0);
    // Three requests made available, one completed: the ring resumes at used index 1.
    let m = mem.memory();
    m.write_obj(3u16, GuestAddress(a + 2)).unwrap();
    m.write_obj(1u16, GuestAddress(u + 2)).unwrap();
    let (sh, _c) = shared();
    let (act, call) = activation(&mem, 1, sh);
    dev.activate(act).unwrap();
    // The back-end hangs up after the setup; the frontend reconnects and resumes.
    assert!(wait_until(Duration::from_secs(3), || codes(&f, 1)
        .iter()
        .any(|m| m.code == SET_VRING_KICK)));
    let first = codes(&f, 0);
    let pos = |ms: &[Msg], code| ms.iter().position(|m| m.code == code);
    assert_eq!(
        first.iter().filter(|m| m.code == GET_INFLIGHT_FD).count(),
        1
    );
    assert!(pos(&first, SET_INFLIGHT_FD) < pos(&first, SET_VRING_NUM));
    let second = codes(&f, 1);
    assert_eq!(pos(&second, GET_INFLIGHT_FD), None, "the region is kept");
    let set = pos(&second, SET_INFLIGHT_FD).expect("SET_INFLIGHT_FD on reconnect");
    assert_eq!(second[set].fds, 1);
    assert!(Some(set) < pos(&second, SET_VRING_NUM));
    let base = second.iter().find(|m| m.code == SET_VRING_BASE).unwrap();
    assert_eq!(base.arg, 1 << 32, "queue 0 resumes at the used index, 1");
    // Completions posted just before the crash are signalled.
    assert!(wait_until(Duration::from_secs(1), || call.read().is_ok()));
    drop(dev);
}

#[test]
fn server_mode_waits_for_the_backend_and_takes_the_next_one_after_a_crash() {
    let dir = tmpdir("server");
    let path = dir.join("vmm.sock");
    let ram = memfd();
    let mut c = cfg(&path, 1000);
    c.server = true;
    c.connect_timeout = Some(Duration::from_secs(5));
    let msgs = Arc::new(Mutex::new(Vec::new()));
    let hangups = Arc::new(Mutex::new(Vec::new()));
    let (m, h, p) = (msgs.clone(), hangups.clone(), path.clone());
    let backend = thread::spawn(move || {
        let script = Script {
            hangup_after_kicks: Some(1),
            ..Script::default()
        };
        for conn in 0..2 {
            let s = loop {
                match UnixStream::connect(&p) {
                    Ok(s) => break s,
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            };
            serve(s, conn, &script, (&m, &h));
        }
    });
    let mut dev = VhostUserDevice::new(&c, ram.as_raw_fd(), region()).unwrap();
    let mem = guest_mem();
    let (sh, _c) = shared();
    let (act, _call) = activation(&mem, 1, sh);
    dev.activate(act).unwrap();
    assert!(wait_until(Duration::from_secs(3), || msgs
        .lock()
        .unwrap()
        .iter()
        .any(|m: &Msg| m.conn == 1 && m.code == SET_VRING_KICK)));
    drop(dev);
    assert!(!path.exists(), "the socket the VMM created is removed");
    backend.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn server_mode_refuses_what_is_not_a_stale_socket() {
    let dir = tmpdir("refuse");
    let ram = memfd();
    let file = dir.join("disk.img");
    std::fs::write(&file, b"data").unwrap();
    let mut c = cfg(&file, 1000);
    c.server = true;
    let e = VhostUserDevice::new(&c, ram.as_raw_fd(), region())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not a socket"), "{e}");
    assert_eq!(std::fs::read(&file).unwrap(), b"data");
    let live = dir.join("live.sock");
    let _l = UnixListener::bind(&live).unwrap();
    c.socket = live;
    let e = VhostUserDevice::new(&c, ram.as_raw_fd(), region())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("another process listens there"), "{e}");
    // No back-end within connect_timeout_ms: one line saying so.
    c.socket = dir.join("none.sock");
    c.connect_timeout = Some(Duration::from_millis(50));
    let e = VhostUserDevice::new(&c, ram.as_raw_fd(), region())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no vhost-user back-end connected"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The rings the back-end was given: (index, SET_VRING_KICK seen), in order.
fn kicked_rings(f: &Fake) -> Vec<u64> {
    codes(f, 0)
        .iter()
        .filter(|m| m.code == SET_VRING_KICK)
        .map(|m| m.arg & 0xff)
        .collect()
}

/// A `queues=2` virtio-net device on a fake back-end of `backend_pairs` pairs, activated
/// with `guest_queues` queues and MQ acked or not: the rings the back-end was given.
fn net_rings(backend_pairs: u16, guest_queues: u16, mq: bool) -> Vec<u64> {
    let f = fake(Script {
        net_pairs: Some(backend_pairs),
        ..Script::default()
    });
    let ram = memfd();
    let mut c = VhostUserConfig::parse(
        &format!("socket={},timeout_ms=1000,queues=2", f.path.display()),
        true,
        0,
    )
    .unwrap();
    c.queue_size = 8;
    let mut dev = VhostUserDevice::new(&c, ram.as_raw_fd(), region()).unwrap();
    assert_eq!(
        dev.queue_max_sizes().len(),
        5,
        "two pairs and the control queue"
    );
    let mem = guest_mem();
    let (sh, _c) = shared();
    let (mut a, _call) = activation(&mem, guest_queues, sh);
    a.acked_features = (1 << 32) | VIRTIO_NET_F_CTRL_VQ | if mq { VIRTIO_NET_F_MQ } else { 0 };
    dev.activate(a).unwrap();
    // Every ring handed over is kicked; give the control thread time for all of them.
    let mut last = Vec::new();
    wait_until(Duration::from_secs(2), || {
        let now = kicked_rings(&f);
        let settled = !now.is_empty() && now == last;
        last = now;
        std::thread::sleep(Duration::from_millis(50));
        settled
    });
    last
}

#[test]
fn the_control_queue_goes_to_the_back_ends_control_queue() {
    // vhost-user-net --queues 4 (control queue 8) behind queues=2: the guest's control
    // queue is its queue 4 with MQ, its queue 2 without; either is the back-end's 8, and
    // a queue a driver without MQ has no use for is not handed over.
    assert_eq!(net_rings(4, 5, true), vec![0, 1, 2, 3, 8]);
    assert_eq!(net_rings(4, 3, false), vec![0, 1, 8]);
    assert_eq!(net_rings(4, 5, false), vec![0, 1, 8]);
    // A back-end whose config says 0xffff pairs: its control queue (clamped to the spec's
    // 0x8000 pairs: queue 0x10000) is past what SET_VRING_KICK can name; not handed over,
    // and no panic (the fuzz find: 2 × 0xffff overflowed).
    assert_eq!(net_rings(0xffff, 5, true), vec![0, 1, 2, 3]);
    // The index map alone: as many pairs as the guest was shown, control queue last.
    let m = NetQueueMap {
        pairs: 2,
        backend_ctrl: 8,
    };
    assert_eq!(m.backend_index(3, true), Some(3));
    assert_eq!(m.backend_index(4, true), Some(8));
    assert_eq!(m.backend_index(5, true), None);
    assert_eq!(m.backend_index(2, false), Some(8));
    assert_eq!(m.backend_index(3, false), None);
}

#[test]
fn the_guest_sees_only_the_queues_the_vmm_drives() {
    let net = VIRTIO_NET_F_MQ | VIRTIO_NET_F_CTRL_VQ;
    let mut c = vec![0u8; 12];
    c[8..10].copy_from_slice(&2u16.to_le_bytes());
    // vhost-user-net --queues 2 (5 queues) behind queues=1: one pair, no control queue.
    let (nq, f, w) = present(Kind::Net, 1, net, Some(5), &mut c);
    assert_eq!(
        (nq, f & (VIRTIO_NET_F_MQ | VIRTIO_NET_F_CTRL_VQ), w),
        (2, 0, None)
    );
    assert_eq!(u16::from_le_bytes([c[8], c[9]]), 1);
    // DPDK 22.11's net_vhost (queues=1): CTRL_VQ and what needs it are offered, but the
    // control queue would be a data queue to it, never polled. One pair, no control queue,
    // nothing that needs one; the rest (VERSION_1, MRG_RXBUF, offloads) stays.
    let dpdk = 0xd_3c26_e7cb;
    let (nq, f, _) = present(Kind::Net, 1, dpdk, Some(3), &mut c);
    assert_eq!(nq, 2);
    assert_eq!(f & VIRTIO_NET_CTRL_FEATURES, 0, "{f:#x}");
    // It offers RING_PACKED too, which the VMM does not do (a Linux guest took it, and
    // DPDK, given base 0 without the wrap counter, never saw a descriptor).
    assert_eq!(f & (1 << 34), 0, "{f:#x}");
    assert_eq!(
        f,
        dpdk & !VIRTIO_NET_CTRL_FEATURES & !UNSUPPORTED_TRANSPORT_FEATURES
    );
    assert_ne!(f & (1 << 15), 0, "MRG_RXBUF stays");
    assert_ne!(f & (1 << 35), 0, "IN_ORDER stays");
    c[8..10].copy_from_slice(&2u16.to_le_bytes());
    let (nq, f, _) = present(Kind::Net, 2, net, Some(5), &mut c);
    assert_eq!((nq, f & VIRTIO_NET_F_MQ), (5, VIRTIO_NET_F_MQ));
    assert_eq!(u16::from_le_bytes([c[8], c[9]]), 2);
    // Fewer than asked: a warning, and what it offers.
    let (nq, _, w) = present(Kind::Net, 4, net, Some(5), &mut c);
    assert_eq!(nq, 5);
    assert!(w
        .unwrap()
        .contains("offers 2 queue pairs, 4 asked: using 2"));

    let mut c = vec![0u8; 60];
    c[34..36].copy_from_slice(&4u16.to_le_bytes());
    let (nq, f, _) = present(Kind::Block, 1, VIRTIO_BLK_F_MQ, Some(4), &mut c);
    assert_eq!((nq, f), (1, 0));
    assert_eq!(u16::from_le_bytes([c[34], c[35]]), 1);
    c[34..36].copy_from_slice(&2u16.to_le_bytes());
    let (nq, f, w) = present(Kind::Block, 3, VIRTIO_BLK_F_MQ, Some(4), &mut c);
    assert_eq!(
        (nq, f),
        (2, VIRTIO_BLK_F_MQ),
        "num_queues in config bounds it"
    );
    assert!(w.is_some());
    // No MQ protocol feature: one queue whatever was asked.
    let (nq, f, _) = present(Kind::Block, 2, VIRTIO_BLK_F_MQ, None, &mut c);
    assert_eq!((nq, f), (1, 0));
}

#[test]
fn a_stopped_backend_is_not_dead_an_exited_one_is() {
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let peer = Peer::from_pid(pid);
    assert!(!peer.dead());
    // SAFETY: signals the child this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    thread::sleep(Duration::from_millis(50));
    assert!(
        !peer.dead(),
        "a stopped process can still write into the rings"
    );
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    child.wait().unwrap();
    assert!(peer.dead());
    // The fallback without a pidfd: /proc.
    let no_fd = Peer { pid, pidfd: None };
    assert!(no_fd.dead());
    assert!(
        !Peer {
            pid: 0,
            pidfd: None
        }
        .dead(),
        "a process we cannot see is not known dead"
    );
}

// --- Rings and the inflight region, built by hand. ---

const DATA: u64 = 0x8000;

/// A block request per head: one device-writable status byte at DATA + 16 * head.
fn ring_with_requests(mem: &GuestMemoryMmap, heads: &[u16]) -> QueueSetup {
    let (d, a, u) = rings(0);
    for h in 0..QSIZE {
        let at = d + 16 * u64::from(h);
        mem.write_obj(DATA + 16 * u64::from(h), GuestAddress(at))
            .unwrap();
        mem.write_obj(1u32, GuestAddress(at + 8)).unwrap();
        mem.write_obj(VRING_DESC_F_WRITE, GuestAddress(at + 12))
            .unwrap();
        mem.write_obj(0xffu8, GuestAddress(DATA + 16 * u64::from(h)))
            .unwrap();
    }
    for (i, &h) in heads.iter().enumerate() {
        mem.write_obj(h, GuestAddress(a + 4 + 2 * i as u64))
            .unwrap();
    }
    mem.write_obj(heads.len() as u16, GuestAddress(a + 2))
        .unwrap();
    QueueSetup {
        index: 0,
        size: QSIZE,
        desc: d,
        avail: a,
        used: u,
        kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    }
}

fn complete(mem: &GuestMemoryMmap, q: &QueueSetup, head: u16) {
    let idx: u16 = mem.read_obj(GuestAddress(q.used + 2)).unwrap();
    let e = q.used + 4 + 8 * u64::from(idx % q.size);
    mem.write_obj(u32::from(head), GuestAddress(e)).unwrap();
    mem.write_obj(1u32, GuestAddress(e + 4)).unwrap();
    mem.write_obj(0u8, GuestAddress(DATA + 16 * u64::from(head)))
        .unwrap();
    mem.write_obj(idx + 1, GuestAddress(q.used + 2)).unwrap();
}

fn used_ids(mem: &GuestMemoryMmap, q: &QueueSetup) -> Vec<u32> {
    let idx: u16 = mem.read_obj(GuestAddress(q.used + 2)).unwrap();
    (0..idx)
        .map(|i| {
            mem.read_obj(GuestAddress(q.used + 4 + 8 * u64::from(i)))
                .unwrap()
        })
        .collect()
}

fn status(mem: &GuestMemoryMmap, head: u16) -> u8 {
    mem.read_obj(GuestAddress(DATA + 16 * u64::from(head)))
        .unwrap()
}

/// A back-end's inflight region for one queue of QSIZE, as a new back-end starts it.
fn inflight_region() -> (InflightRegion, QueueInflight) {
    let region = InflightRegion::create(1, QSIZE).unwrap();
    let mut q = region.queue(0).unwrap();
    assert!(q.recover(0).fresh);
    (region, q)
}

#[test]
fn failing_from_the_region_completes_every_head_exactly_once() {
    let gm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    // The guest queued [0: FLUSH, 1: WRITE, 2: cached READ, 3: READ, 4]; the back-end took
    // 0..=3 (1 before 0), completed 2 at once, published 3's completion and died before it
    // recorded that; it never took 4.
    let q = ring_with_requests(&gm, &[0, 1, 2, 3, 4]);
    let (region, mut r) = inflight_region();
    for h in [1, 0, 2, 3] {
        r.taken(h);
    }
    r.completing(2);
    complete(&gm, &q, 2);
    r.completed(2, 1);
    r.completing(3);
    complete(&gm, &q, 3);

    let mut r = region.queue(0).unwrap();
    let n = fail_inflight(Kind::Block, &gm, &q, &mut r);
    assert_eq!(n, 3);
    assert_eq!(used_ids(&gm, &q), vec![2, 3, 1, 0, 4]);
    // Completed ones keep their status; the failed ones carry IOERR.
    assert_eq!(
        [0, 1, 2, 3, 4].map(|h| status(&gm, h)),
        [
            VIRTIO_BLK_S_IOERR,
            VIRTIO_BLK_S_IOERR,
            0,
            0,
            VIRTIO_BLK_S_IOERR
        ]
    );
    assert!(q.call.read().is_ok(), "the guest is told");
    // The region says nothing is in flight and where the ring is: a restarted back-end
    // resubmits none of them.
    let mut next = region.queue(0).unwrap();
    assert_eq!(next.resubmits_at(5), 0);
    let rec = next.recover(5);
    assert!(!rec.fresh && rec.resubmit.is_empty(), "{rec:?}");
    // Run again (the next outage tick): nothing new, nothing twice.
    assert_eq!(fail_inflight(Kind::Block, &gm, &q, &mut r), 0);
    assert_eq!(used_ids(&gm, &q).len(), 5);
}

/// A Ctx for the control-thread state machine alone (no back-end).
fn bare_ctx(kind: Kind) -> Ctx {
    Ctx {
        name: "t".into(),
        path: PathBuf::from("/nonexistent/vu.sock"),
        kind,
        timeout: Duration::from_millis(100),
        memfd: -1,
        regions: vec![],
        num_queues: 1,
        queue_size: QSIZE,
        endpoint: Endpoint::Client,
        wd: Arc::new(Watchdog::default()),
        ctl: Arc::new(CtlShared {
            cmds: Mutex::new(Default::default()),
            wake: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            stop: Default::default(),
            resets: Default::default(),
        }),
    }
}

fn outage_state(gone: Peer, setup: Setup) -> State {
    State {
        conn: None,
        setup: Some(Box::new(setup)),
        inflight: None,
        gone: Some(gone),
        down_since: Some(Instant::now() - OUTAGE_GRACE - Duration::from_secs(1)),
        failed: 0,
        said_alive: false,
        halted: false,
        quiet: false,
        idle_at_death: None,
        paused: false,
    }
}

fn dead_peer() -> Peer {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let peer = Peer::from_pid(child.id() as i32);
    child.wait().unwrap();
    assert!(peer.dead());
    peer
}

#[test]
fn without_a_region_an_unknown_backend_state_means_needs_reset_not_invented_completions() {
    let mem = guest_mem();
    let gm = mem.memory();
    let q = ring_with_requests(&gm, &[0, 1, 2]);
    complete(&gm, &q, 2);
    let before = used_ids(&gm, &q);
    let (sh, cfg_irq) = shared();
    let setup = Setup {
        acked: 1 << 32,
        queues: vec![q],
        mem: mem.clone(),
        shared: sh.clone(),
        taken: true,
    };
    let ctx = bare_ctx(Kind::Block);
    let mut st = outage_state(dead_peer(), setup);
    st.outage(&ctx);
    assert!(sh.needs_reset());
    assert!(
        cfg_irq.read().is_ok(),
        "the config interrupt tells the driver"
    );
    let q = &st.setup.as_ref().unwrap().queues[0];
    assert_eq!(used_ids(&gm, q), before, "no used entry written");
    assert_eq!([0, 1].map(|h| status(&gm, h)), [0xff, 0xff]);
    assert!(st.halted);
}

#[test]
fn a_backend_not_known_dead_gets_its_requests_left_alone() {
    let mem = guest_mem();
    let gm = mem.memory();
    let q = ring_with_requests(&gm, &[0, 1]);
    let (sh, _cfg_irq) = shared();
    let setup = Setup {
        acked: (1 << 32) | VIRTIO_F_IN_ORDER,
        queues: vec![q],
        mem: mem.clone(),
        shared: sh.clone(),
        taken: true,
    };
    let ctx = bare_ctx(Kind::Block);
    // Our own process: alive (a hangup alone proves nothing).
    let mut st = outage_state(Peer::from_pid(std::process::id() as i32), setup);
    st.outage(&ctx);
    let q = &st.setup.as_ref().unwrap().queues[0];
    assert!(used_ids(&gm, q).is_empty());
    assert!(!sh.needs_reset());
    // Dead, with VIRTIO_F_IN_ORDER: failing from the used index is right.
    st.gone = Some(dead_peer());
    st.outage(&ctx);
    let q = &st.setup.as_ref().unwrap().queues[0];
    assert_eq!(used_ids(&gm, q), vec![0, 1]);
    assert_eq!(st.failed, 2);
}

#[test]
fn nothing_pending_resumes_normally_without_a_region() {
    let mem = guest_mem();
    let gm = mem.memory();
    let q = ring_with_requests(&gm, &[0]);
    complete(&gm, &q, 0);
    let (sh, _c) = shared();
    let setup = Setup {
        acked: 1 << 32,
        queues: vec![q],
        mem: mem.clone(),
        shared: sh.clone(),
        taken: true,
    };
    let ctx = bare_ctx(Kind::Block);
    let mut st = outage_state(dead_peer(), setup);
    st.outage(&ctx);
    assert!(!sh.needs_reset());
    assert!(!st.halted);
}

#[test]
fn a_reconnect_without_a_region_and_requests_in_flight_does_not_resume_the_rings() {
    // No INFLIGHT_SHMFD; the back-end hangs up after the setup with two requests pending.
    let f = fake(Script {
        hangup_after_kicks: Some(1),
        ..Script::default()
    });
    let ram = memfd();
    let mut dev = VhostUserDevice::new(&cfg(&f.path, 1000), ram.as_raw_fd(), region()).unwrap();
    let mem = guest_mem();
    let (_, a, u) = rings(0);
    mem.memory().write_obj(2u16, GuestAddress(a + 2)).unwrap();
    let (sh, cfg_irq) = shared();
    let (act, _call) = activation(&mem, 1, sh.clone());
    dev.activate(act).unwrap();
    assert!(wait_until(Duration::from_secs(3), || sh.needs_reset()));
    assert!(
        cfg_irq.read().is_ok(),
        "the config interrupt tells the driver"
    );
    // The new back-end got the handshake only: no ring, so nothing it could complete.
    thread::sleep(Duration::from_millis(200));
    let second = codes(&f, 1);
    assert!(second.iter().any(|m| m.code == GET_FEATURES), "{second:?}");
    assert!(
        !second
            .iter()
            .any(|m| matches!(m.code, SET_VRING_NUM | SET_VRING_BASE | SET_VRING_KICK)),
        "{second:?}"
    );
    assert_eq!(
        mem.memory().read_obj::<u16>(GuestAddress(u + 2)).unwrap(),
        0
    );
    // The driver's reset and a new activation start the rings again on that connection.
    dev.reset();
    assert!(wait_until(Duration::from_secs(1), || !dev.reset_pending()));
    let (act, _call) = activation(&mem, 1, shared().0);
    dev.activate(act).unwrap();
    assert!(wait_until(Duration::from_secs(2), || codes(&f, 1)
        .iter()
        .any(|m| m.code == SET_VRING_KICK)));
    drop(dev);
}

/// A block ring with heads 0 and 1 described, only 0 made available, and completed.
fn idle_ring(gm: &GuestMemoryMmap) -> QueueSetup {
    let q = ring_with_requests(gm, &[0, 1]);
    gm.write_obj(1u16, GuestAddress(q.avail + 2)).unwrap();
    complete(gm, &q, 0);
    q
}

/// The driver makes head 1 available.
fn make_available(gm: &GuestMemoryMmap, q: &QueueSetup) {
    gm.write_obj(2u16, GuestAddress(q.avail + 2)).unwrap();
}

#[test]
fn requests_made_available_after_an_idle_backend_died_are_failed_not_a_reset() {
    let mem = guest_mem();
    let gm = mem.memory();
    let q = idle_ring(&gm);
    let (sh, _c) = shared();
    let setup = Setup {
        acked: 1 << 32,
        queues: vec![q],
        mem: mem.clone(),
        shared: sh.clone(),
        taken: true,
    };
    let ctx = bare_ctx(Kind::Block);
    let mut st = outage_state(dead_peer(), setup);
    // Seen dead with nothing pending; then the driver queues a request no back-end took.
    st.note_death(&ctx);
    assert_eq!(st.idle_at_death, Some(true));
    make_available(&gm, &st.setup.as_ref().unwrap().queues[0]);
    st.outage(&ctx);
    assert!(!sh.needs_reset());
    assert!(!st.halted);
    let q = &st.setup.as_ref().unwrap().queues[0];
    assert_eq!(used_ids(&gm, q), vec![0, 1]);
    assert_eq!(status(&gm, 1), VIRTIO_BLK_S_IOERR);
    assert_eq!(st.failed, 1);
}

#[test]
fn a_request_pending_when_the_backend_is_seen_dead_still_means_needs_reset() {
    let mem = guest_mem();
    let gm = mem.memory();
    let q = idle_ring(&gm);
    make_available(&gm, &q);
    let (sh, _c) = shared();
    let setup = Setup {
        acked: 1 << 32,
        queues: vec![q],
        mem: mem.clone(),
        shared: sh.clone(),
        taken: true,
    };
    let ctx = bare_ctx(Kind::Block);
    let mut st = outage_state(dead_peer(), setup);
    st.note_death(&ctx);
    assert_eq!(st.idle_at_death, Some(false));
    st.outage(&ctx);
    assert!(sh.needs_reset());
    assert_eq!(
        used_ids(&gm, &st.setup.as_ref().unwrap().queues[0]),
        vec![0]
    );
    // Not known dead yet: nothing is decided.
    let mut st = outage_state(Peer::from_pid(std::process::id() as i32), {
        let q = idle_ring(&gm);
        Setup {
            acked: 1 << 32,
            queues: vec![q],
            mem: mem.clone(),
            shared: shared().0,
            taken: true,
        }
    });
    st.note_death(&ctx);
    assert_eq!(st.idle_at_death, None);
}

/// DPDK's vhost (no INFLIGHT_SHMFD) killed while the guest's NIC was idle; the driver
/// transmits before the new back-end connects: the rings resume at the used index.
#[test]
fn a_backend_that_died_idle_is_replaced_without_a_reset() {
    for made_available_before_death_seen in [false, true] {
        let f = fake(Script::default());
        let ram = memfd();
        let mem = guest_mem();
        let gm = mem.memory();
        let q = idle_ring(&gm);
        let (sh, _c) = shared();
        let setup = Setup {
            acked: 1 << 32,
            queues: vec![q],
            mem: mem.clone(),
            shared: sh.clone(),
            taken: true,
        };
        let mut ctx = bare_ctx(Kind::Block);
        ctx.path = f.path.clone();
        ctx.memfd = ram.as_raw_fd();
        ctx.regions = region();
        ctx.timeout = Duration::from_secs(2);
        let mut st = outage_state(dead_peer(), setup);
        // Within the grace period: the outage fails nothing.
        st.down_since = Some(Instant::now());
        if made_available_before_death_seen {
            make_available(&gm, &st.setup.as_ref().unwrap().queues[0]);
        }
        st.note_death(&ctx);
        make_available(&gm, &st.setup.as_ref().unwrap().queues[0]);
        st.reconnect(&ctx);
        assert!(st.conn.is_some());
        // The fake records a message once it handled it: wait for the last one.
        let kicked = |f: &Fake| codes(f, 0).iter().any(|m| m.code == SET_VRING_KICK);
        if made_available_before_death_seen {
            assert!(st.halted && sh.needs_reset());
            thread::sleep(Duration::from_millis(200));
            assert!(!kicked(&f), "{:?}", codes(&f, 0));
        } else {
            assert!(!st.halted && !sh.needs_reset());
            assert!(wait_until(Duration::from_secs(2), || kicked(&f)));
            // The ring resumes at used index 1: the new back-end takes head 1.
            let base = codes(&f, 0)
                .into_iter()
                .find(|m| m.code == SET_VRING_BASE)
                .expect("SET_VRING_BASE");
            assert_eq!(base.arg >> 32, 1, "{base:?}");
        }
    }
}

#[test]
fn an_inflight_region_larger_than_its_file_is_refused() {
    // A back-end answering GET_INFLIGHT_FD with a file smaller than the region it
    // announces: mapping it would turn the first read (at a reconnect or an outage) into
    // SIGBUS in the VMM.
    let need = region_size(1, QSIZE) as u64;
    let file = |len: u64| {
        let f = std::fs::File::from(memfd());
        f.set_len(len).unwrap();
        f
    };
    let info = |size: u64, offset: u64| VhostUserInflight::new(size, offset, 1, QSIZE);
    let e = Inflight::map(file(need / 2), info(need, 0)).err().unwrap();
    assert!(e.contains("past the end"), "{e}");
    let e = Inflight::map(file(need), info(need, 4096)).err().unwrap();
    assert!(e.contains("past the end"), "{e}");
    let (sock, _peer) = UnixStream::pair().unwrap();
    let e = Inflight::map(std::fs::File::from(OwnedFd::from(sock)), info(need, 0))
        .err()
        .unwrap();
    assert!(e.contains("not a memory file"), "{e}");
    let r = Inflight::map(file(need), info(need, 0)).unwrap();
    assert!(r.queue(0).is_some());
}

#[test]
fn a_region_marking_more_in_flight_than_outstanding_completes_no_more_than_outstanding() {
    let gm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    // Three requests available, two taken; the region also marks heads 5 and 6 (never made
    // available): four "in flight" for three outstanding.
    let q = ring_with_requests(&gm, &[0, 1, 2]);
    let (_region, mut r) = inflight_region();
    for h in [0, 1, 5, 6] {
        r.taken(h);
    }
    let n = fail_inflight(Kind::Block, &gm, &q, &mut r);
    assert!(n <= 3, "{n} completions for 3 outstanding requests");
    let ids = used_ids(&gm, &q);
    assert_eq!(ids.len(), n as usize);
    assert!(
        ids.len() <= 3,
        "used index ran past the available one: {ids:?}"
    );
}

/// vm.pause disables the back-end's rings (SET_VRING_ENABLE 0 for each queue) without the
/// caller waiting; vm.resume enables them again.
#[test]
fn a_pause_disables_the_backends_rings_and_a_resume_enables_them() {
    const SET_VRING_ENABLE: u32 = 18;
    {
        let protocol = P_CONFIG | P_MQ;
        let f = fake(Script {
            protocol,
            ..Script::default()
        });
        let ram = memfd();
        let mut dev = VhostUserDevice::new(&cfg(&f.path, 2000), ram.as_raw_fd(), region()).unwrap();
        let mem = guest_mem();
        let (sh, _cfg_irq) = shared();
        let (a, _call) = activation(&mem, 2, sh);
        dev.activate(a).unwrap();
        let enables = |on: bool| {
            f.msgs
                .lock()
                .unwrap()
                .iter()
                .filter(|m| m.code == SET_VRING_ENABLE && (m.arg >> 32 == 1) == on)
                .map(|m| m.arg & 0xffff_ffff)
                .collect::<Vec<u64>>()
        };
        assert!(wait_until(Duration::from_secs(3), || f
            .msgs
            .lock()
            .unwrap()
            .iter()
            .any(|m| m.code == SET_VRING_KICK && m.arg & 0xff == 1)));
        let t = Instant::now();
        dev.pause(true);
        assert!(t.elapsed() < Duration::from_millis(50), "{:?}", t.elapsed());
        assert!(wait_until(Duration::from_secs(3), || enables(false).len() == 2));
        assert_eq!(enables(false), vec![0, 1]);
        let before = enables(true).len();
        dev.pause(false);
        assert!(wait_until(Duration::from_secs(3), || enables(true).len() == before + 2));
    }
}

/// `vm.counters` for a vhost-user disk relays the back-end's stats endpoint: its answer as
/// is; a back-end that accepts and never answers, or drips bytes, costs the deadline and no
/// more; a wrong answer is said in one line.
#[test]
fn stats_relay_is_bounded_and_says_what_went_wrong() {
    let dir = std::env::temp_dir().join(format!("vu-stats-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A real endpoint (our daemons').
    let good = dir.join("good.sock");
    let server = backends::vhost_user::stats::StatsSocket::bind(&good)
        .unwrap()
        .serve(Arc::new(
            || serde_json::json!({ "queues": [{ "reads": 3 }] }),
        ))
        .unwrap();
    let v = fetch_stats(&good, STATS_DEADLINE).unwrap();
    assert_eq!(v["queues"][0]["reads"], 3);
    drop(server);
    assert!(fetch_stats(&good, STATS_DEADLINE)
        .unwrap_err()
        .contains("good.sock"));
    // Stuck: accepts, reads, never answers. Dripping: a byte every 100 ms, forever.
    for (name, drip) in [("stuck", false), ("drip", true)] {
        let path = dir.join(format!("{name}.sock"));
        let l = UnixListener::bind(&path).unwrap();
        let t = thread::spawn(move || {
            use std::io::Write;
            let (mut s, _) = l.accept().unwrap();
            for _ in 0..30 {
                thread::sleep(Duration::from_millis(100));
                if drip && s.write_all(b"H").is_err() {
                    break;
                }
            }
        });
        let start = Instant::now();
        let e = fetch_stats(&path, Duration::from_millis(300)).unwrap_err();
        let took = start.elapsed();
        assert!(took < Duration::from_millis(1500), "{name}: {took:?}");
        assert!(
            e.contains("no complete answer within 300 ms"),
            "{name}: {e}"
        );
        t.join().unwrap();
    }
    // Not 200: the status line.
    let path = dir.join("404.sock");
    let l = UnixListener::bind(&path).unwrap();
    let t = thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut s, _) = l.accept().unwrap();
        let mut b = [0u8; 256];
        let _ = s.read(&mut b);
        s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            .unwrap();
    });
    let e = fetch_stats(&path, STATS_DEADLINE).unwrap_err();
    assert!(e.ends_with("HTTP/1.1 404 Not Found"), "{e}");
    t.join().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
