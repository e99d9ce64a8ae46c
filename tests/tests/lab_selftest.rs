//! Lab self-test: one L1 boot proves what the lab promises to later tests.
//! - /dev/kvm in L1 creates a VM and runs a vCPU (`kvm-smoke`, a real-mode guest to HLT);
//! - the IOMMU is on: /sys/kernel/iommu_groups is populated;
//! - the e1000e at 0000:00:02.0 and the NVMe at 0000:00:04.0 bind to vfio-pci and their
//!   /dev/vfio/<group> appears; unbound, they return to their host drivers;
//! - iproute2's ip makes taps and network namespaces in L1.
//!
//! Runs in the lab (QEMU TCG): needs qemu-system-x86, busybox-static and Debian's kernel
//! packages, which scripts/lab/build-images installs/downloads; missing ones fail the test.

use std::time::Duration;

use tests::lab::Scenario;

const L1: &str = r#"
. /lab/lib.sh
echo "LAB-VAL kernel $(uname -r)"

check dev-kvm [ -c /dev/kvm ]
if out=$(kvm-smoke); then echo "$out"; echo "LAB-OK kvm-smoke"; else echo "$out"; fail kvm-smoke; fi

n=$(ls /sys/kernel/iommu_groups | wc -l)
echo "LAB-VAL iommu-groups $n"
check iommu-groups [ "$n" -gt 0 ]
check dev-vfio-container [ -c /dev/vfio/vfio ]

# assign NAME BDF VENDOR:DEVICE HOST_DRIVER
assign() {
    name=$1 bdf=$2 id=$3 drv=$4
    check "$name-present" [ "$(cat /sys/bus/pci/devices/$bdf/vendor):$(cat /sys/bus/pci/devices/$bdf/device)" = "$id" ]
    check "$name-host-driver" [ "$(pci_driver $bdf)" = "$drv" ]
    echo "LAB-VAL $name-iommu-group $(iommu_group $bdf)"
    if dev=$(vfio_bind $bdf); then
        echo "LAB-OK $name-vfio-bind"
        echo "LAB-VAL $name-vfio-dev $dev"
        check "$name-vfio-dev" [ -c "$dev" ]
    else
        fail "$name-vfio-bind" "driver $(pci_driver $bdf)"
    fi
    check "$name-vfio-unbind" vfio_unbind $bdf
    check "$name-host-driver-again" [ "$(pci_driver $bdf)" = "$drv" ]
    check "$name-vfio-dev-gone" [ ! -e "$dev" ]
}
assign nic $NIC_BDF 0x8086:0x10d3 e1000e
assign nvme $NVME_BDF 0x1b36:0x0010 nvme
# The nvme driver scans namespaces asynchronously after the probe: give it a moment.
n=0; while [ ! -b /dev/nvme0n1 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
check nvme-block [ -b /dev/nvme0n1 ]

check peer-nic-driver [ "$(pci_driver $PEER_NIC_BDF)" = e1000e ]
check iproute2-tap $IP tuntap add dev labtap0 mode tap vnet_hdr
check iproute2-netns $IP netns add labns0
check iproute2-move $IP link set labtap0 netns labns0
check iproute2-addr $IP -n labns0 addr add 192.0.2.1/24 dev labtap0
$IP netns del labns0
lab_finish
"#;

#[test]
fn lab_selftest() {
    let run = Scenario::new("lab_selftest", L1)
        .bin(env!("CARGO_BIN_EXE_kvm-smoke"))
        .timeout(Duration::from_secs(300))
        .run_ok();
    for check in [
        "dev-kvm",
        "kvm-smoke",
        "iommu-groups",
        "dev-vfio-container",
        "nic-present",
        "nic-host-driver",
        "nic-vfio-bind",
        "nic-vfio-dev",
        "nic-vfio-unbind",
        "nic-host-driver-again",
        "nvme-present",
        "nvme-vfio-bind",
        "nvme-vfio-dev",
        "nvme-vfio-unbind",
        "nvme-host-driver-again",
        "iproute2-tap",
        "iproute2-netns",
    ] {
        run.assert_ok(check);
    }
    let smoke = run.assert_line("KVM-SMOKE OK");
    eprintln!("{}", smoke.text);
    let boot = run.find("LAB-INIT").map(|l| l.at.as_secs_f64());
    eprintln!(
        "lab_selftest: L1 init at {boot:?} s, whole run {:.1} s",
        run.duration.as_secs_f64()
    );
}

/// An L1 that goes silent is killed after the stall limit, and first its vCPUs' registers
/// are read from L1's QEMU monitor (`L1-REGS` lines): the evidence of where a stuck L1 was
/// (the lab's nested-virtualization stalls leave nothing else), and named (`L1-RIP-NAME`);
/// its UART is read, and an NMI tells a stalled console (output comes back) from a stuck or
/// merely quiet L1; L1's QEMU threads are looked at from the host (running or waiting).
#[test]
fn a_silent_l1_is_killed_with_its_registers() {
    let run = Scenario::new(
        "lab_selftest_silent",
        "echo LAB-VAL going-quiet\nsleep 600\n",
    )
    .stall(Duration::from_secs(20))
    .timeout(Duration::from_secs(300))
    .run()
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        run.outcome,
        tests::lab::Outcome::L1Lockup,
        "{}",
        run.report()
    );
    assert!(run.value("going-quiet").is_some(), "{}", run.report());
    let regs: Vec<&str> = run
        .lines
        .iter()
        .filter(|l| l.text.starts_with("L1-REGS "))
        .map(|l| l.text.as_str())
        .collect();
    assert!(
        regs.iter().any(|l| l.contains("RIP=")) && regs.iter().any(|l| l.contains("CR3=")),
        "no registers from L1's monitor:\n{}",
        run.report()
    );
    // An idle L1 (its script sleeps) halts in its kernel: the RIPs are named from L1's
    // System.map, placed by the LAB-KMAP line its init printed (KASLR moved the kernel).
    let named: Vec<&str> = run
        .lines
        .iter()
        .filter(|l| l.text.starts_with("L1-RIP-NAME "))
        .map(|l| l.text.as_str())
        .collect();
    assert_eq!(named.len(), 2, "one name per L1 vCPU:\n{}", run.report());
    assert!(
        named.iter().all(|l| l.contains("(L1 kernel)")),
        "an idle L1's vCPUs are in its kernel:\n{}",
        run.report()
    );
    // Its serial port, and an NMI: its kernel answers (it is alive), nothing else comes (its
    // console was quiet, not stalled), so it is killed as stuck.
    let uart = run
        .find("L1-UART COM1 ")
        .map(|l| l.text.as_str())
        .unwrap_or("");
    assert!(
        uart.contains("IER=0x") && uart.contains("LSR=0x") && uart.contains("MCR=0x"),
        "{uart}\n{}",
        run.report()
    );
    assert!(
        run.find("L1-AFTER-NMI L1's kernel answered").is_some(),
        "{}",
        run.report()
    );
    // L1's QEMU threads seen from the host: its vCPU threads named, and idle (L1 halts).
    let vcpu_threads = run
        .lines
        .iter()
        .filter(|l| l.text.starts_with("L1-HOST-THREAD ") && l.text.contains("'CPU "))
        .count();
    assert_eq!(vcpu_threads, 2, "{}", run.report());
    assert!(
        run.find("L1-HOST-VCPUS all 2 idle").is_some(),
        "{}",
        run.report()
    );
}
