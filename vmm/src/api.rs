//! The control API: HTTP/1.1 with JSON bodies on a unix socket (`--api-socket
//! path=PATH|fd=N`), with Cloud Hypervisor's endpoint and field names where the two overlap,
//! so that `curl --unix-socket PATH http://localhost/api/v1/vm.info` works and scripts
//! written for `ch-remote` need no more than another socket path. `vmm-remote` is its
//! command-line client.
//!
//! Endpoints (under `/api/v1/`):
//! - `GET vmm.ping`: the vmm's version and PID.
//! - `GET vm.info`: the configuration as the vmm runs it, the VM's state and every device
//!   with its `id`, model and guest PCI address (`device_tree`).
//! - `GET vm.counters`: per device, the exits to the vmm it caused and its queues' live counters; `vmm`: the totals.
//! - `PUT vm.pause`, `PUT vm.resume`: every vCPU out of KVM_RUN and parked, and back
//!   (`vm.info` says `Paused`); 409 when already so.
//! - `PUT vm.shutdown`, `PUT vmm.shutdown`: stop the VM (the vmm exits 0; it runs one VM).
//!
//! The server is `tiny_http`'s, on its own thread; requests are answered from state the API
//! thread reads without waiting on a vCPU or device thread (the configuration as started,
//! atomic counters), and no endpoint reads a request body, so a client that stalls holds
//! nothing but its own connection.

use backends::sandbox::{allow, allow_if, Rule, ThreadKind};
use std::collections::BTreeMap;
use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};

use crate::config::VmConfig;
use crate::exit::{ExitHandle, VmExit};
use crate::plug::{ConfigList, DeviceNode};
use crate::stats::ExitStats;

/// The URL prefix of every endpoint.
pub const PREFIX: &str = "/api/v1/";

/// Where the API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiSocket {
    /// A socket the vmm creates (refused if something live is there; removed at exit).
    Path(PathBuf),
    /// A listening unix socket the vmm inherited.
    Fd(RawFd),
}

impl ApiSocket {
    /// `path=PATH` or `fd=N` (a bare path is a path).
    pub fn parse(value: &str) -> Result<Self, String> {
        if let Some(fd) = value.strip_prefix("fd=") {
            return fd
                .parse::<RawFd>()
                .ok()
                .filter(|&n| n >= 0)
                .map(ApiSocket::Fd)
                .ok_or(format!(
                    "--api-socket fd={fd}: expected a file descriptor number"
                ));
        }
        let path = value.strip_prefix("path=").unwrap_or(value);
        if path.is_empty() {
            return Err("--api-socket: expected path=PATH or fd=N".into());
        }
        Ok(ApiSocket::Path(PathBuf::from(path)))
    }
}

/// What the API answers from.
pub struct ApiContext {
    /// The configuration as started, without its device lists (from the registry).
    pub config: Value,
    /// The devices on the bus now.
    pub devices: crate::plug::Registry,
    pub memory: u64,
    /// The pause flag the vCPU threads park on.
    pub pause: Arc<crate::pause::PauseGate>,
    /// The vCPU threads (set once they run), to kick out of KVM_RUN for a pause.
    pub vcpu_threads: Arc<std::sync::OnceLock<Vec<libc::pthread_t>>>,
    pub exit: ExitHandle,
    /// The exit counters now.
    pub counters: Box<dyn Fn() -> ExitStats + Send + Sync>,
    /// Pauses (true) or resumes the devices' threads; for a pause, waits (bounded) until
    /// they have finished what they held, or says which have not.
    pub devices_pause: Box<dyn Fn(bool) -> Result<(), String> + Send + Sync>,
    /// Stops (true) or restarts (false) the guest's clock (kvmclock) around a pause, so that
    /// the guest sees no time pass while paused (no lockup warnings, no timer storm).
    pub clock: Box<dyn Fn(bool) -> Result<(), String> + Send + Sync>,
}

/// The configuration as `vm.info` shows it (Cloud Hypervisor's `VmConfig` field names where
/// they exist).
pub fn config_json(cfg: &VmConfig) -> Value {
    json!({
        "cpus": { "boot_vcpus": cfg.cpus, "max_vcpus": cfg.cpus },
        "memory": { "size": cfg.memory, "shared": true },
        "payload": {
            "kernel": cfg.kernel,
            "initramfs": cfg.initramfs,
            "cmdline": cfg.cmdline,
        },
        "sandbox": {
            "seccomp": cfg.sandbox.seccomp.to_string(),
            "landlock": cfg.sandbox.landlock == backends::sandbox::Switch::On,
            "landlock_rules": cfg.sandbox.rules.iter().map(|r| r.spec()).collect::<Vec<_>>(),
        },
    })
}

/// An answer: status and JSON body (None: no body).
pub type Reply = (u16, Option<Value>);

