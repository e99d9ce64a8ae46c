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

use crate::acpi;
use crate::arch::{boot, cpuid, regs};
use crate::bus::Bus;
use crate::coalesced::CoalescedRing;
use crate::config::{SerialMode, VmConfig};
use crate::devices::cmos::Cmos;
use crate::devices::legacy::{AcpiPm, DebugExit, I8042};
use crate::devices::serial::{spawn_stdin_reader, SerialDevice, SerialOut};
use crate::exit::{ExitHandle, VmExit};
use crate::interrupt::{InterruptRouter, KvmRouter};
use crate::layout;
use crate::memory::{self, Ram};
use crate::pci::{PciConfigIo, PciConfigMmio, PciRoot, PciWindows};
use crate::stats::ExitStats;
use crate::vcpu::{self, VcpuContext, VcpuCounters};
use crate::virtio::blk::Block;
use crate::virtio::net::Net;
use crate::virtio::pci::{IoEvents, KvmIoEvents, VirtioPciDevice};
use crate::virtio::{self, Memory, VirtioDevice};
use crate::watchdog::{self, Probes};
use crate::Error;
use backends::block::{BlockBackend, BlockOptions, EngineChoice};
use backends::net::Tap;
use std::os::fd::AsRawFd;
use std::sync::atomic::AtomicU64;
use vm_memory::GuestMemoryAtomic;

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |e| Error::Kvm(what, io::Error::from_raw_os_error(e.errno()))
}

/// A VM that has been set up and not started yet.
pub struct Vm {
    vm: Arc<VmFd>,
    /// The PCI root owns the devices; dropped before the VM fd.
    _pci: Arc<Mutex<PciRoot>>,
    /// VFIO container of assigned devices: released after them, before guest RAM.
    _vfio: Option<crate::vfio::Assigned>,
    notify_exits: Vec<(String, Arc<AtomicU64>)>,
    ram: Ram,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    serial: Arc<Mutex<SerialDevice>>,
    exit: ExitHandle,
    exit_rx: std::sync::mpsc::Receiver<VmExit>,
    vcpus: Vec<kvm_ioctls::VcpuFd>,
    /// KVM's ring of buffered PCI config address writes (absent without KVM support).
    coalesced: Option<Arc<CoalescedRing>>,
    counters: Arc<VcpuCounters>,
    stdin_to_guest: bool,
    /// `--watchdog`: its period.
    watchdog: Option<std::time::Duration>,
    /// `--api-socket`: where, and what `vm.info` says (the configuration as started, each
    /// device's model and guest PCI address).
    api: Option<(
        crate::api::ApiSocket,
        serde_json::Value,
        Vec<crate::api::DeviceNode>,
        u64,
    )>,
    /// Where the vCPU threads park while the VM is paused.
    pause: Arc<crate::pause::PauseGate>,
}

