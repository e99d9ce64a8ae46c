//! Hotplug through the control API in the lab: our vmm boots a Linux guest (Debian's cloud
//! kernel) with no device but its console and `--api-socket`; then, one model after the
//! other, a device is added through `vmm-remote`, Linux's own ACPI PCI hotplug (acpiphp,
//! through the vmm's Generic Event Device) scans the slot and its driver binds, the guest
//! uses it, the device is removed (the guest ejects the slot, the vmm releases it, `vm.info`
//! no longer lists it), added again and used again, and removed again:
//!
//! - an in-VMM virtio-blk disk: the guest reads a pattern the host wrote, writes one with
//!   fsync; after the re-add it reads its own pattern back; the image holds it at the end;
//! - an in-VMM virtio-net NIC on a tap: 20 pings to L1 each time;
//! - a vhost-user-blk disk served by our daemon, and a vhost-user-net NIC by our daemon:
//!   the same, and both daemons still serve (they take the second frontend, and are alive
//!   after the vmm has exited);
//!
//! and at the end the ACPI power button (`vm.power-button`): the guest's button driver
//! reports KEY_POWER, its init powers off, and the vmm exits 0 as for a guest poweroff.
//! Removing an id already removed is answered 404 with "removed already".

use std::path::PathBuf;
use std::time::Duration;

use tests::lab::{lab_dir, Scenario};

const L1: &str = r#"
. /lab/lib.sh
API=$LAB_TMP/api.sock
remote() { vmm-remote --api-socket $API "$@"; }
# cycle NAME ADD-KIND OPTIONS: add, wait for the guest's use, remove, wait until gone, twice.
cycle() {
    _n=$1 _k=$2 _o=$3
    for _r in 1 2; do
        _t=$(lab_uptime)
        _added=1
        remote "$_k" "$_o,id=$_n" >$LAB_TMP/add.json 2>&1 || { _added=0; echo "LAB-VAL $_n-add-$_r-failed $(cat $LAB_TMP/add.json)"; }
        echo "LAB-VAL $_n-add-$_r $(tr -d ' \n' <$LAB_TMP/add.json)"
        # A failed add is not waited for (the fixture would take the quiet wait for a stuck L1).
        if [ $_added = 1 ] && wait_for $LAB_TMP/l2.log "^L2-VAL $_n-used-$_r" 120; then
            echo "LAB-VAL $_n-used-$_r-after-s $(lab_elapsed "$_t")"
        else
            echo "LAB-VAL $_n-used-$_r-after-s never"
        fi
        _t=$(lab_uptime)
        remote remove-device "$_n" >$LAB_TMP/rm.json 2>&1
        echo "LAB-VAL $_n-remove-$_r $(tr -d ' \n' <$LAB_TMP/rm.json)"
        if api_gone $API "$_n"; then
            echo "LAB-VAL $_n-gone-$_r-after-s $(lab_elapsed "$_t")"
        else
            echo "LAB-VAL $_n-gone-$_r-after-s never"
        fi
    done
    remote remove-device "$_n" >$LAB_TMP/rm.json 2>&1
    echo "LAB-VAL $_n-remove-again $(tr -d '\n' <$LAB_TMP/rm.json)"
}

dd if=/dev/zero of=$LAB_TMP/a.img bs=1M count=32 2>/dev/null
printf 'HOST-PATTERN-HP-0123456789' | dd of=$LAB_TMP/a.img bs=512 seek=100 conv=notrunc 2>/dev/null
dd if=/dev/zero of=$LAB_TMP/u.img bs=1M count=16 2>/dev/null
printf 'HOST-PATTERN-VU-0123456789' | dd of=$LAB_TMP/u.img bs=512 seek=100 conv=notrunc 2>/dev/null
$IP tuntap add dev vmtap0 mode tap vnet_hdr multi_queue
$IP addr add 192.0.2.1/24 dev vmtap0
$IP link set vmtap0 up
vhost-user-blk --socket-path $LAB_TMP/blk.sock --blk-file $LAB_TMP/u.img >$LAB_TMP/blk.log 2>&1 &
blk_pid=$!
vhost-user-net --socket-path $LAB_TMP/net.sock --tap vutap0 --queues 2 >$LAB_TMP/net.log 2>&1 &
net_pid=$!
n=0; while { [ ! -S $LAB_TMP/blk.sock ] || [ ! -S $LAB_TMP/net.sock ]; } && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
$IP addr add 198.51.100.1/24 dev vutap0
$IP link set vutap0 up

