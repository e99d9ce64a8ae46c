//! Host preparation: can this host PCI device be assigned to a guest with VFIO, and if not,
//! why not and what fixes it; binding it to `vfio-pci` and giving it back.
//!
//! Everything is read from sysfs under [`Host::sysfs_root`] (and `/dev`, `/proc` under their
//! own roots), so unit tests run against a fake tree in a temporary directory. Writes go
//! through a [`SysfsWriter`], so tests see exactly which files are written in which order.
//!
//! The checks [`Host::preflight`] makes, in order; the first failure is the one reported:
//!
//! 1. the device exists ([`Problem::NoSuchDevice`]);
//! 2. an IOMMU is enabled ([`Problem::NoIommu`]) and the device is in an IOMMU group
//!    ([`Problem::NoIommuGroup`]);
//! 3. the device is bound to `vfio-pci` ([`Problem::NotBoundToVfio`]);
//! 4. every other device of its group is bound to `vfio-pci`, to no driver, to `pci-stub`, or
//!    is a PCI bridge on `pcieport` ([`Problem::GroupNotViable`]);
//! 5. `/dev/vfio/N` exists ([`Problem::NoVfioDevNode`]);
//! 6. the memlock limit covers the guest RAM VFIO pins ([`Problem::MemlockTooLow`]).

mod bdf;
mod size;

pub use bdf::{Bdf, BdfError};
pub use size::{format_size, parse_size, SizeError};

use std::fmt::{self, Write as _};
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The kernel driver VFIO assigns PCI devices through.
pub const VFIO_PCI: &str = "vfio-pci";

/// Memlock headroom above guest RAM: VFIO pins all of guest RAM; this leaves room for the
/// small pinned allocations next to it (rings, bounce pages) without pinning the limit to the
/// byte.
pub const MEMLOCK_HEADROOM: u64 = 64 << 20;

/// `CAP_IPC_LOCK`: a process that has it is not held to RLIMIT_MEMLOCK by VFIO.
const CAP_IPC_LOCK: u32 = 14;

/// PCI class code (base class, subclass) of a PCI-to-PCI bridge.
const CLASS_PCI_BRIDGE: u32 = 0x0604;

/// Writes sysfs attributes. The real one writes the file; tests record the writes and play
/// the kernel's part.
pub trait SysfsWriter: Send + Sync {
    fn write(&self, path: &Path, value: &str) -> io::Result<()>;
}

/// Writes the attribute file (which must exist: sysfs attributes are never created).
#[derive(Debug, Default, Clone, Copy)]
pub struct RealWriter;

impl SysfsWriter for RealWriter {
    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        let mut f = fs::OpenOptions::new().write(true).open(path)?;
        // One write(2): sysfs takes an attribute value in a single write.
        f.write_all(value.as_bytes())
    }
}

/// The memlock limit VFIO's page pinning is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemlockLimit {
    /// The soft RLIMIT_MEMLOCK in bytes; `None` is unlimited (RLIM_INFINITY).
    pub bytes: Option<u64>,
    /// The process has CAP_IPC_LOCK, so the limit does not apply.
    pub cap_ipc_lock: bool,
}

impl MemlockLimit {
    pub const UNLIMITED: Self = Self {
        bytes: None,
        cap_ipc_lock: false,
    };

    /// Whether `need` bytes can be pinned.
    pub fn covers(&self, need: u64) -> bool {
        self.cap_ipc_lock || self.bytes.is_none_or(|b| b >= need)
    }

    /// This process's limit: getrlimit(RLIMIT_MEMLOCK), and CapEff from
    /// `<proc_root>/self/status`.
    pub fn of_this_process(proc_root: &Path) -> Self {
        let mut rl = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one `rlimit` into the struct we own and keeps no pointer.
        let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut rl) };
        let bytes = if rc != 0 {
            // Cannot happen for a valid resource; assume the worst rather than "unlimited".
            Some(0)
        } else if rl.rlim_cur == libc::RLIM_INFINITY {
            None
        } else {
            Some(rl.rlim_cur)
        };
        let cap_ipc_lock = fs::read_to_string(proc_root.join("self/status"))
            .ok()
            .and_then(|s| cap_eff(&s))
            .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0);
        Self {
            bytes,
            cap_ipc_lock,
        }
    }
}

