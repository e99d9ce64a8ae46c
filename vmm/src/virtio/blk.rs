//! The in-VMM virtio-blk device: one thread per queue running the `backends` request engine,
//! woken by the queue's ioeventfd and by io_uring completions, and with `poll_us=` polling
//! the queue for a while after work (`backends::poll`).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use backends::block::{
    block_config_space, block_features, BlockBackend, BlockCounters, BlockQueue, BlockStats,
};
use backends::poll::{busy_poll, PollEnd, Poller};
use backends::sandbox::{allow, Rule, ThreadKind};
use backends::QueueError;
use virtio_queue::QueueT;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{Activation, ActiveQueue, CountersReader, DeviceShared, Memory, VirtioDevice, Worker};

const VIRTIO_ID_BLOCK: u16 = 2;
const TOKEN_KICK: u64 = 0;
const TOKEN_COMPLETION: u64 = 1;
const TOKEN_STOP: u64 = 2;

pub struct Block {
    name: String,
    disk: Arc<BlockBackend>,
    queues: u16,
    queue_size: u16,
    /// Busy-poll window after work (zero: sleep on the eventfds at once).
    poll: Duration,
    config: Vec<u8>,
    workers: Vec<Worker>,
    /// Each queue's live counters, kept across resets (the engines of each activation
    /// continue them).
    counters: Vec<Arc<BlockCounters>>,
}

impl Block {
    pub fn new(
        name: &str,
        disk: BlockBackend,
        queues: u16,
        queue_size: u16,
        poll: Duration,
    ) -> Self {
        let config = block_config_space(&disk, queues, queue_size).to_vec();
        Block {
            name: name.to_string(),
            disk: Arc::new(disk),
            queues,
            queue_size,
            poll,
            config,
            workers: Vec::new(),
            counters: (0..queues).map(|_| Arc::default()).collect(),
        }
    }
}

fn add(epoll: &Epoll, fd: i32, token: u64) -> io::Result<()> {
    epoll.ctl(
        ControlOperation::Add,
        fd,
        EpollEvent::new(EventSet::IN, token),
    )
}

/// What a block queue thread may call besides the block engine's own list
/// ([`backends::block::ENGINE_SYSCALLS`], the same as the vhost-user-blk daemon's vring
/// workers, which run the same engine): parking while `vm.pause` lasts
/// (`DevicePause::park` polls its stop eventfd; found by the lab's bench, which pauses the
/// VM that is not measuring).
const BLK_QUEUE_SYSCALLS: &[Rule] = &[allow(libc::SYS_poll)];

/// The in-VMM block device's queue threads.
pub const BLK_QUEUE: ThreadKind = ThreadKind {
    name: "blk-queue",
    syscalls: &[
        backends::block::ENGINE_SYSCALLS,
        BLK_QUEUE_SYSCALLS,
        crate::sandbox::COMMON_SYSCALLS,
    ],
};

