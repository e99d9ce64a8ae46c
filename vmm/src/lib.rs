//! `vmm`: a KVM virtual machine monitor focused on I/O devices.
//!
//! This crate boots a Linux bzImage or a PVH ELF on KVM with the platform Linux expects
//! (ACPI, in-kernel LAPIC/IOAPIC/PIT, COM1, a PCI root bridge) and hosts the three device
//! models of the project.

pub mod acpi;
pub mod api;
pub mod arch;
pub mod bus;
pub mod coalesced;
pub mod config;
pub mod devices;
pub mod exit;
pub mod hotplug;
pub mod interrupt;
pub mod layout;
pub mod memory;
pub mod pause;
pub mod pci;
pub mod plug;
pub mod sandbox;
pub mod signals;
pub mod sock;
pub mod stats;
pub mod vcpu;
pub mod vfio;
pub mod virtio;
pub mod vm;
pub mod watchdog;

use std::io;
use std::path::PathBuf;

use thiserror::Error;

pub use config::{Cli, HostLimits, VmConfig};
pub use exit::VmExit;

/// Everything that stops the VMM before or while starting a guest.
#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("cannot open /dev/kvm: {}", kvm_open_hint(.0))]
    KvmOpen(#[source] io::Error),
    #[error("KVM API version {0} is not the supported version 12; use a newer kernel")]
    KvmVersion(i32),
    #[error("KVM lacks {0}, which this VMM needs; use a kernel with KVM_CAP_{0}")]
    KvmCap(&'static str),
    #[error("KVM refused to {0}")]
    Kvm(&'static str, #[source] io::Error),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Boot(#[from] arch::boot::BootError),
    #[error("cannot create the serial output file '{0}'")]
    SerialFile(PathBuf, #[source] io::Error),
    #[error("cannot create an eventfd")]
    EventFd(#[source] io::Error),
    #[error("cannot install signal handlers")]
    Signal(#[source] io::Error),
    #[error("cannot start a thread")]
    Thread(#[source] io::Error),
    #[error("device layout")]
    Bus(#[from] bus::BusError),
    #[error("disk '{id}': {}", disk_hint(.source))]
    Disk {
        id: String,
        #[source]
        source: backends::block::BlockError,
    },
    #[error("net '{id}': {}", tap_hint(.source))]
    Tap {
        id: String,
        #[source]
        source: backends::net::TapError,
    },
    #[error("device '{0}'")]
    Device(String, #[source] io::Error),
    #[error("device '{id}'")]
    VhostUser {
        id: String,
        #[source]
        source: virtio::vhost_user::VhostUserError,
    },
    #[error("PCI")]
    Pci(#[from] pci::PciError),
    #[error("vfio device '{id}': {why}")]
    Vfio { id: String, why: String },
    #[error(transparent)]
    Api(#[from] api::ApiError),
    #[error(transparent)]
    Sandbox(#[from] sandbox::SandboxError),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("{0}")]
    InUse(String),
}

fn disk_hint(e: &backends::block::BlockError) -> String {
    use backends::block::BlockError;
    let os = |s: &io::Error| s.raw_os_error();
    match e {
        // Landlock's EACCES: the path is not in the sandbox's set (a hot-add).
        BlockError::Open { path, source } if os(source) == Some(libc::EACCES) && sandbox::landlock_denial(path, true).is_some() => {
            sandbox::landlock_denial(path, true).unwrap_or_default()
        }
        BlockError::Open { path, source } if matches!(os(source), Some(libc::EACCES) | Some(libc::EROFS) | Some(libc::EPERM)) => format!(
            "disk image '{}' is not writable ({source}); add readonly=on or fix its permissions",
            path.display()
        ),
        BlockError::Open { path, source } if os(source) == Some(libc::ENOENT) => format!(
            "disk image '{}' does not exist; create it (e.g. truncate -s 1G IMG) or fix path=",
            path.display()
        ),
        BlockError::Open { path, source } if os(source) == Some(libc::EINVAL) => format!(
            "cannot open disk image '{}' with direct=on: its filesystem refuses O_DIRECT; drop direct=on",
            path.display()
        ),
        other => other.to_string(),
    }
}

fn tap_hint(e: &backends::net::TapError) -> String {
    use backends::net::TapError;
    match e {
        TapError::SetIff { name, source } if source.raw_os_error() == Some(libc::EPERM) => format!(
            "cannot attach to tap '{name}': permission denied; run as root, give the vmm CAP_NET_ADMIN, or create the tap for this user (ip tuntap add {name} mode tap vnet_hdr multi_queue user $USER)"
        ),
        TapError::SetIff { name, source } if source.raw_os_error() == Some(libc::EINVAL) => format!(
            "cannot attach to tap '{name}': it exists with other flags (a tun, or without vnet_hdr/multi_queue for queues>1); delete it or use another name"
        ),
        TapError::OpenTun(source) => format!(
            "cannot open /dev/net/tun ({source}); load the tun module (modprobe tun)"
        ),
        other => other.to_string(),
    }
}

fn kvm_open_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => {
            "KVM is not available on this host; enable virtualization in the firmware and load kvm_intel or kvm_amd (modprobe kvm_amd)"
        }
        Some(libc::EACCES) | Some(libc::EPERM) => {
            "permission denied; add your user to the 'kvm' group (usermod -aG kvm $USER) or run as root"
        }
        _ => "check that KVM works on this host",
    }
}

/// Formats an error and its sources as one line: "what: why: why".
pub fn error_line(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let s_str = s.to_string();
        if !line.contains(&s_str) {
            line.push_str(": ");
            line.push_str(&s_str);
        }
        src = s.source();
    }
    line
}

/// Reads MemTotal from /proc/meminfo.
pub fn host_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(u64::MAX)
}

/// Opens KVM and checks what the VMM relies on.
pub fn open_kvm() -> Result<kvm_ioctls::Kvm, Error> {
    use kvm_ioctls::Cap;
    let kvm = kvm_ioctls::Kvm::new()
        .map_err(|e| Error::KvmOpen(io::Error::from_raw_os_error(e.errno())))?;
    let v = kvm.get_api_version();
    if v != 12 {
        return Err(Error::KvmVersion(v));
    }
    for (cap, name) in [
        (Cap::Irqchip, "IRQCHIP"),
        (Cap::Irqfd, "IRQFD"),
        (Cap::Ioeventfd, "IOEVENTFD"),
        (Cap::UserMemory, "USER_MEMORY"),
        (Cap::Pit2, "PIT2"),
        (Cap::ExtCpuid, "EXT_CPUID"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(Error::KvmCap(name));
        }
    }
    Ok(kvm)
}

/// Validates the command line against this host, builds the VM and runs it.
pub fn run(cli: &Cli) -> Result<VmExit, Error> {
    let kvm = open_kvm()?;
    let limits = HostLimits {
        max_cpus: kvm.get_max_vcpus() as u64,
        host_memory: host_memory(),
    };
    let cfg = VmConfig::from_cli(cli, limits)?;
    let exit_stats = cfg.exit_stats.clone();
    // Landlock and the SIGSYS handler before anything of the VM exists (the VM is built
    // under Landlock, as a hot-add is); each thread's filter when it starts.
    let mut opened = sandbox::start(&cfg)?;
    let stats_file = opened.exit_stats.take();
    let summary = std::mem::take(&mut opened.summary);
    let vm = vm::Vm::new(kvm, &cfg, opened)?;
    log::info!("{summary}");
    let (why, stats) = vm.run()?;
    log::info!("{}", stats.summary());
    if let (Some(path), Some(mut file)) = (exit_stats, stats_file) {
        use std::io::Write;
        let written = stats.to_json().map_err(io::Error::from).and_then(|json| {
            file.set_len(0)?;
            file.write_all((json + "\n").as_bytes())
        });
        if let Err(e) = written {
            log::error!("cannot write exit stats to '{}': {e}", path.display());
        }
    }
    Ok(why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_line_joins_sources_once() {
        let e = Error::KvmOpen(io::Error::from_raw_os_error(libc::ENOENT));
        let line = error_line(&e);
        assert!(line.starts_with("cannot open /dev/kvm: KVM is not available"));
        assert!(line.contains("modprobe"));
        assert_eq!(line.lines().count(), 1);
        let e = Error::KvmOpen(io::Error::from_raw_os_error(libc::EACCES));
        assert!(error_line(&e).contains("kvm' group"));
    }

    #[test]
    fn host_memory_is_read() {
        let m = host_memory();
        assert!(m > 64 << 20 && m != u64::MAX);
    }
}