impl fmt::Display for MemlockLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.bytes {
            None => f.write_str("unlimited"),
            Some(b) => f.write_str(&format_size(b)),
        }
    }
}

/// The effective capability set from a `/proc/PID/status` text.
fn cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// Where [`Host`] gets the memlock limit from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemlockSource {
    /// This process (getrlimit and /proc/self/status).
    Process,
    /// A given value (tests; or a VMM that knows the limit its child will run with).
    Fixed(MemlockLimit),
}

/// The CPU vendor, to name the right kernel parameters for the IOMMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuVendor {
    Intel,
    Amd,
    Unknown,
}

/// What `/proc/cpuinfo` says that matters for the IOMMU hint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuInfo {
    pub vendor: CpuVendor,
    /// The `hypervisor` flag: this host is itself a virtual machine.
    pub virtualized: bool,
}

impl CpuInfo {
    fn parse(cpuinfo: &str) -> Self {
        let field = |name: &str| {
            cpuinfo.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == name).then(|| v.trim().to_string())
            })
        };
        let vendor = match field("vendor_id").as_deref() {
            Some("GenuineIntel") => CpuVendor::Intel,
            Some("AuthenticAMD") | Some("HygonGenuine") => CpuVendor::Amd,
            _ => CpuVendor::Unknown,
        };
        let virtualized =
            field("flags").is_some_and(|f| f.split_whitespace().any(|x| x == "hypervisor"));
        Self {
            vendor,
            virtualized,
        }
    }
}

/// Vendor, device and class IDs from sysfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIds {
    pub vendor: u16,
    pub device: u16,
    /// 24-bit class code: base class, subclass, programming interface.
    pub class: u32,
}

/// Whether a member of an IOMMU group lets VFIO use the group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberStatus {
    /// Bound to vfio-pci.
    VfioPci,
    /// No driver.
    NoDriver,
    /// `pci-stub`: claims the device without using DMA; the kernel allows it.
    Stub,
    /// A PCI bridge on `pcieport`; the kernel allows it (the port driver does no DMA).
    Bridge(String),
    /// A host driver that may do DMA: the group is not viable while it holds the device.
    HostDriver(String),
}

impl MemberStatus {
    fn of(driver: Option<&str>, class: Option<u32>) -> Self {
        match driver {
            None => Self::NoDriver,
            Some(VFIO_PCI) => Self::VfioPci,
            Some("pci-stub") => Self::Stub,
            Some(d @ "pcieport") if class.is_some_and(|c| c >> 8 == CLASS_PCI_BRIDGE) => {
                Self::Bridge(d.to_string())
            }
            Some(d) => Self::HostDriver(d.to_string()),
        }
    }

    /// Whether this member lets VFIO open the group.
    pub fn is_ok(&self) -> bool {
        !matches!(self, Self::HostDriver(_))
    }
}

/// One device of an IOMMU group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMember {
    pub bdf: Bdf,
    pub driver: Option<String>,
    pub class: Option<u32>,
    pub status: MemberStatus,
}

/// The resets the kernel offers for a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResetSupport {
    /// From the `reset_method` attribute, in the kernel's order (e.g. `flr`, `pm`, `bus`).
    Methods(Vec<String>),
    /// A `reset` attribute but no `reset_method` (kernels before 5.15): some reset works.
    Unlisted,
    /// Neither: the kernel cannot reset this device.
    None,
}

/// Everything [`Host::inspect`] found out about a device; [`DeviceReport::verdict`] turns it
/// into the preflight result, [`DeviceReport::render`] into text for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceReport {
    pub bdf: Bdf,
    /// `<sysfs>/bus/pci/devices/<bdf>`.
    pub sysfs_path: PathBuf,
    pub exists: bool,
    pub ids: Option<PciIds>,
    pub driver: Option<String>,
    pub driver_override: Option<String>,
    /// `<sysfs>/class/iommu` or `<sysfs>/kernel/iommu_groups` is non-empty.
    pub iommu_enabled: bool,
    pub cpu: CpuInfo,
    pub group: Option<u32>,
    /// All devices of the group, this one included, in address order.
    pub group_members: Vec<GroupMember>,
    pub reset: ResetSupport,
    /// `<sysfs>/bus/pci/drivers/vfio-pci` exists.
    pub vfio_pci_loaded: bool,
    /// `<dev>/vfio/<group>`, when there is a group.
    pub vfio_dev_node: Option<PathBuf>,
    pub vfio_dev_node_exists: bool,
    pub memlock: MemlockLimit,
}

