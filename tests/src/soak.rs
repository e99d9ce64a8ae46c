//! The lab soak: many boots of the same Linux guest (L2) in the lab's L1, our vmm and
//! QEMU with KVM taking turns in the same L1, every outcome classified, so that a guest our
//! vmm loses can be told from one the lab loses.
//!
//! Every boot is the bench's L2 (the generic kernel, 2 vCPUs, 512 MiB, the same initramfs
//! and command line) with one device model: `virtio` (our in-VMM virtio-blk and virtio-net
//! on a tap; QEMU's virtio-blk-pci and virtio-net-pci on the same files and tap) or `pt`
//! (the lab's NVMe and e1000e assigned through VFIO to either VMM). The guest runs a short
//! fixed workload (200 O_DIRECT 4 KiB reads of its disk with `lat`, 20 pings to L1) and
//! powers off. Boots alternate ours / QEMU's, and which of the pair goes first alternates
//! too; the models alternate pair by pair.
//!
//! L1 records, for every boot: the guest's console (with `lab_console`'s boot-to-init), the
//! VMM's exit status, and with a failure L1's KVM trace for the VM (`kvm_exit`,
//! `kvm_inj_exception`, `kvm_inj_virq`, the last lines before the end: on AMD, KVM resets a
//! vCPU that shut down before userspace can read it, so the trace is where a triple fault's
//! last exceptions are) and L1's KVM counters of the VM. Our vmm runs with `--watchdog`, so a
//! guest that stops making progress gets its vCPUs' registers in the log. A boot that does
//! not end within [`SoakOptions::deadline`] is ended (SIGTERM, then SIGKILL): a hang.
//!
//! [`classify`] turns one boot's lines into an [`Outcome`]: clean, hang at boot (before the
//! workload started; with the last console line), hang later, reset (the VMM ended without
//! the guest's power-off; a guest panic is told apart by its message), triple fault (ours
//! says so; for QEMU, L1's trace shows the shutdown exit), KVM internal error, a failed
//! workload, a VMM error, or the boot lost with its L1 (the lab's own flake).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::lab::{
    name_shutdown, profile_dir, rip_names, shutdown_exit, LabRun, Scenario, L1_ATTEMPTS,
};

/// What the soak runs.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    /// Boots of each VMM (split over the models).
    pub boots: u32,
    /// Boots (both VMMs together) per L1 boot.
    pub per_l1: u32,
    /// The device models, taken in turn pair by pair.
    pub models: Vec<Model>,
    /// A boot that has not ended by then is a hang (it is ended).
    pub deadline: Duration,
    /// Where the project binaries and `lat` are (a release build for long soaks).
    pub bins: PathBuf,
    /// Boots (by number, from 0) whose guest fails on purpose once its workload began: the
    /// failure paths, end to end, for the soak's own test.
    pub faults: Vec<(u32, Fault)>,
    /// No L1 is started once the soak has run this long (the one running finishes).
    pub budget: Option<Duration>,
    /// Where each boot's lines are kept (`<tag>.log`).
    pub log_dir: PathBuf,
}

impl Default for SoakOptions {
    fn default() -> Self {
        SoakOptions {
            boots: 200,
            per_l1: 20,
            models: vec![Model::Virtio, Model::Passthrough],
            deadline: Duration::from_secs(150),
            bins: profile_dir(),
            faults: Vec::new(),
            budget: None,
            log_dir: crate::lab::lab_dir().join("logs").join("soak"),
        }
    }
}

/// A failure a guest makes on purpose (the soak's own test).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// A kernel panic (sysrq `c`); the guest then reboots (`panic=-1`).
    Panic,
    /// A triple fault: `reboot -f` with `reboot=t` (the kernel loads an empty IDT and
    /// executes `int3`).
    TripleFault,
}

impl Fault {
    fn word(self) -> &'static str {
        match self {
            Fault::Panic => "panic",
            Fault::TripleFault => "triple",
        }
    }
}

/// A device model of the soak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Model {
    /// Our in-VMM virtio-blk and virtio-net; QEMU's virtio-blk-pci and virtio-net-pci.
    Virtio,
    /// The lab's NVMe and e1000e through VFIO.
    Passthrough,
}

