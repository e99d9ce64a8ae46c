# shellcheck shell=bash
# Helpers shared by the lab scripts (build-images, run, mkinitramfs). Sourced, never run.
#
# Everything the lab builds or downloads lives under $LAB_DIR
# (default: <target dir>/lab), never in the source tree.

LAB_SCRIPTS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$LAB_SCRIPTS/../.." && pwd)
LAB_DIR=${LAB_DIR:-${CARGO_TARGET_DIR:-$REPO_ROOT/target}/lab}
LAB_IMAGES=$LAB_DIR/images

# Kernel modules each image loads at boot. Only the modules we want are named:
# their dependencies come from the kernel's modules.dep, modules the kernel has
# built in (modules.builtin) are skipped. crc64_rocksoft_generic is a crypto
# soft dependency of nvme's t10-pi that modules.dep cannot show.
L1_MODULES=${L1_MODULES:-"kvm_amd vfio_pci vfio_iommu_type1 tun tap veth bridge vhost_net e1000e crc64_rocksoft_generic nvme loop dm_mod dm_delay"}
L2_MODULES=${L2_MODULES:-"virtio_pci virtio_net virtio_blk"}
L2_GENERIC_MODULES=${L2_GENERIC_MODULES:-"virtio_pci virtio_net virtio_blk e1000e crc64_rocksoft_generic nvme"}

log() { printf 'lab: %s\n' "$*" >&2; }
die() {
    printf 'lab: error: %s\n' "$*" >&2
    exit 1
}

apt_install() {
    [ "$(id -u)" = 0 ] || die "missing packages: $* (install them as root: apt-get install -y $*)"
    log "installing $*"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >&2; then
        log "apt-get install failed; running apt-get update and retrying"
        apt-get update >&2 || die "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >&2 ||
            die "cannot install $*"
    fi
}