/// A device that passed [`Host::preflight`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignable {
    pub bdf: Bdf,
    pub group: u32,
    pub sysfs_path: PathBuf,
}

/// Why a device cannot be assigned. Each message is one line: which device, what failed,
/// why, and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("{bdf}: no such PCI device: {} does not exist; list the host's devices with `lspci -D` or `ls /sys/bus/pci/devices`", .path.display())]
    NoSuchDevice { bdf: Bdf, path: PathBuf },
    #[error("{bdf}: no IOMMU is enabled on this host (/sys/class/iommu and /sys/kernel/iommu_groups are empty), and VFIO needs one to confine the device's DMA: {}", iommu_fix(.cpu))]
    NoIommu { bdf: Bdf, cpu: CpuInfo },
    #[error("{bdf}: the IOMMU is on but the device has no IOMMU group, so VFIO cannot isolate it: check `dmesg | grep -i -e DMAR -e AMD-Vi -e IOMMU` and that the firmware's DMAR/IVRS tables cover this device")]
    NoIommuGroup { bdf: Bdf },
    #[error("{bdf}: {}, so the host still owns it: run `passthrough bind {bdf}` as root", bound_to(.driver.as_deref()))]
    NotBoundToVfio { bdf: Bdf, driver: Option<String> },
    #[error("{bdf}: IOMMU group {group} is not viable: {other} in the same group is bound to {other_driver}, and VFIO needs every device of a group on vfio-pci or on no driver: bind it too with `passthrough bind {other}`, or unbind it with `echo {other} > /sys/bus/pci/drivers/{other_driver}/unbind`")]
    GroupNotViable {
        bdf: Bdf,
        group: u32,
        other: Bdf,
        other_driver: String,
    },
    #[error("{bdf}: {} does not exist although the device is bound to vfio-pci: load the VFIO modules with `modprobe vfio-pci` and make sure /dev/vfio is visible here (devtmpfs, or the container's device list)", .path.display())]
    NoVfioDevNode { bdf: Bdf, group: u32, path: PathBuf },
    #[error("{bdf}: memlock limit {} is below the {} VFIO must pin ({} of guest RAM + {} headroom): raise it with `ulimit -l unlimited` (or LimitMEMLOCK=infinity in a systemd unit), or run with CAP_IPC_LOCK", format_size(*.have), format_size(*.need), format_size(*.guest_ram), format_size(MEMLOCK_HEADROOM))]
    MemlockTooLow {
        bdf: Bdf,
        have: u64,
        need: u64,
        guest_ram: u64,
    },
}

impl Problem {
    /// The device the problem is about.
    pub fn bdf(&self) -> Bdf {
        match self {
            Self::NoSuchDevice { bdf, .. }
            | Self::NoIommu { bdf, .. }
            | Self::NoIommuGroup { bdf }
            | Self::NotBoundToVfio { bdf, .. }
            | Self::GroupNotViable { bdf, .. }
            | Self::NoVfioDevNode { bdf, .. }
            | Self::MemlockTooLow { bdf, .. } => *bdf,
        }
    }
}

fn bound_to(driver: Option<&str>) -> String {
    match driver {
        Some(d) => format!("is bound to the host driver {d}, not vfio-pci"),
        None => "is bound to no driver, not vfio-pci".to_string(),
    }
}

