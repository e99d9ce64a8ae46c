//! Time from starting the VMM to the L2 guest's init, our `vmm` against QEMU + KVM, in the
//! same L1, same kernel (the cloud one), initramfs and command line, 2 vCPUs and 512 MiB,
//! alternated three times each (the bench's lab matrix measures the generic kernel's, run by
//! run). Every boot of ours must reach init and power off; a QEMU boot, the reference, that
//! does not is booted once more (the lab loses a QEMU L2 now and then: it resets or hangs
//! early, seen in about one bench pair in ten); the medians are printed and kept in
//! `target/lab/boot-time.json` (a measurement, not a pass/fail threshold).

use std::time::Duration;

use serde::Serialize;
use tests::lab::Scenario;

const RUNS: usize = 3;

const L1: &str = r#"
. /lab/lib.sh
i=0
while [ $i -lt @RUNS@ ]; do
    for v in vmm qemu; do
        for attempt in 1 2; do
            t0=$(lab_uptime)
            if [ $v = vmm ]; then
                vmm --kernel "$L2_KERNEL" --initramfs "$L2_INITRD" --cmdline "$L2_CMDLINE" \
                    --cpus 2 --memory 512M </dev/null 2>/dev/null |
                    lab_console "$t0" "$v-$i" >/tmp/$v-$i.log
            else
                l2_qemu -smp 2 -m 512 2>&1 | lab_console "$t0" "$v-$i" >/tmp/$v-$i.log
            fi
            grep -q '^L2-EXIT 0$' /tmp/$v-$i.log && break
            [ $v = qemu ] && [ $attempt = 1 ] || break
            echo "LAB-VAL $v-$i-lost booting QEMU again; its last lines:" \
                "$(tail -n 3 /tmp/$v-$i.log | tr '\n' '|')"
        done
        grep '^LAB-T' /tmp/$v-$i.log
        echo "LAB-VAL $v-$i-l2-uptime $(sed -n 's/^L2-INIT //p' /tmp/$v-$i.log)"
        check "$v-$i-exit" grep -q '^L2-EXIT 0$' /tmp/$v-$i.log
    done
    i=$((i + 1))
done
lab_finish
"#;

/// `boot-time.json`.
#[derive(Serialize)]
struct BootTimes<'a> {
    runs: usize,
    vmm_s: &'a [f64],
    qemu_s: &'a [f64],
    vmm_median_s: f64,
    qemu_median_s: f64,
    vmm_guest_uptime_s: &'a [f64],
    qemu_guest_uptime_s: &'a [f64],
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[test]
fn boot_time_vmm_vs_qemu() {
    let run = Scenario::new("lab_boot_time", &L1.replace("@RUNS@", &RUNS.to_string()))
        .l2_script("true\n")
        .with_qemu()
        .timeout(Duration::from_secs(600))
        .run_ok();
    let mut times = std::collections::BTreeMap::new();
    for v in ["vmm", "qemu"] {
        let t: Vec<f64> = (0..RUNS)
            .map(|i| {
                run.assert_ok(&format!("{v}-{i}-exit"));
                run.timing(&format!("{v}-{i}-init"))
                    .unwrap_or_else(|| panic!("no init time for {v} run {i}"))
            })
            .collect();
        times.insert(v, t);
    }
    let (vmm, qemu) = (median(times["vmm"].clone()), median(times["qemu"].clone()));
    // The guest kernel's own uptime at init: the rest of the time is the VMM's start, the
    // firmware (QEMU) and the kernel's decompression.
    let uptime = |v: &str| -> Vec<f64> {
        (0..RUNS)
            .filter_map(|i| run.value(&format!("{v}-{i}-l2-uptime"))?.parse().ok())
            .collect()
    };
    let (vmm_up, qemu_up) = (uptime("vmm"), uptime("qemu"));
    let hundredths = |v: f64| (v * 100.0).round() / 100.0;
    let json = serde_json::to_string(&BootTimes {
        runs: RUNS,
        vmm_s: &times["vmm"],
        qemu_s: &times["qemu"],
        vmm_median_s: hundredths(vmm),
        qemu_median_s: hundredths(qemu),
        vmm_guest_uptime_s: &vmm_up,
        qemu_guest_uptime_s: &qemu_up,
    })
    .expect("boot times as JSON");
    let out = tests::lab::lab_dir().join("boot-time.json");
    std::fs::write(&out, format!("{json}\n")).expect("write boot-time.json");
    eprintln!(
        "boot to L2 init in the lab, median of {RUNS}: vmm {vmm:.2} s, QEMU {qemu:.2} s ({json})"
    );
}
