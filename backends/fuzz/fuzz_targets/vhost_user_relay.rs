//! `cargo fuzz` target: the daemons' vhost-user serving layer fed a frontend's messages
//! with fds (see `backends::fuzzing::fuzz_vhost_user_relay` for the format and the
//! invariants). When bits 6 and 7 of the first byte are both set, the messages go through
//! the relay into a real vhost-user-backend daemon with the virtio-blk back-end of
//! `vhost-user-blk` on a 1 MiB temporary image (slower: a daemon per input); otherwise
//! into a fake back-end that checks everything the relay forwards. The serving mode also
//! asserts that a connection leaves no fd open once served.
#![no_main]

use std::sync::{Arc, OnceLock};

use backends::block::{BlockBackend, BlockOptions, EngineChoice};
use vhost_user_blk::{BlkBackend, BlkConfig};
use vmm_sys_util::tempfile::TempFile;

struct Disk {
    _img: TempFile,
    disk: Arc<BlockBackend>,
}

fn disk() -> Option<&'static Disk> {
    static DISK: OnceLock<Option<Disk>> = OnceLock::new();
    DISK.get_or_init(|| {
        let img = TempFile::new().ok()?;
        img.as_file().set_len(1 << 20).ok()?;
        let disk = BlockBackend::open(&BlockOptions {
            path: img.as_path().into(),
            engine: EngineChoice::Sync,
            ..Default::default()
        })
        .ok()?;
        Some(Disk {
            _img: img,
            disk: Arc::new(disk),
        })
    })
    .as_ref()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.first().is_some_and(|b| b & 0xc0 == 0xc0) {
        let Some(d) = disk() else { return };
        let disk = d.disk.clone();
        // Every thread of the connection is joined when serve returns: what it opened is
        // closed (a daemon serves frontend after frontend for as long as it runs).
        let before = open_fds();
        backends::fuzzing::fuzz_vhost_user_serve(data, move || {
            BlkBackend::new(
                disk.clone(),
                BlkConfig {
                    queues: 2,
                    queue_size: 256,
                    poll: std::time::Duration::ZERO,
                },
            )
        });
        let after = open_fds();
        assert!(
            after <= before,
            "a served connection left {} fds open",
            after - before
        );
    } else {
        backends::fuzzing::fuzz_vhost_user_relay(data);
    }
});