fn iommu_fix(cpu: &CpuInfo) -> String {
    let mut s = match cpu.vendor {
        CpuVendor::Intel => "add `intel_iommu=on iommu=pt` to the kernel command line (GRUB_CMDLINE_LINUX in /etc/default/grub, then `update-grub` and reboot) and enable VT-d in the firmware setup".to_string(),
        CpuVendor::Amd => "add `amd_iommu=on iommu=pt` to the kernel command line (GRUB_CMDLINE_LINUX in /etc/default/grub, then `update-grub` and reboot) and enable AMD-Vi (IOMMU) in the firmware setup".to_string(),
        CpuVendor::Unknown => "add `intel_iommu=on` (Intel) or `amd_iommu=on iommu=pt` (AMD) to the kernel command line and enable VT-d / AMD-Vi in the firmware setup".to_string(),
    };
    if cpu.virtualized {
        s.push_str("; this host is itself a virtual machine, so its hypervisor must also give it a virtual IOMMU (QEMU: a q35 machine with `-device intel-iommu`)");
    }
    s
}

/// Why binding or unbinding failed. One line each, with the fix.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The device cannot be given to vfio-pci at all (no such device, no IOMMU, no group):
    /// nothing was written.
    #[error(transparent)]
    Blocked(#[from] Problem),
    #[error("{bdf}: the vfio-pci driver is not loaded: run `modprobe vfio-pci` as root, then `passthrough bind {bdf}` again")]
    VfioPciNotLoaded { bdf: Bdf },
    #[error("{bdf}: not allowed to write {}: run as root", .path.display())]
    PermissionDenied {
        bdf: Bdf,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{bdf}: cannot write '{}' to {}", .value.escape_debug(), .path.display())]
    Write {
        bdf: Bdf,
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
    #[error("{bdf}: driver_override is vfio-pci but after drivers_probe the device {}: see `dmesg` for why vfio-pci did not take it; `passthrough unbind {bdf}` gives it back to its host driver", now_bound(.driver.as_deref()))]
    NotTaken {
        bdf: Bdf,
        driver: Option<String>,
        /// The error drivers_probe returned, if it did.
        #[source]
        probe: Option<io::Error>,
    },
    #[error("{bdf}: released from vfio-pci, but probing a host driver for it failed: see `dmesg`")]
    HostProbeFailed {
        bdf: Bdf,
        #[source]
        source: io::Error,
    },
}

fn now_bound(driver: Option<&str>) -> String {
    match driver {
        Some(d) => format!("is bound to {d}"),
        None => "has no driver".to_string(),
    }
}

/// What [`Host::bind`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindOutcome {
    pub bdf: Bdf,
    /// The driver the device was taken from.
    pub previous: Option<String>,
    /// It was on vfio-pci already; nothing was written.
    pub already_bound: bool,
}

/// What [`Host::unbind`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnbindOutcome {
    pub bdf: Bdf,
    /// The driver before: vfio-pci, or something else (then the device was left on it).
    pub previous: Option<String>,
    /// The driver that took the device after drivers_probe (None: no host driver claims it).
    pub now: Option<String>,
}

/// The host as sysfs, `/dev` and `/proc` show it.
pub struct Host {
    /// Default `/sys`.
    pub sysfs_root: PathBuf,
    /// Default `/dev` (for `/dev/vfio/N`).
    pub dev_root: PathBuf,
    /// Default `/proc` (for `cpuinfo` and `self/status`).
    pub proc_root: PathBuf,
    pub memlock: MemlockSource,
    writer: Arc<dyn SysfsWriter>,
}

impl fmt::Debug for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Host")
            .field("sysfs_root", &self.sysfs_root)
            .field("dev_root", &self.dev_root)
            .field("proc_root", &self.proc_root)
            .field("memlock", &self.memlock)
            .finish_non_exhaustive()
    }
}

impl Default for Host {
    fn default() -> Self {
        Self::new()
    }
}

impl Host {
    /// The real host: `/sys`, `/dev`, `/proc`, this process's memlock limit, real writes.
    pub fn new() -> Self {
        Self::with_sysfs_root("/sys")
    }

    /// Like [`Host::new`] with sysfs somewhere else.
    pub fn with_sysfs_root(sysfs_root: impl Into<PathBuf>) -> Self {
        Self {
            sysfs_root: sysfs_root.into(),
            dev_root: PathBuf::from("/dev"),
            proc_root: PathBuf::from("/proc"),
            memlock: MemlockSource::Process,
            writer: Arc::new(RealWriter),
        }
    }

