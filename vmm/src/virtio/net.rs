//! The in-VMM virtio-net device on a tap: one thread per queue pair running the `backends`
//! RX/TX engine, woken by the queues' ioeventfds and the tap; the control queue is served by
//! the first pair's thread. With `poll_us=`, a pair's thread keeps polling its TX queue and
//! the tap for a while after work (`backends::poll`).

use backends::sandbox::{allow, allow_if, Rule, ThreadKind};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use backends::net::{
    net_config_space, net_features, CtrlQueue, NetCounters, NetOptions, NetQueuePair, RxWait, Tap,
};
use backends::poll::{busy_poll, PollEnd, Poller};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{Activation, ActiveQueue, CountersReader, DeviceShared, Memory, VirtioDevice, Worker};

const VIRTIO_ID_NET: u16 = 1;
/// VIRTIO_NET_F_MQ: without it a driver uses one pair, and its control queue is queue 2.
const VIRTIO_NET_F_MQ: u64 = 1 << 22;
const TOKEN_RX_KICK: u64 = 0;
const TOKEN_TX_KICK: u64 = 1;
const TOKEN_TAP: u64 = 2;
const TOKEN_STOP: u64 = 3;
const TOKEN_CTRL: u64 = 4;

pub struct Net {
    name: String,
    taps: Vec<Arc<Tap>>,
    opts: NetOptions,
    queue_size: u16,
    poll: Duration,
    config: Vec<u8>,
    workers: Vec<Worker>,
    /// Each pair's live counters, kept across resets.
    counters: Vec<Arc<NetCounters>>,
    /// Queues a driver started that it has no use for (rate-limited: a guest can reset and
    /// start the device in a loop).
    faults: backends::ratelimit::GuestErrorLog<1>,
}

impl Net {
    pub fn new(name: &str, taps: Vec<Tap>, mac: [u8; 6], queue_size: u16, poll: Duration) -> Self {
        let opts = NetOptions {
            mac,
            queue_pairs: taps.len() as u16,
            mtu: None,
        };
        let config = net_config_space(&opts).to_vec();
        Net {
            name: name.to_string(),
            counters: taps.iter().map(|_| Arc::default()).collect(),
            taps: taps.into_iter().map(Arc::new).collect(),
            opts,
            queue_size,
            poll,
            config,
            workers: Vec::new(),
            faults: backends::ratelimit::GuestErrorLog::new(name),
        }
    }
}

struct PairThread {
    name: String,
    rx: ActiveQueue,
    tx: ActiveQueue,
    ctrl: Option<(ActiveQueue, CtrlQueue<Memory>)>,
    /// With the control queue: every pair's tap queue, attached or detached as the driver
    /// sets the pairs it uses.
    all_taps: Vec<Arc<Tap>>,
    engine: NetQueuePair<Memory, Arc<Tap>>,
    stop: EventFd,
    shared: Arc<DeviceShared>,
    /// Busy-poll window after work (zero: sleep on the eventfds at once).
    poll: Duration,
}

/// The tap ioctls a queue pair thread makes: attaching or detaching the tap queues when the
/// driver changes the number of pairs (control queue, pair 0), reading the tap's flags.
const TAP_IOCTLS: &[Rule] = &[
    allow_if(libc::SYS_ioctl, &[(1, libc::TUNSETQUEUE)]),
    allow_if(libc::SYS_ioctl, &[(1, libc::TUNGETIFF)]),
    allow_if(libc::SYS_ioctl, &[(1, libc::TUNSETOFFLOAD)]),
];

/// What a queue pair thread may call: waiting on its epoll (kicks, the tap's readiness,
/// stop), eventfds, frames read from and written to the tap, the tap ioctls, parking
/// while `vm.pause` lasts (`DevicePause::park` polls its stop eventfd), and a thread's
/// exit. The same as the vhost-user-net daemon's workers, which run the same engine, plus
/// the parking.
const NET_QUEUE_SYSCALLS: &[Rule] = &[
    allow(libc::SYS_poll),
    allow(libc::SYS_epoll_wait),
    allow(libc::SYS_epoll_pwait),
    allow(libc::SYS_epoll_ctl),
    allow(libc::SYS_read),
    allow(libc::SYS_readv),
    allow(libc::SYS_write),
    allow(libc::SYS_writev),
    allow(libc::SYS_close),
    allow(libc::SYS_getrandom),
];

