//! `cargo fuzz` target: the vmm's vhost-user frontend against a back-end that answers
//! whatever the input says, and the outage path failing requests over rings and inflight
//! regions built from the input.
//!
//! Byte 0, bit 0 picks the part:
//!
//! **0: a session.** `VhostUserDevice` on a socketpair to a fake back-end (a thread) that
//! answers each request with a reply the input picks: the right one with input-chosen
//! values (features, protocol features, queue count, config space, inflight region of any
//! size, vring base, REPLY_ACK status), or one with the wrong request code, a short or long
//! body, bad flags, an extra fd, an unsolicited extra message, or a hang-up. The frontend
//! negotiates (`new`), and when that succeeds the driver activates the queues, resets the
//! device, activates again and drops it, as the input says. Asserts: no panic (in any
//! thread); the device shows the guest a consistent set of queues (MQ and the config
//! space's queue count agree with the queues it exposes); a reset is done within the
//! deadline; dropping the device is bounded; guest memory is never written.
//!
//! **1: the outage path.** A ring of 2 to 64 entries in 64 KiB of guest memory, filled by a
//! simulated guest (requests of one device-writable status byte each, or chains) and a
//! simulated back-end that takes requests, records them in the inflight region (flags,
//! counters, `last_batch_head`, `used_idx`), completes some out of order and dies at an
//! input-chosen point (also between publishing a completion and recording it). Then the
//! vmm fails what is pending (`fail_pending`: from the region, or in order without one).
//! Asserts: the requests completed by the failing are exactly the ones not completed
//! before (taken ones in the order taken, then the untaken ones in ring order), each once;
//! status bytes of the failed ones say IOERR and the others are untouched; the region says
//! nothing is in flight; a second pass fails nothing; nothing outside the used ring and the
//! failed requests' status bytes is written. With bit 1 of byte 0, input bytes then
//! overwrite parts of the ring and the region (a guest or back-end that lies): only "no
//! panic, no write outside the used ring and device-writable status bytes, no more
//! completions than requests outstanding (avail - used), heads in range" is asserted then.
#![no_main]

use std::collections::HashSet;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use backends::inflight::{queue_region_size, region_size};
use backends::vhost_user::relay::{encode, read_message, send_message};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes as _, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm::config::VhostUserConfig;
use vmm::virtio::vhost_user::fuzzing::{fail_pending, Ring};
use vmm::virtio::vhost_user::{SharedRegion, VhostUserDevice};
use vmm::virtio::{Activation, ActiveQueue, DeviceShared, Irq, VirtioDevice};
use vmm_sys_util::eventfd::EventFd;

/// Reads the input; bytes past its end read as zero.
struct Bytes {
    d: Vec<u8>,
    i: usize,
}

impl Bytes {
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
}

// ---------------------------------------------------------------------------------------
// Part 0: a session against a fake back-end.

const GET_FEATURES: u32 = 1;
const GET_VRING_BASE: u32 = 11;
const GET_PROTOCOL_FEATURES: u32 = 15;
const GET_QUEUE_NUM: u32 = 17;
const GET_CONFIG: u32 = 24;
const GET_INFLIGHT_FD: u32 = 31;
const GET_MAX_MEM_SLOTS: u32 = 36;
const VERSION: u32 = 1;
const REPLY: u32 = 4;
const NEED_REPLY: u32 = 8;
const F_PROTOCOL: u64 = 1 << 30;
const F_VERSION_1: u64 = 1 << 32;
const BLK_F_MQ: u64 = 1 << 12;
const NET_F_MQ: u64 = 1 << 22;
const NET_F_CTRL_VQ: u64 = 1 << 17;
const MEM: usize = 0x1_0000;

fn memfd(size: u64) -> Option<OwnedFd> {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let raw = unsafe { libc::memfd_create(c"fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    if raw < 0 {
        return None;
    }
    // SAFETY: `raw` is a new fd nothing else owns.
    let f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(raw) });
    f.set_len(size).ok()?;
    Some(f.into())
}