fn error(status: u16, msg: String) -> Reply {
    (status, Some(json!({ "error": msg })))
}

/// The answer to `method` on `url` (the path, a query ignored).
pub fn handle(ctx: &ApiContext, method: &str, url: &str) -> Reply {
    let path = url.split('?').next().unwrap_or(url);
    let Some(endpoint) = path.strip_prefix(PREFIX) else {
        return error(
            404,
            format!("{path}: not an API path (they start with {PREFIX})"),
        );
    };
    let want = |m: &str| -> Option<Reply> {
        (method != m).then(|| error(405, format!("{endpoint} takes {m}, not {method}")))
    };
    match endpoint {
        "vmm.ping" => want("GET").unwrap_or_else(|| {
            (
                200,
                Some(json!({
                    "build_version": env!("CARGO_PKG_VERSION"),
                    "version": env!("CARGO_PKG_VERSION"),
                    "pid": std::process::id(),
                    "features": [],
                })),
            )
        }),
        "vm.info" => want("GET").unwrap_or_else(|| (200, Some(info(ctx)))),
        "vm.counters" => want("GET").unwrap_or_else(|| (200, Some(counters(ctx)))),
        "vm.pause" => want("PUT").unwrap_or_else(|| pause(ctx)),
        "vm.resume" => want("PUT").unwrap_or_else(|| {
            if !ctx.pause.is_paused() {
                return error(409, "the VM is not paused".into());
            }
            if let Err(e) = (ctx.devices_pause)(false) {
                log::warn!("api: resuming the devices: {e}");
            }
            if let Err(e) = (ctx.clock)(false) {
                log::warn!("api: restarting the guest's clock: {e}; it sees the paused time pass");
            }
            ctx.pause.resume();
            log::info!("api: the VM is resumed");
            (204, None)
        }),
        "vm.shutdown" | "vmm.shutdown" => want("PUT").unwrap_or_else(|| {
            ctx.exit.request(VmExit::ApiShutdown);
            (204, None)
        }),
        e if CONTROL_ENDPOINTS.contains(&e) => error(
            500,
            format!("{e} is answered by the control thread, not here"),
        ),
        _ => error(404, format!("unknown endpoint {endpoint}")),
    }
}

/// `vm.info`: the configuration with the devices on the bus now, the VM's state, every
/// device with its model, guest PCI address and state.
fn info(ctx: &ApiContext) -> Value {
    let devices = ctx.devices.lock().unwrap_or_else(|p| p.into_inner());
    let mut config = ctx.config.clone();
    for list in [ConfigList::Disks, ConfigList::Net, ConfigList::Devices] {
        let items: Vec<&Value> = devices
            .by_id
            .values()
            .filter(|e| e.config.0 == list)
            .map(|e| &e.config.1)
            .collect();
        config[list.key()] = json!(items);
    }
    let tree: BTreeMap<&str, &DeviceNode> = devices
        .by_id
        .iter()
        .map(|(id, e)| (id.as_str(), &e.node))
        .collect();
    json!({
        "config": config,
        "state": if ctx.pause.is_paused() { "Paused" } else { "Running" },
        "memory_actual_size": ctx.memory,
        "device_tree": tree,
    })
}

/// The endpoints that change the VM: their request goes to the VM's control thread.
pub const CONTROL_ENDPOINTS: [&str; 5] = [
    "vm.add-device",
    "vm.add-disk",
    "vm.add-net",
    "vm.remove-device",
    "vm.power-button",
];

/// What a device-adding request asks for, checked as far as the API can (the control thread
/// checks the rest with the command line's parsers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddRequest {
    /// `disk` or `net`.
    pub net: bool,
    pub vhost_user: bool,
    /// The device's options as the command line takes them (`key=value,...`, without
    /// `id=`).
    pub options: String,
    pub id: Option<String>,
    /// `num_queues` was given (else a disk gets one queue per vCPU, as at boot).
    pub queues_given: bool,
}

/// A request for the control thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Add(AddRequest),
    /// `vm.add-device`: assign the host device at `path` (a sysfs path or a PCI address).
    AddDevice {
        path: String,
        id: Option<String>,
    },
    Remove(String),
    PowerButton,
}

/// The most bytes a request body may have.
pub const MAX_BODY: usize = 64 << 10;

