//! A guest that breaks its own assigned device, in the lab: the e1000e at 00:02.0 of L1 is
//! assigned to an L2 Linux guest by our vmm; the guest's e1000e driver brings it up and
//! pings L1's peer NIC, then the guest unbinds the driver and, through the device's config
//! space in sysfs, enables MSI and MSI-X at once (both orders), clears Memory Space Enable
//! and reads and writes BAR 0 through /dev/mem (which used to fault in KVM_RUN and end the
//! VM as a "VMM error"), sets Memory Space Enable again and rebinds the driver, which must
//! work as before. L1 then sends the vmm SIGTERM, which must end it within 2 s with status
//! 0, and counts its log lines per kind.

use std::time::Duration;

use tests::lab::Scenario;

const L1: &str = r#"
. /lab/lib.sh
check bind passthrough bind $NIC_BDF
peer=$(ls /sys/bus/pci/devices/$PEER_NIC_BDF/net/)
$IP addr add 192.0.2.1/24 dev $peer
$IP link set $peer up
t0=$(lab_uptime)
RUST_LOG=info vmm --kernel "$L2_GENERIC_KERNEL" --initramfs "$L2_GENERIC_INITRD" \
    --cmdline "$L2_CMDLINE" --cpus 2 --memory 512M --vfio host=$NIC_BDF,id=nic0 \
    </dev/null >$LAB_TMP/vm.out 2>&1 &
vpid=$!
n=0
until grep -q 'L2-VAL hostile-done' $LAB_TMP/vm.out || ! kill -0 $vpid 2>/dev/null || [ $n -ge 1200 ]; do
    sleep 1; n=$((n + 1))
done
check vmm-alive-after-hostile kill -0 $vpid
t1=$(lab_uptime)
kill -TERM $vpid
wait $vpid
rc=$?
echo "LAB-VAL sigterm-s $(lab_elapsed $t1)"
echo "LAB-VAL vmm-rc $rc"
lab_console "$t0" hostile <$LAB_TMP/vm.out
# The vmm's own lines (env_logger: "[time LEVEL target] ..."), by kind.
grep '^\[' $LAB_TMP/vm.out | sed 's/^/VMM-LOG /'
echo "LAB-VAL log-no-decode $(grep -c 'does not decode it' $LAB_TMP/vm.out)"
echo "LAB-VAL log-msi-msix $(grep -c 'MSI and MSI-X enabled at once' $LAB_TMP/vm.out)"
echo "LAB-VAL log-region-failed $(grep -c -i 'failed to read region\|failed to write region\|region read with\|region write with' $LAB_TMP/vm.out)"
echo "LAB-VAL log-warn-error $(grep -c '^\[[^]]* \(WARN\|ERROR\)' $LAB_TMP/vm.out)"
check unbind passthrough unbind $NIC_BDF
lab_finish
"#;

