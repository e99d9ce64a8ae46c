//! `passthrough`: prepare a host PCI device for VFIO passthrough. See `passthrough --help`.

use clap::{Parser, Subcommand};
use passthrough::host::{parse_size, Bdf, Host, Problem};
use std::path::PathBuf;
use std::process::ExitCode;

/// The vmm's default guest RAM (`vmm --memory`).
const DEFAULT_MEMORY: &str = "512M";

#[derive(Debug, Parser)]
#[command(
    name = "passthrough",
    version,
    about = "Prepare a host PCI device for VFIO passthrough to a vmm guest",
    long_about = "Prepare a host PCI device for VFIO passthrough to a vmm guest.\n\n\
        `check` says whether the device can be assigned now (IOMMU on, IOMMU group and \
        the driver of each member, reset methods, memlock limit against the guest's RAM, \
        /dev/vfio node) and, when it cannot, the first thing in the way and the fix. \
        `bind` gives the device to vfio-pci through driver_override; `unbind` gives it \
        back to its host driver. bind and unbind need root.\n\n\
        BDF is a PCI address as sysfs names it (0000:3b:00.0), without the domain \
        (3b:00.0), or a sysfs path (/sys/bus/pci/devices/0000:3b:00.0); list them with \
        `lspci -D`.\n\n\
        Exit status: 0 when the device is ready / the operation is done; 2 otherwise. \
        `check` ends its report with one verdict line (`ready: ...` or `not ready: ...`); \
        a failed bind or unbind and a wrong command line print one line on stderr."
)]
struct Args {
    #[command(subcommand)]
    command: Command,
    /// Test hook: read sysfs from here instead of /sys (a fake tree).
    #[arg(
        long,
        global = true,
        hide = true,
        value_name = "DIR",
        default_value = "/sys"
    )]
    sysfs_root: PathBuf,
    /// Test hook: look for vfio/N here instead of /dev.
    #[arg(
        long,
        global = true,
        hide = true,
        value_name = "DIR",
        default_value = "/dev"
    )]
    dev_root: PathBuf,
    /// Test hook: read cpuinfo and self/status here instead of /proc.
    #[arg(
        long,
        global = true,
        hide = true,
        value_name = "DIR",
        default_value = "/proc"
    )]
    proc_root: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Report whether BDF can be assigned to a guest with `vmm --vfio host=BDF`.
    Check {
        /// The device: 0000:3b:00.0, 3b:00.0 or /sys/bus/pci/devices/0000:3b:00.0.
        bdf: String,
        /// Guest RAM the vmm will give the guest (VFIO pins all of it), e.g. 512M or 2G.
        #[arg(long, value_name = "SIZE", default_value = DEFAULT_MEMORY)]
        memory: String,
    },
    /// Bind BDF to vfio-pci (driver_override, unbind from its driver, drivers_probe).
    Bind {
        /// The device: 0000:3b:00.0, 3b:00.0 or /sys/bus/pci/devices/0000:3b:00.0.
        bdf: String,
    },
    /// Unbind BDF from vfio-pci and give it back to its host driver.
    Unbind {
        /// The device: 0000:3b:00.0, 3b:00.0 or /sys/bus/pci/devices/0000:3b:00.0.
        bdf: String,
    },
}

/// A clap error as one line (its first paragraph), with a pointer to --help.
fn one_line(e: &clap::Error) -> String {
    let text = e.to_string();
    let msg: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .collect();
    format!(
        "{} (see --help)",
        msg.join(" ").trim_start_matches("error: ")
    )
}

/// Prints `passthrough: MSG` and its source chain on one line.
fn fail(e: &dyn std::error::Error) -> ExitCode {
    let mut line = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        line.push_str(": ");
        line.push_str(&s.to_string());
        src = s.source();
    }
    eprintln!("passthrough: {line}");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => {
            // --help, --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("passthrough: {}", one_line(&e));
            return ExitCode::from(2);
        }
    };
    let host = Host::with_sysfs_root(args.sysfs_root)
        .dev_root(args.dev_root)
        .proc_root(args.proc_root);
    match args.command {
        Command::Check { bdf, memory } => {
            let bdf = match Bdf::parse(&bdf) {
                Ok(b) => b,
                Err(e) => return fail(&e),
            };
            let memory = match parse_size(&memory) {
                Ok(m) => m,
                Err(e) => return fail(&e),
            };
            let report = host.inspect(bdf);
            print!("{}", report.render(memory));
            match report.verdict(memory) {
                Ok(a) => {
                    println!(
                        "ready: {} (IOMMU group {}) can be assigned with `vmm --vfio host={}`",
                        a.bdf, a.group, a.bdf
                    );
                    ExitCode::SUCCESS
                }
                Err(p) => {
                    println!("not ready: {p}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Bind { bdf } => {
            let bdf = match Bdf::parse(&bdf) {
                Ok(b) => b,
                Err(e) => return fail(&e),
            };
            match host.bind(bdf) {
                Ok(o) if o.already_bound => {
                    println!("{bdf}: already bound to vfio-pci");
                    ExitCode::SUCCESS
                }
                Ok(o) => {
                    println!(
                        "{bdf}: bound to vfio-pci (was {}); `passthrough unbind {bdf}` gives it back",
                        o.previous.as_deref().unwrap_or("on no driver")
                    );
                    // What else stands between the device and a guest, memlock aside.
                    if let Err(
                        p @ (Problem::GroupNotViable { .. } | Problem::NoVfioDevNode { .. }),
                    ) = host.inspect(bdf).verdict(0)
                    {
                        println!("still not ready: {p}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        Command::Unbind { bdf } => {
            let bdf = match Bdf::parse(&bdf) {
                Ok(b) => b,
                Err(e) => return fail(&e),
            };
            match host.unbind(bdf) {
                Ok(o) if o.previous.is_some() && o.previous.as_deref() != Some("vfio-pci") => {
                    println!(
                        "{bdf}: not bound to vfio-pci; left on {}",
                        o.previous.as_deref().unwrap_or("no driver")
                    );
                    ExitCode::SUCCESS
                }
                Ok(o) => {
                    match o.now {
                        Some(d) => println!("{bdf}: released from vfio-pci; {d} took it"),
                        None => println!(
                            "{bdf}: released from vfio-pci; no host driver took it (load its driver module, then `echo {bdf} > /sys/bus/pci/drivers_probe`)"
                        ),
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
    }
}
