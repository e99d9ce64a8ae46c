# Helpers for lab scenario scripts, installed in every lab guest as /lab/lib.sh.
# Use with `. /lab/lib.sh`. Busybox sh, not bash.
#
# Markers a scenario prints (the Rust fixture in tests/src/lab.rs reads them):
#   LAB-OK <name>               a check passed
#   LAB-FAIL <name> [why]       a check failed
#   LAB-T <name> <seconds>      a measured time
#   LAB-VAL <name> <value>      any other value
#   LAB-FLAKE <why>             the lab's own flake, not a verdict (e.g. the reference VMM's
#                               L2 lost mid-output): the fixture runs the scenario again

# iproute2's ip (busybox's has no tuntap); always call it by this path.
IP=/sbin/iproute2-ip
# The devices QEMU gives L1 (fixed addresses, see scripts/lab/run).
NIC_BDF=0000:00:02.0      # e1000e to assign, on QEMU hub 0
PEER_NIC_BDF=0000:00:03.0 # e1000e L1 keeps as the peer, same hub
NVME_BDF=0000:00:04.0     # NVMe on a scratch file, to assign
NVME2_BDF=0000:00:05.0    # with --pair: a second NVMe, to assign
NIC2_BDF=0000:00:06.0     # with --pair: a second e1000e to assign, on hub 0
# L2 images: cloud kernel + virtio modules, generic kernel + virtio/e1000e/nvme.
L2_KERNEL=/lab/l2/vmlinuz
L2_INITRD=/lab/l2/initrd.img
L2_GENERIC_KERNEL=/lab/l2/vmlinux-generic # an ELF, booted through PVH (QEMU: pvh.bin)
L2_GENERIC_INITRD=/lab/l2/initrd-generic.img
# nokaslr: a triple fault's RIP in L1's trace (lab_l2_shutdowns) maps to System.map as is.
L2_CMDLINE="console=ttyS0 panic=-1 quiet nokaslr"

lab_failures=0

lab_uptime() { cut -d' ' -f1 /proc/uptime; }

# lab_elapsed T0: seconds since uptime T0, two decimals.
lab_elapsed() { awk -v t0="$1" '{ printf "%.2f\n", $1 - t0 }' /proc/uptime; }

# wait_for FILE REGEX SECS: until a line matching REGEX (grep -E) is in FILE; 1 on timeout, or
# at once when FILE, a VM's console, already ends with its VMM's exit status (VMM-RC).
wait_for() {
    _w=0
    while ! grep -qE "$2" "$1" 2>/dev/null; do
        # A VM console that already has its VMM's exit status will not get the line: say so
        # and go on at once (the scenario fails its checks and prints L1's trace), rather
        # than wait out the deadline silently (the fixture takes a quiet L1 for a stuck one).
        if grep -q '^VMM-RC ' "$1" 2>/dev/null; then
            # The line may have come with the exit status, since the first look.
            grep -qE "$2" "$1" 2>/dev/null && return 0
            echo "LAB-NOTE waited for '$2' in $1: the VMM exited first ($(grep -m 1 '^VMM-RC ' "$1"))"
            return 1
        fi
        [ $_w -ge $(($3 * 10)) ] && return 1
        sleep 0.1
        _w=$((_w + 1))
    done
}

# api_gone SOCKET ID: until the vmm on the API socket SOCKET no longer lists device ID in
# vm.info (the guest ejected it and the vmm released it); 1 after 30 s.
api_gone() {
    _w=0
    while vmm-remote --api-socket "$1" info 2>/dev/null | grep -q "\"$2\": {"; do
        [ $_w -ge 300 ] && return 1
        sleep 0.1
        _w=$((_w + 1))
    done
}

# check NAME COMMAND...: run COMMAND, print LAB-OK NAME or LAB-FAIL NAME.
check() {
    _name=$1
    shift
    if "$@"; then
        echo "LAB-OK $_name"
    else
        echo "LAB-FAIL $_name (status $?: $*)"
        lab_failures=$((lab_failures + 1))
    fi
}

# fail NAME WHY: record a failed check.
fail() {
    echo "LAB-FAIL $*"
    lab_failures=$((lab_failures + 1))
}

# lab_l2_shutdowns: L1's trace (see /init) of the L2s that ended in a shutdown exit (a
# triple fault), with the exceptions KVM injected before: L1-TRACE lines; nothing when no L2
# died so, and the function at each one's RIP (lab_rip_names).
lab_l2_shutdowns() {
    _tr=/sys/kernel/tracing/trace
    [ -r $_tr ] && grep -q 'kvm_exit:.*reason' $_tr || return 0
    grep -E 'kvm_exit:|kvm_inj_exception:' $_tr | tail -n 40 | sed 's/^/L1-TRACE /'
    lab_rip_names
}