t0=$(lab_uptime)
( { vmm --kernel "$L2_KERNEL" --initramfs "$L2_INITRD" --cmdline "$L2_CMDLINE" \
    --cpus 2 --memory 512M --api-socket path=$API --landlock-rules path=$LAB_TMP,access=rw \
    </dev/null 2>&1; echo "VMM-RC $?"; } \
    | lab_console "$t0" l2 | tee $LAB_TMP/l2.log ) &
if wait_for $LAB_TMP/l2.log '^L2-VAL ready' 300; then
    cycle hd0 add-disk path=$LAB_TMP/a.img
    cycle hn0 add-net tap=vmtap0,mac=52:54:00:00:00:12,queues=2
    cycle ud0 add-disk vhost_user=on,socket=$LAB_TMP/blk.sock
    cycle un0 add-net vhost_user=on,socket=$LAB_TMP/net.sock,mac=52:54:00:00:00:13,queues=2
    wait_for $LAB_TMP/l2.log '^L2-VAL power-watch' 60
    _t=$(lab_uptime)
    remote power-button && echo "LAB-VAL power-button-pressed"
    wait_for $LAB_TMP/l2.log '^VMM-RC' 60 && echo "LAB-VAL poweroff-after-s $(lab_elapsed "$_t")"
else
    echo "LAB-VAL guest-never-ready"
fi
wait_for $LAB_TMP/l2.log '^VMM-RC' 30
check vmm-exit-0 grep -q '^VMM-RC 0$' $LAB_TMP/l2.log
check guest-powered-off grep -q 'guest powered off' $LAB_TMP/l2.log
check guest-pattern-on-image [ "$(dd if=$LAB_TMP/a.img bs=512 skip=200 count=1 2>/dev/null | head -c 22)" = "GUEST-PATTERN-HP-fedcb" ]
check guest-pattern-on-vu-image [ "$(dd if=$LAB_TMP/u.img bs=512 skip=200 count=1 2>/dev/null | head -c 22)" = "GUEST-PATTERN-VU-fedcb" ]
for d in hd0 hn0 ud0 un0; do
    echo "LAB-VAL $d-released $(grep -c "$d: removed from .* (the guest ejected it as asked)" $LAB_TMP/l2.log)"
done
check blk-daemon-alive kill -0 "$blk_pid"
check net-daemon-alive kill -0 "$net_pid"
echo "LAB-VAL blk-frontends $(grep -c 'frontend connected' $LAB_TMP/blk.log)"
echo "LAB-VAL net-frontends $(grep -c 'frontend connected' $LAB_TMP/net.log)"
# The daemons' own words (a sandbox refusal, a crash) in the log of any run.
tail -n 8 $LAB_TMP/blk.log | sed 's/^/LAB-VAL blk-log /'
tail -n 8 $LAB_TMP/net.log | sed 's/^/LAB-VAL net-log /'
kill "$blk_pid" "$net_pid"
$IP link del vmtap0
lab_finish
"#;

