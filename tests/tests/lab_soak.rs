//! The soak end to end, small: one L1, our vmm and QEMU each booting the lab's guest once
//! with the in-VMM virtio devices; QEMU's guest panics on purpose once its workload began.
//! Our boot must be clean; QEMU's must be classified as a guest panic, with L1's KVM trace
//! of the VM's last moments in its log (the evidence the soak keeps for every failure).

use std::time::Duration;

use tests::soak::{run_soak, Model, Outcome, SoakOptions};

#[test]
fn a_clean_boot_and_a_panic_are_told_apart_with_l1s_trace() {
    let opts = SoakOptions {
        boots: 1,
        per_l1: 2,
        models: vec![Model::Virtio],
        deadline: Duration::from_secs(240),
        panic_boots: vec![1],
        ..SoakOptions::default()
    };
    let boots = run_soak(&opts, &mut |l| eprintln!("{l}")).unwrap_or_else(|e| panic!("{e}"));
    let got: Vec<(&str, &str)> = boots
        .iter()
        .map(|b| (b.vmm.as_str(), b.outcome.kind()))
        .collect();
    assert_eq!(
        got,
        vec![("vmm", "clean"), ("qemu", "guest panic")],
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
}