/// Turns the body of a control endpoint into a [`Command`]: a JSON object with known
/// fields only (Cloud Hypervisor's names), each of the type it needs.
pub fn parse_command(endpoint: &str, body: &[u8]) -> Result<Command, String> {
    if endpoint == "vm.power-button" {
        return Ok(Command::PowerButton);
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(format!("{endpoint} needs a JSON object body"));
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| format!("{endpoint}: the body is not valid JSON: {e}"))?;
    let Value::Object(obj) = v else {
        return Err(format!("{endpoint}: the body must be a JSON object"));
    };
    let str_field = |k: &str| -> Result<Option<String>, String> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Err(format!("{endpoint}: \"{k}\" is empty")),
            Some(Value::String(s)) if s.contains(',') || s.contains('=') => Err(format!(
                "{endpoint}: \"{k}\" may not contain ',' or '=' (the vmm's option syntax)"
            )),
            // What a client sends ends up in the vmm's log lines and answers: one line each.
            Some(Value::String(s)) if s.chars().any(char::is_control) => Err(format!(
                "{endpoint}: \"{k}\" may not contain control characters"
            )),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(format!("{endpoint}: \"{k}\" must be a string")),
        }
    };
    let bool_field = |k: &str| -> Result<Option<bool>, String> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(format!("{endpoint}: \"{k}\" must be true or false")),
        }
    };
    let num_field = |k: &str| -> Result<Option<u64>, String> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(Some)
                .ok_or_else(|| format!("{endpoint}: \"{k}\" must be a whole number ≥ 0")),
            Some(_) => Err(format!("{endpoint}: \"{k}\" must be a number")),
        }
    };
    let known: &[&str] = match endpoint {
        "vm.add-disk" => &[
            "path",
            "readonly",
            "direct",
            "num_queues",
            "queue_size",
            "poll_us",
            "id",
            "vhost_user",
            "vhost_socket",
            "vhost_stats",
        ],
        "vm.add-net" => &[
            "tap",
            "mac",
            "num_queues",
            "queue_size",
            "poll_us",
            "id",
            "vhost_user",
            "vhost_socket",
            "vhost_stats",
        ],
        "vm.remove-device" => &["id"],
        "vm.add-device" => &["path", "id"],
        _ => return Err(format!("unknown endpoint {endpoint}")),
    };
    if let Some(k) = obj.keys().find(|k| !known.contains(&k.as_str())) {
        // Quoted as JSON: a name with a newline or a quote stays one line, unambiguous.
        let name = serde_json::to_string(k).unwrap_or_default();
        return Err(format!(
            "{endpoint}: unknown field {name} (known: {})",
            known.join(", ")
        ));
    }
    let id = str_field("id")?;
    if endpoint == "vm.remove-device" {
        return id
            .map(Command::Remove)
            .ok_or_else(|| format!("{endpoint}: \"id\" is required"));
    }
    if endpoint == "vm.add-device" {
        let path = str_field("path")?.ok_or_else(|| {
            format!("{endpoint}: \"path\" (the host device, /sys/bus/pci/devices/BDF) is required")
        })?;
        return Ok(Command::AddDevice { path, id });
    }
    let net = endpoint == "vm.add-net";
    let vhost_user = bool_field("vhost_user")?.unwrap_or(false);
    let socket = str_field("vhost_socket")?;
    let mut opts: Vec<String> = Vec::new();
    let mut queues_given = false;
    if vhost_user {
        let Some(socket) = socket else {
            return Err(format!(
                "{endpoint}: \"vhost_user\": true needs \"vhost_socket\" (the back-end's socket)"
            ));
        };
        opts.push(format!("socket={socket}"));
        if let Some(stats) = str_field("vhost_stats")? {
            opts.push(format!("stats={stats}"));
        }
        let local: &[&str] = if net {
            &["tap", "poll_us"]
        } else {
            &["path", "readonly", "direct", "poll_us"]
        };
        if let Some(k) = local
            .iter()
            .find(|k| obj.get(**k).is_some_and(|v| !v.is_null()))
        {
            return Err(format!(
                "{endpoint}: \"{k}\" is for an in-VMM device; a vhost-user back-end has its own"
            ));
        }
    } else {
        if let Some(k) = ["vhost_socket", "vhost_stats"]
            .iter()
            .find(|k| obj.get(**k).is_some_and(|v| !v.is_null()))
        {
            return Err(format!("{endpoint}: \"{k}\" needs \"vhost_user\": true"));
        }
        let (k, what) = if net {
            ("tap", "the tap device")
        } else {
            ("path", "the disk image")
        };
        let v = str_field(k)?.ok_or_else(|| format!("{endpoint}: \"{k}\" ({what}) is required"))?;
        opts.push(format!("{k}={v}"));
    }
    for k in ["readonly", "direct"] {
        if let Some(b) = bool_field(k)? {
            opts.push(format!("{k}={}", if b { "on" } else { "off" }));
        }
    }
    if let Some(mac) = str_field("mac")? {
        opts.push(format!("mac={mac}"));
    }
    if let Some(n) = num_field("num_queues")? {
        queues_given = true;
        let q = if net {
            if n % 2 != 0 || n == 0 {
                return Err(format!(
                    "{endpoint}: \"num_queues\" {n} must be even and at least 2 (an RX and a TX queue per pair)"
                ));
            }
            n / 2
        } else {
            n
        };
        opts.push(format!("queues={q}"));
    }
    for k in ["queue_size", "poll_us"] {
        if let Some(n) = num_field(k)? {
            opts.push(format!("{k}={n}"));
        }
    }
    Ok(Command::Add(AddRequest {
        net,
        vhost_user,
        options: opts.join(","),
        id,
        queues_given,
    }))
}

