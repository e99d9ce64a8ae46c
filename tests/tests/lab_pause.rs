//! `vm.pause` / `vm.resume` around guest I/O in the lab: our vmm runs a Linux guest (the cloud
//! kernel) whose script keeps several requests in flight on two disks (an in-VMM virtio-blk
//! and a vhost-user-blk served by our daemon: per disk two writers that read each block
//! back, and a reader of 1 MiB direct reads) while printing ticks on its console; L1
//! pauses and resumes it 100 times through `vmm-remote`. While paused (looked at every
//! tenth time), the guest's clock-driven work stops: no console output and no exit counter
//! moves between two looks 0.3 s apart; after each resume the guest goes on, and at the end
//! every block it wrote read back as written, with no I/O error, hung task or RCU stall in
//! its log. One last pause lasts 5 s: the guest's clock stops with it (its uptime moves by
//! less than L1's around the pause by most of those 5 s).

use std::time::Duration;

use tests::lab::Scenario;

const L1: &str = r#"
. /lab/lib.sh
API=$LAB_TMP/api.sock
remote() { vmm-remote --api-socket $API "$@"; }
exits() { remote counters 2>/dev/null | awk '/"exits":/ { gsub(/[^0-9]/, "", $2); print $2; exit }'; }
dd if=/dev/zero of=$LAB_TMP/a.img bs=1M count=72 2>/dev/null
dd if=/dev/zero of=$LAB_TMP/u.img bs=1M count=40 2>/dev/null
vhost-user-blk --socket-path $LAB_TMP/blk.sock --blk-file $LAB_TMP/u.img >$LAB_TMP/blk.log 2>&1 &
blk_pid=$!
n=0; while [ ! -S $LAB_TMP/blk.sock ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
t0=$(lab_uptime)
( { vmm --kernel "$L2_KERNEL" --initramfs "$L2_INITRD" --cmdline "$L2_CMDLINE" \
    --cpus 2 --memory 512M --disk path=$LAB_TMP/a.img,id=disk0 --api-socket path=$API \
    --vhost-user-blk socket=$LAB_TMP/blk.sock,id=vublk \
    </dev/null 2>&1; echo "VMM-RC $?"; } | lab_console "$t0" l2 | tee $LAB_TMP/l2.log ) &
if wait_for $LAB_TMP/l2.log '^L2-VAL io-loop-started' 300; then
    # Every tenth cycle looks: no console output and no exit between two looks 0.3 s apart,
    # and vm.info says Paused (each vmm-remote costs L1 a process start under TCG); the others
    # pause and resume at once.
    moved_out=0 moved_exits=0 failed=0 looked=0 i=1
    while [ $i -le 100 ]; do
        if ! remote pause >/dev/null 2>$LAB_TMP/p.err; then
            failed=$((failed + 1)); echo "LAB-VAL pause-$i-failed $(cat $LAB_TMP/p.err)"
        fi
        if [ $((i % 10)) = 0 ]; then
            sleep 0.1
            s1=$(wc -c <$LAB_TMP/l2.log); e1=$(exits)
            sleep 0.3
            s2=$(wc -c <$LAB_TMP/l2.log); e2=$(exits)
            [ "$s1" = "$s2" ] || moved_out=$((moved_out + 1))
            [ "$e1" = "$e2" ] || moved_exits=$((moved_exits + 1))
            remote info | grep -q '"state": "Paused"' || echo "LAB-VAL pause-$i-not-shown"
            looked=$((looked + 1))
        fi
        if ! remote resume >/dev/null 2>$LAB_TMP/p.err; then
            failed=$((failed + 1)); echo "LAB-VAL resume-$i-failed $(cat $LAB_TMP/p.err)"
        fi
        sleep 0.1
        i=$((i + 1))
    done
    echo "LAB-VAL paused-looks $looked"
    echo "LAB-VAL cycles-failed $failed"
    echo "LAB-VAL paused-with-console-output $moved_out"
    echo "LAB-VAL paused-with-exits $moved_exits"
    # One long pause (5 s): the guest's clock stops with it (kvmclock kept across), so the
    # guest's uptime moves by less than L1's around it.
    up() { grep '^L2-UP ' $LAB_TMP/l2.log | tail -n1 | cut -d' ' -f2; }
    u1=$(up) t1=$(lab_uptime)
    remote pause >/dev/null && sleep 5 && remote resume >/dev/null
    sleep 2
    u2=$(up) t2=$(lab_uptime)
    echo "LAB-VAL long-pause-host-s $(awk "BEGIN { print $t2 - $t1 }")"
    echo "LAB-VAL long-pause-guest-s $(awk "BEGIN { print $u2 - $u1 }")"
    # The guest's loop stops when it finds this at 64 MiB.
    printf 'STOP' | dd of=$LAB_TMP/a.img bs=64k seek=1024 conv=notrunc 2>/dev/null
    remote info | grep -q '"state": "Running"' && echo "LAB-VAL running-after"
else
    echo "LAB-VAL guest-never-ready"
fi
wait_for $LAB_TMP/l2.log '^VMM-RC' 300
check vmm-exit-0 grep -q '^VMM-RC 0$' $LAB_TMP/l2.log
check l2-exit grep -q '^L2-EXIT 0$' $LAB_TMP/l2.log
check blk-daemon-alive kill -0 $blk_pid
kill $blk_pid
lab_finish
"#;

const L2: &str = r#"
# Several requests in flight on each disk when a pause comes: per disk two writers, each
# writing numbered 64 KiB blocks in its own range and reading each back (direct I/O), and a
# reader streaming 1 MiB direct reads. Everything runs until L1 is done with its cycles (it
# writes STOP at 64 MiB of vda; at most 15 minutes); a tick on the console every pass.
end=$(( $(cut -d. -f1 /proc/uptime) + 900 ))
going() {
    [ "$(cut -d. -f1 /proc/uptime)" -lt $end ] &&
        [ "$(dd if=/dev/vda bs=64k skip=1024 count=1 iflag=direct 2>/dev/null | head -c 4)" != STOP ]
}
# writer DEV FIRST-BLOCK: blocks FIRST..FIRST+255, round and round.
writer() {
    pass=0 bad=0
    while going; do
        b=$(($2 + pass % 256))
        tag=$(printf '%s-%04d-%08d-' $1 $2 $pass)
        printf '%s' "$tag" | dd of=$LAB_TMP/blk-$1-$2 bs=64k conv=sync 2>/dev/null
        dd if=$LAB_TMP/blk-$1-$2 of=/dev/$1 bs=64k seek=$b oflag=direct conv=notrunc 2>/dev/null || bad=$((bad + 1))
        got=$(dd if=/dev/$1 bs=64k skip=$b count=1 iflag=direct 2>/dev/null | head -c ${#tag})
        [ "$got" = "$tag" ] || bad=$((bad + 1))
        pass=$((pass + 1))
        echo "tick $1 $2 $pass"
    done
    echo "$pass $bad" >$LAB_TMP/res-$1-$2
}
reader() {
    while going; do
        dd if=/dev/$1 of=/dev/null bs=1M count=16 iflag=direct 2>/dev/null || echo 1 >>$LAB_TMP/read-errors
    done
}
echo "L2-VAL io-loop-started"
# The guest's clock, twice a second (L1 compares it with its own around a long pause).
( while going; do echo "L2-UP $(cut -d' ' -f1 /proc/uptime)"; sleep 0.5; done ) &
for d in vda vdb; do
    writer $d 0 &
    writer $d 256 &
    reader $d &
done
wait
passes=0 bad=0
for f in $LAB_TMP/res-*; do
    read -r p b <$f
    passes=$((passes + p)) bad=$((bad + b))
done
echo "L2-VAL writers $(ls $LAB_TMP/res-* | wc -l)"
echo "L2-VAL passes $passes"
echo "L2-VAL mismatches $bad"
echo "L2-VAL read-errors $(cat $LAB_TMP/read-errors 2>/dev/null | wc -l)"
echo "L2-VAL kernel-complaints $(dmesg | grep -c -i -E 'I/O error|hung task|rcu.*stall|blocked for more than')"
"#;

#[test]
fn hundred_pauses_and_resumes_under_guest_io() {
    let run = Scenario::new("lab_pause", L1)
        .l2_script(L2)
        .timeout(Duration::from_secs(900))
        .run_ok();
    eprintln!("{}", run.report());
    run.assert_ok("vmm-exit-0");
    run.assert_ok("l2-exit");
    run.assert_ok("blk-daemon-alive");
    assert_eq!(run.require("LAB-VAL cycles-failed"), "0");
    assert_eq!(run.require("LAB-VAL paused-looks"), "10");
    assert_eq!(run.require("LAB-VAL paused-with-console-output"), "0");
    assert_eq!(run.require("LAB-VAL paused-with-exits"), "0");
    assert!(run.value("running-after").is_some(), "{}", run.report());
    // The guest saw (nearly) none of the 5 s pause: L1 waited 7 s and more around it.
    let host: f64 = run.require("LAB-VAL long-pause-host-s").parse().unwrap();
    let guest: f64 = run.require("LAB-VAL long-pause-guest-s").parse().unwrap();
    assert!(
        guest > 0.5 && guest < host - 3.5,
        "guest clock moved {guest} s over {host} s with a 5 s pause\n{}",
        run.report()
    );
    assert!(
        run.lines.iter().all(|l| !l.text.contains("-not-shown")),
        "vm.info did not say Paused\n{}",
        run.report()
    );
    let passes: u64 = run.require("L2-VAL passes").parse().unwrap_or(0);
    assert!(passes >= 20, "the guest's I/O loop made {passes} passes");
    assert_eq!(run.require("L2-VAL writers"), "4");
    assert_eq!(run.require("L2-VAL mismatches"), "0");
    assert_eq!(run.require("L2-VAL read-errors"), "0");
    assert_eq!(run.require("L2-VAL kernel-complaints"), "0");
}