impl Vm {
    pub fn new(kvm: Kvm, cfg: &VmConfig) -> Result<Vm, Error> {
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
            SerialMode::File(p) => {
                Box::new(File::create(p).map_err(|e| Error::SerialFile(p.clone(), e))?)
            }
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
        let mut bars = BarAllocator::new(cfg.memory);
        let notify_exits = add_virtio_devices(cfg, &vm, &ram, &root, &mut bars, &router)?;
        let vfio = crate::vfio::assign(
            &cfg.vfio, &vm, &ram, &root, &mut bars, &router, cfg.memory, &exit,
        )?;
        let intx_routes = vfio.as_ref().map(|v| v.routes.clone()).unwrap_or_default();
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
                intx_routes,
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
        let api = cfg.api_socket.clone().map(|s| {
            let devices = root
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .slots()
                .into_iter()
                .map(|(slot, id)| crate::api::DeviceNode {
                    model: crate::api::model_of(cfg, &id).to_string(),
                    pci_bdf: format!("0000:00:{slot:02x}.0"),
                    id,
                })
                .collect();
            (s, crate::api::config_json(cfg), devices, cfg.memory)
        });
        let coalesced = vcpus
            .first()
            .and_then(|v| {
                CoalescedRing::for_pci_config_address(&kvm, &vm, v, layout::PCI_CONFIG_ADDRESS_PORT)
            })
            .map(Arc::new);
        Ok(Vm {
            vm,
            _pci: root,
            _vfio: vfio,
            notify_exits,
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
            Some((socket, config, devices, memory)) => {
                let (pio, mmio, counters) =
                    (self.pio.clone(), self.mmio.clone(), self.counters.clone());
                let notify = self.notify_exits.clone();
                let ctx = crate::api::ApiContext {
                    config,
                    devices,
                    memory,
                    pause: self.pause.clone(),
                    vcpu_threads: vcpu_threads.clone(),
                    exit: self.exit.clone(),
                    counters: Box::new(move || {
                        let mut s = ExitStats::collect(&pio, &mmio, &counters);
                        for (name, n) in &notify {
                            s.notify_exits
                                .insert(name.clone(), n.load(std::sync::atomic::Ordering::Relaxed));
                        }
                        s
                    }),
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
        for (id, fd) in self.vcpus.into_iter().enumerate() {
            let ctx = VcpuContext {
                id: id as u8,
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
                exit: self.exit.clone(),
                stop: stop.clone(),
                counters: self.counters.clone(),
                coalesced: self.coalesced.clone(),
                mapping_fault: self._vfio.as_ref().map(|v| v.fault_handler()),
                probes: probes.clone(),
                pause: self.pause.clone(),
            };
            let t = thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || vcpu::run(fd, ctx))
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
                Some(
                    thread::Builder::new()
                        .name("watchdog".into())
                        .spawn({
                            let pause = self.pause.clone();
                            move || {
                                watchdog::run(probes, period, stop, kick, move || pause.is_paused())
                            }
                        })
                        .map_err(Error::Thread)?,
                )
            }
            _ => None,
        };
        // Every sender lives in a device or vCPU, so recv only fails if all are gone.
        let why = self
            .exit_rx
            .recv()
            .unwrap_or_else(|_| VmExit::VmmError("all vCPU threads ended".into()));
        stop.store(true, std::sync::atomic::Ordering::Release);
        // The API answers no more (its socket goes) before the devices are torn down.
        drop(api);
        if let Some(w) = watchdog {
            let _ = w.join();
        }
        vcpu::stop_all(&stop, threads);
        self.serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .flush();
        let _ = io::stdout().flush();
        let mut stats = ExitStats::collect(&self.pio, &self.mmio, &self.counters);
        for (name, n) in &self.notify_exits {
            stats
                .notify_exits
                .insert(name.clone(), n.load(std::sync::atomic::Ordering::Relaxed));
        }
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
        drop(self._vfio);
        drop(self.vm);
        drop(self.ram);
        Ok((why, stats))
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
}

impl BarAllocator {
    pub fn new(memory: u64) -> Self {
        let (start64, size64) = layout::mmio64_window(memory);
        BarAllocator {
            next: layout::MMIO32_START,
            next64: start64,
            end64: start64 + size64,
            next_io: layout::PCI_IO_START,
        }
    }

    fn alloc(&mut self, size: u64) -> Result<u64, Error> {
        let addr = self.next.next_multiple_of(size);
        if addr + size > layout::MMIO32_START + layout::MMIO32_SIZE {
            return Err(Error::PciWindowFull);
        }
        self.next = addr + size;
        Ok(addr)
    }

    /// Places a BAR of `kind` and `size` (a power of two), naturally aligned.
    pub fn alloc_kind(&mut self, kind: crate::pci::BarKind, size: u64) -> io::Result<u64> {
        use crate::pci::BarKind;
        let full = |what: &str| io::Error::other(format!("the {what} is full"));
        match kind {
            BarKind::Io => {
                let addr = self.next_io.next_multiple_of(size);
                if addr + size > layout::PCI_IO_END {
                    return Err(full("PCI I/O port window"));
                }
                self.next_io = addr + size;
                Ok(addr)
            }
            BarKind::Mem32 => self.alloc(size).map_err(|_| full("32-bit PCI window")),
            BarKind::Mem64 => match self.alloc(size) {
                Ok(a) => Ok(a),
                Err(_) => {
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

fn add_virtio_devices(
    cfg: &VmConfig,
    vm: &Arc<VmFd>,
    ram: &Ram,
    root: &Arc<Mutex<PciRoot>>,
    bars: &mut BarAllocator,
    router: &Arc<dyn InterruptRouter>,
) -> Result<Vec<(String, Arc<AtomicU64>)>, Error> {
    if cfg.disks.is_empty() && cfg.nets.is_empty() && cfg.vhost_user.is_empty() {
        return Ok(Vec::new());
    }
    let mem: Memory = GuestMemoryAtomic::new(ram.memory.clone());
    let ioevents: Arc<dyn IoEvents> = Arc::new(KvmIoEvents(vm.clone()));
    let mut devices: Vec<(String, Box<dyn VirtioDevice>)> = Vec::new();
    for d in &cfg.disks {
        let disk = BlockBackend::open(&BlockOptions {
            path: d.path.clone(),
            readonly: d.readonly,
            direct: d.direct,
            engine: EngineChoice::Auto,
            serial: Some(d.id.clone()),
        })
        .map_err(|source| Error::Disk {
            id: d.id.clone(),
            source,
        })?;
        log::info!(
            "disk '{}': {} ({} MiB{}), {} queue(s) of {}, {:?} I/O",
            d.id,
            d.path.display(),
            disk.size() >> 20,
            if d.readonly { ", read-only" } else { "" },
            d.queues,
            d.queue_size,
            disk.engine()
        );
        devices.push((
            d.id.clone(),
            Box::new(Block::new(
                &d.id,
                disk,
                d.queues,
                d.queue_size,
                Duration::from_micros(d.poll_us),
            )),
        ));
    }
    for n in &cfg.nets {
        let taps = Tap::open_queues(&n.tap, n.queues).map_err(|source| Error::Tap {
            id: n.id.clone(),
            source,
        })?;
        log::info!(
            "net '{}': tap {}, mac {}, {} queue pair(s) of {}",
            n.id,
            n.tap,
            n.mac
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":"),
            n.queues,
            n.queue_size
        );
        devices.push((
            n.id.clone(),
            Box::new(Net::new(
                &n.id,
                taps,
                n.mac,
                n.queue_size,
                Duration::from_micros(n.poll_us),
            )),
        ));
    }
    let regions = virtio::vhost_user::shared_regions(ram);
    for v in &cfg.vhost_user {
        let dev =
            virtio::vhost_user::VhostUserDevice::new(v, ram.file.as_raw_fd(), regions.clone())
                .map_err(|source| Error::VhostUser {
                    id: v.id.clone(),
                    source,
                })?;
        devices.push((v.id.clone(), Box::new(dev)));
    }
    let mut counters = Vec::new();
    let mut root = root.lock().unwrap_or_else(|p| p.into_inner());
    for (id, dev) in devices {
        let bar = bars.alloc(virtio::pci::BAR_SIZE)?;
        let pio_bar = bars
            .alloc_kind(crate::pci::BarKind::Io, virtio::pci::PIO_BAR_SIZE)
            .map_err(|e| Error::Device(id.clone(), e))?;
        let pci = VirtioPciDevice::new(
            &id,
            dev,
            (bar, pio_bar),
            mem.clone(),
            router.clone(),
            ioevents.clone(),
        )
        .map_err(|e| Error::Device(id.clone(), e))?;
        counters.push((id.clone(), pci.notify_exits()));
        let slot = root.add(&id, Arc::new(Mutex::new(pci)))?;
        log::debug!("{id}: PCI 00:{slot:02x}.0, BAR0 at {bar:#x}, doorbell port {pio_bar:#x}");
    }
    Ok(counters)
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
