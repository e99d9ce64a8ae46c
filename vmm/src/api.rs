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
//! - `GET vm.counters`: per device, the exits to the vmm it caused; `vmm`: the totals.
//! - `PUT vm.pause`, `PUT vm.resume`: every vCPU out of KVM_RUN and parked, and back
//!   (`vm.info` says `Paused`); 409 when already so.
//! - `PUT vm.shutdown`, `PUT vmm.shutdown`: stop the VM (the vmm exits 0; it runs one VM).
//!
//! The server is `tiny_http`'s, on its own thread; requests are answered from state the API
//! thread reads without waiting on a vCPU or device thread (the configuration as started,
//! atomic counters), and no endpoint reads a request body, so a client that stalls holds
//! nothing but its own connection.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};

use crate::config::VmConfig;
use crate::exit::{ExitHandle, VmExit};
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

/// One device as `vm.info` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceNode {
    pub id: String,
    /// `virtio-blk`, `virtio-net`, `vhost-user-blk`, `vhost-user-net` or `vfio`.
    pub model: String,
    /// The guest's PCI address (`0000:00:03.0`).
    pub pci_bdf: String,
}

/// What the API answers from.
pub struct ApiContext {
    pub config: Value,
    pub devices: Vec<DeviceNode>,
    pub memory: u64,
    /// The pause flag the vCPU threads park on.
    pub pause: Arc<crate::pause::PauseGate>,
    /// The vCPU threads (set once they run), to kick out of KVM_RUN for a pause.
    pub vcpu_threads: Arc<std::sync::OnceLock<Vec<libc::pthread_t>>>,
    pub exit: ExitHandle,
    /// The exit counters now.
    pub counters: Box<dyn Fn() -> ExitStats + Send>,
}

/// The configuration as `vm.info` shows it (Cloud Hypervisor's `VmConfig` field names where
/// they exist).
pub fn config_json(cfg: &VmConfig) -> Value {
    let mac = |m: &[u8; 6]| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    json!({
        "cpus": { "boot_vcpus": cfg.cpus, "max_vcpus": cfg.cpus },
        "memory": { "size": cfg.memory, "shared": true },
        "payload": {
            "kernel": cfg.kernel,
            "initramfs": cfg.initramfs,
            "cmdline": cfg.cmdline,
        },
        "disks": cfg.disks.iter().map(|d| json!({
            "id": d.id,
            "path": d.path,
            "readonly": d.readonly,
            "direct": d.direct,
            "num_queues": d.queues,
            "queue_size": d.queue_size,
            "poll_us": d.poll_us,
            "vhost_user": false,
        })).chain(cfg.vhost_user.iter().filter(|v| !v.net).map(|v| json!({
            "id": v.id,
            "vhost_user": true,
            "vhost_socket": v.socket,
            "num_queues": v.queues,
            "queue_size": v.queue_size,
        }))).collect::<Vec<_>>(),
        "net": cfg.nets.iter().map(|n| json!({
            "id": n.id,
            "tap": n.tap,
            "mac": mac(&n.mac),
            "num_queues": 2 * u32::from(n.queues),
            "queue_size": n.queue_size,
            "poll_us": n.poll_us,
            "vhost_user": false,
        })).chain(cfg.vhost_user.iter().filter(|v| v.net).map(|v| json!({
            "id": v.id,
            "vhost_user": true,
            "vhost_socket": v.socket,
            "mac": v.mac.as_ref().map(mac),
            "num_queues": 2 * u32::from(v.queues),
            "queue_size": v.queue_size,
        }))).collect::<Vec<_>>(),
        "devices": cfg.vfio.iter().map(|v| json!({
            "id": v.id,
            "path": format!("/sys/bus/pci/devices/{}", v.host),
        })).collect::<Vec<_>>(),
    })
}

/// The model of device `id` in `cfg`.
pub fn model_of(cfg: &VmConfig, id: &str) -> &'static str {
    if cfg.disks.iter().any(|d| d.id == id) {
        "virtio-blk"
    } else if cfg.nets.iter().any(|n| n.id == id) {
        "virtio-net"
    } else if let Some(v) = cfg.vhost_user.iter().find(|v| v.id == id) {
        if v.net {
            "vhost-user-net"
        } else {
            "vhost-user-blk"
        }
    } else if cfg.vfio.iter().any(|v| v.id == id) {
        "vfio"
    } else {
        "other"
    }
}

