//! Devices on the PCI bus while the VM runs: one path that creates a device from its
//! configuration and puts it in a slot, at boot and at hotplug alike, and the reverse path
//! that releases a device the guest ejected. The control thread owns the [`Plugger`]; the
//! API reads the [`Registry`].

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use serde::Serialize;
use serde_json::{json, Value};

use crate::api::{AddRequest, Command, Reply};
use crate::config::{DiskConfig, NetConfig, VfioConfig, VhostUserConfig};
use crate::exit::ExitHandle;
use crate::hotplug::Hotplug;
use crate::interrupt::InterruptRouter;
use crate::pci::{BarKind, PciDevice, PciRoot};
use crate::vfio::{AssignedList, VfioHost};
use crate::virtio::blk::Block;
use crate::virtio::net::Net;
use crate::virtio::pci::{IoEvents, KvmIoEvents, VirtioPciDevice};
use crate::virtio::{self, Memory, VirtioDevice};
use crate::vm::BarAllocator;
use crate::Error;
use backends::block::{BlockBackend, BlockOptions, EngineChoice};
use backends::net::Tap;

/// Where a device is in its life on the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum DeviceState {
    /// On the bus, its driver free to use it.
    Running,
    /// The guest was asked to eject it and has not yet.
    Removing,
    /// Ejected and released.
    Removed,
}

/// One device as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceNode {
    pub id: String,
    /// `virtio-blk`, `virtio-net`, `vhost-user-blk`, `vhost-user-net` or `vfio`.
    pub model: String,
    /// The guest's PCI address (`0000:00:03.0`).
    pub pci_bdf: String,
    pub state: DeviceState,
    /// Added while the VM ran (false: given on the command line).
    pub hotplugged: bool,
}

/// Which list of the configuration (`vm.info`'s `config`) a device belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigList {
    Disks,
    Net,
    Devices,
}

impl ConfigList {
    pub fn key(self) -> &'static str {
        match self {
            ConfigList::Disks => "disks",
            ConfigList::Net => "net",
            ConfigList::Devices => "devices",
        }
    }
}

/// What the vmm knows of a device on the bus.
pub struct Entry {
    pub node: DeviceNode,
    pub slot: u8,
    /// Its entry in `vm.info`'s configuration.
    pub config: (ConfigList, Value),
    /// Doorbells that reached the vmm instead of an ioeventfd (virtio devices).
    pub notify_exits: Option<Arc<AtomicU64>>,
    /// Its live per-queue counters (virtio devices), for `vm.counters`.
    pub queue_counters: Option<virtio::CountersReader>,
    /// The host resource it holds (image, tap, socket), so that no second device takes it.
    pub resource: Option<String>,
    /// The BAR ranges placed for it, given back when it goes.
    bars: Vec<(BarKind, u64, u64)>,
}

/// Every device on the bus, by id, and the ids removed while the VM ran.
#[derive(Default)]
pub struct Devices {
    pub by_id: BTreeMap<String, Entry>,
    pub removed: BTreeSet<String>,
}

pub type Registry = Arc<Mutex<Devices>>;

impl Devices {
    /// The first index whose default id (`disk2`, `net2`, `vublk2`, `vunet2`) and default
    /// MAC (52:54:00:12:34:56 + index, `config::NetConfig`) no present device has.
    pub fn free_index(&self) -> usize {
        let macs: Vec<&str> = self
            .by_id
            .values()
            .filter_map(|e| e.config.1.get("mac").and_then(Value::as_str))
            .collect();
        (0..=255usize)
            .find(|&i| {
                let mac = format!("52:54:00:12:34:{:02x}", 0x56u8.wrapping_add(i as u8));
                !macs.contains(&mac.as_str())
                    && ["disk", "net", "vublk", "vunet"]
                        .iter()
                        .all(|p| !self.by_id.contains_key(&format!("{p}{i}")))
            })
            .unwrap_or(self.by_id.len())
    }
    /// Records a device placed by other code (tests, fuzz targets: a registry without a VM).
    pub fn record(&mut self, id: &str, model: &str, slot: u8, config: (ConfigList, Value)) {
        self.by_id.insert(
            id.to_string(),
            Entry {
                node: DeviceNode {
                    id: id.to_string(),
                    model: model.to_string(),
                    pci_bdf: bdf(slot),
                    state: DeviceState::Running,
                    hotplugged: false,
                },
                slot,
                config,
                notify_exits: None,
                queue_counters: None,
                resource: None,
                bars: Vec::new(),
            },
        );
    }
}

