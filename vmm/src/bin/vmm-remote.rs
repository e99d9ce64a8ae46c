//! `vmm-remote`: the command-line client of the vmm's control API (`--api-socket`), as
//! Cloud Hypervisor's `ch-remote` is of its own: the same subcommand names, so a script
//! written for one needs another program name and socket path only.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Drives a running vmm through its control API (`vmm --api-socket path=PATH`).
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// The vmm's API socket (its --api-socket path=PATH).
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    /// How long to wait for the vmm's answer, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    timeout: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The vmm's version and PID (GET vmm.ping).
    Ping,
    /// The VM's configuration, state and devices with their guest PCI addresses (GET vm.info).
    Info,
    /// Per device, the exits it caused; the vmm's totals (GET vm.counters).
    Counters,
    /// Stop the VM; the vmm exits 0 (PUT vm.shutdown).
    Shutdown,
    /// Park every vCPU (PUT vm.pause).
    Pause,
    /// Let the parked vCPUs run again (PUT vm.resume).
    Resume,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let (method, endpoint) = match a.cmd {
        Cmd::Ping => ("GET", "vmm.ping"),
        Cmd::Info => ("GET", "vm.info"),
        Cmd::Counters => ("GET", "vm.counters"),
        Cmd::Shutdown => ("PUT", "vm.shutdown"),
        Cmd::Pause => ("PUT", "vm.pause"),
        Cmd::Resume => ("PUT", "vm.resume"),
    };
    let deadline = Duration::from_secs(a.timeout.max(1));
    match vmm::api::call(&a.api_socket, method, endpoint, None, deadline) {
        Ok((status, body)) if (200..300).contains(&status) => {
            if !body.is_empty() {
                match serde_json::from_str::<serde_json::Value>(&body) {
                    Ok(v) => println!(
                        "{}",
                        serde_json::to_string_pretty(&v).unwrap_or_else(|_| body.clone())
                    ),
                    Err(_) => println!("{body}"),
                }
            }
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            let why = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or(body);
            eprintln!("vmm-remote: {method} {endpoint}: {status}: {why}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("vmm-remote: {e}");
            ExitCode::from(1)
        }
    }
}
