//! The virtio-net probe (`probe=net`): request/response through the device to the host
//! kernel. The guest (`ip=`, default 192.0.2.2) resolves `peer=` (default 192.0.2.1, a tap
//! address in a namespace the host test creates) with ARP, then sends ICMP echo requests one
//! at a time; a sample is the time from publishing a request to finding its reply in the RX
//! used ring. Every reply is checked (source, id, sequence, payload); a wrong one counts as a
//! verify failure, a missing one (1 s) as an error. ARP requests for our address are answered.
//! Result: one `probe-result` line with test `net-icmp-rr`.

use crate::cmdline::Args;
use crate::println;
use crate::probe::{fatal, rdtsc, report, samples, Outcome, TIMEOUT_CYCLES};
use crate::virtio::{self, Device, Dma, Virtq, DESC_F_WRITE};

const F_MAC: u64 = 1 << 5;
const VNET_HDR: usize = 12;
const BUF: u64 = 2048;
const RX_BUFS: u16 = 32;
const ETH_ARP: u16 = 0x0806;
const ETH_IPV4: u16 = 0x0800;
/// How long a reply may take before it counts as lost (about 1 s at 2.6 GHz).
const REPLY_CYCLES: u64 = 2_600_000_000;
const ICMP_ID: u16 = 0x7072; // "pr"
const MAX_PAYLOAD: usize = 1472;

struct Net {
    rx: Virtq,
    tx: Virtq,
    rx_bufs: u64,
    tx_buf: u64,
    tx_pending: bool,
    mac: [u8; 6],
    ip: [u8; 4],
    peer: [u8; 4],
    peer_mac: Option<[u8; 6]>,
    /// Frames received that were none of ours.
    other_frames: u64,
    arp_replies_sent: u64,
}

fn buf(addr: u64, len: usize) -> &'static mut [u8] {
    // SAFETY: `addr` is a buffer of at least `len` (<= BUF) bytes the probe allocated in its DMA
    // area; the device does not own it while the slice is used (completed RX buffer, or a TX
    // buffer whose previous send completed).
    unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, len) }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// The Internet checksum of `b`.
fn checksum(b: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in b.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from(c[0]) << 8
        };
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn payload_byte(seed: u64, seq: u16, j: usize) -> u8 {
    (seed as u8) ^ (seq as u8).wrapping_mul(31) ^ (j as u8).wrapping_add((seq >> 8) as u8)
}

impl Net {
    fn post_rx(&mut self, i: u16) {
        self.rx.set_desc(
            i,
            self.rx_bufs + u64::from(i) * BUF,
            BUF as u32,
            DESC_F_WRITE,
            0,
        );
        self.rx.push(i);
    }

    /// Waits until the previous transmit has completed (its buffer is free again).
    fn reclaim_tx(&mut self) {
        if !self.tx_pending {
            return;
        }
        let since = rdtsc();
        loop {
            if self.tx.poll_used().is_some() {
                self.tx_pending = false;
                return;
            }
            if rdtsc().wrapping_sub(since) > TIMEOUT_CYCLES {
                fatal("virtio-net", "a transmit never completed");
            }
            core::hint::spin_loop();
        }
    }