/// A device to create.
#[derive(Debug, Clone)]
pub enum NewDevice {
    Disk(DiskConfig),
    Net(NetConfig),
    VhostUser(VhostUserConfig),
}

impl NewDevice {
    pub fn id(&self) -> &str {
        match self {
            NewDevice::Disk(d) => &d.id,
            NewDevice::Net(n) => &n.id,
            NewDevice::VhostUser(v) => &v.id,
        }
    }

    fn model(&self) -> &'static str {
        match self {
            NewDevice::Disk(_) => "virtio-blk",
            NewDevice::Net(_) => "virtio-net",
            NewDevice::VhostUser(v) if v.net => "vhost-user-net",
            NewDevice::VhostUser(_) => "vhost-user-blk",
        }
    }

    /// The host resource the device takes for itself.
    fn resource(&self) -> String {
        match self {
            NewDevice::Disk(d) => {
                let p = std::fs::canonicalize(&d.path).unwrap_or_else(|_| d.path.clone());
                format!("disk image {}", p.display())
            }
            NewDevice::Net(n) => format!("tap {}", n.tap),
            NewDevice::VhostUser(v) => format!("vhost-user socket {}", v.socket.display()),
        }
    }

    fn config(&self) -> (ConfigList, Value) {
        let mac = |m: &[u8; 6]| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        };
        match self {
            NewDevice::Disk(d) => (
                ConfigList::Disks,
                json!({
                    "id": d.id,
                    "path": d.path,
                    "readonly": d.readonly,
                    "direct": d.direct,
                    "num_queues": d.queues,
                    "queue_size": d.queue_size,
                    "poll_us": d.poll_us,
                    "vhost_user": false,
                }),
            ),
            NewDevice::Net(n) => (
                ConfigList::Net,
                json!({
                    "id": n.id,
                    "tap": n.tap,
                    "mac": mac(&n.mac),
                    "num_queues": 2 * u32::from(n.queues),
                    "queue_size": n.queue_size,
                    "poll_us": n.poll_us,
                    "vhost_user": false,
                }),
            ),
            NewDevice::VhostUser(v) if v.net => (
                ConfigList::Net,
                json!({
                    "id": v.id,
                    "vhost_user": true,
                    "vhost_socket": v.socket,
                    "mac": v.mac.as_ref().map(mac),
                    "num_queues": 2 * u32::from(v.queues),
                    "queue_size": v.queue_size,
                }),
            ),
            NewDevice::VhostUser(v) => (
                ConfigList::Disks,
                json!({
                    "id": v.id,
                    "vhost_user": true,
                    "vhost_socket": v.socket,
                    "num_queues": v.queues,
                    "queue_size": v.queue_size,
                }),
            ),
        }
    }
}

/// Why a device could not be added or removed, said in one sentence.
#[derive(Debug, thiserror::Error)]
pub enum PlugError {
    /// The request names something that exists or is in use (HTTP 409).
    #[error("{0}")]
    Conflict(String),
    /// No such device (HTTP 404).
    #[error("{0}")]
    NotFound(String),
    /// The device could not be created or placed (HTTP 500 for the vmm's own limits, the
    /// cause said).
    #[error(transparent)]
    Failed(Box<Error>),
}

impl From<Error> for PlugError {
    fn from(e: Error) -> Self {
        PlugError::Failed(Box::new(e))
    }
}

impl From<PlugError> for Error {
    fn from(e: PlugError) -> Self {
        match e {
            PlugError::Failed(e) => *e,
            PlugError::Conflict(m) | PlugError::NotFound(m) => Error::InUse(m),
        }
    }
}