/// An answer: status and JSON body (None: no body).
type Reply = (u16, Option<Value>);

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
        "vm.info" => want("GET").unwrap_or_else(|| {
            let tree: BTreeMap<&str, &DeviceNode> =
                ctx.devices.iter().map(|d| (d.id.as_str(), d)).collect();
            (
                200,
                Some(json!({
                    "config": ctx.config,
                    "state": if ctx.pause.is_paused() { "Paused" } else { "Running" },
                    "memory_actual_size": ctx.memory,
                    "device_tree": tree,
                })),
            )
        }),
        "vm.counters" => want("GET").unwrap_or_else(|| (200, Some(counters(ctx)))),
        "vm.pause" => want("PUT").unwrap_or_else(|| pause(ctx)),
        "vm.resume" => want("PUT").unwrap_or_else(|| {
            if !ctx.pause.is_paused() {
                return error(409, "the VM is not paused".into());
            }
            ctx.pause.resume();
            log::info!("api: the VM is resumed");
            (204, None)
        }),
        "vm.shutdown" | "vmm.shutdown" => want("PUT").unwrap_or_else(|| {
            ctx.exit.request(VmExit::ApiShutdown);
            (204, None)
        }),
        _ => error(404, format!("unknown endpoint {endpoint}")),
    }
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
            log::info!("api: the VM is paused ({} vCPUs parked)", threads.len());
            (204, None)
        }
        Err(e) if ctx.pause.is_paused() => error(409, e),
        Err(e) => error(500, e),
    }
}

/// How long `vm.pause` waits for the vCPU threads to park.
pub const PAUSE_DEADLINE: Duration = Duration::from_secs(2);

/// `vm.counters`: per device id its exits (MMIO and port accesses to its BARs, doorbells
/// that exited instead of reaching an ioeventfd); `vmm`: every exit by kind.
fn counters(ctx: &ApiContext) -> Value {
    let s = (ctx.counters)();
    let mut out = serde_json::Map::new();
    for d in &ctx.devices {
        let mmio = s.mmio.get(&d.id).copied().unwrap_or(0);
        let pio = s.pio.get(&d.id).copied().unwrap_or(0);
        let notify = s.notify_exits.get(&d.id).copied().unwrap_or(0);
        out.insert(
            d.id.clone(),
            json!({ "mmio_exits": mmio, "pio_exits": pio, "notify_exits": notify }),
        );
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
        let server = Arc::new(
            tiny_http::Server::from_listener(listener, None)
                .map_err(|e| ApiError::Server(e.to_string()))?,
        );
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (server.clone(), stop.clone());
        let thread = thread::Builder::new()
            .name("api".into())
            .spawn(move || serve(&s, &st, &ctx))
            .map_err(ApiError::Thread)?;
        Ok(ApiServer {
            server,
            stop,
            thread: Some(thread),
            created,
        })
    }
}

fn serve(server: &tiny_http::Server, stop: &AtomicBool, ctx: &ApiContext) {
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
        let (status, body) = handle(ctx, &method, rq.url());
        log::debug!("api: {method} {} -> {status}", rq.url());
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

    fn ctx() -> (ApiContext, std::sync::mpsc::Receiver<VmExit>) {
        let (exit, rx) = ExitHandle::new();
        let mut stats = ExitStats::default();
        stats.mmio.insert("disk0".into(), 7);
        stats.pio.insert("serial".into(), 3);
        (
            ApiContext {
                config: json!({ "cpus": { "boot_vcpus": 1 } }),
                devices: vec![DeviceNode {
                    id: "disk0".into(),
                    model: "virtio-blk".into(),
                    pci_bdf: "0000:00:01.0".into(),
                }],
                memory: 64 << 20,
                pause: Arc::default(),
                vcpu_threads: Arc::default(),
                exit,
                counters: Box::new(move || stats.clone()),
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
        assert_eq!(rx.try_recv().ok(), Some(VmExit::ApiShutdown));
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
