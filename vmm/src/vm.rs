//! The VM: KVM objects, guest memory, platform devices, vCPU threads, and its lifetime.

use std::fs::File;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use backends::sandbox::{allow, Rule, ThreadKind};

use crate::acpi;
use crate::arch::{boot, cpuid, regs};
use crate::bus::Bus;
use crate::coalesced::CoalescedRing;
use crate::config::{SerialMode, VmConfig};
use crate::devices::cmos::Cmos;
use crate::devices::legacy::{AcpiPm, DebugExit, I8042};
use crate::devices::serial::{spawn_stdin_reader, SerialDevice, SerialOut};
use crate::exit::{Control, ExitHandle, VmExit};
use crate::hotplug::Hotplug;
use crate::interrupt::{InterruptRouter, KvmRouter};
use crate::layout;
use crate::memory::{self, Ram};
use crate::pci::{PciConfigIo, PciConfigMmio, PciRoot, PciWindows};
use crate::plug::{NewDevice, Plugger, Registry};
use crate::stats::ExitStats;
use crate::vcpu::{self, VcpuContext, VcpuCounters};
use crate::watchdog::{self, Probes};
use crate::Error;
use std::os::fd::AsRawFd;

/// What the main thread (the control thread once the VM runs) may call: the control loop
/// (commands and ejects from the other threads), hotplug (a device created from its config
/// as at boot: images, taps and VFIO nodes opened, KVM memory slots, ioeventfds, irqfds and
/// routes, a VFIO group added to the container and the KVM VFIO device, BARs mapped, a
/// vhost-user back-end connected or listened for, the device's threads started), removal
/// and the teardown (threads stopped and joined, vCPUs kicked, images flushed, sockets
/// removed, the exit stats written). Its ioctls are not pinned: a hot-add makes KVM,
/// VFIO and tap ioctls on fds of many kinds; Landlock bounds what it can open.
const CONTROL_SYSCALLS: &[Rule] = &[
    allow(libc::SYS_read),
    allow(libc::SYS_write),
    allow(libc::SYS_readv),
    allow(libc::SYS_writev),
    allow(libc::SYS_pread64),
    allow(libc::SYS_pwrite64),
    allow(libc::SYS_lseek),
    allow(libc::SYS_openat),
    allow(libc::SYS_close),
    allow(libc::SYS_fstat),
    allow(libc::SYS_newfstatat),
    allow(libc::SYS_statx),
    allow(libc::SYS_readlink),
    allow(libc::SYS_readlinkat),
    allow(libc::SYS_getdents64),
    allow(libc::SYS_getcwd),
    allow(libc::SYS_fcntl),
    allow(libc::SYS_dup),
    allow(libc::SYS_dup3),
    allow(libc::SYS_ioctl),
    allow(libc::SYS_eventfd2),
    allow(libc::SYS_epoll_create1),
    allow(libc::SYS_epoll_ctl),
    allow(libc::SYS_epoll_wait),
    allow(libc::SYS_poll),
    allow(libc::SYS_ppoll),
    allow(libc::SYS_socket),
    allow(libc::SYS_connect),
    allow(libc::SYS_bind),
    allow(libc::SYS_listen),
    allow(libc::SYS_accept4),
    allow(libc::SYS_sendmsg),
    allow(libc::SYS_recvmsg),
    allow(libc::SYS_sendto),
    allow(libc::SYS_recvfrom),
    allow(libc::SYS_shutdown),
    allow(libc::SYS_setsockopt),
    allow(libc::SYS_getsockopt),
    allow(libc::SYS_getsockname),
    allow(libc::SYS_pidfd_open),
    allow(libc::SYS_unlink),
    allow(libc::SYS_unlinkat),
    allow(libc::SYS_ftruncate),
    allow(libc::SYS_fallocate),
    allow(libc::SYS_fsync),
    allow(libc::SYS_fdatasync),
    allow(libc::SYS_io_uring_setup),
    allow(libc::SYS_io_uring_register),
    allow(libc::SYS_io_uring_enter),
    allow(libc::SYS_mremap),
    allow(libc::SYS_getpid),
    allow(libc::SYS_gettid),
    allow(libc::SYS_tgkill),
    allow(libc::SYS_prlimit64),
    allow(libc::SYS_getrlimit),
    allow(libc::SYS_getuid),
    allow(libc::SYS_geteuid),
    allow(libc::SYS_uname),
];

