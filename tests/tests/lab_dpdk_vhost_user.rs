//! DPDK's vhost-user back-end in the lab: `dpdk-testpmd` (Debian's `dpdk-dev`) in L1 behind
//! our vmm's `--vhost-user-net`, with a Linux L2 guest (the cloud kernel's virtio_net).
//!
//! testpmd runs without hugepages or PCI devices and io-forwards between `net_vhost0` (the
//! guest's NIC) and `net_tap0` (a tap `dtap0` in L1, 192.0.2.1/24); the guest is 192.0.2.2.
//! Its PMDs are loaded with `-d` from `/lab/bin` (the EAL plugin directory is not in L1);
//! not the vdev bus, which testpmd links (a second copy of it would take the `--vdev`s and
//! find no driver for them). EAL refuses plugins under a world-writable directory, which
//! the initramfs root is, and needs `/var/run/dpdk`. DPDK's vhost maps guest memory with
//! MAP_POPULATE at SET_MEM_TABLE: under L1's TCG that takes longer than the vmm's default
//! 3 s deadline for a reply, hence `timeout_ms=30000` and a 256 MiB guest.
//!
//! 1. testpmd listens, the vmm connects: the guest pings L1 and L1 pings the guest; the
//!    guest's interface counters and testpmd's port counters (both ports, RX and TX) show
//!    the traffic both ways.
//! 2. testpmd connects (`client=1`) to the vmm's `server=on`: the same; then testpmd is
//!    SIGKILLed while the guest sends nothing (IPv6 off on its NIC, no pings) and started
//!    again while the guest transmits (ARP, pings that fail until the new one is there):
//!    the vmm takes the new connection and resumes the rings (no device reset: nothing was
//!    in flight when the old testpmd died), and pings both ways work again through the new
//!    testpmd, whose counters show them.

use std::time::Duration;

use tests::lab::Scenario;

const PMDS: &str = "/usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0";

const L1: &str = r#"
. /lab/lib.sh
D=/lab/bin
# DPDK's runtime directory (EAL creates /var/run/dpdk/PREFIX, not its parents).
mkdir -p /var/run/dpdk
# EAL refuses a driver (-d) under a world-writable directory, and the initramfs root is one.
chmod go-w / /lab /lab/bin
# start_pmd N VDEV-OPTS: testpmd number N on /tmp/vu.sock, io forwarding vhost <-> tap dtap0.
start_pmd() {
    echo "LAB-VAL pmd$1-starting $(lab_uptime)"
    dpdk-testpmd --no-huge -m 128 --no-pci --file-prefix=lab$1 \
        -d $D/librte_mempool_ring.so.23 -d $D/librte_net_vhost.so.23 -d $D/librte_net_tap.so.23 \
        --vdev "net_vhost0,iface=/tmp/vu.sock,queues=1$2" --vdev net_tap0,iface=dtap0 \
        -- --forward-mode=io --total-num-mbufs=8192 --stats-period=2 >/tmp/pmd$1.log 2>&1 &
    echo $! >/tmp/pmd.pid
    n=0
    until $IP link show dtap0 >/dev/null 2>&1 || [ $n -ge 600 ]; do
        if ! kill -0 "$(cat /tmp/pmd.pid)" 2>/dev/null; then
            sed 's/^/PMD-DIED /' /tmp/pmd$1.log
            fail pmd$1-start "testpmd exited"
            return 1
        fi
        sleep 0.2; n=$((n + 1))
    done
    $IP addr add 192.0.2.1/24 dev dtap0
    $IP link set dtap0 up
    echo "LAB-VAL pmd$1-up $(lab_uptime)"
    tr -d '\033' </tmp/pmd$1.log | grep -v 'NIC statistics\|-packets\|-errors\|-nombuf\|Throughput\|-pps\|####\|Port statistics\|^ *$' | head -40 | sed "s/^/PMD$1 /"
}
# pmd_counts N: testpmd N's last counters of each port, one line.
pmd_counts() {
    tr -d '\033' </tmp/pmd$1.log | awk '
        /statistics for port 0/ { p = 0 } /statistics for port 1/ { p = 1 } /Accumulated/ { p = 9 }
        /RX-packets:/ { rx[p] = $2 } /TX-packets:/ { tx[p] = $2 }
        END { printf "vhost-rx=%d vhost-tx=%d tap-rx=%d tap-tx=%d\n", rx[0], tx[0], rx[1], tx[1] }'
}
# pmd_ok N: both ports moved packets both ways (at least 10 each).
pmd_ok() {
    pmd_counts "$1" | awk '{ for (i = 1; i <= NF; i++) { split($i, kv, "="); if (kv[2] < 10) exit 1 } }'
}
# wait_mark FILE TEXT: until FILE has TEXT (at most 10 min).
wait_mark() {
    n=0; until grep -q "$2" "$1" 2>/dev/null || [ $n -ge 3000 ]; do sleep 0.2; n=$((n + 1)); done
    grep -q "$2" "$1"
}
# ping_guest NAME: 20 pings from L1 to the guest.
ping_guest() {
    ping -c 20 -i 0.1 -W 2 192.0.2.2 >/tmp/ping-$1.txt 2>&1
    echo "LAB-VAL l1-ping-$1 $(grep 'packets transmitted' /tmp/ping-$1.txt)"
    grep -q ' 0% packet loss' /tmp/ping-$1.txt
}

