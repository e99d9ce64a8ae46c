//! virtio: the PCI transport and the in-VMM devices, which host the `backends` engines on
//! their own threads (one epoll thread per queue or queue pair).

pub mod blk;
pub mod net;
pub mod pci;
pub mod vhost_user;

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use backends::stats::HostCounts;
use virtio_queue::Queue;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub type Memory = GuestMemoryAtomic<GuestMemoryMmap<()>>;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

/// Signals the guest: writes a vector's irqfd (absent when the driver gave no vector).
/// Counted (interrupts and the queue's kicks) in the queue's live counters when the device
/// gave them ([`Irq::count_in`]).
#[derive(Default)]
pub struct Irq(Option<EventFd>, Option<Arc<dyn HostCounts>>);

impl Irq {
    pub fn new(fd: Option<EventFd>) -> Self {
        Irq(fd, None)
    }

    /// Counts every interrupt (and the queue's kicks, [`ActiveQueue::take_kick`]) in `c`.
    pub fn count_in(&mut self, c: Arc<dyn HostCounts>) {
        self.1 = Some(c);
    }

    /// The irqfd, for a process that raises it directly (a vhost-user back-end's call fd).
    pub fn fd(&self) -> Option<&EventFd> {
        self.0.as_ref()
    }

    pub fn trigger(&self) {
        if let Some(fd) = &self.0 {
            // An eventfd write fails only when the counter would overflow: the guest has
            // not taken ~2^64 interrupts, so it is pending anyway.
            let _ = fd.write(1);
            if let Some(c) = &self.1 {
                c.interrupt();
            }
        }
    }
}

/// State a device shares with its transport while active: NEEDS_RESET, the config
/// interrupt, and `vm.pause`.
pub struct DeviceShared {
    needs_reset: AtomicBool,
    config_irq: Irq,
    pub pause: DevicePause,
}

/// `vm.pause` for a device's threads: while set, each stops taking requests, finishes what
/// it holds (a block queue drains its I/O in flight) and parks until the pause ends or the
/// thread is stopped.
#[derive(Default)]
pub struct DevicePause {
    paused: AtomicBool,
    /// Device threads running, and those parked now.
    running: std::sync::atomic::AtomicUsize,
    parked: std::sync::atomic::AtomicUsize,
}

/// A device thread counted as running while this lives.
pub struct Running<'a>(&'a DevicePause);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How often a parked device thread looks at its pause flag.
const PARK_TICK_MS: i32 = 10;

impl DevicePause {
    pub fn set(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    /// A device thread starts: counted until the guard drops.
    pub fn enter(&self) -> Running<'_> {
        self.running.fetch_add(1, Ordering::SeqCst);
        Running(self)
    }

    /// Every running device thread is parked.
    pub fn quiesced(&self) -> bool {
        self.parked.load(Ordering::SeqCst) >= self.running.load(Ordering::SeqCst)
    }

    /// Parks the calling device thread while the pause lasts. True: `stop` fired meanwhile
    /// (the thread returns); false: resumed.
    pub fn park(&self, stop: &EventFd) -> bool {
        self.parked.fetch_add(1, Ordering::SeqCst);
        let stopped = loop {
            if !self.is_paused() {
                break false;
            }
            let mut fds = [libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: one valid pollfd for the length given; `stop` outlives the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, PARK_TICK_MS) };
            if n > 0 && fds[0].revents & libc::POLLIN != 0 {
                break true;
            }
        };
        self.parked.fetch_sub(1, Ordering::SeqCst);
        stopped
    }
}

impl DeviceShared {
    pub fn new(config_irq: Irq) -> Self {
        DeviceShared {
            needs_reset: AtomicBool::new(false),
            config_irq,
            pause: DevicePause::default(),
        }
    }

    /// The device cannot go on: set DEVICE_NEEDS_RESET and tell the driver.
    pub fn set_needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::SeqCst) {
            self.config_irq.trigger();
        }
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }
}

/// A queue the driver enabled, ready for a device thread.
pub struct ActiveQueue {
    pub index: u16,
    pub queue: Queue,
    /// The queue's notify ioeventfd (a duplicate).
    pub kick: EventFd,
    pub irq: Irq,
}

impl ActiveQueue {
    /// Clears the queue's kick eventfd; whether the guest had rung it (counted).
    pub fn take_kick(&self) -> bool {
        let rung = self.kick.read().is_ok();
        if rung {
            if let Some(c) = &self.irq.1 {
                c.kick();
            }
        }
        rung
    }
}

/// Reads a device's live per-queue counters as JSON (any thread, no device lock).
pub type CountersReader = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// What a device gets at DRIVER_OK.
pub struct Activation {
    pub mem: Memory,
    pub acked_features: u64,
    pub queues: Vec<ActiveQueue>,
    pub shared: Arc<DeviceShared>,
}

/// A virtio device as the transport sees it.
pub trait VirtioDevice: Send {
    /// virtio device ID (1 net, 2 block).
    fn device_type(&self) -> u16;
    /// The PCI class code (base, sub, interface) to present.
    fn pci_class(&self) -> u32;
    fn queue_max_sizes(&self) -> Vec<u16>;
    fn features(&self) -> u64;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device threads.
    fn activate(&mut self, a: Activation) -> io::Result<()>;
    /// Stops the device threads and forgets the queues (status 0). A device whose reset
    /// needs another process (vhost-user) only starts it here and must not wait for it:
    /// this runs on a vCPU thread.
    fn reset(&mut self);
    /// A reset started by [`VirtioDevice::reset`] is not done yet: the transport keeps
    /// reporting the old status, so a driver that writes 0 and polls sees 0 only once the
    /// device is really reset.
    fn reset_pending(&self) -> bool {
        false
    }
    /// vm.pause / vm.resume for a device whose requests another process takes (vhost-user):
    /// handed to its control side, never waited for here. In-VMM devices pause their own
    /// threads through [`DeviceShared::pause`].
    fn pause(&mut self, _paused: bool) {}
    /// The reader of the device's live per-queue counters, for `vm.counters`.
    fn counters(&self) -> Option<CountersReader> {
        None
    }
}

/// A device thread's stop signal and handle.
pub struct Worker {
    pub stop: EventFd,
    pub thread: Option<std::thread::JoinHandle<()>>,
}

impl Worker {
    pub fn stop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("a device thread panicked");
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod pci_tests;
