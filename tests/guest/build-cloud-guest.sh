#!/bin/bash
# Build the main test guest: Debian bookworm with systemd, cloud-init and qemu-guest-agent,
# as one BIOS-bootable qcow2 (the runtime's image model: one disk image by URL).
# Facts behind every choice are in shared/guest-image.md.
#
#   build-cloud-guest.sh OUT.qcow2
#
# Needs root (mmdebstrap --mode=root, chroot), mmdebstrap, e2fsprogs (>= 1.43 for -d with
# offset), fdisk, grub-pc-bin, qemu-utils. No loop devices or mounts. Downloaded .debs are kept
# in $AVR_DEB_CACHE (default $AVR_TEST_CACHE/debs) so a rebuild downloads nothing new.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$here/lib.sh"

[[ $# -eq 1 ]] || { echo "usage: $0 OUT.qcow2" >&2; exit 2; }
out=$1
suite=bookworm
disk_mib=1536
debcache=${AVR_DEB_CACHE:-${AVR_TEST_CACHE:-/var/cache/arktos-vm-runtime-tests}/debs}
# dbus (only a Recommends of systemd): without it logind does not run, so the ACPI power button
# (virsh shutdown) is ignored and qemu-guest-agent's guest-shutdown ("shutdown -P +0") fails.
# cloud-guest-utils: growpart, which cloud-init's growpart module runs to grow the root
# partition into a root disk larger than the image (VirtletRootVolumeSize).
packages=systemd-sysv,udev,kmod,iproute2,dbus,linux-image-cloud-amd64,cloud-init,qemu-guest-agent,cloud-guest-utils
# The cloud kernel loads only what the initramfs lists before / is mounted. sr_mod cdrom isofs
# must be there: ds-identify runs as a systemd generator before udev loads drivers, and without
# a visible CD-ROM it finds no seed and disables cloud-init altogether.
initramfs_modules="virtio_pci virtio_blk virtio_scsi sd_mod ata_piix sr_mod cdrom isofs virtio_net"

((EUID == 0)) || avr_die "must run as root (mmdebstrap --mode=root)"
mkdir -p "$debcache" "$(dirname "$out")"
work=$(mktemp -d "${TMPDIR:-/tmp}/arktos-cloud-guest.XXXXXX")
trap 'rm -rf "$work"' EXIT
rootfs=$work/rootfs
overlay=$work/overlay

mapfile -t mirrors < <(avr_apt_sources "$suite")
((${#mirrors[@]})) || avr_die "host apt has no sources for $suite"
avr_log "mirrors: ${mirrors[*]}"

# --- files laid into the rootfs before any package is installed --------------------------
# Before, not after: the initramfs is then built once, by the kernel's postinst, with our list.
mkdir -p "$overlay/etc/initramfs-tools/conf.d" "$overlay/usr/share/initramfs-tools/modules.d" \
    "$overlay/etc/cloud/cloud.cfg.d" "$overlay/etc/systemd/system"
echo 'MODULES=list' >"$overlay/etc/initramfs-tools/conf.d/avr-test-guest.conf"
tr ' ' '\n' <<<"$initramfs_modules" >"$overlay/usr/share/initramfs-tools/modules.d/avr-test-guest"

cat >"$overlay/etc/cloud/cloud.cfg.d/90-avr-test-guest.cfg" <<'EOF'
# Test guest for arktos-vm-runtime: only the datasources the runtime can provide (no network
# metadata probing, which would wait for timeouts), and only the modules tests use.
datasource_list: [ NoCloud, ConfigDrive, None ]
system_info:
  network:
    renderers: [ networkd ]
cloud_init_modules:
  - bootcmd
  - write_files
  - growpart
  - resizefs
  - set_hostname
  - update_hostname
  - update_etc_hosts
  - users_groups
cloud_config_modules:
  - set_passwords
  - runcmd
cloud_final_modules:
  - scripts_per_once
  - scripts_per_boot
  - scripts_per_instance
  - scripts_user
  - final_message
  - power_state_change
EOF

# Masked units: wait-online holds cloud-config/cloud-final back for 10-120 s; the timers only
# cost CPU in a short-lived guest under TCG.
for unit in systemd-networkd-wait-online.service apt-daily.timer apt-daily-upgrade.timer \
    e2scrub_all.timer e2scrub_reap.service fstrim.timer; do
    ln -s /dev/null "$overlay/etc/systemd/system/$unit"
done
# pass 0: no fsck of a filesystem that was just made; the kernel command line says rw.
echo 'LABEL=root / ext4 defaults,errors=remount-ro 0 0' >"$overlay/etc/fstab"

# --- the root filesystem --------------------------------------------------------------------
avr_log "mmdebstrap $suite into $rootfs"
# sync-in/sync-out keep the .debs across builds (essential/unlink and download/empty would
# otherwise drop them or refuse a non-empty archive dir). Recommends are off: the kernel's
# would pull in apparmor and firmware, cloud-init's sudo and growpart.
# shellcheck disable=SC2016  # "$1" (the chroot) is expanded by mmdebstrap's hook shell
mmdebstrap --mode=root --variant=minbase --include="$packages" \
    --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --skip=essential/unlink --skip=download/empty \
    --setup-hook='mkdir -p "$1/var/cache/apt/archives"' \
    --setup-hook="sync-in $debcache /var/cache/apt/archives" \
    --setup-hook="sync-in $overlay /" \
    --customize-hook="sync-out /var/cache/apt/archives $debcache" \
    --customize-hook='chroot "$1" systemctl enable systemd-networkd.service' \
    "$suite" "$rootfs" "${mirrors[@]}"

# Nothing of the build host stays in the image; an empty machine-id makes each boot a first
# boot with a fresh id (mmdebstrap empties it too, this is belt and braces).
echo debian >"$rootfs/etc/hostname"
: >"$rootfs/etc/resolv.conf"
: >"$rootfs/etc/machine-id"
rm -f "$rootfs/var/lib/dbus/machine-id"
rm -rf "$rootfs/var/lib/cloud" "$rootfs/var/log/journal"/* "$rootfs/var/cache/apt"/*.bin

kdirs=("$rootfs"/lib/modules/*/)
kver=$(basename "${kdirs[0]}")
[[ -f $rootfs/boot/vmlinuz-$kver && -f $rootfs/boot/initrd.img-$kver ]] ||
    avr_die "kernel $kver or its initramfs missing in $rootfs/boot"
# Fail here rather than with a guest that silently ignores its seed.
listing=$(chroot "$rootfs" lsinitramfs "/boot/initrd.img-$kver")
for mod in sr_mod isofs virtio_blk; do
    grep -q "/$mod\.ko" <<<"$listing" || avr_die "initramfs lacks $mod"
done

avr_log "disk image (${disk_mib} MiB raw, kernel $kver)"
avr_make_boot_disk "$work/disk" "$rootfs" "$out" "$disk_mib" "/boot/vmlinuz-$kver" \
    "/boot/initrd.img-$kver" "root=LABEL=root rw console=ttyS0"
avr_log "done: $out ($(du -h "$out" | cut -f1))"
