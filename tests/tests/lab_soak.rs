//! The soak end to end, small: one L1, our vmm and QEMU each booting the lab's guest twice
//! with the in-VMM virtio devices. Our first boot must be clean; QEMU's guest then panics on
//! purpose, and in the second pair both guests triple-fault on purpose (`reboot=t`). Each
//! must be classified so, the triple faults with the guest's RIP from L1's KVM trace named
//! in the kernel's `System.map` (the evidence the soak keeps for every failure).

use std::time::Duration;

use tests::soak::{run_soak, Fault, Model, Outcome, SoakOptions};

#[test]
fn clean_boots_panics_and_triple_faults_are_told_apart_with_l1s_trace() {
    let opts = SoakOptions {
        boots: 2,
        per_l1: 4,
        models: vec![Model::Virtio],
        deadline: Duration::from_secs(240),
        // Boots 0 and 1 are ours then QEMU's; the second pair goes QEMU first.
        faults: vec![
            (1, Fault::Panic),
            (2, Fault::TripleFault),
            (3, Fault::TripleFault),
        ],
        ..SoakOptions::default()
    };
    let boots =
        run_soak(&opts, &mut |l| eprintln!("{l}"), &mut |_| {}).unwrap_or_else(|e| panic!("{e}"));
    let got: Vec<(&str, &str)> = boots
        .iter()
        .map(|b| (b.vmm.as_str(), b.outcome.kind()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("vmm", "clean"),
            ("qemu", "guest panic"),
            ("qemu", "triple fault"),
            ("vmm", "triple fault")
        ],
        "{boots:#?}"
    );
    assert_eq!(boots[0].outcome, Outcome::Clean);
    assert!(
        boots[0].boot_to_init.is_some_and(|s| s > 0.0),
        "{:?}",
        boots[0]
    );
    let log = std::fs::read_to_string(&boots[1].log).unwrap_or_default();
    assert!(
        log.lines()
            .any(|l| l.starts_with("L1-TRACE") && l.contains("kvm_exit")),
        "no L1 trace in the failed boot's log {}:\n{log}",
        boots[1].log.display()
    );
    assert!(
        !std::fs::read_to_string(&boots[0].log)
            .unwrap_or_default()
            .contains("L1-TRACE"),
        "a clean boot keeps no trace"
    );
    // Where each triple fault happened, named: the kernel's triple-fault reboot, the same
    // place under both VMMs.
    let at: Vec<String> = boots[2..]
        .iter()
        .map(|b| match &b.outcome {
            Outcome::TripleFault { at } => at.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    for a in &at {
        assert!(
            a.contains("restart+"),
            "not named as the reboot path: {at:?}"
        );
    }
    let function = |a: &str| a.split(": ").nth(1).map(str::to_string);
    assert_eq!(function(&at[0]), function(&at[1]), "{at:?}");
}