    /// The frame area of the TX buffer (after the virtio-net header, which stays zero).
    fn tx_frame(&mut self) -> &'static mut [u8] {
        self.reclaim_tx();
        let b = buf(self.tx_buf, BUF as usize);
        b[..VNET_HDR].fill(0);
        &mut b[VNET_HDR..]
    }

    /// Sends the first `len` bytes of the TX frame.
    fn send(&mut self, len: usize) {
        self.tx
            .set_desc(0, self.tx_buf, (VNET_HDR + len) as u32, 0, 0);
        self.tx.push(0);
        self.tx_pending = true;
        self.tx.publish_and_notify();
    }

    fn send_arp(&mut self, op: u16, dst_mac: [u8; 6], target_mac: [u8; 6], target_ip: [u8; 4]) {
        let (mac, ip) = (self.mac, self.ip);
        let f = self.tx_frame();
        f[0..6].copy_from_slice(&dst_mac);
        f[6..12].copy_from_slice(&mac);
        put16(f, 12, ETH_ARP);
        let a = &mut f[14..42];
        put16(a, 0, 1);
        put16(a, 2, ETH_IPV4);
        a[4] = 6;
        a[5] = 4;
        put16(a, 6, op);
        a[8..14].copy_from_slice(&mac);
        a[14..18].copy_from_slice(&ip);
        a[18..24].copy_from_slice(&target_mac);
        a[24..28].copy_from_slice(&target_ip);
        // Pad to the Ethernet minimum.
        f[42..60].fill(0);
        self.send(60);
    }

    fn send_echo(&mut self, seq: u16, size: usize, seed: u64) {
        let (mac, ip, peer) = (self.mac, self.ip, self.peer);
        let peer_mac = self.peer_mac.unwrap_or([0xff; 6]);
        let f = self.tx_frame();
        f[0..6].copy_from_slice(&peer_mac);
        f[6..12].copy_from_slice(&mac);
        put16(f, 12, ETH_IPV4);
        let total = 20 + 8 + size;
        let h = &mut f[14..34];
        h[0] = 0x45;
        h[1] = 0;
        put16(h, 2, total as u16);
        put16(h, 4, seq);
        put16(h, 6, 0x4000);
        h[8] = 64;
        h[9] = 1;
        put16(h, 10, 0);
        h[12..16].copy_from_slice(&ip);
        h[16..20].copy_from_slice(&peer);
        let c = checksum(h);
        put16(h, 10, c);
        let icmp = &mut f[34..34 + 8 + size];
        icmp[0] = 8;
        icmp[1] = 0;
        put16(icmp, 2, 0);
        put16(icmp, 4, ICMP_ID);
        put16(icmp, 6, seq);
        for (j, b) in icmp[8..].iter_mut().enumerate() {
            *b = payload_byte(seed, seq, j);
        }
        let c = checksum(icmp);
        put16(icmp, 2, c);
        self.send((14 + total).max(60));
    }

    /// Handles one received frame; returns Some(good) for an echo reply of `want_seq`.
    fn handle(
        &mut self,
        frame: &[u8],
        want_seq: Option<u16>,
        size: usize,
        seed: u64,
    ) -> Option<bool> {
        if frame.len() < 14 {
            self.other_frames += 1;
            return None;
        }
        match be16(frame, 12) {
            ETH_ARP if frame.len() >= 42 => {
                let a = &frame[14..42];
                let (op, sha, spa, tpa) = (be16(a, 6), &a[8..14], &a[14..18], &a[24..28]);
                let mut sha6 = [0u8; 6];
                sha6.copy_from_slice(sha);
                if spa == self.peer {
                    self.peer_mac = Some(sha6);
                }
                if op == 1 && tpa == self.ip {
                    let mut spa4 = [0u8; 4];
                    spa4.copy_from_slice(spa);
                    self.send_arp(2, sha6, sha6, spa4);
                    self.arp_replies_sent += 1;
                }
                None
            }
            ETH_IPV4 if frame.len() >= 34 + 8 => {
                let h = &frame[14..34];
                if h[0] != 0x45 || h[9] != 1 || h[12..16] != self.peer || h[16..20] != self.ip {
                    self.other_frames += 1;
                    return None;
                }
                let total = usize::from(be16(h, 2));
                let icmp = &frame[34..];
                if icmp[0] != 0 || be16(icmp, 4) != ICMP_ID {
                    self.other_frames += 1;
                    return None;
                }
                let seq = be16(icmp, 6);
                if Some(seq) != want_seq {
                    // A late reply to an earlier request.
                    self.other_frames += 1;
                    return None;
                }
                let good = total == 28 + size
                    && icmp.len() >= 8 + size
                    && icmp[8..8 + size]
                        .iter()
                        .enumerate()
                        .all(|(j, &b)| b == payload_byte(seed, seq, j));
                Some(good)
            }
            _ => {
                self.other_frames += 1;
                None
            }
        }
    }

    /// Processes received frames until an echo reply of `want_seq` arrives or `deadline`
    /// (TSC) passes. Returns (time found, good) or None.
    fn receive(
        &mut self,
        want_seq: Option<u16>,
        deadline: u64,
        size: usize,
        seed: u64,
    ) -> Option<(u64, bool)> {
        loop {
            if let Some((id, len)) = self.rx.poll_used() {
                let now = rdtsc();
                let id = id % RX_BUFS;
                let len = (len as usize).min(BUF as usize);
                let frame = buf(self.rx_bufs + u64::from(id) * BUF, len);
                let result = if len > VNET_HDR {
                    self.handle(&frame[VNET_HDR..], want_seq, size, seed)
                } else {
                    None
                };
                self.post_rx(id);
                self.rx.publish_and_notify();
                if let Some(good) = result {
                    return Some((now, good));
                }
                continue;
            }
            if rdtsc() > deadline {
                return None;
            }
            core::hint::spin_loop();
        }
    }
}