/// Receives one message: (request, flags, body); the fds that came with it are closed (the
/// fake back-end keeps none). None at EOF or on a broken message.
fn recv(s: &mut UnixStream) -> Option<(u32, u32, Vec<u8>)> {
    let m = read_message(s).ok()??;
    Some((m.request(), m.flags(), m.body().to_vec()))
}

fn send(s: &UnixStream, m: &[u8], fd: Option<RawFd>) -> bool {
    send_message(s, m, fd.as_slice()).is_ok()
}

/// The right answer to `code` (and an fd to pass with it), with values from the input.
fn answer(r: &mut Bytes, net: bool, code: u32, body: &[u8]) -> (Vec<u8>, Option<OwnedFd>) {
    let c = r.u8();
    match code {
        GET_FEATURES => {
            let mq = if net {
                NET_F_MQ | NET_F_CTRL_VQ
            } else {
                BLK_F_MQ
            };
            let v = match c & 3 {
                0 => F_PROTOCOL | F_VERSION_1 | mq,
                1 => F_VERSION_1,
                2 => r.u64(),
                _ => u64::MAX,
            };
            (v.to_le_bytes().to_vec(), None)
        }
        GET_PROTOCOL_FEATURES => {
            let v = if c & 0x80 != 0 {
                r.u64()
            } else {
                [1u64, 1 << 3, 1 << 9, 1 << 12]
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| c >> i & 1 == 0)
                    .fold(0, |v, (_, b)| v | b)
            };
            (v.to_le_bytes().to_vec(), None)
        }
        GET_QUEUE_NUM | GET_MAX_MEM_SLOTS => {
            let v = if c & 0x80 != 0 { r.u64() } else { u64::from(c) };
            (v.to_le_bytes().to_vec(), None)
        }
        GET_CONFIG => {
            // offset, size, flags, then `size` bytes of the device's config space.
            let mut b = body.get(..12).unwrap_or(&[0; 12]).to_vec();
            let size = body.len().saturating_sub(12);
            b.extend((0..size).map(|_| r.u8()));
            (b, None)
        }
        GET_VRING_BASE => {
            let mut b = body.get(..4).unwrap_or(&[0; 4]).to_vec();
            b.extend_from_slice(&u32::from(r.u16()).to_le_bytes());
            (b, None)
        }
        GET_INFLIGHT_FD => {
            let u16_at = |at: usize| {
                body.get(at..at + 2)
                    .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]))
            };
            let (nq, qs) = (u16_at(16), u16_at(18));
            let need = region_size(nq, qs);
            let need = need as u64;
            let file = match c & 3 {
                0 => need,
                1 => need / 2,
                2 => 0,
                _ => u64::from(r.u16()),
            };
            let (size, offset) = match c >> 2 & 3 {
                0 => (need, 0),
                1 => (need + 4096, 0),
                2 => (need, 4096),
                _ => (r.u64(), r.u64()),
            };
            let mut b = size.to_le_bytes().to_vec();
            b.extend_from_slice(&offset.to_le_bytes());
            b.extend_from_slice(&nq.to_le_bytes());
            b.extend_from_slice(&qs.to_le_bytes());
            b.resize(body.len().max(24), 0);
            (b, if c & 0x40 == 0 { memfd(file) } else { None })
        }
        // A REPLY_ACK status.
        _ => {
            let v = if c & 0x80 != 0 { u64::from(c & 3) } else { 0 };
            (v.to_le_bytes().to_vec(), None)
        }
    }
}