/// What creates and places devices: the VM's memory, interrupts, buses and BAR space.
pub struct Plugger {
    vm: Arc<VmFd>,
    mem: Memory,
    ram_fd: RawFd,
    regions: Vec<virtio::vhost_user::SharedRegion>,
    root: Arc<Mutex<PciRoot>>,
    bars: BarAllocator,
    router: Arc<dyn InterruptRouter>,
    ioevents: Arc<dyn IoEvents>,
    hotplug: Arc<Mutex<Hotplug>>,
    registry: Registry,
    cpus: u8,
    memory: crate::memory::GuestMemory,
    memory_size: u64,
    exit: ExitHandle,
    /// The VFIO container and the assigned devices' fds, while any is assigned.
    vfio: Option<VfioHost>,
    /// KVM's VFIO device, made with the first assignment, kept for the VM's life.
    kvm_vfio: Option<Arc<vfio_ioctls::VfioDeviceFd>>,
    /// The assigned devices, for the vCPUs' mapping-fault handler.
    assigned: AssignedList,
}

/// How long the control thread waits for the last user of an ejected device (a vCPU
/// thread in the middle of an access to it) before releasing it anyway.
const RELEASE_WAIT: Duration = Duration::from_secs(2);

impl Plugger {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vm: Arc<VmFd>,
        ram: &crate::memory::Ram,
        root: Arc<Mutex<PciRoot>>,
        bars: BarAllocator,
        router: Arc<dyn InterruptRouter>,
        hotplug: Arc<Mutex<Hotplug>>,
        registry: Registry,
        cpus: u8,
        exit: ExitHandle,
    ) -> Self {
        Plugger {
            memory: ram.memory.clone(),
            memory_size: ram.ranges.iter().map(|r| r.1).sum(),
            exit,
            vfio: None,
            kvm_vfio: None,
            assigned: AssignedList::default(),
            ioevents: Arc::new(KvmIoEvents(vm.clone())),
            vm,
            mem: vm_memory::GuestMemoryAtomic::new(ram.memory.clone()),
            ram_fd: ram.file.as_raw_fd(),
            regions: virtio::vhost_user::shared_regions(ram),
            root,
            bars,
            router,
            hotplug,
            registry,
            cpus,
        }
    }

    /// The assigned devices, for [`crate::vfio::fault_handler`].
    pub fn assigned(&self) -> AssignedList {
        self.assigned.clone()
    }

    /// Assigns host devices through VFIO: checks each (one line for what blocks it), opens
    /// them all (their groups join the VM's container, made for the first), maps guest RAM
    /// for DMA in the background if not yet, and puts each on the bus; while the VM runs
    /// (`hotplug`), the guest is then told to scan its slot.
    pub fn assign(&mut self, cfgs: &[VfioConfig], hotplug: bool) -> Result<Vec<u8>, PlugError> {
        if cfgs.is_empty() {
            return Ok(Vec::new());
        }
        for c in cfgs {
            self.check_free_parts(&c.id, &vfio_resource(c))?;
        }
        let candidates = cfgs
            .iter()
            .map(|c| crate::vfio::preflight(c, self.memory_size))
            .collect::<Result<Vec<_>, Error>>()?;
        if self.vfio.is_none() {
            let kvm_device = match &self.kvm_vfio {
                Some(d) => d.clone(),
                None => {
                    let d = VfioHost::kvm_device(&self.vm, &cfgs[0].id)?;
                    self.kvm_vfio = Some(d.clone());
                    d
                }
            };
            self.vfio = Some(VfioHost::new(
                &self.vm,
                &self.memory,
                &cfgs[0].id,
                self.assigned.clone(),
                kvm_device,
            )?);
        }
        let result = self.assign_opened(&candidates, hotplug);
        if self.vfio.as_ref().is_some_and(|v| v.is_empty()) {
            // Nothing got assigned: the container goes (and the groups with it).
            self.vfio = None;
        }
        result
    }

    fn assign_opened(
        &mut self,
        candidates: &[crate::vfio::Candidate<'_>],
        hotplug: bool,
    ) -> Result<Vec<u8>, PlugError> {
        let Some(host) = self.vfio.as_mut() else {
            return Err(Error::Internal("no VFIO container".into()).into());
        };
        // A mapping failure stops a VM that is booting; one that runs keeps running.
        let exit = (!hotplug).then_some(&self.exit);
        let opened = host.open(candidates, &self.memory, exit)?;
        let registry = self.registry.clone();
        let mut slots = Vec::new();
        for (c, dev) in candidates.iter().zip(opened) {
            let bars = &mut self.bars;
            let mut alloc = |kind, size| bars.alloc_kind(kind, size);
            let placed = host.place(c, dev, &self.root, &mut alloc, &self.router)?;
            let d = c.cfg;
            let mut reg = registry.lock().unwrap_or_else(|p| p.into_inner());
            reg.removed.remove(&d.id);
            reg.by_id.insert(
                d.id.clone(),
                Entry {
                    node: DeviceNode {
                        id: d.id.clone(),
                        model: "vfio".into(),
                        pci_bdf: bdf(placed.slot),
                        state: DeviceState::Running,
                        hotplugged: hotplug,
                    },
                    slot: placed.slot,
                    config: (
                        ConfigList::Devices,
                        json!({
                            "id": d.id,
                            "path": c.sysfs,
                            "rom": d.rom,
                        }),
                    ),
                    notify_exits: None,
                    queue_counters: None,
                    resource: Some(vfio_resource(d)),
                    bars: placed.bars,
                },
            );
            drop(reg);
            if hotplug {
                self.hotplug
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .device_added(placed.slot);
                log::info!("{}: vfio added at {} (hotplug)", d.id, bdf(placed.slot));
            }
            slots.push(placed.slot);
        }
        Ok(slots)
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Devices> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks that `dev` can be added: its id and the host resource it takes are free.
    fn check_free(&self, dev: &NewDevice) -> Result<(), PlugError> {
        self.check_free_parts(dev.id(), &dev.resource())
    }

    fn check_free_parts(&self, id: &str, res: &str) -> Result<(), PlugError> {
        let reg = self.registry();
        if let Some(e) = reg.by_id.get(id) {
            return Err(PlugError::Conflict(format!(
                "a device with id '{}' is already on the bus ({} at {}{}): choose another id",
                id,
                e.node.model,
                e.node.pci_bdf,
                if e.node.state == DeviceState::Removing {
                    ", being removed"
                } else {
                    ""
                }
            )));
        }
        if let Some(e) = reg
            .by_id
            .values()
            .find(|e| e.resource.as_deref() == Some(res))
        {
            return Err(PlugError::Conflict(format!(
                "{res} is already used by device '{}': one device per {}",
                e.node.id,
                res.split(' ').next().unwrap_or("resource")
            )));
        }
        Ok(())
    }

    /// The first `{prefix}{n}` no device uses.
    pub fn free_id(&self, prefix: &str) -> String {
        let reg = self.registry();
        (0..)
            .map(|n| format!("{prefix}{n}"))
            .find(|id| !reg.by_id.contains_key(id))
            .unwrap_or_else(|| prefix.to_string())
    }

    /// Creates `dev` and puts it in a free slot; at boot (`hotplug` false) or while the VM
    /// runs, when the guest is then told to scan the slot. Returns the slot.
    pub fn add(&mut self, dev: NewDevice, hotplug: bool) -> Result<u8, PlugError> {
        self.check_free(&dev)?;
        let id = dev.id().to_string();
        let model = dev.model();
        let resource = dev.resource();
        let config = dev.config();
        let device = self.create(&dev)?;
        let mut placed = Vec::new();
        let queue_counters = device.counters();
        let result = self.place(&id, device, &mut placed);
        let (slot, notify) = match result {
            Ok(v) => v,
            Err(e) => {
                for (kind, addr, size) in placed {
                    self.bars.free(kind, addr, size);
                }
                return Err(e.into());
            }
        };
        self.registry().removed.remove(&id);
        self.registry().by_id.insert(
            id.clone(),
            Entry {
                node: DeviceNode {
                    id: id.clone(),
                    model: model.to_string(),
                    pci_bdf: bdf(slot),
                    state: DeviceState::Running,
                    hotplugged: hotplug,
                },
                slot,
                config,
                notify_exits: Some(notify),
                queue_counters,
                resource: Some(resource),
                bars: placed,
            },
        );
        if hotplug {
            self.hotplug
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .device_added(slot);
            log::info!("{id}: {model} added at {} (hotplug)", bdf(slot));
        }
        Ok(slot)
    }

    fn create(&self, dev: &NewDevice) -> Result<Box<dyn VirtioDevice>, Error> {
        Ok(match dev {
            NewDevice::Disk(d) => {
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
                Box::new(Block::new(
                    &d.id,
                    disk,
                    d.queues,
                    d.queue_size,
                    Duration::from_micros(d.poll_us),
                ))
            }
            NewDevice::Net(n) => {
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
                Box::new(Net::new(
                    &n.id,
                    taps,
                    n.mac,
                    n.queue_size,
                    Duration::from_micros(n.poll_us),
                ))
            }
            NewDevice::VhostUser(v) => Box::new(
                virtio::vhost_user::VhostUserDevice::new(v, self.ram_fd, self.regions.clone())
                    .map_err(|source| Error::VhostUser {
                        id: v.id.clone(),
                        source,
                    })?,
            ),
        })
    }

    /// Places a virtio device's BARs, wraps it in its PCI transport and puts it on the bus.
    fn place(
        &mut self,
        id: &str,
        dev: Box<dyn VirtioDevice>,
        placed: &mut Vec<(BarKind, u64, u64)>,
    ) -> Result<(u8, Arc<AtomicU64>), Error> {
        let bar = self
            .bars
            .alloc_kind(BarKind::Mem32, virtio::pci::BAR_SIZE)
            .map_err(|e| Error::Device(id.to_string(), e))?;
        placed.push((BarKind::Mem32, bar, virtio::pci::BAR_SIZE));
        let pio_bar = self
            .bars
            .alloc_kind(BarKind::Io, virtio::pci::PIO_BAR_SIZE)
            .map_err(|e| Error::Device(id.to_string(), e))?;
        placed.push((BarKind::Io, pio_bar, virtio::pci::PIO_BAR_SIZE));
        let pci = VirtioPciDevice::new(
            id,
            dev,
            (bar, pio_bar),
            self.mem.clone(),
            self.router.clone(),
            self.ioevents.clone(),
        )
        .map_err(|e| Error::Device(id.to_string(), e))?;
        let notify = pci.notify_exits();
        let slot = self
            .root
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(id, Arc::new(Mutex::new(pci)))?;
        log::debug!("{id}: PCI 00:{slot:02x}.0, BAR0 at {bar:#x}, doorbell port {pio_bar:#x}");
        Ok((slot, notify))
    }

    /// Carries out an API request; the answer's status and body.
    pub fn command(&mut self, cmd: Command) -> Reply {
        let fail = |status: u16, msg: String| (status, Some(json!({ "error": msg })));
        match cmd {
            Command::PowerButton => {
                self.hotplug
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .press_power_button();
                log::info!("api: the power button was pressed");
                (204, None)
            }
            Command::Remove(id) => match self.request_removal(&id) {
                Ok((DeviceState::Removed, _)) => (
                    200,
                    Some(json!({
                        "id": id,
                        "state": DeviceState::Removed,
                        "note": "removed already: the guest ejected it and the vmm released it",
                    })),
                ),
                Ok((state, again)) => (
                    202,
                    Some(json!({
                        "id": id,
                        "state": state,
                        "note": if again {
                            "already being removed: the guest was asked again"
                        } else {
                            "the guest was asked to eject it; vm.info shows it until it has"
                        },
                    })),
                ),
                Err(PlugError::NotFound(m)) => fail(404, m),
                Err(e) => fail(409, crate::error_line(&e)),
            },
            Command::AddDevice { path, id } => {
                let index = self.registry().by_id.len();
                let id = id.unwrap_or_else(|| self.free_id("vfio"));
                let cfg = match VfioConfig::parse(&format!("host={path},id={id}"), index) {
                    Ok(c) => c,
                    Err(e) => {
                        return fail(
                            400,
                            e.to_string()
                                .replace("invalid --vfio", "invalid vm.add-device"),
                        )
                    }
                };
                match self.assign(std::slice::from_ref(&cfg), true) {
                    Ok(slots) => (
                        200,
                        Some(json!({ "id": id, "bdf": slots.first().map(|&s| bdf(s)) })),
                    ),
                    Err(PlugError::Conflict(m)) => fail(409, format!("vm.add-device: {m}")),
                    Err(e) => {
                        let e = Error::from(e);
                        let status = if matches!(e, Error::Vfio { .. }) {
                            400
                        } else {
                            500
                        };
                        fail(status, format!("vm.add-device: {}", crate::error_line(&e)))
                    }
                }
            }
            Command::Add(rq) => {
                let endpoint = if rq.net { "vm.add-net" } else { "vm.add-disk" };
                let dev = match self.new_device(&rq) {
                    Ok(d) => d,
                    Err(e) => return fail(400, e),
                };
                let id = dev.id().to_string();
                match self.add(dev, true) {
                    Ok(slot) => (200, Some(json!({ "id": id, "bdf": bdf(slot) }))),
                    Err(PlugError::Conflict(m)) => fail(409, format!("{endpoint}: {m}")),
                    Err(e) => {
                        let e = Error::from(e);
                        // What the request named cannot be opened or used: the client's to
                        // fix (400); the vmm's own limits and failures: 500.
                        let status = match e {
                            Error::Disk { .. }
                            | Error::Tap { .. }
                            | Error::VhostUser { .. }
                            | Error::Vfio { .. } => 400,
                            _ => 500,
                        };
                        fail(status, format!("{endpoint}: {}", crate::error_line(&e)))
                    }
                }
            }
        }
    }

    /// The configuration of the device `rq` asks for, checked by the command line's own
    /// parsers (the same limits and messages as `--disk`, `--net`, `--vhost-user-*`).
    fn new_device(&self, rq: &AddRequest) -> Result<NewDevice, String> {
        let prefix = match (rq.net, rq.vhost_user) {
            (false, false) => "disk",
            (true, false) => "net",
            (false, true) => "vublk",
            (true, true) => "vunet",
        };
        let id = rq.id.clone().unwrap_or_else(|| self.free_id(prefix));
        let value = format!("{},id={id}", rq.options);
        let (option, endpoint) = match (rq.net, rq.vhost_user) {
            (false, false) => ("--disk", "vm.add-disk"),
            (true, false) => ("--net", "vm.add-net"),
            (false, true) => ("--vhost-user-blk", "vm.add-disk"),
            (true, true) => ("--vhost-user-net", "vm.add-net"),
        };
        let said = |e: crate::config::ConfigError| {
            e.to_string()
                .replace(&format!("invalid {option}"), &format!("invalid {endpoint}"))
        };
        // A device added at run time without an id or a MAC gets the first index whose
        // default id (`net2`, `vublk3`, ...) and default MAC (52:54:00:12:34:56 + index) no
        // device present has: a NIC removed and another added must not get the MAC of one
        // still there.
        let index = self.registry().free_index();
        Ok(match (rq.net, rq.vhost_user) {
            (false, false) => {
                let mut d = DiskConfig::parse(&value, index).map_err(said)?;
                if !rq.queues_given {
                    d.queues = u16::from(self.cpus).clamp(1, crate::config::MAX_QUEUES);
                }
                NewDevice::Disk(d)
            }
            (true, false) => NewDevice::Net(NetConfig::parse(&value, index).map_err(said)?),
            (net, true) => {
                NewDevice::VhostUser(VhostUserConfig::parse(&value, net, index).map_err(said)?)
            }
        })
    }

    /// `vm.remove-device`: asks the guest to eject device `id`. Returns its state
    /// afterwards and whether it was already being removed.
    pub fn request_removal(&self, id: &str) -> Result<(DeviceState, bool), PlugError> {
        let slot = {
            let mut reg = self.registry();
            if reg.removed.contains(id) && !reg.by_id.contains_key(id) {
                return Ok((DeviceState::Removed, true));
            }
            let Some(e) = reg.by_id.get_mut(id) else {
                return Err(PlugError::NotFound(format!(
                    "no device with id '{id}' (vm.info lists them)"
                )));
            };
            let again = e.node.state == DeviceState::Removing;
            e.node.state = DeviceState::Removing;
            (e.slot, again)
        };
        // Asked again: the guest is told again (it may have missed or refused the first).
        self.hotplug
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .request_eject(slot.0);
        log::info!(
            "{id}: the guest is asked to eject {}{}",
            bdf(slot.0),
            if slot.1 { " (again)" } else { "" }
        );
        Ok((DeviceState::Removing, slot.1))
    }

    /// The guest ejected `slot`; `device` is already off the bus. Stops and releases it
    /// (its Drop stops its threads, drains its I/O, closes its file, tap or socket) and
    /// gives its BAR space back.
    pub fn release(&mut self, slot: u8, id: &str, device: Arc<Mutex<dyn PciDevice>>) {
        let entry = {
            let mut reg = self.registry();
            let e = reg.by_id.remove(id);
            reg.removed.insert(id.to_string());
            e
        };
        let asked = entry
            .as_ref()
            .is_some_and(|e| e.node.state == DeviceState::Removing);
        // A vCPU in the middle of an access holds the device a moment longer.
        let start = Instant::now();
        while Arc::strong_count(&device) > 1 && start.elapsed() < RELEASE_WAIT {
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(device);
        let mut released_group = false;
        if let Some(e) = entry {
            for (kind, addr, size) in e.bars {
                self.bars.free(kind, addr, size);
            }
            if e.node.model == "vfio" {
                if let Some(host) = self.vfio.as_mut() {
                    if host.forget(id) {
                        // The last one: guest RAM unmapped, the container and groups closed.
                        self.vfio = None;
                    }
                    released_group = true;
                }
            }
        }
        log::info!(
            "{id}: removed from {} ({}){}",
            bdf(slot),
            if asked {
                "the guest ejected it as asked"
            } else {
                "the guest ejected it on its own"
            },
            if released_group {
                "; the host device is reset and its VFIO group released"
            } else {
                ""
            }
        );
    }
}

/// The host resource an assigned device takes.
fn vfio_resource(c: &VfioConfig) -> String {
    format!("host device {}", c.bdf)
}

/// `0000:00:SS.0`.
pub fn bdf(slot: u8) -> String {
    format!("0000:00:{slot:02x}.0")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A NIC added after another was removed does not get the MAC (or the id) of one still
    /// there: with net0 (…:56) gone and net1 (…:57) present, the next default is index 0.
    #[test]
    fn a_hot_added_nic_gets_a_mac_no_present_device_has() {
        let mut d = Devices::default();
        let nic =
            |mac: &str, id: &str| (ConfigList::Net, serde_json::json!({ "id": id, "mac": mac }));
        d.record(
            "disk0",
            "virtio-blk",
            1,
            (ConfigList::Disks, serde_json::json!({ "id": "disk0" })),
        );
        d.record("net1", "virtio-net", 2, nic("52:54:00:12:34:57", "net1"));
        // Index 0 is taken by disk0's id, 1 by net1: 2.
        assert_eq!(d.free_index(), 2);
        // A NIC with a MAC of its own choosing that happens to be index 2's default.
        d.record("mine", "virtio-net", 3, nic("52:54:00:12:34:58", "mine"));
        assert_eq!(d.free_index(), 3);
        d.by_id.remove("disk0");
        assert_eq!(d.free_index(), 0);
    }
}
