//! The `passthrough` binary on this machine's real /sys: it must tell the truth about the
//! host it runs on. The project's build machines have no IOMMU; on a host with one the
//! assertions change to match what the host reports instead of being skipped.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

fn passthrough(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_passthrough"))
        .args(args)
        .output()
        .expect("cannot run the passthrough binary")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn non_empty(dir: &str) -> bool {
    fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some())
}

fn iommu_on() -> bool {
    non_empty("/sys/class/iommu") || non_empty("/sys/kernel/iommu_groups")
}

/// The first PCI device sysfs lists; a machine without any is not one this test can judge.
fn a_real_device() -> String {
    let mut names: Vec<String> = fs::read_dir("/sys/bus/pci/devices")
        .expect("/sys/bus/pci/devices is not readable: this test needs the host's sysfs")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
        .into_iter()
        .next()
        .expect("this machine has no PCI devices in /sys/bus/pci/devices")
}

fn last_line(s: &str) -> &str {
    s.lines().last().unwrap_or("")
}

#[test]
fn check_on_a_real_device_tells_what_the_host_has() {
    let bdf = a_real_device();
    let out = passthrough(&["check", &bdf, "--memory", "1G"]);
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with(&format!("PCI device {bdf} ")),
        "{stdout}"
    );
    let verdict = last_line(&stdout);
    if !iommu_on() {
        assert_eq!(out.status.code(), Some(2), "{stdout}");
        assert!(stdout.contains("IOMMU:           off"), "{stdout}");
        assert!(
            verdict.starts_with(&format!(
                "not ready: {bdf}: no IOMMU is enabled on this host"
            )),
            "{verdict}"
        );
        assert!(verdict.contains("iommu=on"), "{verdict}");
        assert!(text(&out.stderr).is_empty(), "{}", text(&out.stderr));
    } else {
        assert!(stdout.contains("IOMMU:           on"), "{stdout}");
        assert!(!verdict.contains("no IOMMU is enabled"), "{verdict}");
        match out.status.code() {
            Some(0) => assert!(verdict.starts_with("ready: "), "{verdict}"),
            Some(2) => assert!(
                verdict.starts_with(&format!("not ready: {bdf}: ")),
                "{verdict}"
            ),
            other => panic!("exit status {other:?}: {stdout}"),
        }
    }
}

#[test]
fn a_sysfs_path_names_the_same_device() {
    let bdf = a_real_device();
    let by_bdf = passthrough(&["check", &bdf]);
    let path = format!("/sys/bus/pci/devices/{bdf}");
    let by_path = passthrough(&["check", &path]);
    assert_eq!(by_bdf.status.code(), by_path.status.code());
    assert_eq!(text(&by_bdf.stdout), text(&by_path.stdout));
}