const L2: &str = r#"
insmod /lab/files/button.ko
insmod /lab/files/evdev.ko
# wait_dev PATH: until PATH exists (60 s); wait_gone PATH: until it does not.
wait_dev() { n=0; while [ ! -e "$1" ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n + 1)); done; [ -e "$1" ]; }
wait_gone() { n=0; while [ -e "$1" ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n + 1)); done; [ ! -e "$1" ]; }
echo "L2-VAL slots $(ls /sys/bus/pci/slots | wc -l)"
echo "L2-VAL ready"
# disk: NAME PATTERN-PREFIX
disk() {
    wait_dev /dev/vda || { echo "L2-VAL $1-no-disk"; return; }
    echo "L2-VAL $1-host-pattern $(dd if=/dev/vda bs=512 skip=100 count=1 2>/dev/null | head -c 26)"
    printf "GUEST-PATTERN-$2-fedcba9876" | dd of=/dev/vda bs=512 seek=200 conv=fsync 2>/dev/null
    echo "L2-VAL $1-used-1 $(readlink /sys/block/vda/device/driver)"
    wait_gone /dev/vda || echo "L2-VAL $1-still-there"
    wait_dev /dev/vda || { echo "L2-VAL $1-no-disk-2"; return; }
    echo "L2-VAL $1-guest-pattern $(dd if=/dev/vda bs=512 skip=200 count=1 2>/dev/null | head -c 22)"
    echo "L2-VAL $1-used-2"
    wait_gone /dev/vda || echo "L2-VAL $1-still-there-2"
}
# nic: NAME GUEST-ADDR PEER
nic() {
    for r in 1 2; do
        wait_dev /sys/class/net/eth0 || { echo "L2-VAL $1-no-nic-$r"; return; }
        ip link set eth0 up
        ip addr add "$2/24" dev eth0
        ping -c 20 -i 0.05 -W 2 "$3" > $LAB_TMP/ping.txt 2>&1
        echo "L2-VAL $1-ping-$r $(grep 'packets transmitted' $LAB_TMP/ping.txt)"
        echo "L2-VAL $1-used-$r"
        wait_gone /sys/class/net/eth0 || echo "L2-VAL $1-still-there-$r"
    done
}
disk hd0 HP
nic hn0 192.0.2.2 192.0.2.1
disk ud0 VU
nic un0 198.51.100.2 198.51.100.1
# The power button: its input device, then KEY_POWER ends the guest as a poweroff would.
ev=""
for e in /sys/class/input/event*; do
    [ "$(cat "$e/device/name" 2>/dev/null)" = "Power Button" ] && ev=/dev/input/$(basename "$e")
done
echo "L2-VAL power-device ${ev:-none}"
echo "L2-VAL power-watch"
if [ -n "$ev" ] && dd if="$ev" bs=24 count=1 of=/dev/null 2>/dev/null; then
    echo "L2-VAL power-button-seen"
    sync
    poweroff -f
fi
"#;

/// A module of the lab's cloud kernel (the L2 kernel), by its path under `kernel/`.
fn cloud_module(rel: &str) -> PathBuf {
    let kernels = lab_dir().join("kernels");
    let found = std::fs::read_dir(&kernels)
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .filter(|k| k.file_name().to_string_lossy().contains("cloud"))
        .flat_map(|k| {
            std::fs::read_dir(k.path().join("lib/modules"))
                .into_iter()
                .flatten()
        })
        .flatten()
        .map(|m| m.path().join("kernel").join(rel))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "{rel} of the lab's cloud kernel is not under {} (scripts/lab/build-images unpacks it)",
            kernels.display()
        )
    })
}