/// `vm.pause`: every vCPU out of KVM_RUN and parked, within [`PAUSE_DEADLINE`].
fn pause(ctx: &ApiContext) -> Reply {
    let Some(threads) = ctx.vcpu_threads.get() else {
        return error(409, "the VM is still starting: no vCPU runs yet".into());
    };
    let signal = crate::vcpu::kick_signal();
    let kick = || {
        for &t in threads {
            // SAFETY: `t` is a vCPU thread of this process; they are joined only after the
            // API thread is (see `Vm::run`), so the id is valid.
            unsafe { libc::pthread_kill(t, signal) };
        }
    };
    match ctx.pause.pause(threads.len(), &kick, PAUSE_DEADLINE) {
        Ok(()) => {
            if let Err(e) = (ctx.clock)(true) {
                log::warn!(
                    "api: stopping the guest's clock: {e}; it will see the paused time pass"
                );
            }
            // The vCPUs add no request now; the device threads finish what they hold.
            match (ctx.devices_pause)(true) {
                Ok(()) => log::info!(
                    "api: the VM is paused ({} vCPUs parked, the devices quiesced)",
                    threads.len()
                ),
                Err(e) => log::warn!(
                    "api: the VM is paused ({} vCPUs parked), but {e}",
                    threads.len()
                ),
            }
            (204, None)
        }
        Err(e) if ctx.pause.is_paused() => error(409, e),
        Err(e) => error(500, e),
    }
}

/// How long `vm.pause` waits for the vCPU threads to park.
pub const PAUSE_DEADLINE: Duration = Duration::from_secs(2);

/// `vm.counters`: per device id its exits (MMIO and port accesses to its BARs, doorbells
/// that exited instead of reaching an ioeventfd) and, for virtio devices, its queues' live
/// counters (requests and bytes by kind, errors, notifications, interrupts, the latency
/// histogram: `backends::stats`); `vmm`: every exit by kind.
fn counters(ctx: &ApiContext) -> Value {
    let s = (ctx.counters)();
    let mut out = serde_json::Map::new();
    // The queue counters are read after the registry is let go: a vhost-user back-end's
    // endpoint may take its deadline to answer, and nothing waits on it meanwhile.
    let mut readers = Vec::new();
    let devices = ctx.devices.lock().unwrap_or_else(|p| p.into_inner());
    for (id, e) in &devices.by_id {
        let mmio = s.mmio.get(id).copied().unwrap_or(0);
        let pio = s.pio.get(id).copied().unwrap_or(0);
        let notify = e
            .notify_exits
            .as_ref()
            .map_or(0, |n| n.load(Ordering::Relaxed));
        if let Some(read) = &e.queue_counters {
            readers.push((id.clone(), read.clone()));
        }
        out.insert(
            id.clone(),
            json!({ "mmio_exits": mmio, "pio_exits": pio, "notify_exits": notify }),
        );
    }
    drop(devices);
    for (id, read) in readers {
        if let (Some(Value::Object(d)), Value::Object(q)) = (out.get_mut(&id), read()) {
            d.extend(q);
        }
    }
    out.insert(
        "vmm".into(),
        json!({
            "exits": s.total(),
            "pio": s.pio,
            "pio_unclaimed": s.pio_unclaimed,
            "mmio": s.mmio,
            "mmio_unclaimed": s.mmio_unclaimed,
            "interrupted": s.interrupted,
            "other": s.other,
            "coalesced_writes": s.coalesced,
        }),
    );
    Value::Object(out)
}

/// The API thread and what it listens on.
pub struct ApiServer {
    server: Arc<tiny_http::Server>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
    /// The socket this vmm created: removed at exit if still the same inode.
    created: Option<(PathBuf, (u64, u64))>,
}

