//! The hypervisor-direct model in the lab: our vmm's in-VMM virtio-blk and virtio-net with a
//! Linux guest (Debian's cloud kernel and its virtio modules), inside L1.
//!
//! - blk: the guest reads a pattern the host wrote to disk A, writes another with fsync, and
//!   after the vmm exits the image holds it; disk B is read-only and refuses writes; both
//!   disks are present at once.
//! - net: the guest pings the tap's address in L1 (192.0.2.1) 100 times with no loss, and a
//!   64 MiB TCP transfer each way arrives intact (sha256).
//! - exits: no queue notification reached userspace (every doorbell on an ioeventfd).

use std::time::Duration;

use tests::lab::Scenario;

const L1: &str = r#"
. /lab/lib.sh
dd if=/dev/zero of=/tmp/a.img bs=1M count=32 2>/dev/null
printf 'HOST-PATTERN-A-0123456789abcdef' | dd of=/tmp/a.img bs=512 seek=100 conv=notrunc 2>/dev/null
dd if=/dev/zero of=/tmp/b.img bs=1M count=8 2>/dev/null
printf 'HOST-PATTERN-B' | dd of=/tmp/b.img conv=notrunc 2>/dev/null
sha_b=$(sha256sum /tmp/b.img | cut -d' ' -f1)
# Two queue pairs (the guest's two vCPUs use both): a multi-queue tap.
$IP tuntap add dev vmtap0 mode tap vnet_hdr multi_queue
$IP addr add 192.0.2.1/24 dev vmtap0
$IP link set vmtap0 up
# 64 MiB each way over HTTP (busybox httpd/wget): the guest downloads the host's file, then
# the host downloads the guest's; /done tells the guest the host is finished.
mkdir -p /tmp/www
dd if=/dev/urandom of=/tmp/www/down.bin bs=1M count=64 2>/dev/null
echo "LAB-VAL host-down-sha $(sha256sum /tmp/www/down.bin | cut -d' ' -f1)"
httpd -p 192.0.2.1:8080 -h /tmp/www
(
    n=0
    until wget -q -O /tmp/up.bin http://192.0.2.2:8080/up.bin 2>/dev/null || [ $n -ge 600 ]; do
        sleep 1; n=$((n + 1))
    done
    echo "LAB-VAL host-up-sha $(sha256sum /tmp/up.bin | cut -d' ' -f1)"
    rm -f /tmp/up.bin
    touch /tmp/www/done
) &
t0=$(lab_uptime)
{ vmm --kernel "$L2_KERNEL" --initramfs "$L2_INITRD" --cmdline "$L2_CMDLINE" \
    --cpus 2 --memory 512M \
    --disk path=/tmp/a.img,id=diska --disk path=/tmp/b.img,readonly=on,id=diskb \
    --net tap=vmtap0,mac=52:54:00:00:00:02,queues=2,id=net0 \
    --exit-stats /tmp/stats.json </dev/null 2>&1; echo "VMM-RC $?"; } \
    | lab_console "$t0" l2 | tee /tmp/l2.log
check vmm-exit-0 grep -q '^VMM-RC 0$' /tmp/l2.log
check l2-exit grep -q '^L2-EXIT 0$' /tmp/l2.log
check guest-pattern-on-image [ "$(dd if=/tmp/a.img bs=512 skip=200 count=1 2>/dev/null | head -c 26)" = "GUEST-PATTERN-A-fedcba9876" ]
check readonly-image-unchanged [ "$(sha256sum /tmp/b.img | cut -d' ' -f1)" = "$sha_b" ]
echo "LAB-VAL exit-stats $(cat /tmp/stats.json)"
check no-notify-exits grep -q '"notify_exits":{"diska":0,"diskb":0,"net0":0}' /tmp/stats.json
$IP link del vmtap0
lab_finish
"#;

const L2: &str = r#"
echo "L2-VAL disks $(ls /sys/block | grep vd | tr '\n' ' ')"
echo "L2-VAL host-pattern $(dd if=/dev/vda bs=512 skip=100 count=1 2>/dev/null | head -c 30)"
printf 'GUEST-PATTERN-A-fedcba9876' | dd of=/dev/vda bs=512 seek=200 conv=fsync 2>/dev/null && echo "L2-VAL write-a ok"
echo "L2-VAL ro-flag $(cat /sys/block/vdb/ro)"
echo "L2-VAL pattern-b $(dd if=/dev/vdb bs=14 count=1 2>/dev/null)"
if printf 'X' | dd of=/dev/vdb conv=fsync 2>/dev/null; then echo "L2-VAL write-b accepted"; else echo "L2-VAL write-b refused"; fi
ip link set eth0 up
ip addr add 192.0.2.2/24 dev eth0
ping -c 100 -i 0.02 -W 2 192.0.2.1 > /tmp/ping.txt 2>&1
echo "L2-VAL ping $(grep 'packets transmitted' /tmp/ping.txt)"
mkdir -p /tmp/www
dd if=/dev/urandom of=/tmp/up.tmp bs=1M count=64 2>/dev/null
echo "L2-VAL guest-up-sha $(sha256sum /tmp/up.tmp | cut -d' ' -f1)"
mv /tmp/up.tmp /tmp/www/up.bin
httpd -p 192.0.2.2:8080 -h /tmp/www
t=$(cut -d' ' -f1 /proc/uptime)
wget -q -O /tmp/down.bin http://192.0.2.1:8080/down.bin
echo "L2-VAL guest-down-sha $(sha256sum /tmp/down.bin | cut -d' ' -f1)"
echo "L2-VAL down-seconds $(awk -v t=$t '{ print $1 - t }' /proc/uptime)"
rm -f /tmp/down.bin
n=0
until wget -q -O /dev/null http://192.0.2.1:8080/done 2>/dev/null || [ $n -ge 600 ]; do
    sleep 1; n=$((n + 1))
done
"#;

#[test]
fn in_vmm_virtio_blk_and_net() {
    let run = Scenario::new("lab_virtio", L1)
        .l2_script(L2)
        .timeout(Duration::from_secs(900))
        .run_ok();
    run.assert_ok("vmm-exit-0");
    run.assert_ok("l2-exit");
    assert_eq!(run.require("L2-VAL disks").trim(), "vda vdb");
    assert_eq!(
        run.require("L2-VAL host-pattern"),
        "HOST-PATTERN-A-0123456789abcdef"[..30].to_string()
    );
    assert_eq!(run.require("L2-VAL write-a"), "ok");
    run.assert_ok("guest-pattern-on-image");
    assert_eq!(run.require("L2-VAL ro-flag"), "1");
    assert_eq!(run.require("L2-VAL pattern-b"), "HOST-PATTERN-B");
    assert_eq!(run.require("L2-VAL write-b"), "refused");
    run.assert_ok("readonly-image-unchanged");
    run.assert_ping_and_transfers();
    run.assert_ok("no-notify-exits");
}
