//! The `vmm` binary on this host's /dev/kvm with the ring-3 test guest, and its answers to
//! bad input: one line, exit code 2, no panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use tests::guest::{test_guest_elf, RING3_LINE};
use tests::host::ScratchDir;

fn vmm() -> PathBuf {
    let p = tests::lab::profile_dir().join("vmm");
    assert!(
        p.is_file(),
        "{} is missing: build the workspace binaries first (cargo build --workspace --bins)",
        p.display()
    );
    p
}

fn run(args: &[&str]) -> Output {
    Command::new(vmm())
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .expect("start vmm")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn elf() -> String {
    let p = test_guest_elf();
    assert!(p.is_file(), "test guest missing at {}", p.display());
    p.to_string_lossy().into_owned()
}

#[test]
fn test_guest_runs_in_ring3_and_exits_with_its_code() {
    let out = run(&[
        "--kernel",
        &elf(),
        "--cmdline",
        "exit=42",
        "--memory",
        "64M",
    ]);
    let stdout = text(&out.stdout);
    assert!(stdout.contains(RING3_LINE), "serial output: {stdout}");
    // The vCPU stops at the debug-exit write: the guest never runs past it.
    assert!(!stdout.contains("did not stop the VM"), "{stdout}");
    assert_eq!(
        out.status.code(),
        Some((42 << 1) | 1),
        "stderr: {}",
        text(&out.stderr)
    );
}

#[test]
fn test_guest_with_two_vcpus_and_default_exit_code() {
    let out = run(&["--kernel", &elf(), "--cpus", "2", "--memory", "64M"]);
    assert!(text(&out.stdout).contains(RING3_LINE));
    assert_eq!(out.status.code(), Some(1), "stderr: {}", text(&out.stderr));
}

#[test]
fn serial_to_file_and_exit_stats() {
    let dir = ScratchDir::new("vmm-direct").expect("tempdir");
    let serial = dir.join("serial.log");
    let stats = dir.join("stats.json");
    let out = run(&[
        "--kernel",
        &elf(),
        "--cmdline",
        "exit=3",
        "--memory",
        "32M",
        "--serial",
        &format!("file={}", serial.display()),
        "--exit-stats",
        &stats.to_string_lossy(),
    ]);
    assert_eq!(out.status.code(), Some(7), "stderr: {}", text(&out.stderr));
    assert!(!text(&out.stdout).contains(RING3_LINE));
    let log = std::fs::read_to_string(&serial).expect("serial file");
    assert!(log.contains(RING3_LINE), "serial file: {log}");
    let json = std::fs::read_to_string(&stats).expect("stats file");
    // One exit for the debug-exit write, one per serial register access of the guest.
    assert!(json.contains("\"debug-exit\":1"), "{json}");
    assert!(json.contains("\"serial\":"), "{json}");
}

#[test]
fn serial_off_prints_nothing() {
    let out = run(&["--kernel", &elf(), "--serial", "off", "--memory", "32M"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
}

#[test]
fn triple_fault_is_reported_with_the_vcpu() {
    let out = run(&[
        "--kernel",
        &elf(),
        "--cmdline",
        "fault=triple",
        "--memory",
        "32M",
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "stderr: {stderr}");
    assert!(
        stderr.contains("vmm: guest crashed: vcpu 0: triple fault"),
        "stderr: {stderr}"
    );
    // The state line: the guest loaded an empty IDT (base 0, limit 0) and then hit `ud2`.
    let state = stderr
        .lines()
        .find_map(|l| l.strip_prefix("vmm: vcpu 0 at the crash: "))
        .unwrap_or_else(|| panic!("no state line: {stderr}"));
    assert!(state.starts_with("rip=0x"), "state: {state}");
    assert!(state.contains(" idt=0x0+0x0 "), "state: {state}");
    assert!(state.contains(" cr3=0x"), "state: {state}");
    assert!(state.contains(" events:"), "state: {state}");
}

/// Asserts the run failed with exit code 2 and exactly one `vmm:` line mentioning `needle`.
fn assert_user_error(out: &Output, needle: &str) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("vmm:")).collect();
    assert_eq!(lines.len(), 1, "one error line expected: {stderr}");
    assert!(lines[0].contains(needle), "'{needle}' not in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("backtrace"), "{stderr}");
}

#[test]
fn missing_kernel() {
    let out = run(&["--kernel", "/nonexistent/bzImage"]);
    assert_user_error(&out, "cannot open kernel '/nonexistent/bzImage'");
}

#[test]
fn kernel_of_unknown_format() {
    let dir = ScratchDir::new("vmm-direct").expect("tempdir");
    let k = dir.join("garbage");
    std::fs::write(&k, vec![0x5a; 4096]).unwrap();
    let out = run(&["--kernel", &k.to_string_lossy()]);
    assert_user_error(&out, "neither a bzImage nor an ELF with a PVH note");
}

#[test]
fn unreadable_kernel() {
    // A directory cannot be read as a kernel.
    let dir = ScratchDir::new("vmm-direct").expect("tempdir");
    let out = run(&["--kernel", &dir.path().to_string_lossy()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).starts_with("vmm: "),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn bad_cpu_counts() {
    assert_user_error(&run(&["--kernel", &elf(), "--cpus", "0"]), "use --cpus 1");
    assert_user_error(
        &run(&["--kernel", &elf(), "--cpus", "4096"]),
        "above the limit",
    );
}

#[test]
fn bad_memory_sizes() {
    assert_user_error(&run(&["--kernel", &elf(), "--memory", "1M"]), "too small");
    assert_user_error(
        &run(&["--kernel", &elf(), "--memory", "64T"]),
        "more than this host",
    );
    assert_user_error(
        &run(&["--kernel", &elf(), "--memory", "lots"]),
        "invalid --memory",
    );
}

#[test]
fn bad_serial() {
    assert_user_error(
        &run(&["--kernel", &elf(), "--serial", "tcp"]),
        "invalid --serial",
    );
    assert_user_error(
        &run(&["--kernel", &elf(), "--serial", "file=/nonexistent/dir/x"]),
        "cannot create the serial output file",
    );
}

#[test]
fn initramfs_missing() {
    assert_user_error(
        &run(&["--kernel", &elf(), "--initramfs", "/nonexistent/initrd"]),
        "cannot open initramfs",
    );
}

/// Runs vmm with /dev replaced by an empty tmpfs (a private mount namespace): no /dev/kvm.
#[test]
fn no_kvm_device() {
    let vmm = vmm();
    let out = Command::new("unshare")
        .args(["--mount", "--", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs none /dev && exec {} --kernel {}",
            vmm.display(),
            elf()
        ))
        .stdin(Stdio::null())
        .output()
        .expect("unshare (util-linux) is needed for this test");
    assert_user_error(&out, "cannot open /dev/kvm: KVM is not available");
}

/// Runs vmm as an unprivileged user, who may not open /dev/kvm (mode 0600 root here; the
/// test makes sure of that in its own mount namespace).
#[test]
fn no_permission_on_kvm() {
    let vmm = vmm();
    let dir = ScratchDir::new("vmm-direct").expect("tempdir");
    // A copy the unprivileged user can execute wherever the target dir lives.
    let copy = dir.join("vmm");
    std::fs::copy(&vmm, &copy).unwrap();
    let kernel = dir.join("guest.elf");
    std::fs::copy(elf(), &kernel).unwrap();
    set_mode(dir.path(), 0o755);
    set_mode(&copy, 0o755);
    set_mode(&kernel, 0o644);
    let out = Command::new("unshare")
        .args(["--mount", "--", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs none /dev && mknod -m 600 /dev/kvm c 10 232 && \
             exec setpriv --reuid=65534 --regid=65534 --clear-groups {} --kernel {}",
            copy.display(),
            kernel.display()
        ))
        .stdin(Stdio::null())
        .output()
        .expect("unshare and setpriv (util-linux) are needed for this test");
    assert_user_error(&out, "permission denied; add your user to the 'kvm' group");
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn disk_image_missing() {
    let dir = ScratchDir::new("vmm-direct").expect("tempdir");
    let img = dir.join("nope.img");
    assert_user_error(
        &run(&[
            "--kernel",
            &elf(),
            "--disk",
            &format!("path={}", img.display()),
        ]),
        "disk 'disk0': disk image",
    );
    let out = run(&[
        "--kernel",
        &elf(),
        "--disk",
        &format!("path={}", img.display()),
    ]);
    assert!(
        text(&out.stderr).contains("does not exist"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn duplicate_device_ids() {
    assert_user_error(
        &run(&[
            "--kernel",
            &elf(),
            "--disk",
            "path=/a,id=x",
            "--net",
            "tap=t0,id=x",
        ]),
        "device id 'x' is used twice",
    );
}

#[test]
fn bad_device_options() {
    assert_user_error(
        &run(&["--kernel", &elf(), "--disk", "readonly=on"]),
        "path= is required",
    );
    assert_user_error(
        &run(&["--kernel", &elf(), "--net", "tap=t0,queue_size=1000"]),
        "power of two",
    );
    assert_user_error(
        &run(&[
            "--kernel",
            &elf(),
            "--vhost-user-blk",
            "socket=/nonexistent/x.sock",
        ]),
        "cannot connect to vhost-user back-end '/nonexistent/x.sock'",
    );
}

/// An image on a read-only filesystem (a tmpfs remounted read-only in a private mount
/// namespace) without readonly=on: one line that says to add readonly=on.
#[test]
fn disk_image_not_writable() {
    let dir = ScratchDir::new("vmm-direct").expect("tempdir");
    let mnt = dir.join("ro");
    std::fs::create_dir(&mnt).unwrap();
    let out = Command::new("unshare")
        .args(["--mount", "--", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs none {m} && truncate -s 1M {m}/img && mount -o remount,ro {m} && \
             exec {vmm} --kernel {k} --disk path={m}/img",
            m = mnt.display(),
            vmm = vmm().display(),
            k = elf()
        ))
        .stdin(Stdio::null())
        .output()
        .expect("unshare (util-linux) is needed for this test");
    assert_user_error(&out, "is not writable");
    assert!(
        text(&out.stderr).contains("add readonly=on"),
        "{}",
        text(&out.stderr)
    );
}

/// A tap the user may not create (no CAP_NET_ADMIN): one line with the fix.
#[test]
fn tap_cannot_be_opened() {
    let dir = ScratchDir::new("vmm-direct").expect("tempdir");
    let copy = dir.join("vmm");
    std::fs::copy(vmm(), &copy).unwrap();
    let kernel = dir.join("guest.elf");
    std::fs::copy(elf(), &kernel).unwrap();
    set_mode(dir.path(), 0o755);
    set_mode(&copy, 0o755);
    set_mode(&kernel, 0o644);
    let tap = tests::host::unique_name("vmmnp");
    let out = Command::new("unshare")
        .args(["--mount", "--", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs none /dev && \
             mknod -m 666 /dev/kvm c 10 232 && mkdir /dev/net && mknod -m 666 /dev/net/tun c 10 200 && \
             exec setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all {} --kernel {} --net tap={tap}",
            copy.display(),
            kernel.display()
        ))
        .stdin(Stdio::null())
        .output()
        .expect("unshare and setpriv (util-linux) are needed for this test");
    assert_user_error(
        &out,
        &format!("net 'net0': cannot attach to tap '{tap}': permission denied"),
    );
}

/// `--vfio` on this host: what blocks the assignment, in one line, before VFIO is touched.
#[test]
fn vfio_assignment_problems_are_one_line() {
    // A bad address.
    let out = run(&["--kernel", &elf(), "--vfio", "host=3b:00"]);
    assert_user_error(&out, "invalid PCI address");
    // No such device.
    let out = run(&["--kernel", &elf(), "--vfio", "host=0000:00:1f.7"]);
    assert_user_error(&out, "no such PCI device");
    // A real device of this host: the real blocker is named with its fix.
    let real = std::fs::read_dir("/sys/bus/pci/devices")
        .expect("/sys/bus/pci/devices")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .min()
        .expect("this host has PCI devices");
    let out = run(&["--kernel", &elf(), "--vfio", &format!("host={real}")]);
    let iommu_on = std::fs::read_dir("/sys/kernel/iommu_groups")
        .map(|d| d.count() > 0)
        .unwrap_or(false);
    if iommu_on {
        // With an IOMMU the device is still bound to its host driver.
        assert_user_error(&out, "vfio-pci");
    } else {
        assert_user_error(&out, "no IOMMU is enabled on this host");
    }
    assert!(text(&out.stderr).contains(&format!("vfio device 'vfio0': {real}")));
}