impl Model {
    pub fn short(self) -> &'static str {
        match self {
            Model::Virtio => "virtio",
            Model::Passthrough => "pt",
        }
    }

    pub fn parse(s: &str) -> Option<Model> {
        match s {
            "virtio" => Some(Model::Virtio),
            "pt" | "passthrough" => Some(Model::Passthrough),
            _ => None,
        }
    }
}

/// How one boot ended.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Outcome {
    /// Booted, ran the workload, powered off, the VMM exited 0.
    Clean,
    /// Not done by the deadline, before the workload began: `last` is the last console line.
    HangAtBoot { last: String },
    /// Not done by the deadline, the workload had begun.
    HangLater { last: String },
    /// The guest panicked (and rebooted: `panic=-1`).
    Panic,
    /// The VMM ended without the guest's power-off and without a crash report: a reset the
    /// guest did not announce.
    Reset,
    /// A triple fault: reported by our vmm, or (QEMU) a shutdown exit in L1's trace. `at`:
    /// where, from L1's trace (the vCPU, the guest's RIP and its function), if it has it.
    TripleFault { at: String },
    /// KVM_EXIT_INTERNAL_ERROR.
    KvmInternalError,
    /// The guest powered off but its workload failed.
    WorkloadFailed { why: String },
    /// The VMM failed (its own error, not the guest's).
    VmmError { why: String },
    /// Its L1 died (the lab's nested-virtualization flake) while this boot ran.
    L1Died,
}

impl Outcome {
    /// The kind, for the table.
    pub fn kind(&self) -> &'static str {
        match self {
            Outcome::Clean => "clean",
            Outcome::HangAtBoot { .. } => "hang at boot",
            Outcome::HangLater { .. } => "hang later",
            Outcome::Panic => "guest panic",
            Outcome::Reset => "reset",
            Outcome::TripleFault { .. } => "triple fault",
            Outcome::KvmInternalError => "KVM internal error",
            Outcome::WorkloadFailed { .. } => "workload failed",
            Outcome::VmmError { .. } => "VMM error",
            Outcome::L1Died => "L1 died",
        }
    }

    /// The detail worth reading, if any.
    pub fn detail(&self) -> Option<&str> {
        match self {
            Outcome::HangAtBoot { last } | Outcome::HangLater { last } => Some(last),
            Outcome::WorkloadFailed { why } | Outcome::VmmError { why } => Some(why),
            Outcome::TripleFault { at } => Some(at),
            _ => None,
        }
    }

    /// Whether the boot counts as a lost guest.
    pub fn failed(&self) -> bool {
        !matches!(self, Outcome::Clean)
    }
}

/// One boot: which, and how it ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Boot {
    /// `b<N>-<model>-<vmm>`.
    pub tag: String,
    /// `vmm` or `qemu`.
    pub vmm: String,
    pub model: Model,
    pub outcome: Outcome,
    /// Seconds from starting the VMM to the guest's init, if it got there.
    pub boot_to_init: Option<f64>,
    /// Where its lines are kept.
    pub log: PathBuf,
}

/// The marker lines of a boot's section in L1's console.
const BEGIN: &str = "SOAK-BEGIN ";
const END: &str = "SOAK-END ";

/// Lines that are the fixture's or L1's, not the guest's console.
fn is_marker(l: &str) -> bool {
    ["LAB-", "SOAK-", "VMM-RC", "L1-TRACE", "L1-KVM"]
        .iter()
        .any(|p| l.starts_with(p))
}