# 1. testpmd listens, the vmm connects.
start_pmd 1 ""
n=0; until [ -S /tmp/vu.sock ] || [ $n -ge 300 ]; do sleep 0.2; n=$((n + 1)); done
check pmd1-socket [ -S /tmp/vu.sock ]
(
    wait_mark /tmp/l2a.log 'L2-VAL pinged' && ping_guest a && echo PING-A-OK >>/tmp/marks
    echo PING-A-DONE >>/tmp/marks
) &
watcher=$!
t0=$(lab_uptime)
{ vmm --kernel "$L2_KERNEL" --initramfs "$L2_INITRD" --cmdline "$L2_CMDLINE mode=a" --memory 256M \
    --vhost-user-net socket=/tmp/vu.sock,id=dpdk,timeout_ms=30000 </dev/null 2>&1; echo "VMM-RC $?"; } \
    | lab_console "$t0" l2a | tee /tmp/l2a.log
wait "$watcher"
check a-vmm-exit-0 grep -q '^VMM-RC 0$' /tmp/l2a.log
check a-l1-pings grep -q PING-A-OK /tmp/marks
echo "LAB-VAL a-pmd $(pmd_counts 1)"
check a-pmd-counters pmd_ok 1
kill -TERM "$(cat /tmp/pmd.pid)"
n=0; while kill -0 "$(cat /tmp/pmd.pid)" 2>/dev/null && [ $n -lt 100 ]; do sleep 0.2; n=$((n + 1)); done
echo "LAB-VAL a-pmd-final $(pmd_counts 1)"
check a-pmd-final-stats grep -q 'Forward statistics for port 1' /tmp/pmd1.log
tail -30 /tmp/pmd1.log | tr -d '\033' | sed 's/^/PMD1 /'
rm -f /tmp/vu.sock

# 2. The vmm listens (server=on), testpmd connects (client=1); testpmd is killed and
# started again.
(
    n=0; until [ -S /tmp/vu.sock ] || [ $n -ge 300 ]; do sleep 0.2; n=$((n + 1)); done
    start_pmd 2 ",client=1"
    wait_mark /tmp/l2b.log 'L2-VAL pinged' && ping_guest b1 && echo PING-B1-OK >>/tmp/marks
    wait_mark /tmp/l2b.log 'L2-VAL quiet'
    echo "LAB-VAL b-pmd2 $(pmd_counts 2)"
    pmd_ok 2 && echo PMD2-OK >>/tmp/marks
    kill -KILL "$(cat /tmp/pmd.pid)"
    echo "LAB-VAL pmd2-killed $(lab_uptime)"
    n=0; while $IP link show dtap0 >/dev/null 2>&1 && [ $n -lt 100 ]; do sleep 0.2; n=$((n + 1)); done
    start_pmd 3 ",client=1"
    wait_mark /tmp/l2b.log 'reconnected' && echo "LAB-VAL reconnected $(lab_uptime)"
    wait_mark /tmp/l2b.log 'L2-VAL pinged-again' && ping_guest b2 && echo PING-B2-OK >>/tmp/marks
    echo PING-B-DONE >>/tmp/marks
) &
watcher=$!
t0=$(lab_uptime)
{ vmm --kernel "$L2_KERNEL" --initramfs "$L2_INITRD" --cmdline "$L2_CMDLINE mode=b" --memory 256M \
    --vhost-user-net socket=/tmp/vu.sock,server=on,id=dpdks,timeout_ms=30000 </dev/null 2>&1; echo "VMM-RC $?"; } \
    | lab_console "$t0" l2b | tee /tmp/l2b.log
wait "$watcher"
check b-vmm-exit-0 grep -q '^VMM-RC 0$' /tmp/l2b.log
check b-l1-pings-first grep -q PING-B1-OK /tmp/marks
check b-pmd2-counters grep -q PMD2-OK /tmp/marks
check b-vmm-resumed grep -q 'dpdks: reconnected to /tmp/vu.sock, queues resumed' /tmp/l2b.log
check b-no-device-reset sh -c "! grep -q 'needs a reset' /tmp/l2b.log"
check b-l1-pings-after-restart grep -q PING-B2-OK /tmp/marks
echo "LAB-VAL b-pmd3 $(pmd_counts 3)"
check b-pmd3-counters pmd_ok 3
kill -TERM "$(cat /tmp/pmd.pid)"
n=0; while kill -0 "$(cat /tmp/pmd.pid)" 2>/dev/null && [ $n -lt 100 ]; do sleep 0.2; n=$((n + 1)); done
echo "LAB-VAL b-pmd3-final $(pmd_counts 3)"
tail -30 /tmp/pmd3.log | tr -d '\033' | sed 's/^/PMD3 /'
lab_finish
"#;