/// The fake back-end: answers every request that wants an answer, as the input says.
fn backend(mut s: UnixStream, mut r: Bytes, net: bool) {
    while let Some((code, flags, body)) = recv(&mut s) {
        let wants = matches!(
            code,
            GET_FEATURES
                | GET_VRING_BASE
                | GET_PROTOCOL_FEATURES
                | GET_QUEUE_NUM
                | GET_CONFIG
                | GET_INFLIGHT_FD
                | GET_MAX_MEM_SLOTS
        ) || flags & NEED_REPLY != 0;
        let how = if r.done() { 0 } else { r.u8() };
        if !wants {
            if how == 0xff {
                let _ = send(&s, &encode(GET_FEATURES, VERSION | REPLY, &[0; 8]), None);
            }
            continue;
        }
        let (mut b, fd) = answer(&mut r, net, code, &body);
        let (mut code, mut flags) = (code, VERSION | REPLY);
        let mut extra = None;
        match how >> 4 {
            8 => code = code.wrapping_add(1 + u32::from(how & 7)),
            9 => b.truncate(b.len() / 2),
            10 => b.extend_from_slice(&[0xa5; 8]),
            11 => flags = VERSION,
            12 => flags = u32::from(how & 0xf) | REPLY,
            13 => extra = memfd(4096),
            14 => return,
            _ => {}
        }
        let fd = fd.as_ref().or(extra.as_ref()).map(|f| f.as_raw_fd());
        if !send(&s, &encode(code, flags, &b), fd) {
            return;
        }
        if how >> 4 == 15 {
            let _ = send(&s, &encode(code, VERSION | REPLY, &b), None);
        }
    }
}

fn session(mut r: Bytes) {
    let c = r.u8();
    let net = c & 1 != 0;
    let Ok(mut cfg) = VhostUserConfig::parse(
        "socket=/nonexistent/vhost-user-fuzz.sock,timeout_ms=300",
        net,
        0,
    ) else {
        return;
    };
    cfg.queues = 1 + u16::from(c >> 1 & 3);
    cfg.queue_size = 1 << (c >> 3 & 7);
    let driver = r.u8();
    let Ok((ours, theirs)) = UnixStream::pair() else {
        return;
    };
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]) else {
        return;
    };
    let Some(ram) = memfd(MEM as u64) else { return };
    let regions = vec![SharedRegion {
        guest_addr: 0,
        size: MEM as u64,
        host_addr: 0x7f00_0000_0000,
        file_offset: 0,
    }];
    // The rings: queue i at 0x1000 * (i + 1), its size at most 256 (4 KiB of descriptors).
    for i in 0..8u64 {
        let _ = mem.write_obj(3u16, GuestAddress(0x1000 * (i + 1) + 0x800 + 2));
    }
    let before = snapshot(&mem);
    let rest = Bytes {
        d: r.d[r.i.min(r.d.len())..].to_vec(),
        i: 0,
    };
    let fake = thread::spawn(move || backend(theirs, rest, net));
    if let Ok(mut dev) = VhostUserDevice::with_stream(&cfg, ours, ram.as_raw_fd(), regions) {
        check_presented(&dev, net, cfg.queues);
        let gm = GuestMemoryAtomic::new(mem.clone());
        let n = dev.queue_max_sizes().len();
        let size = dev.queue_max_sizes()[0];
        let activate = |dev: &mut VhostUserDevice| {
            let queues = (0..n as u16)
                .filter_map(|i| {
                    let base = 0x1000 * (u64::from(i) + 1);
                    let mut q = Queue::new(size).ok()?;
                    q.set_desc_table_address(Some(base as u32), Some(0));
                    q.set_avail_ring_address(Some(base as u32 + 0x800), Some(0));
                    q.set_used_ring_address(Some(base as u32 + 0xc00), Some(0));
                    q.set_ready(true);
                    Some(ActiveQueue {
                        index: i,
                        queue: q,
                        kick: EventFd::new(libc::EFD_NONBLOCK).ok()?,
                        irq: Irq::new((i % 2 == 0).then(|| EventFd::new(0).ok()).flatten()),
                    })
                })
                .collect();
            let _ = dev.activate(Activation {
                mem: gm.clone(),
                acked_features: dev.features() & !(1 << 28),
                queues,
                shared: Arc::new(DeviceShared::new(Irq::new(None))),
            });
        };
        if driver & 1 == 0 {
            activate(&mut dev);
        }
        if driver & 2 == 0 {
            let t = Instant::now();
            dev.reset();
            while dev.reset_pending() {
                // Each request of the reset is bounded by the deadline (300 ms); the
                // activation queued before it too.
                assert!(
                    t.elapsed() < Duration::from_secs(8),
                    "reset still pending after {:?}",
                    t.elapsed()
                );
                thread::sleep(Duration::from_millis(1));
            }
            if driver & 4 == 0 {
                activate(&mut dev);
            }
        }
        let t = Instant::now();
        drop(dev);
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "dropping the device took {:?}",
            t.elapsed()
        );
    }
    let _ = fake.join();
    assert!(snapshot(&mem) == before, "the frontend wrote guest memory");
}

