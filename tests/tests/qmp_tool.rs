//! The `qmp` tool the lab bench drives QEMU with (stop/cont around turns, device_add for
//! hotplug latency), against a real QEMU on this machine (no guest: `-machine none`).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn qmp(sock: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_qmp"))
        .arg(sock)
        .args(args)
        .output()
        .expect("qmp runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

#[test]
fn stops_and_continues_qemu_and_reports_its_errors() {
    let dir = std::env::temp_dir().join(format!("qmp-tool-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("qmp.sock");
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-machine", "none", "-display", "none", "-S", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 (scripts/test installs it)");
    let start = Instant::now();
    while !sock.exists() && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = |s: &str| format!(r#""status":"{s}""#);
    let (rc, out, _) = qmp(&sock, &["query-status"]);
    assert_eq!(rc, 0);
    assert!(out.contains(&status("prelaunch")), "{out}");
    assert_eq!(qmp(&sock, &["cont"]).0, 0);
    assert!(qmp(&sock, &["query-status"]).1.contains(&status("running")));
    assert_eq!(qmp(&sock, &["stop"]).0, 0);
    assert!(qmp(&sock, &["query-status"]).1.contains(&status("paused")));
    let (rc, _, err) = qmp(&sock, &["device_add", r#"{"driver": "no-such-device"}"#]);
    assert_eq!(rc, 1);
    assert!(
        err.starts_with("qmp: GenericError: ") && err.contains("no-such-device"),
        "{err}"
    );
    let (rc, _, err) = qmp(&sock, &["stop", "{not json"]);
    assert_eq!(rc, 2, "{err}");
    let _ = qemu.kill();
    let _ = qemu.wait();
    let (rc, _, err) = qmp(&sock, &["query-status"]);
    assert_eq!(rc, 2, "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