#[test]
fn every_model_hot_added_used_removed_and_added_again_then_the_power_button() {
    tests::lab::build_images().unwrap_or_else(|e| panic!("{e}"));
    let run = Scenario::new("lab_hotplug", L1)
        .l2_script(L2)
        .l2_file(cloud_module("drivers/acpi/button.ko"), "button.ko")
        .l2_file(cloud_module("drivers/input/evdev.ko"), "evdev.ko")
        .timeout(Duration::from_secs(900))
        .run_ok();
    eprintln!("{}", run.report());
    assert_eq!(
        run.require("L2-VAL slots"),
        "31",
        "every slot a hotplug slot"
    );
    // In-VMM disk: the host's pattern, then the guest's own after the re-add.
    assert_eq!(
        run.require("L2-VAL hd0-host-pattern"),
        "HOST-PATTERN-HP-0123456789"
    );
    assert_eq!(
        run.require("L2-VAL hd0-guest-pattern"),
        "GUEST-PATTERN-HP-fedcb"
    );
    assert!(run.require("L2-VAL hd0-used-1").ends_with("virtio_blk"));
    assert_eq!(
        run.require("L2-VAL ud0-host-pattern"),
        "HOST-PATTERN-VU-0123456789"
    );
    assert_eq!(
        run.require("L2-VAL ud0-guest-pattern"),
        "GUEST-PATTERN-VU-fedcb"
    );
    for nic in ["hn0", "un0"] {
        for r in 1..=2 {
            let ping = run.require(&format!("L2-VAL {nic}-ping-{r}"));
            assert!(
                ping.contains("20 packets transmitted, 20 packets received"),
                "{nic} round {r}: {ping}"
            );
        }
    }
    for dev in ["hd0", "hn0", "ud0", "un0"] {
        for r in 1..=2 {
            let add = run.require(&format!("LAB-VAL {dev}-add-{r}"));
            assert!(add.contains(&format!("\"id\":\"{dev}\"")), "{dev}: {add}");
            assert!(add.contains("\"bdf\":\"0000:00:"), "{dev}: {add}");
            let used = run.require(&format!("LAB-VAL {dev}-used-{r}-after-s"));
            assert_ne!(used, "never", "{dev} round {r}: the guest never used it");
            let gone = run.require(&format!("LAB-VAL {dev}-gone-{r}-after-s"));
            assert_ne!(gone, "never", "{dev} round {r}: never released");
        }
        assert_eq!(run.require(&format!("LAB-VAL {dev}-released")), "2");
        let again = run.require(&format!("LAB-VAL {dev}-remove-again"));
        assert!(again.contains("removed already"), "{dev}: {again}");
    }
    assert_eq!(run.require("LAB-VAL blk-frontends"), "2");
    assert_eq!(run.require("LAB-VAL net-frontends"), "2");
    assert!(run.value("power-button-pressed").is_some());
    assert!(run.field("L2-VAL power-button-seen").is_some());
    for check in [
        "vmm-exit-0",
        "guest-powered-off",
        "guest-pattern-on-image",
        "guest-pattern-on-vu-image",
        "blk-daemon-alive",
        "net-daemon-alive",
    ] {
        run.assert_ok(check);
    }
}

