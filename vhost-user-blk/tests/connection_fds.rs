//! Serving a connection leaves no fd open behind it: a daemon serves frontend after frontend
//! (reconnects, VMM restarts) for as long as it runs. Its own test binary: nothing else
//! opens or closes fds meanwhile.

use std::os::unix::net::UnixStream;
use std::sync::Arc;

use backends::block::{BlockBackend, BlockOptions, EngineChoice};
use backends::vhost_user::{serve, Frontends, Stop};
use vhost_user_blk::{BlkBackend, BlkConfig};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn serving_connections_leaks_no_fd() {
    let dir = std::env::temp_dir().join(format!("vu-blk-fds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let disk = Arc::new(
        BlockBackend::open(&BlockOptions {
            path: img.clone(),
            engine: EngineChoice::Sync,
            ..Default::default()
        })
        .unwrap(),
    );
    let stop = Stop::new().unwrap();
    let serve_one = || {
        // A frontend that connects and goes away at once.
        let (frontend, theirs) = UnixStream::pair().unwrap();
        drop(frontend);
        let disk = disk.clone();
        serve(
            "test",
            &mut Frontends::Connected(Some(theirs)),
            &stop,
            move || {
                BlkBackend::new(
                    disk.clone(),
                    BlkConfig {
                        queues: 4,
                        queue_size: 64,
                        poll: std::time::Duration::ZERO,
                    },
                )
            },
        )
        .unwrap();
    };
    serve_one();
    let before = open_fds();
    for _ in 0..20 {
        serve_one();
    }
    let after = open_fds();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(after, before, "fds open after 20 more connections");
}
