//! The passthrough model in the lab: host PCI devices of L1 (behind its Intel IOMMU)
//! assigned to an L2 Linux guest (Debian's generic kernel, for its e1000e and nvme drivers)
//! by our vmm's `--vfio`.
//!
//! - NIC: the e1000e at 00:02.0 is prepared with `passthrough bind` (and `passthrough check`
//!   says it is ready), then assigned to two VMs one after the other. The first runs on
//!   MSI-X, the second with `pci=nomsi`, so on INTx. In both the guest's e1000e driver binds,
//!   pings L1's peer NIC (00:03.0, same QEMU hub) 100 times with no loss, and 64 MiB each
//!   way over TCP arrives intact; /proc/interrupts shows which interrupts carried it.
//!   `passthrough unbind` gives it back to L1's e1000e afterwards.
//! - NVMe: the guest writes a pattern and 4 MiB of random data to the assigned NVMe; after
//!   the VM exits, L1 rebinds the device to its nvme driver and reads both back.

use std::time::Duration;

use tests::lab::Scenario;

const NIC_L1: &str = r#"
. /lab/lib.sh
passthrough check $NIC_BDF --memory 512M >$LAB_TMP/check0.txt 2>&1
echo "LAB-VAL check-before-rc $?"
sed 's/^/CHECK-BEFORE | /' $LAB_TMP/check0.txt
check bind passthrough bind $NIC_BDF
REFERENCE=$(cat /lab/files/reference 2>/dev/null)
passthrough check $NIC_BDF --memory 512M >$LAB_TMP/check1.txt 2>&1
rc=$?
sed 's/^/CHECK-AFTER | /' $LAB_TMP/check1.txt
check check-ready [ $rc -eq 0 ]

peer=$(ls /sys/bus/pci/devices/$PEER_NIC_BDF/net/)
$IP addr add 192.0.2.1/24 dev $peer
$IP link set $peer up
mkdir -p $LAB_TMP/www
dd if=/dev/urandom of=$LAB_TMP/www/down.bin bs=1M count=64 2>/dev/null
echo "LAB-VAL host-down-sha $(sha256sum $LAB_TMP/www/down.bin | cut -d' ' -f1)"
httpd -p 192.0.2.1:8080 -h $LAB_TMP/www

