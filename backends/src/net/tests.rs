//! Engine tests: real `GuestMemoryMmap`, `MockSplitQueue`, and a SOCK_SEQPACKET socketpair
//! standing in for the tap (frame boundaries kept, no privileges needed).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

type Mem = GuestMemoryMmap<()>;
const QSIZE: u16 = 16;
const BUF: u64 = 0x1_0000;

fn mem() -> Mem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

fn d(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}

fn socketpair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0i32; 2];
    // SAFETY: socketpair writes two fds into the array.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0);
    // SAFETY: both fds were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn send(fd: &OwnedFd, data: &[u8]) {
    // SAFETY: writes from a valid slice.
    let r = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
    assert_eq!(r, data.len() as isize);
}

fn recv(fd: &OwnedFd) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 70000];
    // SAFETY: reads into a valid buffer of its length.
    let r = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return None;
    }
    buf.truncate(r as usize);
    Some(buf)
}

fn frame(len: usize) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    f[..VNET_HDR_LEN].fill(0);
    f
}

const MRG: u64 = 1 << VIRTIO_NET_F_MRG_RXBUF;

#[test]
fn tx_frame_reaches_the_tap() {
    let m = mem();
    let (a, b) = socketpair();
    let f = frame(72);
    m.write_slice(&f[..20], GuestAddress(BUF)).unwrap();
    m.write_slice(&f[20..], GuestAddress(BUF + 0x1000)).unwrap();
    let vq = MockSplitQueue::new(&m, QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    vq.add_desc_chains(
        &[d(BUF, 20, VRING_DESC_F_NEXT, 1), d(BUF + 0x1000, 52, 0, 0)],
        0,
    )
    .unwrap();
    let mut np = NetQueuePair::new(a, &m, 0);
    let out = np.process_tx(&mut q).unwrap();
    assert_eq!(out.queue.used, 1);
    assert!(out.queue.notify);
    assert!(!out.tap_full);
    assert_eq!(recv(&b).unwrap(), f);
    assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 0);
    assert_eq!(np.stats().tx_frames, 1);
}

