//! `vm.counters` against what the guest issued, in the lab: our vmm runs a Linux guest (the
//! cloud kernel) with an in-VMM virtio-blk disk and a vhost-user-blk disk served by our
//! daemon (`--stats-socket`, relayed by the vmm with `stats=`). Both disks sit on
//! device-mapper's delay target in L1 (40 ms a request, on a loop device over a tmpfs file),
//! opened with O_DIRECT, so the time a request spends in the device dominates what the guest
//! measures. The guest writes 50 blocks with a flush, reads 100 blocks four at a time and 204
//! random blocks at queue depth 1 on each disk (`lat`, timing each read), then prints its block layer's own counts
//! (`/sys/block/vdX/stat`); L1 reads `vm.counters` once the guest is idle.
//!
//! Must show: the request counts (reads, writes, flushes) and bytes match the guest's
//! exactly for both disks (the guest's block layer counts its flush, an empty write with
//! PREFLUSH, among its writes too), every queue took notifications and sent interrupts, and the
//! histogram's median bucket holds the guest-side median read latency.

use std::time::Duration;

use backends::stats::Latency;
use serde_json::Value;
use tests::lab::Scenario;

const L1: &str = r#"
. /lab/lib.sh
API=$LAB_TMP/api.sock
remote() { vmm-remote --api-socket $API "$@"; }
# slow NAME LOOP: a 64 MiB disk at /dev/mapper/NAME that delays every request by 40 ms
# (10 jiffies at HZ=250; the lab's L1 timers add 0-20 ms: requests take 40-60 ms, the middle
# of the [32768, 65536) us bucket, where 25 ms gave 25-45 ms, across a bucket boundary).
slow() {
    dd if=/dev/zero of=$LAB_TMP/$1.img bs=1M count=64 2>/dev/null &&
        losetup $2 $LAB_TMP/$1.img &&
        dmsetup create --noudevsync $1 --table "0 131072 delay $2 0 40" &&
        dmsetup mknodes $1 && [ -b /dev/mapper/$1 ]
}
check slow-a slow slowa /dev/loop0
check slow-b slow slowb /dev/loop1
vhost-user-blk --socket-path $LAB_TMP/blk.sock --blk-file /dev/mapper/slowb --direct \
    --stats-socket $LAB_TMP/blk-stats.sock >$LAB_TMP/blk.log 2>&1 &