#[test]
fn check_on_a_missing_device_says_no_such_device() {
    let bdf = "ffff:fe:1f.7";
    assert!(!Path::new("/sys/bus/pci/devices").join(bdf).exists());
    let out = passthrough(&["check", bdf]);
    assert_eq!(out.status.code(), Some(2));
    let stdout = text(&out.stdout);
    assert_eq!(
        last_line(&stdout),
        "not ready: ffff:fe:1f.7: no such PCI device: /sys/bus/pci/devices/ffff:fe:1f.7 does not exist; list the host's devices with `lspci -D` or `ls /sys/bus/pci/devices`"
    );
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    for (args, want) in [
        (
            &["check", "3b:00"][..],
            "passthrough: invalid PCI address '3b:00': ",
        ),
        (
            &["check", "3b:20.0"][..],
            "passthrough: invalid PCI address '3b:20.0': the device number",
        ),
        (
            &["bind", "/sys/bus/pci/devices"][..],
            "passthrough: invalid PCI device path",
        ),
        (
            &["check", "00:00.0", "--memory", "lots"][..],
            "passthrough: invalid size 'lots'",
        ),
        (&["frob"][..], "passthrough: unrecognized subcommand 'frob'"),
        (&["check"][..], "passthrough: "),
    ] {
        let out = passthrough(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = text(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with(want), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn bind_without_an_iommu_refuses_and_touches_nothing() {
    if iommu_on() {
        // Binding would really move a device of this host to vfio-pci: not in a unit run.
        // The lab test covers bind/unbind where an IOMMU exists.
        return;
    }
    let bdf = a_real_device();
    let link = format!("/sys/bus/pci/devices/{bdf}/driver");
    let before = fs::read_link(&link).ok();
    let out = passthrough(&["bind", &bdf]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!("passthrough: {bdf}: no IOMMU is enabled")),
        "{stderr}"
    );
    assert_eq!(fs::read_link(&link).ok(), before);
}

#[test]
fn help_explains() {
    let out = passthrough(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let s = text(&out.stdout);
    for word in [
        "check",
        "bind",
        "unbind",
        "driver_override",
        "0000:3b:00.0",
        "Exit status",
    ] {
        assert!(s.contains(word), "--help lacks {word}: {s}");
    }
    let out = passthrough(&["check", "--help"]);
    assert!(text(&out.stdout).contains("--memory"));
}

/// A fake host in a temporary directory (the binary's hidden --sysfs-root, --dev-root and
/// --proc-root point at it): 0000:00:02.0 on vfio-pci, alone in IOMMU group 5 with
/// /dev/vfio/5, as in the lab once the e1000e is bound.
struct FakeHost {
    root: std::path::PathBuf,
}

impl FakeHost {
    fn new(name: &str, cap_eff: &str) -> Self {
        use std::os::unix::fs::symlink;
        let root =
            std::env::temp_dir().join(format!("passthrough-check-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let dev = root.join("sys/bus/pci/devices/0000:00:02.0");
        for d in [
            dev.clone(),
            root.join("sys/bus/pci/drivers/vfio-pci"),
            root.join("sys/kernel/iommu_groups/5/devices"),
            root.join("sys/class/iommu/dmar0"),
            root.join("dev/vfio"),
            root.join("proc/self"),
        ] {
            fs::create_dir_all(d).unwrap();
        }
        for (f, v) in [
            ("vendor", "0x8086"),
            ("device", "0x10d3"),
            ("class", "0x020000"),
            ("reset_method", "flr bus"),
            ("driver_override", "vfio-pci"),
        ] {
            fs::write(dev.join(f), format!("{v}\n")).unwrap();
        }
        symlink("../../drivers/vfio-pci", dev.join("driver")).unwrap();
        symlink("../../../../kernel/iommu_groups/5", dev.join("iommu_group")).unwrap();
        symlink(
            "../../../../bus/pci/devices/0000:00:02.0",
            root.join("sys/kernel/iommu_groups/5/devices/0000:00:02.0"),
        )
        .unwrap();
        fs::write(root.join("dev/vfio/5"), "").unwrap();
        fs::write(root.join("proc/cpuinfo"), "vendor_id\t: GenuineIntel\n").unwrap();
        fs::write(
            root.join("proc/self/status"),
            format!("CapEff:\t{cap_eff}\n"),
        )
        .unwrap();
        FakeHost { root }
    }

    fn check(&self, args: &[&str]) -> Output {
        self.run("check", args)
    }

    fn run(&self, command: &str, args: &[&str]) -> Output {
        let sys = self.root.join("sys");
        let dev = self.root.join("dev");
        let proc = self.root.join("proc");
        let mut all = vec![
            "--sysfs-root",
            sys.to_str().unwrap(),
            "--dev-root",
            dev.to_str().unwrap(),
            "--proc-root",
            proc.to_str().unwrap(),
            command,
        ];
        all.extend_from_slice(args);
        passthrough(&all)
    }
}

impl Drop for FakeHost {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

#[test]
fn ready_device_prints_ready_and_exits_0() {
    // CAP_IPC_LOCK (bit 14): the memlock limit does not apply.
    let host = FakeHost::new("ready", "0000000000004000");
    let out = host.check(&["0000:00:02.0", "--memory", "512M"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert_eq!(
        last_line(&stdout),
        "ready: 0000:00:02.0 (IOMMU group 5) can be assigned with `vmm --vfio host=0000:00:02.0`"
    );
    for want in [
        "IOMMU:           on",
        "IOMMU group:     5 (1 device)",
        "0000:00:02.0  vfio-pci     OK (vfio-pci)  <- this device",
        "reset:           flr, bus",
        "vfio-pci driver: loaded",
        "/dev/vfio/5 present",
    ] {
        assert!(stdout.contains(want), "no {want:?} in:\n{stdout}");
    }
}

/// The soft RLIMIT_MEMLOCK this test runs with (the binary inherits it); None: unlimited.
fn memlock_soft_limit() -> Option<u64> {
    let limits = fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max locked memory"))
        .expect("no 'Max locked memory' in /proc/self/limits");
    let soft = line["Max locked memory".len()..]
        .split_whitespace()
        .next()
        .unwrap();
    (soft != "unlimited").then(|| soft.parse().unwrap())
}

#[test]
fn memlock_is_this_process_limit_without_cap_ipc_lock() {
    let host = FakeHost::new("memlock", "0000000000000000");
    let out = host.check(&["0000:00:02.0", "--memory", "1G"]);
    let stdout = text(&out.stdout);
    let need = (1u64 << 30) + (64 << 20);
    match memlock_soft_limit() {
        Some(have) if have < need => {
            assert_eq!(out.status.code(), Some(2), "{stdout}");
            let verdict = last_line(&stdout);
            assert!(
                verdict.starts_with("not ready: 0000:00:02.0: memlock limit ")
                    && verdict.contains(" is below the 1088 MiB VFIO must pin (1 GiB of guest RAM + 64 MiB headroom)"),
                "{verdict}"
            );
            assert!(
                stdout.contains("need 1088 MiB for 1 GiB of guest RAM: too low"),
                "{stdout}"
            );
        }
        _ => {
            assert_eq!(out.status.code(), Some(0), "{stdout}");
            assert!(last_line(&stdout).starts_with("ready: "), "{stdout}");
        }
    }
}

#[test]
fn bind_writes_the_sysfs_files_and_reports_when_no_kernel_reacts() {
    // A fake tree has no kernel behind it: the files are written, the driver stays, and bind
    // must say so instead of claiming success.
    use std::os::unix::fs::symlink;
    let host = FakeHost::new("bind", "0000000000000000");
    let sys = host.root.join("sys/bus/pci");
    let dev = sys.join("devices/0000:00:02.0");
    fs::remove_file(dev.join("driver")).unwrap();
    fs::write(dev.join("driver_override"), "(null)\n").unwrap();
    fs::create_dir_all(sys.join("drivers/e1000e")).unwrap();
    fs::write(sys.join("drivers/e1000e/unbind"), "").unwrap();
    fs::write(sys.join("drivers_probe"), "").unwrap();
    symlink("../../drivers/e1000e", dev.join("driver")).unwrap();

    let out = host.run("bind", &["00:02.0"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("passthrough: 0000:00:02.0: driver_override is vfio-pci but after drivers_probe the device is bound to e1000e"),
        "{stderr}"
    );
    assert_eq!(
        fs::read_to_string(dev.join("driver_override")).unwrap(),
        "vfio-pci"
    );
    assert_eq!(
        fs::read_to_string(sys.join("drivers/e1000e/unbind")).unwrap(),
        "0000:00:02.0"
    );
    assert_eq!(
        fs::read_to_string(sys.join("drivers_probe")).unwrap(),
        "0000:00:02.0"
    );
}