const L2: &str = r#"
dev=$(ls /sys/bus/pci/drivers/e1000e/ | grep '^0000:' | head -n1)
echo "L2-VAL driver-bound ${dev:-none}"
cfg=/sys/bus/pci/devices/$dev/config
# rb OFF: a config byte; wb OFF VALUE: writes one.
rb() { od -An -tu1 -j $(($1)) -N1 $cfg | tr -d ' \n'; }
wb() { printf "$(printf '\\%03o' $(($2 & 255)))" | dd of=$cfg bs=1 seek=$(($1)) count=1 conv=notrunc 2>/dev/null; }
cap() {
    p=$(rb 0x34); k=0
    while [ "$p" -ne 0 ] && [ $k -lt 48 ]; do
        [ "$(rb $p)" -eq $1 ] && { echo $p; return; }
        p=$(rb $((p + 1))); k=$((k + 1))
    done
    echo 0
}
up_and_ping() {
    ifc=$(ls /sys/bus/pci/devices/$dev/net/ 2>/dev/null | head -n1)
    ip link set $ifc up
    ip addr add 192.0.2.2/24 dev $ifc 2>/dev/null
    n=0; until [ "$(cat /sys/class/net/$ifc/carrier 2>/dev/null)" = 1 ] || [ $n -ge 100 ]; do sleep 0.1; n=$((n + 1)); done
    n=0; until ping -c 1 -W 1 192.0.2.1 >/dev/null 2>&1 || [ $n -ge 20 ]; do n=$((n + 1)); done
    ping -c 20 -i 0.05 -W 2 192.0.2.1 | grep 'packets transmitted'
}
echo "L2-VAL ping-before $(up_and_ping)"
msi=$(cap 5)
msix=$(cap 17)
echo "L2-VAL caps msi=$msi msix=$msix"
bar0=$(head -n1 /sys/bus/pci/devices/$dev/resource | cut -d' ' -f1)
echo $dev >/sys/bus/pci/drivers/e1000e/unbind
cmd=$(rb 4)
wb 4 $((cmd | 6))
# bits: "MSI-enable MSI-X-enable" as the guest reads them back.
bits() { echo "$(($(rb $((msi + 2))) & 1)) $((($(rb $((msix + 3))) >> 7) & 1))"; }
wb $((msi + 2)) $(($(rb $((msi + 2))) | 1))
wb $((msix + 3)) $(($(rb $((msix + 3))) | 0x80))
echo "L2-VAL msi-then-msix $(bits)"
wb $((msi + 2)) $(($(rb $((msi + 2))) & ~1))
wb $((msix + 3)) $(($(rb $((msix + 3))) | 0x80))
wb $((msi + 2)) $(($(rb $((msi + 2))) | 1))
echo "L2-VAL msix-then-msi $(bits)"
wb $((msi + 2)) $(($(rb $((msi + 2))) & ~1))
wb $((msix + 3)) $(($(rb $((msix + 3))) & 0x7f))
echo "L2-VAL both-off $(bits)"
# Memory Space Enable off: BAR 0 (mapped directly until now) reads all ones.
wb 4 $((cmd & ~2 | 4))
ones=0
i=0
while [ $i -lt 200 ]; do
    [ "$(devmem $((bar0 + 8)) 32)" = 0xFFFFFFFF ] && ones=$((ones + 1))
    devmem $((bar0 + 0x100)) 32 0
    i=$((i + 1))
done
echo "L2-VAL undecoded-reads $ones of 200 all ones"
wb 4 $((cmd | 6))
echo "L2-VAL status-after $(devmem $((bar0 + 8)) 32)"
echo $dev >/sys/bus/pci/drivers/e1000e/bind
echo "L2-VAL ping-after $(up_and_ping)"
echo "L2-VAL hostile-done"
# L1 ends the vmm with SIGTERM from here.
sleep 600
"#;

fn num(s: &str) -> u64 {
    s.trim()
        .parse()
        .unwrap_or_else(|_| panic!("not a count: {s:?}"))
}

#[test]
fn msi_and_msix_at_once_and_a_bar_without_decode_leave_the_vmm_serving() {
    let run = Scenario::new("lab_vfio_hostile", L1)
        .l2_script(L2)
        .timeout(Duration::from_secs(1500))
        .run_ok();
    run.assert_ok("bind");
    assert!(run.require("L2-VAL driver-bound").starts_with("0000:"));
    let full = "20 packets transmitted, 20 packets received, 0% packet loss";
    assert!(run.require("L2-VAL ping-before").starts_with(full));
    // The second of MSI and MSI-X is refused, whichever it is, and reads back disabled.
    assert_eq!(run.require("L2-VAL msi-then-msix"), "1 0");
    assert_eq!(run.require("L2-VAL msix-then-msi"), "0 1");
    assert_eq!(run.require("L2-VAL both-off"), "0 0");
    // Memory decoding off: reads float (and did not end the VM), on again: the device.
    assert_eq!(run.require("L2-VAL undecoded-reads"), "200 of 200 all ones");
    assert_ne!(run.require("L2-VAL status-after"), "0xFFFFFFFF");
    // The device works again once the driver is back.
    assert!(run.require("L2-VAL ping-after").starts_with(full));
    run.assert_ok("vmm-alive-after-hostile");
    // SIGTERM ends the vmm promptly and cleanly.
    let secs: f64 = run.require("LAB-VAL sigterm-s").parse().unwrap();
    assert!(secs < 2.0, "SIGTERM took {secs} s");
    assert_eq!(run.require("LAB-VAL vmm-rc"), "0");
    // A handful of lines per kind, none from vfio-ioctls' failed region accesses.
    assert!(num(run.require("LAB-VAL log-no-decode")) <= 12);
    assert!(num(run.require("LAB-VAL log-msi-msix")) <= 12);
    assert_eq!(num(run.require("LAB-VAL log-region-failed")), 0);
    assert!(num(run.require("LAB-VAL log-warn-error")) <= 40);
    run.assert_ok("unbind");
}
