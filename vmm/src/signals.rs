//! SIGTERM/SIGINT: stop the VM cleanly instead of dying with it half torn down.

use std::io;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;
use std::thread;
use std::time::Duration;

use crate::exit::{ExitHandle, VmExit};

static PENDING: AtomicI32 = AtomicI32::new(0);
static WATCHER: OnceLock<()> = OnceLock::new();

extern "C" fn on_signal(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only an atomic store: async-signal-safe.
    PENDING.store(num, Ordering::SeqCst);
}

/// Installs the handlers and a watcher thread that turns a signal into a VM exit request.
pub fn install(exit: ExitHandle) -> io::Result<()> {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        vmm_sys_util::signal::register_signal_handler(sig, on_signal)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    }
    if WATCHER.set(()).is_err() {
        return Ok(());
    }
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let sig = PENDING.swap(0, Ordering::SeqCst);
            if sig != 0 {
                log::info!("received signal {sig}: stopping the VM");
                exit.request(VmExit::Signal(sig));
            }
            thread::sleep(Duration::from_millis(20));
        })?;
    Ok(())
}