#[test]
fn tx_header_too_short_is_dropped() {
    let m = mem();
    let (a, b) = socketpair();
    let vq = MockSplitQueue::new(&m, QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    vq.add_desc_chains(&[d(BUF, 8, 0, 0)], 0).unwrap();
    let mut np = NetQueuePair::new(a, &m, 0);
    let out = np.process_tx(&mut q).unwrap();
    assert_eq!(out.queue.used, 1, "returned to the guest");
    assert_eq!(np.faults(NetFault::HeaderTooShort), 1);
    assert_eq!(np.stats().tx_dropped, 1);
    assert!(recv(&b).is_none(), "nothing sent");
}

#[test]
fn tx_device_writable_buffer_is_dropped() {
    let m = mem();
    let (a, b) = socketpair();
    let vq = MockSplitQueue::new(&m, QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    vq.add_desc_chains(
        &[
            d(BUF, 60, VRING_DESC_F_NEXT, 1),
            d(BUF + 0x1000, 60, VRING_DESC_F_WRITE, 0),
        ],
        0,
    )
    .unwrap();
    let mut np = NetQueuePair::new(a, &m, 0);
    np.process_tx(&mut q).unwrap();
    assert_eq!(np.faults(NetFault::WrongDirection), 1);
    assert!(recv(&b).is_none());
}

#[test]
fn tx_descriptor_loop_is_dropped() {
    let m = mem();
    let (a, _b) = socketpair();
    let vq = MockSplitQueue::new(&m, QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    vq.add_desc_chains(
        &[
            d(BUF, 60, VRING_DESC_F_NEXT, 1),
            d(BUF, 60, VRING_DESC_F_NEXT, 0),
        ],
        0,
    )
    .unwrap();
    let mut np = NetQueuePair::new(a, &m, 0);
    let out = np.process_tx(&mut q).unwrap();
    assert_eq!(out.queue.used, 1);
    assert_eq!(np.faults(NetFault::Chain), 1);
}

#[test]
fn tx_tap_full_then_resumes() {
    let m = mem();
    let (a, b) = socketpair();
    // Fill the socket until it would block.
    let filler = vec![0u8; 4096];
    let mut sent = 0;
    loop {
        // SAFETY: writes from a valid buffer.
        let r = unsafe { libc::write(a.as_raw_fd(), filler.as_ptr().cast(), filler.len()) };
        if r < 0 {
            break;
        }
        sent += 1;
    }
    let f = frame(100);
    m.write_slice(&f, GuestAddress(BUF)).unwrap();
    let vq = MockSplitQueue::new(&m, QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    vq.add_desc_chains(&[d(BUF, 100, 0, 0)], 0).unwrap();
    let mut np = NetQueuePair::new(a, &m, 0);
    let out = np.process_tx(&mut q).unwrap();
    assert!(out.tap_full);
    assert_eq!(out.queue.used, 0);
    assert_eq!(q.next_avail(), 0, "the chain stays available");
    for _ in 0..sent {
        recv(&b).unwrap();
    }
    let out = np.process_tx(&mut q).unwrap();
    assert!(!out.tap_full);
    assert_eq!(out.queue.used, 1);
    assert_eq!(recv(&b).unwrap(), f);
}

fn used_len(vq: &MockSplitQueue<Mem>, i: usize) -> u32 {
    vq.used().ring().ref_at(i).unwrap().load().len()
}

fn num_buffers(m: &Mem, addr: u64) -> u16 {
    u16::from_le(m.read_obj(GuestAddress(addr + 10)).unwrap())
}

#[test]
fn rx_without_mrg_rxbuf() {
    let m = mem();
    let (a, b) = socketpair();
    let f = frame(100);
    send(&b, &f);
    let vq = MockSplitQueue::new(&m, QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    vq.add_desc_chains(&[d(BUF, 2000, VRING_DESC_F_WRITE, 0)], 0)
        .unwrap();
    let mut np = NetQueuePair::new(a, &m, 0);
    let out = np.process_rx(&mut q).unwrap();
    assert_eq!(out.frames, 1);
    assert_eq!(out.wait, RxWait::TapEmpty);
    assert!(out.queue.notify);
    assert_eq!(used_len(&vq, 0), 100);
    let mut got = vec![0u8; 100];
    m.read_slice(&mut got, GuestAddress(BUF)).unwrap();
    assert_eq!(&got[12..], &f[12..]);
    assert_eq!(num_buffers(&m, BUF), 1);
}

#[test]
fn rx_with_mrg_rxbuf_spans_chains() {
    let m = mem();
    let (a, b) = socketpair();
    let f = frame(3000);
    send(&b, &f);
    let vq = MockSplitQueue::new(&m, QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    let descs: Vec<_> = (0..4)
        .map(|i| d(BUF + 0x1000 * i, 1024, VRING_DESC_F_WRITE, 0))
        .collect();
    vq.add_desc_chains(&descs, 0).unwrap();
    let mut np = NetQueuePair::new(a, &m, MRG);
    let out = np.process_rx(&mut q).unwrap();
    assert_eq!(out.frames, 1);
    assert_eq!(out.queue.used, 3);
    assert_eq!(num_buffers(&m, BUF), 3);
    assert_eq!(
        (used_len(&vq, 0), used_len(&vq, 1), used_len(&vq, 2)),
        (1024, 1024, 952)
    );
    let mut got = vec![0u8; 3000];
    for i in 0..3u64 {
        let n = if i == 2 { 952 } else { 1024 };
        let off = 1024 * i as usize;
        m.read_slice(&mut got[off..off + n], GuestAddress(BUF + 0x1000 * i))
            .unwrap();
    }
    assert_eq!(&got[12..], &f[12..]);
    assert_eq!(
        q.next_avail(),
        3,
        "the fourth buffer is left for the next frame"
    );
}

#[test]
fn rx_frame_larger_than_the_guest_buffers() {
    let m = mem();
    let (a, b) = socketpair();
    send(&b, &frame(3000));
    send(&b, &frame(200));
    let vq = MockSplitQueue::new(&m, QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    vq.add_desc_chains(&[d(BUF, 1514, VRING_DESC_F_WRITE, 0)], 0)
        .unwrap();
    let mut np = NetQueuePair::new(a, &m, 0);
    let out = np.process_rx(&mut q).unwrap();
    // The big frame is dropped (counted); the buffer then takes the small one.
    assert_eq!(np.faults(NetFault::RxTooBig), 1);
    assert_eq!(np.stats().rx_dropped, 1);
    assert_eq!(out.frames, 1);
    assert_eq!(used_len(&vq, 0), 200);
}

#[test]
fn rx_waits_for_guest_buffers() {
    let m = mem();
    let (a, b) = socketpair();
    let f = frame(3000);
    send(&b, &f);
    let vq = MockSplitQueue::new(&m, QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    vq.add_desc_chains(
        &[
            d(BUF, 1024, VRING_DESC_F_WRITE, 0),
            d(BUF + 0x1000, 1024, VRING_DESC_F_WRITE, 0),
        ],
        0,
    )
    .unwrap();
    let mut np = NetQueuePair::new(a, &m, MRG);
    let out = np.process_rx(&mut q).unwrap();
    assert_eq!(out.wait, RxWait::GuestBuffers);
    assert_eq!(out.queue.used, 0);
    assert!(np.rx_pending());
    assert_eq!(q.next_avail(), 0, "partial buffers were rewound");
    // The guest adds a buffer and kicks.
    vq.add_desc_chains(&[d(BUF + 0x2000, 1024, VRING_DESC_F_WRITE, 0)], 2)
        .unwrap();
    let out = np.process_rx(&mut q).unwrap();
    assert_eq!(out.frames, 1);
    assert_eq!(out.queue.used, 3);
    assert_eq!(out.wait, RxWait::TapEmpty);
    assert!(!np.rx_pending());
}

#[test]
fn rx_notifications_only_while_out_of_buffers() {
    // VRING_USED_F_NO_NOTIFY in the used ring's flags: the driver skips its RX doorbell.
    let m = mem();
    let no_notify = |vq: &MockSplitQueue<Mem>| {
        u16::from_le(m.read_obj::<u16>(vq.used_addr()).unwrap()) & 1 != 0
    };
    let (a, b) = socketpair();
    let vq = MockSplitQueue::new(&m, QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    vq.add_desc_chains(
        &[
            d(BUF, 2000, VRING_DESC_F_WRITE, 0),
            d(BUF + 0x1000, 2000, VRING_DESC_F_WRITE, 0),
        ],
        0,
    )
    .unwrap();
    let mut np = NetQueuePair::new(a, &m, 0);
    assert!(!no_notify(&vq));
    send(&b, &frame(100));
    let out = np.process_rx(&mut q).unwrap();
    assert_eq!(out.frames, 1);
    assert!(no_notify(&vq), "a buffer is left: no RX doorbell needed");
    send(&b, &frame(100));
    send(&b, &frame(100));
    let out = np.process_rx(&mut q).unwrap();
    assert_eq!((out.frames, out.wait), (1, RxWait::GuestBuffers));
    assert!(!no_notify(&vq), "out of buffers: the driver must ring");
    // The driver adds a buffer (and rings): the pending frame goes in, doorbells off again.
    vq.add_desc_chains(&[d(BUF + 0x2000, 2000, VRING_DESC_F_WRITE, 0)], 2)
        .unwrap();
    let out = np.process_rx(&mut q).unwrap();
    assert_eq!((out.frames, out.wait), (1, RxWait::TapEmpty));
    assert!(no_notify(&vq));
    assert_eq!(used_len(&vq, 2), 100);
}

#[test]
fn rx_device_readable_buffer_is_dropped() {
    let m = mem();
    let (a, b) = socketpair();
    send(&b, &frame(100));
    let vq = MockSplitQueue::new(&m, QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    vq.add_desc_chains(
        &[
            d(BUF, 2000, 0, 0),
            d(BUF + 0x1000, 2000, VRING_DESC_F_WRITE, 0),
        ],
        0,
    )
    .unwrap();
    let mut np = NetQueuePair::new(a, &m, 0);
    let out = np.process_rx(&mut q).unwrap();
    assert_eq!(np.faults(NetFault::WrongDirection), 1);
    assert_eq!(out.queue.used, 2);
    assert_eq!(used_len(&vq, 0), 0);
    assert_eq!(used_len(&vq, 1), 100);
}

#[test]
fn rx_runt_from_the_tap() {
    let m = mem();
    let (a, b) = socketpair();
    send(&b, &[0u8; 5]);
    let vq = MockSplitQueue::new(&m, QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    vq.add_desc_chains(&[d(BUF, 2000, VRING_DESC_F_WRITE, 0)], 0)
        .unwrap();
    let mut np = NetQueuePair::new(a, &m, 0);
    let out = np.process_rx(&mut q).unwrap();
    assert_eq!(out.frames, 0);
    assert_eq!(np.faults(NetFault::RxRunt), 1);
}

#[test]
fn rx_and_tx_on_a_broken_queue_are_errors() {
    let m = mem();
    let (a, _b) = socketpair();
    let mut np = NetQueuePair::new(a, &m, 0);
    let mut q = Queue::new(QSIZE).unwrap();
    assert!(matches!(
        np.process_rx(&mut q),
        Err(crate::QueueError::NotReady)
    ));
    let vq = MockSplitQueue::new(&m, QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    vq.avail().idx().store(u16::to_le(100));
    assert!(matches!(
        np.process_tx(&mut q),
        Err(crate::QueueError::Ring(_))
    ));
}

fn ctrl(m: &Mem, cmd: &[u8]) -> (CtrlOutcome, u8, u32) {
    m.write_slice(cmd, GuestAddress(BUF)).unwrap();
    m.write_obj(0xffu8, GuestAddress(BUF + 0x1000)).unwrap();
    let vq = MockSplitQueue::new(m, QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    vq.add_desc_chains(
        &[
            d(BUF, cmd.len() as u32, VRING_DESC_F_NEXT, 1),
            d(BUF + 0x1000, 1, VRING_DESC_F_WRITE, 0),
        ],
        0,
    )
    .unwrap();
    let mut c = CtrlQueue::new(m, 4);
    let out = c.process(&mut q).unwrap();
    let ack = m.read_obj(GuestAddress(BUF + 0x1000)).unwrap();
    (out, ack, used_len(&vq, 0))
}

#[test]
fn ctrl_mq_vq_pairs_set() {
    let m = mem();
    let mq = VIRTIO_NET_CTRL_MQ as u8;
    let set = VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8;
    let (out, ack, len) = ctrl(&m, &[mq, set, 2, 0]);
    assert_eq!(ack, VIRTIO_NET_OK as u8);
    assert_eq!(out.vq_pairs, Some(2));
    assert_eq!(len, 1);
    assert!(out.queue.notify);
    for bad in [[mq, set, 0, 0], [mq, set, 5, 0]] {
        let (out, ack, _) = ctrl(&m, &bad);
        assert_eq!(ack, VIRTIO_NET_ERR as u8);
        assert_eq!(out.vq_pairs, None);
    }
    // Missing argument.
    let (_, ack, _) = ctrl(&m, &[mq, set]);
    assert_eq!(ack, VIRTIO_NET_ERR as u8);
}

#[test]
fn ctrl_other_classes() {
    let m = mem();
    let (_, ack, _) = ctrl(
        &m,
        &[
            VIRTIO_NET_CTRL_RX as u8,
            VIRTIO_NET_CTRL_RX_PROMISC as u8,
            1,
        ],
    );
    assert_eq!(ack, VIRTIO_NET_OK as u8);
    let (_, ack, _) = ctrl(
        &m,
        &[
            VIRTIO_NET_CTRL_MAC as u8,
            VIRTIO_NET_CTRL_MAC_TABLE_SET as u8,
            0,
            0,
            0,
            0,
        ],
    );
    assert_eq!(ack, VIRTIO_NET_OK as u8);
    let (_, ack, _) = ctrl(&m, &[VIRTIO_NET_CTRL_VLAN as u8, 0, 1, 0]);
    assert_eq!(ack, VIRTIO_NET_ERR as u8);
    let (_, ack, _) = ctrl(&m, &[77]);
    assert_eq!(ack, VIRTIO_NET_ERR as u8);
}

#[test]
fn ctrl_without_ack_byte() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    vq.add_desc_chains(&[d(BUF, 4, 0, 0)], 0).unwrap();
    let mut c = CtrlQueue::new(&m, 4);
    let out = c.process(&mut q).unwrap();
    assert_eq!(out.queue.used, 1);
    assert_eq!(used_len(&vq, 0), 0);
    assert_eq!(c.errors(), 1);
}

#[test]
fn offload_flags_follow_guest_features() {
    let f = (1u64 << VIRTIO_NET_F_GUEST_CSUM)
        | (1u64 << VIRTIO_NET_F_GUEST_TSO4)
        | (1u64 << VIRTIO_NET_F_GUEST_UFO);
    assert_eq!(
        tap_offload_flags(f),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_UFO
    );
    // TSO without checksum offload is meaningless: nothing.
    assert_eq!(tap_offload_flags(1u64 << VIRTIO_NET_F_GUEST_TSO4), 0);
}

#[test]
fn real_tap_open_offloads_multiqueue_and_tx() {
    // This machine runs as root with /dev/net/tun (see shared/machine.md).
    let taps = Tap::open_queues("bkt%d", 2).unwrap();
    let name = taps[0].name().to_string();
    assert!(name.starts_with("bkt"), "{name}");
    for t in &taps {
        let flags = t.flags().unwrap();
        assert_ne!(flags & libc::IFF_VNET_HDR as i16, 0);
        assert_ne!(flags & libc::IFF_MULTI_QUEUE as i16, 0);
        t.set_offloads(
            (1u64 << VIRTIO_NET_F_GUEST_CSUM)
                | (1u64 << VIRTIO_NET_F_GUEST_TSO4)
                | (1u64 << VIRTIO_NET_F_GUEST_TSO6)
                | (1u64 << VIRTIO_NET_F_GUEST_UFO),
        )
        .unwrap();
    }
    // One pair in use: the second queue is detached (TUNGETIFF says IFF_DETACH_QUEUE), the
    // first stays; again is a no-op; both pairs: both attached.
    let detached = |t: &Tap| t.flags().unwrap() & libc::IFF_DETACH_QUEUE as i16 != 0;
    crate::net::use_pairs(&taps, 1).unwrap();
    assert!(!detached(&taps[0]));
    assert!(detached(&taps[1]));
    crate::net::use_pairs(&taps, 1).unwrap();
    crate::net::use_pairs(&taps, 2).unwrap();
    assert!(!detached(&taps[1]));
    // Zero pairs (no driver yet) keeps the first attached.
    crate::net::use_pairs(&taps, 0).unwrap();
    assert!(!detached(&taps[0]));
    crate::net::use_pairs(&taps, 2).unwrap();
    // Adopt a duplicate of the first queue's fd.
    let dup = taps[0].tap_dup();
    let adopted = Tap::from_fd(dup).unwrap();
    assert_eq!(adopted.name(), name);
    // A non-tap fd is refused with a clear error.
    let (s, _) = socketpair();
    assert!(Tap::from_fd(s).is_err());
    assert!(Tap::open("this-name-is-far-too-long", false).is_err());

    // TX through the real tap once it is up.
    let st = std::process::Command::new("ip")
        .args(["link", "set", "dev", &name, "up"])
        .status()
        .unwrap();
    assert!(st.success());
    let m = mem();
    let mut f = frame(72);
    f[12..18].fill(0xff); // broadcast destination
    f[18..24].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
    f[24..26].copy_from_slice(&[0x88, 0xb5]); // local experimental ethertype
    m.write_slice(&f, GuestAddress(BUF)).unwrap();
    let vq = MockSplitQueue::new(&m, QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    vq.add_desc_chains(&[d(BUF, 72, 0, 0)], 0).unwrap();
    let mut taps = taps;
    let mut np = NetQueuePair::new(taps.remove(0), &m, 0);
    let out = np.process_tx(&mut q).unwrap();
    assert_eq!(out.queue.used, 1);
    assert_eq!(np.stats().tx_frames, 1, "{:?}", np.stats());
    assert_eq!(np.stats().tx_bytes, 72);
}

/// A queue of `size` entries at fixed addresses (MockSplitQueue's rings overlap past 8
/// entries): descriptors at 0, avail at 0x4000, used at 0x8000.
fn big_queue(size: u16) -> Queue {
    let mut q = Queue::new(size).unwrap();
    q.set_size(size);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x4000), Some(0));
    q.set_used_ring_address(Some(0x8000), Some(0));
    q.set_ready(true);
    q
}

#[test]
fn tx_serves_at_most_its_budget_per_call_and_says_so() {
    let m = mem();
    let (a, b) = socketpair();
    let size = 512u16;
    let mut q = big_queue(size);
    let n = TX_BUDGET as u16 + 100;
    // `n` one-descriptor frames (a runt each: dropped, so the socket never fills).
    for i in 0..n {
        m.write_obj(d(BUF, 8, 0, 0), GuestAddress(16 * u64::from(i)))
            .unwrap();
        m.write_obj(i, GuestAddress(0x4004 + 2 * u64::from(i)))
            .unwrap();
    }
    m.write_obj(n, GuestAddress(0x4002)).unwrap();
    let mut np = NetQueuePair::new(a, &m, 0);
    let out = np.process_tx(&mut q).unwrap();
    assert_eq!(out.queue.used, TX_BUDGET);
    assert!(out.queue.more, "chains are left");
    let out = np.process_tx(&mut q).unwrap();
    assert_eq!(out.queue.used, 100);
    assert!(!out.queue.more);
    drop(b);
}

#[test]
fn rx_counts_dropped_frames_against_its_budget() {
    let m = mem();
    let (a, b) = socketpair();
    // As many runts as the socket takes (more than the budget): each is read and dropped.
    let mut sent = 0u32;
    loop {
        // SAFETY: writes from a valid 1-byte buffer.
        let r = unsafe { libc::write(b.as_raw_fd(), [0u8].as_ptr().cast(), 1) };
        if r != 1 {
            break;
        }
        sent += 1;
    }
    assert!(sent > RX_BUDGET, "only {sent} frames fit the socket");
    let vq = MockSplitQueue::new(&m, QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    let mut np = NetQueuePair::new(a, &m, 0);
    let out = np.process_rx(&mut q).unwrap();
    assert_eq!(out.wait, RxWait::Budget, "the call ends at its budget");
    assert_eq!(np.stats().rx_dropped, u64::from(RX_BUDGET));
    let out = np.process_rx(&mut q).unwrap();
    assert_eq!(out.wait, RxWait::TapEmpty);
    assert_eq!(np.stats().rx_dropped, u64::from(sent));
}

#[test]
fn ctrl_serves_at_most_its_budget_per_call() {
    let m = mem();
    let size = 256u16;
    let mut q = big_queue(size);
    let n = CTRL_BUDGET as u16 + 10;
    // Each command: VIRTIO_NET_CTRL_MQ / VQ_PAIRS_SET 1, and an ack byte.
    m.write_slice(&[4, 0, 1, 0], GuestAddress(BUF)).unwrap();
    for i in 0..n {
        let at = 16 * u64::from(2 * i);
        m.write_obj(d(BUF, 4, VRING_DESC_F_NEXT, 2 * i + 1), GuestAddress(at))
            .unwrap();
        m.write_obj(
            d(BUF + 0x100 + u64::from(i), 1, VRING_DESC_F_WRITE, 0),
            GuestAddress(at + 16),
        )
        .unwrap();
        m.write_obj(2 * i, GuestAddress(0x4004 + 2 * u64::from(i)))
            .unwrap();
    }
    m.write_obj(n, GuestAddress(0x4002)).unwrap();
    let mut c = CtrlQueue::new(&m, 4);
    let out = c.process(&mut q).unwrap();
    assert_eq!(out.queue.used, CTRL_BUDGET);
    assert!(out.queue.more);
    let out = c.process(&mut q).unwrap();
    assert_eq!(out.queue.used, 10);
    assert!(!out.queue.more);
}

/// An indirect table of `n` descriptors at `table` (each `len` bytes at `buf`, with
/// `flags`), chained; returns the head descriptor that points at it.
fn indirect_table(m: &Mem, table: u64, n: usize, buf: u64, len: u32, flags: u32) -> RawDescriptor {
    for i in 0..n {
        let next = if i + 1 < n { VRING_DESC_F_NEXT } else { 0 };
        m.write_obj(
            d(buf, len, flags | next, (i + 1) as u16),
            GuestAddress(table + 16 * i as u64),
        )
        .unwrap();
    }
    d(
        table,
        16 * n as u32,
        virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT,
        0,
    )
}

/// An RX ring of bad chains that each cost a walk of a 16384-entry table (device-readable:
/// refused and dropped) is dropped a descriptor budget at a time: the call ends at the
/// budget (to be called again), not after the whole ring.
#[test]
fn rx_drops_long_bad_chains_a_descriptor_budget_per_call() {
    let m = mem();
    let (a, b) = socketpair();
    send(&b, &frame(100));
    const N: usize = 16384;
    let head = indirect_table(&m, 0x4_0000, N, BUF, 1, 0);
    let vq = MockSplitQueue::new(&m, QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    vq.add_desc_chains(&vec![head; usize::from(QSIZE)], 0)
        .unwrap();
    let mut np = NetQueuePair::new(a, &m, 0);
    let per_call = (crate::chain::MAX_DESCS_PER_CALL as usize).div_ceil(N) as u32;
    let out = np.process_rx(&mut q).unwrap();
    assert_eq!(
        out.wait,
        RxWait::Budget,
        "the call ends at its descriptor budget"
    );
    assert_eq!(out.queue.used, per_call, "bad chains dropped in one call");
    // The frame waits; the next calls drop the rest, then it waits for buffers.
    let mut dropped = out.queue.used;
    loop {
        let o = np.process_rx(&mut q).unwrap();
        assert!(o.queue.used <= per_call, "{o:?}");
        dropped += o.queue.used;
        if o.wait == RxWait::GuestBuffers {
            break;
        }
        assert_eq!(o.wait, RxWait::Budget);
    }
    assert_eq!(dropped, u32::from(QSIZE));
    assert_eq!(np.stats().rx_frames, 0);
    drop(b);
}

/// With MRG_RXBUF, a frame that would need more than MAX_RX_CHAINS_PER_FRAME of the
/// guest's (12-byte) buffers is dropped, the chains given back empty.
#[test]
fn mrg_rx_spreads_a_frame_over_at_most_the_chain_limit() {
    let m = mem();
    let (a, b) = socketpair();
    let len = 12 * MAX_RX_CHAINS_PER_FRAME + 100;
    send(&b, &frame(len));
    let qsize = 2048u16;
    let vq = MockSplitQueue::new(&m, qsize);
    let mut q: Queue = vq.create_queue().unwrap();
    let chains: Vec<RawDescriptor> = (0..qsize)
        .map(|i| d(BUF + 12 * u64::from(i), 12, VRING_DESC_F_WRITE, 0))
        .collect();
    vq.add_desc_chains(&chains, 0).unwrap();
    let mut np = NetQueuePair::new(a, &m, MRG);
    let out = np.process_rx(&mut q).unwrap();
    assert_eq!(out.queue.used, MAX_RX_CHAINS_PER_FRAME as u32, "{out:?}");
    assert_eq!(out.frames, 0);
    assert_eq!(out.wait, RxWait::TapEmpty);
    assert_eq!(np.stats().rx_dropped, 1);
    drop(b);
}
