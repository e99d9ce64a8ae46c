//! Command line and VM configuration.
//!
//! The command line is parsed by clap into [`Cli`], then turned into a validated
//! [`VmConfig`]. Everything that can be checked without KVM is checked here so that a
//! user's mistake is reported before any resource is created.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use thiserror::Error;

/// Smallest guest RAM accepted: the boot structures, a kernel and an initramfs must fit.
pub const MIN_MEMORY: u64 = 16 << 20;
/// APIC IDs are 8 bits in the MADT entries we write.
pub const MAX_CPUS_APIC: u8 = 254;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("invalid --memory '{0}': expected a size like 512M or 2G (suffixes K, M, G, T)")]
    BadSize(String),
    #[error("--memory {given} MiB is too small: the guest needs at least {min} MiB; use --memory 64M or more")]
    MemoryTooSmall { given: u64, min: u64 },
    #[error("--memory {given} MiB is more than this host's {host} MiB of RAM; choose a smaller --memory")]
    MemoryTooLarge { given: u64, host: u64 },
    #[error("--cpus 0: a guest needs at least one vCPU; use --cpus 1 or more")]
    ZeroCpus,
    #[error("{0}")]
    ApiSocket(String),
    #[error("{0}")]
    Sandbox(String),
    #[error("--cpus {given} is above the limit of {max} vCPUs; use --cpus {max} or fewer")]
    TooManyCpus { given: u64, max: u64 },
    #[error("invalid --serial '{0}': expected stdio, off or file=PATH")]
    BadSerial(String),
    #[error("invalid {option} '{value}': {why}")]
    BadDevice {
        option: &'static str,
        value: String,
        why: String,
    },
    #[error("device id '{0}' is used twice; give each --disk/--net a distinct id=")]
    DuplicateId(String),
}

/// Splits `key=value,key=value` into pairs, rejecting keys not in `known`.
fn parse_kv(
    option: &'static str,
    value: &str,
    known: &[&str],
) -> Result<Vec<(String, String)>, ConfigError> {
    let bad = |why: String| ConfigError::BadDevice {
        option,
        value: value.to_string(),
        why,
    };
    let mut out: Vec<(String, String)> = Vec::new();
    for part in value.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| bad(format!("'{part}' is not key=value")))?;
        if !known.contains(&k) {
            return Err(bad(format!(
                "unknown key '{k}' (known: {})",
                known.join(", ")
            )));
        }
        if out.iter().any(|(x, _)| x == k) {
            return Err(bad(format!("'{k}' given twice")));
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

fn parse_bool(option: &'static str, value: &str, k: &str, v: &str) -> Result<bool, ConfigError> {
    match v {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(ConfigError::BadDevice {
            option,
            value: value.to_string(),
            why: format!("{k}={v}: expected on or off"),
        }),
    }
}

fn parse_num<T: std::str::FromStr>(
    option: &'static str,
    value: &str,
    k: &str,
    v: &str,
) -> Result<T, ConfigError> {
    v.parse().map_err(|_| ConfigError::BadDevice {
        option,
        value: value.to_string(),
        why: format!("{k}={v}: not a number"),
    })
}

/// `poll_us=N`: microseconds, 0 (off) to `backends::poll::MAX_POLL_US`.
fn parse_poll_us(option: &'static str, value: &str, k: &str, v: &str) -> Result<u64, ConfigError> {
    let us: u64 = parse_num(option, value, k, v)?;
    backends::poll::check_poll_us(us).map_err(|why| ConfigError::BadDevice {
        option,
        value: value.to_string(),
        why: format!("{k}={why}"),
    })?;
    Ok(us)
}

/// The most queues a device takes, and the largest queue size (virtio's split-ring limit).
pub const MAX_QUEUES: u16 = 64;
pub const MAX_QUEUE_SIZE: u16 = 32768;

fn check_queues(
    option: &'static str,
    value: &str,
    queues: u16,
    size: u16,
) -> Result<(), ConfigError> {
    let bad = |why: String| ConfigError::BadDevice {
        option,
        value: value.to_string(),
        why,
    };
    if queues == 0 || queues > MAX_QUEUES {
        return Err(bad(format!("queues={queues}: expected 1 to {MAX_QUEUES}")));
    }
    if !size.is_power_of_two() || !(2..=MAX_QUEUE_SIZE).contains(&size) {
        return Err(bad(format!(
            "queue_size={size}: expected a power of two from 2 to {MAX_QUEUE_SIZE}"
        )));
    }
    Ok(())
}

/// `--disk path=IMG[,readonly=on][,direct=on][,queues=N][,queue_size=N][,poll_us=N][,id=NAME]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub readonly: bool,
    pub direct: bool,
    /// Queues; without `queues=`, one per vCPU (set by [`VmConfig::from_cli`]), as QEMU's
    /// virtio-blk does: each vCPU then submits and completes on its own queue and vector, and
    /// a completion needs no IPI to the submitting CPU.
    pub queues: u16,
    pub queues_given: bool,
    pub queue_size: u16,
    /// Busy-poll window after work, in µs (0: off).
    pub poll_us: u64,
    pub id: String,
}