/// Assigning a host device to a running guest: L1's e1000e (bound to vfio-pci by
/// `passthrough bind`) is added through the API to a guest that booted without it (Debian's
/// generic kernel, its e1000e and nvme drivers loaded at boot), the driver binds, 100 pings
/// pass to L1's other e1000e; it is removed (the guest ejects, the vmm resets and releases
/// it, `passthrough check` says it can be assigned again), added again and pinged again.
/// Then L1's NVMe is added, written, removed, and L1 reads back what the guest wrote after
/// the VM. A second VM with `pci=nomsi` takes the NIC on INTx (the DSDT's _PRT routes the
/// hot-added slot's INTA).
const VFIO_L1: &str = r#"
. /lab/lib.sh
API=$LAB_TMP/api.sock
remote() { vmm-remote --api-socket $API "$@"; }
# hot TAG ID BDF ROUND: add the host device, wait for the guest to have used it, remove it.
hot() {
    _t=$(lab_uptime)
    remote add-device "path=/sys/bus/pci/devices/$3,id=$2" >$LAB_TMP/add.json 2>&1
    echo "LAB-VAL $1-$2-add-$4 $(tr -d ' \n' <$LAB_TMP/add.json)"
    if wait_for $LAB_TMP/$1.log "^L2-VAL $1-$2-used-$4" 180; then
        echo "LAB-VAL $1-$2-used-$4-after-s $(lab_elapsed "$_t")"
    else
        echo "LAB-VAL $1-$2-used-$4-after-s never"
    fi
    _t=$(lab_uptime)
    remote remove-device "$2" >/dev/null 2>&1
    if api_gone $API "$2"; then
        echo "LAB-VAL $1-$2-gone-$4-after-s $(lab_elapsed "$_t")"
    else
        echo "LAB-VAL $1-$2-gone-$4-after-s never"
    fi
    passthrough check "$3" --memory 512M >$LAB_TMP/check.txt 2>&1
    echo "LAB-VAL $1-$2-check-after-remove-$4 $?"
}
# vm TAG CMDLINE: a VM with no device but the API; the rounds of the guest's script.
vm() {
    rm -f $API
    t0=$(lab_uptime)
    ( { vmm --kernel "$L2_GENERIC_KERNEL" --initramfs "$L2_GENERIC_INITRD" --cmdline "$2" \
        --cpus 2 --memory 512M --api-socket path=$API </dev/null 2>&1; echo "VMM-RC $?"; } \
        | lab_console "$t0" $1 | tee $LAB_TMP/$1.log ) &
    if ! wait_for $LAB_TMP/$1.log '^L2-VAL ready' 300; then
        echo "LAB-VAL $1-guest-never-ready"
        return
    fi
    if [ $1 = msix ]; then
        hot msix nic0 $NIC_BDF 1
        hot msix nic0 $NIC_BDF 2
        hot msix nvme0 $NVME_BDF 1
    else
        hot intx nic0 $NIC_BDF 1
    fi
    wait_for $LAB_TMP/$1.log '^VMM-RC' 120
    check $1-vmm-exit-0 grep -q '^VMM-RC 0$' $LAB_TMP/$1.log
    check $1-l2-exit grep -q '^L2-EXIT 0$' $LAB_TMP/$1.log
}
check bind-nic passthrough bind $NIC_BDF
check bind-nvme passthrough bind $NVME_BDF
peer=$(ls /sys/bus/pci/devices/$PEER_NIC_BDF/net/)
$IP addr add 192.0.2.1/24 dev $peer
$IP link set $peer up
vm msix "$L2_CMDLINE"
vm intx "$L2_CMDLINE pci=nomsi"
echo "LAB-VAL released $(grep -c 'its VFIO group released' $LAB_TMP/msix.log $LAB_TMP/intx.log | awk -F: '{ s += $2 } END { print s }')"
check unbind-nvme passthrough unbind $NVME_BDF
n=0; while [ ! -b /dev/nvme0n1 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
echo "LAB-VAL host-pattern $(dd if=/dev/nvme0n1 bs=512 skip=300 count=1 2>/dev/null | head -c 32)"
check unbind-nic passthrough unbind $NIC_BDF
lab_finish
"#;

const VFIO_L2: &str = r#"
if grep -q pci=nomsi /proc/cmdline; then rounds=1 tag=intx; else rounds=2 tag=msix; fi
echo "L2-VAL ready"
# Interrupts of the NIC by kind: the per-CPU counts of its lines.
count() {
    grep -E "$ifc|$dev" /proc/interrupts | grep "$1" |
        awk '{ for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i } END { print s + 0 }'
}
r=1
while [ $r -le $rounds ]; do
    n=0; dev=""
    while [ -z "$dev" ] && [ $n -lt 1800 ]; do
        dev=$(ls /sys/bus/pci/drivers/e1000e/ 2>/dev/null | grep '^0000:' | head -n1)
        [ -n "$dev" ] || sleep 0.1; n=$((n + 1))
    done
    echo "L2-VAL $tag-nic0-driver-$r ${dev:-none}"
    n=0; ifc=""
    while [ -z "$ifc" ] && [ $n -lt 100 ]; do
        ifc=$(ls /sys/bus/pci/devices/$dev/net/ 2>/dev/null | head -n1); [ -n "$ifc" ] || sleep 0.1; n=$((n + 1))
    done
    ip link set $ifc up
    ip addr add 192.0.2.2/24 dev $ifc
    n=0; until [ "$(cat /sys/class/net/$ifc/carrier 2>/dev/null)" = 1 ] || [ $n -ge 100 ]; do sleep 0.1; n=$((n + 1)); done
    n=0; until ping -c 1 -W 1 192.0.2.1 >/dev/null 2>&1 || [ $n -ge 20 ]; do n=$((n + 1)); done
    ping -c 100 -i 0.02 -W 2 192.0.2.1 > $LAB_TMP/ping.txt 2>&1
    echo "L2-VAL $tag-nic0-ping-$r $(grep 'packets transmitted' $LAB_TMP/ping.txt)"
    echo "L2-VAL $tag-nic0-msix-irqs-$r $(count MSI)"
    echo "L2-VAL $tag-nic0-ioapic-irqs-$r $(count IO-APIC)"
    echo "L2-VAL $tag-nic0-used-$r"
    n=0; while [ -e /sys/bus/pci/devices/$dev ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n + 1)); done
    echo "L2-VAL $tag-nic0-gone-$r $([ -e /sys/bus/pci/devices/$dev ] && echo no || echo yes)"
    r=$((r + 1))