/// The main thread's kind, installed last (joined, where it is installed, with the kinds of
/// the threads a hot-add starts from it).
pub const CONTROL: ThreadKind = ThreadKind {
    name: "control",
    syscalls: &[
        CONTROL_SYSCALLS,
        crate::sandbox::COMMON_SYSCALLS,
        crate::sandbox::SPAWN_SYSCALLS,
    ],
};

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |e| Error::Kvm(what, io::Error::from_raw_os_error(e.errno()))
}

/// A VM that has been set up and not started yet.
pub struct Vm {
    vm: Arc<VmFd>,
    /// The PCI root owns the devices; dropped before the VM fd.
    _pci: Arc<Mutex<PciRoot>>,
    /// Creates, places and releases devices while the VM runs (the control thread's).
    plugger: Plugger,
    /// The devices on the bus, for the API.
    registry: Registry,
    /// The GED and slot registers: flushed (its guest-error log) at exit.
    hotplug: Arc<Mutex<Hotplug>>,
    ram: Ram,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    serial: Arc<Mutex<SerialDevice>>,
    exit: ExitHandle,
    exit_rx: std::sync::mpsc::Receiver<Control>,
    vcpus: Vec<kvm_ioctls::VcpuFd>,
    /// KVM's ring of buffered PCI config address writes (absent without KVM support).
    coalesced: Option<Arc<CoalescedRing>>,
    counters: Arc<VcpuCounters>,
    stdin_to_guest: bool,
    /// `--watchdog`: its period.
    watchdog: Option<std::time::Duration>,
    /// `--api-socket`: where, and what `vm.info` says of the configuration as started.
    api: Option<(crate::api::ApiSocket, serde_json::Value, u64)>,
    /// Where the vCPU threads park while the VM is paused.
    pause: Arc<crate::pause::PauseGate>,
}