impl DiskConfig {
    pub fn parse(value: &str, index: usize) -> Result<Self, ConfigError> {
        const O: &str = "--disk";
        let kv = parse_kv(
            O,
            value,
            &[
                "path",
                "readonly",
                "direct",
                "queues",
                "queue_size",
                "poll_us",
                "id",
            ],
        )?;
        let mut d = DiskConfig {
            path: PathBuf::new(),
            readonly: false,
            direct: false,
            queues: 1,
            queues_given: false,
            queue_size: 256,
            poll_us: 0,
            id: format!("disk{index}"),
        };
        for (k, v) in &kv {
            match k.as_str() {
                "path" => d.path = PathBuf::from(v),
                "readonly" => d.readonly = parse_bool(O, value, k, v)?,
                "direct" => d.direct = parse_bool(O, value, k, v)?,
                "queues" => {
                    d.queues = parse_num(O, value, k, v)?;
                    d.queues_given = true;
                }
                "queue_size" => d.queue_size = parse_num(O, value, k, v)?,
                "poll_us" => d.poll_us = parse_poll_us(O, value, k, v)?,
                _ => d.id = v.clone(),
            }
        }
        if d.path.as_os_str().is_empty() {
            return Err(ConfigError::BadDevice {
                option: O,
                value: value.to_string(),
                why: "path= is required (the disk image)".into(),
            });
        }
        check_queues(O, value, d.queues, d.queue_size)?;
        Ok(d)
    }
}

/// `--net tap=NAME[,mac=MAC][,queues=N][,queue_size=N][,poll_us=N][,id=NAME]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub tap: String,
    pub mac: [u8; 6],
    /// Queue pairs.
    pub queues: u16,
    pub queue_size: u16,
    /// Busy-poll window after work, in µs (0: off).
    pub poll_us: u64,
    pub id: String,
}

/// `--vhost-user-blk socket=PATH[,queues=N][,queue_size=N][,timeout_ms=N][,server=on|off]
/// [,connect_timeout_ms=N][,stats=PATH][,id=NAME]` and `--vhost-user-net` likewise plus
/// `[,mac=MAC]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostUserConfig {
    pub socket: PathBuf,
    pub net: bool,
    /// Queues (blk) or queue pairs (net).
    pub queues: u16,
    pub queue_size: u16,
    pub mac: Option<[u8; 6]>,
    pub id: String,
    /// How long the back-end may take to answer one message before it counts as gone.
    pub timeout: Duration,
    /// The VMM listens at `socket` and the back-end connects.
    pub server: bool,
    /// Server mode: how long boot waits for the first back-end (None: as long as it takes).
    pub connect_timeout: Option<Duration>,
    /// The back-end's stats endpoint (our daemons' `--stats-socket`), relayed into
    /// `vm.counters`.
    pub stats: Option<PathBuf>,
}