# lab_rip_names: "L1-RIP <rip> <function+0xoff>" for the RIP of every shutdown exit in L1's
# trace: the function at that address in L1's kernel, which is the same build as L2's
# generic kernel (L2 runs with nokaslr; L1's own KASLR offset is undone through _text). An
# L2 on the cloud kernel is another build: the name is the generic kernel's only.
lab_rip_names() {
    for _rip in $(grep -oE 'reason (shutdown|TRIPLE_FAULT) rip 0x[0-9a-f]+' /sys/kernel/tracing/trace |
        awk '{ print substr($4, 3) }' | sort -u); do
        awk -v rip="$_rip" '
            function lo(h) { return ("0x" substr(h, length(h) - 7)) + 0 }
            NR == FNR { if ($3 == "_text") base = lo($1); next }
            NF == 3 && $2 ~ /^[tTwW]$/ {
                if (!set) { target = base + lo(rip) - lo("ffffffff81000000"); set = 1 }
                a = lo($1)
                if (a <= target && a > best) { best = a; name = $3 }
            }
            END {
                # Past the kernel image (a module: their addresses are not fixed): no name.
                if (best > 0 && target - best < 1048576) printf "L1-RIP %s %s+0x%x\n", rip, name, target - best
                else printf "L1-RIP %s (not in the kernel image: a module?)\n", rip
            }
        ' /proc/kallsyms /proc/kallsyms
    done
}

# lab_finish: end the scenario; the status is the number of failed checks.
lab_finish() {
    lab_l2_shutdowns
    echo "LAB-CHECKS failed=$lab_failures"
    exit "$lab_failures"
}

# pci_driver BDF: the driver bound to BDF, or "none".
pci_driver() {
    if [ -e "/sys/bus/pci/devices/$1/driver" ]; then
        basename "$(readlink "/sys/bus/pci/devices/$1/driver")"
    else
        echo none
    fi
}

# iommu_group BDF: the IOMMU group number of BDF.
iommu_group() { basename "$(readlink "/sys/bus/pci/devices/$1/iommu_group")"; }

# vfio_bind BDF: bind BDF to vfio-pci; prints /dev/vfio/<group>.
vfio_bind() {
    _d=/sys/bus/pci/devices/$1
    [ -e "$_d" ] || { echo "vfio_bind: no device $1" >&2; return 1; }
    echo vfio-pci >"$_d/driver_override" || return 1
    if [ -e "$_d/driver" ]; then echo "$1" >"$_d/driver/unbind" || return 1; fi
    echo "$1" >/sys/bus/pci/drivers_probe
    [ "$(pci_driver "$1")" = vfio-pci ] || { echo "vfio_bind: $1 bound to $(pci_driver "$1")" >&2; return 1; }
    _g=/dev/vfio/$(iommu_group "$1")
    [ -c "$_g" ] || { echo "vfio_bind: $_g missing" >&2; return 1; }
    echo "$_g"
}

# vfio_unbind BDF: give BDF back to its host driver.
vfio_unbind() {
    _d=/sys/bus/pci/devices/$1
    if [ -e "$_d/driver" ]; then echo "$1" >"$_d/driver/unbind" || return 1; fi
    echo >"$_d/driver_override"
    echo "$1" >/sys/bus/pci/drivers_probe
    [ "$(pci_driver "$1")" != vfio-pci ]
}

# lab_console T0 [PREFIX]: copy a guest console from stdin to stdout (without
# CRs) and print "LAB-T PREFIX-init <s>" when the guest's L2-INIT marker shows
# up, measured from uptime T0 (taken just before starting the VMM). A marker glued to the
# end of firmware output without a newline (SeaBIOS's "Booting from ROM.." before a quiet
# kernel) is put on a line of its own. A VMM log line (stderr, one write each) that
# landed in the middle of a guest line (serial output, a byte at a time) is printed on
# its own and the guest line is put back together, so markers stay whole.
lab_console() {
    awk -v t0="$1" -v name="${2:-l2}" '{
        sub(/\r$/, ""); gsub(/\033(c|\[[0-9;?]*[a-zA-Z])/, "")
        m = match($0, /\[[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9:.]+Z (ERROR|WARN |INFO |DEBUG|TRACE) /)
        if (m > 0) {
            if (m > 1) part = part substr($0, 1, m - 1)
            print substr($0, m); fflush()
            next
        }
        if (part != "") { $0 = part $0; part = "" }
        i = index($0, "L2-INIT ")
        if (i > 1 && substr($0, i) ~ /^L2-INIT [0-9.]+$/) { print substr($0, 1, i - 1); $0 = substr($0, i) }
        print; fflush()
        if ($1 == "L2-INIT") {
            getline u < "/proc/uptime"; close("/proc/uptime"); split(u, a, " ")
            printf "LAB-T %s-init %.2f\n", name, a[1] - t0; fflush()
        }
    }
    END { if (part != "") print part }'
}

# l2_qemu [QEMU ARGS...]: boot L2 with QEMU+KVM (the reference VMM; the
# scenario must be run with QEMU in L1), console on stdout. Defaults: cloud
# kernel, 512 MiB, 1 vCPU; later arguments are added to the command line.
l2_qemu() {
    qemu-system-x86_64 -nodefaults -nographic -serial stdio -no-reboot \
        -enable-kvm -cpu host -m 512 -smp 1 \
        -kernel "$L2_KERNEL" -initrd "$L2_INITRD" -append "$L2_CMDLINE" "$@" </dev/null
}
