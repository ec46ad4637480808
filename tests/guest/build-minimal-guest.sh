#!/bin/bash
# Build the minimal test guest: Debian's cloud kernel and a busybox initramfs whose /init
# (minimal-init.sh) prints MINIMAL-GUEST-UP on ttyS0 and idles; no root filesystem. For fast
# lifecycle, density and benchmark runs (shared/guest-image.md).
#
#   build-minimal-guest.sh OUTDIR
#
# writes OUTDIR/vmlinuz and OUTDIR/initrd.img (direct kernel boot, cmdline "console=ttyS0")
# and OUTDIR/disk.qcow2, a tiny BIOS-bootable disk holding both, for the runtime's image model
# (one disk image by URL). Uses apt-get download against the host's apt sources with private
# lists, dpkg-deb, cpio, gzip, fdisk, e2fsprogs, grub-pc-bin, qemu-utils; no loop devices or
# mounts. The .debs are kept in $AVR_DEB_CACHE like the cloud guest's.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$here/lib.sh"

[[ $# -eq 1 ]] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
outdir=$1
suite=bookworm
disk_mib=40
debcache=${AVR_DEB_CACHE:-${AVR_TEST_CACHE:-/var/cache/arktos-vm-runtime-tests}/debs}
# What /init loads, plus their dependencies (found in modules.dep below).
modules="virtio_pci virtio_net virtio_blk virtio_scsi virtio_console ata_piix sd_mod sr_mod
    isofs button evdev"

mkdir -p "$debcache" "$outdir"
work=$(mktemp -d "${TMPDIR:-/tmp}/arktos-minimal-guest.XXXXXX")
trap 'rm -rf "$work"' EXIT

# --- the two .debs: kernel and busybox-static -----------------------------------------------
# Private apt lists built from the host's own sources: current package versions without
# touching the host's apt state, and no mirror named here.
apt_state=$work/apt
mkdir -p "$apt_state/lists/partial" "$apt_state/cache/archives/partial"
avr_apt_sources "$suite" >"$apt_state/sources.list"
[[ -s $apt_state/sources.list ]] || avr_die "host apt has no sources for $suite"
apt_opts=(-o "Dir::State::Lists=$apt_state/lists" -o "Dir::Cache=$apt_state/cache"
    -o "Dir::Etc::SourceList=$apt_state/sources.list" -o "Dir::Etc::SourceParts=-"
    -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root")
avr_log "apt-get update (private lists)"
apt-get -qq "${apt_opts[@]}" update

# The metapackage names the current ABI's image package in its Depends.
kpkg=$(apt-cache "${apt_opts[@]}" depends linux-image-cloud-amd64 |
    awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
[[ -n $kpkg ]] || avr_die "cannot resolve linux-image-cloud-amd64"
debs=()
for pkg in "$kpkg" busybox-static; do
    # apt's own archive name (epoch ':' as %3a), as mmdebstrap's sync-out leaves it too.
    fname=$(apt-cache "${apt_opts[@]}" show --no-all-versions "$pkg" |
        awk '/^Version:/ { v = $2; sub(/:/, "%3a", v) } /^Architecture:/ { a = $2 }
             END { if (v != "" && a != "") print P "_" v "_" a ".deb" }' P="$pkg")
    [[ -n $fname ]] || avr_die "no candidate version of $pkg"
    if [[ ! -f $debcache/$fname ]]; then
        avr_log "download $pkg"
        (cd "$work" && apt-get -qq "${apt_opts[@]}" download "$pkg")
        mv "$work/$fname" "$debcache/$fname"
    fi
    debs+=("$debcache/$fname")
done

mkdir -p "$work/kernel" "$work/bb"
dpkg-deb -x "${debs[0]}" "$work/kernel"
dpkg-deb -x "${debs[1]}" "$work/bb"
kdirs=("$work"/kernel/lib/modules/*/)
kver=$(basename "${kdirs[0]}")
kmods=$work/kernel/lib/modules/$kver
# The package ships no modules.dep (its postinst runs depmod); busybox's depmod writes one.
"$work/bb/bin/busybox" depmod -b "$work/kernel" "$kver"

# --- initramfs -------------------------------------------------------------------------------
root=$work/initramfs
mkdir -p "$root"/{bin,sbin,etc/acpi/PWRF,proc,sys,dev,run,tmp,seed,var/log} "$root/lib/modules/$kver"
cp "$work/bb/bin/busybox" "$root/bin/busybox"
# Relative applet links: busybox --install would point them at this build directory.
for applet in $("$root/bin/busybox" --list); do
    [[ $applet == busybox ]] || ln -s busybox "$root/bin/$applet"
done
install -m 0755 "$here/minimal-init.sh" "$root/init"

# Module closure from the kernel's own modules.dep ("path: dep dep ...").
declare -A want=()
add_mod() {
    local name=$1 path deps d
    path=$(awk -v n="$name" -F: '{ m = $1; sub(/.*\//, "", m); sub(/\.ko(\.[a-z]+)?$/, "", m)
        gsub(/-/, "_", m) } m == n { print $1; exit }' "$kmods/modules.dep")
    if [[ -z $path ]]; then
        grep -qE "/${name}\.ko" "$kmods/modules.builtin" || avr_die "module $name not found"
        return 0 # built in
    fi
    [[ -n ${want[$path]:-} ]] && return 0
    want[$path]=1
    deps=$(awk -v p="$path" -F': ?' '$1 == p { print $2; exit }' "$kmods/modules.dep")
    for d in $deps; do
        d=${d##*/}; d=${d%%.ko*}; add_mod "${d//-/_}"
    done
}
for m in $modules; do add_mod "$m"; done
for path in "${!want[@]}"; do
    install -D -m 0644 "$kmods/$path" "$root/lib/modules/$kver/$path"
done
cp "$kmods"/modules.{order,builtin} "$root/lib/modules/$kver/"
"$root/bin/busybox" depmod -b "$root" "$kver"

# Busybox acpid runs ./PWRF/00000080 (in its config dir) for the power button.
cat >"$root/etc/acpi/PWRF/00000080" <<'EOF'
#!/bin/sh
exec poweroff
EOF
chmod 0755 "$root/etc/acpi/PWRF/00000080"
cat >"$root/etc/udhcpc.script" <<'EOF'
#!/bin/sh
# udhcpc hook: apply the lease to $interface.
case $1 in
bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    if [ -n "$staticroutes" ]; then
        # option 121 ("DST/LEN GW ..."): it replaces the router option (RFC 3442);
        # gateway 0.0.0.0 means on the link (the route back to PortForward's source)
        # shellcheck disable=SC2086
        set -- $staticroutes
        while [ $# -ge 2 ]; do
            if [ "$2" = 0.0.0.0 ]; then
                ip route add "$1" dev "$interface"
            else
                ip route add "$1" via "$2" dev "$interface"
            fi
            shift 2
        done
    else
        for r in $router; do ip route add default via "$r" dev "$interface"; break; done
    fi
    ;;
esac
EOF
chmod 0755 "$root/etc/udhcpc.script"

(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) |
    gzip -9n >"$work/initrd.img"
cp "$work/kernel/boot/vmlinuz-$kver" "$work/vmlinuz"

# --- the bootable disk -------------------------------------------------------------------------
mkdir -p "$work/diskroot/boot"
cp "$work/vmlinuz" "$work/initrd.img" "$work/diskroot/boot/"
avr_make_boot_disk "$work/disk" "$work/diskroot" "$work/disk.qcow2" "$disk_mib" \
    /boot/vmlinuz /boot/initrd.img "console=ttyS0"

mv "$work/vmlinuz" "$work/initrd.img" "$work/disk.qcow2" "$outdir/"
avr_log "done: $outdir (kernel $kver, initrd $(du -h "$outdir/initrd.img" | cut -f1)," \
    "disk $(du -h "$outdir/disk.qcow2" | cut -f1))"