impl VhostUserConfig {
    pub fn parse(value: &str, net: bool, index: usize) -> Result<Self, ConfigError> {
        let o: &'static str = if net {
            "--vhost-user-net"
        } else {
            "--vhost-user-blk"
        };
        const COMMON: [&str; 8] = [
            "socket",
            "stats",
            "queues",
            "queue_size",
            "timeout_ms",
            "server",
            "connect_timeout_ms",
            "id",
        ];
        let net_keys: Vec<&str> = COMMON.iter().copied().chain(["mac"]).collect();
        let known: &[&str] = if net { &net_keys } else { &COMMON };
        let kv = parse_kv(o, value, known)?;
        let bad = |why: String| ConfigError::BadDevice {
            option: o,
            value: value.to_string(),
            why,
        };
        let mut c = VhostUserConfig {
            socket: PathBuf::new(),
            net,
            queues: 1,
            queue_size: 256,
            mac: None,
            id: format!("{}{index}", if net { "vunet" } else { "vublk" }),
            timeout: crate::virtio::vhost_user::DEFAULT_TIMEOUT,
            server: false,
            connect_timeout: None,
            stats: None,
        };
        let ms = |k: &str, v: &str| -> Result<Duration, ConfigError> {
            let n: u64 = parse_num(o, value, k, v)?;
            if !(1..=3_600_000).contains(&n) {
                return Err(bad(format!("{k}={v}: expected 1 to 3600000 (ms)")));
            }
            Ok(Duration::from_millis(n))
        };
        for (k, v) in &kv {
            match k.as_str() {
                "socket" => c.socket = PathBuf::from(v),
                "stats" => c.stats = Some(PathBuf::from(v)),
                "queues" => c.queues = parse_num(o, value, k, v)?,
                "queue_size" => c.queue_size = parse_num(o, value, k, v)?,
                "timeout_ms" => c.timeout = ms(k, v)?,
                "connect_timeout_ms" => c.connect_timeout = Some(ms(k, v)?),
                "server" => {
                    c.server = match v.as_str() {
                        "on" => true,
                        "off" => false,
                        _ => return Err(bad(format!("server={v}: expected on or off"))),
                    }
                }
                "mac" => {
                    c.mac = Some(
                        parse_mac(v)
                            .ok_or_else(|| bad(format!("mac={v}: expected xx:xx:xx:xx:xx:xx")))?,
                    )
                }
                _ => c.id = v.clone(),
            }
        }
        if c.socket.as_os_str().is_empty() {
            return Err(bad(
                "socket= is required (the back-end's unix socket)".into()
            ));
        }
        if c.connect_timeout.is_some() && !c.server {
            return Err(bad(
                "connect_timeout_ms= needs server=on (it bounds the wait for the back-end to connect)".into(),
            ));
        }
        check_queues(o, value, c.queues, c.queue_size)?;
        Ok(c)
    }
}

/// Parses `52:54:00:12:34:56`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

impl NetConfig {
    pub fn parse(value: &str, index: usize) -> Result<Self, ConfigError> {
        const O: &str = "--net";
        let kv = parse_kv(
            O,
            value,
            &["tap", "mac", "queues", "queue_size", "poll_us", "id"],
        )?;
        let bad = |why: String| ConfigError::BadDevice {
            option: O,
            value: value.to_string(),
            why,
        };
        let mut n = NetConfig {
            tap: String::new(),
            // Locally administered, unicast; the last byte tells devices apart.
            mac: [
                0x52,
                0x54,
                0x00,
                0x12,
                0x34,
                0x56u8.wrapping_add(index as u8),
            ],
            queues: 1,
            queue_size: 256,
            poll_us: 0,
            id: format!("net{index}"),
        };
        for (k, v) in &kv {
            match k.as_str() {
                "tap" => n.tap = v.clone(),
                "mac" => {
                    n.mac = parse_mac(v)
                        .ok_or_else(|| bad(format!("mac={v}: expected xx:xx:xx:xx:xx:xx")))?;
                    if n.mac[0] & 1 != 0 {
                        return Err(bad(format!("mac={v} is a multicast address")));
                    }
                }
                "queues" => n.queues = parse_num(O, value, k, v)?,
                "queue_size" => n.queue_size = parse_num(O, value, k, v)?,
                "poll_us" => n.poll_us = parse_poll_us(O, value, k, v)?,
                _ => n.id = v.clone(),
            }
        }
        if n.tap.is_empty() || n.tap.len() > 15 {
            return Err(bad(
                "tap= is required: a tap device name of 1 to 15 characters".into(),
            ));
        }
        check_queues(O, value, n.queues, n.queue_size)?;
        Ok(n)
    }
}

/// Where the guest's COM1 goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialMode {
    Stdio,
    Off,
    File(PathBuf),
}

impl std::str::FromStr for SerialMode {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdio" => Ok(SerialMode::Stdio),
            "off" => Ok(SerialMode::Off),
            _ => match s.strip_prefix("file=") {
                Some(p) if !p.is_empty() => Ok(SerialMode::File(PathBuf::from(p))),
                _ => Err(ConfigError::BadSerial(s.to_string())),
            },
        }
    }
}

/// Parses a size such as `512M`, `2G`, `2GiB`, `65536K` or a plain number of bytes (the
/// same parser as `passthrough check --memory`).
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    passthrough::host::parse_size(s).map_err(|_| ConfigError::BadSize(s.to_string()))
}