const L2: &str = r#"
# No IPv6 on the NIC: the guest sends nothing unless told to (quiet during the restart).
echo 1 >/proc/sys/net/ipv6/conf/all/disable_ipv6 2>/dev/null
echo 1 >/proc/sys/net/ipv6/conf/default/disable_ipv6 2>/dev/null
ip link set eth0 up
ip addr add 192.0.2.2/24 dev eth0
stats() {
    echo "L2-VAL $1 rx_packets=$(cat /sys/class/net/eth0/statistics/rx_packets) tx_packets=$(cat /sys/class/net/eth0/statistics/tx_packets)"
}
# echo_requests: ICMP echo requests the guest received so far.
echo_requests() { awk '/^Icmp:/ { n++; if (n == 2) print $10 }' /proc/net/snmp; }
M=a; grep -q mode=b /proc/cmdline && M=b
# pings NAME: 20 pings to L1, then wait until L1 pinged us 20 times.
pings() {
    before=$(echo_requests)
    ping -c 20 -i 0.1 -W 2 192.0.2.1 >/tmp/ping.txt 2>&1
    echo "L2-VAL ping-$M-$1 $(grep 'packets transmitted' /tmp/ping.txt)"
    echo "L2-VAL $2"
    n=0; until [ $(($(echo_requests) - before)) -ge 20 ] || [ $n -ge 600 ]; do sleep 0.2; n=$((n + 1)); done
    echo "L2-VAL echo-requests-$M-$1 $(($(echo_requests) - before))"
    stats "counters-$M-$1"
}
# The path is up once one ping gets through: DPDK maps (MAP_POPULATE) the guest's memory
# at the activation, which takes seconds under TCG, before it serves the rings.
n=0; until ping -c 1 -W 1 192.0.2.1 >/dev/null 2>&1 || [ $n -ge 60 ]; do n=$((n + 1)); done
echo "L2-VAL first-ping-tries-$M $n"
pings first pinged
if grep -q mode=b /proc/cmdline; then
    # Quiet for 3 s: testpmd is killed meanwhile, with nothing in flight. Then the guest
    # transmits (ARP, pings) while no testpmd is there: its frames wait in the ring (or
    # are dropped after the vmm's grace period) and go out once the new testpmd connects.
    ip neigh flush dev eth0
    echo "L2-VAL quiet"
    sleep 3
    t=$(cut -d' ' -f1 /proc/uptime)
    n=0; until ping -c 1 -W 1 192.0.2.1 >/dev/null 2>&1 || [ $n -ge 120 ]; do n=$((n + 1)); done
    echo "L2-VAL back-after $(awk -v t=$t '{ print $1 - t }' /proc/uptime) s, $n failed pings"
    pings again pinged-again
fi
"#;

#[test]
fn testpmd_behind_vmm_with_a_linux_guest() {
    let lib = |name: &str| format!("{PMDS}/librte_{name}.so.23");
    let run = Scenario::new("lab_dpdk_vhost_user", L1)
        .l2_script(L2)
        .bin("/usr/bin/dpdk-testpmd")
        .bin(lib("mempool_ring"))
        .bin(lib("net_vhost"))
        .bin(lib("net_tap"))
        // A loaded host makes L1's IO-APIC timer check fail now and then (a panic at boot).
        .append("no_timer_check")
        .timeout(Duration::from_secs(900))
        .run_ok();
    for check in [
        "pmd1-socket",
        "a-vmm-exit-0",
        "a-l1-pings",
        "a-pmd-counters",
        "a-pmd-final-stats",
        "b-vmm-exit-0",
        "b-l1-pings-first",
        "b-pmd2-counters",
        "b-vmm-resumed",
        "b-no-device-reset",
        "b-l1-pings-after-restart",
        "b-pmd3-counters",
    ] {
        run.assert_ok(check);
    }
    for what in ["ping-a-first", "ping-b-first", "ping-b-again"] {
        let v = run.require(&format!("L2-VAL {what}"));
        assert!(v.contains(" 0% packet loss"), "guest {what}: {v}");
    }
    for v in [
        "L2-VAL echo-requests-a-first",
        "L2-VAL counters-a-first",
        "L2-VAL counters-b-first",
        "L2-VAL echo-requests-b-again",
        "L2-VAL counters-b-again",
        "LAB-VAL pmd1-up",
        "LAB-VAL a-pmd-final",
        "LAB-VAL b-pmd2",
        "LAB-VAL b-pmd3-final",
        "LAB-VAL pmd2-killed",
        "LAB-VAL reconnected",
        "L2-VAL back-after",
    ] {
        eprintln!("{v}: {}", run.require(v));
    }
}