    pub fn dev_root(mut self, dev_root: impl Into<PathBuf>) -> Self {
        self.dev_root = dev_root.into();
        self
    }

    pub fn proc_root(mut self, proc_root: impl Into<PathBuf>) -> Self {
        self.proc_root = proc_root.into();
        self
    }

    pub fn memlock(mut self, limit: MemlockLimit) -> Self {
        self.memlock = MemlockSource::Fixed(limit);
        self
    }

    pub fn writer(mut self, writer: Arc<dyn SysfsWriter>) -> Self {
        self.writer = writer;
        self
    }

    /// `<sysfs>/bus/pci/devices/<bdf>`.
    pub fn device_path(&self, bdf: Bdf) -> PathBuf {
        self.sysfs_root
            .join("bus/pci/devices")
            .join(bdf.to_string())
    }

    fn pci_path(&self, rel: &str) -> PathBuf {
        self.sysfs_root.join("bus/pci").join(rel)
    }

    fn driver_of(&self, bdf: Bdf) -> Option<String> {
        link_name(&self.device_path(bdf).join("driver"))
    }

    fn group_of(&self, bdf: Bdf) -> Option<u32> {
        link_name(&self.device_path(bdf).join("iommu_group")).and_then(|n| n.parse().ok())
    }

    fn driver_override_of(&self, bdf: Bdf) -> Option<String> {
        read_trimmed(&self.device_path(bdf).join("driver_override"))
            .filter(|s| !s.is_empty() && s != "(null)")
    }

    fn class_of(&self, bdf: Bdf) -> Option<u32> {
        read_hex(&self.device_path(bdf).join("class"))
    }

    fn iommu_enabled(&self) -> bool {
        dir_non_empty(&self.sysfs_root.join("class/iommu"))
            || dir_non_empty(&self.sysfs_root.join("kernel/iommu_groups"))
    }

    fn vfio_pci_loaded(&self) -> bool {
        self.pci_path("drivers").join(VFIO_PCI).is_dir()
    }

    fn cpu(&self) -> CpuInfo {
        CpuInfo::parse(&fs::read_to_string(self.proc_root.join("cpuinfo")).unwrap_or_default())
    }

    fn memlock_limit(&self) -> MemlockLimit {
        match self.memlock {
            MemlockSource::Process => MemlockLimit::of_this_process(&self.proc_root),
            MemlockSource::Fixed(l) => l,
        }
    }

    /// Reads everything that decides whether `bdf` can be assigned. Unreadable attributes
    /// count as absent.
    pub fn inspect(&self, bdf: Bdf) -> DeviceReport {
        let path = self.device_path(bdf);
        let exists = path.is_dir();
        let ids = (|| {
            Some(PciIds {
                vendor: u16::try_from(read_hex(&path.join("vendor"))?).ok()?,
                device: u16::try_from(read_hex(&path.join("device"))?).ok()?,
                class: read_hex(&path.join("class"))?,
            })
        })();
        let group = self.group_of(bdf);
        let group_members = group.map(|g| self.group_members(g)).unwrap_or_default();
        let reset = match read_trimmed(&path.join("reset_method")) {
            Some(m) => ResetSupport::Methods(m.split_whitespace().map(String::from).collect()),
            None if path.join("reset").exists() => ResetSupport::Unlisted,
            None => ResetSupport::None,
        };
        let vfio_dev_node = group.map(|g| self.dev_root.join("vfio").join(g.to_string()));
        let vfio_dev_node_exists = vfio_dev_node.as_deref().is_some_and(Path::exists);
        DeviceReport {
            bdf,
            exists,
            ids,
            driver: self.driver_of(bdf),
            driver_override: self.driver_override_of(bdf),
            iommu_enabled: self.iommu_enabled(),
            cpu: self.cpu(),
            group,
            group_members,
            reset,
            vfio_pci_loaded: self.vfio_pci_loaded(),
            vfio_dev_node,
            vfio_dev_node_exists,
            memlock: self.memlock_limit(),
            sysfs_path: path,
        }
    }