impl Vm {
    pub fn new(kvm: Kvm, cfg: &VmConfig, opened: crate::sandbox::Opened) -> Result<Vm, Error> {
        let vm = Arc::new(
            kvm.create_vm()
                .map_err(kvm_err("create a VM (KVM_CREATE_VM)"))?,
        );
        let ram = memory::create_ram(cfg.memory)?;
        for (slot, region) in ram.memory.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| Error::Internal(format!("guest RAM has no host mapping: {e}")))?;
            let mr = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping of guest RAM owned by `ram`, which lives as
            // long as the VM (it is dropped after the vCPUs are joined).
            unsafe { vm.set_user_memory_region(mr) }
                .map_err(kvm_err("register guest RAM (KVM_SET_USER_MEMORY_REGION)"))?;
        }
        vm.set_tss_address(layout::KVM_TSS_START as usize)
            .map_err(kvm_err("set the TSS address (KVM_SET_TSS_ADDR)"))?;
        vm.create_irq_chip()
            .map_err(kvm_err("create the in-kernel irqchip (KVM_CREATE_IRQCHIP)"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit)
            .map_err(kvm_err("create the in-kernel PIT (KVM_CREATE_PIT2)"))?;

        let (exit, exit_rx) = ExitHandle::new();
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());

        // COM1 on IRQ 4 through an irqfd.
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        vm.register_irqfd(&serial_irq, layout::COM1_IRQ)
            .map_err(kvm_err("attach the serial interrupt (KVM_IRQFD)"))?;
        let out: SerialOut = match &cfg.serial {
            SerialMode::Stdio => Box::new(io::stdout()),
            SerialMode::Off => Box::new(io::sink()),
            // Opened before Landlock (crate::sandbox::start).
            SerialMode::File(p) => match opened.serial {
                Some(f) => Box::new(f),
                None => Box::new(File::create(p).map_err(|e| Error::SerialFile(p.clone(), e))?),
            },
        };
        let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, out)));
        pio.insert("serial", serial.clone(), layout::COM1_PORT.into(), 8)?;
        pio.insert(
            "i8042",
            Arc::new(Mutex::new(I8042::new(exit.clone()))),
            layout::I8042_PORT.into(),
            5,
        )?;
        let below_4g = cfg.memory.min(layout::LOW_RAM_END);
        pio.insert(
            "cmos",
            Arc::new(Mutex::new(Cmos::new(below_4g, cfg.memory - below_4g))),
            layout::CMOS_PORT.into(),
            2,
        )?;
        pio.insert(
            "debug-exit",
            Arc::new(Mutex::new(DebugExit::new(exit.clone()))),
            layout::DEBUG_EXIT_PORT.into(),
            4,
        )?;
        pio.insert(
            "acpi-pm",
            Arc::new(Mutex::new(AcpiPm::new(exit.clone()))),
            layout::ACPI_SLEEP_CONTROL_PORT.into(),
            2,
        )?;
        let root = Arc::new(Mutex::new(PciRoot::new(
            mmio.clone(),
            pio.clone(),
            PciWindows::for_guest(cfg.memory),
        )));
        let router: Arc<dyn InterruptRouter> = Arc::new(KvmRouter::new(vm.clone()));
        // The GED and the hotplug slot registers: the guest's eject takes the device off
        // the bus at once (it must be gone when `_EJ0` returns) and hands it to the control
        // thread to release.
        let ged_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        vm.register_irqfd(&ged_irq, layout::GED_IRQ)
            .map_err(kvm_err("attach the GED interrupt (KVM_IRQFD)"))?;
        let on_eject = {
            let (root, exit) = (root.clone(), exit.clone());
            Box::new(move |slot: u8| {
                let taken = root.lock().unwrap_or_else(|p| p.into_inner()).remove(slot);
                match taken {
                    Some((id, device)) => {
                        exit.send(Control::Ejected { slot, id, device });
                        true
                    }
                    None => false,
                }
            })
        };
        let hotplug = Arc::new(Mutex::new(Hotplug::new(ged_irq, on_eject)));
        pio.insert(
            "acpi-hotplug",
            hotplug.clone(),
            layout::HOTPLUG_PORT.into(),
            crate::hotplug::LEN,
        )?;
        let registry = Registry::default();
        let mut plugger = Plugger::new(
            vm.clone(),
            &ram,
            root.clone(),
            BarAllocator::new(cfg.memory),
            router.clone(),
            hotplug.clone(),
            registry.clone(),
            cfg.cpus,
            exit.clone(),
        );
        for d in &cfg.disks {
            plugger.add(NewDevice::Disk(d.clone()), false)?;
        }
        for n in &cfg.nets {
            plugger.add(NewDevice::Net(n.clone()), false)?;
        }
        for v in &cfg.vhost_user {
            plugger.add(NewDevice::VhostUser(v.clone()), false)?;
        }
        plugger.assign(&cfg.vfio, false)?;
        pio.insert(
            "pci-config",
            Arc::new(Mutex::new(PciConfigIo::new(root.clone()))),
            layout::PCI_CONFIG_ADDRESS_PORT.into(),
            8,
        )?;
        mmio.insert(
            "pci-ecam",
            Arc::new(Mutex::new(PciConfigMmio::new(root.clone()))),
            layout::PCI_ECAM_START,
            1 << 20,
        )?;

        // Firmware tables and the kernel.
        acpi::write_tables(
            &ram.memory,
            &acpi::AcpiConfig {
                cpus: cfg.cpus,
                memory: cfg.memory,
            },
        )
        .map_err(|e| Error::Internal(format!("cannot write ACPI tables: {e}")))?;
        let entry = boot::load(
            &ram.memory,
            cfg.memory,
            &cfg.kernel,
            cfg.initramfs.as_deref(),
            &cfg.cmdline,
        )?;
        log::info!(
            "kernel {} loaded, {:?} entry at {:#x}",
            cfg.kernel.display(),
            entry.mode,
            entry.entry.0
        );

        let vcpus = create_vcpus(&kvm, &vm, &ram, cfg.cpus, entry)?;
        let api = cfg
            .api_socket
            .clone()
            .map(|s| (s, crate::api::config_json(cfg), cfg.memory));
        let coalesced = vcpus
            .first()
            .and_then(|v| {
                CoalescedRing::for_pci_config_address(&kvm, &vm, v, layout::PCI_CONFIG_ADDRESS_PORT)
            })
            .map(Arc::new);
        Ok(Vm {
            vm,
            _pci: root,
            plugger,
            registry,
            hotplug,
            ram,
            pio,
            mmio,
            serial,
            exit,
            exit_rx,
            vcpus,
            coalesced,
            counters: Arc::new(VcpuCounters::default()),
            stdin_to_guest: cfg.serial == SerialMode::Stdio,
            watchdog: cfg.watchdog,
            api,
            pause: Arc::default(),
        })
    }

    /// `vm.pause` stops the guest's clock (`stop`: KVM_GET_CLOCK, kept in `saved`) and
    /// `vm.resume` restarts it where it stopped (KVM_SET_CLOCK, no REALTIME flag): as QEMU and
    /// Cloud Hypervisor do, the guest sees no time pass while paused.
    fn guest_clock(
        vm: &VmFd,
        saved: &std::sync::Mutex<Option<kvm_bindings::kvm_clock_data>>,
        stop: bool,
    ) -> Result<(), String> {
        let mut saved = saved.lock().unwrap_or_else(|p| p.into_inner());
        if stop {
            *saved = Some(vm.get_clock().map_err(|e| format!("KVM_GET_CLOCK: {e}"))?);
            return Ok(());
        }
        let Some(c) = saved.take() else {
            return Ok(());
        };
        let data = kvm_bindings::kvm_clock_data {
            clock: c.clock,
            ..Default::default()
        };
        vm.set_clock(&data)
            .map_err(|e| format!("KVM_SET_CLOCK: {e}"))
    }

    /// Runs the guest until it stops; returns why, with the exit counters.
    pub fn run(mut self) -> Result<(VmExit, ExitStats), Error> {
        memory::log_huge_page_hint();
        vcpu::install_kick_handler().map_err(Error::Signal)?;
        crate::signals::install(self.exit.clone()).map_err(Error::Signal)?;
        if self.stdin_to_guest {
            spawn_stdin_reader(self.serial.clone()).map_err(Error::Thread)?;
        }
        // The vCPU threads' ids, for the API's pause (it starts first: a socket it cannot
        // bind stops the VM before any guest instruction).
        let vcpu_threads: Arc<std::sync::OnceLock<Vec<libc::pthread_t>>> = Arc::default();
        let api = match self.api.take() {
            Some((socket, config, memory)) => {
                let (pio, mmio, counters) =
                    (self.pio.clone(), self.mmio.clone(), self.counters.clone());
                let ctx = crate::api::ApiContext {
                    config,
                    devices: self.registry.clone(),
                    memory,
                    pause: self.pause.clone(),
                    vcpu_threads: vcpu_threads.clone(),
                    exit: self.exit.clone(),
                    counters: Box::new(move || ExitStats::collect(&pio, &mmio, &counters)),
                    devices_pause: {
                        let root = self._pci.clone();
                        Box::new(move |paused| pause_devices(&root, paused))
                    },
                    clock: {
                        let vm = self.vm.clone();
                        let saved = std::sync::Mutex::new(None);
                        Box::new(move |stop| Self::guest_clock(&vm, &saved, stop))
                    },
                };
                Some(crate::api::ApiServer::start(&socket, ctx)?)
            }
            None => None,
        };
        let stop = self.exit.stopping();
        let probes = self.watchdog.map(|_| {
            let fds: Vec<_> = self.vcpus.iter().map(|v| v.as_raw_fd()).collect();
            Probes::new(&fds)
        });
        let mut threads = Vec::new();
        let gate = Arc::new(crate::sandbox::StartGate::default());
        // A vCPU thread starts the queue threads of the devices its guest driver activates:
        // they inherit its filter.
        let vcpu_kind =
            vcpu::VCPU.with(&[crate::virtio::blk::BLK_QUEUE, crate::virtio::net::NET_QUEUE]);
        for (id, fd) in self.vcpus.into_iter().enumerate() {
            let ctx = VcpuContext {
                id: id as u8,
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
                exit: self.exit.clone(),
                stop: stop.clone(),
                counters: self.counters.clone(),
                coalesced: self.coalesced.clone(),
                mapping_fault: Some(crate::vfio::fault_handler(self.plugger.assigned())),
                probes: probes.clone(),
                pause: self.pause.clone(),
            };
            let (gate, kind) = (gate.clone(), vcpu_kind.clone());
            let t = crate::sandbox::spawn(
                thread::Builder::new().name(format!("vcpu{id}")),
                kind,
                move || {
                    gate.wait();
                    vcpu::run(fd, ctx)
                },
            )
            .map_err(Error::Thread)?;
            threads.push(t);
        }
        {
            use std::os::unix::thread::JoinHandleExt;
            let _ = vcpu_threads.set(threads.iter().map(|t| t.as_pthread_t()).collect());
        }
        let watchdog = match (self.watchdog, probes) {
            (Some(period), Some(probes)) => {
                use std::os::unix::thread::JoinHandleExt;
                let ids: Vec<libc::pthread_t> = threads.iter().map(|t| t.as_pthread_t()).collect();
                let (stop, signal) = (stop.clone(), vcpu::kick_signal());
                let kick = move |i: usize| {
                    if let Some(&t) = ids.get(i) {
                        // SAFETY: `t` is a vCPU thread of this process that is joined only
                        // after this watchdog thread was (see below), so the id is valid.
                        unsafe { libc::pthread_kill(t, signal) };
                    }
                };
                let pause = self.pause.clone();
                Some(
                    crate::sandbox::spawn(
                        thread::Builder::new().name("watchdog".into()),
                        watchdog::WATCHDOG,
                        move || {
                            watchdog::run(probes, period, stop, kick, move || pause.is_paused())
                        },
                    )
                    .map_err(Error::Thread)?,
                )
            }
            _ => None,
        };
        // Every thread of the boot runs: the main thread confines itself last, allowing what
        // the threads a hot-add starts from it need, and only then does the guest start.
        let control = CONTROL.with(&[
            crate::virtio::vhost_user::VHOST_USER,
            crate::virtio::vhost_user::VHOST_USER_WATCHDOG,
            crate::vfio::VFIO_DMA_MAP,
        ]);
        if let Err(e) = crate::sandbox::try_enter(control) {
            self.exit.request(VmExit::VmmError(e.to_string()));
        }
        gate.open();
        // The control thread: devices added and released while the VM runs, until it stops.
        // Every sender lives in a device or vCPU, so recv only fails if all are gone.
        let why = loop {
            match self.exit_rx.recv() {
                Ok(Control::Exit(why)) => break why,
                Ok(Control::Ejected { slot, id, device }) => {
                    self.plugger.release(slot, &id, device)
                }
                Ok(Control::Api(cmd, reply)) => {
                    let _ = reply.send(self.plugger.command(cmd));
                }
                Err(_) => break VmExit::VmmError("all vCPU threads ended".into()),
            }
        };
        stop.store(true, std::sync::atomic::Ordering::Release);
        // The API answers no more (its socket goes) before the devices are torn down.
        drop(api);
        if let Some(w) = watchdog {
            let _ = w.join();
        }
        vcpu::stop_all(&stop, threads);
        // What reached the control thread after the exit: a device the guest ejected meanwhile
        // is released now, while guest memory is still there for its threads to finish on;
        // an API request is told the VM stopped (its sender is gone with the API thread).
        while let Ok(msg) = self.exit_rx.try_recv() {
            match msg {
                Control::Ejected { slot, id, device } => self.plugger.release(slot, &id, device),
                Control::Api(_, reply) => {
                    let _ = reply.send((
                        503,
                        Some(serde_json::json!({ "error": "the VM stopped first" })),
                    ));
                }
                Control::Exit(_) => {}
            }
        }
        self.serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .flush();
        let _ = io::stdout().flush();
        let mut stats = ExitStats::collect(&self.pio, &self.mmio, &self.counters);
        for (name, e) in &self
            .registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_id
        {
            if let Some(n) = &e.notify_exits {
                stats
                    .notify_exits
                    .insert(name.clone(), n.load(std::sync::atomic::Ordering::Relaxed));
            }
        }
        self.hotplug
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .flush_log();
        // Device threads stop (and drain in-flight I/O) before guest memory goes away, and
        // the VM fd only after every vCPU thread has returned.
        let devices = {
            let mut root = self._pci.lock().unwrap_or_else(|p| p.into_inner());
            root.log_config_trace();
            root.flush_fault_log();
            root.take_devices()
        };
        for (name, dev) in devices {
            if Arc::strong_count(&dev) > 1 {
                log::debug!("{name}: still referenced at teardown");
            }
            drop(dev);
        }
        drop(self._pci);
        // The VFIO container (guest RAM unmapped, groups released) before guest RAM.
        drop(self.plugger);
        drop(self.vm);
        drop(self.ram);
        Ok((why, stats))
    }
}

