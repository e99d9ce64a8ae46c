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