/// The net probe; returns whether it failed.
pub fn run(args: &Args<'_>) -> bool {
    let size = args.size as usize;
    if size > MAX_PAYLOAD {
        fatal("virtio-net", "size= is larger than 1472 bytes");
    }
    let dev = Device::find(virtio::TYPE_NET).unwrap_or_else(|e| fatal("virtio-net", e));
    let features = dev
        .negotiate(F_MAC)
        .unwrap_or_else(|e| fatal("virtio-net", e));
    let mut dma = Dma::new();
    let rx = dev
        .setup_queue(0, 64, &mut dma)
        .unwrap_or_else(|e| fatal("virtio-net rx", e));
    let tx = dev
        .setup_queue(1, 64, &mut dma)
        .unwrap_or_else(|e| fatal("virtio-net tx", e));
    let mut mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    if features & F_MAC != 0 {
        for (i, m) in mac.iter_mut().enumerate() {
            *m = dev.config_read8(i as u64);
        }
    }
    let nbufs = RX_BUFS.min(rx.size);
    let mut net = Net {
        rx,
        tx,
        rx_bufs: dma.alloc(BUF * u64::from(RX_BUFS), 4096),
        tx_buf: dma.alloc(BUF, 4096),
        tx_pending: false,
        mac,
        ip: args.ip,
        peer: args.peer,
        peer_mac: None,
        other_frames: 0,
        arp_replies_sent: 0,
    };
    for i in 0..nbufs {
        net.post_rx(i);
    }
    dev.driver_ok().unwrap_or_else(|e| fatal("virtio-net", e));
    net.rx.publish_and_notify();
    println!(
        "probe: virtio-net at 00:{:02x}.{}: mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}, features {features:#x}",
        dev.func.dev, dev.func.func, mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
    );

    let mut failed = false;
    for phase in 0..args.phases.max(1) {
        if phase > 0 {
            // Idle: no frame goes out; received ones are taken (and the buffers reposted).
            let gap = u64::from(args.gap_ms) * (REPLY_CYCLES / 1000);
            let _ = net.receive(None, rdtsc() + gap, size, args.seed);
            net.peer_mac = None;
            println!("probe: net: phase {}", phase + 1);
        }
        failed |= phase_run(&mut net, args, size);
    }
    failed
}

/// One phase: ARP for the peer, then the echoes; returns whether it failed.
fn phase_run(net: &mut Net, args: &Args<'_>, size: usize) -> bool {
    // ARP for the peer: a request every ~100 ms, for up to ~5 s.
    for _ in 0..50 {
        net.send_arp(1, [0xff; 6], [0; 6], args.peer);
        let _ = net.receive(None, rdtsc() + REPLY_CYCLES / 10, size, args.seed);
        if net.peer_mac.is_some() {
            break;
        }
    }
    let Some(pm) = net.peer_mac else {
        println!("probe: no ARP reply from the peer");
        return true;
    };
    println!(
        "probe: peer {}.{}.{}.{} is at {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        args.peer[0],
        args.peer[1],
        args.peer[2],
        args.peer[3],
        pm[0],
        pm[1],
        pm[2],
        pm[3],
        pm[4],
        pm[5]
    );

    let samples = samples(args.n);
    let (n0, s0) = (
        net.rx.notifies + net.tx.notifies,
        net.rx.suppressed + net.tx.suppressed,
    );
    let (mut lost, mut bad, mut got) = (0u64, 0u64, 0usize);
    let (mut start, mut end) = (0, 0);
    for i in 0..args.warmup + args.n {
        let seq = i as u16;
        // Reclaim the previous transmit before the clock starts.
        net.reclaim_tx();
        let t0 = rdtsc();
        if i == args.warmup {
            start = t0;
        }
        net.send_echo(seq, size, args.seed);
        match net.receive(Some(seq), t0 + REPLY_CYCLES, size, args.seed) {
            Some((t1, good)) => {
                end = t1;
                if !good {
                    bad += 1;
                }
                if i >= args.warmup {
                    samples[got] = t1 - t0;
                    got += 1;
                }
            }
            None => lost += 1,
        }
    }
    let o = Outcome {
        qd: 1,
        warmup: args.warmup,
        verify_failures: bad,
        errors: lost,
        notifies: net.rx.notifies + net.tx.notifies - n0,
        suppressed: net.rx.suppressed + net.tx.suppressed - s0,
        elapsed: end.wrapping_sub(start),
    };
    println!(
        "probe: net: {lost} lost, {bad} bad replies, {} other frames, {} ARP replies sent",
        net.other_frames, net.arp_replies_sent
    );
    report("net-icmp-rr", &mut samples[..got], &o);
    lost != 0 || bad != 0
}
