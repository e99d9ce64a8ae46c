//! The lab matrix of the bench: Linux guests (L2) inside the lab's L1 (QEMU TCG with real KVM,
//! an IOMMU and assignable PCI devices, see [`crate::lab`]), our vmm next to QEMU + KVM, for
//! the three device models:
//!
//! | model | our vmm | QEMU |
//! |---|---|---|
//! | in-VMM | `--disk` + `--net tap=` | virtio-blk-pci on an iothread (io_uring when L1's QEMU takes it) + virtio-net-pci on the same tap, `vhost=off` |
//! | vhost-user | `--vhost-user-blk` + `--vhost-user-net` to our daemons | `vhost-user-blk-pci` + `-netdev vhost-user` to the same daemons (guest RAM in a shared memfd) |
//! | passthrough | `--vfio` an NVMe and an e1000e | `-device vfio-pci` for the same NVMe and e1000e (side by side: the other pair) |
//!
//! With [`LabOptions::side_by_side`] (the default; `scripts/bench --sequential` turns it off),
//! each model runs side by side: both VMMs' L2s at once, each on its own device set (set a:
//! `disk-a.img`, the tap `bt-a` or the daemons of set a with `vut-a`, the NVMe 00:04.0 and
//! e1000e 00:02.0; set b: `disk-b.img`, `bt-b`, the daemons of set b, the NVMe 00:05.0 and
//! e1000e 00:06.0 of `Scenario::pair_devices`), ours on set a in odd runs and on set b in even
//! ones, and they take turns: [`SIDE_BY_SIDE_BATCHES`] batches of reads, then of pings, the
//! first turn alternating, the other L2 paused while one measures (ours with `vm.pause`, QEMU
//! with QMP `stop`). The host's speed moves by up to 2x within minutes (the same VM read 510
//! µs and then 1154 µs in one lab boot); turns a second apart see the same host, so the pair
//! compares the VMMs and not the moments. (In one lab boot, 24 turns of 500 passthrough reads: ours lower in 14, geometric
//! mean of ours / QEMU's 0.97, where one boot after the other in sequence had given 0 of 4 in
//! the 13:00 run.)
//!
//! One L1 boot per two runs (an L1 that dies of the lab's nested-virtualization flake costs its
//! boot and is booted once more); in the sequential mode each run runs the six configurations
//! one after the other (our vmm first in odd runs, QEMU first in even runs, so that neither
//! always boots into the state the other left, and both are measured in both orders under the
//! same L1, whose speed moves by a third between boots); an L2 that does not end cleanly is
//! booted once more (side by side: both, up to three times; an L2 stuck in a turn longer than
//! `turn_secs` is ended). Every L2 guest has the same generic kernel (it has the e1000e and
//! nvme drivers passthrough needs), initramfs, command line, 2 vCPUs and 512 MiB, and measures,
//! inside L2:
//! - `blk-read-qd1`: 4 KiB random reads at queue depth 1 with O_DIRECT on its disk
//!   (`tests/src/bin/lat.rs`; warm-up excluded); the in-VMM and vhost-user disks are 256 MiB
//!   files of zeros in L1's RAM (page cache; L1's scratch directory is on tmpfs, which has no
//!   O_DIRECT on its 6.1 kernel, so QEMU's `cache=none` is tried and refused — the config
//!   says what ran), passthrough's is the lab's NVMe;
//! - `net-rtt`: `ping -i 0.01` (busybox) to L1's end of the link (the tap, or for passthrough
//!   the peer e1000e at 00:03.0 on the same QEMU hub), after a settle ping; `lat --ping`
//!   sums ping's per-packet times up in L2 into one `LAT-RESULT` line (every byte L2 prints
//!   is a serial port exit, and the lab's L2s, QEMU's more often, have died in the middle of
//!   long console output);
//! - `boot-to-init`: from starting the VMM to the guest's init (`lab_console`).
//!
//! Beside the latencies:
//! - exits per operation (our vmm only): the vmm writes its exit counters (`--exit-stats`)
//!   only when the VM stops, so boot and driver probing cannot be split from the I/O phase.
//!   The figures are the whole VM's life divided by the test's operations: `device` (exits to
//!   the device under test: config-space and BAR accesses, mostly from the driver's probe),
//!   `notify` (queue doorbells that reached userspace instead of an ioeventfd) and
//!   `vm_total` (every exit of the VM, the serial console included). They are upper bounds;
//!   the configs of our vmm's I/O records say so (`exits/op over the whole VM`).
//! - in-kernel exits per operation (both VMMs, the I/O phase only): at each `LAT-PHASE`
//!   marker L1 also reads its KVM's counters (`/sys/kernel/debug/kvm/*`, summed over its
//!   VMs: only the L2 under test runs; side by side, the VM's own `<pid>-<fd>` directory),
//!   and the difference over the phase divided by the operations is `kvm_exits` (every exit
//!   of L2 to L1's KVM), `kvm_io` (port I/O exits: the port doorbells among them),
//!   `kvm_halt`, `kvm_irq_window` and `kvm_emulated` (instructions KVM fetched, decoded and
//!   emulated: every MMIO exit, and here every exit that skips an instruction, as L1's SVM
//!   has no next-RIP). They include the phase's idle time (0.5 s alone; side by side, the
//!   moment until L1 says "go").
//! - host CPU per operation: the L2 script prints `LAT-PHASE <phase> begin|end` around each
//!   measurement (and sleeps 0.5 s after `begin`, so that L1 reads the counters before the
//!   I/O starts); L1's console filter reads `/proc/<pid>/task/*/stat` of the VMM (without
//!   its vCPU threads: `vcpu*` in ours, `CPU n/KVM` in QEMU with `debug-threads=on`) and of
//!   the vhost-user daemons (side by side: of its set) at each marker. The difference over
//!   the phase, divided by the operations, is `cpu_us_per_op`. Ticks are 10 ms, so with few
//!   operations the figure is coarse; the phase also includes up to ~0.5 s of an idle
//!   guest.
//! - binaries: the project binaries come from the directory `lat` is found in (see
//!   `lat_binary`): a debug build measures an unoptimized vmm and daemons against Debian's
//!   optimized QEMU, which costs our device threads several times the CPU per I/O; run the
//!   bench from a release build for figures worth comparing.
//! - load: one [`LoadMeter`] around each L1 boot (the lab's QEMU and everything in it
//!   count as ours); every record of that run carries the same [`Load`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use super::{Load, LoadMeter, Matrix, Model, Record};
use crate::lab::{profile_dir, LabRun, Scenario};
use serde::{Deserialize, Serialize};

use crate::probe::{ExitStats, Summary};

/// What the lab matrix measures per configuration and run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabOptions {
    /// Runs of every configuration (interleaved).
    pub runs: u32,
    /// Measured 4 KiB reads per guest (16 warm-up reads more).
    pub blk_ops: u32,
    /// Measured pings per guest.
    pub pings: u32,
    /// `poll_us=` of our in-VMM devices and `--poll-us` of our daemons (QEMU's iothread
    /// polls by default too).
    pub poll_us: u32,
    /// Both VMMs' L2s of a model side by side, taking turns (see the module's
    /// documentation; the default), instead of one VM after the other.
    pub side_by_side: bool,
    /// Only this device model (default: all three).
    pub only_model: Option<Model>,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            runs: 3,
            blk_ops: 2000,
            pings: 500,
            poll_us: 50,
            side_by_side: true,
            only_model: None,
        }
    }
}

/// Warm-up reads `lat` does before measuring.
const WARMUP_READS: u32 = 16;

/// USER_HZ: the unit of /proc's CPU times in L1 (100 on every x86 Linux).
const L1_TICKS_PER_SEC: f64 = 100.0;

/// One configuration of the matrix (a VMM with one device model).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cfg {
    model: Model,
    vmm: &'static str,
}

const CONFIGS: [Cfg; 6] = [
    Cfg {
        model: Model::InVmm,
        vmm: "vmm",
    },
    Cfg {
        model: Model::InVmm,
        vmm: "qemu",
    },
    Cfg {
        model: Model::VhostUser,
        vmm: "vmm",
    },
    Cfg {
        model: Model::VhostUser,
        vmm: "qemu",
    },
    Cfg {
        model: Model::Passthrough,
        vmm: "vmm",
    },
    Cfg {
        model: Model::Passthrough,
        vmm: "qemu",
    },
];

impl Cfg {
    fn short(self) -> &'static str {
        match self.model {
            Model::InVmm => "invmm",
            Model::VhostUser => "vu",
            Model::Passthrough => "pt",
        }
    }

    /// The tag of run `run` (console markers, file names in L1).
    fn tag(self, run: u32) -> String {
        format!("r{run}-{}-{}", self.short(), self.vmm)
    }

    /// Our vmm's ids of the disk and the NIC (keys of its exit counters).
    fn device_ids(self) -> (&'static str, &'static str) {
        match self.model {
            Model::InVmm => ("disk0", "net0"),
            Model::VhostUser => ("vublk", "vunet"),
            Model::Passthrough => ("nvme0", "nic0"),
        }
    }

    /// The configuration strings of the blk, net and boot records.
    fn configs(self, qemu_blk: &str, side_by_side: bool) -> [String; 3] {
        let exits = " [exits/op over the whole VM]";
        let (side, idle) = if side_by_side {
            (", side by side", ", the other L2 idle")
        } else {
            ("", "")
        };
        match (self.model, self.vmm) {
            (Model::InVmm, "vmm") => [
                format!("virtio-blk{side}{exits}"),
                format!("virtio-net tap{side}{exits}"),
                format!("virtio-blk + virtio-net{idle}"),
            ],
            (Model::InVmm, _) => [
                format!("virtio-blk iothread {qemu_blk}{side}"),
                format!("virtio-net tap vhost=off{side}"),
                format!("virtio-blk + virtio-net{idle}"),
            ],
            (Model::VhostUser, "vmm") => [
                format!("vhost-user-blk (ours){side}{exits}"),
                format!("vhost-user-net (ours){side}{exits}"),
                format!("vhost-user-blk + vhost-user-net{idle}"),
            ],
            (Model::VhostUser, _) => [
                format!("vhost-user-blk (ours){side}"),
                // QEMU 7.2 crashes with MSI-X on -netdev vhost-user here (see
                // tests/tests/qemu_vhost_user_interop.rs): its NIC runs on INTx.
                format!("vhost-user-net (ours) vectors=0 (INTx){side}"),
                format!("vhost-user-blk + vhost-user-net{idle}"),
            ],
            (Model::Passthrough, "vmm") => [
                format!("nvme (vfio){side}{exits}"),
                format!("e1000e (vfio){side}{exits}"),
                format!("nvme + e1000e (vfio){idle}"),
            ],
            (Model::Passthrough, _) => [
                format!("nvme (vfio-pci){side}"),
                format!("e1000e (vfio-pci){side}"),
                format!("nvme + e1000e (vfio-pci){idle}"),
            ],
        }
    }
}