fn snapshot(mem: &GuestMemoryMmap<()>) -> Vec<u8> {
    let mut v = vec![0u8; MEM];
    let _ = mem.read_slice(&mut v, GuestAddress(0));
    v
}

/// The queues the guest is shown agree with the features and the config space.
fn check_presented(dev: &VhostUserDevice, net: bool, asked: u16) {
    let n = dev.queue_max_sizes().len();
    let f = dev.features();
    assert_eq!(f & F_PROTOCOL, 0, "the vhost-user bit reached the guest");
    let mut cfg = [0u8; 2];
    if net {
        let ctrl = usize::from(f & NET_F_CTRL_VQ != 0);
        let pairs = (n - ctrl) / 2;
        assert!(n >= 2 + ctrl && (n - ctrl) % 2 == 0, "{n} net queues");
        assert!(pairs <= usize::from(asked));
        if f & NET_F_MQ != 0 {
            dev.read_config(8, &mut cfg);
            assert_eq!(usize::from(u16::from_le_bytes(cfg)), pairs);
        }
        assert!(pairs == 1 || f & NET_F_MQ != 0);
    } else {
        assert!(
            n >= 1 && n <= usize::from(asked),
            "{n} blk queues, {asked} asked"
        );
        if f & BLK_F_MQ != 0 {
            dev.read_config(34, &mut cfg);
            assert_eq!(usize::from(u16::from_le_bytes(cfg)), n);
        }
        assert!(n == 1 || f & BLK_F_MQ != 0);
    }
}

// ---------------------------------------------------------------------------------------
// Part 1: the outage path over a simulated ring and inflight region.

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x3000;
const USED: u64 = 0x4000;
const DATA: u64 = 0x8000;
const IOERR: u8 = 1;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// Where request `head`'s status byte is (its chain was built by [`build_chain`]).
fn status_at(head: u16) -> u64 {
    DATA + 0x100 * u64::from(head) + 0xff
}

/// Request `head`: one device-writable descriptor (the status byte), or an indirect table
/// of header, data and status; the status byte always at [`status_at`].
fn build_chain(mem: &GuestMemoryMmap<()>, head: u16, shape: u8) {
    let w = |at: u64, addr: u64, len: u32, flags: u16, next: u16| {
        let _ = mem.write_obj(addr, GuestAddress(at));
        let _ = mem.write_obj(len, GuestAddress(at + 8));
        let _ = mem.write_obj(flags, GuestAddress(at + 12));
        let _ = mem.write_obj(next, GuestAddress(at + 14));
    };
    let buf = DATA + 0x100 * u64::from(head);
    let desc = DESC + 16 * u64::from(head);
    let _ = mem.write_obj(0xffu8, GuestAddress(status_at(head)));
    if shape & 1 == 0 {
        w(desc, status_at(head), 1, F_WRITE, 0);
    } else {
        // The table in the request's data area, the status last.
        w(desc, buf, 48, F_INDIRECT, 0);
        w(buf, buf + 0x40, 16, F_NEXT, 1);
        w(buf + 16, buf + 0x80, 0x40, F_NEXT | F_WRITE, 2);
        w(buf + 32, status_at(head), 1, F_WRITE, 0);
    }
}

/// A queue's part of the inflight region (the spec's split layout).
struct Region(Vec<u8>);

impl Region {
    fn flag(&mut self, h: u16) -> &mut u8 {
        &mut self.0[16 + 16 * usize::from(h)]
    }
    fn set_counter(&mut self, h: u16, c: u64) {
        let at = 16 + 16 * usize::from(h) + 8;
        self.0[at..at + 8].copy_from_slice(&c.to_le_bytes());
    }
    fn set_u16(&mut self, at: usize, v: u16) {
        self.0[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }
    fn u16(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.0[at], self.0[at + 1]])
    }
}

