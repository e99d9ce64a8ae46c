//! Interop with a frontend no one here wrote: QEMU (TCG, directly on this host, guest RAM in
//! a shared memfd) drives our vhost-user-blk and vhost-user-net daemons for a Linux guest.
//! The guest reads a pattern the host wrote and writes its own with fsync, found on the
//! image afterwards; it pings the net daemon's tap (in a network namespace of its own) 100
//! times without a loss. Both daemons are still up, sockets in place, after QEMU exits.
//!
//! QEMU 7.2's `-netdev vhost-user` sends SET_VRING_ENABLE before SET_FEATURES; the daemons'
//! relay acks PROTOCOL_FEATURES first so that rust-vmm's vhost handler accepts it.

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tests::host::{unique_name, Daemon, NetNs, ScratchDir};
use tests::lab::{profile_dir, DirectGuest};

const GUEST: &str = r#"
echo "L2-VAL host-pattern $(dd if=/dev/vda bs=512 skip=100 count=1 2>/dev/null | head -c 24)"
printf 'GUEST-PATTERN-QEMU-FRONT' | dd of=/dev/vda bs=512 seek=200 conv=fsync 2>/dev/null && echo "L2-VAL write ok"
ip link set eth0 up
ip addr add 192.0.2.2/24 dev eth0
echo "L2-VAL ping $(ping -c 100 -i 0.02 -W 2 192.0.2.1 | grep 'packets transmitted')"
"#;

fn wait_for_socket(d: &mut Daemon, path: &std::path::Path) {
    if let Err(e) = d.wait_for_path(path, Duration::from_secs(10)) {
        panic!(
            "{} did not create {}: {e}\n{}",
            d.name(),
            path.display(),
            d.log()
        );
    }
}

#[test]
fn qemu_drives_our_vhost_user_blk_and_net_daemons() {
    let dir = ScratchDir::new("vuq").expect("scratch dir");
    let guest = DirectGuest::new(dir.path(), GUEST).unwrap_or_else(|e| panic!("{e}"));
    let bin = |n: &str| {
        let p = profile_dir().join(n);
        assert!(
            p.is_file(),
            "{} missing: cargo build --workspace --bins",
            p.display()
        );
        p
    };

    let img = dir.join("disk.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(16 << 20).unwrap();
    f.write_all_at(b"HOST-PATTERN-QEMU-FRONT1", 100 * 512)
        .unwrap();
    let blk_sock = dir.join("blk.sock");
    let mut blk = Daemon::spawn(
        "vhost-user-blk",
        Command::new(bin("vhost-user-blk"))
            .arg("--socket-path")
            .arg(&blk_sock)
            .arg("--blk-file")
            .arg(&img),
    )
    .expect("start vhost-user-blk");
    wait_for_socket(&mut blk, &blk_sock);

    // The net daemon in a namespace of its own, on a tap it creates there.
    let ns = NetNs::new("vuqn").expect("network namespace (needs root)");
    let tap = unique_name("vuqt");
    let net_sock = dir.join("net.sock");
    let mut net = Daemon::spawn(
        "vhost-user-net",
        ns.command(bin("vhost-user-net"))
            .arg("--socket-path")
            .arg(&net_sock)
            .args(["--tap", &tap, "--mac", "52:54:00:00:00:03"]),
    )
    .expect("start vhost-user-net");
    wait_for_socket(&mut net, &net_sock);
    ns.ip(&["addr", "add", "192.0.2.1/24", "dev", &tap])
        .unwrap_or_else(|e| panic!("{e}"));
    ns.ip(&["link", "set", &tap, "up"])
        .unwrap_or_else(|e| panic!("{e}"));

    let start = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-m", "512M", "-smp", "1"])
        .args([
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            "stdio",
        ])
        .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"])
        .args(["-numa", "node,memdev=mem"])
        .arg("-chardev")
        .arg(format!("socket,id=c0,path={}", blk_sock.display()))
        .args(["-device", "vhost-user-blk-pci,chardev=c0"])
        .arg("-chardev")
        .arg(format!("socket,id=c1,path={}", net_sock.display()))
        .args(["-netdev", "vhost-user,id=n0,chardev=c1"])
        // vectors=0 (INTx): with MSI-X, QEMU 7.2 under TCG crashes (SIGSEGV in
        // msix_set_vector_notifiers, from vhost_net_start) when the guest driver starts
        // the device with the control queue on, before it sends the back-end SET_FEATURES
        // or any ring; INTx takes the other path and the device then works end to end.
        .args([
            "-device",
            "virtio-net-pci,netdev=n0,mac=52:54:00:00:00:03,romfile=,vectors=0",
        ])
        .arg("-kernel")
        .arg(&guest.kernel)
        .arg("-initrd")
        .arg(&guest.initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64 (Debian: qemu-system-x86) must be installed");
    // Read the console on a thread; kill QEMU (by its PID) if it runs too long.
    let mut stdout = qemu.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(st) = qemu.try_wait().expect("wait") {
            break st;
        }
        if start.elapsed() > Duration::from_secs(300) {
            let _ = qemu.kill();
            let _ = qemu.wait();
            panic!("QEMU did not finish in 300 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let console = reader.join().unwrap_or_default();
    let mut err = String::new();
    if let Some(mut e) = qemu.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    eprintln!(
        "{console}\nQEMU stderr: {err}\nQEMU ran {:.1} s",
        start.elapsed().as_secs_f64()
    );
    let field = |k: &str| {
        console
            .lines()
            .find_map(|l| {
                l.trim_end_matches('\r')
                    .strip_prefix(k)
                    .map(|v| v.trim().to_string())
            })
            .unwrap_or_else(|| panic!("no '{k}' on the console"))
    };
    assert!(status.success(), "QEMU exited with {status}");
    assert_eq!(field("L2-EXIT"), "0");
    assert_eq!(field("L2-VAL host-pattern"), "HOST-PATTERN-QEMU-FRONT1");
    assert_eq!(field("L2-VAL write"), "ok");
    let ping = field("L2-VAL ping");
    assert!(
        ping.contains("100 packets received") && ping.contains(" 0% packet loss"),
        "ping through vhost-user-net: '{ping}'\n{}",
        net.log()
    );
    let mut buf = [0u8; 24];
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut buf, 200 * 512)
        .unwrap();
    assert_eq!(&buf, b"GUEST-PATTERN-QEMU-FRONT");
    // The daemon outlives its frontend.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        blk.is_running(),
        "vhost-user-blk exited with QEMU:\n{}",
        blk.log()
    );
    assert!(blk_sock.exists());
    assert!(
        net.is_running(),
        "vhost-user-net exited with QEMU:\n{}",
        net.log()
    );
    assert!(net_sock.exists());
}
