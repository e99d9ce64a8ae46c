//! The in-VMM virtio-blk device: one thread per queue running the `backends` request engine,
//! woken by the queue's ioeventfd and by io_uring completions.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread;

use backends::block::{block_config_space, block_features, BlockBackend, BlockQueue};
use virtio_queue::QueueT;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{Activation, ActiveQueue, DeviceShared, Memory, VirtioDevice, Worker};

const VIRTIO_ID_BLOCK: u16 = 2;
const TOKEN_KICK: u64 = 0;
const TOKEN_COMPLETION: u64 = 1;
const TOKEN_STOP: u64 = 2;

pub struct Block {
    name: String,
    disk: Arc<BlockBackend>,
    queues: u16,
    queue_size: u16,
    config: Vec<u8>,
    workers: Vec<Worker>,
}

impl Block {
    pub fn new(name: &str, disk: BlockBackend, queues: u16, queue_size: u16) -> Self {
        let config = block_config_space(&disk, queues, queue_size).to_vec();
        Block {
            name: name.to_string(),
            disk: Arc::new(disk),
            queues,
            queue_size,
            config,
            workers: Vec::new(),
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

/// The thread of one queue: kick -> process_queue, completion -> process_completions.
fn run_queue(
    name: String,
    mut aq: ActiveQueue,
    mut engine: BlockQueue<Memory>,
    stop: EventFd,
    shared: Arc<DeviceShared>,
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
    let mut events = [EpollEvent::default(); 4];
    let mut broken = false;
    // Requests queued before DRIVER_OK are served at once.
    let mut pending_kick = true;
    loop {
        if pending_kick && !broken {
            pending_kick = false;
            match engine.process_queue(&mut aq.queue) {
                Ok(o) if o.notify => aq.irq.trigger(),
                Ok(_) => {}
                Err(e) => {
                    log::error!("{name}: queue {}: {e}; device needs reset", aq.index);
                    shared.set_needs_reset();
                    broken = true;
                }
            }
        }
        let n = match epoll.wait(-1, &mut events) {
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
                    let _ = aq.kick.read();
                    pending_kick = true;
                }
                TOKEN_COMPLETION if !broken => match engine.process_completions(&mut aq.queue) {
                    Ok(o) if o.notify => aq.irq.trigger(),
                    Ok(_) => {}
                    Err(e) => {
                        log::error!("{name}: queue {}: {e}; device needs reset", aq.index);
                        shared.set_needs_reset();
                        broken = true;
                    }
                },
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
        for aq in a.queues {
            let engine = BlockQueue::new(self.disk.clone(), a.mem.clone(), aq.queue.size())
                .map_err(|e| io::Error::other(e.to_string()))?;
            let stop = EventFd::new(libc::EFD_NONBLOCK)?;
            let stop2 = stop.try_clone()?;
            let name = format!("{} q{}", self.name, aq.index);
            let shared = a.shared.clone();
            let tname = format!("{}-q{}", self.name, aq.index);
            let thread = thread::Builder::new()
                .name(tname)
                .spawn(move || run_queue(name, aq, engine, stop2, shared))?;
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
}