fn used_idx(mem: &GuestMemoryMmap<()>) -> u16 {
    mem.read_obj(GuestAddress(USED + 2)).unwrap_or(0)
}

fn outage(mut r: Bytes, lie: bool) {
    let c = r.u8();
    let size = 2u16 << ((c & 0x3f) % 6); // 2..=64
    let with_region = c & 0x40 == 0;
    let block = c & 0x80 == 0;
    let shapes = r.u8();
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]) else {
        return;
    };
    // The simulated ring starts at an input-chosen index (wrap-around included).
    let start = r.u16();
    let _ = mem.write_obj(start, GuestAddress(AVAIL + 2));
    let _ = mem.write_obj(start, GuestAddress(USED + 2));
    let mut region = Region(vec![0u8; queue_region_size(size)]);
    region.set_u16(8, 1);
    region.set_u16(10, size);
    region.set_u16(14, start);
    for h in 0..size {
        build_chain(&mem, h, shapes >> (h % 8));
    }
    // The model: heads free, made available (in ring order), taken (in order), completed.
    let mut free: Vec<u16> = (0..size).collect();
    let mut avail_idx = start;
    let mut taken_upto = start; // avail position the back-end takes next
    let mut taken: Vec<(u64, u16)> = Vec::new(); // (counter, head), not completed
    let mut counter = r.u64() >> 8;
    let mut used = start;
    let mut completed_before: Vec<u16> = Vec::new();
    // Without a region the vmm fails from the used index only under VIRTIO_F_IN_ORDER:
    // the model's back-end then completes in order.
    let in_order = !with_region;
    let steps = r.u8();
    for _ in 0..steps {
        if r.done() {
            break;
        }
        let op = r.u8();
        match op % 4 {
            // The guest makes a request available.
            0 | 1 if !free.is_empty() => {
                let h = free.remove(usize::from(op >> 2) % free.len());
                let _ = mem.write_obj(h, GuestAddress(AVAIL + 4 + 2 * u64::from(avail_idx % size)));
                avail_idx = avail_idx.wrapping_add(1);
                let _ = mem.write_obj(avail_idx, GuestAddress(AVAIL + 2));
            }
            // The back-end takes the next one.
            2 if taken_upto != avail_idx => {
                let h: u16 = mem
                    .read_obj(GuestAddress(AVAIL + 4 + 2 * u64::from(taken_upto % size)))
                    .unwrap_or(0);
                taken_upto = taken_upto.wrapping_add(1);
                if with_region {
                    region.set_counter(h, counter);
                    *region.flag(h) = 1;
                }
                taken.push((counter, h));
                counter = counter.wrapping_add(1);
            }
            // The back-end completes one (out of order unless in order), maybe dying midway.
            3 if !taken.is_empty() => {
                let k = if in_order {
                    0
                } else {
                    usize::from(op >> 2) % taken.len()
                };
                let crash = op >> 6;
                let (_, h) = taken[k];
                if with_region {
                    region.set_u16(12, h); // last_batch_head
                }
                if crash == 3 {
                    // Died before publishing: still pending.
                    break;
                }
                let e = USED + 4 + 8 * u64::from(used % size);
                let _ = mem.write_obj(u32::from(h), GuestAddress(e));
                let _ = mem.write_obj(1u32, GuestAddress(e + 4));
                let _ = mem.write_obj(0u8, GuestAddress(status_at(h)));
                used = used.wrapping_add(1);
                let _ = mem.write_obj(used, GuestAddress(USED + 2));
                taken.remove(k);
                completed_before.push(h);
                if crash == 2 {
                    // Died after publishing, before recording it in the region.
                    break;
                }
                if with_region {
                    *region.flag(h) = 0;
                    region.set_u16(14, used);
                }
                free.push(h);
            }
            _ => {}
        }
    }
    if lie {
        // Input bytes overwrite parts of the ring and the region.
        while !r.done() {
            let what = r.u8();
            let at = usize::from(r.u16());
            let v = r.u8();
            match what % 3 {
                0 => {
                    let len = region.0.len();
                    region.0[at % len] = v;
                }
                1 => {
                    let _ = mem.write_obj(v, GuestAddress(AVAIL + (at as u64 % 0x1000)));
                }
                _ => {
                    let _ = mem.write_obj(v, GuestAddress(DESC + (at as u64 % 0x2000)));
                }
            }
        }
    }
    let before = snapshot(&mem);
    let old_used = used_idx(&mem);
    let old_avail: u16 = mem.read_obj(GuestAddress(AVAIL + 2)).unwrap_or(0);
    let outstanding = u32::from(old_avail.wrapping_sub(old_used).min(size));
    let ring = Ring {
        index: 0,
        size,
        desc: DESC,
        avail: AVAIL,
        used: USED,
    };
    let (n, signalled) = fail_pending(block, &mem, ring, with_region.then_some(&mut region.0[..]));
    let after = snapshot(&mem);
    let new_used = used_idx(&mem);
    assert_eq!(new_used.wrapping_sub(old_used), n as u16);
    assert_eq!(signalled, n > 0, "{n} failed, call signalled: {signalled}");
    assert!(
        n <= outstanding,
        "{n} completions for {outstanding} outstanding requests (ring of {size})"
    );
    let failed: Vec<u16> = (0..n as u16)
        .map(|k| {
            let e = USED + 4 + 8 * u64::from(old_used.wrapping_add(k) % size);
            mem.read_obj::<u32>(GuestAddress(e)).unwrap_or(u32::MAX) as u16
        })
        .collect();
    assert!(
        failed.iter().all(|&h| h < size),
        "head out of range: {failed:?}"
    );
    // Nothing written outside the used ring and status bytes (set to IOERR).
    let used_ring = USED as usize..USED as usize + 4 + 8 * usize::from(size);
    let mut statuses = 0;
    for (i, (a, b)) in before.iter().zip(&after).enumerate() {
        if a != b && !used_ring.contains(&i) {
            assert!(
                block && *b == IOERR,
                "byte {i:#x} written: {a:#x} -> {b:#x}"
            );
            statuses += 1;
        }
    }
    assert!(statuses <= n as usize);
    if lie {
        return;
    }
    // The exact outcome: taken-and-pending in the order taken, then the untaken ones in
    // ring order, each once.
    taken.sort_unstable();
    let mut want: Vec<u16> = taken.iter().map(|&(_, h)| h).collect();
    let mut p = taken_upto;
    while p != avail_idx {
        want.push(
            mem.read_obj::<u16>(GuestAddress(AVAIL + 4 + 2 * u64::from(p % size)))
                .unwrap_or(0),
        );
        p = p.wrapping_add(1);
    }
    assert_eq!(
        failed, want,
        "failed heads (completed before: {completed_before:?})"
    );
    let unique: HashSet<u16> = failed.iter().copied().collect();
    assert_eq!(
        unique.len(),
        failed.len(),
        "a head failed twice: {failed:?}"
    );
    for h in 0..size {
        let st: u8 = mem.read_obj(GuestAddress(status_at(h))).unwrap_or(0);
        if block && want.contains(&h) {
            assert_eq!(st, IOERR, "failed head {h} without IOERR");
        }
    }
    if with_region {
        for h in 0..size {
            assert_eq!(*region.flag(h), 0, "head {h} still marked in flight");
        }
        assert_eq!(region.u16(14), new_used);
    }
    // A second pass (the next outage tick) fails nothing.
    let (again, _) = fail_pending(block, &mem, ring, with_region.then_some(&mut region.0[..]));
    assert_eq!(again, 0, "a second pass failed {again} more");
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut r = Bytes {
        d: data.to_vec(),
        i: 0,
    };
    let mode = r.u8();
    if mode & 1 == 0 {
        session(r);
    } else {
        outage(r, mode & 2 != 0);
    }
});