/// How a boot ended, from its section of L1's console (`vmm`: whose boot it was).
pub fn classify(lines: &[&str], vmm: &str) -> Outcome {
    let has = |p: &str| lines.iter().any(|l| l.starts_with(p));
    let contains = |p: &str| lines.iter().any(|l| l.contains(p));
    let guest_lines: Vec<&str> = lines.iter().copied().filter(|l| !is_marker(l)).collect();
    let last = guest_lines
        .iter()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map_or("(nothing on the console)".to_string(), |l| {
            l.trim().to_string()
        });
    if has("SOAK-TIMEOUT") {
        return if has("SOAK-WORK-BEGIN") {
            Outcome::HangLater { last }
        } else {
            Outcome::HangAtBoot { last }
        };
    }
    let rc = lines
        .iter()
        .find_map(|l| l.strip_prefix("VMM-RC "))
        .and_then(|v| v.trim().parse::<i32>().ok());
    let powered_off = has("L2-EXIT ");
    if contains("KVM internal error") || contains("KVM_EXIT_INTERNAL_ERROR") {
        return Outcome::KvmInternalError;
    }
    // L1's trace of the VM's last exits: a shutdown exit (SVM_EXIT_SHUTDOWN, VMX's
    // TRIPLE_FAULT) is a triple fault whatever the VMM made of it, and says where.
    let names = rip_names(lines.iter().copied());
    let shutdown = lines
        .iter()
        .find_map(|l| shutdown_exit(l))
        .map(|(vcpu, rip)| name_shutdown(vcpu, rip, &names));
    if vmm == "vmm" && contains("vmm: guest crashed") && contains("triple fault") {
        return Outcome::TripleFault {
            at: shutdown.unwrap_or_else(|| "not in L1's trace".into()),
        };
    }
    if contains("Kernel panic - not syncing") {
        return Outcome::Panic;
    }
    if !powered_off {
        if let Some(at) = shutdown {
            return Outcome::TripleFault { at };
        }
        return match rc {
            Some(0) | None => Outcome::Reset,
            Some(rc) => Outcome::VmmError {
                why: format!("exit status {rc} before the guest powered off; last line: {last}"),
            },
        };
    }
    if rc != Some(0) {
        return Outcome::VmmError {
            why: format!(
                "exit status {} after the guest powered off",
                rc.map_or("unknown".to_string(), |r| r.to_string())
            ),
        };
    }
    if let Some(f) = lines.iter().find_map(|l| l.strip_prefix("SOAK-WORK-FAIL ")) {
        return Outcome::WorkloadFailed { why: f.to_string() };
    }
    if !has("SOAK-WORK-OK") {
        return Outcome::WorkloadFailed {
            why: "the workload did not report".into(),
        };
    }
    if !has("L2-EXIT 0") {
        return Outcome::WorkloadFailed {
            why: lines
                .iter()
                .find(|l| l.starts_with("L2-EXIT "))
                .map_or(String::new(), |l| l.to_string()),
        };
    }
    Outcome::Clean
}

/// The Wilson score interval (95 %) of `k` successes in `n` trials, as fractions.
pub fn wilson(k: u32, n: u32) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let z = 1.959_963_984_540_054_f64;
    let (k, n) = (f64::from(k), f64::from(n));
    let p = k / n;
    let denom = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / denom;
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / denom;
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// The soak's table: outcomes by kind, ours against QEMU's, with each rate's Wilson
/// interval, per model and in total.
pub fn table(boots: &[Boot]) -> String {
    let mut s = String::new();
    let mut kinds: Vec<&str> = boots.iter().map(|b| b.outcome.kind()).collect();
    kinds.sort_unstable();
    kinds.dedup();
    let mut scopes: Vec<Option<Model>> = vec![None];
    let mut models: Vec<Model> = boots.iter().map(|b| b.model).collect();
    models.sort_unstable();
    models.dedup();
    if models.len() > 1 {
        scopes.extend(models.into_iter().map(Some));
    }
    let _ = writeln!(
        s,
        "| models | outcome | our vmm | rate (95 % CI) | QEMU | rate (95 % CI) |\n|---|---|---|---|---|---|"
    );
    for scope in scopes {
        let of = |vmm: &str| -> Vec<&Boot> {
            boots
                .iter()
                .filter(|b| b.vmm == vmm && scope.is_none_or(|m| b.model == m))
                .collect()
        };
        let (ours, qemu) = (of("vmm"), of("qemu"));
        let name = scope.map_or("all", |m| m.short());
        for kind in &kinds {
            let cell = |v: &[&Boot]| {
                let k = v.iter().filter(|b| b.outcome.kind() == *kind).count() as u32;
                let n = v.len() as u32;
                let (lo, hi) = wilson(k, n);
                (
                    format!("{k} of {n}"),
                    format!(
                        "{:.1} % ({:.1}-{:.1} %)",
                        if n == 0 {
                            0.0
                        } else {
                            100.0 * f64::from(k) / f64::from(n)
                        },
                        100.0 * lo,
                        100.0 * hi
                    ),
                )
            };
            let (a, ar) = cell(&ours);
            let (b, br) = cell(&qemu);
            let _ = writeln!(s, "| {name} | {kind} | {a} | {ar} | {b} | {br} |");
        }
    }
    s
}