    fn group_members(&self, group: u32) -> Vec<GroupMember> {
        let dir = self
            .sysfs_root
            .join("kernel/iommu_groups")
            .join(group.to_string())
            .join("devices");
        let mut members: Vec<GroupMember> = fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            // Only PCI devices are named like a BDF; VFIO-PCI groups hold nothing else.
            .filter_map(|e| e.file_name().to_str().and_then(|n| Bdf::parse(n).ok()))
            .map(|bdf| {
                let driver = self.driver_of(bdf);
                let class = self.class_of(bdf);
                GroupMember {
                    status: MemberStatus::of(driver.as_deref(), class),
                    bdf,
                    driver,
                    class,
                }
            })
            .collect();
        members.sort_by_key(|m| m.bdf);
        members
    }

    /// The checks the VMM makes before it opens VFIO for `bdf` in a guest with
    /// `guest_ram_bytes` of RAM; the first failure wins.
    pub fn preflight(&self, bdf: Bdf, guest_ram_bytes: u64) -> Result<Assignable, Problem> {
        self.inspect(bdf).verdict(guest_ram_bytes)
    }

    /// The checks that must pass before vfio-pci can take the device at all.
    fn bindable(&self, bdf: Bdf) -> Result<(), Problem> {
        let path = self.device_path(bdf);
        if !path.is_dir() {
            return Err(Problem::NoSuchDevice { bdf, path });
        }
        if !self.iommu_enabled() {
            return Err(Problem::NoIommu {
                bdf,
                cpu: self.cpu(),
            });
        }
        if self.group_of(bdf).is_none() {
            return Err(Problem::NoIommuGroup { bdf });
        }
        Ok(())
    }

    fn write(&self, bdf: Bdf, path: PathBuf, value: &str) -> Result<(), BindError> {
        self.writer.write(&path, value).map_err(|source| {
            if source.kind() == io::ErrorKind::PermissionDenied {
                BindError::PermissionDenied { bdf, path, source }
            } else {
                BindError::Write {
                    bdf,
                    path,
                    value: value.to_string(),
                    source,
                }
            }
        })
    }

    /// Gives `bdf` to vfio-pci: writes `vfio-pci` to its `driver_override`, unbinds it from
    /// its current driver, writes it to `drivers_probe`, and checks that vfio-pci has it.
    /// Refuses before writing anything when vfio-pci could not take it (no IOMMU, no group,
    /// vfio-pci not loaded), so a host device is never left driverless for nothing.
    pub fn bind(&self, bdf: Bdf) -> Result<BindOutcome, BindError> {
        self.bindable(bdf)?;
        let previous = self.driver_of(bdf);
        if previous.as_deref() == Some(VFIO_PCI) {
            return Ok(BindOutcome {
                bdf,
                previous,
                already_bound: true,
            });
        }
        if !self.vfio_pci_loaded() {
            return Err(BindError::VfioPciNotLoaded { bdf });
        }
        let name = bdf.to_string();
        self.write(bdf, self.device_path(bdf).join("driver_override"), VFIO_PCI)?;
        if let Some(d) = &previous {
            self.write(bdf, self.pci_path("drivers").join(d).join("unbind"), &name)?;
        }
        let probe = match self.writer.write(&self.pci_path("drivers_probe"), &name) {
            Err(source) if source.kind() == io::ErrorKind::PermissionDenied => {
                return Err(BindError::PermissionDenied {
                    bdf,
                    path: self.pci_path("drivers_probe"),
                    source,
                })
            }
            r => r.err(),
        };
        match self.driver_of(bdf) {
            Some(d) if d == VFIO_PCI => Ok(BindOutcome {
                bdf,
                previous,
                already_bound: false,
            }),
            _ if !self.vfio_pci_loaded() => Err(BindError::VfioPciNotLoaded { bdf }),
            driver => Err(BindError::NotTaken { bdf, driver, probe }),
        }
    }

