//! `vmm --api-socket` on this host's /dev/kvm with the ring-3 test guest (halted, so the VM
//! runs until stopped) and one in-VMM disk: `curl --unix-socket` and `vmm-remote` get the
//! vmm's PID (`vmm.ping`), the configuration and the disk's guest PCI address (`vm.info`),
//! the exit counters (`vm.counters`); wrong methods and unknown endpoints get 405 and 404
//! with a JSON error; a client that connects and stalls holds up nobody; a second vmm on the
//! same socket is refused with one line; `vm.shutdown` ends the vmm with status 0 and
//! removes its socket.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::guest::test_guest_elf;
use tests::host::{Daemon, ScratchDir};

fn bin(name: &str) -> PathBuf {
    let p = tests::lab::profile_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: build the workspace binaries first (cargo build --workspace --bins)",
        p.display()
    );
    p
}

fn vmm_command(api: &Path, disk: &Path) -> Command {
    let mut cmd = Command::new(bin("vmm"));
    cmd.arg("--kernel")
        .arg(test_guest_elf())
        .args([
            "--cmdline",
            "fault=halt",
            "--memory",
            "32M",
            "--serial",
            "off",
        ])
        .arg("--disk")
        .arg(format!("path={},id=disk0", disk.display()))
        .arg("--api-socket")
        .arg(format!("path={}", api.display()))
        .env("RUST_LOG", "info");
    cmd
}

fn remote(api: &Path, args: &[&str]) -> Output {
    Command::new(bin("vmm-remote"))
        .arg("--api-socket")
        .arg(api)
        .args(args)
        .output()
        .expect("run vmm-remote")
}

fn json(o: &Output) -> Value {
    assert!(o.status.success(), "{o:?}");
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {o:?}"))
}