/// Every failed boot, one line each, with its detail and log.
pub fn failures(boots: &[Boot]) -> String {
    let mut s = String::new();
    for b in boots.iter().filter(|b| b.outcome.failed()) {
        let _ = writeln!(
            s,
            "- {} ({} {}): {}{} — {}",
            b.tag,
            b.vmm,
            b.model.short(),
            b.outcome.kind(),
            b.outcome
                .detail()
                .map_or(String::new(), |d| format!(": {d}")),
            b.log.display()
        );
    }
    s
}

/// The boot plan of one L1: (tag, model, vmm) in order; a boot number is the tag's.
fn plan(first: u32, count: u32, models: &[Model]) -> Vec<(String, Model, &'static str)> {
    (first..first + count)
        .map(|i| {
            let pair = i / 2;
            let model = models[(pair as usize) % models.len()];
            // Pairs alternate which VMM boots first.
            let ours_first = pair % 2 == 0;
            let vmm = if (i % 2 == 0) == ours_first {
                "vmm"
            } else {
                "qemu"
            };
            (format!("b{i}-{}-{vmm}", model.short()), model, vmm)
        })
        .collect()
}

const L1_SCRIPT: &str = r#"
. /lab/lib.sh
DEADLINE=@DEADLINE@
mkdir -p $LAB_TMP/pids
# L1's KVM trace: the last exits, injected exceptions and interrupts of the VM, printed when a
# boot fails. Kept small: only one L2 runs at a time, and the ring overwrites.
T=/sys/kernel/tracing
mount -t tracefs nodev $T 2>/dev/null
TRACE=0
if [ -w $T/events/kvm/kvm_exit/enable ]; then
    echo 512 >$T/buffer_size_kb
    # Every exit, not only the shutdowns L1's init filters for.
    echo 0 >$T/events/kvm/kvm_exit/filter
    for e in kvm_exit kvm_inj_exception kvm_inj_virq; do echo 1 >$T/events/kvm/$e/enable; done
    echo 1 >$T/tracing_on
    TRACE=1
fi
echo "LAB-VAL soak-trace $TRACE"
mount -t debugfs nodev /sys/kernel/debug 2>/dev/null
dd if=/dev/zero of=$LAB_TMP/disk.img bs=1M count=64 2>/dev/null
$IP tuntap add dev st0 mode tap vnet_hdr
$IP addr add 192.0.2.1/24 dev st0
$IP link set st0 up
check bind-nvme passthrough bind $NVME_BDF
check bind-nic passthrough bind $NIC_BDF
peer=$(ls /sys/bus/pci/devices/$PEER_NIC_BDF/net/)
$IP addr add 198.51.100.1/24 dev $peer
$IP link set $peer up