/// `vmm` command line.
#[derive(Debug, Parser)]
#[command(
    name = "vmm",
    version,
    about = "A KVM virtual machine monitor focused on I/O devices",
    long_about = "Boots a Linux bzImage or a PVH ELF kernel on KVM.\n\n\
        Exit status: 0 when the guest powers off or reboots; (N<<1)|1 when the guest \
        writes N to the debug-exit port 0xf4 (as QEMU's isa-debug-exit); 2 for a \
        configuration or host error; 4 when the guest crashes (triple fault, KVM \
        internal error); 6 for an internal VMM error."
)]
pub struct Cli {
    /// Kernel image: a bzImage, or an ELF with a PVH note.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// Initial ramdisk loaded for the kernel.
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(
        long,
        value_name = "STR",
        default_value = "console=ttyS0 reboot=k panic=-1"
    )]
    pub cmdline: String,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u64,
    /// Guest RAM, e.g. 512M or 2G.
    #[arg(long, value_name = "SIZE", default_value = "512M")]
    pub memory: String,
    /// Guest serial console (COM1): stdio, off or file=PATH.
    #[arg(long, value_name = "stdio|off|file=PATH", default_value = "stdio")]
    pub serial: String,
    /// Write the vCPU exit counters as JSON to this file when the VM stops.
    #[arg(long, value_name = "PATH")]
    pub exit_stats: Option<PathBuf>,
    /// Every SECS seconds, check that the guest makes progress; when it stops (no exit to
    /// the VMM for that long while a vCPU runs, or a vCPU halted with interrupts off), log
    /// every vCPU's registers once (default 0: off; at most 3600)
    #[arg(long, value_name = "SECS", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub watchdog: u64,
    /// The control API: HTTP/1.1 with JSON on a unix socket, Cloud Hypervisor's endpoint
    /// names (`curl --unix-socket PATH http://localhost/api/v1/vm.info`; client:
    /// `vmm-remote`). path=PATH creates the socket (a stale one is replaced, a live one
    /// refused; removed at exit); fd=N uses an inherited listening socket
    #[arg(long, value_name = "path=PATH|fd=N")]
    pub api_socket: Option<String>,
    /// A virtio-blk disk emulated in the VMM (repeatable):
    /// path=IMG[,readonly=on][,direct=on][,queues=N][,queue_size=N][,poll_us=N][,id=NAME].
    /// poll_us=N: after work, each queue thread keeps polling the queue (guest doorbells
    /// off) for N µs before sleeping; lower latency for a busy core (default 0: off; at
    /// most 1000000)
    #[arg(long, value_name = "path=IMG,...")]
    pub disk: Vec<String>,
    /// A virtio-net NIC emulated in the VMM on a tap (repeatable; the tap is created when
    /// missing): tap=NAME[,mac=MAC][,queues=N][,queue_size=N][,poll_us=N][,id=NAME].
    /// poll_us=N: after work, each queue pair's thread keeps polling its TX queue and the
    /// tap for N µs before sleeping (default 0: off; at most 1000000)
    #[arg(long, value_name = "tap=NAME,...")]
    pub net: Vec<String>,
    /// A virtio-blk disk served by a vhost-user back-end (repeatable):
    /// socket=PATH[,queues=N][,queue_size=N][,timeout_ms=N][,server=on][,connect_timeout_ms=N][,stats=PATH][,id=NAME].
    /// timeout_ms: how long the back-end may take to answer a message (default 3000);
    /// server=on: the VMM listens at PATH and the back-end connects (boot waits for it, at
    /// most connect_timeout_ms)
    #[arg(long, value_name = "socket=PATH,...")]
    pub vhost_user_blk: Vec<String>,
    /// A virtio-net NIC served by a vhost-user back-end (repeatable):
    /// socket=PATH[,queues=N][,queue_size=N][,mac=MAC][,timeout_ms=N][,server=on][,connect_timeout_ms=N][,stats=PATH][,id=NAME]
    #[arg(long, value_name = "socket=PATH,...")]
    pub vhost_user_net: Vec<String>,
    /// A host PCI device assigned to the guest through VFIO (repeatable; bind it to
    /// vfio-pci first: `passthrough bind BDF`): host=BDF|SYSFS_PATH[,rom=on][,id=NAME]
    #[arg(long, value_name = "host=BDF,...")]
    pub vfio: Vec<String>,
    /// Seccomp filters per thread (vCPUs, device queues, vhost-user, VFIO DMA mapping,
    /// API, signals, control): on (a syscall outside a thread's list kills the vmm, after
    /// one line on stderr naming the thread and the syscall), log (that line once per
    /// thread kind and syscall, and the syscall runs: to find what a new workload needs),
    /// off
    #[arg(long, value_name = "on|log|off", default_value = "on")]
    pub seccomp: backends::sandbox::SeccompMode,
    /// Landlock (when the kernel has it): the vmm may open only the files its command line
    /// names (kernel, initramfs, disk images, socket directories of server=on), /dev/kvm,
    /// /dev/net/tun, /dev/vfio and the sysfs files VFIO reads, and --landlock-rules. Without
    /// Landlock in the kernel the vmm says so in one line and goes on
    #[arg(long, value_name = "on|off", default_value = "on")]
    pub landlock: backends::sandbox::Switch,
    /// A path hotplug will need (repeatable): path=PATH,access=r|rw. r: read files
    /// beneath; rw: also write them and create or remove files and sockets beneath (a disk
    /// image to vm.add-disk, a directory of images, a server=on socket's directory)
    #[arg(long, value_name = "path=PATH,access=r|rw")]
    pub landlock_rules: Vec<String>,
    /// Test hook, not for use: `syscall` makes the first block queue thread that serves a
    /// request call getpgid(2), outside its seccomp list; `open:PATH` makes it open PATH.
    /// The result goes to stderr. It exists so that tests can prove, with the real binary,
    /// that a device thread is confined.
    #[arg(long, value_name = "syscall|open:PATH", hide = true)]
    pub sandbox_selftest: Option<String>,
}

