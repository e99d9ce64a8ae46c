//! Command line and VM configuration.
//!
//! The command line is parsed by clap into [`Cli`], then turned into a validated
//! [`VmConfig`]. Everything that can be checked without KVM is checked here so that a
//! user's mistake is reported before any resource is created.

use std::path::PathBuf;

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
    #[error("--cpus {given} is above the limit of {max} vCPUs; use --cpus {max} or fewer")]
    TooManyCpus { given: u64, max: u64 },
    #[error("invalid --serial '{0}': expected stdio, off or file=PATH")]
    BadSerial(String),
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

/// Parses a size such as `512M`, `2G`, `65536K` or a plain number of bytes.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadSize(s.to_string());
    let t = s.trim();
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(bad()),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
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
        Ok(VmConfig {
            kernel: cli.kernel.clone(),
            initramfs: cli.initramfs.clone(),
            cmdline: cli.cmdline.clone(),
            cpus: cli.cpus as u8,
            memory,
            serial: cli.serial.parse()?,
            exit_stats: cli.exit_stats.clone(),
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