dev_args() {
    case $1-$2 in
    virtio-vmm) echo "--disk path=$LAB_TMP/disk.img,id=disk0 --net tap=st0,mac=52:54:00:00:00:02,id=net0" ;;
    virtio-qemu) echo "-drive if=none,id=d0,file=$LAB_TMP/disk.img,format=raw,cache=writeback" \
        "-device virtio-blk-pci,drive=d0" \
        "-netdev tap,id=n0,ifname=st0,script=no,downscript=no,vhost=off" \
        "-device virtio-net-pci,netdev=n0,mac=52:54:00:00:00:02,romfile=" ;;
    pt-vmm) echo "--vfio host=$NVME_BDF,id=nvme0 --vfio host=$NIC_BDF,id=nic0" ;;
    pt-qemu) echo "-device vfio-pci,host=$NVME_BDF -device vfio-pci,host=$NIC_BDF" ;;
    esac
}
net_args() {
    case $1 in
    virtio) echo "soak_ip=192.0.2.2/24 soak_peer=192.0.2.1" ;;
    pt) echo "soak_ip=198.51.100.2/24 soak_peer=198.51.100.1" ;;
    esac
}
# kvm_counters PID: L1's KVM counters of the VM of process PID.
kvm_counters() {
    d=$(ls -d /sys/kernel/debug/kvm/$1-* 2>/dev/null | head -n 1)
    [ -n "$d" ] || return 0
    out=
    for f in exits io_exits mmio_exits halt_exits irq_exits irq_injections nmi_injections insn_emulation; do
        [ -r $d/$f ] && out="$out $f=$(cat $d/$f)"
    done
    echo "L1-KVM$out"
}
# boot TAG MODEL VMM FAULT: one L2 boot, its console and what L1 knows of it between
# SOAK-BEGIN and SOAK-END; FAULT panic or triple: the guest fails so on purpose once its
# workload began (none: it does not).
boot() {
    tag=$1 m=$2 v=$3 fault=$4
    # The lab's e1000e keeps its last VM's rings through vfio-pci's reset: L1's driver
    # resets it (see the bench).
    [ $m = pt ] && { passthrough unbind $NIC_BDF >/dev/null; passthrough bind $NIC_BDF >/dev/null; }
    [ $TRACE = 1 ] && echo >$T/trace
    echo "SOAK-BEGIN $tag"
    cmdline="$L2_CMDLINE $(net_args $m) soak_fault=$fault"
    # A triple fault on purpose: the kernel's own reboot method "t".
    [ $fault = triple ] && cmdline="$cmdline reboot=t"
    rm -f $LAB_TMP/pids/vm
    t0=$(lab_uptime)
    # The console as it comes (lab_console adds the boot-to-init time), also kept in
    # $LAB_TMP/out; the VMM's exit status on a line of its own at the end.
    {
        if [ $v = vmm ]; then
            vmm --kernel "$L2_GENERIC_KERNEL" --initramfs "$L2_GENERIC_INITRD" --cmdline "$cmdline" \
                --cpus 2 --memory 512M --watchdog 10 $(dev_args $m vmm) </dev/null 2>&1 &
        else
            qemu-system-x86_64 -nodefaults -nographic -serial stdio -no-reboot \
                -enable-kvm -cpu host -m 512 -smp 2 -name l2,debug-threads=on \
                -kernel "$L2_GENERIC_KERNEL" -initrd "$L2_GENERIC_INITRD" -append "$cmdline" \
                $(dev_args $m qemu) </dev/null 2>&1 &
        fi
        echo $! >$LAB_TMP/pids/vm
        wait $!
        rc=$?
        echo
        echo "VMM-RC $rc"
    } | lab_console "$t0" "$tag" | tee $LAB_TMP/out &
    job=$!
    n=0
    while [ ! -s $LAB_TMP/pids/vm ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
    pid=$(cat $LAB_TMP/pids/vm 2>/dev/null)
    waited=0 timeout=0
    while [ -n "$pid" ] && kill -0 $pid 2>/dev/null; do
        sleep 1
        waited=$((waited + 1))
        if [ $waited -ge $DEADLINE ]; then
            timeout=1
            break
        fi
        # L1 says something at least every 20 s: the fixture takes a silent L1 for stuck.
        [ $((waited % 20)) = 0 ] && echo "SOAK-WAIT $tag $waited"
    done
    if [ $timeout = 1 ]; then
        echo "SOAK-TIMEOUT $tag after $DEADLINE s"
        kvm_counters $pid
        # Ours logs its exit counters (and its watchdog, the vCPUs' states) on the way out.
        kill -TERM $pid 2>/dev/null
        n=0
        while kill -0 $pid 2>/dev/null && [ $n -lt 10 ]; do sleep 1; n=$((n + 1)); done
        kill -KILL $pid 2>/dev/null
    fi
    wait $job
    if [ $timeout = 1 ] || ! grep -q '^L2-EXIT 0' $LAB_TMP/out; then
        if [ $TRACE = 1 ]; then
            echo 0 >$T/tracing_on
            tail -n 120 $T/trace | sed 's/^/L1-TRACE /'
            lab_rip_names
            echo 1 >$T/tracing_on
        fi
    fi
    echo "SOAK-END $tag"
}

@BOOTS@
lab_finish
"#;

const L2_SCRIPT: &str = r#"
IP=
PEER=
FAULT=none
for x in $(cat /proc/cmdline); do
    case $x in
    soak_ip=*) IP=${x#soak_ip=} ;;
    soak_peer=*) PEER=${x#soak_peer=} ;;
    soak_fault=*) FAULT=${x#soak_fault=} ;;
    esac
done
n=0
dev=
while [ -z "$dev" ] && [ $n -lt 100 ]; do
    for d in /dev/vda /dev/nvme0n1; do [ -b $d ] && dev=$d; done
    [ -n "$dev" ] || { sleep 0.1; n=$((n + 1)); }
done
n=0
ifc=
while [ -z "$ifc" ] && [ $n -lt 100 ]; do
    ifc=$(ls /sys/class/net | grep -v '^lo$' | head -n 1)
    [ -n "$ifc" ] || { sleep 0.1; n=$((n + 1)); }
done
echo "SOAK-WORK-BEGIN disk=${dev:-none} nic=${ifc:-none}"
[ "$FAULT" = panic ] && echo c >/proc/sysrq-trigger
[ "$FAULT" = triple ] && reboot -f
if [ -z "$dev" ] || [ -z "$ifc" ]; then
    echo "SOAK-WORK-FAIL no disk or no NIC (disk=${dev:-none} nic=${ifc:-none})"
    exit 1
fi
lat "$dev" 200 16 1 >$LAB_TMP/lat.txt 2>&1 || { echo "SOAK-WORK-FAIL reads: $(tail -n 1 $LAB_TMP/lat.txt)"; exit 1; }
ip link set "$ifc" up
ip addr add "$IP" dev "$ifc"
n=0; until [ "$(cat /sys/class/net/$ifc/carrier 2>/dev/null)" = 1 ] || [ $n -ge 100 ]; do sleep 0.1; n=$((n + 1)); done
# The first packets after a passthrough bind can be lost (see lab_vfio.rs).
n=0; until ping -c 1 -W 1 "$PEER" >/dev/null 2>&1 || [ $n -ge 20 ]; do n=$((n + 1)); done
got=$(ping -c 20 -i 0.05 -W 2 "$PEER" 2>&1 | awk '/packets transmitted/ { print $4 }')
[ "${got:-0}" -ge 19 ] || { echo "SOAK-WORK-FAIL pings: ${got:-0} of 20 answered"; exit 1; }
echo "SOAK-WORK-OK"
"#;

fn l1_script(boots: &[(String, Model, &'static str)], first: u32, opts: &SoakOptions) -> String {
    let calls: String = boots
        .iter()
        .zip(first..)
        .map(|((tag, m, v), i)| {
            let fault = opts
                .faults
                .iter()
                .find(|(b, _)| *b == i)
                .map_or("none", |(_, f)| f.word());
            format!("boot {tag} {} {v} {fault}\n", m.short())
        })
        .collect();
    L1_SCRIPT
        .replace("@DEADLINE@", &opts.deadline.as_secs().to_string())
        .replace("@BOOTS@", &calls)
}

/// The sections of a run: tag → its lines (complete or not).
fn sections(run: &LabRun) -> BTreeMap<String, (Vec<String>, bool)> {
    let mut out: BTreeMap<String, (Vec<String>, bool)> = BTreeMap::new();
    let mut current: Option<String> = None;
    for l in &run.lines {
        let t = l.text.as_str();
        if let Some(tag) = t.strip_prefix(BEGIN) {
            current = Some(tag.trim().to_string());
            out.insert(tag.trim().to_string(), (Vec::new(), false));
        } else if let Some(tag) = t.strip_prefix(END) {
            if let Some(s) = out.get_mut(tag.trim()) {
                s.1 = true;
            }
            current = None;
        } else if let Some(c) = &current {
            if let Some(s) = out.get_mut(c) {
                s.0.push(t.to_string());
            }
        }
    }
    out
}

/// Runs the soak; `progress` gets one line per boot, `on_boot` every boot as it is
/// classified (the `soak` binary records them as they come).
pub fn run_soak(
    opts: &SoakOptions,
    progress: &mut dyn FnMut(&str),
    on_boot: &mut dyn FnMut(&Boot),
) -> Result<Vec<Boot>, String> {
    if opts.models.is_empty() || opts.boots == 0 || opts.per_l1 < 2 {
        return Err(format!("soak: nothing to run: {opts:?}"));
    }
    let lat = opts.bins.join("lat");
    if !lat.is_file() {
        return Err(format!(
            "soak: {} is missing: cargo build -p tests --bins (same profile as the vmm)",
            lat.display()
        ));
    }
    let total = 2 * opts.boots;
    let per_l1 = opts.per_l1 - opts.per_l1 % 2;
    let logs = &opts.log_dir;
    let started = Instant::now();
    std::fs::create_dir_all(logs).map_err(|e| format!("soak: {}: {e}", logs.display()))?;
    let mut boots: Vec<Boot> = Vec::new();
    let mut next = 0u32;
    let mut l1 = 0u32;
    let mut deaths_in_a_row = 0u32;
    while next < total {
        if opts.budget.is_some_and(|b| started.elapsed() >= b) {
            progress(&format!(
                "soak: the time budget is spent after {:.1} h: {next} of {total} boots done",
                started.elapsed().as_secs_f64() / 3600.0
            ));
            break;
        }
        let count = per_l1.min(total - next);
        let plan = plan(next, count, &opts.models);
        l1 += 1;
        // Per boot: the deadline, the trace, the teardown; plus L1's boot and setup.
        let timeout = Duration::from_secs(300 + u64::from(count) * (opts.deadline.as_secs() + 40));
        let scenario = Scenario::new(&format!("soak-{l1}"), &l1_script(&plan, next, opts))
            .l2_script(L2_SCRIPT)
            .l2_bin(&lat)
            .project_bins(&opts.bins)
            .with_qemu()
            .mem_mib(2048)
            .stall(Duration::from_secs(90))
            .timeout(timeout);
        progress(&format!(
            "soak: L1 boot {l1}: boots {} to {} of {total}",
            next + 1,
            next + count
        ));
        let mut on_line = |line: &str| {
            if let Some(tag) = line.strip_prefix("SOAK-TIMEOUT ") {
                progress(&format!("soak: {tag}: TIMEOUT"));
            }
        };
        let run = scenario
            .run_with(&mut on_line)
            .map_err(|e| format!("soak: {e}"))?;
        let secs = sections(&run);
        let mut done_here = 0;
        for (tag, model, vmm) in &plan {
            let Some((lines, complete)) = secs.get(tag) else {
                break;
            };
            let log = logs.join(format!("{tag}.log"));
            let _ = std::fs::write(&log, lines.join("\n") + "\n");
            let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
            let outcome = if *complete {
                classify(&refs, vmm)
            } else {
                Outcome::L1Died
            };
            let boot_to_init = lines.iter().find_map(|l| {
                l.strip_prefix(&format!("LAB-T {tag}-init "))
                    .and_then(|v| v.trim().parse().ok())
            });
            progress(&format!(
                "soak: {tag}: {}{}",
                outcome.kind(),
                outcome
                    .detail()
                    .map_or(String::new(), |d| format!(" ({d})"))
            ));
            let boot = Boot {
                tag: tag.clone(),
                vmm: vmm.to_string(),
                model: *model,
                outcome,
                boot_to_init,
                log,
            };
            on_boot(&boot);
            boots.push(boot);
            done_here += 1;
            if !*complete {
                break;
            }
        }
        if done_here == 0 {
            deaths_in_a_row += 1;
            if deaths_in_a_row >= L1_ATTEMPTS {
                return Err(format!(
                    "soak: {deaths_in_a_row} L1 boots in a row ended before their first L2 ({}; log {})",
                    run.outcome,
                    run.log.display()
                ));
            }
        } else {
            deaths_in_a_row = 0;
        }
        next += done_here;
    }
    Ok(boots)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(s: &str) -> Vec<&str> {
        s.lines().collect()
    }

    #[test]
    fn a_clean_boot() {
        let l = lines(
            "L2-INIT 3.1\nLAB-T b0-virtio-vmm-init 14.2\nSOAK-WORK-BEGIN disk=/dev/vda nic=eth0\nSOAK-WORK-OK\nL2-EXIT 0\nVMM-RC 0",
        );
        assert_eq!(classify(&l, "vmm"), Outcome::Clean);
        assert_eq!(classify(&l, "qemu"), Outcome::Clean);
    }

    #[test]
    fn hangs_say_where() {
        let l = lines("[    0.5] pci 0000:00:02.0: BAR 0\nSOAK-WAIT b1 20\nSOAK-TIMEOUT b1 after 150 s\nL1-KVM exits=5\nVMM-RC 0");
        assert_eq!(
            classify(&l, "vmm"),
            Outcome::HangAtBoot {
                last: "[    0.5] pci 0000:00:02.0: BAR 0".into()
            }
        );
        let l = lines(
            "SOAK-WORK-BEGIN disk=/dev/vda nic=eth0\nSOAK-TIMEOUT b1 after 150 s\nVMM-RC 137",
        );
        assert!(matches!(classify(&l, "qemu"), Outcome::HangLater { .. }));
    }

    #[test]
    fn triple_faults_from_our_report_or_from_l1s_trace() {
        let ours = lines("vmm: guest crashed: vcpu 0: triple fault (KVM_EXIT_SHUTDOWN)\nVMM-RC 4");
        assert_eq!(
            classify(&ours, "vmm"),
            Outcome::TripleFault {
                at: "not in L1's trace".into()
            }
        );
        let trace = "L1-TRACE  CPU 0/KVM-812 [001] d.... 88.1: kvm_exit: vcpu 1 reason shutdown rip 0xffffffff81000000 info1 0 info2 0";
        let qemu = format!("L2-INIT 3\nVMM-RC 0\n{trace}");
        let qemu = lines(&qemu);
        let at = |o: Outcome| match o {
            Outcome::TripleFault { at } => at,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            at(classify(&qemu, "qemu")),
            "vcpu 1 rip 0xffffffff81000000 (not named)"
        );
        // Ours with the trace: where, too.
        let ours = format!(
            "vmm: guest crashed: vcpu 1: triple fault (KVM_EXIT_SHUTDOWN)\nVMM-RC 4\n{trace}\n\
             L1-RIP ffffffff81000000 _text+0x0"
        );
        let ours = lines(&ours);
        assert!(at(classify(&ours, "vmm")).starts_with("vcpu 1 rip 0xffffffff81000000: _text+0x0 "));
        // The same exit without a shutdown in the trace: a reset.
        let reset = lines("L2-INIT 3\nVMM-RC 0\nL1-TRACE kvm_exit: vcpu 0 reason npf rip 0x1");
        assert_eq!(classify(&reset, "qemu"), Outcome::Reset);
    }

    #[test]
    fn panics_internal_errors_and_vmm_errors() {
        let p = lines("Kernel panic - not syncing: Fatal exception\nVMM-RC 0");
        assert_eq!(classify(&p, "qemu"), Outcome::Panic);
        let i = lines("vmm: guest crashed: vcpu 1: KVM internal error (KVM_EXIT_INTERNAL_ERROR, suberror 1)\nVMM-RC 4");
        assert_eq!(classify(&i, "vmm"), Outcome::KvmInternalError);
        let e = lines("vmm: cannot open /dev/vfio/3: busy\nVMM-RC 2");
        assert!(matches!(classify(&e, "vmm"), Outcome::VmmError { .. }));
        let w = lines(
            "SOAK-WORK-BEGIN disk=none nic=eth0\nSOAK-WORK-FAIL no disk\nL2-EXIT 1\nVMM-RC 0",
        );
        assert!(matches!(
            classify(&w, "vmm"),
            Outcome::WorkloadFailed { .. }
        ));
    }

    #[test]
    fn wilson_intervals() {
        let (lo, hi) = wilson(0, 200);
        assert!(lo.abs() < 1e-9, "{lo}");
        assert!((hi - 0.0188).abs() < 0.001, "{hi}");
        let (lo, hi) = wilson(10, 100);
        assert!(
            (lo - 0.0552).abs() < 0.001 && (hi - 0.1744).abs() < 0.001,
            "{lo} {hi}"
        );
    }

    #[test]
    fn the_plan_alternates_vmms_order_and_models() {
        let p = plan(0, 8, &[Model::Virtio, Model::Passthrough]);
        let got: Vec<(Model, &str)> = p.iter().map(|(_, m, v)| (*m, *v)).collect();
        assert_eq!(
            got,
            vec![
                (Model::Virtio, "vmm"),
                (Model::Virtio, "qemu"),
                (Model::Passthrough, "qemu"),
                (Model::Passthrough, "vmm"),
                (Model::Virtio, "vmm"),
                (Model::Virtio, "qemu"),
                (Model::Passthrough, "qemu"),
                (Model::Passthrough, "vmm"),
            ]
        );
        assert_eq!(p[3].0, "b3-pt-vmm");
    }

    #[test]
    fn the_table_counts_each_vmm_apart() {
        let b = |vmm: &str, outcome| Boot {
            tag: "t".into(),
            vmm: vmm.into(),
            model: Model::Virtio,
            outcome,
            boot_to_init: None,
            log: PathBuf::new(),
        };
        let boots = vec![
            b("vmm", Outcome::Clean),
            b("vmm", Outcome::Clean),
            b("qemu", Outcome::Clean),
            b("qemu", Outcome::Reset),
        ];
        let t = table(&boots);
        assert!(t.contains("| all | clean | 2 of 2 | 100.0 %"), "{t}");
        assert!(
            t.contains("| all | reset | 0 of 2 | 0.0 % (0.0-65.8 %) | 1 of 2 | 50.0 %"),
            "{t}"
        );
    }
}
