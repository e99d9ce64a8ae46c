//! Unix sockets the vmm listens on (vhost-user `server=on`, `--api-socket`): a stale socket
//! nobody listens on is replaced, a live one or anything else is refused, and at exit the
//! socket is removed only if it is still the one this vmm created.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// The socket file's (device, inode), to recognize it at exit.
pub type SocketId = (u64, u64);

/// Listens at `path` (blocking); the error is the reason, for the caller's one line.
pub fn listen(path: &Path) -> Result<(UnixListener, SocketId), String> {
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            return Err("it exists and is not a socket; pick another path".into());
        }
        if UnixStream::connect(path).is_ok() {
            return Err("another process listens there; pick another path".into());
        }
        std::fs::remove_file(path).map_err(|e| format!("cannot remove the stale socket: {e}"))?;
    }
    let l = UnixListener::bind(path).map_err(|e| e.to_string())?;
    let m = std::fs::metadata(path).map_err(|e| e.to_string())?;
    Ok((l, (m.dev(), m.ino())))
}

/// Removes `path` if it is still the socket `id` [`listen`] created.
pub fn remove_if_ours(path: &Path, id: SocketId) {
    if std::fs::metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == id) {
        let _ = std::fs::remove_file(path);
    }
}