const L1_SCRIPT: &str = r#"
. /lab/lib.sh
RUN_FIRST=@RUN_FIRST@
RUN_LAST=@RUN_LAST@
mkdir -p $LAB_TMP/pids
# cputicks.sh [-v] [PIDFILE...]: user+system ticks of the processes whose PIDs are in the
# PIDFILEs (default $LAB_TMP/pids/*), without vCPU threads (ours: vcpuN; QEMU with
# debug-threads=on: "CPU N/KVM").
cat >$LAB_TMP/cputicks.sh <<'EOF'
verbose=
[ "${1:-}" = -v ] && verbose=1 && shift
[ $# = 0 ] && set -- $LAB_TMP/pids/*
for f in "$@"; do
    p=$(cat "$f" 2>/dev/null) && [ -n "$p" ] && cat /proc/$p/task/*/stat 2>/dev/null
done | awk -v verbose="$verbose" '{
    name = $0; sub(/^[0-9]+ \(/, "", name); sub(/\) [A-Za-z] .*$/, "", name)
    rest = $0; sub(/^.*\) /, "", rest); split(rest, f, " ")
    if (name ~ /^vcpu[0-9]/ || name ~ /^CPU [0-9]+\/KVM/) next
    s += f[12] + f[13]
    if (f[12] + f[13] > 0) { gsub(/ /, "_", name); v = v " " name "=" f[12] + f[13] }
} END { if (verbose) print s + 0, v; else print s + 0 }'
EOF
# kvmstat.sh [PIDFILE]: L1's KVM exit counters, one line: of the VM of the process whose PID
# is in PIDFILE (KVM's per-VM directory <pid>-<fd>), or of all VMs (only the L2 under test
# runs).
mount -t debugfs none /sys/kernel/debug 2>/dev/null
cat >$LAB_TMP/kvmstat.sh <<'EOF'
d=/sys/kernel/debug/kvm
if [ -n "${1:-}" ]; then
    p=$(cat "$1" 2>/dev/null)
    [ -n "$p" ] || exit 0
    d=$(ls -d $d/$p-* 2>/dev/null | head -n 1)
fi
[ -n "$d" ] && [ -r $d/exits ] || exit 0
for f in exits io_exits halt_exits irq_window_exits insn_emulation; do
    [ -r $d/$f ] && printf '%s=%s ' $f "$(cat $d/$f)"
done
echo
EOF
# phase_watch TAG [PIDFILE [CPU-PIDFILE...]]: pass the console on; at each "LAT-PHASE
# <phase> <edge>" from L2 print "LAB-VAL TAG-cpu-<phase>-<edge> <ticks>" and "LAB-VAL
# TAG-kvm-<phase>-<edge> <counters>": of the VM of the VMM whose PID is in PIDFILE and of the
# processes in the CPU-PIDFILEs (default PIDFILE) (two VMs side by side), else of every VM
# and every process in $LAB_TMP/pids. With PW_EVENTS set, the events side by side waits for
# also go to that file (a FIFO): L2-READY, "PHASE-READY <phase>" once the counters of a
# phase's begin are read, L2-BATCH-END, VMM-RC.
phase_watch() {
    tag=$1 vmpid=${2:-}
    shift
    [ $# -gt 0 ] && shift
    awk -v tag="$tag" -v vmpid="$vmpid" -v cpupids="${*:-$vmpid}" -v events="${PW_EVENTS:-}" '
        function event(s) { if (events != "") { print s > events; fflush(events) } }
        { print; fflush() }
        $1 == "L2-READY" || $1 == "L2-BATCH-END" || $1 == "VMM-RC" { event($0) }
        $1 == "LAT-PHASE" {
            cmd = "sh $LAB_TMP/kvmstat.sh " vmpid; k = ""; cmd | getline k; close(cmd)
            cmd = "sh $LAB_TMP/cputicks.sh " cpupids; t = ""; cmd | getline t; close(cmd)
            printf "LAB-VAL %s-cpu-%s-%s %s\n", tag, $2, $3, t; fflush()
            if (k != "") { printf "LAB-VAL %s-kvm-%s-%s %s\n", tag, $2, $3, k; fflush() }
            if ($2 == "blk" && $3 == "begin") {
                # Which threads used the CPU so far (boot): a diagnostic.
                cmd = "sh $LAB_TMP/cputicks.sh -v " cpupids; t = ""; cmd | getline t; close(cmd)
                printf "LAB-VAL %s-threads-at-boot %s\n", tag, t; fflush()
            }
            if ($3 == "begin") event("PHASE-READY " $2)
        }'
}

# The disks of the in-VMM and vhost-user models, in L1's RAM: set a, and set b for the
# second L2 side by side.
SETS=a
[ @SIDE_BY_SIDE@ = 1 ] && SETS="a b"
for s in $SETS; do
    dd if=/dev/zero of=$LAB_TMP/disk-$s.img bs=1M count=256 2>/dev/null
    check disk-image-$s [ "$(stat -c %s $LAB_TMP/disk-$s.img)" = 268435456 ]
done
# QEMU's drive options: the best L1's QEMU and its tmpfs accept.
QBLK=
for o in cache=none,aio=io_uring cache=writeback,aio=io_uring cache=none,aio=native cache=writeback,aio=threads; do
    echo quit | qemu-system-x86_64 -nodefaults -display none -S -monitor stdio \
        -drive if=none,id=d0,file=$LAB_TMP/disk-a.img,format=raw,$o >$LAB_TMP/qprobe.txt 2>&1
    rc=$?
    # QEMU's own errors start with its name; the exit status alone is not trusted here.
    err=$(grep '^qemu-system-x86_64:' $LAB_TMP/qprobe.txt | head -n 2 | tr '\n' ' ')
    echo "LAB-VAL qemu-drive-probe $o rc=$rc ${err:-no error}"
    if [ -z "$err" ]; then
        QBLK=$o
        break
    fi
done
echo "LAB-VAL qemu-blk-opts ${QBLK:-none}"
check qemu-drive [ -n "$QBLK" ]

# in-VMM: a tap per set, for either VMM; set a on 192.0.2.0/25, set b on 192.0.2.128/25.
for s in $SETS; do
    $IP tuntap add dev bt-$s mode tap vnet_hdr
    [ $s = a ] && $IP addr add 192.0.2.1/25 dev bt-$s || $IP addr add 192.0.2.129/25 dev bt-$s
    $IP link set bt-$s up
done
# passthrough: the NVMe and the e1000e to vfio-pci (set a: $NVME_BDF $NIC_BDF, set b:
# $NVME2_BDF $NIC2_BDF); L1's peer e1000e on the same hub (198.51.100.1/24).
check bind-nvme passthrough bind $NVME_BDF
check bind-nic passthrough bind $NIC_BDF
if [ @SIDE_BY_SIDE@ = 1 ]; then
    check bind-nvme2 passthrough bind $NVME2_BDF
    check bind-nic2 passthrough bind $NIC2_BDF
fi
peer=$(ls /sys/bus/pci/devices/$PEER_NIC_BDF/net/)
$IP addr add 198.51.100.1/24 dev $peer
$IP link set $peer up

# vu_start SET / vu_stop SET: our daemons of device set SET (a or b): disk-SET.img and the
# tap vut-SET (set a on 203.0.113.0/25, set b on 203.0.113.128/25), sockets blk-SET.sock and
# net-SET.sock, PIDs in $LAB_TMP/pids/blk-SET and net-SET.
vu_start() {
    s=$1
    rm -f $LAB_TMP/blk-$s.sock $LAB_TMP/net-$s.sock
    vhost-user-blk --socket-path $LAB_TMP/blk-$s.sock --blk-file $LAB_TMP/disk-$s.img --queues 2 --poll-us @POLL_US@ >>$LAB_TMP/vublk-$s.log 2>&1 &
    echo $! >$LAB_TMP/pids/blk-$s
    vhost-user-net --socket-path $LAB_TMP/net-$s.sock --tap vut-$s --mac 52:54:00:00:00:03 --poll-us @POLL_US@ >>$LAB_TMP/vunet-$s.log 2>&1 &
    echo $! >$LAB_TMP/pids/net-$s
    n=0
    while { [ ! -S $LAB_TMP/blk-$s.sock ] || [ ! -S $LAB_TMP/net-$s.sock ]; } && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
    [ $s = a ] && $IP addr add 203.0.113.1/25 dev vut-$s 2>/dev/null || $IP addr add 203.0.113.129/25 dev vut-$s 2>/dev/null
    $IP link set vut-$s up
}
vu_stop() {
    for f in $LAB_TMP/pids/blk-$1 $LAB_TMP/pids/net-$1; do
        p=$(cat $f 2>/dev/null) && kill $p 2>/dev/null && wait $p 2>/dev/null
        rm -f $f
    done
}

# dev_args MODEL vmm|qemu SET: the device arguments of an L2 of MODEL (invmm, vu, pt) on
# device set SET. No argument has a space in it.
dev_args() {
    if [ $3 = a ]; then nvme=$NVME_BDF nic=$NIC_BDF; else nvme=$NVME2_BDF nic=$NIC2_BDF; fi
    case $1-$2 in
    invmm-vmm) echo "--disk path=$LAB_TMP/disk-$3.img,id=disk0,poll_us=@POLL_US@" \
        "--net tap=bt-$3,mac=52:54:00:00:00:02,id=net0,poll_us=@POLL_US@" ;;
    invmm-qemu) echo "-object iothread,id=io0" \
        "-drive if=none,id=d0,file=$LAB_TMP/disk-$3.img,format=raw,$QBLK" \
        "-device virtio-blk-pci,drive=d0,iothread=io0" \
        "-netdev tap,id=n0,ifname=bt-$3,script=no,downscript=no,vhost=off" \
        "-device virtio-net-pci,netdev=n0,mac=52:54:00:00:00:02,romfile=" ;;
    vu-vmm) echo "--vhost-user-blk socket=$LAB_TMP/blk-$3.sock,queues=2,id=vublk" \
        "--vhost-user-net socket=$LAB_TMP/net-$3.sock,id=vunet,mac=52:54:00:00:00:03" ;;
    vu-qemu) echo "-object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem" \
        "-chardev socket,id=c0,path=$LAB_TMP/blk-$3.sock -device vhost-user-blk-pci,chardev=c0,num-queues=2" \
        "-chardev socket,id=c1,path=$LAB_TMP/net-$3.sock -netdev vhost-user,id=n0,chardev=c1" \
        "-device virtio-net-pci,netdev=n0,mac=52:54:00:00:00:03,romfile=,vectors=0" ;;
    pt-vmm) echo "--vfio host=$nvme,id=nvme0 --vfio host=$nic,id=nic0" ;;
    pt-qemu) echo "-device vfio-pci,host=$nvme -device vfio-pci,host=$nic" ;;
    esac
}
# net_args MODEL SET: L2's address and its peer in L1, for the kernel command line.
net_args() {
    case $1-$2 in
    invmm-a) echo "bench_ip=192.0.2.2/25 bench_peer=192.0.2.1" ;;
    invmm-b) echo "bench_ip=192.0.2.130/25 bench_peer=192.0.2.129" ;;
    vu-a) echo "bench_ip=203.0.113.2/25 bench_peer=203.0.113.1" ;;
    vu-b) echo "bench_ip=203.0.113.130/25 bench_peer=203.0.113.129" ;;
    pt-a) echo "bench_ip=198.51.100.2/24 bench_peer=198.51.100.1" ;;
    pt-b) echo "bench_ip=198.51.100.3/24 bench_peer=198.51.100.1" ;;
    esac
}
# cpu_pids MODEL SET VMM-PIDFILE: the PID files whose processes' CPU time an L2 of MODEL
# on SET costs: its VMM's, and for vhost-user the daemons of its set.
cpu_pids() {
    echo $3
    [ $1 = vu ] && echo $LAB_TMP/pids/blk-$2 $LAB_TMP/pids/net-$2
}

# l2_start vmm|qemu TAG CMDLINE INPUT DEVICE-ARGS...: start the VMM in the background ($! is
# its PID) on the generic kernel, 2 vCPUs, 512 MiB, the kernel command line CMDLINE, the
# serial port's input from INPUT, console and errors on stdout.
l2_start() {
    kind=$1 tag=$2 cmdline=$3 input=$4
    shift 4
    # The control socket (vm_ctl): our API, QEMU's QMP.
    rm -f $LAB_TMP/ctl-$tag.sock
    if [ $kind = vmm ]; then
        vmm --kernel "$L2_GENERIC_KERNEL" --initramfs "$L2_GENERIC_INITRD" --cmdline "$cmdline" \
            --cpus 2 --memory 512M --exit-stats $LAB_TMP/stats-$tag.json \
            --api-socket path=$LAB_TMP/ctl-$tag.sock "$@" <$input 2>&1 &
    else
        qemu-system-x86_64 -nodefaults -nographic -serial stdio -no-reboot \
            -enable-kvm -cpu host -m 512 -smp 2 -name l2,debug-threads=on \
            -qmp unix:$LAB_TMP/ctl-$tag.sock,server=on,wait=off \
            -kernel "$L2_GENERIC_KERNEL" -initrd "$L2_GENERIC_INITRD" -append "$cmdline" \
            "$@" <$input 2>&1 &
    fi
}

# vm R MODEL vmm|qemu: boot the L2 of run R, MODEL, on device set a, alone. A VM that does
# not end cleanly is booted once more (the lab's nested virtualization is flaky, and
# QEMU's serial drops output when its pipe stays full); the host reads the last attempt.
vm() {
    tag=r$1-$2-$3
    m=$2 kind=$3
    for attempt in 1 2; do
        rm -f $LAB_TMP/stats-$tag.json
        [ $m = vu ] && vu_start a
        echo "BENCH-BEGIN $tag"
        t0=$(lab_uptime)
        {
            l2_start $kind $tag "$L2_CMDLINE $(net_args $m a)" /dev/null $(dev_args $m $kind a)
            echo $! >$LAB_TMP/pids/vmm
            wait $!
            rc=$?
            # On a line of its own even if the guest's last line was cut.
            echo
            echo "VMM-RC $rc"
        } | lab_console "$t0" "$tag" | phase_watch "$tag" | tee $LAB_TMP/$tag.log
        rm -f $LAB_TMP/pids/vmm
        [ $m = vu ] && vu_stop a
        [ -f $LAB_TMP/stats-$tag.json ] && echo "LAB-VAL $tag-exit-stats $(cat $LAB_TMP/stats-$tag.json)"
        if grep -q '^VMM-RC 0$' $LAB_TMP/$tag.log && grep -q '^L2-EXIT 0$' $LAB_TMP/$tag.log; then break; fi
        [ $attempt = 1 ] && echo "LAB-VAL $tag-retry the VM did not end cleanly; booting it again"
    done
    check $tag-vmm-rc grep -q '^VMM-RC 0$' $LAB_TMP/$tag.log
    check $tag-l2-exit grep -q '^L2-EXIT 0$' $LAB_TMP/$tag.log
    echo "BENCH-END $tag"
}

# Side by side: both VMMs' L2s of a model run at once, each on its own device set (ours on
# set a in odd runs, on set b in even ones), and take turns: @BATCHES@ batches of reads, then
# of pings, alternating which goes first, the other L2 stopped. The host's speed changes by up
# to 2x within minutes here; turns a second apart see the same host. While a VM measures,
# this script forks nothing: it blocks on the VM's events (a FIFO its console filter writes)
# with `read -t`, so that L1 stays quiet (each fork in L1 is IPIs and TLB shootdowns that
# interrupt L2, and the lab's nested-SVM flake comes with interruptions).
# side_start V TAG CMDLINE CPU-PIDFILES DEVICE-ARGS...: boot V's (vmm or qemu) L2 in the
# background; its console goes (through lab_console and phase_watch) to $LAB_TMP/TAG.log,
# its events to the FIFO $LAB_TMP/TAG.ev, open for reading on fd $ev_V; its serial input is
# the FIFO $LAB_TMP/TAG.in, open for writing on fd $in_V.
side_start() {
    v=$1 tag=$2 cmdline=$3 cpu=$4
    shift 4
    eval "infd=\$in_$v evfd=\$ev_$v"
    eval "gone_$v=0 stuck_$v=0 pid_$v="
    rm -f $LAB_TMP/$tag.in $LAB_TMP/$tag.ev $LAB_TMP/stats-$tag.json $LAB_TMP/pids/side-$tag
    mkfifo $LAB_TMP/$tag.in $LAB_TMP/$tag.ev
    # Read-write: the open does not wait for the writer.
    eval "exec $evfd<>$LAB_TMP/$tag.ev"
    t0=$(lab_uptime)
    {
        l2_start $v $tag "$cmdline bench_batches=@BATCHES@" $LAB_TMP/$tag.in "$@"
        echo $! >$LAB_TMP/pids/side-$tag
        wait $!
        rc=$?
        echo
        echo "VMM-RC $rc"
    } | lab_console "$t0" "$tag" | PW_EVENTS=$LAB_TMP/$tag.ev phase_watch "$tag" \
        $LAB_TMP/pids/side-$tag $cpu >$LAB_TMP/$tag.log &
    echo $! >$LAB_TMP/$tag.pipe
    eval "exec $infd>$LAB_TMP/$tag.in"
}
# side_next V TAG PATTERN SECS: read V's events until one starts with PATTERN (status 0),
# its VMM ends (1) or SECS pass (1, and V counts as stuck; saying so every 20 s: the bench
# takes a quiet console for a stuck L1).
side_next() {
    eval "evfd=\$ev_$1 gone=\$gone_$1"
    [ "$gone" = 1 ] && return 1
    waited=0 step=20
    [ $4 -lt $step ] && step=$4
    while :; do
        if read -t $step -r event <&$evfd; then
            case $event in
            "$3"*) return 0 ;;
            VMM-RC*)
                eval "gone_$1=1"
                return 1
                ;;
            esac
        else
            waited=$((waited + step))
            if [ $waited -ge $4 ]; then
                echo "LAB-VAL $2-timeout no '$3' after $4 s"
                eval "stuck_$1=1"
                return 1
            fi
            echo "LAB-VAL $2-waiting for '$3' ($waited s)"
        fi
    done
}
# side_send V COMMAND: one command line to V's L2 (none once it is gone).
side_send() {
    eval "infd=\$in_$1 gone=\$gone_$1"
    [ "$gone" = 1 ] || echo "$2" >&$infd
}
# nic_reset BDF: give the e1000e to L1's driver and back to vfio-pci. The driver's probe
# resets it; vfio-pci's reset (D3hot -> D0) does not reach the lab's emulated e1000e, which
# otherwise keeps its last VM's descriptor rings (seen: DMA writes to a stale guest
# address, a DMAR fault, when the second VM of a lab boot enabled bus mastering).
nic_reset() {
    passthrough unbind $1 >/dev/null && passthrough bind $1 >/dev/null
}
# vm_ctl KIND TAG pause|resume: pause or resume the VM TAG through its control socket, as
# a user would: our vmm's API (vm.pause / vm.resume: vCPUs parked, devices quiesced, the
# guest's clock stopped), QEMU's QMP (stop / cont). A failure is a failed check.
vm_ctl() {
    if [ $1 = vmm ]; then
        vmm-remote --api-socket $LAB_TMP/ctl-$2.sock $3 >/dev/null 2>$LAB_TMP/ctl.err
    else
        if [ $3 = pause ]; then c=stop; else c=cont; fi
        qmp $LAB_TMP/ctl-$2.sock $c >/dev/null 2>$LAB_TMP/ctl.err
    fi || fail "$2-$3" "$(head -c 200 $LAB_TMP/ctl.err)"
}
# side_by_side R ORDER MODEL: run R of MODEL, both VMMs at once (ORDER: which boots and
# takes the first turn first).
side_by_side() {
    r=$1 order=$2 m=$3
    set -- $order
    reverse="$2 $1"
    if [ $((r % 2)) = 1 ]; then set_vmm=a set_qemu=b; else set_vmm=b set_qemu=a; fi
    in_vmm=5 ev_vmm=7 in_qemu=6 ev_qemu=8
    # A write to the FIFO of an L2 that just died must not end this script.
    trap '' PIPE
    # An attempt that loses a VM (the lab's L2s die now and then, QEMU's more often than
    # ours) loses the pair: both boot again, up to three times.
    for attempt in 1 2 3; do
        if [ $m = pt ]; then
            check r$r-pt-nic-reset-$attempt nic_reset $NIC_BDF
            check r$r-pt-nic2-reset-$attempt nic_reset $NIC2_BDF
        fi
        [ $m = vu ] && vu_start a && vu_start b
        echo "BENCH-SIDE r$r-$m"
        started=
        live=1
        for v in $order; do
            eval "s=\$set_$v"
            side_start $v r$r-$m-$v "$L2_CMDLINE $(net_args $m $s)" \
                "$(cpu_pids $m $s $LAB_TMP/pids/side-r$r-$m-$v)" $(dev_args $m $v $s)
            started="$started $v"
            # The next boots while this one waits: boot-to-init of one L2 with the other idle.
            side_next $v r$r-$m-$v L2-READY 240 || { echo "LAB-VAL r$r-$m-$v-not-ready"; live=0; break; }
            read -r pid_$v <$LAB_TMP/pids/side-r$r-$m-$v
        done
        # Between its turns a VM is paused (vm_ctl), so that one L2 runs at a time as in the
        # sequential mode: the lab loses far more L2s and L1s with two L2s running. (The
        # first VM runs while the second boots.)
        for v in $started; do vm_ctl $v r$r-$m-$v pause; done
        for phase in blk net; do
            k=1
            while [ $live = 1 ] && [ $k -le @BATCHES@ ]; do
                if [ $((k % 2)) = 1 ]; then turns=$order; else turns=$reverse; fi
                for v in $turns; do
                    vm_ctl $v r$r-$m-$v resume
                    side_send $v "$phase $k"
                    # L1 has read the VM's counters: it may start. A VM lost (or stuck)
                    # ends the attempt: the pair cannot be completed.
                    side_next $v r$r-$m-$v "PHASE-READY $phase" @TURN_SECS@ &&
                        side_send $v go &&
                        side_next $v r$r-$m-$v "L2-BATCH-END $phase $k" @TURN_SECS@ ||
                        { live=0; break; }
                    vm_ctl $v r$r-$m-$v pause
                done
                [ $live = 1 ] && echo "LAB-VAL r$r-$m-turn $phase $k"
                k=$((k + 1))
            done
        done
        # One at a time: summing up and printing the results is the only time both L2s
        # would be busy at once (most L2s lost side by side died there).
        for v in $started; do
            # Its PID from the file: a VM that never got ready has no pid_$v.
            read -r p <$LAB_TMP/pids/side-r$r-$m-$v
            eval "stuck=\$stuck_$v gone=\$gone_$v"
            [ "$gone" = 1 ] || vm_ctl $v r$r-$m-$v resume
            if [ "$gone" != 1 ]; then
                if [ "$stuck" != 1 ]; then
                    side_send $v quit
                    side_next $v r$r-$m-$v VMM-RC 60 && gone=1
                fi
                # A VMM whose guest is stuck, or does not power off, is ended (by its PID).
                if [ "$gone" != 1 ]; then
                    kill $p 2>/dev/null
                    side_next $v r$r-$m-$v VMM-RC 20 || kill -KILL $p 2>/dev/null
                fi
            fi
            wait $(cat $LAB_TMP/r$r-$m-$v.pipe)
        done
        exec 5>&- 6>&- 7<&- 8<&-
        [ $m = vu ] && vu_stop a && vu_stop b
        ok=$live
        for v in $started; do
            tag=r$r-$m-$v
            echo "BENCH-BEGIN $tag"
            cat $LAB_TMP/$tag.log
            [ -f $LAB_TMP/stats-$tag.json ] && echo "LAB-VAL $tag-exit-stats $(cat $LAB_TMP/stats-$tag.json)"
            echo "BENCH-END $tag"
            grep -q '^VMM-RC 0$' $LAB_TMP/$tag.log && grep -q '^L2-EXIT 0$' $LAB_TMP/$tag.log || ok=0
        done
        [ $ok = 1 ] && break
        [ $attempt -lt 3 ] && echo "LAB-VAL r$r-$m-retry a VM did not end cleanly; booting both again"
    done
    trap - PIPE
    rm -f $LAB_TMP/pids/side-*
    for v in $order; do
        check r$r-$m-$v-vmm-rc grep -qs '^VMM-RC 0$' $LAB_TMP/r$r-$m-$v.log
        check r$r-$m-$v-l2-exit grep -qs '^L2-EXIT 0$' $LAB_TMP/r$r-$m-$v.log
    done
    check r$r-$m-turns [ $live = 1 ]
}

# hotplug R ORDER: hotplug latency of run R (side by side only), each VMM in turn: an L2
# booted with no device (its script waits for them, bench_hotplug=1), then the e1000e
# (VFIO) and a virtio disk added through the control socket (our API's vm.add-device and
# vm.add-disk, QEMU's QMP device_add), each timed from the call to the end of the guest
# driver's probe (its netdev or disk registered: the guest polls sysfs every 10 ms and says
# L2-HOTPLUG-BOUND; L1 looks every 20 ms).
# QEMU's disk backend is added (blockdev-add) before the clock starts; ours opens its image
# within the call.
hotplug() {
    for v in $2; do
        tag=r$1-hp-$v
        check $tag-nic-reset nic_reset $NIC_BDF
        rm -f $LAB_TMP/hp.img && truncate -s 64M $LAB_TMP/hp.img
        echo "BENCH-BEGIN $tag"
        t0=$(lab_uptime)
        # Our vmm's sandbox (Landlock) lets it open, after its start, only what its command
        # line names: the image it will hot-add is declared for it, as a user must.
        hp_args=
        [ $v = vmm ] && hp_args="--landlock-rules path=$LAB_TMP/hp.img,access=rw"
        {
            l2_start $v $tag "$L2_CMDLINE bench_hotplug=1" /dev/null $hp_args
            echo $! >$LAB_TMP/pids/hp
            wait $!
            rc=$?
            echo
            echo "VMM-RC $rc"
        } | lab_console "$t0" "$tag" | tee $LAB_TMP/$tag.log &
        if wait_for $LAB_TMP/$tag.log '^L2-READY' 240; then
            hp_one $v $tag nic
            hp_one $v $tag disk
        else
            fail $tag-ready "the guest never said L2-READY"
        fi
        if ! wait_for $LAB_TMP/$tag.log '^VMM-RC' 120; then
            kill $(cat $LAB_TMP/pids/hp) 2>/dev/null
            wait_for $LAB_TMP/$tag.log '^VMM-RC' 20
        fi
        check $tag-vmm-rc grep -qs '^VMM-RC 0$' $LAB_TMP/$tag.log
    done
}
# hp_one KIND TAG nic|disk: one hot-add, timed.
hp_one() {
    ctl=$LAB_TMP/ctl-$2.sock
    if [ $1 = qemu ] && [ $3 = disk ]; then
        qmp $ctl blockdev-add "{\"driver\": \"raw\", \"node-name\": \"hpd\", \"file\": {\"driver\": \"file\", \"filename\": \"$LAB_TMP/hp.img\"}}" \
            >/dev/null 2>$LAB_TMP/hp.err || { fail $2-$3-backend "$(head -c 200 $LAB_TMP/hp.err)"; return; }
    fi
    t0=$(lab_uptime)
    case $1-$3 in
    vmm-nic) vmm-remote --api-socket $ctl add-device path=/sys/bus/pci/devices/$NIC_BDF,id=hpnic ;;
    vmm-disk) vmm-remote --api-socket $ctl add-disk path=$LAB_TMP/hp.img,id=hpdisk ;;
    qemu-nic) qmp $ctl device_add "{\"driver\": \"vfio-pci\", \"host\": \"$NIC_BDF\", \"id\": \"hpnic\"}" ;;
    qemu-disk) qmp $ctl device_add '{"driver": "virtio-blk-pci", "drive": "hpd", "id": "hpdisk"}' ;;
    esac >/dev/null 2>$LAB_TMP/hp.err || { fail $2-$3-add "$(head -c 200 $LAB_TMP/hp.err)"; return; }
    n=0
    until grep -q "^L2-HOTPLUG-BOUND $3" $LAB_TMP/$2.log; do
        n=$((n + 1))
        if [ $n -gt 3000 ]; then
            fail $2-$3-bound "no driver bound 60 s after the call"
            return
        fi
        sleep 0.02
    done
    echo "LAB-VAL $2-$3-s $(awk "BEGIN { print $(lab_uptime) - $t0 }")"
}

r=$RUN_FIRST
while [ $r -le $RUN_LAST ]; do
    if [ $((r % 2)) = 1 ]; then order="vmm qemu"; else order="qemu vmm"; fi
    for m in @MODELS@; do
        if [ @SIDE_BY_SIDE@ = 1 ]; then
            side_by_side $r "$order" $m
        else
            # One after the other; passthrough's e1000e gets a clean reset between VMs too.
            for v in $order; do
                [ $m = pt ] && check r$r-pt-$v-nic-reset nic_reset $NIC_BDF
                vm $r $m $v
            done
        fi
    done
    [ @SIDE_BY_SIDE@ = 1 ] && hotplug $r "$order"
    r=$((r + 1))
done
for s in $SETS; do $IP link del bt-$s; done
check unbind-nic passthrough unbind $NIC_BDF
check unbind-nvme passthrough unbind $NVME_BDF
if [ @SIDE_BY_SIDE@ = 1 ]; then
    check unbind-nic2 passthrough unbind $NIC2_BDF
    check unbind-nvme2 passthrough unbind $NVME2_BDF
fi
lab_finish
"#;

const L2_SCRIPT: &str = r#"
OPS=@BLK_OPS@
PINGS=@PINGS@
P50S=
# L2's address/prefix and its peer in L1 (the kernel command line says).
IP=
PEER=
BATCHES=0
for x in $(cat /proc/cmdline); do
    case $x in
    bench_ip=*) IP=${x#bench_ip=} ;;
    bench_peer=*) PEER=${x#bench_peer=} ;;
    bench_batches=*) BATCHES=${x#bench_batches=} ;;
    esac
done
# Hotplug latency (L1's `hotplug`): no device at boot; say when each one L1 adds has its
# driver bound (the e1000e, then a virtio disk), then power off.
if grep -qw bench_hotplug=1 /proc/cmdline; then
    echo "L2-READY"
    # bound PATTERN WHAT: wait (10 ms steps, at most 120 s) for PATTERN to exist.
    bound() {
        n=0
        until ls $1 >/dev/null 2>&1; do
            n=$((n + 1)); [ $n -gt 12000 ] && return 1
            sleep 0.01
        done
        echo "L2-HOTPLUG-BOUND $2"
    }
    # The ends of the drivers' probes: the netdev is registered last in e1000e's probe, the
    # disk last in virtio_blk's (the driver's sysfs link comes before its probe runs).
    bound '/sys/class/net/eth*' nic && bound /sys/block/vda disk
    sleep 1
    exit 0
fi
# The disk: virtio-blk, or the assigned NVMe (probed asynchronously).
n=0
dev=
while [ -z "$dev" ] && [ $n -lt 100 ]; do
    for d in /dev/vda /dev/nvme0n1; do [ -b $d ] && dev=$d; done
    [ -n "$dev" ] || { sleep 0.1; n=$((n + 1)); }
done
echo "L2-VAL disk ${dev:-none}"
n=0
ifc=
while [ -z "$ifc" ] && [ $n -lt 100 ]; do
    ifc=$(ls /sys/class/net | grep -v '^lo$' | head -n 1)
    [ -n "$ifc" ] || { sleep 0.1; n=$((n + 1)); }
done
echo "L2-VAL nic ${ifc:-none}"
ip link set "$ifc" up
ip addr add "$IP" dev "$ifc"
n=0; until [ "$(cat /sys/class/net/$ifc/carrier 2>/dev/null)" = 1 ] || [ $n -ge 100 ]; do sleep 0.1; n=$((n + 1)); done
# Settle: the first packets after a passthrough bind can be lost (see lab_vfio.rs).
n=0; until ping -c 1 -W 1 "$PEER" >/dev/null 2>&1 || [ $n -ge 20 ]; do n=$((n + 1)); done
echo "L2-VAL settle-lost $n"
# phase_begin PHASE: L1 reads its counters at each LAT-PHASE marker: side by side, L1 says
# "go" once it has; alone, 0.5 s is plenty.
phase_begin() {
    echo "LAT-PHASE $1 begin"
    if [ "$BATCHES" -gt 0 ]; then read -r go; else sleep 0.5; fi
}
# blk_batch READS SEED, net_batch PINGS: one measured batch.
blk_batch() {
    phase_begin blk
    # Each batch's p50 is printed at the end, its errors after the phase: every byte on the
    # console is a serial exit. No process but lat: every fork and exec is a burst of page
    # faults in L2, each a chance for the lab's nested-SVM flake.
    lat --samples $LAB_TMP/lat.txt "$dev" "$1" @WARMUP@ "$2" >$LAB_TMP/batch.txt
    echo "LAT-PHASE blk end"
    while read -r line; do
        case $line in
        LAT-RESULT*)
            p=${line#*\"p50_ns\":}
            P50S="$P50S ${p%%,*}"
            ;;
        *) echo "$line" ;;
        esac
    done <$LAB_TMP/batch.txt
}
net_batch() {
    phase_begin net
    ping -c "$1" -i 0.01 -W 2 "$PEER" >>$LAB_TMP/ping.txt 2>&1
    echo "LAT-PHASE net end"
}
if [ "$BATCHES" -gt 0 ]; then
    # Side by side: L1 gives the turns on the serial port ("blk K", "net K", "quit").
    stty -F /dev/ttyS0 -echo 2>/dev/null
    echo "L2-READY"
    while read -r cmd k; do
        case $cmd in
        blk) blk_batch $((OPS / BATCHES)) "$k" ;;
        net) net_batch $((PINGS / BATCHES)) ;;
        quit) break ;;
        *) continue ;;
        esac
        echo "L2-BATCH-END $cmd $k"
    done </dev/ttyS0
else
    blk_batch "$OPS" 1
    net_batch "$PINGS"
fi
# The results, short: every byte on the console is a serial exit, and the lab's L2s have
# died in the middle of long output (QEMU's more often).
lat --summary $LAB_TMP/lat.txt
lat --ping $LAB_TMP/ping.txt
awk '/packets transmitted/ { s += $1; r += $4 } END { print "L2-PING-STAT", s + 0, "sent,", r + 0, "received" }' $LAB_TMP/ping.txt
echo "L2-BATCH-P50-NS$P50S"
# Let the console drain before init powers off.
sleep 1
"#;

/// The L1 script of runs `first..=last` (one L1 boot).
fn l1_script(first: u32, last: u32, opts: &LabOptions) -> String {
    L1_SCRIPT
        .replace("@RUN_FIRST@", &first.to_string())
        .replace("@RUN_LAST@", &last.to_string())
        .replace("@POLL_US@", &opts.poll_us.to_string())
        .replace("@SIDE_BY_SIDE@", if opts.side_by_side { "1" } else { "0" })
        .replace("@BATCHES@", &SIDE_BY_SIDE_BATCHES.to_string())
        .replace("@TURN_SECS@", &turn_secs(opts).to_string())
        .replace("@MODELS@", &models(opts).join(" "))
}

/// The configurations the options ask for.
fn configs(opts: &LabOptions) -> impl Iterator<Item = Cfg> + '_ {
    CONFIGS
        .into_iter()
        .filter(|c| opts.only_model.is_none_or(|m| c.model == m))
}

/// The models' short names, in the order they run.
fn models(opts: &LabOptions) -> Vec<&'static str> {
    let mut v: Vec<&'static str> = configs(opts).map(Cfg::short).collect();
    v.dedup();
    v
}

/// What a 4 KiB read costs in the lab at most, in seconds (they take well under 1 ms).
const LAB_SECS_PER_READ: f64 = 0.002;
/// What a ping costs in the lab, in seconds (`ping -i 0.01`, ~12 ms apart measured).
const LAB_SECS_PER_PING: f64 = 0.03;

/// How long a side-by-side turn may take before its L2 counts as stuck: five times what a
/// batch takes in the lab, plus 20 s. A stuck L2 (seen: an RCU stall on its vCPU 0) costs
/// this once, then the pair boots again.
fn turn_secs(opts: &LabOptions) -> u32 {
    let batch = (f64::from(opts.blk_ops) * LAB_SECS_PER_READ)
        .max(f64::from(opts.pings) * LAB_SECS_PER_PING)
        / f64::from(SIDE_BY_SIDE_BATCHES);
    20 + (5.0 * batch).ceil() as u32
}

/// Turns of each phase when two L2s run side by side: the reads and pings of a guest are
/// split into this many batches.
pub const SIDE_BY_SIDE_BATCHES: u32 = 6;

/// The L2 script for `opts`.
fn l2_script(opts: &LabOptions) -> String {
    L2_SCRIPT
        .replace("@BLK_OPS@", &opts.blk_ops.to_string())
        .replace("@PINGS@", &opts.pings.to_string())
        .replace("@WARMUP@", &WARMUP_READS.to_string())
}

/// The `lat` binary and the directory of the project binaries (`vmm`, the daemons,
/// `passthrough`) to measure: beside the running executable when `lat` is there (the bench,
/// so that a release bench measures release binaries), else this profile's directory
/// (integration tests: `target/debug` for `cargo test`, `target/release` with `--release`).
fn lat_binary() -> Result<(PathBuf, PathBuf), String> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|p| p.to_path_buf()))
    {
        dirs.push(dir);
    }
    dirs.push(profile_dir());
    for d in &dirs {
        let lat = d.join("lat");
        if lat.is_file() {
            return Ok((lat, d.clone()));
        }
    }
    Err(format!(
        "the lat binary is not in {dirs:?}: cargo build -p tests --bins"
    ))
}

/// Runs the lab matrix; `progress` gets one human line per step (e.g.
/// "lab: run 2/3: qemu passthrough").
pub fn run_lab(opts: &LabOptions, progress: &mut dyn FnMut(&str)) -> Result<Vec<Record>, String> {
    if opts.runs == 0 || opts.blk_ops == 0 || opts.pings == 0 {
        return Err(format!("lab: nothing to measure: {opts:?}"));
    }
    if opts.side_by_side
        && (opts.blk_ops < SIDE_BY_SIDE_BATCHES || opts.pings < SIDE_BY_SIDE_BATCHES)
    {
        return Err(format!(
            "lab: side by side, the VMs take turns in {SIDE_BY_SIDE_BATCHES} batches: \
             at least {SIDE_BY_SIDE_BATCHES} reads and pings are needed ({opts:?})"
        ));
    }
    let (lat, bins) = lat_binary()?;
    for b in [
        "vmm",
        "vmm-remote",
        "vhost-user-blk",
        "vhost-user-net",
        "passthrough",
        "qmp",
    ] {
        if !bins.join(b).is_file() {
            return Err(format!(
                "{} missing: cargo build --workspace --bins (same profile as lat)",
                bins.join(b).display()
            ));
        }
    }
    // About 8 s per L2 boot (up to 30 s seen), the reads, the pings, the daemons and the
    // output; plus L1's boot and setup.
    let per_vm = 45.0
        + f64::from(opts.blk_ops) * LAB_SECS_PER_READ
        + f64::from(opts.pings) * LAB_SECS_PER_PING;
    // Side by side, each run also boots one L2 per VMM for the hotplug latency (~60 s each).
    let hotplug = if opts.side_by_side { 120.0 } else { 0.0 };
    let timeout = Duration::from_secs_f64(
        200.0 + (6 * RUNS_PER_BOOT) as f64 * per_vm + f64::from(RUNS_PER_BOOT) * hotplug,
    );
    progress(&format!(
        "lab: {} run(s), two per L1 boot, x {} configurations ({} reads, {} pings each), \
         binaries from {}, timeout {} s per L1",
        opts.runs,
        configs(opts).count(),
        opts.blk_ops,
        opts.pings,
        bins.display(),
        timeout.as_secs()
    ));
    if opts.runs % 2 == 1 {
        // Runs alternate which VMM of a pair boots first; only an even count balances that.
        progress(&format!(
            "lab: {} runs: our vmm boots first of its pair in {} of them, QEMU in {}; use an \
             even --runs for a balanced order",
            opts.runs,
            opts.runs.div_ceil(2),
            opts.runs / 2
        ));
    }
    let mut records = Vec::new();
    let mut l1_seconds = 0.0;
    for (first, last) in boots(opts.runs) {
        // Two runs per L1 boot, in both orders (our vmm first of each pair in odd runs,
        // QEMU in even ones): both VMMs are measured under the same L1, which moves by a
        // third between boots. A crash of the lab's nested virtualization costs one boot, and
        // each boot gets the load measured around it.
        let r = if first == last {
            format!("{first}")
        } else {
            format!("{first}-{last}")
        };
        let mut scenario = Scenario::new(
            // Its own scenario directory and log per mode (the tests run both at once).
            &format!(
                "bench_lab{}_r{r}",
                if opts.side_by_side { "_side" } else { "" }
            ),
            &l1_script(first, last, opts),
        )
        .l2_script(&l2_script(opts))
        .l2_bin(&lat)
        .bin(bins.join("qmp"))
        .project_bins(&bins)
        .with_qemu()
        // L1: a 256 MiB disk and a 512 MiB L2 (two of each side by side), QEMU or our vmm (both), two
        // daemons, the images.
        .mem_mib(if opts.side_by_side { 3584 } else { 2560 })
        // Every step prints within seconds (the longest quiet one, 500 pings, about 10 s);
        // a stuck L1 costs a minute, not the default 150 s.
        .stall(Duration::from_secs(60))
        .timeout(timeout);
        if opts.side_by_side {
            scenario = scenario.pair_devices();
        }
        let total = opts.runs;
        let side_by_side = opts.side_by_side;
        let mut on_line = |line: &str| {
            if let Some(tag) = line.strip_prefix("BENCH-BEGIN ") {
                // Side-by-side sections are printed after the fact.
                if !side_by_side {
                    if let Some(msg) = describe_tag(tag.trim(), total) {
                        progress(&msg);
                    }
                }
            } else if let Some(tag) = line.strip_prefix("BENCH-SIDE ") {
                if let Some(msg) = describe_side(tag.trim(), total) {
                    progress(&msg);
                }
            } else if line.starts_with("LAB-INIT") {
                progress(&format!("lab: runs {r} of {total}: L1 is up"));
            } else if let Some(f) = line.strip_prefix("LAB-FAIL ") {
                progress(&format!("lab: FAILED {f}"));
            } else if line.starts_with("LAB-VAL") && line.contains("-retry ") {
                progress(&format!("lab: {}", &line[8..]));
            }
        };
        let mut attempt = 1;
        let (run, load) = loop {
            let meter = LoadMeter::start();
            let own0 = own_ticks();
            let run = scenario
                .run_with(&mut on_line)
                .map_err(|e| format!("lab: {e}"))?;
            let load = meter.finish(own_ticks().saturating_sub(own0));
            // The lab's known flake: an L1 vCPU stuck in nested SVM (a soft lockup, or L1
            // dies after its L2 stalls). Up to L1_ATTEMPTS times per pair of runs, boot L1 again.
            if run.l1_died() && attempt < L1_ATTEMPTS {
                let kept = run.log.with_extension(format!("failed-{attempt}.log"));
                let _ = std::fs::copy(&run.log, &kept);
                attempt += 1;
                on_line(&format!(
                    "LAB-FAIL l1-crash runs {r}: {} (log {}); booting L1 again ({attempt} of {L1_ATTEMPTS})",
                    run.outcome,
                    kept.display()
                ));
                continue;
            }
            break (run, load);
        };
        l1_seconds += run.duration.as_secs_f64();
        let mut v = Vec::new();
        for n in first..=last {
            v.append(&mut records_from_run(&run, opts, n, load)?);
        }
        if !run.success() {
            return Err(format!(
                "lab: runs {r}: {} after {:.0} s; failed checks: {:?}; log: {}",
                run.outcome,
                run.duration.as_secs_f64(),
                run.failures(),
                run.log.display()
            ));
        }
        records.append(&mut v);
    }
    progress(&format!(
        "lab: done, {} records, {l1_seconds:.0} s of L1",
        records.len()
    ));
    Ok(records)
}

/// L1 boots the bench tries per pair of runs. A pair takes about 6 minutes of L1; on a bad
/// day of the lab's nested-virtualization flake one L1 boot in three dies (the 16:00 run of
/// 2026-12-06 lost three in a row on one pair, and with them the whole bench), more than the
/// tests' three attempts allow for a 25-minute job.
const L1_ATTEMPTS: u32 = 5;

/// Runs per L1 boot (see [`boots`]).
const RUNS_PER_BOOT: u32 = 2;

/// The L1 boots of `runs` runs: (first run, last run) of each, two runs a boot.
fn boots(runs: u32) -> Vec<(u32, u32)> {
    (1..=runs)
        .step_by(RUNS_PER_BOOT as usize)
        .map(|f| (f, (f + RUNS_PER_BOOT - 1).min(runs)))
        .collect()
}

/// "lab: run 2/3: qemu passthrough" for a tag `r2-pt-qemu`.
fn describe_tag(tag: &str, runs: u32) -> Option<String> {
    let mut it = tag.splitn(3, '-');
    let run = it.next()?.strip_prefix('r')?;
    let short = it.next()?;
    let vmm = it.next()?;
    let cfg = CONFIGS
        .iter()
        .find(|c| c.short() == short && c.vmm == vmm)?;
    Some(format!("lab: run {run}/{runs}: {vmm} {}", cfg.model.name()))
}

/// "lab: run 2/4: vhost-user, our vmm and QEMU side by side" for a tag `r2-vu`.
fn describe_side(tag: &str, runs: u32) -> Option<String> {
    let (run, short) = tag.strip_prefix('r')?.split_once('-')?;
    let cfg = CONFIGS.iter().find(|c| c.short() == short)?;
    Some(format!(
        "lab: run {run}/{runs}: {}, our vmm and QEMU side by side",
        cfg.model.name()
    ))
}

/// User + system ticks of this process and its waited-for children (the lab script and its
/// QEMU), in this machine's clock ticks.
fn own_ticks() -> u64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let Some(rest) = s.rfind(')').map(|i| &s[i + 1..]) else {
        return 0;
    };
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(4)
        .filter_map(|x| x.parse().ok())
        .collect();
    // utime, stime, cutime, cstime (fields 14-17 of stat).
    f.iter().sum()
}

/// The console lines between the last `BENCH-BEGIN tag` (a VM that failed is booted once
/// more) and `BENCH-END tag`.
fn section<'a>(run: &'a LabRun, tag: &str) -> Option<Vec<&'a str>> {
    let begin = format!("BENCH-BEGIN {tag}");
    let end = format!("BENCH-END {tag}");
    let start = run.lines.iter().rposition(|l| l.text.trim_end() == begin)?;
    let mut out = Vec::new();
    for l in &run.lines[start + 1..] {
        if l.text.trim_end() == end {
            return Some(out);
        }
        out.push(l.text.as_str());
    }
    // The VM did not finish (the scenario was killed): what there is.
    Some(out)
}

/// The rest of every line of `lines` that starts with the word `key`, in order.
fn fields<'a>(lines: &[&'a str], key: &str) -> Vec<&'a str> {
    lines
        .iter()
        .filter_map(|l| {
            l.strip_prefix(key)
                .filter(|r| r.is_empty() || r.starts_with(' '))
                .map(str::trim)
        })
        .collect()
}

/// The sum of `delta(begin, end)` over a phase's batches: the begin and end readings pair up
/// in order. `None` when there is none, when they do not pair up, or when any reading or
/// difference is missing (a counter that went backwards).
fn phase_sum<T>(
    begins: &[Option<T>],
    ends: &[Option<T>],
    delta: impl Fn(&T, &T) -> Option<u64>,
) -> Option<u64> {
    if begins.is_empty() || begins.len() != ends.len() {
        return None;
    }
    begins.iter().zip(ends).try_fold(0u64, |sum, (b, e)| {
        sum.checked_add(delta(b.as_ref()?, e.as_ref()?)?)
    })
}

/// The rest of the first line of `lines` that starts with the word `key`.
fn field<'a>(lines: &[&'a str], key: &str) -> Option<&'a str> {
    lines.iter().find_map(|l| {
        l.strip_prefix(key)
            .filter(|r| r.is_empty() || r.starts_with(' '))
            .map(str::trim)
    })
}

/// Builds the records of every configuration in run `r`; an error names every configuration
/// whose measurements are missing or malformed.
fn records_from_run(
    run: &LabRun,
    opts: &LabOptions,
    r: u32,
    load: Load,
) -> Result<Vec<Record>, String> {
    let qemu_blk = run.value("qemu-blk-opts").unwrap_or("?").to_string();
    let mut records = Vec::new();
    let mut errors = Vec::new();
    for cfg in configs(opts) {
        let tag = cfg.tag(r);
        let Some(lines) = section(run, &tag) else {
            errors.push(format!("{tag}: never started"));
            continue;
        };
        match config_records(&lines, cfg, r, &qemu_blk, opts, load) {
            Ok(mut v) => records.append(&mut v),
            Err(e) => errors.push(format!("{tag}: {e}")),
        }
    }
    if opts.side_by_side {
        match hotplug_records(run, r, load) {
            Ok(mut v) => records.append(&mut v),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(records)
    } else {
        Err(format!(
            "lab: {} ({}; log {}):\n  {}",
            if run.success() {
                "measurements missing"
            } else {
                "the lab run failed"
            },
            run.outcome,
            run.log.display(),
            errors.join("\n  ")
        ))
    }
}

/// The hotplug records of run `r` (side by side): per VMM, the seconds from the call that
/// adds the e1000e (VFIO; `hotplug-nic`, model passthrough) and a virtio disk
/// (`hotplug-disk`, model in-VMM) to the guest's driver bound (`LAB-VAL r<R>-hp-<vmm>-<dev>-s`).
fn hotplug_records(run: &LabRun, r: u32, load: Load) -> Result<Vec<Record>, String> {
    let mut v = Vec::new();
    for vmm in ["vmm", "qemu"] {
        for (dev, model, test, config) in [
            (
                "nic",
                Model::Passthrough,
                "hotplug-nic",
                if vmm == "vmm" {
                    "vm.add-device (e1000e, VFIO)"
                } else {
                    "QMP device_add vfio-pci (e1000e)"
                },
            ),
            (
                "disk",
                Model::InVmm,
                "hotplug-disk",
                if vmm == "vmm" {
                    "vm.add-disk (virtio-blk)"
                } else {
                    "QMP device_add virtio-blk-pci"
                },
            ),
        ] {
            let key = format!("r{r}-hp-{vmm}-{dev}-s");
            let secs: f64 = run
                .value(&key)
                .ok_or_else(|| format!("r{r}-hp-{vmm}: no {key}"))?
                .parse()
                .map_err(|e| format!("{key}: {e}"))?;
            v.push(Record {
                matrix: Matrix::Lab,
                model,
                vmm: vmm.to_string(),
                config: config.to_string(),
                test: test.to_string(),
                run: r,
                n: 1,
                latency: None,
                iops: None,
                seconds: Some(secs),
                exits_per_op: BTreeMap::new(),
                cpu_us_per_op: None,
                load,
            });
        }
    }
    Ok(v)
}

/// The three records (blk, net, boot) of one configuration in one run, from its console
/// section.
fn config_records(
    lines: &[&str],
    cfg: Cfg,
    run: u32,
    qemu_blk: &str,
    opts: &LabOptions,
    load: Load,
) -> Result<Vec<Record>, String> {
    let tag = cfg.tag(run);
    if let Some(e) = field(lines, "LAT-ERROR") {
        return Err(format!("lat failed: {e}"));
    }
    // lat's summaries: of the reads and of ping's round trips.
    let results = lines
        .iter()
        .filter(|l| l.starts_with("LAT-RESULT"))
        .map(|l| parse_lat_result(l))
        .collect::<Result<Vec<_>, _>>()?;
    let result = |test: &str| {
        results
            .iter()
            .find(|r| r.test == test)
            .cloned()
            .ok_or_else(|| format!("no LAT-RESULT line of {test}"))
    };
    let lat = result("blk-read-qd1")?;
    let ping = result("net-rtt")?;
    let boot = field(lines, &format!("LAB-T {tag}-init"))
        .ok_or("no init time (L2 did not reach init)")?
        .parse::<f64>()
        .map_err(|e| format!("init time: {e}"))?;
    // Host CPU over a phase (summed over its batches when side by side).
    let cpu = |phase: &str| -> Option<f64> {
        let get = |edge: &str| -> Vec<Option<u64>> {
            fields(lines, &format!("LAB-VAL {tag}-cpu-{phase}-{edge}"))
                .into_iter()
                .map(|v| v.parse().ok())
                .collect()
        };
        let ticks = phase_sum(&get("begin"), &get("end"), |b, e| e.checked_sub(*b))?;
        Some(ticks as f64 / L1_TICKS_PER_SEC * 1e6)
    };
    let stats = match field(lines, &format!("LAB-VAL {tag}-exit-stats")) {
        Some(text) if cfg.vmm == "vmm" => Some(parse_exit_stats(text)?),
        None if cfg.vmm == "vmm" => return Err("no exit stats from the vmm".into()),
        _ => None,
    };
    let (disk_id, nic_id) = cfg.device_ids();
    let exits = |id: &str, ops: u64| -> BTreeMap<String, f64> {
        let Some(s) = &stats else {
            return BTreeMap::new();
        };
        let per = |v: u64| v as f64 / ops.max(1) as f64;
        let mut m = BTreeMap::new();
        m.insert("device".to_string(), per(s.device(id)));
        m.insert("notify".to_string(), per(s.notify(id)));
        m.insert("vm_total".to_string(), per(s.total));
        m
    };
    // L1's KVM counters over a phase, per operation (both VMMs).
    let kvm = |phase: &str, ops: u64| -> Result<BTreeMap<String, f64>, String> {
        let get = |edge: &str| -> Result<Vec<Option<BTreeMap<String, u64>>>, String> {
            fields(lines, &format!("LAB-VAL {tag}-kvm-{phase}-{edge}"))
                .into_iter()
                .map(|v| parse_kvm_counters(v).map(Some))
                .collect()
        };
        let (b, e) = (get("begin")?, get("end")?);
        let mut m = BTreeMap::new();
        for (stat, key) in KVM_COUNTERS {
            let d = phase_sum(&b, &e, |x, y| y.get(stat)?.checked_sub(*x.get(stat)?));
            if let Some(d) = d {
                m.insert(key.to_string(), d as f64 / ops.max(1) as f64);
            }
        }
        Ok(m)
    };
    let [blk_cfg, net_cfg, boot_cfg] = cfg.configs(qemu_blk, opts.side_by_side);
    let base = |config: String, test: &str| Record {
        matrix: Matrix::Lab,
        model: cfg.model,
        vmm: cfg.vmm.to_string(),
        config,
        test: test.to_string(),
        run,
        n: 0,
        latency: None,
        iops: None,
        seconds: None,
        exits_per_op: BTreeMap::new(),
        cpu_us_per_op: None,
        load,
    };
    let blk_n = lat.n;
    let asked = match cfg.model {
        // Whole batches.
        _ if opts.side_by_side => opts.blk_ops / SIDE_BY_SIDE_BATCHES * SIDE_BY_SIDE_BATCHES,
        _ => opts.blk_ops,
    };
    if blk_n != u64::from(asked) {
        return Err(format!("lat measured {blk_n} reads, asked {asked}"));
    }
    let net_n = ping.n;
    let mut blk_exits = exits(disk_id, blk_n);
    blk_exits.extend(kvm("blk", blk_n)?);
    let mut net_exits = exits(nic_id, net_n);
    net_exits.extend(kvm("net", net_n)?);
    let blk = Record {
        n: blk_n,
        latency: Some(lat.summary),
        exits_per_op: blk_exits,
        cpu_us_per_op: cpu("blk").map(|us| us / blk_n as f64),
        ..base(blk_cfg, "blk-read-qd1")
    };
    let net = Record {
        n: net_n,
        latency: Some(ping.summary),
        exits_per_op: net_exits,
        cpu_us_per_op: cpu("net").map(|us| us / net_n as f64),
        ..base(net_cfg, "net-rtt")
    };
    let boot = Record {
        n: 1,
        seconds: Some(boot),
        ..base(boot_cfg, "boot-to-init")
    };
    Ok(vec![blk, net, boot])
}

/// One `LAT-RESULT {...}` line of `lat`.
#[derive(Debug, Clone, PartialEq)]
pub struct LatResult {
    pub test: String,
    pub n: u64,
    /// Percentiles in µs.
    pub summary: Summary,
}

/// The JSON of a `LAT-RESULT` line: `lat` writes it in the guest, the lab matrix reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatLine {
    pub test: String,
    pub n: u64,
    pub min_ns: u64,
    pub p50_ns: u64,
    pub p90_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub max_ns: u64,
}

impl LatLine {
    /// The prefix of the line.
    pub const PREFIX: &'static str = "LAT-RESULT";

    /// `LAT-RESULT {...}`.
    pub fn line(&self) -> serde_json::Result<String> {
        Ok(format!("{} {}", Self::PREFIX, serde_json::to_string(self)?))
    }
}

/// Parses a `LAT-RESULT {...}` line (ns in the line, µs in the result).
pub fn parse_lat_result(line: &str) -> Result<LatResult, String> {
    let body = line
        .trim()
        .strip_prefix(LatLine::PREFIX)
        .ok_or_else(|| format!("not a LAT-RESULT line: {line:?}"))?;
    let l: LatLine = serde_json::from_str(body.trim()).map_err(|e| format!("LAT-RESULT: {e}"))?;
    if l.test.is_empty() {
        return Err("LAT-RESULT: no test name".into());
    }
    let ns = [l.min_ns, l.p50_ns, l.p90_ns, l.p99_ns, l.p999_ns, l.max_ns];
    if l.n == 0 {
        return Err("LAT-RESULT: no samples".into());
    }
    if !ns.windows(2).all(|w| w[0] <= w[1]) {
        return Err(format!("LAT-RESULT: percentiles not ascending: {ns:?}"));
    }
    let us = |v: u64| v as f64 / 1000.0;
    Ok(LatResult {
        test: l.test,
        n: l.n,
        summary: Summary {
            min: us(ns[0]),
            p50: us(ns[1]),
            p90: us(ns[2]),
            p99: us(ns[3]),
            p999: us(ns[4]),
            max: us(ns[5]),
        },
    })
}

/// L1's KVM counters the bench reads (`/sys/kernel/debug/kvm/<stat>`) and their keys in
/// `exits_per_op`.
const KVM_COUNTERS: [(&str, &str); 5] = [
    ("exits", "kvm_exits"),
    ("io_exits", "kvm_io"),
    ("halt_exits", "kvm_halt"),
    ("irq_window_exits", "kvm_irq_window"),
    ("insn_emulation", "kvm_emulated"),
];

/// `name=value` pairs of `kvmstat.sh` (L1's KVM counters). A pair that is not a name and a
/// whole number is an error, and so is a line without any.
pub fn parse_kvm_counters(text: &str) -> Result<BTreeMap<String, u64>, String> {
    let mut m = BTreeMap::new();
    for w in text.split_ascii_whitespace() {
        let (k, v) = w
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| format!("kvm counters: not name=value: {w:?}"))?;
        let v = v
            .parse::<u64>()
            .map_err(|_| format!("kvm counters: {k}: not a count: {v:?}"))?;
        m.insert(k.to_string(), v);
    }
    if m.is_empty() {
        return Err("kvm counters: none".into());
    }
    Ok(m)
}

/// The parts of our vmm's `--exit-stats` JSON the lab records use.
#[derive(Debug, Clone, Default, PartialEq)]
struct LabExits {
    total: u64,
    /// Exits per device (port I/O and MMIO added up).
    devices: BTreeMap<String, u64>,
    notify: BTreeMap<String, u64>,
}

impl LabExits {
    fn device(&self, id: &str) -> u64 {
        self.devices.get(id).copied().unwrap_or(0)
    }

    fn notify(&self, id: &str) -> u64 {
        self.notify.get(id).copied().unwrap_or(0)
    }
}

fn parse_exit_stats(text: &str) -> Result<LabExits, String> {
    let e = ExitStats::parse(text.trim()).map_err(|e| format!("exit stats: {e}"))?;
    let mut devices = e.pio;
    for (k, v) in e.mmio {
        *devices.entry(k).or_insert(0) += v;
    }
    Ok(LabExits {
        total: e.total,
        devices,
        notify: e.notify_exits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lat_result_line() {
        let r = parse_lat_result(
            "LAT-RESULT {\"test\":\"blk-read-qd1\",\"n\":200,\"min_ns\":1500,\"p50_ns\":2000,\
             \"p90_ns\":3000,\"p99_ns\":4000,\"p999_ns\":5000,\"max_ns\":9000}\r",
        )
        .unwrap();
        assert_eq!(r.test, "blk-read-qd1");
        assert_eq!(r.n, 200);
        assert_eq!(r.summary.min, 1.5);
        assert_eq!(r.summary.p50, 2.0);
        assert_eq!(r.summary.max, 9.0);
    }

    #[test]
    fn lat_result_rejects_malformed() {
        for bad in [
            "",
            "LAT-RESULT",
            "LAT-RESULT {",
            "LAT-RESULT {\"test\":\"x\"}",
            "probe-result {\"test\":\"x\"}",
            // descending percentiles
            "LAT-RESULT {\"test\":\"x\",\"n\":1,\"min_ns\":5,\"p50_ns\":4,\"p90_ns\":4,\"p99_ns\":4,\"p999_ns\":4,\"max_ns\":4}",
            // no samples
            "LAT-RESULT {\"test\":\"x\",\"n\":0,\"min_ns\":0,\"p50_ns\":0,\"p90_ns\":0,\"p99_ns\":0,\"p999_ns\":0,\"max_ns\":0}",
            // negative / fractional
            "LAT-RESULT {\"test\":\"x\",\"n\":1,\"min_ns\":-1,\"p50_ns\":4,\"p90_ns\":4,\"p99_ns\":4,\"p999_ns\":4,\"max_ns\":4}",
            "LAT-RESULT {\"test\":\"\",\"n\":1,\"min_ns\":1,\"p50_ns\":4,\"p90_ns\":4,\"p99_ns\":4,\"p999_ns\":4,\"max_ns\":4}",
        ] {
            assert!(parse_lat_result(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn exit_stats_by_device() {
        let s = parse_exit_stats(
            "{\"total\":3133,\"pio\":{\"pci-config\":1507,\"serial\":1116,\"nic0\":4},\"pio_unclaimed\":18,\
             \"mmio\":{\"disk0\":86,\"nic0\":71,\"pci-ecam\":19},\"mmio_unclaimed\":0,\"other\":{},\
             \"interrupted\":3,\"notify_exits\":{\"disk0\":0,\"net0\":2},\"coalesced\":40}",
        )
        .unwrap();
        assert_eq!(s.total, 3133);
        assert_eq!(s.device("disk0"), 86);
        assert_eq!(s.device("nic0"), 75);
        assert_eq!(s.notify("net0"), 2);
        assert_eq!(s.device("absent"), 0);
        assert!(parse_exit_stats("{\"total\":1}").is_err());
        assert!(parse_exit_stats("not json").is_err());
    }

    #[test]
    fn tags_and_scripts() {
        assert_eq!(CONFIGS[5].tag(2), "r2-pt-qemu");
        assert_eq!(
            describe_tag("r2-pt-qemu", 3).as_deref(),
            Some("lab: run 2/3: qemu passthrough")
        );
        assert_eq!(describe_tag("garbage", 3), None);
        let o = LabOptions {
            runs: 2,
            blk_ops: 200,
            pings: 50,
            poll_us: 50,
            side_by_side: false,
            only_model: None,
        };
        let l1 = l1_script(3, 4, &o);
        assert!(l1.contains("RUN_FIRST=3\n") && l1.contains("RUN_LAST=4\n"));
        assert!(l1.contains("id=disk0,poll_us=50"));
        assert!(!l1.contains("@RUN_") && !l1.contains("@POLL_US@") && !l1.contains("@MODELS@"));
        assert!(l1.contains("for m in invmm vu pt; do"));
        let one = LabOptions {
            only_model: Some(Model::Passthrough),
            ..o
        };
        assert!(l1_script(1, 1, &one).contains("for m in pt; do"));
        assert_eq!(configs(&one).count(), 2);
        assert_eq!(boots(4), vec![(1, 2), (3, 4)]);
        assert_eq!(boots(3), vec![(1, 2), (3, 3)]);
        assert_eq!(boots(1), vec![(1, 1)]);
        let l2 = l2_script(&o);
        assert!(l2.contains("OPS=200\n") && l2.contains("PINGS=50\n"));
        assert!(!l2.contains('@'));
    }

    #[test]
    fn a_config_section_makes_three_records() {
        let lines = [
            "L2-INIT 1.00",
            "LAB-T r1-invmm-vmm-init 5.25",
            "LAB-VAL r1-invmm-vmm-cpu-blk-begin 10",
            "LAT-RESULT {\"test\":\"blk-read-qd1\",\"n\":2,\"min_ns\":1000,\"p50_ns\":2000,\"p90_ns\":2000,\"p99_ns\":2000,\"p999_ns\":2000,\"max_ns\":2000}",
            "LAB-VAL r1-invmm-vmm-cpu-blk-end 12",
            "LAB-VAL r1-invmm-vmm-kvm-blk-begin exits=1000 io_exits=10 insn_emulation=7 ",
            "LAB-VAL r1-invmm-vmm-kvm-blk-end exits=1010 io_exits=12 insn_emulation=7 ",
            "LAT-RESULT {\"test\":\"net-rtt\",\"n\":2,\"min_ns\":500000,\"p50_ns\":500000,\"p90_ns\":700000,\"p99_ns\":700000,\"p999_ns\":700000,\"max_ns\":700000}",
            "LAB-VAL r1-invmm-vmm-exit-stats {\"total\":100,\"pio\":{},\"mmio\":{\"disk0\":4},\"notify_exits\":{\"disk0\":0},\"coalesced\":0}",
        ];
        let o = LabOptions {
            runs: 1,
            blk_ops: 2,
            pings: 2,
            poll_us: 0,
            side_by_side: false,
            only_model: None,
        };
        let v = config_records(&lines, CONFIGS[0], 1, "x", &o, Load::default()).unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(v[0].test, "blk-read-qd1");
        assert_eq!(v[0].n, 2);
        assert_eq!(v[0].exits_per_op["device"], 2.0);
        assert_eq!(v[0].exits_per_op["vm_total"], 50.0);
        // L1's counters over the phase: 10 exits and 2 port exits over 2 reads.
        assert_eq!(v[0].exits_per_op["kvm_exits"], 5.0);
        assert_eq!(v[0].exits_per_op["kvm_io"], 1.0);
        assert_eq!(v[0].exits_per_op["kvm_emulated"], 0.0);
        assert!(!v[0].exits_per_op.contains_key("kvm_halt"));
        assert!(
            !v[1].exits_per_op.contains_key("kvm_exits"),
            "no net counters given"
        );
        // 2 ticks of 10 ms over 2 reads.
        assert_eq!(v[0].cpu_us_per_op, Some(10_000.0));
        assert_eq!(v[1].test, "net-rtt");
        assert_eq!(v[1].latency.unwrap().p50, 500.0);
        assert_eq!(v[1].cpu_us_per_op, None);
        assert_eq!(v[2].seconds, Some(5.25));
        // A missing result is an error, not a panic.
        assert!(config_records(&lines[..2], CONFIGS[0], 1, "x", &o, Load::default()).is_err());
        // QEMU has no exit stats and needs none.
        let q: Vec<String> = lines[..9]
            .iter()
            .map(|l| l.replace("r1-invmm-vmm", "r1-invmm-qemu"))
            .collect();
        let q: Vec<&str> = q.iter().map(String::as_str).collect();
        let v = config_records(&q, CONFIGS[1], 1, "x", &o, Load::default()).unwrap();
        // Only L1's counters: QEMU writes none of its own.
        assert_eq!(
            v[0].exits_per_op.keys().collect::<Vec<_>>(),
            ["kvm_emulated", "kvm_exits", "kvm_io"]
        );
        // A garbled counter line is an error.
        let mut bad = q.clone();
        bad[6] = "LAB-VAL r1-invmm-qemu-kvm-blk-end exits=x";
        assert!(config_records(&bad, CONFIGS[1], 1, "x", &o, Load::default()).is_err());
    }

    #[test]
    fn side_by_side_batches_sum_up() {
        // Two batches of each phase (the real run has SIDE_BY_SIDE_BATCHES): the counters
        // and CPU ticks are summed over the batches, the per-batch lines are not results.
        // The summary covers whole batches: 2 * SIDE_BY_SIDE_BATCHES of the 2 * B + 1 asked.
        let n = 2 * SIDE_BY_SIDE_BATCHES;
        let result = format!(
            "LAT-RESULT {{\"test\":\"blk-read-qd1\",\"n\":{n},\"min_ns\":1000,\"p50_ns\":2000,\"p90_ns\":2000,\"p99_ns\":2000,\"p999_ns\":2000,\"max_ns\":2000}}"
        );
        let lines = [
            "LAB-T r2-pt-qemu-init 20.5",
            "L2-READY",
            "LAB-VAL r2-pt-qemu-cpu-blk-begin 10",
            "LAB-VAL r2-pt-qemu-kvm-blk-begin exits=100 halt_exits=5 ",
            "L2-BATCH blk {\"test\":\"blk-read-qd1\",\"n\":10,\"min_ns\":1,\"p50_ns\":1,\"p90_ns\":1,\"p99_ns\":1,\"p999_ns\":1,\"max_ns\":1}",
            "LAB-VAL r2-pt-qemu-cpu-blk-end 11",
            "LAB-VAL r2-pt-qemu-kvm-blk-end exits=120 halt_exits=15 ",
            "L2-BATCH-END blk 1",
            "LAB-VAL r2-pt-qemu-cpu-blk-begin 50",
            "LAB-VAL r2-pt-qemu-kvm-blk-begin exits=500 halt_exits=40 ",
            "LAB-VAL r2-pt-qemu-cpu-blk-end 53",
            "LAB-VAL r2-pt-qemu-kvm-blk-end exits=540 halt_exits=50 ",
            "L2-BATCH-END blk 2",
            &result,
            "LAT-RESULT {\"test\":\"net-rtt\",\"n\":2,\"min_ns\":500000,\"p50_ns\":500000,\"p90_ns\":600000,\"p99_ns\":600000,\"p999_ns\":600000,\"max_ns\":600000}",
        ];
        let o = LabOptions {
            runs: 2,
            blk_ops: n + 1,
            pings: n,
            poll_us: 0,
            side_by_side: true,
            only_model: None,
        };
        let v = config_records(&lines, CONFIGS[5], 2, "x", &o, Load::default()).unwrap();
        assert_eq!(v[0].n, u64::from(n));
        assert_eq!(v[0].latency.unwrap().p50, 2.0, "the summary, not a batch");
        // (20 + 40) exits and (10 + 10) halts over n reads; (1 + 3) ticks of 10 ms.
        let n = f64::from(n);
        assert_eq!(v[0].exits_per_op["kvm_exits"], 60.0 / n);
        assert_eq!(v[0].exits_per_op["kvm_halt"], 20.0 / n);
        assert_eq!(v[0].cpu_us_per_op, Some(40_000.0 / n));
        assert_eq!(v[2].seconds, Some(20.5));
        // A batch whose end is missing makes the phase's figures unknown, not wrong.
        let cut: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| !l.ends_with("-cpu-blk-end 53"))
            .collect();
        let v = config_records(&cut, CONFIGS[5], 2, "x", &o, Load::default()).unwrap();
        assert_eq!(v[0].cpu_us_per_op, None);
        // phase_sum itself.
        let d = |b: &u64, e: &u64| e.checked_sub(*b);
        assert_eq!(
            phase_sum(&[Some(1), Some(5)], &[Some(2), Some(9)], d),
            Some(5)
        );
        assert_eq!(phase_sum(&[Some(3)], &[Some(2)], d), None);
        assert_eq!(phase_sum::<u64>(&[], &[], d), None);
        assert_eq!(phase_sum(&[Some(1)], &[None], d), None);
        let l1 = l1_script(1, 2, &o);
        assert!(
            l1.contains(&format!("bench_batches={SIDE_BY_SIDE_BATCHES}"))
                && !l1.contains("@BATCHES@")
                && !l1.contains("@TURN_SECS@")
        );
        assert!(l1.contains("if [ 1 = 1 ]; then\n            side_by_side $r"));
        let seq = LabOptions {
            side_by_side: false,
            ..o
        };
        assert!(l1_script(1, 2, &seq).contains("if [ 0 = 1 ]; then\n            side_by_side $r"));
        // A turn may take five times a batch, and 20 s more: the default batch is 83 pings
        // at ~30 ms.
        assert_eq!(turn_secs(&o), 21);
        assert_eq!(turn_secs(&LabOptions::default()), 33);
        let long = LabOptions {
            blk_ops: 60_000,
            ..LabOptions::default()
        };
        assert_eq!(turn_secs(&long), 120);
        assert!(v[0].config.contains("side by side"));
    }

    #[test]
    fn kvm_counter_lines() {
        let m = parse_kvm_counters("exits=12 io_exits=3 ").unwrap();
        assert_eq!((m["exits"], m["io_exits"]), (12, 3));
        for bad in ["", "exits", "=3", "exits=", "exits=-1", "exits=1.5"] {
            assert!(parse_kvm_counters(bad).is_err(), "accepted {bad:?}");
        }
    }
}