/// The thread of one queue: kick -> process_queue, completion -> process_completions; with
/// a polling window, each of them is followed by busy-polling (see [`serve`]).
fn run_queue(
    name: String,
    mut aq: ActiveQueue,
    mut engine: BlockQueue<Memory>,
    stop: EventFd,
    shared: Arc<DeviceShared>,
    poll: Duration,
) {
    let epoll = match Epoll::new() {
        Ok(e) => e,
        Err(e) => {
            log::error!("{name}: epoll: {e}");
            shared.set_needs_reset();
            return;
        }
    };
    let mut setup = add(&epoll, aq.kick.as_raw_fd(), TOKEN_KICK)
        .and_then(|_| add(&epoll, stop.as_raw_fd(), TOKEN_STOP));
    if let Some(fd) = engine.completion_fd() {
        setup = setup.and_then(|_| add(&epoll, fd, TOKEN_COMPLETION));
    }
    if let Err(e) = setup {
        log::error!("{name}: epoll: {e}");
        shared.set_needs_reset();
        return;
    }
    // Set up: confined before the first request.
    crate::sandbox::enter(BLK_QUEUE);
    let mut poller = Poller::new(poll);
    engine.set_polling(poller.enabled());
    let mut events = [EpollEvent::default(); 4];
    let mut broken = false;
    // Requests queued before DRIVER_OK are served at once.
    let mut pending_kick = true;
    let mut pending_completion = false;
    let _running = shared.pause.enter();
    loop {
        if shared.pause.is_paused() {
            // vm.pause: what is in flight completes (and the guest is told), nothing new is
            // taken until the pause ends. (A broken queue takes nothing anyway: it parks.)
            match (!broken).then(|| engine.drain(&mut aq.queue)) {
                Some(Ok(o)) if o.notify => aq.irq.trigger(),
                Some(Err(e)) => {
                    log::warn!("{name}: queue {}: draining for a pause: {e}", aq.index)
                }
                _ => {}
            }
            if shared.pause.park(&stop) {
                return;
            }
            pending_kick = true;
            continue;
        }
        if (pending_kick || pending_completion) && !broken {
            let kick = std::mem::take(&mut pending_kick);
            let completion = std::mem::take(&mut pending_completion);
            match serve(&mut aq, &mut engine, &stop, &mut poller, kick, completion) {
                Ok(Served {
                    end: PollEnd::Idle,
                    more,
                }) => {
                    // The engine stopped at its budget: serve again after a look at the
                    // other events (stop, completions) without sleeping.
                    pending_kick |= more;
                }
                Ok(Served {
                    end: PollEnd::Stopped,
                    ..
                }) => {
                    let _ = engine.drain(&mut aq.queue);
                    return;
                }
                Err(e) => {
                    log::error!("{name}: queue {}: {e}; device needs reset", aq.index);
                    shared.set_needs_reset();
                    broken = true;
                    // Completions are no longer reaped: stop watching their eventfd, or
                    // its level-triggered readiness would spin the thread.
                    if let Some(fd) = engine.completion_fd() {
                        let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
                    }
                }
            }
        }
        // A pause that came while the thread polled (the transport's kick consumed there)
        // is seen before it sleeps.
        if shared.pause.is_paused() {
            continue;
        }
        let timeout = if pending_kick && !broken { 0 } else { -1 };
        let n = match epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("{name}: epoll wait: {e}");
                shared.set_needs_reset();
                return;
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_KICK => {
                    crate::sandbox::selftest_once();
                    aq.take_kick();
                    pending_kick = true;
                    poller.kicked();
                }
                TOKEN_COMPLETION => pending_completion = true,
                TOKEN_STOP => {
                    // Let in-flight requests finish so that the image is consistent and
                    // nothing writes guest memory after the reset.
                    let _ = engine.drain(&mut aq.queue);
                    return;
                }
                _ => {}
            }
        }
    }
}

/// Handles io_uring completions (`completion`) and a kick (`kick`), then, with a polling window, keeps
/// polling the available ring and the completions until the queue has been idle for the
/// poller's window (guest notifications stay off meanwhile), re-enables notifications and checks the ring
/// once more before the thread sleeps. `Stopped`: the stop eventfd fired while polling.
fn serve(
    aq: &mut ActiveQueue,
    engine: &mut BlockQueue<Memory>,
    stop: &EventFd,
    poller: &mut Poller,
    kick: bool,
    completion: bool,
) -> Result<Served, QueueError> {
    let mut more = false;
    if completion {
        let o = engine.process_completions(&mut aq.queue)?;
        if o.notify {
            aq.irq.trigger();
        }
        more |= o.more;
    }
    if kick {
        let o = engine.process_queue(&mut aq.queue)?;
        if o.notify {
            aq.irq.trigger();
        }
        more |= o.more;
    }
    if !poller.enabled() || more {
        return Ok(Served {
            end: PollEnd::Idle,
            more,
        });
    }
    let end = serve_polling(aq, engine, stop, poller)?;
    Ok(Served { end, more: false })
}