# sandbox_sample TAG: once the guest is up, every thread of the running vmm: how many, how
# many have a seccomp filter (Seccomp: 2) and no new privileges, and their names (#23).
sandbox_sample() {
    wait_for $LAB_TMP/$1.log '^L2-INIT' 300 || return
    p=$(pidof vmm | cut -d' ' -f1)
    [ -n "$p" ] || return
    n=0 s=0 f=0 names=
    for t in /proc/$p/task/*; do
        n=$((n + 1))
        grep -q '^Seccomp:[[:space:]]*2$' $t/status && s=$((s + 1))
        grep -q '^NoNewPrivs:[[:space:]]*1$' $t/status && f=$((f + 1))
        names="$names,$(tr ' ' '_' <$t/comm)"
    done
    echo "LAB-VAL $1-sandbox threads=$n seccomp2=$s nnp=$f names=${names#,}"
}
# run_vm TAG CMDLINE: one VM with the NIC (our vmm, or QEMU's vfio-pci when the scenario is
# the reference); the guest's upload is fetched meanwhile.
run_vm() {
    tag=$1
    # L1's e1000e driver resets the NIC between VMs (as the bench and the soak do): the
    # reset vfio-pci has for the lab's emulated e1000e (a power-state cycle) does not stop
    # it, and the first VM's guest leaves its receive ring running: once the second guest
    # set Bus Master Enable, the NIC wrote received frames through that stale ring into the
    # new guest's memory (seen December 2026: a DMAR fault at an address beyond its RAM,
    # then "corrupted stack end detected inside scheduler" in e1000_probe, or no device
    # bound at all).
    passthrough unbind $NIC_BDF >/dev/null && passthrough bind $NIC_BDF >/dev/null
    echo "LAB-VAL $tag-nic-reset-method $(cat /sys/bus/pci/devices/$NIC_BDF/reset_method 2>/dev/null)"
    rm -f $LAB_TMP/www/done
    (
        n=0
        until wget -q -O $LAB_TMP/up.bin http://192.0.2.2:8080/up.bin 2>/dev/null || [ $n -ge 900 ]; do
            sleep 1; n=$((n + 1))
        done
        echo "LAB-VAL $tag-host-up-sha $(sha256sum $LAB_TMP/up.bin | cut -d' ' -f1)"
        rm -f $LAB_TMP/up.bin
        touch $LAB_TMP/www/done
    ) &
    fetcher=$!
    t0=$(lab_uptime)
    if [ "${REFERENCE:-}" = qemu ]; then
        l2_qemu -kernel "$L2_GENERIC_KERNEL" -initrd "$L2_GENERIC_INITRD" -append "$2" -smp 2 \
            -device vfio-pci,host=$NIC_BDF | lab_console "$t0" $tag | tee $LAB_TMP/$tag.log
        # The reference is not under test: its L2 lost mid-output (the lab's nested-SVM flake,
        # seen once) makes the fixture run the scenario again instead of failing it.
        grep -q '^L2-EXIT 0$' $LAB_TMP/$tag.log ||
            echo "LAB-FLAKE $tag: QEMU's L2 ended without L2-EXIT (last line: $(tail -n1 $LAB_TMP/$tag.log | cut -c1-80))"
    else
        sandbox_sample $tag &
        { vmm --kernel "$L2_GENERIC_KERNEL" --initramfs "$L2_GENERIC_INITRD" --cmdline "$2" \
            --cpus 2 --memory 512M --vfio host=$NIC_BDF,id=nic0 \
            --exit-stats $LAB_TMP/stats-$tag.json </dev/null 2>&1; echo "VMM-RC $?"; } \
            | lab_console "$t0" $tag | tee $LAB_TMP/$tag.log
        check $tag-vmm-exit-0 grep -q '^VMM-RC 0$' $LAB_TMP/$tag.log
        echo "LAB-VAL $tag-exit-stats $(cat $LAB_TMP/stats-$tag.json)"
    fi
    kill $fetcher 2>/dev/null
    wait $fetcher 2>/dev/null
    check $tag-l2-exit grep -q '^L2-EXIT 0$' $LAB_TMP/$tag.log
}
run_vm msix "$L2_CMDLINE"
run_vm intx "$L2_CMDLINE pci=nomsi"
check host-driver-after-vms [ "$(pci_driver $NIC_BDF)" = vfio-pci ]
check unbind passthrough unbind $NIC_BDF
check host-driver-back [ "$(pci_driver $NIC_BDF)" = e1000e ]
lab_finish
"#;

const NIC_L2: &str = r#"
if grep -q pci=nomsi /proc/cmdline; then tag=intx; else tag=msix; fi
# The driver's probe ran while init loaded the module, but once (December 2026) the INTx VM's
# script found no device bound to e1000e at its start while dmesg had eth0 registered before:
# wait for the binding and its netdev (and say when) rather than race them.
n=0; dev=""
while [ -z "$dev" ] && [ $n -lt 300 ]; do
    dev=$(ls /sys/bus/pci/drivers/e1000e/ 2>/dev/null | grep '^0000:' | head -n1)
    [ -n "$dev" ] || sleep 0.1; n=$((n + 1))
done
echo "L2-VAL $tag-driver-bound ${dev:-none}"
echo "L2-VAL $tag-driver-bound-at $(cut -d' ' -f1 /proc/uptime) after $n polls"
n=0; ifc=""
while [ -n "$dev" ] && [ -z "$ifc" ] && [ $n -lt 100 ]; do
    ifc=$(ls /sys/bus/pci/devices/$dev/net/ 2>/dev/null | head -n1); [ -n "$ifc" ] || sleep 0.1; n=$((n + 1))
done
[ -n "$ifc" ] || { dmesg | tail -n 30 | sed "s/^/L2-DMESG-NO-NIC /"; exit 1; }
ip link set $ifc up
ip addr add 192.0.2.2/24 dev $ifc
# e1000e brings the link up after autonegotiation.
n=0; until [ "$(cat /sys/class/net/$ifc/carrier 2>/dev/null)" = 1 ] || [ $n -ge 100 ]; do sleep 0.1; n=$((n + 1)); done
echo "L2-VAL $tag-carrier-at $(cut -d' ' -f1 /proc/uptime)"
# In 4 of 5 runs the first VM after `passthrough bind` lost the replies of a 0.2-0.8 s window
# in its first second of link (rx_packets short, no ring overrun, no DMAR fault), whatever
# its interrupt mode; a second VM never did, nor did a run with INTx first. So: wait for a
# first answer, then measure.
n=0; until ping -c 1 -W 1 192.0.2.1 >/dev/null 2>&1 || [ $n -ge 20 ]; do n=$((n + 1)); done
echo "L2-VAL $tag-first-reply-at $(cut -d' ' -f1 /proc/uptime) after $n lost"
grep -E "$ifc|$dev" /proc/interrupts | sed "s/^/L2-IRQ-BEFORE /"
ping -c 100 -i 0.02 -W 2 192.0.2.1 > $LAB_TMP/ping.txt 2>&1
echo "L2-VAL $tag-ping-done-at $(cut -d' ' -f1 /proc/uptime)"
dmesg | grep -i -E 'e1000e|eth0' | tail -n 8 | sed "s/^/L2-DMESG /"
for st in rx_packets rx_dropped rx_missed_errors rx_fifo_errors rx_errors tx_packets tx_dropped tx_errors; do
    echo "L2-STAT $tag $st $(cat /sys/class/net/$ifc/statistics/$st)"
done
echo "L2-VAL $tag-ping $(grep 'packets transmitted' $LAB_TMP/ping.txt)"
echo "L2-VAL $tag-ping-seqs $(sed -n 's/.*seq=\([0-9]*\).*/\1/p' $LAB_TMP/ping.txt | tr '\n' ' ')"
mkdir -p $LAB_TMP/www
dd if=/dev/urandom of=$LAB_TMP/up.tmp bs=1M count=64 2>/dev/null
echo "L2-VAL $tag-guest-up-sha $(sha256sum $LAB_TMP/up.tmp | cut -d' ' -f1)"
mv $LAB_TMP/up.tmp $LAB_TMP/www/up.bin
httpd -p 192.0.2.2:8080 -h $LAB_TMP/www
wget -q -O $LAB_TMP/down.bin http://192.0.2.1:8080/down.bin
echo "L2-VAL $tag-guest-down-sha $(sha256sum $LAB_TMP/down.bin | cut -d' ' -f1)"
rm -f $LAB_TMP/down.bin
n=0
until wget -q -O /dev/null http://192.0.2.1:8080/done 2>/dev/null || [ $n -ge 900 ]; do
    sleep 1; n=$((n + 1))
done
grep -E "$ifc|$dev" /proc/interrupts | sed "s/^/L2-IRQ /"
# Interrupts of the NIC by kind: sum the per-CPU counts of its lines.
count() {
    grep -E "$ifc|$dev" /proc/interrupts | grep "$1" |
        awk '{ for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i } END { print s + 0 }'
}
echo "L2-VAL $tag-msix-irqs $(count MSI)"
echo "L2-VAL $tag-ioapic-irqs $(count IO-APIC)"
"#;

fn num(s: &str) -> u64 {
    s.trim()
        .parse()
        .unwrap_or_else(|_| panic!("not a count: {s:?}"))
}

#[test]
fn nic_on_msix_then_intx_in_two_vms() {
    let run = Scenario::new("lab_vfio_nic", NIC_L1)
        .l2_script(NIC_L2)
        .timeout(Duration::from_secs(1200))
        .run_ok();
    check_nic_run(&run);
    for tag in ["msix", "intx"] {
        run.assert_ok(&format!("{tag}-vmm-exit-0"));
        // The sandbox with an assigned device (#23 Must show 1): every thread of the vmm
        // filtered, no new privileges; the vCPUs among them.
        let sb = run.require(&format!("LAB-VAL {tag}-sandbox"));
        let field = |k: &str| -> &str {
            sb.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{k}=")))
                .unwrap_or("")
        };
        let threads: u32 = field("threads").parse().unwrap_or(0);
        assert!(threads >= 3, "{tag}: {sb}");
        assert_eq!(field("seccomp2"), field("threads"), "{tag}: {sb}");
        assert_eq!(field("nnp"), field("threads"), "{tag}: {sb}");
        let names: Vec<&str> = field("names").split(',').collect();
        assert!(
            names.contains(&"vcpu0") && names.contains(&"vcpu1"),
            "{tag}: {sb}"
        );
    }
}

/// The same scenario with QEMU's vfio-pci as the L2 VMM: the reference that splits our
/// bugs from the lab's.
#[test]
fn nic_reference_with_qemu() {
    let run = Scenario::new("lab_vfio_nic_qemu", NIC_L1)
        .l2_script(NIC_L2)
        .file_contents("reference", "qemu")
        .with_qemu()
        .timeout(Duration::from_secs(1200))
        .run_ok();
    check_nic_run(&run);
}

fn check_nic_run(run: &tests::lab::LabRun) {
    run.assert_ok("bind");
    run.assert_ok("check-ready");
    assert_eq!(run.require("LAB-VAL check-before-rc"), "2");
    for tag in ["msix", "intx"] {
        run.assert_ok(&format!("{tag}-l2-exit"));
        let bound = run.require(&format!("L2-VAL {tag}-driver-bound"));
        assert!(bound.starts_with("0000:"), "{tag}: e1000e bound to {bound}");
        let ping = run.require(&format!("L2-VAL {tag}-ping"));
        assert!(
            ping.starts_with("100 packets transmitted, 100 packets received, 0% packet loss"),
            "{tag}: {ping}"
        );
        assert_eq!(
            run.require(&format!("L2-VAL {tag}-guest-down-sha")),
            run.require("LAB-VAL host-down-sha"),
            "{tag}: download corrupted"
        );
        assert_eq!(
            run.require(&format!("L2-VAL {tag}-guest-up-sha")),
            run.require(&format!("LAB-VAL {tag}-host-up-sha")),
            "{tag}: upload corrupted"
        );
    }
    // Which interrupts carried the traffic.
    let msix = num(run.require("L2-VAL msix-msix-irqs"));
    assert!(msix >= 100, "MSI-X run: {msix} MSI-X interrupts");
    assert_eq!(num(run.require("L2-VAL msix-ioapic-irqs")), 0);
    let intx = num(run.require("L2-VAL intx-ioapic-irqs"));
    assert!(intx >= 100, "pci=nomsi run: {intx} INTx interrupts");
    assert_eq!(num(run.require("L2-VAL intx-msix-irqs")), 0);
    run.assert_ok("host-driver-after-vms");
    run.assert_ok("unbind");
    run.assert_ok("host-driver-back");
}

const NVME_L1: &str = r#"
. /lab/lib.sh
check bind passthrough bind $NVME_BDF
t0=$(lab_uptime)
{ RUST_LOG=info,vmm::pci=debug vmm --kernel "$L2_GENERIC_KERNEL" --initramfs "$L2_GENERIC_INITRD" --cmdline "$L2_CMDLINE" \
    --cpus 2 --memory 512M --vfio host=$NVME_BDF,id=nvme0 </dev/null 2>&1; echo "VMM-RC $?"; } \
    | lab_console "$t0" l2 | tee $LAB_TMP/l2.log
check vmm-exit-0 grep -q '^VMM-RC 0$' $LAB_TMP/l2.log
check l2-exit grep -q '^L2-EXIT 0$' $LAB_TMP/l2.log
check unbind passthrough unbind $NVME_BDF
n=0; while [ ! -b /dev/nvme0n1 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
check nvme-back [ -b /dev/nvme0n1 ]
echo "LAB-VAL host-pattern $(dd if=/dev/nvme0n1 bs=512 skip=300 count=1 2>/dev/null | head -c 32)"
echo "LAB-VAL host-random-sha $(dd if=/dev/nvme0n1 bs=1M skip=8 count=4 2>/dev/null | sha256sum | cut -d' ' -f1)"
lab_finish
"#;

const NVME_L2: &str = r#"
n=0; while [ ! -b /dev/nvme0n1 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
echo "L2-VAL nvme-driver $(ls /sys/bus/pci/drivers/nvme/ | grep '^0000:' | head -n1)"
printf 'L2-NVME-PATTERN-0123456789abcdef' | dd of=/dev/nvme0n1 bs=512 seek=300 conv=fsync 2>/dev/null && echo "L2-VAL pattern-written ok"
dd if=/dev/urandom of=$LAB_TMP/r.bin bs=1M count=4 2>/dev/null
dd if=$LAB_TMP/r.bin of=/dev/nvme0n1 bs=1M seek=8 conv=fsync 2>/dev/null && echo "L2-VAL random-written ok"
echo "L2-VAL random-sha $(sha256sum $LAB_TMP/r.bin | cut -d' ' -f1)"
echo "L2-VAL readback-sha $(dd if=/dev/nvme0n1 bs=1M skip=8 count=4 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
grep nvme /proc/interrupts | sed "s/^/L2-IRQ /"
"#;

#[test]
fn nvme_pattern_survives_the_vm() {
    let run = Scenario::new("lab_vfio_nvme", NVME_L1)
        .l2_script(NVME_L2)
        .timeout(Duration::from_secs(600))
        .run_ok();
    run.assert_ok("bind");
    run.assert_ok("vmm-exit-0");
    run.assert_ok("l2-exit");
    // Guest RAM was mapped for DMA in the background while the guest booted, and the
    // driver's Bus Master Enable waited for it (the data checks below pass through it).
    assert!(
        run.lines
            .iter()
            .any(|l| l.text.contains("mapped for device DMA in")
                && l.text.contains("while the guest booted")),
        "no DMA mapping report in the vmm's log\n{}",
        run.report()
    );
    assert!(run.require("L2-VAL nvme-driver").starts_with("0000:"));
    assert_eq!(run.require("L2-VAL pattern-written"), "ok");
    assert_eq!(run.require("L2-VAL random-written"), "ok");
    assert_eq!(
        run.require("L2-VAL readback-sha"),
        run.require("L2-VAL random-sha")
    );
    run.assert_ok("unbind");
    run.assert_ok("nvme-back");
    assert_eq!(
        run.require("LAB-VAL host-pattern"),
        "L2-NVME-PATTERN-0123456789abcdef"
    );
    assert_eq!(
        run.require("LAB-VAL host-random-sha"),
        run.require("L2-VAL random-sha")
    );
}
