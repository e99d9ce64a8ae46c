//! The split driver with the roles of the socket swapped, in the lab: our vmm listens
//! (`--vhost-user-blk socket=P,server=on`, likewise net; QEMU's spelling) and our daemons
//! connect to it (`--connect P`), as DPDK's vhost-user client mode and
//! `vhost-user-backend`'s `start_client` back-ends do.
//!
//! The daemons start first and retry until the vmm listens; the vmm's boot waits for both.
//! The guest reads a host pattern and writes its own (found on the image in L1), pings the
//! net daemon's tap 50 times; then the blk daemon is SIGKILLed in the middle of guest I/O
//! and started again with `--connect`: it reconnects to the listening vmm, which resumes
//! the queues (from the inflight region the daemon offers), and a write the guest issues
//! afterwards lands on the image. Both daemons are still up after the vmm exits, and the
//! vmm removed its sockets.

use std::time::Duration;

use tests::lab::Scenario;

const L1: &str = r#"
. /lab/lib.sh
mkdir -p /tmp/www
dd if=/dev/zero of=/tmp/a.img bs=1M count=32 2>/dev/null
printf 'HOST-PATTERN-SRV-0123456789' | dd of=/tmp/a.img bs=512 seek=100 conv=notrunc 2>/dev/null
start_blk() {
    vhost-user-blk --connect /tmp/blk.sock --blk-file /tmp/a.img >>/tmp/blk.log 2>&1 &
    echo $! >/tmp/blk.pid
}
start_blk
vhost-user-net --connect /tmp/net.sock --tap vutap0 >/tmp/net.log 2>&1 &
net_pid=$!
n=0; until $IP link show vutap0 >/dev/null 2>&1 || [ $n -ge 100 ]; do sleep 0.1; n=$((n + 1)); done
$IP addr add 192.0.2.1/24 dev vutap0
$IP link set vutap0 up
httpd -p 192.0.2.1:8080 -h /tmp/www
(
    n=0; until grep -q 'L2-VAL io-started' /tmp/l2.log 2>/dev/null || [ $n -ge 1500 ]; do sleep 0.2; n=$((n + 1)); done
    sleep 1
    kill -9 "$(cat /tmp/blk.pid)"
    echo "LAB-VAL blk-daemon-killed"
    sleep 1
    start_blk
    echo "LAB-VAL blk-daemon-restarted"
    touch /tmp/www/restarted
) &
watcher=$!
t0=$(lab_uptime)
{ vmm --kernel "$L2_KERNEL" --initramfs "$L2_INITRD" --cmdline "$L2_CMDLINE" --cpus 2 --memory 512M \
    --vhost-user-blk socket=/tmp/blk.sock,server=on,connect_timeout_ms=30000,id=vublk \
    --vhost-user-net socket=/tmp/net.sock,server=on,connect_timeout_ms=30000,id=vunet \
    </dev/null 2>&1; echo "VMM-RC $?"; } \
    | lab_console "$t0" l2 | tee /tmp/l2.log
wait "$watcher"
check vmm-exit-0 grep -q '^VMM-RC 0$' /tmp/l2.log
check l2-exit grep -q '^L2-EXIT 0$' /tmp/l2.log
check vmm-reconnected grep -q 'vublk: reconnected' /tmp/l2.log
check daemon-reconnected [ "$(grep -c 'frontend connected' /tmp/blk.log)" -ge 2 ]
check guest-pattern-on-image [ "$(dd if=/tmp/a.img bs=512 skip=200 count=1 2>/dev/null | head -c 22)" = "GUEST-PATTERN-SRV-fedc" ]
check after-restart-on-image [ "$(dd if=/tmp/a.img bs=512 skip=300 count=1 2>/dev/null | head -c 13)" = "AFTER-RESTART" ]
check vmm-removed-sockets [ ! -e /tmp/blk.sock ] && [ ! -e /tmp/net.sock ]
check blk-daemon-alive kill -0 "$(cat /tmp/blk.pid)"
check net-daemon-alive kill -0 "$net_pid"
grep -E 'inflight|resumed|reconnect' /tmp/blk.log | tail -5 | sed 's/^/LAB-LOG blk: /'
kill "$(cat /tmp/blk.pid)" "$net_pid"
sleep 1
$IP link del vutap0 2>/dev/null
lab_finish
"#;

const L2: &str = r#"
echo "L2-VAL host-pattern $(dd if=/dev/vda bs=512 skip=100 count=1 2>/dev/null | head -c 27)"
printf 'GUEST-PATTERN-SRV-fedcba' | dd of=/dev/vda bs=512 seek=200 conv=fsync 2>/dev/null && echo "L2-VAL write ok"
ip link set eth0 up
ip addr add 192.0.2.2/24 dev eth0
ping -c 50 -i 0.02 -W 2 192.0.2.1 > /tmp/ping.txt 2>&1
echo "L2-VAL ping $(grep 'packets transmitted' /tmp/ping.txt)"
echo "L2-VAL io-started"
i=0; ok=0; bad=0
while [ $i -lt 400 ]; do
    if dd if=/dev/urandom of=/dev/vda bs=4k count=4 seek=$((i * 4 + 256)) oflag=direct 2>/dev/null; then ok=$((ok + 1)); else bad=$((bad + 1)); fi
    i=$((i + 1))
    if [ $i -ge 50 ] && wget -q -O /dev/null http://192.0.2.1:8080/restarted 2>/dev/null; then break; fi
done
echo "L2-VAL io-during-kill ok=$ok failed=$bad"
printf 'AFTER-RESTART' | dd of=/dev/vda bs=512 seek=300 conv=fsync 2>/dev/null && echo "L2-VAL after-restart ok"
dmesg | grep -iE "blk_update_request|I/O error|not a head|hung task" | tail -3 | sed 's/^/L2-DMESG /'
"#;

#[test]
fn the_vmm_listens_and_our_daemons_connect_and_reconnect() {
    let run = Scenario::new("lab_vhost_user_server", L1)
        .l2_script(L2)
        .timeout(Duration::from_secs(600))
        .run_ok();
    run.assert_ok("vmm-exit-0");
    run.assert_ok("l2-exit");
    assert_eq!(
        run.require("L2-VAL host-pattern"),
        "HOST-PATTERN-SRV-0123456789"
    );
    assert_eq!(run.require("L2-VAL write"), "ok");
    run.assert_ok("guest-pattern-on-image");
    let ping = run.require("L2-VAL ping");
    assert!(
        ping.starts_with("50 packets transmitted, 50 packets received, 0% packet loss"),
        "{ping}"
    );
    run.assert_ok("vmm-reconnected");
    run.assert_ok("daemon-reconnected");
    assert_eq!(run.require("L2-VAL after-restart"), "ok");
    run.assert_ok("after-restart-on-image");
    run.assert_ok("vmm-removed-sockets");
    run.assert_ok("blk-daemon-alive");
    run.assert_ok("net-daemon-alive");
    eprintln!(
        "guest I/O across the daemon kill: {}",
        run.require("L2-VAL io-during-kill")
    );
    assert!(
        run.field("L2-DMESG").is_none(),
        "the guest logged I/O trouble: {:?}",
        run.field("L2-DMESG")
    );
}