/// The in-VMM NIC's queue pair threads.
pub const NET_QUEUE: ThreadKind = ThreadKind {
    name: "net-queue",
    syscalls: &[
        NET_QUEUE_SYSCALLS,
        TAP_IOCTLS,
        crate::sandbox::COMMON_SYSCALLS,
    ],
};

impl PairThread {
    fn run(mut self) {
        if let Err(e) = self.serve() {
            log::error!("{}: {e}; device needs reset", self.name);
            self.shared.set_needs_reset();
        }
        let s = self.engine.stats();
        log::info!(
            "{}: rx {} frames {} bytes ({} dropped, {} waits for buffers), tx {} frames {} bytes ({} dropped, {} tap full)",
            self.name,
            s.rx_frames,
            s.rx_bytes,
            s.rx_dropped,
            s.rx_no_buffers,
            s.tx_frames,
            s.tx_bytes,
            s.tx_dropped,
            s.tx_tap_full
        );
    }

    fn serve(&mut self) -> io::Result<()> {
        let epoll = Epoll::new()?;
        let tap_fd = self.engine.tap().as_raw_fd();
        let add = |fd: i32, ev: EventSet, token: u64| {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(ev, token))
        };
        add(self.rx.kick.as_raw_fd(), EventSet::IN, TOKEN_RX_KICK)?;
        add(self.tx.kick.as_raw_fd(), EventSet::IN, TOKEN_TX_KICK)?;
        add(self.stop.as_raw_fd(), EventSet::IN, TOKEN_STOP)?;
        if let Some((q, _)) = &self.ctrl {
            add(q.kick.as_raw_fd(), EventSet::IN, TOKEN_CTRL)?;
        }
        add(tap_fd, EventSet::IN, TOKEN_TAP)?;
        // The tap's interest: IN while RX can take frames, OUT while TX waits for room.
        let mut tap = TapWatch {
            epoll: &epoll,
            fd: tap_fd,
            tap_in: true,
            tap_out: false,
        };
        let mut poller = Poller::new(self.poll);
        self.engine.set_polling(poller.enabled());
        // For the polling loop, which borrows `self` whole.
        let stop = self.stop.try_clone()?;
        // Set up: confined before the first frame.
        crate::sandbox::enter(NET_QUEUE);
        let mut events = [EpollEvent::default(); 8];
        let (mut do_rx, mut do_tx, mut do_ctrl) = (true, true, true);
        let shared = self.shared.clone();
        let _running = shared.pause.enter();
        loop {
            if shared.pause.is_paused() {
                // vm.pause: no frame in or out until the pause ends (the tap keeps them).
                if shared.pause.park(&stop) {
                    return Ok(());
                }
                (do_rx, do_tx, do_ctrl) = (true, true, true);
                continue;
            }
            if do_tx {
                // The TX budget ran out with chains left: serve them again after the events.
                do_tx = self.tx_round(&mut tap)?.1;
            }
            if do_rx {
                do_rx = self.rx_round(&mut tap)?.1;
            }
            if do_ctrl {
                do_ctrl = false;
                if let Some((q, ctrl)) = &mut self.ctrl {
                    let o = ctrl.process(&mut q.queue).map_err(err)?;
                    if o.queue.notify {
                        q.irq.trigger();
                    }
                    do_ctrl = o.queue.more;
                    if let Some(pairs) = o.vq_pairs {
                        log::debug!("{}: driver uses {pairs} queue pairs", self.name);
                        use_pairs(&self.name, &self.all_taps, usize::from(pairs));
                    }
                }
            }
            // Work left over (a budget ran out): look at the events without sleeping, so
            // that stop and the other queues are seen between rounds.
            let pending = do_rx || do_tx || do_ctrl;
            if poller.enabled() && !pending {
                match self.poll_pair(&mut tap, &stop, poller.window())? {
                    PollEnd::Stopped => return Ok(()),
                    PollEnd::Idle => {
                        // A TX doorbell rung before the driver saw notifications off is
                        // stale: the ring is checked after re-enabling them.
                        self.tx.take_kick();
                        if self.engine.rearm_tx(&mut self.tx.queue).map_err(err)? {
                            do_tx = true;
                            continue;
                        }
                        poller.went_idle();
                    }
                }
            }
            // A pause that came while the pair polled (a kick consumed there) is seen before
            // the thread sleeps.
            if shared.pause.is_paused() {
                continue;
            }
            let n = match epoll.wait(if pending { 0 } else { -1 }, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_RX_KICK => {
                        log::trace!("{}: rx kick", self.name);
                        self.rx.take_kick();
                        do_rx = true;
                    }
                    TOKEN_TX_KICK => {
                        self.tx.take_kick();
                        do_tx = true;
                        poller.kicked();
                    }
                    TOKEN_CTRL => {
                        if let Some((q, _)) = &self.ctrl {
                            let _ = q.kick.read();
                        }
                        do_ctrl = true;
                    }
                    TOKEN_TAP => {
                        let set = ev.event_set();
                        if set.contains(EventSet::IN) {
                            do_rx = true;
                            poller.woken();
                        }
                        if set.contains(EventSet::OUT) {
                            do_tx = true;
                        }
                    }
                    TOKEN_STOP => return Ok(()),
                    _ => {}
                }
            }
        }
    }

    /// Sends the TX queue's frames; returns (whether any chain was used, the TX budget ran
    /// out with chains left).
    fn tx_round(&mut self, tap: &mut TapWatch) -> io::Result<(bool, bool)> {
        let o = self.engine.process_tx(&mut self.tx.queue).map_err(err)?;
        if o.queue.notify {
            self.tx.irq.trigger();
        }
        tap.set(tap.tap_in, o.tap_full)?;
        Ok((o.queue.used > 0, o.queue.more))
    }

    /// Delivers tap frames to the RX queue; returns (work done, the RX budget ran out).
    fn rx_round(&mut self, tap: &mut TapWatch) -> io::Result<(bool, bool)> {
        let o = self.engine.process_rx(&mut self.rx.queue).map_err(err)?;
        if o.queue.notify {
            self.rx.irq.trigger();
        }
        log::trace!(
            "{}: rx {} frames, used {}, notify {}, wait {:?}, pending {}",
            self.name,
            o.frames,
            o.queue.used,
            o.queue.notify,
            o.wait,
            self.engine.rx_pending()
        );
        let want_in = match o.wait {
            RxWait::TapEmpty | RxWait::Budget => true,
            RxWait::GuestBuffers => false,
        };
        tap.set(want_in, tap.tap_out)?;
        Ok((o.frames > 0 || o.queue.used > 0, o.wait == RxWait::Budget))
    }

    /// Busy-polls the TX ring and (while RX can take frames) the tap until both were idle
    /// for `window`, or the stop eventfd fires. TX notifications stay off meanwhile.
    fn poll_pair(
        &mut self,
        tap: &mut TapWatch,
        stop: &EventFd,
        window: Duration,
    ) -> io::Result<PollEnd> {
        busy_poll(
            window,
            // The stop eventfd is non-blocking: a read succeeds only once it was written.
            || stop.read().is_ok(),
            || {
                let mut work = false;
                if self.engine.tx_pending(&self.tx.queue).map_err(err)? {
                    work |= self.tx_round(tap)?.0;
                }
                if tap.tap_in {
                    work |= self.rx_round(tap)?.0;
                }
                Ok(work)
            },
        )
    }
}