done
if [ $rounds = 2 ]; then
    n=0; while [ ! -b /dev/nvme0n1 ] && [ $n -lt 1800 ]; do sleep 0.1; n=$((n + 1)); done
    echo "L2-VAL $tag-nvme0-driver $(ls /sys/bus/pci/drivers/nvme/ | grep '^0000:' | head -n1)"
    printf 'L2-NVME-HOTPLUG-0123456789abcdef' | dd of=/dev/nvme0n1 bs=512 seek=300 conv=fsync 2>/dev/null && echo "L2-VAL $tag-nvme0-written ok"
    echo "L2-VAL $tag-nvme0-used-1"
    n=0; while [ -b /dev/nvme0n1 ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n + 1)); done
fi
"#;

#[test]
fn assigned_nic_and_nvme_hot_added_removed_and_added_again() {
    let run = Scenario::new("lab_hotplug_vfio", VFIO_L1)
        .l2_script(VFIO_L2)
        .timeout(Duration::from_secs(1500))
        .run_ok();
    eprintln!("{}", run.report());
    run.assert_ok("bind-nic");
    run.assert_ok("bind-nvme");
    for (tag, rounds) in [("msix", 2), ("intx", 1)] {
        run.assert_ok(&format!("{tag}-vmm-exit-0"));
        run.assert_ok(&format!("{tag}-l2-exit"));
        for r in 1..=rounds {
            let add = run.require(&format!("LAB-VAL {tag}-nic0-add-{r}"));
            assert!(add.contains("\"bdf\":\"0000:00:"), "{tag} {r}: {add}");
            let ping = run.require(&format!("L2-VAL {tag}-nic0-ping-{r}"));
            let (msix, ioapic) = (
                num(run.require(&format!("L2-VAL {tag}-nic0-msix-irqs-{r}"))),
                num(run.require(&format!("L2-VAL {tag}-nic0-ioapic-irqs-{r}"))),
            );
            if tag == "msix" {
                assert!(
                    msix >= 100 && ioapic == 0,
                    "{tag} {r}: {msix} MSI-X, {ioapic} INTx"
                );
            } else {
                assert!(
                    ioapic >= 100 && msix == 0,
                    "{tag} {r}: {msix} MSI-X, {ioapic} INTx"
                );
            }
            assert!(
                ping.starts_with("100 packets transmitted, 100 packets received, 0% packet loss"),
                "{tag} {r}: {ping}"
            );
            let gone = run.require(&format!("LAB-VAL {tag}-nic0-gone-{r}-after-s"));
            assert_ne!(gone, "never", "{tag} {r}: the NIC was never released");
            assert_eq!(
                run.require(&format!("LAB-VAL {tag}-nic0-check-after-remove-{r}")),
                "0",
                "{tag} {r}: passthrough check after the removal"
            );
        }
    }
    assert_eq!(run.require("L2-VAL msix-nvme0-written"), "ok");
    // Guest RAM left the IOMMU before the last group left the container (after, the
    // kernel has dropped the mappings already and refuses the unmap).
    assert!(
        !run.lines
            .iter()
            .any(|l| l.text.contains("cannot unmap DMA")),
        "{}",
        run.report()
    );
    assert_eq!(run.require("LAB-VAL msix-nvme0-check-after-remove-1"), "0");
    assert_eq!(run.require("LAB-VAL released"), "4");
    run.assert_ok("unbind-nvme");
    assert_eq!(
        run.require("LAB-VAL host-pattern"),
        "L2-NVME-HOTPLUG-0123456789abcdef"
    );
    run.assert_ok("unbind-nic");
}

fn num(s: &str) -> u64 {
    s.trim()
        .parse()
        .unwrap_or_else(|_| panic!("not a count: {s:?}"))
}