/// (status code, body) of `curl -X METHOD --unix-socket API http://localhost/api/v1/EP`.
fn curl(api: &Path, method: &str, endpoint: &str) -> (u16, String) {
    let o = Command::new("curl")
        .args([
            "-s",
            "-m",
            "10",
            "-X",
            method,
            "-w",
            "\n%{http_code}",
            "--unix-socket",
        ])
        .arg(api)
        .arg(format!("http://localhost/api/v1/{endpoint}"))
        .output()
        .expect("curl (apt-get install curl)");
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
fn info_counters_errors_a_stalled_client_and_shutdown() {
    let dir = ScratchDir::new("api").expect("scratch dir");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(1 << 20))
        .expect("disk image");
    let api = dir.join("api.sock");
    let mut vm = Daemon::spawn("api-vmm", &mut vmm_command(&api, &disk)).expect("start vmm");
    vm.set_grace(Duration::from_secs(5));
    vm.wait_for_path(&api, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));

    // curl, as a user would.
    let (code, body) = curl(&api, "GET", "vmm.ping");
    assert_eq!(code, 200, "{body}");
    let ping: Value = serde_json::from_str(&body).expect("ping JSON");
    assert_eq!(ping["pid"], vm.pid());

    // A client that connects, sends half a request and stalls holds up nobody.
    let mut stalled = UnixStream::connect(&api).expect("connect");
    stalled
        .write_all(b"GET /api/v1/vm.info HTTP/1.1\r\nHost: local")
        .expect("half a request");
    let t = Instant::now();
    let info = json(&remote(&api, &["info"]));
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(info["state"], "Running");
    let node = &info["device_tree"]["disk0"];
    assert_eq!(node["model"], "virtio-blk", "{info}");
    let bdf = node["pci_bdf"].as_str().unwrap_or_default();
    assert!(
        bdf.starts_with("0000:00:") && bdf.ends_with(".0") && bdf != "0000:00:00.0",
        "{info}"
    );
    assert_eq!(
        info["config"]["disks"][0]["path"],
        disk.display().to_string()
    );
    assert_eq!(info["config"]["disks"][0]["id"], "disk0");
    assert_eq!(info["config"]["memory"]["size"], 32 << 20);
    assert_eq!(info["memory_actual_size"], 32 << 20);

    let counters = json(&remote(&api, &["counters"]));
    assert!(
        counters["vmm"]["exits"].as_u64().unwrap_or(0) > 0,
        "{counters}"
    );
    assert!(counters["disk0"].is_object(), "{counters}");

    // Wrong method, unknown endpoint: 405 and 404, with the reason.
    let (code, body) = curl(&api, "PUT", "vm.info");
    assert_eq!(code, 405, "{body}");
    assert!(body.contains("takes GET"), "{body}");
    let (code, body) = curl(&api, "GET", "vm.nothing");
    assert_eq!(code, 404, "{body}");
    let o = remote(&dir.join("none.sock"), &["ping"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no vmm listens on"), "{err}");

    // A second vmm on the same socket: refused, one line, status 2; the first keeps it.
    let o = vmm_command(&api, &disk).output().expect("second vmm");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("another process listens there"), "{err}");
    assert_eq!(json(&remote(&api, &["ping"]))["pid"], vm.pid());

    // Shutdown: the vmm ends with 0 and its socket goes.
    let t = Instant::now();
    let o = remote(&api, &["shutdown"]);
    assert!(o.status.success(), "{o:?}");
    let status = loop {
        if !vm.is_running() {
            break vm.wait().expect("vmm status");
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the vmm still runs 5 s after vm.shutdown:\n{}",
            vm.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "{}", vm.log());
    assert!(vm.log().contains("stopped through the API"), "{}", vm.log());
    assert!(!api.exists(), "the API socket is left behind");
    drop(stalled);
}

/// The clock ticks the vmm's vCPU threads used so far.
fn vcpu_ticks(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .filter(|s| s.contains("(vcpu"))
        .filter_map(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime: fields 14 and 15 of stat, 12 and 13 after the name.
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum()
}

#[test]
fn pause_parks_the_vcpus_resume_restarts_them_and_sigterm_ends_a_paused_vm() {
    let dir = ScratchDir::new("api-pause").expect("scratch dir");
    let api = dir.join("api.sock");
    // Two vCPUs spinning in ring 3: busy all the time, so parked shows as no CPU time.
    let mut cmd = Command::new(bin("vmm"));
    cmd.arg("--kernel")
        .arg(test_guest_elf())
        .args(["--cmdline", "fault=spin", "--cpus", "2", "--memory", "32M"])
        .args(["--serial", "off", "--api-socket"])
        .arg(format!("path={}", api.display()))
        .env("RUST_LOG", "info");
    let mut vm = Daemon::spawn("api-pause", &mut cmd).expect("start vmm");
    vm.wait_for_path(&api, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    let pid = vm.pid();
    std::thread::sleep(Duration::from_millis(300));
    let ticks_over = |ms: u64| {
        let a = vcpu_ticks(pid);
        std::thread::sleep(Duration::from_millis(ms));
        vcpu_ticks(pid) - a
    };
    let running = ticks_over(500);
    assert!(
        running >= 10,
        "the spinning vCPUs used {running} ticks in 500 ms"
    );

    let t = Instant::now();
    let o = remote(&api, &["pause"]);
    assert!(o.status.success(), "{o:?}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(json(&remote(&api, &["info"]))["state"], "Paused");
    let paused = ticks_over(500);
    assert!(paused <= 2, "paused vCPUs used {paused} ticks in 500 ms");
    let (code, body) = curl(&api, "PUT", "vm.pause");
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("already paused"), "{body}");

    assert!(remote(&api, &["resume"]).status.success());
    assert_eq!(json(&remote(&api, &["info"]))["state"], "Running");
    let resumed = ticks_over(500);
    assert!(
        resumed >= 10,
        "resumed vCPUs used {resumed} ticks in 500 ms"
    );
    assert_eq!(curl(&api, "PUT", "vm.resume").0, 409);

    // Paused again, SIGTERM ends the vmm at once.
    assert!(remote(&api, &["pause"]).status.success());
    vm.set_grace(Duration::from_secs(10));
    let t = Instant::now();
    let status = vm.stop().expect("stop");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "SIGTERM on a paused VM took {:?}",
        t.elapsed()
    );
    assert_eq!(status.code(), Some(0), "{}", vm.log());
    assert!(
        vm.log().contains("the VM is paused (2 vCPUs parked)"),
        "{}",
        vm.log()
    );
}