/// What [`serve`] did: how it ended, and whether the engine stopped at its budget with
/// work left (the thread serves again before it sleeps).
struct Served {
    end: PollEnd,
    more: bool,
}

/// The polling window of [`serve`].
fn serve_polling(
    aq: &mut ActiveQueue,
    engine: &mut BlockQueue<Memory>,
    stop: &EventFd,
    poller: &mut Poller,
) -> Result<PollEnd, QueueError> {
    loop {
        let end = busy_poll(
            poller.window(),
            // The stop eventfd is non-blocking: a read succeeds only once it was written.
            || stop.read().is_ok(),
            || {
                Ok(match engine.poll_round(&mut aq.queue)? {
                    Some(o) => {
                        if o.notify {
                            aq.irq.trigger();
                        }
                        true
                    }
                    None => {
                        // I/O punted to an io_uring worker needs a CPU: on a small host it may be
                        // this one, which the polling would keep for the whole window.
                        if engine.in_flight() > 0 {
                            std::thread::yield_now();
                        }
                        false
                    }
                })
            },
        )?;
        if end == PollEnd::Stopped {
            return Ok(end);
        }
        // A doorbell rung before the driver saw notifications off is stale: the ring (and
        // the completions) are checked after re-enabling them.
        aq.take_kick();
        if !engine.rearm(&mut aq.queue)? {
            poller.went_idle();
            return Ok(PollEnd::Idle);
        }
        if let Some(o) = engine.poll_round(&mut aq.queue)? {
            if o.notify {
                aq.irq.trigger();
            }
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u16 {
        VIRTIO_ID_BLOCK
    }

    fn pci_class(&self) -> u32 {
        // Mass storage, other.
        0x01_80_00
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.queue_size; usize::from(self.queues)]
    }

    fn features(&self) -> u64 {
        block_features(&self.disk, self.queues)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        backends::read_config(&self.config, offset, data);
    }

    fn activate(&mut self, a: Activation) -> io::Result<()> {
        self.reset();
        for mut aq in a.queues {
            let mut engine = BlockQueue::new(self.disk.clone(), a.mem.clone(), aq.queue.size())
                .map_err(|e| io::Error::other(e.to_string()))?;
            if let Some(c) = self.counters.get(usize::from(aq.index)) {
                engine.set_counters(c.clone());
                aq.irq.count_in(c.clone());
            }
            let stop = EventFd::new(libc::EFD_NONBLOCK)?;
            let stop2 = stop.try_clone()?;
            let name = format!("{} q{}", self.name, aq.index);
            let shared = a.shared.clone();
            let poll = self.poll;
            let tname = format!("{}-q{}", self.name, aq.index);
            let thread = thread::Builder::new()
                .name(tname)
                .spawn(move || run_queue(name, aq, engine, stop2, shared, poll))?;
            self.workers.push(Worker {
                stop,
                thread: Some(thread),
            });
        }
        log::debug!(
            "{}: active, {} queues, engine {:?}",
            self.name,
            self.workers.len(),
            self.disk.engine()
        );
        Ok(())
    }

    fn reset(&mut self) {
        for mut w in self.workers.drain(..) {
            w.stop();
        }
    }

    fn counters(&self) -> Option<CountersReader> {
        let counters = self.counters.clone();
        Some(Arc::new(move || {
            serde_json::json!({
                "queues": counters
                    .iter()
                    .enumerate()
                    .map(|(i, c)| BlockStats::report(i, c))
                    .collect::<Vec<_>>(),
            })
        }))
    }
}

#[cfg(test)]
mod tests {
    //! The device thread with a real image and guest memory, driven by a test "driver" that
    //! rings the doorbell only when the device asks for it (as the probe and Linux do).

    use std::path::PathBuf;
    use std::sync::atomic::Ordering;
    use std::time::Instant;

    use backends::block::{BlockOptions, EngineChoice};
    use virtio_queue::Queue;
    use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

    use super::*;
    use crate::virtio::{Irq, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

    const SIZE: u16 = 16;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const BUFS: u64 = 0x10000;
    const SECTORS: u64 = 128;

    struct Image(PathBuf);

    impl Image {
        /// Sector `i` is filled with byte `i`.
        fn new(name: &str) -> Image {
            let p = std::env::temp_dir().join(format!("vmm-blk-{}-{name}", std::process::id()));
            let data: Vec<u8> = (0..SECTORS).flat_map(|s| [s as u8; 512]).collect();
            std::fs::write(&p, data).unwrap();
            Image(p)
        }
    }

    impl Drop for Image {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    struct Driver {
        dev: Block,
        mem: Memory,
        kick: EventFd,
        shared: Arc<DeviceShared>,
        event_idx: bool,
        avail: u16,
        kicks: u32,
        _img: Image,
    }

    impl Driver {
        fn new(name: &str, poll: Duration, event_idx: bool) -> Driver {
            let img = Image::new(name);
            let disk = BlockBackend::open(&BlockOptions {
                path: img.0.clone(),
                readonly: true,
                direct: false,
                engine: EngineChoice::Auto,
                serial: None,
            })
            .unwrap();
            let mem: Memory = GuestMemoryAtomic::new(
                GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
            );
            let mut q = Queue::new(SIZE).unwrap();
            q.set_desc_table_address(Some(DESC as u32), Some(0));
            q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
            q.set_used_ring_address(Some(USED as u32), Some(0));
            q.set_event_idx(event_idx);
            q.set_ready(true);
            let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let shared = Arc::new(DeviceShared::new(Irq::default()));
            let mut dev = Block::new(name, disk, 1, SIZE, poll);
            let mut features = VIRTIO_F_VERSION_1;
            if event_idx {
                features |= VIRTIO_RING_F_EVENT_IDX;
            }
            dev.activate(Activation {
                mem: mem.clone(),
                acked_features: features,
                queues: vec![ActiveQueue {
                    index: 0,
                    queue: q,
                    kick: kick.try_clone().unwrap(),
                    irq: Irq::new(Some(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
                }],
                shared: shared.clone(),
            })
            .unwrap();
            Driver {
                dev,
                mem,
                kick,
                shared,
                event_idx,
                avail: 0,
                kicks: 0,
                _img: img,
            }
        }

        fn m(&self) -> impl std::ops::Deref<Target = GuestMemoryMmap<()>> {
            self.mem.memory()
        }

        fn used_idx(&self) -> u16 {
            self.m()
                .load(GuestAddress(USED + 2), Ordering::Acquire)
                .unwrap()
        }

        /// Whether the device asks for a doorbell for the entry just published at `old`.
        fn wants_kick(&self, old: u16) -> bool {
            if self.event_idx {
                let event: u16 = self
                    .m()
                    .load(
                        GuestAddress(USED + 4 + 8 * u64::from(SIZE)),
                        Ordering::Acquire,
                    )
                    .unwrap();
                // vring_need_event(event, new, old)
                self.avail.wrapping_sub(event).wrapping_sub(1) < self.avail.wrapping_sub(old)
            } else {
                let flags: u16 = self
                    .m()
                    .load(GuestAddress(USED), Ordering::Acquire)
                    .unwrap();
                flags & 1 == 0
            }
        }

        /// Publishes a 512-byte read of `sector`; rings the doorbell if asked to.
        fn submit(&mut self, sector: u64) -> (u16, u64) {
            let slot = self.avail % SIZE;
            let d = u64::from(slot % (SIZE / 3)) * 3;
            let buf = BUFS + d * 0x400;
            let m = self.m();
            // Header: IN, sector.
            m.write_obj(0u32, GuestAddress(buf)).unwrap();
            m.write_obj(0u32, GuestAddress(buf + 4)).unwrap();
            m.write_obj(sector, GuestAddress(buf + 8)).unwrap();
            m.write_obj(0xffu8, GuestAddress(buf + 0x300)).unwrap();
            let descs = [
                (buf, 16u32, 1u16),
                (buf + 0x100, 512, 1 | 2),
                (buf + 0x300, 1, 2),
            ];
            for (i, (addr, len, flags)) in descs.iter().enumerate() {
                let at = DESC + (d + i as u64) * 16;
                m.write_obj(*addr, GuestAddress(at)).unwrap();
                m.write_obj(*len, GuestAddress(at + 8)).unwrap();
                m.write_obj(*flags, GuestAddress(at + 12)).unwrap();
                m.write_obj((d + i as u64 + 1) as u16, GuestAddress(at + 14))
                    .unwrap();
            }
            m.write_obj(d as u16, GuestAddress(AVAIL + 4 + 2 * u64::from(slot)))
                .unwrap();
            drop(m);
            let old = self.avail;
            self.avail = self.avail.wrapping_add(1);
            self.m()
                .store(self.avail, GuestAddress(AVAIL + 2), Ordering::Release)
                .unwrap();
            std::sync::atomic::fence(Ordering::SeqCst);
            if self.wants_kick(old) {
                self.kicks += 1;
                self.kick.write(1).unwrap();
            }
            (slot, buf)
        }

        /// One read, checked; panics after 10 s without completion.
        fn read(&mut self, sector: u64) {
            let (_, buf) = self.submit(sector);
            let start = Instant::now();
            while self.used_idx() != self.avail {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "request {} (sector {sector}) never completed",
                    self.avail
                );
                std::thread::yield_now();
            }
            let m = self.m();
            assert_eq!(m.read_obj::<u8>(GuestAddress(buf + 0x300)).unwrap(), 0);
            let mut data = [0u8; 512];
            m.read_slice(&mut data, GuestAddress(buf + 0x100)).unwrap();
            assert!(data.iter().all(|&b| b == sector as u8), "sector {sector}");
        }
    }

    /// vm.pause: the queue thread parks (counted as quiesced), a request the driver adds
    /// meanwhile stays untaken however often it rings, and completes after the resume; the
    /// thread still stops at once while parked. With and without a polling window.
    #[test]
    fn a_paused_queue_takes_nothing_and_serves_again_on_resume() {
        for poll in [
            Duration::ZERO,
            Duration::from_micros(200),
            Duration::from_millis(50),
        ] {
            let mut d = Driver::new("pause", poll, false);
            d.read(1);
            d.shared.pause.set(true);
            // The transport wakes the thread with a kick; it parks.
            d.kick.write(1).unwrap();
            let start = Instant::now();
            while !d.shared.pause.quiesced() {
                assert!(start.elapsed() < Duration::from_secs(5), "never parked");
                std::thread::sleep(Duration::from_millis(1));
            }
            let before = d.used_idx();
            d.submit(2);
            d.kick.write(1).unwrap();
            std::thread::sleep(Duration::from_millis(200));
            assert_eq!(d.used_idx(), before, "a request was taken while paused");
            d.shared.pause.set(false);
            let start = Instant::now();
            while d.used_idx() != d.avail {
                assert!(
                    start.elapsed() < Duration::from_secs(5),
                    "not served after resume"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            d.read(3);
            // Parked again, then stopped: the thread ends without a resume.
            d.shared.pause.set(true);
            d.kick.write(1).unwrap();
            while !d.shared.pause.quiesced() {
                std::thread::sleep(Duration::from_millis(1));
            }
            let t = Instant::now();
            d.dev.reset();
            assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        }
    }

    #[test]
    fn without_polling_every_request_rings() {
        for event_idx in [false, true] {
            let mut d = Driver::new("nopoll", Duration::ZERO, event_idx);
            for i in 0..40 {
                d.read(i % SECTORS);
            }
            assert_eq!(d.kicks, 40, "event_idx {event_idx}");
            // vm.counters' view, read from another thread while the device runs: every
            // request, byte, doorbell and interrupt, and a latency for each request.
            let read = d.dev.counters().expect("a block device has counters");
            let q = &read()["queues"][0];
            assert_eq!(q["reads"], 40, "{q}");
            assert_eq!(q["bytes_read"], 40 * 512, "{q}");
            assert_eq!(q["notifications"], 40, "{q}");
            assert_eq!(q["latency_us"]["count"], 40, "{q}");
            let irqs = q["interrupts"].as_u64().unwrap();
            assert!((1..=40).contains(&irqs), "{q}");
        }
    }

    #[test]
    fn polling_serves_requests_without_doorbells_then_rearms() {
        for event_idx in [false, true] {
            // A long window: a loaded test machine must not end it between two requests.
            let mut d = Driver::new("poll", Duration::from_millis(300), event_idx);
            for i in 0..40 {
                d.read(i % SECTORS);
            }
            // The first request rings; the thread then polls with notifications off.
            assert!(d.kicks < 5, "event_idx {event_idx}: {} doorbells", d.kicks);
            // After an idle window the device asks for doorbells again, and serves them.
            std::thread::sleep(Duration::from_millis(1500));
            let kicks = d.kicks;
            d.read(7);
            assert_eq!(d.kicks, kicks + 1, "event_idx {event_idx}: not re-armed");
            for i in 0..10 {
                d.read(i);
            }
        }
    }

    /// A guest whose requests re-arm the ring from the disk forever (the hostile-guest
    /// review's loop): sector `s` holds an available ring with one more entry for head 0
    /// and, right after it in guest memory, the header of a read of sector `s + 1`; the
    /// request's one data buffer covers both. 65536 sectors, so the index wraps with them.
    #[test]
    fn a_self_re_arming_ring_does_not_keep_the_device_thread_from_a_reset() {
        for poll in [Duration::ZERO, Duration::from_millis(50)] {
            const H: u64 = AVAIL + 64;
            const STATUS: u64 = BUFS;
            let p = std::env::temp_dir().join(format!("vmm-blk-{}-rearm", std::process::id()));
            let mut img = vec![0u8; 65536 * 512];
            for (s, sector) in img.chunks_mut(512).enumerate() {
                sector[2..4].copy_from_slice(&((s + 2) as u16).to_le_bytes());
                // Bytes 64..68: type VIRTIO_BLK_T_IN (0).
                sector[72..80].copy_from_slice(&(((s + 1) % 65536) as u64).to_le_bytes());
            }
            std::fs::write(&p, &img).unwrap();
            let _img = Image(p.clone());
            let disk = BlockBackend::open(&BlockOptions {
                path: p,
                readonly: true,
                direct: false,
                // Every read completes on the device thread, so the ring re-arms at once
                // (with io_uring only reads the page cache holds do).
                engine: EngineChoice::Sync,
                serial: None,
            })
            .unwrap();
            let mem: Memory = GuestMemoryAtomic::new(
                GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
            );
            {
                let m = mem.memory();
                let desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
                    let at = DESC + 16 * i;
                    m.write_obj(addr, GuestAddress(at)).unwrap();
                    m.write_obj(len, GuestAddress(at + 8)).unwrap();
                    m.write_obj(flags, GuestAddress(at + 12)).unwrap();
                    m.write_obj(next, GuestAddress(at + 14)).unwrap();
                };
                desc(0, H, 16, 1, 1);
                desc(1, AVAIL, 512, 1 | 2, 2);
                desc(2, STATUS, 1, 2, 0);
                m.write_obj(0u32, GuestAddress(H)).unwrap(); // VIRTIO_BLK_T_IN
                m.write_obj(0u64, GuestAddress(H + 8)).unwrap();
                m.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
            }
            let mut q = Queue::new(SIZE).unwrap();
            q.set_desc_table_address(Some(DESC as u32), Some(0));
            q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
            q.set_used_ring_address(Some(USED as u32), Some(0));
            q.set_ready(true);
            let shared = Arc::new(DeviceShared::new(Irq::default()));
            let mut dev = Block::new("rearm", disk, 1, SIZE, poll);
            dev.activate(Activation {
                mem: mem.clone(),
                acked_features: VIRTIO_F_VERSION_1,
                queues: vec![ActiveQueue {
                    index: 0,
                    queue: q,
                    kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                    irq: Irq::default(),
                }],
                shared,
            })
            .unwrap();
            let used = || -> u16 { mem.memory().read_obj(GuestAddress(USED + 2)).unwrap() };
            // The loop runs (the guest keeps re-arming): the used index keeps moving. Up to
            // 5 s to see it move, as another process may have the CPUs.
            let (a, start) = (used(), Instant::now());
            while used() == a && start.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(10));
            }
            assert_ne!(
                a,
                used(),
                "poll {poll:?}: the loop runs (the guest keeps re-arming)"
            );
            // The reset on another thread, so that a device thread that never looks at its
            // stop signal fails the test instead of hanging it.
            let (tx, rx) = std::sync::mpsc::channel();
            let t = std::thread::spawn(move || {
                dev.reset();
                let _ = tx.send(());
            });
            let start_reset = Instant::now();
            assert!(
                rx.recv_timeout(Duration::from_secs(5)).is_ok(),
                "poll {poll:?}: the reset did not return while the ring re-arms itself"
            );
            eprintln!(
                "poll {poll:?}: reset returned after {:?} ({} requests/s before)",
                start_reset.elapsed(),
                u64::from(used().wrapping_sub(a)) * 1000
                    / start.elapsed().as_millis().max(1) as u64
            );
            t.join().unwrap();
            let after = used();
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(after, used(), "nothing runs after the reset");
        }
    }

    #[test]
    fn reset_ends_polling_promptly() {
        let mut d = Driver::new("stop", Duration::from_secs(1), false);
        d.read(3);
        // The guest keeps the queue busy: the window would never end on its own.
        let start = Instant::now();
        d.dev.reset();
        assert!(
            start.elapsed() < Duration::from_millis(500),
            "reset took {:?}",
            start.elapsed()
        );
    }

    #[test]
    fn garbage_avail_index_while_polling_needs_reset() {
        let mut d = Driver::new("garbage", Duration::from_secs(1), false);
        d.read(1);
        // An available index more than a queue size ahead: the device gives up on the queue
        // (NEEDS_RESET) instead of spinning on it or panicking.
        d.m()
            .store(
                d.avail.wrapping_add(1000),
                GuestAddress(AVAIL + 2),
                Ordering::Release,
            )
            .unwrap();
        let start = Instant::now();
        while !d.shared.needs_reset() {
            assert!(start.elapsed() < Duration::from_secs(10), "no NEEDS_RESET");
            std::thread::sleep(Duration::from_millis(1));
        }
        // The broken queue's thread sleeps: it does not spin on a completion eventfd.
        let before = thread_cpu_ticks("garbage-q0");
        std::thread::sleep(Duration::from_millis(500));
        let spent = thread_cpu_ticks("garbage-q0") - before;
        assert!(spent < 10, "the queue thread used {spent} ticks in 500 ms");
        let start = Instant::now();
        d.dev.reset();
        assert!(start.elapsed() < Duration::from_millis(500));
    }

    /// utime + stime (clock ticks) of this process's thread named `name`.
    fn thread_cpu_ticks(name: &str) -> u64 {
        for t in std::fs::read_dir("/proc/self/task").unwrap() {
            let dir = t.unwrap().path();
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            if comm.trim_end() != name {
                continue;
            }
            let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
            // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            let f: Vec<&str> = rest.split(' ').collect();
            return f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        }
        panic!("no thread named {name}");
    }
}