/// What the API thread, tiny_http's threads (acceptor, connection pool) and the control
/// request threads may call: the socket's connections (accept, read, write, shutdown,
/// their timeouts), starting the pool's and the requests' threads, handing commands to
/// the control thread and waiting for its answer, `vm.pause`/`vm.resume` (the vCPUs kicked
/// with the kick signal, KVM_GET_CLOCK/KVM_SET_CLOCK), `vm.counters` (a vhost-user
/// device's stats relayed from its back-end's stats socket).
const API_SYSCALLS: &[Rule] = &[
    allow(libc::SYS_accept4),
    allow(libc::SYS_accept),
    allow(libc::SYS_read),
    allow(libc::SYS_readv),
    allow(libc::SYS_write),
    allow(libc::SYS_writev),
    allow(libc::SYS_recvfrom),
    allow(libc::SYS_sendto),
    allow(libc::SYS_recvmsg),
    allow(libc::SYS_sendmsg),
    allow(libc::SYS_shutdown),
    allow(libc::SYS_close),
    allow(libc::SYS_fcntl),
    allow(libc::SYS_poll),
    allow(libc::SYS_ppoll),
    allow(libc::SYS_setsockopt),
    allow(libc::SYS_getsockopt),
    allow(libc::SYS_getsockname),
    allow(libc::SYS_getpeername),
    allow(libc::SYS_socket),
    allow(libc::SYS_connect),
    allow(libc::SYS_fstat),
    allow(libc::SYS_statx),
    allow(libc::SYS_newfstatat),
    allow(libc::SYS_getpid),
    allow(libc::SYS_tgkill),
    allow_if(
        libc::SYS_ioctl,
        &[(
            1,
            crate::sandbox::ior::<kvm_bindings::kvm_clock_data>(crate::sandbox::KVMIO, 0x7c),
        )],
    ), // KVM_GET_CLOCK
    allow_if(
        libc::SYS_ioctl,
        &[(
            1,
            crate::sandbox::iow::<kvm_bindings::kvm_clock_data>(crate::sandbox::KVMIO, 0x7b),
        )],
    ), // KVM_SET_CLOCK
    allow_if(libc::SYS_ioctl, &[(1, libc::FIONBIO)]),
];

/// The API's threads.
pub const API: ThreadKind = ThreadKind {
    name: "api",
    syscalls: &[
        API_SYSCALLS,
        crate::sandbox::COMMON_SYSCALLS,
        crate::sandbox::SPAWN_SYSCALLS,
    ],
};

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("--api-socket {0}: {1}")]
    Bind(PathBuf, String),
    #[error("--api-socket fd={0}: {1}")]
    Fd(RawFd, String),
    #[error("the API server: {0}")]
    Server(String),
    #[error("the API thread: {0}")]
    Thread(io::Error),
}

impl ApiServer {
    /// Listens on `socket` and answers from `ctx` on a thread of its own.
    pub fn start(socket: &ApiSocket, ctx: ApiContext) -> Result<Self, ApiError> {
        let (listener, created) = match socket {
            ApiSocket::Path(p) => {
                let (l, id) = crate::sock::listen(p).map_err(|e| ApiError::Bind(p.clone(), e))?;
                (l, Some((p.clone(), id)))
            }
            ApiSocket::Fd(fd) => {
                // SAFETY: fstat on a descriptor number the user named; the result is checked.
                let mut st: libc::stat = unsafe { std::mem::zeroed() };
                // SAFETY: as above; `st` is a valid out-pointer.
                if unsafe { libc::fstat(*fd, &mut st) } != 0 {
                    return Err(ApiError::Fd(*fd, io::Error::last_os_error().to_string()));
                }
                if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
                    return Err(ApiError::Fd(*fd, "not a socket".into()));
                }
                // SAFETY: the descriptor was handed to this process for the API (the user
                // said so on the command line) and is owned from here on.
                (unsafe { UnixListener::from_raw_fd(*fd) }, None)
            }
        };
        // The API thread confines itself first, then makes the server: tiny_http's own
        // threads (its acceptor and connection pool) start from it and inherit its filter.
        let stop = Arc::new(AtomicBool::new(false));
        let (st, ctx) = (stop.clone(), Arc::new(ctx));
        let (tx, rx) = std::sync::mpsc::channel();
        let thread =
            crate::sandbox::spawn(thread::Builder::new().name("api".into()), API, move || {
                let server = match tiny_http::Server::from_listener(listener, None) {
                    Ok(s) => Arc::new(s),
                    Err(e) => {
                        let _ = tx.send(Err(ApiError::Server(e.to_string())));
                        return;
                    }
                };
                if tx.send(Ok(server.clone())).is_ok() {
                    serve(&server, &st, &ctx);
                }
            })
            .map_err(ApiError::Thread)?;
        let server = match rx.recv() {
            Ok(r) => r?,
            Err(_) => return Err(ApiError::Server("its thread ended at start".into())),
        };
        Ok(ApiServer {
            server,
            stop,
            thread: Some(thread),
            created,
        })
    }
}

/// Requests of the control endpoints being read or carried out at once; more are refused
/// (503) until one ends: a client that stalls in its body holds one of these, nothing else.
pub const MAX_CONTROL_REQUESTS: usize = 8;
/// How long a control request waits for the control thread (an added vhost-user device may
/// wait for its back-end, an assigned device for its DMA mapping) before the answer says it
/// is still under way.
pub const CONTROL_DEADLINE: Duration = Duration::from_secs(60);