blk_pid=$!
n=0; while [ ! -S $LAB_TMP/blk-stats.sock ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
t0=$(lab_uptime)
( { vmm --kernel "$L2_KERNEL" --initramfs "$L2_INITRD" --cmdline "$L2_CMDLINE" \
    --cpus 2 --memory 512M --disk path=/dev/mapper/slowa,direct=on,id=disk0 \
    --vhost-user-blk socket=$LAB_TMP/blk.sock,id=vublk,stats=$LAB_TMP/blk-stats.sock \
    --api-socket path=$API </dev/null 2>&1; echo "VMM-RC $?"; } \
    | lab_console "$t0" l2 | tee $LAB_TMP/l2.log ) &
if wait_for $LAB_TMP/l2.log '^L2-VAL quiet' 600; then
    echo "LAB-VAL counters $(remote counters | tr -d '\n')"
else
    echo "LAB-VAL guest-never-quiet"
fi
wait_for $LAB_TMP/l2.log '^VMM-RC' 300
check vmm-exit-0 grep -q '^VMM-RC 0$' $LAB_TMP/l2.log
check l2-exit grep -q '^L2-EXIT 0$' $LAB_TMP/l2.log
check blk-daemon-alive kill -0 $blk_pid
kill $blk_pid
wait $blk_pid 2>/dev/null
dmsetup remove slowa; dmsetup remove slowb
losetup -d /dev/loop0; losetup -d /dev/loop1
lab_finish
"#;

const L2: &str = r#"
for d in vda vdb; do
    dd if=/dev/urandom of=$LAB_TMP/w bs=4k count=50 2>/dev/null
    dd if=$LAB_TMP/w of=/dev/$d bs=4k oflag=direct conv=fsync 2>/dev/null ||
        echo "L2-VAL $d-write-failed"
    # Many in flight at once (completing in any order): four readers of 25 blocks each.
    for k in 0 1 2 3; do
        dd if=/dev/$d of=/dev/null bs=4k count=25 skip=$((k * 100)) iflag=direct 2>/dev/null &
    done
    wait
    lat /dev/$d 200 4 7 >$LAB_TMP/lat-$d.txt 2>&1
    echo "L2-VAL lat-$d $(grep '^LAT-RESULT' $LAB_TMP/lat-$d.txt | cut -d' ' -f2-)"
    echo "L2-VAL stat-$d $(cat /sys/block/$d/stat)"
done
echo "L2-VAL quiet"
# Idle while L1 reads the counters.
sleep 30
"#;

/// The guest's block-layer counts of one disk (`/sys/block/vdX/stat`).
struct GuestStat {
    reads: u64,
    bytes_read: u64,
    writes: u64,
    bytes_written: u64,
    flushes: u64,
}

fn guest_stat(line: &str) -> GuestStat {
    let f: Vec<u64> = line
        .split_whitespace()
        .map(|w| w.parse().expect("a number in /sys/block/vdX/stat"))
        .collect();
    assert!(f.len() >= 17, "stat with flush counts: {line}");
    GuestStat {
        reads: f[0],
        bytes_read: f[2] * 512,
        writes: f[4],
        bytes_written: f[6] * 512,
        flushes: f[15],
    }
}

/// A disk's queues summed: (reads, bytes read, writes, bytes written, flushes, errors,
/// notifications, interrupts) and the merged latency histogram.
fn device_totals(queues: &Value) -> ([u64; 8], Latency) {
    let mut t = [0u64; 8];
    let mut lat = Latency::default();
    let qs = queues.as_array().expect("a queues array");
    assert!(!qs.is_empty());
    for q in qs {
        let keys = [
            "reads",
            "bytes_read",
            "writes",
            "bytes_written",
            "flushes",
            "errors",
            "notifications",
            "interrupts",
        ];
        for (i, k) in keys.iter().enumerate() {
            t[i] += q[*k].as_u64().unwrap_or_else(|| panic!("{k} in {q}"));
        }
        for b in q["latency_us"]["buckets"].as_array().expect("buckets") {
            let lo = b["lo"].as_u64().expect("lo");
            lat.buckets[Latency::bucket_of(lo)] += b["count"].as_u64().expect("count");
        }
    }
    (t, lat)
}

#[test]
fn counters_match_the_guest_for_an_in_vmm_and_a_vhost_user_disk() {
    let run = Scenario::new("lab_counters", L1)
        .l2_script(L2)
        .l2_bin(env!("CARGO_BIN_EXE_lat"))
        .timeout(Duration::from_secs(900))
        .run_ok();
    eprintln!("{}", run.report());
    run.assert_ok("slow-a");
    run.assert_ok("slow-b");
    run.assert_ok("vmm-exit-0");
    run.assert_ok("l2-exit");
    run.assert_ok("blk-daemon-alive");
    let counters: Value = serde_json::from_str(run.require("LAB-VAL counters"))
        .unwrap_or_else(|e| panic!("vm.counters is not JSON: {e}\n{}", run.report()));
    for (dev, queues) in [
        ("vda", &counters["disk0"]["queues"]),
        ("vdb", &counters["vublk"]["backend"]["queues"]),
    ] {
        let g = guest_stat(run.require(&format!("L2-VAL stat-{dev}")));
        let (t, lat) = device_totals(queues);
        let [reads, bytes_read, writes, bytes_written, flushes, errors, notifications, interrupts] =
            t;
        eprintln!(
            "{dev}: guest {} reads {} B, {} writes {} B, {} flushes; device {reads} reads \
             {bytes_read} B, {writes} writes {bytes_written} B, {flushes} flushes, {errors} \
             errors, {notifications} notifications, {interrupts} interrupts",
            g.reads, g.bytes_read, g.writes, g.bytes_written, g.flushes
        );
        assert!(
            g.reads >= 304 && g.writes >= 50 && g.flushes >= 1,
            "{dev}: guest workload ran"
        );
        assert_eq!(reads, g.reads, "{dev}: reads");
        assert_eq!(bytes_read, g.bytes_read, "{dev}: bytes read");
        // The guest's flush (fsync on the device: an empty write with PREFLUSH) is one
        // FLUSH request to the device, and the block layer also counts it as a write.
        assert_eq!(writes, g.writes - g.flushes, "{dev}: writes");
        assert_eq!(bytes_written, g.bytes_written, "{dev}: bytes written");
        assert_eq!(flushes, g.flushes, "{dev}: flushes");
        assert_eq!(errors, 0, "{dev}: errors");
        assert!(
            notifications > 0 && interrupts > 0,
            "{dev}: notifications and interrupts"
        );
        // Every request completed was timed.
        assert_eq!(
            lat.count(),
            reads + writes + flushes,
            "{dev}: latency count"
        );
        let lat_line: Value = serde_json::from_str(run.require(&format!("L2-VAL lat-{dev}")))
            .unwrap_or_else(|e| panic!("{dev}: lat's line is not JSON: {e}"));
        let guest_p50_us = lat_line["p50_ns"].as_u64().expect("p50_ns") / 1000;
        let median = lat.quantile_bucket(0.5).expect("a median");
        let (lo, hi) = Latency::bounds(median);
        eprintln!(
            "{dev}: device median bucket [{lo}, {}) us, guest p50 {guest_p50_us} us",
            hi.map_or("inf".into(), |h| h.to_string())
        );
        assert_eq!(
            Latency::bucket_of(guest_p50_us),
            median,
            "{dev}: the guest's median read ({guest_p50_us} us) is not in the device's \
             median bucket [{lo}, {hi:?}) us"
        );
    }
}