fn err(e: backends::QueueError) -> io::Error {
    io::Error::other(e.to_string())
}

/// The tap's epoll interest, changed only when it differs.
struct TapWatch<'a> {
    epoll: &'a Epoll,
    fd: i32,
    tap_in: bool,
    tap_out: bool,
}

impl TapWatch<'_> {
    fn set(&mut self, tap_in: bool, tap_out: bool) -> io::Result<()> {
        if (tap_in, tap_out) == (self.tap_in, self.tap_out) {
            return Ok(());
        }
        self.tap_in = tap_in;
        self.tap_out = tap_out;
        let mut ev = EventSet::empty();
        if tap_in {
            ev |= EventSet::IN;
        }
        if tap_out {
            ev |= EventSet::OUT;
        }
        self.epoll.ctl(
            ControlOperation::Modify,
            self.fd,
            EpollEvent::new(ev, TOKEN_TAP),
        )
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u16 {
        VIRTIO_ID_NET
    }

    fn pci_class(&self) -> u32 {
        // Network controller, Ethernet.
        0x02_00_00
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        // rx0, tx0, rx1, tx1, ..., ctrl.
        vec![self.queue_size; self.taps.len() * 2 + 1]
    }

    fn features(&self) -> u64 {
        net_features(&self.opts)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        backends::read_config(&self.config, offset, data);
    }

    fn activate(&mut self, a: Activation) -> io::Result<()> {
        self.reset();
        // Without MQ the driver has one pair and its control queue is queue 2, whatever
        // the device offers; with it, the control queue follows every pair offered.
        let pairs = if a.acked_features & VIRTIO_NET_F_MQ != 0 {
            self.taps.len()
        } else {
            1
        };
        let mut by_index: Vec<Option<ActiveQueue>> = (0..pairs * 2 + 1).map(|_| None).collect();
        for q in a.queues {
            let i = usize::from(q.index);
            match by_index.get_mut(i) {
                Some(slot) => *slot = Some(q),
                None => {
                    self.faults.record(
                        0,
                        format_args!(
                            "the driver started queue {i}, which it has not got with {pairs} \
                             pair(s): ignored"
                        ),
                    );
                }
            }
        }
        let mut ctrl = by_index
            .get_mut(pairs * 2)
            .and_then(Option::take)
            .map(|q| (q, CtrlQueue::new(a.mem.clone(), self.taps.len() as u16)));
        // One pair until the driver sets more on the control queue.
        use_pairs(&self.name, &self.taps, 1);
        for (p, tap) in self.taps.iter().enumerate().take(pairs) {
            let (Some(mut rx), Some(mut tx)) = (by_index[p * 2].take(), by_index[p * 2 + 1].take())
            else {
                // The driver enabled fewer pairs than offered.
                continue;
            };
            tap.set_offloads(a.acked_features)
                .map_err(|e| io::Error::other(e.to_string()))?;
            let stop = EventFd::new(libc::EFD_NONBLOCK)?;
            let mut engine = NetQueuePair::new(tap.clone(), a.mem.clone(), a.acked_features);
            if let Some(c) = self.counters.get(p) {
                engine.set_counters(c.clone());
                rx.irq.count_in(c.rx.clone());
                tx.irq.count_in(c.tx.clone());
            }
            let t = PairThread {
                name: format!("{} pair{p}", self.name),
                rx,
                tx,
                ctrl: if p == 0 { ctrl.take() } else { None },
                all_taps: if p == 0 {
                    self.taps.clone()
                } else {
                    Vec::new()
                },
                engine,
                stop: stop.try_clone()?,
                shared: a.shared.clone(),
                poll: self.poll,
            };
            let thread = thread::Builder::new()
                .name(format!("{}-p{p}", self.name))
                .spawn(move || t.run())?;
            self.workers.push(Worker {
                stop,
                thread: Some(thread),
            });
        }
        Ok(())
    }

    fn reset(&mut self) {
        for mut w in self.workers.drain(..) {
            w.stop();
        }
        use_pairs(&self.name, &self.taps, self.taps.len());
    }

    fn counters(&self) -> Option<CountersReader> {
        let counters = self.counters.clone();
        Some(Arc::new(move || {
            let mut queues = Vec::new();
            for (p, c) in counters.iter().enumerate() {
                queues.push(serde_json::to_value(c.rx_report(2 * p)).unwrap_or_default());
                queues.push(serde_json::to_value(c.tx_report(2 * p + 1)).unwrap_or_default());
            }
            serde_json::json!({ "queues": queues })
        }))
    }
}

/// Only the tap queues of the pairs the driver uses stay attached (`backends::net::
/// use_pairs`): the kernel would steer a share of the incoming frames to the others, where
/// no ring takes them.
fn use_pairs(name: &str, taps: &[Arc<Tap>], n: usize) {
    if let Err((q, e)) = backends::net::use_pairs(taps, n) {
        log::warn!("{name}: cannot attach or detach tap queue {q} for {n} pair(s) in use: {e}");
    }
}