# need FILE_OR_COMMAND PACKAGE: install PACKAGE when the file/command is missing.
need() {
    local what=$1 pkg=$2
    if [[ $what == /* ]]; then
        [ -e "$what" ] && return 0
    else
        command -v "$what" >/dev/null 2>&1 && return 0
    fi
    apt_install "$pkg"
    if [[ $what == /* ]]; then
        [ -e "$what" ] || die "$what still missing after installing $pkg"
    else
        command -v "$what" >/dev/null 2>&1 || die "$what still missing after installing $pkg"
    fi
}

# The static busybox (package busybox-static): the same binary runs in every guest.
busybox_bin() {
    need /bin/busybox busybox-static
    if ldd /bin/busybox >/dev/null 2>&1; then
        apt_install busybox-static
        ldd /bin/busybox >/dev/null 2>&1 && die "/bin/busybox is dynamically linked; install busybox-static"
    fi
    echo /bin/busybox
}

need_host_tools() {
    need qemu-system-x86_64 qemu-system-x86
    need flock util-linux
    need timeout coreutils
    need dpkg-deb dpkg
    need /usr/sbin/ip iproute2
    # L1's device-mapper (slow disks for the counters scenario, tests/tests/lab_counters.rs).
    need /usr/sbin/dmsetup dmsetup
    need xz xz-utils
    busybox_bin >/dev/null
}

# kernel_release FLAVOUR (amd64 | cloud-amd64): the release (uname -r) that
# Debian's meta package linux-image-FLAVOUR currently depends on.
kernel_release() {
    local flavour=$1 rel
    rel=$(apt-cache depends "linux-image-$flavour" 2>/dev/null |
        sed -n "s/^ *Depends: linux-image-\([0-9].*-$flavour\)\$/\1/p" | head -n1)
    if [ -z "$rel" ]; then
        log "linux-image-$flavour unknown to apt; running apt-get update"
        apt-get update >&2 || die "apt-get update failed"
        rel=$(apt-cache depends "linux-image-$flavour" 2>/dev/null |
            sed -n "s/^ *Depends: linux-image-\([0-9].*-$flavour\)\$/\1/p" | head -n1)
    fi
    [ -n "$rel" ] || die "cannot resolve the kernel of linux-image-$flavour (apt-cache depends linux-image-$flavour)"
    echo "$rel"
}

# kernel_tree RELEASE: download linux-image-RELEASE, unpack it under
# $LAB_DIR/kernels/RELEASE, generate modules.dep; print that directory.
kernel_tree() {
    local rel=$1 dir=$LAB_DIR/kernels/$1 deb
    if [ ! -e "$dir/.done" ]; then
        mkdir -p "$LAB_DIR/debs"
        deb=$(ls "$LAB_DIR/debs/linux-image-${rel}_"*.deb 2>/dev/null | head -n1 || true)
        if [ -z "$deb" ]; then
            log "downloading linux-image-$rel"
            if ! (cd "$LAB_DIR/debs" && apt-get download "linux-image-$rel" >&2); then
                apt-get update >&2 || die "apt-get update failed"
                (cd "$LAB_DIR/debs" && apt-get download "linux-image-$rel" >&2) ||
                    die "cannot download package linux-image-$rel"
            fi
            deb=$(ls "$LAB_DIR/debs/linux-image-${rel}_"*.deb | head -n1)
        fi
        log "unpacking $(basename "$deb")"
        rm -rf "$dir"
        mkdir -p "$dir"
        dpkg-deb -x "$deb" "$dir"
        local mods
        mods=$(kernel_moddir "$dir" "$rel")
        if command -v depmod >/dev/null 2>&1; then
            # kmod's depmod wants <base>/lib/modules/<rel>.
            depmod -b "${mods%/lib/modules/$rel}" "$rel"
        else
            "$(busybox_bin)" depmod -b "${mods%/lib/modules/$rel}" "$rel"
        fi
        [ -s "$mods/modules.dep" ] || die "depmod produced no modules.dep for $rel"
        touch "$dir/.done"
    fi
    echo "$dir"
}

# kernel_moddir TREE RELEASE: the modules directory inside an unpacked tree.
kernel_moddir() {
    local d
    for d in "$1/lib/modules/$2" "$1/usr/lib/modules/$2"; do
        [ -d "$d" ] && {
            echo "$d"
            return 0
        }
    done
    die "no modules directory for $2 in $1"
}

kernel_image() {
    local f
    for f in "$1/boot/vmlinuz-$2" "$1/usr/lib/linux/vmlinuz-$2"; do
        [ -f "$f" ] && {
            echo "$f"
            return 0
        }
    done
    die "no vmlinuz-$2 in $1"
}

# extract_vmlinux BZIMAGE OUT: the uncompressed kernel ELF inside a bzImage (xz payload, as
# Debian's generic kernel has; gzip too). Booted through its PVH entry note it skips the
# bzImage's self-decompression, which costs an L2 about 5 s in the lab.
extract_vmlinux() {
    local img=$1 out=$2 off magic tool
    for magic in 'xz:\xfd\x37\x7a\x58\x5a\x00' 'gzip:\x1f\x8b\x08'; do
        tool=${magic%%:*}
        off=$(LC_ALL=C grep -obUaP "${magic#*:}" "$img" | head -n1 | cut -d: -f1)
        [ -n "$off" ] || continue
        # The payload is followed by the bzImage's trailer: the decompressor complains about
        # it after writing the whole kernel, so its status is not the test; the ELF magic is.
        tail -c +$((off + 1)) "$img" | "$tool" -dc >"$out" 2>/dev/null || true
        if [ "$(head -c 4 "$out" | od -An -tx1 | tr -d ' ')" = 7f454c46 ]; then
            return 0
        fi
    done
    rm -f "$out"
    die "cannot extract the kernel ELF from $img (no xz or gzip payload that unpacks to an ELF)"
}

# resolve_modules MODDIR NAME...: print the module files (relative to MODDIR)
# to load for NAMEs, dependencies first, each once. Built-in modules are
# skipped (reported on stderr); unknown modules are an error.
resolve_modules() {
    local moddir=$1
    shift
    awk -v want="$*" '
        function norm(s) { gsub(/-/, "_", s); return s }
        function modname(p,   n) {
            n = p; sub(/.*\//, "", n); sub(/\.ko(\.(xz|zst|gz))?$/, "", n); return norm(n)
        }
        FILENAME ~ /modules\.builtin$/ { builtin[modname($0)] = 1; next }
        {
            p = $1; sub(/:$/, "", p); path[modname(p)] = p; deps[p] = ""
            for (i = 2; i <= NF; i++) deps[p] = deps[p] " " $i
        }
        function visit(p,   n, i, a) {
            if (p in done) return
            done[p] = 1
            n = split(deps[p], a, " ")
            for (i = n; i >= 1; i--) visit(a[i])
            print p
        }
        END {
            n = split(want, w, " ")
            for (i = 1; i <= n; i++) {
                m = norm(w[i])
                if (m in path) visit(path[m])
                else if (m in builtin) printf "lab: module %s is built in\n", m > "/dev/stderr"
                else { printf "lab: error: module %s not found in modules.dep or modules.builtin\n", m > "/dev/stderr"; err = 1 }
            }
            exit err
        }' "$moddir/modules.builtin" "$moddir/modules.dep"
}

# --- staging an initramfs tree ----------------------------------------------

# stage_file SRC DST STAGE: copy a file (following links) to STAGE/DST.
stage_file() {
    mkdir -p "$3/$(dirname "$2")"
    cp -L "$1" "$3/$2"
}

# stage_libs BIN STAGE: copy the shared libraries BIN needs (ldd) to the same paths.
stage_libs() {
    local out lib
    out=$(ldd "$1" 2>/dev/null) || return 0 # static binary
    for lib in $(awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$out"); do
        [ -e "$2/$lib" ] || stage_file "$lib" "$lib" "$2"
    done
}

# stage_bin SRC DST STAGE: an executable and its shared libraries.
stage_bin() {
    [ -x "$1" ] || die "not an executable: $1"
    stage_file "$1" "$2" "$3"
    chmod 0755 "$3/$2"
    stage_libs "$1" "$3"
}

# stage_project_bin SRC DST STAGE: stage_bin, then drop debug info from the copy
# (debug builds are tens of MB; L1 unpacks every byte under TCG). LAB_STRIP=0 keeps it.
stage_project_bin() {
    stage_bin "$@"
    if [ "${LAB_STRIP:-1}" != 0 ] && command -v strip >/dev/null 2>&1; then
        strip --strip-debug "$3/$2" 2>/dev/null || true
    fi
}

# stage_busybox STAGE: busybox and one link per applet, except `ip`
# (iproute2's ip is staged as /sbin/iproute2-ip where needed).
stage_busybox() {
    local bb stage=$1 applet
    bb=$(busybox_bin)
    stage_file "$bb" /bin/busybox "$stage"
    for applet in $("$bb" --list-full); do
        case $applet in bin/busybox | */ip) continue ;; esac
        mkdir -p "$stage/$(dirname "$applet")"
        ln -sf /bin/busybox "$stage/$applet"
    done
}

# stage_modules TREE RELEASE STAGE NAME...: the modules for NAMEs with their
# dependencies, decompressed, and /lab/modules.list (load order) for the init.
stage_modules() {
    local tree=$1 rel=$2 stage=$3 moddir list m dst
    shift 3
    moddir=$(kernel_moddir "$tree" "$rel")
    list=$(resolve_modules "$moddir" "$@") || die "cannot resolve modules for $rel: $*"
    mkdir -p "$stage/lab"
    : >"$stage/lab/modules.list"
    for m in $list; do
        dst=/lib/modules/$rel/${m%.xz}
        dst=${dst%.zst}
        mkdir -p "$stage/$(dirname "$dst")"
        case $m in
        *.xz) xz -dc "$moddir/$m" >"$stage/$dst" ;;
        *.zst) zstd -dcq "$moddir/$m" >"$stage/$dst" ;;
        *) cp "$moddir/$m" "$stage/$dst" ;;
        esac
        echo "$dst" >>"$stage/lab/modules.list"
    done
}

# pack STAGE OUT: an uncompressed newc cpio archive (the kernel unpacks it
# faster than a compressed one under TCG). Concatenated archives are fine.
pack() {
    local bb
    bb=$(busybox_bin)
    (cd "$1" && find . -mindepth 1 | LC_ALL=C sort | "$bb" cpio -o -H newc 2>/dev/null) >"$2.tmp"
    mv "$2.tmp" "$2"
}
