# shellcheck shell=bash
# Helpers shared by build-cloud-guest.sh and build-minimal-guest.sh (sourced, not run).
# The cache key of each guest covers this file too (tests/guest/images.py).

avr_log() { printf '%s [%s] %s\n' "$(date +%H:%M:%S)" "${0##*/}" "$*" >&2; }
avr_die() { avr_log "error: $*"; exit 1; }

# Print one-line apt sources ("deb URI RELEASE COMPONENTS") for SUITE, SUITE-updates and
# SUITE-security, taken from the host's own apt configuration: the build uses whatever mirror
# the host is set up for and names none itself. apt-get indextargets reads both sources.list
# and deb822 .sources files, and --no-release-info makes it work before any "apt-get update".
avr_apt_sources() {
    local suite=$1
    # shellcheck disable=SC2016  # $(FIELD) is apt's placeholder syntax
    apt-get indextargets --no-release-info \
        --format '$(REPO_URI) $(RELEASE) $(COMPONENT)' 'Identifier: Packages' |
        awk -v s="$suite" '
            $2 == s || $2 == s "-updates" || $2 == s "-security" {
                key = $1 " " $2
                if (!(key in comps)) { order[n++] = key; comps[key] = "" }
                if (index(" " comps[key] " ", " " $3 " ") == 0)
                    comps[key] = comps[key] (comps[key] == "" ? "" : " ") $3
            }
            END { for (i = 0; i < n; i++) print "deb " order[i] " " comps[order[i]] }'
}

# avr_make_boot_disk WORKDIR ROOTDIR OUT.qcow2 SIZE_MIB KERNEL INITRD CMDLINE
# Write ROOTDIR into a bootable BIOS disk without loop devices, mounts or grub-install:
# MBR with one partition at 1 MiB, ext4 written straight into the file by mkfs.ext4 -d, GRUB's
# boot.img in the MBR and a core.img with an embedded config in the gap before the partition
# (diskboot.img's default blocklist expects core.img at sector 1, so no grub-setup is needed).
# KERNEL and INITRD are paths inside ROOTDIR; WORKDIR is scratch space the caller removes.
avr_make_boot_disk() {
    local tmp=$1 rootdir=$2 out=$3 size_mib=$4 kernel=$5 initrd=$6 cmdline=$7
    local grubdir=/usr/lib/grub/i386-pc
    mkdir -p "$tmp"

    [[ -f $rootdir$kernel && -f $rootdir$initrd ]] || avr_die "missing $kernel or $initrd in $rootdir"
    truncate -s "${size_mib}M" "$tmp/disk.raw"
    printf 'label: dos\nstart=2048, type=83, bootable\n' | sfdisk -q "$tmp/disk.raw"
    # -E offset: the filesystem starts where the partition does; its size is the partition's.
    # root_owner is left alone: -d copies owners and modes from ROOTDIR.
    mkfs.ext4 -q -F -L root -E offset=1048576 -d "$rootdir" "$tmp/disk.raw" "$((size_mib - 1))M"

    cat >"$tmp/embed.cfg" <<EOF
set root=(hd0,msdos1)
linux16 $kernel $cmdline
initrd16 $initrd
boot
EOF
    # biosdisk: BIOS disk access; part_msdos + ext2: find and read /boot; set and boot are in
    # GRUB's kernel, and the embedded config runs in its rescue parser.
    # linux16, not linux: the 16-bit entry, as QEMU's own -kernel loader uses. After GRUB's
    # 32-bit "linux" the kernel's decompressor ran 3-6x slower under TCG here (10-15 s against
    # about 2.5 s from GRUB's boot to the kernel's first line, measured on both guests).
    grub-mkimage -O i386-pc -d "$grubdir" -c "$tmp/embed.cfg" -p '(hd0,msdos1)/boot/grub' \
        -o "$tmp/core.img" biosdisk part_msdos ext2 linux16
    local core_sectors=$(( ($(stat -c %s "$tmp/core.img") + 511) / 512 ))
    ((core_sectors < 2047)) || avr_die "core.img too big for the MBR gap ($core_sectors sectors)"
    # 440 bytes: boot code only, leaving the disk signature and partition table intact.
    dd if="$grubdir/boot.img" of="$tmp/disk.raw" bs=440 count=1 conv=notrunc status=none
    dd if="$tmp/core.img" of="$tmp/disk.raw" bs=512 seek=1 conv=notrunc status=none

    qemu-img convert -c -O qcow2 "$tmp/disk.raw" "$out"
}