/// How long `vm.pause` waits for the device threads to finish what they hold.
const DEVICE_PAUSE_DEADLINE: Duration = Duration::from_secs(2);

/// Pauses or resumes every device's threads; for a pause, waits until each has finished
/// what it held and parked, at most [`DEVICE_PAUSE_DEADLINE`].
fn pause_devices(root: &Mutex<PciRoot>, paused: bool) -> Result<(), String> {
    let probes = root
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .pause_all(paused);
    let start = std::time::Instant::now();
    loop {
        let waiting: Vec<&str> = probes
            .iter()
            .filter(|(_, done)| !done())
            .map(|(name, _)| name.as_str())
            .collect();
        if waiting.is_empty() {
            return Ok(());
        }
        if start.elapsed() > DEVICE_PAUSE_DEADLINE {
            return Err(format!(
                "{} still finishing requests after {DEVICE_PAUSE_DEADLINE:?} (they park once done)",
                waiting.join(", ")
            ));
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// Bump allocator for 64 KiB-aligned BARs in the 32-bit PCI window.
/// Places BARs: memory BARs in the 32-bit window (64-bit BARs that do not fit there go
/// above RAM), I/O BARs in the I/O window.
pub struct BarAllocator {
    next: u64,
    next64: u64,
    end64: u64,
    next_io: u64,
    /// Ranges given back by removed devices, reused first (same kind and size).
    freed: Vec<(crate::pci::BarKind, u64, u64)>,
}

impl BarAllocator {
    pub fn new(memory: u64) -> Self {
        let (start64, size64) = layout::mmio64_window(memory);
        BarAllocator {
            next: layout::MMIO32_START,
            next64: start64,
            end64: start64 + size64,
            next_io: layout::PCI_IO_START,
            freed: Vec::new(),
        }
    }

    /// Gives back a range [`BarAllocator::alloc_kind`] returned.
    pub fn free(&mut self, kind: crate::pci::BarKind, addr: u64, size: u64) {
        self.freed.push((kind, addr, size));
    }

    /// A range of the 32-bit window; None when it is full.
    fn alloc(&mut self, size: u64) -> Option<u64> {
        let addr = self.next.next_multiple_of(size);
        if addr + size > layout::MMIO32_START + layout::MMIO32_SIZE {
            return None;
        }
        self.next = addr + size;
        Some(addr)
    }

    /// Places a BAR of `kind` and `size` (a power of two), naturally aligned.
    pub fn alloc_kind(&mut self, kind: crate::pci::BarKind, size: u64) -> io::Result<u64> {
        use crate::pci::BarKind;
        let full = |what: &str| io::Error::other(format!("the {what} is full"));
        if let Some(i) = self
            .freed
            .iter()
            .position(|&(k, _, s)| k == kind && s == size)
        {
            return Ok(self.freed.swap_remove(i).1);
        }
        match kind {
            BarKind::Io => {
                let addr = self.next_io.next_multiple_of(size);
                if addr + size > layout::PCI_IO_END {
                    return Err(full("PCI I/O port window"));
                }
                self.next_io = addr + size;
                Ok(addr)
            }
            BarKind::Mem32 => self.alloc(size).ok_or_else(|| full("32-bit PCI window")),
            BarKind::Mem64 => match self.alloc(size) {
                Some(a) => Ok(a),
                None => {
                    let addr = self.next64.next_multiple_of(size);
                    if addr + size > self.end64 {
                        return Err(full("64-bit PCI window"));
                    }
                    self.next64 = addr + size;
                    Ok(addr)
                }
            },
        }
    }
}

fn create_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    ram: &Ram,
    cpus: u8,
    entry: boot::BootEntry,
) -> Result<Vec<kvm_ioctls::VcpuFd>, Error> {
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("read supported CPUID (KVM_GET_SUPPORTED_CPUID)"))?;
    let caps = cpuid::HostCaps {
        tsc_deadline: kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer),
    };
    let mut out = Vec::new();
    for id in 0..cpus {
        let vcpu = vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("create a vCPU (KVM_CREATE_VCPU)"))?;
        let mut entries = supported.as_slice().to_vec();
        cpuid::patch(&mut entries, id, cpus, caps);
        let cpuid = CpuId::from_entries(&entries)
            .map_err(|e| Error::Internal(format!("CPUID table: {e:?}")))?;
        vcpu.set_cpuid2(&cpuid)
            .map_err(kvm_err("set CPUID (KVM_SET_CPUID2)"))?;
        let wanted = regs::boot_msrs();
        let msrs = Msrs::from_entries(&wanted)
            .map_err(|e| Error::Internal(format!("MSR table: {e:?}")))?;
        let set = vcpu
            .set_msrs(&msrs)
            .map_err(kvm_err("set boot MSRs (KVM_SET_MSRS)"))?;
        if set != wanted.len() {
            log::debug!(
                "vcpu {id}: KVM took {set} of {} boot MSRs (index {:#x} refused)",
                wanted.len(),
                wanted[set].index
            );
        }
        vcpu.set_fpu(&regs::boot_fpu())
            .map_err(kvm_err("set FPU state (KVM_SET_FPU)"))?;
        let mut lapic = vcpu
            .get_lapic()
            .map_err(kvm_err("read the local APIC (KVM_GET_LAPIC)"))?;
        regs::set_lint(&mut lapic);
        vcpu.set_lapic(&lapic)
            .map_err(kvm_err("set the local APIC (KVM_SET_LAPIC)"))?;
        if id == 0 {
            let mut sregs = vcpu
                .get_sregs()
                .map_err(kvm_err("read segment registers (KVM_GET_SREGS)"))?;
            regs::setup_sregs(&ram.memory, entry.mode, &mut sregs)
                .map_err(|e| Error::Internal(format!("boot page tables: {e}")))?;
            vcpu.set_sregs(&sregs)
                .map_err(kvm_err("set segment registers (KVM_SET_SREGS)"))?;
            vcpu.set_regs(&regs::boot_regs(entry.mode, entry.entry.0))
                .map_err(kvm_err("set registers (KVM_SET_REGS)"))?;
        }
        out.push(vcpu);
    }
    Ok(out)
}
