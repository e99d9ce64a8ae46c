//! A daemon's stats endpoint (`--stats-socket PATH`): HTTP/1.1 on a unix socket, answering
//! `GET /stats` with the daemon's per-queue counters as JSON (the same fields as the vmm's
//! `vm.counters` for an in-VMM device: `crate::stats`), on a thread of its own, off the
//! queue threads. Read it with `curl --unix-socket PATH http://localhost/stats`; the vmm
//! relays it into `vm.counters` for a vhost-user device given `stats=PATH`.

use std::path::Path;
use std::sync::Arc;
use std::thread;

use serde_json::{json, Value};

use super::confine::{spawn_confined, ConfineError};
use super::{bind_listening, clear_stale_socket, ServeError, SocketFile};
use crate::sandbox::{allow, allow_if, Rule, ThreadKind};

/// The stats threads (this one and tiny_http's acceptor and connection threads, which it
/// spawns): accept, read the request, write the JSON answer.
pub const STATS_SYSCALLS: &[Rule] = &[
    allow(libc::SYS_accept4),
    allow(libc::SYS_accept),
    allow(libc::SYS_read),
    allow(libc::SYS_recvfrom),
    allow(libc::SYS_write),
    allow(libc::SYS_writev),
    allow(libc::SYS_sendto),
    allow(libc::SYS_shutdown),
    allow(libc::SYS_close),
    allow(libc::SYS_poll),
    allow(libc::SYS_futex),
    allow(libc::SYS_mmap),
    allow(libc::SYS_munmap),
    allow(libc::SYS_mprotect),
    allow(libc::SYS_madvise),
    allow(libc::SYS_brk),
    allow(libc::SYS_clone3),
    allow(libc::SYS_clone),
    allow(libc::SYS_rt_sigprocmask),
    allow(libc::SYS_sigaltstack),
    allow(libc::SYS_set_robust_list),
    allow(libc::SYS_rseq),
    allow(libc::SYS_sched_getaffinity),
    allow_if(libc::SYS_prctl, &[(0, libc::PR_SET_NAME as u64)]),
    allow(libc::SYS_getsockopt),
    allow(libc::SYS_setsockopt),
    allow(libc::SYS_getsockname),
    allow(libc::SYS_getpeername),
    allow(libc::SYS_fcntl),
    allow(libc::SYS_ioctl),
];

/// The stats threads' kind.
pub const STATS: ThreadKind = ThreadKind {
    name: "stats",
    syscalls: &[STATS_SYSCALLS],
};

/// What the endpoint answers: the counters now, as JSON.
pub type StatsReader = Arc<dyn Fn() -> Value + Send + Sync>;

/// The stats endpoint: stops (and removes its socket) when dropped.
pub struct StatsServer {
    server: Arc<tiny_http::Server>,
    thread: Option<thread::JoinHandle<()>>,
    _file: SocketFile,
}

/// The stats socket, bound and listening, before its thread starts (the daemons bind it
/// before they are confined, and start serving it after: [`super::confine`]).
pub struct StatsSocket {
    listener: std::os::unix::net::UnixListener,
    file: SocketFile,
    path: std::path::PathBuf,
}

impl StatsSocket {
    /// Listens on `path` (a stale socket there is replaced; a live one, or a file that is
    /// not a socket, is refused).
    pub fn bind(path: &Path) -> Result<StatsSocket, ServeError> {
        clear_stale_socket(path)?;
        let listener = bind_listening(path)?;
        let file = SocketFile::record(path).map_err(|source| ServeError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(StatsSocket {
            listener,
            file,
            path: path.to_path_buf(),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Answers from `read` on a thread confined to [`STATS`] (as are the threads the HTTP
    /// server spawns from it).
    pub fn serve(self, read: StatsReader) -> Result<StatsServer, ConfineError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let listener = self.listener;
        let path = self.path.clone();
        let thread = spawn_confined(
            "stats",
            STATS,
            move || match tiny_http::Server::from_listener(listener, None) {
                Ok(server) => {
                    let server = Arc::new(server);
                    let _ = tx.send(Some(server.clone()));
                    for rq in server.incoming_requests() {
                        answer(rq, &read);
                    }
                }
                Err(e) => {
                    log::error!("stats socket '{}': {e}", path.display());
                    let _ = tx.send(None);
                }
            },
        )?;
        let server = rx
            .recv()
            .ok()
            .flatten()
            .ok_or(ConfineError::Thread("stats"))?;
        log::info!("counters at {} (GET /stats)", self.path.display());
        Ok(StatsServer {
            server,
            thread: Some(thread),
            _file: self.file,
        })
    }
}

impl Drop for StatsServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn answer(rq: tiny_http::Request, read: &StatsReader) {
    let path = rq.url().split('?').next().unwrap_or("");
    let (status, body) = match (rq.method(), path) {
        (tiny_http::Method::Get, "/stats") => (200, read()),
        (_, "/stats") => (405, json!({ "error": "/stats takes GET" })),
        _ => (
            404,
            json!({ "error": format!("{path}: the stats are at /stats") }),
        ),
    };
    let mut r = tiny_http::Response::from_string(body.to_string()).with_status_code(status);
    if let Ok(h) = tiny_http::Header::from_bytes("Content-Type", "application/json") {
        r.add_header(h);
    }
    if let Err(e) = rq.respond(r) {
        log::debug!("stats: answering: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    fn get(path: &Path, url: &str) -> String {
        let mut s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn answers_get_stats_and_removes_its_socket() {
        let dir = std::env::temp_dir().join(format!("stats-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let n = Arc::new(std::sync::atomic::AtomicU64::new(7));
        let n2 = n.clone();
        let server = StatsSocket::bind(&path)
            .unwrap()
            .serve(Arc::new(
                move || json!({ "reads": n2.load(std::sync::atomic::Ordering::Relaxed) }),
            ))
            .unwrap();
        let r = get(&path, "/stats");
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.ends_with(r#"{"reads":7}"#), "{r}");
        n.store(9, std::sync::atomic::Ordering::Relaxed);
        assert!(get(&path, "/stats").ends_with(r#"{"reads":9}"#));
        assert!(get(&path, "/nope").starts_with("HTTP/1.1 404"));
        // A second daemon on the same live socket is refused.
        assert!(StatsSocket::bind(&path).is_err());
        drop(server);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