    /// Gives `bdf` back to the host: unbinds it from vfio-pci, clears `driver_override`, and
    /// writes it to `drivers_probe` so its host driver takes it. A device on another driver
    /// is left there (only a stale `driver_override` is cleared).
    pub fn unbind(&self, bdf: Bdf) -> Result<UnbindOutcome, BindError> {
        let path = self.device_path(bdf);
        if !path.is_dir() {
            return Err(Problem::NoSuchDevice { bdf, path }.into());
        }
        let name = bdf.to_string();
        let previous = self.driver_of(bdf);
        let has_override = self.driver_override_of(bdf).is_some();
        if previous.as_deref() == Some(VFIO_PCI) {
            self.write(
                bdf,
                self.pci_path("drivers").join(VFIO_PCI).join("unbind"),
                &name,
            )?;
        }
        if has_override {
            self.write(bdf, path.join("driver_override"), "\n")?;
        }
        if previous.is_some() && previous.as_deref() != Some(VFIO_PCI) {
            return Ok(UnbindOutcome {
                bdf,
                now: previous.clone(),
                previous,
            });
        }
        match self.writer.write(&self.pci_path("drivers_probe"), &name) {
            Err(source) if source.kind() == io::ErrorKind::PermissionDenied => {
                return Err(BindError::PermissionDenied {
                    bdf,
                    path: self.pci_path("drivers_probe"),
                    source,
                })
            }
            Err(source) => return Err(BindError::HostProbeFailed { bdf, source }),
            Ok(()) => {}
        }
        Ok(UnbindOutcome {
            bdf,
            previous,
            now: self.driver_of(bdf),
        })
    }
}

impl DeviceReport {
    /// Guest RAM plus headroom: the memlock VFIO needs.
    pub fn memlock_needed(guest_ram_bytes: u64) -> u64 {
        guest_ram_bytes.saturating_add(MEMLOCK_HEADROOM)
    }

    /// The preflight result from what was read; the first failure wins.
    pub fn verdict(&self, guest_ram_bytes: u64) -> Result<Assignable, Problem> {
        let bdf = self.bdf;
        if !self.exists {
            return Err(Problem::NoSuchDevice {
                bdf,
                path: self.sysfs_path.clone(),
            });
        }
        if !self.iommu_enabled {
            return Err(Problem::NoIommu { bdf, cpu: self.cpu });
        }
        let Some(group) = self.group else {
            return Err(Problem::NoIommuGroup { bdf });
        };
        if self.driver.as_deref() != Some(VFIO_PCI) {
            return Err(Problem::NotBoundToVfio {
                bdf,
                driver: self.driver.clone(),
            });
        }
        let offender = self.group_members.iter().find_map(|m| match &m.status {
            MemberStatus::HostDriver(d) if m.bdf != bdf => Some((m.bdf, d.clone())),
            _ => None,
        });
        if let Some((other, other_driver)) = offender {
            return Err(Problem::GroupNotViable {
                bdf,
                group,
                other,
                other_driver,
            });
        }
        if !self.vfio_dev_node_exists {
            return Err(Problem::NoVfioDevNode {
                bdf,
                group,
                path: self.vfio_dev_node.clone().unwrap_or_default(),
            });
        }
        let need = Self::memlock_needed(guest_ram_bytes);
        if !self.memlock.covers(need) {
            return Err(Problem::MemlockTooLow {
                bdf,
                have: self.memlock.bytes.unwrap_or(u64::MAX),
                need,
                guest_ram: guest_ram_bytes,
            });
        }
        Ok(Assignable {
            bdf,
            group,
            sysfs_path: self.sysfs_path.clone(),
        })
    }

    /// The multi-line report `passthrough check` prints (without the verdict line).
    pub fn render(&self, guest_ram_bytes: u64) -> String {
        let mut s = String::new();
        // fmt::Write into a String cannot fail.
        let _ = self.render_into(&mut s, guest_ram_bytes);
        s
    }