/// `--vfio host=BDF|SYSFS_PATH[,id=NAME]`: a host PCI device assigned through VFIO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfioConfig {
    /// As given (`0000:3b:00.0`, `3b:00.0` or `/sys/bus/pci/devices/...`).
    pub host: String,
    pub bdf: passthrough::host::Bdf,
    pub id: String,
    /// Show the device's expansion ROM to the guest.
    pub rom: bool,
}

impl VfioConfig {
    pub fn parse(value: &str, index: usize) -> Result<Self, ConfigError> {
        const O: &str = "--vfio";
        let kv = parse_kv(O, value, &["host", "id", "rom"])?;
        let mut c = VfioConfig {
            host: String::new(),
            bdf: passthrough::host::Bdf::new(0, 0, 0, 0),
            id: format!("vfio{index}"),
            rom: false,
        };
        for (k, v) in kv {
            match k.as_str() {
                "host" => c.host = v,
                "rom" => c.rom = parse_bool(O, value, &k, &v)?,
                _ => c.id = v,
            }
        }
        if c.host.is_empty() {
            return Err(ConfigError::BadDevice {
                option: O,
                value: value.to_string(),
                why: "host= is required: the device's PCI address (e.g. host=0000:3b:00.0) or sysfs path".into(),
            });
        }
        c.bdf = passthrough::host::Bdf::parse(&c.host).map_err(|e| ConfigError::BadDevice {
            option: O,
            value: value.to_string(),
            why: e.to_string(),
        })?;
        Ok(c)
    }
}

/// A validated VM configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: u8,
    pub memory: u64,
    pub serial: SerialMode,
    pub exit_stats: Option<PathBuf>,
    /// `--watchdog`: the sampling period, None when off.
    pub watchdog: Option<std::time::Duration>,
    /// `--api-socket`.
    pub api_socket: Option<crate::api::ApiSocket>,
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    pub vhost_user: Vec<VhostUserConfig>,
    pub vfio: Vec<VfioConfig>,
    /// `--seccomp`, `--landlock`, `--landlock-rules`.
    pub sandbox: crate::sandbox::SandboxConfig,
}

/// Host facts that bound the configuration (read from the host in `main`, faked in tests).
#[derive(Debug, Clone, Copy)]
pub struct HostLimits {
    pub max_cpus: u64,
    pub host_memory: u64,
}

