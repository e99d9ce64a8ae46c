//! The bench's lab matrix end to end, small: one run of every configuration (our vmm and
//! QEMU, in-VMM virtio, vhost-user, VFIO passthrough) with 200 reads and 50 pings each, side
//! by side (the default: both VMMs' L2s at once, taking turns) and one after the other. Every
//! configuration must produce its three records with sane values; a model that breaks fails
//! the test. The numbers are printed, not judged.

use tests::bench::lab::{run_lab, LabOptions, SIDE_BY_SIDE_BATCHES};
use tests::bench::{Matrix, Model};

#[test]
fn lab_matrix_side_by_side_produces_every_record() {
    matrix_produces_every_record(true);
}

/// One after the other, the in-VMM model only: the sequential mode's own code (one VM at a
/// time, its retry) is the same for every model, and side by side covers all three.
#[test]
fn lab_matrix_one_after_the_other_produces_every_record() {
    matrix_produces_every_record(false);
}

fn matrix_produces_every_record(side_by_side: bool) {
    let opts = LabOptions {
        runs: 1,
        blk_ops: 200,
        pings: 50,
        poll_us: 50,
        side_by_side,
        only_model: (!side_by_side).then_some(Model::InVmm),
    };
    // Side by side, the reads and pings are split into whole batches.
    let whole = |n: u32| {
        if side_by_side {
            n / SIDE_BY_SIDE_BATCHES * SIDE_BY_SIDE_BATCHES
        } else {
            n
        }
    };
    let records = run_lab(&opts, &mut |line| eprintln!("{line}")).unwrap_or_else(|e| panic!("{e}"));
    for r in &records {
        eprintln!(
            "{}",
            serde_json::to_string(r).unwrap_or_else(|e| e.to_string())
        );
    }
    let models = [Model::InVmm, Model::VhostUser, Model::Passthrough];
    for model in models
        .into_iter()
        .filter(|m| opts.only_model.is_none_or(|o| o == *m))
    {
        for vmm in ["vmm", "qemu"] {
            for test in ["blk-read-qd1", "net-rtt", "boot-to-init"] {
                let found: Vec<_> = records
                    .iter()
                    .filter(|r| r.model == model && r.vmm == vmm && r.test == test)
                    .collect();
                let what = format!("{} {vmm} {test}", model.name());
                assert_eq!(found.len(), 1, "{what}: {} records", found.len());
                let r = found[0];
                assert_eq!(r.matrix, Matrix::Lab, "{what}");
                assert_eq!(r.run, 1, "{what}");
                // The configuration says how the pair ran.
                assert_eq!(
                    r.config.contains("side by side") || r.config.contains("the other L2 idle"),
                    side_by_side,
                    "{what}: {}",
                    r.config
                );
                match test {
                    "boot-to-init" => {
                        let s = r.seconds.unwrap_or(0.0);
                        assert!(s > 0.0 && s < 120.0, "{what}: {s} s");
                    }
                    _ => {
                        let want = whole(if test == "net-rtt" {
                            opts.pings
                        } else {
                            opts.blk_ops
                        });
                        assert_eq!(r.n, u64::from(want), "{what}: n");
                        let l = r.latency.unwrap_or_else(|| panic!("{what}: no latency"));
                        assert!(l.p50 > 0.0, "{what}: {l}");
                        assert!(l.min <= l.p50 && l.p50 <= l.p90, "{what}: {l}");
                        assert!(
                            l.p90 <= l.p99 && l.p99 <= l.p999 && l.p999 <= l.max,
                            "{what}: {l}"
                        );
                        if vmm == "vmm" {
                            assert!(r.exits_per_op.contains_key("vm_total"), "{what}: no exits");
                        }
                        // L1's KVM counters over the phase, for both VMMs.
                        assert!(
                            r.exits_per_op.get("kvm_exits").is_some_and(|&x| x > 0.0),
                            "{what}: no in-kernel exits: {:?}",
                            r.exits_per_op
                        );
                    }
                }
            }
        }
    }
    // Side by side, the hotplug latency (Must show 5 of #22): per VMM, the e1000e (VFIO) and
    // a virtio disk hot-added through the control socket, timed to the guest's driver bound.
    let hotplug: Vec<_> = records
        .iter()
        .filter(|r| r.test.starts_with("hotplug-"))
        .collect();
    if side_by_side {
        for vmm in ["vmm", "qemu"] {
            for (test, model) in [
                ("hotplug-nic", Model::Passthrough),
                ("hotplug-disk", Model::InVmm),
            ] {
                let found: Vec<_> = hotplug
                    .iter()
                    .filter(|r| r.vmm == vmm && r.test == test && r.model == model)
                    .collect();
                assert_eq!(found.len(), 1, "{vmm} {test}: {} records", found.len());
                let s = found[0].seconds.unwrap_or(0.0);
                assert!(s > 0.0 && s < 60.0, "{vmm} {test}: {s} s");
            }
        }
    } else {
        assert!(hotplug.is_empty(), "hotplug is measured side by side only");
    }
}
