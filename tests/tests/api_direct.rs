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
    // The images the tests hot-add are made in the disk's directory: the sandbox lets the
    // vmm open them once declared.
    if let Some(dir) = disk.parent() {
        cmd.arg("--landlock-rules")
            .arg(format!("path={},access=rw", dir.display()));
    }
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
    curl_body(api, method, endpoint, None)
}

/// The same with a JSON body (`-d BODY`).
fn curl_body(api: &Path, method: &str, endpoint: &str, body: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    if let Some(b) = body {
        cmd.args(["-H", "Content-Type: application/json", "--data-binary", b]);
    }
    let o = cmd
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
        vm.log()
            .contains("the VM is paused (2 vCPUs parked, the devices quiesced)"),
        "{}",
        vm.log()
    );
}

/// Hot-add and removal requests against a running vmm whose guest (the ring-3 test guest)
/// has no ACPI: devices are created and placed at once, `vm.info` shows them, a removal
/// leaves the device visibly "Removing" (the guest never ejects) without a hung call, and
/// every bad request gets its HTTP error and one sentence while the VM runs on: malformed
/// JSON, unknown fields, an oversized body, an id or an image already in use, an unknown id,
/// clients stalled in their bodies, concurrent adds.
#[test]
fn hotplug_requests_and_bad_input_leave_the_vm_running() {
    let dir = ScratchDir::new("api-hotplug").expect("scratch dir");
    let mk = |name: &str| {
        let p = dir.join(name);
        std::fs::File::create(&p)
            .and_then(|f| f.set_len(1 << 20))
            .expect("disk image");
        p
    };
    let disk = mk("disk.img");
    let api = dir.join("api.sock");
    let mut vm = Daemon::spawn("api-hp-vmm", &mut vmm_command(&api, &disk)).expect("start vmm");
    vm.set_grace(Duration::from_secs(5));
    vm.wait_for_path(&api, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));

    // Add a disk through vmm-remote (the --disk syntax) and one through curl (JSON).
    let hot = mk("hot.img");
    let added = json(&remote(
        &api,
        &[
            "add-disk",
            &format!("path={},id=hot0,readonly=on", hot.display()),
        ],
    ));
    assert_eq!(added["id"], "hot0", "{added}");
    assert_eq!(added["bdf"], "0000:00:02.0", "{added}");
    let hot2 = mk("hot2.img");
    let (code, body) = curl_body(
        &api,
        "PUT",
        "vm.add-disk",
        Some(&format!(
            r#"{{"path": "{}", "num_queues": 2}}"#,
            hot2.display()
        )),
    );
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("JSON answer");
    let auto_id = v["id"].as_str().unwrap_or_default().to_string();
    assert_eq!(auto_id, "disk1", "a free id is chosen: {body}");
    let info = json(&remote(&api, &["info"]));
    let node = &info["device_tree"]["hot0"];
    assert_eq!(node["model"], "virtio-blk", "{info}");
    assert_eq!(node["hotplugged"], true, "{info}");
    assert_eq!(node["state"], "Running", "{info}");
    assert_eq!(
        info["config"]["disks"].as_array().map(Vec::len),
        Some(3),
        "{info}"
    );
    assert_eq!(
        info["device_tree"]["disk1"]["pci_bdf"], "0000:00:03.0",
        "{info}"
    );

    // What is in use is refused, with the reason: an id, an image.
    let again = format!(r#"{{"path": "{}", "id": "hot0"}}"#, mk("x.img").display());
    let (code, body) = curl_body(&api, "PUT", "vm.add-disk", Some(&again));
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("'hot0' is already on the bus"), "{body}");
    let same = format!(r#"{{"path": "{}", "id": "other"}}"#, hot.display());
    let (code, body) = curl_body(&api, "PUT", "vm.add-disk", Some(&same));
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("already used by device 'hot0'"), "{body}");
    // An image that does not exist: the --disk line, for the API.
    let (code, body) = curl_body(
        &api,
        "PUT",
        "vm.add-disk",
        Some(&format!(
            r#"{{"path": "{}"}}"#,
            dir.join("none.img").display()
        )),
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("does not exist"), "{body}");
    // Limits checked by the command line's parser.
    let (code, body) = curl_body(
        &api,
        "PUT",
        "vm.add-disk",
        Some(&format!(
            r#"{{"path": "{}", "queue_size": 3}}"#,
            mk("y.img").display()
        )),
    );
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("invalid vm.add-disk") && body.contains("power of two"),
        "{body}"
    );
    // Malformed JSON, unknown fields, the wrong method, an oversized body.
    for (body, want) in [
        ("{\"path\": ", "not valid JSON"),
        ("{\"path\": \"/a\", \"colour\": 1}", "unknown field"),
        ("[]", "must be a JSON object"),
    ] {
        let (code, text) = curl_body(&api, "PUT", "vm.add-disk", Some(body));
        assert_eq!(code, 400, "{body}: {text}");
        assert!(text.contains(want), "{body}: {text}");
    }
    let (code, body) = curl(&api, "GET", "vm.add-disk");
    assert_eq!(code, 405, "{body}");
    let big = format!(r#"{{"path": "{}"}}"#, "a".repeat(100 << 10));
    let (code, body) = curl_body(&api, "PUT", "vm.add-disk", Some(&big));
    assert_eq!(code, 413, "{body}");

    // Clients that stall in their bodies hold a request slot each, nothing else; once
    // every slot is taken the next control request is refused at once, and reads go on.
    // (tiny_http reads bodies under 1 KiB itself, before the request reaches the vmm: a
    // client stalled in one of those holds only its own connection.)
    let mut stalled = Vec::new();
    for len in [100, 4000, 4000, 4000, 4000, 4000, 4000, 4000, 4000] {
        let mut s = UnixStream::connect(&api).expect("connect");
        s.write_all(
            format!(
                "PUT /api/v1/vm.add-disk HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n{{\"pa"
            )
            .as_bytes(),
        )
        .expect("half a body");
        stalled.push(s);
        // One at a time: tiny_http's connection pool can leave a connection queued behind
        // stalled ones for a while when they arrive in a burst.
        std::thread::sleep(Duration::from_millis(100));
    }
    let t = Instant::now();
    loop {
        let (code, body) = curl_body(&api, "PUT", "vm.power-button", Some(""));
        if code == 503 {
            assert!(body.contains("8 control requests are under way"), "{body}");
            break;
        }
        assert_eq!(code, 204, "{body}");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "8 clients stalled in their bodies, and control requests are still taken:\n{}",
            vm.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let t = Instant::now();
    assert!(json(&remote(&api, &["info"]))["state"] == "Running");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // A client that disconnects mid-body frees its slot.
    drop(stalled);
    std::thread::sleep(Duration::from_millis(500));
    let (code, body) = curl_body(&api, "PUT", "vm.power-button", None);
    assert_eq!(code, 204, "{body}");

    // Concurrent adds: each gets its own id and slot.
    let imgs: Vec<PathBuf> = (0..4).map(|i| mk(&format!("c{i}.img"))).collect();
    let handles: Vec<_> = imgs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (api, body) = (
                api.clone(),
                format!(r#"{{"path": "{}", "id": "c{i}"}}"#, p.display()),
            );
            std::thread::spawn(move || curl_body(&api, "PUT", "vm.add-disk", Some(&body)))
        })
        .collect();
    let mut bdfs = std::collections::BTreeSet::new();
    for h in handles {
        let (code, body) = h.join().expect("adder");
        assert_eq!(code, 200, "{body}");
        let v: Value = serde_json::from_str(&body).expect("JSON");
        assert!(
            bdfs.insert(v["bdf"].as_str().unwrap_or_default().to_string()),
            "{body}"
        );
    }
    assert_eq!(bdfs.len(), 4);

    // Removal: the guest is asked; it never ejects (no ACPI), so the device stays, shown
    // as Removing; asking again says so; an unknown id is a 404. Nothing hangs.
    let (code, body) = curl_body(&api, "PUT", "vm.remove-device", Some(r#"{"id": "hot0"}"#));
    assert_eq!(code, 202, "{body}");
    assert!(body.contains("Removing"), "{body}");
    let o = remote(&api, &["remove-device", "hot0"]);
    let v = json(&o);
    assert!(
        v["note"]
            .as_str()
            .unwrap_or_default()
            .contains("already being removed"),
        "{v}"
    );
    assert_eq!(
        json(&remote(&api, &["info"]))["device_tree"]["hot0"]["state"],
        "Removing"
    );
    let (code, body) = curl_body(&api, "PUT", "vm.remove-device", Some(r#"{"id": "nope"}"#));
    assert_eq!(code, 404, "{body}");
    // An id being removed cannot be reused yet.
    let (code, body) = curl_body(
        &api,
        "PUT",
        "vm.add-disk",
        Some(&format!(
            r#"{{"path": "{}", "id": "hot0"}}"#,
            mk("z.img").display()
        )),
    );
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("being removed"), "{body}");

    // The VM ran through all of it; it stops cleanly.
    assert!(vm.is_running(), "{}", vm.log());
    let o = remote(&api, &["shutdown"]);
    assert!(o.status.success(), "{o:?}");
    let t = Instant::now();
    while vm.is_running() {
        assert!(t.elapsed() < Duration::from_secs(5), "{}", vm.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = vm.wait().expect("status");
    assert_eq!(status.code(), Some(0), "{}", vm.log());
    let log = vm.log();
    assert!(
        log.contains("hot0: virtio-blk added at 0000:00:02.0 (hotplug)"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}