impl VmConfig {
    pub fn from_cli(cli: &Cli, limits: HostLimits) -> Result<Self, ConfigError> {
        let memory = parse_size(&cli.memory)?;
        if memory < MIN_MEMORY {
            return Err(ConfigError::MemoryTooSmall {
                given: memory >> 20,
                min: MIN_MEMORY >> 20,
            });
        }
        if memory > limits.host_memory {
            return Err(ConfigError::MemoryTooLarge {
                given: memory >> 20,
                host: limits.host_memory >> 20,
            });
        }
        if cli.cpus == 0 {
            return Err(ConfigError::ZeroCpus);
        }
        let max = limits.max_cpus.min(u64::from(MAX_CPUS_APIC));
        if cli.cpus > max {
            return Err(ConfigError::TooManyCpus {
                given: cli.cpus,
                max,
            });
        }
        let mut disks = cli
            .disk
            .iter()
            .enumerate()
            .map(|(i, d)| DiskConfig::parse(d, i))
            .collect::<Result<Vec<_>, _>>()?;
        for d in disks.iter_mut().filter(|d| !d.queues_given) {
            d.queues = (cli.cpus as u16).clamp(1, MAX_QUEUES);
        }
        let nets = cli
            .net
            .iter()
            .enumerate()
            .map(|(i, n)| NetConfig::parse(n, i))
            .collect::<Result<Vec<_>, _>>()?;
        let mut vhost_user = Vec::new();
        for (i, v) in cli.vhost_user_blk.iter().enumerate() {
            vhost_user.push(VhostUserConfig::parse(v, false, i)?);
        }
        for (i, v) in cli.vhost_user_net.iter().enumerate() {
            vhost_user.push(VhostUserConfig::parse(v, true, i)?);
        }
        let vfio = cli
            .vfio
            .iter()
            .enumerate()
            .map(|(i, v)| VfioConfig::parse(v, i))
            .collect::<Result<Vec<_>, _>>()?;
        let mut ids: Vec<&str> = disks
            .iter()
            .map(|d| d.id.as_str())
            .chain(nets.iter().map(|n| n.id.as_str()))
            .chain(vhost_user.iter().map(|v| v.id.as_str()))
            .chain(vfio.iter().map(|v| v.id.as_str()))
            .collect();
        ids.sort_unstable();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(ConfigError::DuplicateId(w[0].to_string()));
        }
        let rules = cli
            .landlock_rules
            .iter()
            .map(|r| crate::sandbox::LandlockRule::parse(r))
            .collect::<Result<Vec<_>, _>>()
            .map_err(ConfigError::Sandbox)?;
        let selftest = cli
            .sandbox_selftest
            .as_deref()
            .map(crate::sandbox::Selftest::parse)
            .transpose()
            .map_err(ConfigError::Sandbox)?;
        Ok(VmConfig {
            sandbox: crate::sandbox::SandboxConfig {
                seccomp: cli.seccomp,
                landlock: cli.landlock,
                rules,
                selftest,
            },
            vfio,
            disks,
            nets,
            vhost_user,
            kernel: cli.kernel.clone(),
            initramfs: cli.initramfs.clone(),
            cmdline: cli.cmdline.clone(),
            cpus: cli.cpus as u8,
            memory,
            serial: cli.serial.parse()?,
            exit_stats: cli.exit_stats.clone(),
            watchdog: (cli.watchdog > 0).then(|| std::time::Duration::from_secs(cli.watchdog)),
            api_socket: cli
                .api_socket
                .as_deref()
                .map(crate::api::ApiSocket::parse)
                .transpose()
                .map_err(ConfigError::ApiSocket)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HostLimits = HostLimits {
        max_cpus: 2,
        host_memory: 8 << 30,
    };

    fn cli(args: &[&str]) -> Cli {
        let mut v = vec!["vmm", "--kernel", "/k"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).expect("parse")
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn defaults() {
        let c = VmConfig::from_cli(&cli(&[]), LIMITS).unwrap();
        assert_eq!(c.cpus, 1);
        assert_eq!(c.memory, 512 << 20);
        assert_eq!(c.serial, SerialMode::Stdio);
        assert!(c.cmdline.contains("console=ttyS0"));
        assert_eq!(c.initramfs, None);
    }

    #[test]
    fn full_command_line() {
        let c = VmConfig::from_cli(
            &cli(&[
                "--initramfs",
                "/i",
                "--cmdline",
                "console=ttyS0 quiet",
                "--cpus",
                "2",
                "--memory",
                "1G",
                "--serial",
                "file=/tmp/x",
            ]),
            LIMITS,
        )
        .unwrap();
        assert_eq!(c.cpus, 2);
        assert_eq!(c.memory, 1 << 30);
        assert_eq!(c.cmdline, "console=ttyS0 quiet");
        assert_eq!(c.serial, SerialMode::File(PathBuf::from("/tmp/x")));
        assert_eq!(c.initramfs, Some(PathBuf::from("/i")));
    }

    #[test]
    fn bad_inputs() {
        let e = |args: &[&str]| VmConfig::from_cli(&cli(args), LIMITS).unwrap_err();
        assert_eq!(e(&["--cpus", "0"]), ConfigError::ZeroCpus);
        assert_eq!(
            e(&["--cpus", "3"]),
            ConfigError::TooManyCpus { given: 3, max: 2 }
        );
        assert_eq!(
            e(&["--memory", "1M"]),
            ConfigError::MemoryTooSmall { given: 1, min: 16 }
        );
        assert_eq!(
            e(&["--memory", "16G"]),
            ConfigError::MemoryTooLarge {
                given: 16384,
                host: 8192
            }
        );
        assert!(matches!(e(&["--memory", "lots"]), ConfigError::BadSize(_)));
        assert!(matches!(
            e(&["--serial", "tcp:1"]),
            ConfigError::BadSerial(_)
        ));
        assert!(matches!(
            e(&["--serial", "file="]),
            ConfigError::BadSerial(_)
        ));
        // Messages say what to do.
        assert!(e(&["--cpus", "0"]).to_string().contains("use --cpus 1"));
        assert!(e(&["--memory", "1M"]).to_string().contains("--memory 64M"));
    }

    #[test]
    fn kernel_is_required() {
        assert!(Cli::try_parse_from(["vmm"]).is_err());
        assert!(Cli::try_parse_from(["vmm", "--cpus", "x", "--kernel", "k"]).is_err());
    }

    #[test]
    fn disk_options() {
        let d = DiskConfig::parse(
            "path=/img,readonly=on,direct=on,queues=2,queue_size=128,id=root",
            0,
        )
        .unwrap();
        assert_eq!(d.path, PathBuf::from("/img"));
        assert!(d.readonly && d.direct);
        assert_eq!((d.queues, d.queue_size, d.id.as_str()), (2, 128, "root"));
        let d = DiskConfig::parse("path=/img", 3).unwrap();
        assert_eq!((d.readonly, d.queues, d.queue_size), (false, 1, 256));
        assert_eq!(d.id, "disk3");
        let e = |v: &str| DiskConfig::parse(v, 0).unwrap_err().to_string();
        assert!(e("readonly=on").contains("path= is required"));
        assert!(e("path=/i,colour=red").contains("unknown key 'colour'"));
        assert!(e("path=/i,readonly=maybe").contains("expected on or off"));
        assert!(e("path=/i,queues=0").contains("queues=0"));
        assert!(e("path=/i,queue_size=100").contains("power of two"));
        assert!(e("path=/i,queue_size=65536").contains("not a number"));
        assert!(e("path=/i,path=/j").contains("given twice"));
        assert!(e("path").contains("not key=value"));
    }

    #[test]
    fn net_options() {
        let n = NetConfig::parse("tap=tap0,mac=02:00:00:00:00:01,queues=2,id=eth", 0).unwrap();
        assert_eq!(n.mac, [2, 0, 0, 0, 0, 1]);
        assert_eq!(
            (n.tap.as_str(), n.queues, n.id.as_str()),
            ("tap0", 2, "eth")
        );
        let a = NetConfig::parse("tap=a", 0).unwrap();
        let b = NetConfig::parse("tap=b", 1).unwrap();
        assert_ne!(a.mac, b.mac);
        let e = |v: &str| NetConfig::parse(v, 0).unwrap_err().to_string();
        assert!(e("mac=02:00:00:00:00:01").contains("tap= is required"));
        assert!(e("tap=averyveryverylongname").contains("1 to 15"));
        assert!(e("tap=t,mac=01:00:00:00:00:01").contains("multicast"));
        assert!(e("tap=t,mac=zz:00:00:00:00:01").contains("expected xx:"));
        assert!(e("tap=t,mac=02:00:00:00:00").contains("expected xx:"));
        assert_eq!(parse_mac("02:00:00:00:00:01:02"), None);
    }

    #[test]
    fn poll_us_option() {
        assert_eq!(DiskConfig::parse("path=/i", 0).unwrap().poll_us, 0);
        assert_eq!(NetConfig::parse("tap=t", 0).unwrap().poll_us, 0);
        let d = DiskConfig::parse("path=/i,poll_us=50", 0).unwrap();
        assert_eq!(d.poll_us, 50);
        let n = NetConfig::parse("tap=t,poll_us=1000000", 0).unwrap();
        assert_eq!(n.poll_us, 1_000_000);
        let disk = |v: &str| DiskConfig::parse(v, 0).unwrap_err().to_string();
        let net = |v: &str| NetConfig::parse(v, 0).unwrap_err().to_string();
        for e in [
            disk("path=/i,poll_us=1000001"),
            net("tap=t,poll_us=1000001"),
        ] {
            assert!(
                e.contains("poll_us=1000001 µs: expected 0 (off) to 1000000"),
                "{e}"
            );
            assert!(!e.contains('\n'), "{e}");
        }
        assert!(disk("path=/i,poll_us=-1").contains("poll_us=-1: not a number"));
        assert!(net("tap=t,poll_us=fast").contains("poll_us=fast: not a number"));
        assert!(disk("path=/i,poll_us=1,poll_us=2").contains("given twice"));
        assert_eq!(
            disk("path=/i,poll_us=99999999999"),
            "invalid --disk 'path=/i,poll_us=99999999999': poll_us=99999999999 µs: expected 0 (off) to 1000000"
        );
    }

    #[test]
    fn vhost_user_options() {
        let b = VhostUserConfig::parse("socket=/run/blk.sock,queues=2,id=vb", false, 0).unwrap();
        assert_eq!(b.socket, PathBuf::from("/run/blk.sock"));
        assert_eq!((b.queues, b.net, b.id.as_str()), (2, false, "vb"));
        assert_eq!(b.stats, None);
        let s = VhostUserConfig::parse("socket=/s,stats=/run/blk-stats.sock", false, 0).unwrap();
        assert_eq!(s.stats, Some(PathBuf::from("/run/blk-stats.sock")));
        let n = VhostUserConfig::parse("socket=/s,mac=02:00:00:00:00:09", true, 1).unwrap();
        assert_eq!(n.mac, Some([2, 0, 0, 0, 0, 9]));
        assert_eq!(n.id, "vunet1");
        let e = |v: &str, net| VhostUserConfig::parse(v, net, 0).unwrap_err().to_string();
        assert!(e("queues=1", false).contains("socket= is required"));
        assert!(e("socket=/s,mac=02:00:00:00:00:09", false).contains("unknown key 'mac'"));
        assert!(e("socket=/s,queue_size=3", true).contains("power of two"));
        assert_eq!(b.timeout, crate::virtio::vhost_user::DEFAULT_TIMEOUT);
        assert!(!b.server);
        let s = VhostUserConfig::parse(
            "socket=/s,server=on,timeout_ms=250,connect_timeout_ms=9000",
            true,
            0,
        )
        .unwrap();
        assert_eq!(
            (s.server, s.timeout, s.connect_timeout),
            (
                true,
                Duration::from_millis(250),
                Some(Duration::from_millis(9000))
            )
        );
        assert!(e("socket=/s,server=yes", false).contains("expected on or off"));
        assert!(e("socket=/s,timeout_ms=0", false).contains("expected 1 to 3600000"));
        assert!(e("socket=/s,connect_timeout_ms=5", false).contains("needs server=on"));
    }

    #[test]
    fn duplicate_ids() {
        let err = VmConfig::from_cli(
            &cli(&["--disk", "path=/a,id=x", "--net", "tap=t0,id=x"]),
            LIMITS,
        )
        .unwrap_err();
        assert_eq!(err, ConfigError::DuplicateId("x".into()));
        let ok =
            VmConfig::from_cli(&cli(&["--disk", "path=/a", "--disk", "path=/b"]), LIMITS).unwrap();
        assert_eq!(ok.disks.len(), 2);
    }

    #[test]
    fn disk_queues_default_to_one_per_vcpu() {
        let c = VmConfig::from_cli(
            &cli(&[
                "--cpus",
                "2",
                "--disk",
                "path=/a",
                "--disk",
                "path=/b,queues=1",
            ]),
            LIMITS,
        )
        .unwrap();
        assert_eq!((c.disks[0].queues, c.disks[1].queues), (2, 1));
        let c = VmConfig::from_cli(&cli(&["--disk", "path=/a"]), LIMITS).unwrap();
        assert_eq!(c.disks[0].queues, 1);
    }

    #[test]
    fn vfio_options() {
        let v = VfioConfig::parse("host=3b:00.0,rom=on,id=nic", 0).unwrap();
        assert_eq!(v.bdf.to_string(), "0000:3b:00.0");
        assert!(v.rom);
        assert_eq!(v.id, "nic");
        let v = VfioConfig::parse("host=/sys/bus/pci/devices/0000:00:02.0", 1).unwrap();
        assert_eq!(
            (v.bdf.to_string().as_str(), v.rom, v.id.as_str()),
            ("0000:00:02.0", false, "vfio1")
        );
        let e = |s: &str| VfioConfig::parse(s, 0).unwrap_err().to_string();
        assert!(e("rom=on").contains("host= is required"));
        assert!(e("host=3b:00").contains("invalid PCI address"));
        assert!(e("host=3b:00.0,rom=maybe").contains("expected on or off"));
        assert!(e("host=3b:00.0,bar=1").contains("unknown key 'bar'"));
    }

    #[test]
    fn many_cpus_capped_by_apic_ids() {
        let limits = HostLimits {
            max_cpus: 1024,
            host_memory: 8 << 30,
        };
        let err = VmConfig::from_cli(&cli(&["--cpus", "300"]), limits).unwrap_err();
        assert_eq!(
            err,
            ConfigError::TooManyCpus {
                given: 300,
                max: 254
            }
        );
    }
}
