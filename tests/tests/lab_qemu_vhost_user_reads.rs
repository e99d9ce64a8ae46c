//! The zero reads of issue #19 the way users run QEMU: QEMU + KVM inside the lab's L1 as
//! the frontend (`vhost-user-blk-pci` with its default 128-entry queue, guest RAM in a shared
//! memfd) and our `vhost-user-blk` as the back-end, on an image whose first 8 MiB are random
//! and were there before the daemon started. The guest reads them through several request
//! sizes, buffered (cold) and O_DIRECT, and prints an md5 per range; L1 computes the same
//! from the image file. Before the fix the 1 MiB reads came back as zeros with status OK:
//! the daemon advertised `seg_max` 254 and refused the guest's longer-than-128 chains,
//! writing the error into a data page (`tests/tests/qemu_vhost_user_reads.rs` has the
//! direct version, 20 boots per QEMU version).

use std::time::Duration;

use tests::lab::Scenario;

/// (name, first 4 KiB block, blocks, dd block size, O_DIRECT)
const RANGES: [(&str, u32, u32, &str, bool); 6] = [
    ("first-mib-buffered", 0, 256, "1M", false),
    ("mib1-direct-1m", 256, 256, "1M", true),
    ("mib2-direct-256k", 512, 512, "256k", true),
    ("mib4-direct-64k", 1024, 256, "64k", true),
    ("mib5-direct-4k", 1280, 256, "4k", true),
    ("mib6-buffered-128k", 1536, 512, "128k", false),
];

fn dd_count(blocks: u32, bs: &str) -> u32 {
    let kib: u32 = bs
        .trim_end_matches(['k', 'M'])
        .parse::<u32>()
        .expect("block size")
        * if bs.ends_with('M') { 1024 } else { 1 };
    blocks * 4 / kib
}

fn l1_script() -> String {
    let mut md5s = String::new();
    for (name, first, blocks, _, _) in RANGES {
        md5s.push_str(&format!(
            "echo \"LAB-VAL md5-{name} $(dd if=/tmp/r.img bs=4k skip={first} count={blocks} 2>/dev/null | md5sum | cut -d' ' -f1)\"\n"
        ));
    }
    format!(
        r#"
. /lab/lib.sh
dd if=/dev/zero of=/tmp/r.img bs=1M count=64 2>/dev/null
dd if=/dev/urandom of=/tmp/r.img bs=1M count=8 conv=notrunc 2>/dev/null
sync
{md5s}
vhost-user-blk --socket-path /tmp/blk.sock --blk-file /tmp/r.img >/tmp/blk.log 2>&1 &
blk_pid=$!
n=0; while [ ! -S /tmp/blk.sock ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
t0=$(lab_uptime)
l2_qemu -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
    -chardev socket,id=c0,path=/tmp/blk.sock -device vhost-user-blk-pci,chardev=c0 2>&1 \
    | lab_console "$t0" l2 | tee /tmp/l2.log
check l2-exit grep -q '^L2-EXIT 0$' /tmp/l2.log
check daemon-alive kill -0 "$blk_pid"
grep -E 'refused|longer than' /tmp/blk.log | head -3 | sed 's/^/LAB-LOG blk: /'
kill "$blk_pid"
lab_finish
"#
    )
}

fn l2_script() -> String {
    let mut s =
        String::from("echo \"L2-VAL max-segments $(cat /sys/block/vda/queue/max_segments)\"\n");
    for (name, first, blocks, bs, direct) in RANGES {
        let count = dd_count(blocks, bs);
        let kib: u32 = if bs.ends_with('M') {
            1024
        } else {
            bs.trim_end_matches('k').parse().expect("bs")
        };
        let skip = first * 4 / kib;
        let flag = if direct { " iflag=direct" } else { "" };
        s.push_str(&format!(
            "echo \"L2-VAL md5-{name} $(dd if=/dev/vda bs={bs} skip={skip} count={count}{flag} 2>/dev/null | md5sum | cut -d' ' -f1)\"\n"
        ));
    }
    s.push_str("dmesg | grep -iE 'I/O error|not a head' | tail -3 | sed 's/^/L2-DMESG /'\n");
    s
}

#[test]
fn qemu_kvm_frontend_reads_pre_existing_data_right_through_our_daemon() {
    let run = Scenario::new("lab_qemu_vhost_user_reads", &l1_script())
        .l2_script(&l2_script())
        .with_qemu()
        .timeout(Duration::from_secs(420))
        .run_ok();
    run.assert_ok("l2-exit");
    run.assert_ok("daemon-alive");
    eprintln!(
        "guest max_segments {} (the daemon's seg_max, above QEMU's 128 queue entries)",
        run.require("L2-VAL max-segments")
    );
    let mut wrong = Vec::new();
    for (name, ..) in RANGES {
        let want = run.require(&format!("LAB-VAL md5-{name}"));
        let got = run.require(&format!("L2-VAL md5-{name}"));
        if want != got {
            wrong.push(format!("{name}: guest {got}, image {want}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "reads of pre-existing data came back wrong: {wrong:?}\n{}",
        run.report()
    );
    assert!(
        run.field("L2-DMESG").is_none(),
        "the guest logged I/O trouble: {:?}",
        run.field("L2-DMESG")
    );
}
