//! The split-driver model in the lab: our vmm's vhost-user frontends with our daemons, and
//! with a back-end no one here wrote (qemu-storage-daemon).
//!
//! 1. vmm + vhost-user-blk + vhost-user-net: the block and net checks of the in-VMM test (a
//!    host pattern read, a guest pattern written with fsync and found on the image, 100
//!    pings to the daemon's tap, 16 MiB each way over HTTP with sha256); then the blk daemon
//!    is killed with SIGKILL in the middle of guest I/O and restarted: the vmm survives,
//!    reconnects, and a write the guest issues afterwards lands on the image. No queue
//!    notification exits to userspace. Both daemons are still up after the vmm exits.
//!    Then the daemon stays away longer than the vmm's grace period: the guest's write fails
//!    quickly with an I/O error, and once the daemon is back I/O works again.
//! 2. vmm + qemu-storage-daemon --export type=vhost-user-blk: patterns both ways.

use std::time::Duration;

use tests::lab::Scenario;

const L1: &str = r#"
. /lab/lib.sh
mkdir -p /tmp/www
dd if=/dev/zero of=/tmp/a.img bs=1M count=32 2>/dev/null
printf 'HOST-PATTERN-VU-0123456789' | dd of=/tmp/a.img bs=512 seek=100 conv=notrunc 2>/dev/null
start_blk() {
    vhost-user-blk --socket-path /tmp/blk.sock --blk-file /tmp/a.img >>/tmp/blk.log 2>&1 &
    echo $! >/tmp/blk.pid
    n=0; while [ ! -S /tmp/blk.sock ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
}
start_blk
# Two queue pairs: the guest (two vCPUs) sets both on the control queue.
vhost-user-net --socket-path /tmp/net.sock --tap vutap0 --queues 2 >/tmp/net.log 2>&1 &
net_pid=$!
n=0; while [ ! -S /tmp/net.sock ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
$IP addr add 192.0.2.1/24 dev vutap0
$IP link set vutap0 up
dd if=/dev/urandom of=/tmp/www/down.bin bs=1M count=16 2>/dev/null
echo "LAB-VAL host-down-sha $(sha256sum /tmp/www/down.bin | cut -d' ' -f1)"
httpd -p 192.0.2.1:8080 -h /tmp/www
(
    n=0
    until wget -q -O /tmp/up.bin http://192.0.2.2:8080/up.bin 2>/dev/null || [ $n -ge 600 ]; do
        sleep 1; n=$((n + 1))
    done
    echo "LAB-VAL host-up-sha $(sha256sum /tmp/up.bin | cut -d' ' -f1)"
    touch /tmp/www/up-done
    # Kill the blk daemon while the guest writes, then bring it back.
    n=0; until grep -q 'L2-VAL io-started' /tmp/l2.log || [ $n -ge 600 ]; do sleep 0.2; n=$((n + 1)); done
    sleep 1
    kill -9 "$(cat /tmp/blk.pid)"
    echo "LAB-VAL blk-daemon-killed"
    sleep 2
    start_blk
    echo "LAB-VAL blk-daemon-restarted"
    touch /tmp/www/restarted
    # A long outage: the vmm fails the guest's requests after its grace period, then the
    # daemon comes back.
    n=0; until grep -q 'L2-VAL outage-ready' /tmp/l2.log || [ $n -ge 600 ]; do sleep 0.2; n=$((n + 1)); done
    kill -9 "$(cat /tmp/blk.pid)"
    sleep 12
    touch /tmp/www/down-long
    n=0; until grep -q 'L2-VAL outage-write' /tmp/l2.log || [ $n -ge 600 ]; do sleep 0.2; n=$((n + 1)); done
    start_blk
    # The guest's next write must find the vmm reconnected, not still failing requests.
    n=0; until [ "$(grep -c 'vublk: reconnected' /tmp/l2.log)" -ge 2 ] || [ $n -ge 300 ]; do sleep 0.1; n=$((n + 1)); done
    touch /tmp/www/back
) &
watcher=$!
t0=$(lab_uptime)
{ vmm --kernel "$L2_KERNEL" --initramfs "$L2_INITRD" --cmdline "$L2_CMDLINE" --cpus 2 --memory 512M \
    --vhost-user-blk socket=/tmp/blk.sock,id=vublk --vhost-user-net socket=/tmp/net.sock,queues=2,id=vunet \
    --exit-stats /tmp/stats.json </dev/null 2>&1; echo "VMM-RC $?"; } \
    | lab_console "$t0" l2 | tee /tmp/l2.log
wait "$watcher"
check vmm-exit-0 grep -q '^VMM-RC 0$' /tmp/l2.log
check l2-exit grep -q '^L2-EXIT 0$' /tmp/l2.log
check vmm-reconnected grep -q 'vublk: reconnected' /tmp/l2.log
check guest-pattern-on-image [ "$(dd if=/tmp/a.img bs=512 skip=200 count=1 2>/dev/null | head -c 22)" = "GUEST-PATTERN-VU-fedcb" ]
check after-outage-on-image [ "$(dd if=/tmp/a.img bs=512 skip=400 count=1 2>/dev/null | head -c 12)" = "AFTER-OUTAGE" ]
check vmm-failed-requests grep -q 'vublk: vhost-user back-end /tmp/blk.sock died and is still away' /tmp/l2.log
check after-restart-on-image [ "$(dd if=/tmp/a.img bs=512 skip=300 count=1 2>/dev/null | head -c 13)" = "AFTER-RESTART" ]
check blk-daemon-alive kill -0 "$(cat /tmp/blk.pid)"
check net-daemon-alive kill -0 "$net_pid"
echo "LAB-VAL exit-stats $(cat /tmp/stats.json)"
check no-notify-exits grep -q '"notify_exits":{"vublk":0,"vunet":0}' /tmp/stats.json
kill "$(cat /tmp/blk.pid)" "$net_pid"
sleep 1
check daemons-removed-sockets [ ! -e /tmp/blk.sock ] && [ ! -e /tmp/net.sock ]

# 2. A back-end no one here wrote.
dd if=/dev/zero of=/tmp/q.img bs=1M count=16 2>/dev/null
printf 'HOST-PATTERN-VU-0123456789' | dd of=/tmp/q.img bs=512 seek=100 conv=notrunc 2>/dev/null
qemu-storage-daemon --blockdev driver=file,node-name=f0,filename=/tmp/q.img \
    --export type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=/tmp/qsd.sock,writable=on \
    >/tmp/qsd.log 2>&1 &
qsd_pid=$!
n=0; while [ ! -S /tmp/qsd.sock ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
echo "L2-MODE qsd" >/tmp/www/mode
{ vmm --kernel "$L2_KERNEL" --initramfs "$L2_INITRD" --cmdline "$L2_CMDLINE qsd=1" --memory 512M \
    --vhost-user-blk socket=/tmp/qsd.sock,id=qsd </dev/null 2>&1; echo "VMM-RC $?"; } \
    | lab_console "$(lab_uptime)" l2qsd | tee /tmp/l2q.log
check qsd-vmm-exit-0 grep -q '^VMM-RC 0$' /tmp/l2q.log
check qsd-guest-pattern [ "$(dd if=/tmp/q.img bs=512 skip=200 count=1 2>/dev/null | head -c 22)" = "GUEST-PATTERN-VU-fedcb" ]
kill "$qsd_pid"
$IP link del vutap0 2>/dev/null
lab_finish
"#;

const L2: &str = r#"
echo "L2-VAL host-pattern $(dd if=/dev/vda bs=512 skip=100 count=1 2>/dev/null | head -c 26)"
printf 'GUEST-PATTERN-VU-fedcba' | dd of=/dev/vda bs=512 seek=200 conv=fsync 2>/dev/null && echo "L2-VAL write ok"
if grep -q qsd=1 /proc/cmdline; then exit 0; fi
ip link set eth0 up
ip addr add 192.0.2.2/24 dev eth0
ping -c 100 -i 0.02 -W 2 192.0.2.1 > /tmp/ping.txt 2>&1
echo "L2-VAL ping $(grep 'packets transmitted' /tmp/ping.txt)"
mkdir -p /tmp/www
dd if=/dev/urandom of=/tmp/up.tmp bs=1M count=16 2>/dev/null
echo "L2-VAL guest-up-sha $(sha256sum /tmp/up.tmp | cut -d' ' -f1)"
mv /tmp/up.tmp /tmp/www/up.bin
httpd -p 192.0.2.2:8080 -h /tmp/www
wget -q -O /tmp/down.bin http://192.0.2.1:8080/down.bin
echo "L2-VAL guest-down-sha $(sha256sum /tmp/down.bin | cut -d' ' -f1)"
rm -f /tmp/down.bin
n=0; until wget -q -O /dev/null http://192.0.2.1:8080/up-done 2>/dev/null || [ $n -ge 600 ]; do sleep 1; n=$((n + 1)); done
# Guest I/O while the daemon is killed and restarted.
echo "L2-VAL io-started"
i=0; ok=0; bad=0
while [ $i -lt 400 ]; do
    if dd if=/dev/urandom of=/dev/vda bs=4k count=4 seek=$((i * 4 + 256)) oflag=direct 2>/dev/null; then ok=$((ok + 1)); else bad=$((bad + 1)); fi
    i=$((i + 1))
    if [ $i -ge 100 ] && wget -q -O /dev/null http://192.0.2.1:8080/restarted 2>/dev/null; then break; fi
done
echo "L2-VAL io-during-kill ok=$ok failed=$bad"
t=$(cut -d' ' -f1 /proc/uptime)
printf 'AFTER-RESTART' | dd of=/dev/vda bs=512 seek=300 conv=fsync 2>/dev/null && echo "L2-VAL after-restart ok"
echo "L2-VAL after-restart-seconds $(awk -v t=$t '{ print $1 - t }' /proc/uptime)"
# The daemon stays away longer than the vmm's grace period: a write fails quickly.
echo "L2-VAL outage-ready"
n=0; until wget -q -O /dev/null http://192.0.2.1:8080/down-long 2>/dev/null || [ $n -ge 600 ]; do sleep 0.5; n=$((n + 1)); done
t=$(cut -d' ' -f1 /proc/uptime)
if dd if=/dev/zero of=/dev/vda bs=4k count=1 seek=6000 oflag=direct 2>/dev/null; then r=ok; else r=failed; fi
echo "L2-VAL outage-write $r"
echo "L2-VAL outage-write-seconds $(awk -v t=$t '{ print $1 - t }' /proc/uptime)"
n=0; until wget -q -O /dev/null http://192.0.2.1:8080/back 2>/dev/null || [ $n -ge 600 ]; do sleep 0.5; n=$((n + 1)); done
printf 'AFTER-OUTAGE' | dd of=/dev/vda bs=512 seek=400 conv=fsync 2>/dev/null && echo "L2-VAL after-outage ok"
dmesg | grep -iE "blk_update_request|I/O error|timeout" | tail -3 | sed 's/^/L2-DMESG /'
"#;

#[test]
fn vhost_user_daemons_and_qemu_storage_daemon() {
    let run = Scenario::new("lab_vhost_user", L1)
        .l2_script(L2)
        .bin("/usr/bin/qemu-storage-daemon")
        .timeout(Duration::from_secs(900))
        .run_ok();
    run.assert_ok("vmm-exit-0");
    run.assert_ok("l2-exit");
    assert_eq!(
        run.require("L2-VAL host-pattern"),
        "HOST-PATTERN-VU-0123456789"
    );
    run.assert_ok("guest-pattern-on-image");
    run.assert_ping_and_transfers();
    run.assert_ok("vmm-reconnected");
    assert_eq!(run.require("L2-VAL after-restart"), "ok");
    run.assert_ok("after-restart-on-image");
    // A long outage: after the grace period the guest's write fails (an I/O error, not
    // a hang until the guest's own timeout), and I/O works again once the daemon is back.
    assert_eq!(run.require("L2-VAL outage-write"), "failed");
    let secs: f64 = run
        .require("L2-VAL outage-write-seconds")
        .parse()
        .unwrap_or(f64::MAX);
    assert!(secs < 10.0, "the failing write took {secs} s");
    run.assert_ok("vmm-failed-requests");
    assert_eq!(run.require("L2-VAL after-outage"), "ok");
    run.assert_ok("after-outage-on-image");
    run.assert_ok("blk-daemon-alive");
    run.assert_ok("net-daemon-alive");
    run.assert_ok("no-notify-exits");
    run.assert_ok("daemons-removed-sockets");
    eprintln!(
        "guest I/O across the daemon kill: {}; first write after the restart took {} s",
        run.require("L2-VAL io-during-kill"),
        run.require("L2-VAL after-restart-seconds")
    );
    run.assert_ok("qsd-vmm-exit-0");
    run.assert_ok("qsd-guest-pattern");
}
