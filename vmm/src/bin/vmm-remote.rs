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
    /// How long to wait for the vmm's answer, in seconds (default 10; 70 for adding a
    /// device, which may wait for a back-end or a DMA mapping).
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
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
    /// Press the ACPI power button: the guest shuts down (PUT vm.power-button).
    PowerButton,
    /// Add a disk to the running guest (PUT vm.add-disk): the --disk syntax
    /// (`path=IMG[,readonly=on][,direct=on][,queues=N][,queue_size=N][,poll_us=N][,id=ID]`)
    /// or a vhost-user back-end's (`vhost_user=on,socket=PATH[,queues=N][,queue_size=N][,id=ID]`).
    AddDisk { options: String },
    /// Add a NIC to the running guest (PUT vm.add-net): the --net syntax
    /// (`tap=NAME[,mac=MAC][,queues=PAIRS][,queue_size=N][,poll_us=N][,id=ID]`) or
    /// `vhost_user=on,socket=PATH[,mac=MAC][,queues=PAIRS][,id=ID]`.
    AddNet { options: String },
    /// Assign a host PCI device to the running guest through VFIO (PUT vm.add-device):
    /// `path=/sys/bus/pci/devices/BDF[,id=ID]` (or `host=BDF`, as --vfio takes it).
    AddDevice { options: String },
    /// Ask the guest to eject a device and release it once it has (PUT vm.remove-device).
    RemoveDevice { id: String },
}

/// The JSON body (Cloud Hypervisor's field names) of `key=value,...` as the vmm's command
/// line takes it.
fn device_body(options: &str, net: bool) -> Result<String, String> {
    let mut obj = serde_json::Map::new();
    for part in options.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("'{part}' is not key=value"))?;
        let flag = |v: &str| match v {
            "on" | "true" | "yes" | "1" => Ok(true),
            "off" | "false" | "no" | "0" => Ok(false),
            _ => Err(format!("{k}={v}: expected on or off")),
        };
        let num = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("{k}={v}: not a number"))
        };
        let (key, value) = match k {
            "path" | "tap" | "mac" | "id" => (k, serde_json::json!(v)),
            "host" => ("path", serde_json::json!(v)),
            "socket" | "vhost_socket" => ("vhost_socket", serde_json::json!(v)),
            "stats" | "vhost_stats" => ("vhost_stats", serde_json::json!(v)),
            "readonly" | "direct" | "vhost_user" => (k, serde_json::json!(flag(v)?)),
            // The API counts queues, as Cloud Hypervisor does: a NIC's pairs are two each.
            "queues" => (
                "num_queues",
                serde_json::json!(if net { 2 * num(v)? } else { num(v)? }),
            ),
            "num_queues" | "queue_size" | "poll_us" => (k, serde_json::json!(num(v)?)),
            _ => return Err(format!("unknown key '{k}'")),
        };
        if obj.insert(key.to_string(), value).is_some() {
            return Err(format!("'{k}' given twice"));
        }
    }
    Ok(serde_json::Value::Object(obj).to_string())
}

fn main() -> ExitCode {
    let a = Args::parse();
    let body = match &a.cmd {
        Cmd::AddDisk { options } => device_body(options, false).map(Some),
        Cmd::AddNet { options } => device_body(options, true).map(Some),
        Cmd::AddDevice { options } => device_body(options, false).map(Some),
        Cmd::RemoveDevice { id } => Ok(Some(serde_json::json!({ "id": id }).to_string())),
        _ => Ok(None),
    };
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            eprintln!("vmm-remote: {e}");
            return ExitCode::from(2);
        }
    };
    let (method, endpoint, default_secs) = match a.cmd {
        Cmd::Ping => ("GET", "vmm.ping", 10),
        Cmd::Info => ("GET", "vm.info", 10),
        Cmd::Counters => ("GET", "vm.counters", 10),
        Cmd::Shutdown => ("PUT", "vm.shutdown", 10),
        Cmd::Pause => ("PUT", "vm.pause", 10),
        Cmd::Resume => ("PUT", "vm.resume", 10),
        Cmd::PowerButton => ("PUT", "vm.power-button", 10),
        Cmd::AddDisk { .. } => ("PUT", "vm.add-disk", 70),
        Cmd::AddNet { .. } => ("PUT", "vm.add-net", 70),
        Cmd::AddDevice { .. } => ("PUT", "vm.add-device", 70),
        Cmd::RemoveDevice { .. } => ("PUT", "vm.remove-device", 10),
    };
    let deadline = Duration::from_secs(a.timeout.unwrap_or(default_secs).max(1));
    match vmm::api::call(&a.api_socket, method, endpoint, body.as_deref(), deadline) {
        Ok((status, body)) if (200..300).contains(&status) => {
            if !body.is_empty() {
                let text = match serde_json::from_str::<serde_json::Value>(&body) {
                    Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_else(|_| body.clone()),
                    Err(_) => body,
                };
                // A reader that stopped reading (`| head`, `| grep -q`) is not an error of
                // the call: the answer was received.
                use std::io::Write;
                let _ = writeln!(std::io::stdout().lock(), "{text}");
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