    fn render_into(&self, s: &mut String, guest_ram: u64) -> fmt::Result {
        let yes_no = |b: bool, y: &'static str, n: &'static str| if b { y } else { n };
        writeln!(s, "PCI device {} ({})", self.bdf, self.sysfs_path.display())?;
        if !self.exists {
            writeln!(s, "  present:         no")?;
            return Ok(());
        }
        match self.ids {
            Some(i) => writeln!(
                s,
                "  ids:             {:04x}:{:04x}, class {:06x}{}",
                i.vendor,
                i.device,
                i.class,
                if i.class >> 8 == CLASS_PCI_BRIDGE {
                    " (PCI bridge)"
                } else {
                    ""
                }
            )?,
            None => writeln!(s, "  ids:             unreadable")?,
        }
        writeln!(
            s,
            "  driver:          {}",
            self.driver.as_deref().unwrap_or("none")
        )?;
        writeln!(
            s,
            "  driver_override: {}",
            self.driver_override.as_deref().unwrap_or("none")
        )?;
        writeln!(
            s,
            "  IOMMU:           {}",
            yes_no(
                self.iommu_enabled,
                "on",
                "off (/sys/class/iommu and /sys/kernel/iommu_groups are empty)"
            )
        )?;
        match self.group {
            None => writeln!(s, "  IOMMU group:     none")?,
            Some(g) => {
                let n = self.group_members.len();
                writeln!(
                    s,
                    "  IOMMU group:     {g} ({n} device{})",
                    if n == 1 { "" } else { "s" }
                )?;
                for m in &self.group_members {
                    let verdict = match &m.status {
                        MemberStatus::VfioPci => "OK (vfio-pci)",
                        MemberStatus::NoDriver => "OK (no driver)",
                        MemberStatus::Stub => "OK (pci-stub)",
                        MemberStatus::Bridge(_) => "OK (PCI bridge)",
                        MemberStatus::HostDriver(_) => "NOT OK (a host driver holds it)",
                    };
                    let this = if m.bdf == self.bdf {
                        "  <- this device"
                    } else {
                        ""
                    };
                    writeln!(
                        s,
                        "    {}  {:<12} {verdict}{this}",
                        m.bdf,
                        m.driver.as_deref().unwrap_or("-")
                    )?;
                }
            }
        }
        let reset = match &self.reset {
            ResetSupport::Methods(m) if m.is_empty() => "none offered".to_string(),
            ResetSupport::Methods(m) => m.join(", "),
            ResetSupport::Unlisted => "offered (the kernel does not list the methods)".to_string(),
            ResetSupport::None => "none offered".to_string(),
        };
        writeln!(s, "  reset:           {reset}")?;
        let need = Self::memlock_needed(guest_ram);
        let memlock = format!(
            "{}, need {} for {} of guest RAM: {}",
            self.memlock,
            format_size(need),
            format_size(guest_ram),
            match (
                self.memlock.bytes.is_none_or(|b| b >= need),
                self.memlock.cap_ipc_lock
            ) {
                (true, _) => "OK",
                (false, true) => "OK (CAP_IPC_LOCK: the limit does not apply)",
                (false, false) => "too low",
            }
        );
        writeln!(s, "  memlock:         {memlock}")?;
        writeln!(
            s,
            "  vfio-pci driver: {}",
            yes_no(self.vfio_pci_loaded, "loaded", "not loaded")
        )?;
        match &self.vfio_dev_node {
            Some(p) => writeln!(
                s,
                "  VFIO group node: {} {}",
                p.display(),
                yes_no(self.vfio_dev_node_exists, "present", "missing")
            )?,
            None => writeln!(s, "  VFIO group node: none (no IOMMU group)")?,
        }
        Ok(())
    }
}

/// The last component of a symlink's target (`driver` -> `../../bus/pci/drivers/e1000e`).
fn link_name(link: &Path) -> Option<String> {
    fs::read_link(link)
        .ok()?
        .file_name()?
        .to_str()
        .map(String::from)
}

fn read_trimmed(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

/// A sysfs hex attribute (`0x8086`, `0x020000`).
fn read_hex(path: &Path) -> Option<u32> {
    let s = read_trimmed(path)?;
    u32::from_str_radix(s.strip_prefix("0x").unwrap_or(&s), 16).ok()
}

fn dir_non_empty(path: &Path) -> bool {
    fs::read_dir(path).is_ok_and(|mut d| d.next().is_some())
}

#[cfg(test)]
mod tests;