fn respond(rq: tiny_http::Request, status: u16, body: Option<Value>) {
    let r = match body {
        Some(v) => {
            let text = serde_json::to_string(&v).unwrap_or_default();
            let mut r = tiny_http::Response::from_string(text).with_status_code(status);
            if let Ok(h) = tiny_http::Header::from_bytes("Content-Type", "application/json") {
                r.add_header(h);
            }
            rq.respond(r)
        }
        None => rq.respond(tiny_http::Response::empty(status)),
    };
    if let Err(e) = r {
        log::debug!("api: answering: {e}");
    }
}

fn serve(server: &tiny_http::Server, stop: &AtomicBool, ctx: &Arc<ApiContext>) {
    let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    while !stop.load(Ordering::Acquire) {
        let rq = match server.recv_timeout(Duration::from_millis(200)) {
            Ok(Some(rq)) => rq,
            Ok(None) => continue,
            Err(e) => {
                log::warn!("api: {e}");
                continue;
            }
        };
        let method = rq.method().as_str().to_ascii_uppercase();
        let url = rq.url().to_string();
        let endpoint = url
            .split('?')
            .next()
            .and_then(|p| p.strip_prefix(PREFIX))
            .filter(|e| CONTROL_ENDPOINTS.contains(e))
            .map(str::to_string);
        let Some(endpoint) = endpoint else {
            let (status, body) = handle(ctx, &method, &url);
            log::debug!("api: {method} {url} -> {status}");
            respond(rq, status, body);
            continue;
        };
        if method != "PUT" {
            respond(
                rq,
                405,
                error(405, format!("{endpoint} takes PUT, not {method}")).1,
            );
            continue;
        }
        if rq.body_length().is_some_and(|n| n > MAX_BODY) {
            let (status, body) = error(
                413,
                format!("{endpoint}: the body is over {} KiB", MAX_BODY >> 10),
            );
            respond(rq, status, body);
            continue;
        }
        if busy.load(Ordering::Acquire) >= MAX_CONTROL_REQUESTS {
            let (status, body) = error(
                503,
                format!("{MAX_CONTROL_REQUESTS} control requests are under way (or their clients stalled): try again"),
            );
            respond(rq, status, body);
            continue;
        }
        let n = busy.fetch_add(1, Ordering::AcqRel) + 1;
        log::debug!("api: PUT {endpoint}: {n} control request(s) under way");
        let (ctx, busy2) = (ctx.clone(), busy.clone());
        let spawned = thread::Builder::new()
            .name("api-request".into())
            .spawn(move || {
                let mut rq = rq;
                let (status, body) = control_request(&ctx, &endpoint, &mut rq);
                log::debug!("api: PUT {endpoint} -> {status}");
                respond(rq, status, body);
                busy2.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            // The request went with the closure; its client sees the connection close.
            busy.fetch_sub(1, Ordering::AcqRel);
            log::warn!("api: cannot start a request thread: {e}");
        }
    }
}

/// Reads the body of a control request (at most [`MAX_BODY`] bytes), hands the command to
/// the control thread and waits for its answer, at most [`CONTROL_DEADLINE`].
fn control_request(ctx: &ApiContext, endpoint: &str, rq: &mut tiny_http::Request) -> Reply {
    use std::io::Read;
    let mut body = Vec::new();
    match rq
        .as_reader()
        .take(MAX_BODY as u64 + 1)
        .read_to_end(&mut body)
    {
        Ok(_) if body.len() > MAX_BODY => {
            return error(
                413,
                format!("{endpoint}: the body is over {} KiB", MAX_BODY >> 10),
            )
        }
        Ok(_) => {}
        Err(e) => return error(400, format!("{endpoint}: reading the body: {e}")),
    }
    let cmd = match parse_command(endpoint, &body) {
        Ok(c) => c,
        Err(e) => return error(400, e),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    if !ctx.exit.send(crate::exit::Control::Api(cmd, tx)) {
        return error(503, "the VM is shutting down".into());
    }
    match rx.recv_timeout(CONTROL_DEADLINE) {
        Ok(r) => r,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => error(
            504,
            format!(
                "{endpoint} is still under way after {CONTROL_DEADLINE:?}: vm.info shows its outcome"
            ),
        ),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            error(503, "the VM stopped before the request was carried out".into())
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some((path, id)) = self.created.take() {
            crate::sock::remove_if_ours(&path, id);
        }
    }
}

/// A client's request: `method` on `endpoint` (under [`PREFIX`]) with an optional JSON
/// body, over the unix socket `socket`, everything within `deadline`. Returns the status and
/// the body.
pub fn call(
    socket: &Path,
    method: &str,
    endpoint: &str,
    body: Option<&str>,
    deadline: Duration,
) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let fail = |what: &str, e: io::Error| format!("{what} {}: {e}", socket.display());
    let mut s = std::os::unix::net::UnixStream::connect(socket).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound || e.kind() == io::ErrorKind::ConnectionRefused {
            format!(
                "no vmm listens on {} ({e}): is the vmm running with --api-socket {}?",
                socket.display(),
                socket.display()
            )
        } else {
            fail("cannot connect to", e)
        }
    })?;
    s.set_read_timeout(Some(deadline))
        .and_then(|()| s.set_write_timeout(Some(deadline)))
        .map_err(|e| fail("cannot set a deadline on", e))?;
    let body = body.unwrap_or("");
    let rq = format!(
        "{method} {PREFIX}{endpoint} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(rq.as_bytes())
        .map_err(|e| fail("cannot send the request to", e))?;
    let start = std::time::Instant::now();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if start.elapsed() > deadline {
            return Err(format!(
                "the vmm on {} did not answer within {deadline:?}",
                socket.display()
            ));
        }
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!(
                    "the vmm on {} did not answer within {deadline:?}",
                    socket.display()
                ))
            }
            Err(e) => return Err(fail("reading the answer from", e)),
        }
        if buf.len() > 16 << 20 {
            return Err(format!(
                "the answer from {} is over 16 MiB",
                socket.display()
            ));
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut headers);
    let at = match r.parse(&buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return Err(format!(
                "the answer from {} ended before its headers did",
                socket.display()
            ))
        }
        Err(e) => return Err(format!("not an HTTP answer from {}: {e}", socket.display())),
    };
    let status = r.code.unwrap_or(0);
    let len = r
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        });
    let rest = &buf[at..];
    let body = match len {
        Some(n) => rest.get(..n).unwrap_or(rest),
        None => rest,
    };
    Ok((status, String::from_utf8_lossy(body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> (ApiContext, std::sync::mpsc::Receiver<crate::exit::Control>) {
        let (exit, rx) = ExitHandle::new();
        let mut stats = ExitStats::default();
        stats.mmio.insert("disk0".into(), 7);
        stats.pio.insert("serial".into(), 3);
        (
            ApiContext {
                config: json!({ "cpus": { "boot_vcpus": 1 } }),
                devices: {
                    let r = crate::plug::Registry::default();
                    r.lock().unwrap().record(
                        "disk0",
                        "virtio-blk",
                        1,
                        (ConfigList::Disks, json!({ "id": "disk0", "path": "/img" })),
                    );
                    r
                },
                memory: 64 << 20,
                pause: Arc::default(),
                vcpu_threads: Arc::default(),
                exit,
                counters: Box::new(move || stats.clone()),
                devices_pause: Box::new(|_| Ok(())),
                clock: Box::new(|_| Ok(())),
            },
            rx,
        )
    }

    #[test]
    fn endpoints_methods_and_errors() {
        let (c, rx) = ctx();
        let (s, b) = handle(&c, "GET", "/api/v1/vmm.ping");
        assert_eq!(s, 200);
        assert_eq!(b.unwrap()["pid"], std::process::id());
        let (s, b) = handle(&c, "GET", "/api/v1/vm.info");
        assert_eq!(s, 200);
        let b = b.unwrap();
        assert_eq!(b["device_tree"]["disk0"]["pci_bdf"], "0000:00:01.0");
        assert_eq!(b["device_tree"]["disk0"]["state"], "Running");
        assert_eq!(b["config"]["disks"][0]["path"], "/img");
        assert_eq!(b["config"]["net"], json!([]));
        assert_eq!(b["state"], "Running");
        let (s, b) = handle(&c, "GET", "/api/v1/vm.counters?x=1");
        assert_eq!(s, 200);
        let b = b.unwrap();
        assert_eq!(b["disk0"]["mmio_exits"], 7);
        assert_eq!(b["vmm"]["exits"], 10);
        // The wrong method, an unknown endpoint, a path outside the API.
        assert_eq!(handle(&c, "PUT", "/api/v1/vm.info").0, 405);
        assert_eq!(handle(&c, "GET", "/api/v1/vm.shutdown").0, 405);
        assert_eq!(handle(&c, "GET", "/api/v1/vm.nothing").0, 404);
        assert_eq!(handle(&c, "GET", "/vm.info").0, 404);
        // No vCPU thread yet: a pause is refused, a resume of a running VM too.
        let (s, b) = handle(&c, "PUT", "/api/v1/vm.pause");
        assert_eq!(s, 409, "{b:?}");
        assert_eq!(handle(&c, "PUT", "/api/v1/vm.resume").0, 409);
        assert!(rx.try_recv().is_err(), "nothing asked the VM to stop yet");
        assert_eq!(handle(&c, "PUT", "/api/v1/vm.shutdown"), (204, None));
        assert_eq!(
            rx.try_recv().ok().and_then(|c| c.exit()),
            Some(VmExit::ApiShutdown)
        );
    }

    fn add(endpoint: &str, body: &str) -> Result<Command, String> {
        parse_command(endpoint, body.as_bytes())
    }

    #[test]
    fn device_requests_parse_to_the_command_line_options() {
        assert_eq!(
            add(
                "vm.add-disk",
                r#"{"path": "/img/a.raw", "readonly": true, "num_queues": 2, "id": "d9"}"#
            ),
            Ok(Command::Add(AddRequest {
                net: false,
                vhost_user: false,
                options: "path=/img/a.raw,readonly=on,queues=2".into(),
                id: Some("d9".into()),
                queues_given: true,
            }))
        );
        assert_eq!(
            add(
                "vm.add-net",
                r#"{"tap": "vmtap1", "mac": "52:54:00:00:00:09", "num_queues": 4}"#
            ),
            Ok(Command::Add(AddRequest {
                net: true,
                vhost_user: false,
                options: "tap=vmtap1,mac=52:54:00:00:00:09,queues=2".into(),
                id: None,
                queues_given: true,
            }))
        );
        assert_eq!(
            add(
                "vm.add-disk",
                r#"{"vhost_user": true, "vhost_socket": "/run/blk.sock"}"#
            ),
            Ok(Command::Add(AddRequest {
                net: false,
                vhost_user: true,
                options: "socket=/run/blk.sock".into(),
                id: None,
                queues_given: false,
            }))
        );
        assert_eq!(
            add("vm.remove-device", r#"{"id": "d9"}"#),
            Ok(Command::Remove("d9".into()))
        );
        assert_eq!(add("vm.power-button", ""), Ok(Command::PowerButton));
    }

    #[test]
    fn bad_device_requests_say_why() {
        let cases = [
            ("vm.add-disk", "", "needs a JSON object"),
            ("vm.add-disk", "{", "not valid JSON"),
            ("vm.add-disk", "[1]", "must be a JSON object"),
            (
                "vm.add-disk",
                r#"{"path": "/a", "size": 1}"#,
                "unknown field \"size\"",
            ),
            (
                "vm.add-disk",
                r#"{"readonly": true}"#,
                "\"path\" (the disk image) is required",
            ),
            ("vm.add-disk", r#"{"path": 7}"#, "must be a string"),
            (
                "vm.add-disk",
                r#"{"path": "/a,direct=on"}"#,
                "may not contain ','",
            ),
            (
                "vm.add-disk",
                r#"{"path": "/a", "readonly": "yes"}"#,
                "true or false",
            ),
            (
                "vm.add-disk",
                r#"{"path": "/a", "num_queues": -1}"#,
                "whole number",
            ),
            (
                "vm.add-disk",
                r#"{"vhost_user": true}"#,
                "needs \"vhost_socket\"",
            ),
            (
                "vm.add-disk",
                r#"{"vhost_user": true, "vhost_socket": "/s", "path": "/a"}"#,
                "in-VMM device",
            ),
            (
                "vm.add-disk",
                r#"{"path": "/a", "vhost_socket": "/s"}"#,
                "needs \"vhost_user\": true",
            ),
            (
                "vm.add-net",
                r#"{"tap": "t0", "num_queues": 3}"#,
                "must be even",
            ),
            (
                "vm.add-net",
                r#"{"mac": "52:54:00:00:00:01"}"#,
                "\"tap\" (the tap device) is required",
            ),
            ("vm.remove-device", "{}", "\"id\" is required"),
            ("vm.remove-device", r#"{"id": ""}"#, "is empty"),
            (
                "vm.add-disk",
                r#"{"pa\nth": "/a"}"#,
                "unknown field \"pa\\nth\"",
            ),
            ("vm.add-disk", r#"{"path": "/a\nb"}"#, "control characters"),
            (
                "vm.add-disk",
                r#"{"path": "/a", "id": "x\u001b[2J"}"#,
                "control characters",
            ),
        ];
        for (endpoint, body, want) in cases {
            match add(endpoint, body) {
                Err(e) => assert!(e.contains(want), "{endpoint} {body}: {e} (wanted {want})"),
                Ok(c) => panic!("{endpoint} {body} was taken: {c:?}"),
            }
        }
    }

    #[test]
    fn socket_argument() {
        assert_eq!(
            ApiSocket::parse("path=/run/vm.sock"),
            Ok(ApiSocket::Path("/run/vm.sock".into()))
        );
        assert_eq!(
            ApiSocket::parse("/run/vm.sock"),
            Ok(ApiSocket::Path("/run/vm.sock".into()))
        );
        assert_eq!(ApiSocket::parse("fd=3"), Ok(ApiSocket::Fd(3)));
        assert!(ApiSocket::parse("fd=x").is_err());
        assert!(ApiSocket::parse("fd=-1").is_err());
        assert!(ApiSocket::parse("path=").is_err());
    }
}
