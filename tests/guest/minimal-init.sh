#!/bin/sh
# /init of the minimal test guest (busybox, no root filesystem). Runs as PID 1 until poweroff.
# Console contract (tests and benches wait for these lines on the serial console ttyS0):
#   MINIMAL-GUEST-NET eth0 ADDR/PREFIX   eth0 configured (only when an address was given)
#   MINIMAL-GUEST-UP                     ready: modules loaded, network configured
#   MINIMAL-GUEST-POWEROFF               ACPI power button or poweroff seen, powering off
#   MINIMAL-GUEST-ECHO LINE              a line typed on the console (ttyS0), said back
#                                        (the terminal's own echo of the typing comes too)
# Services: TCP echo on port 7; HTTP on port 80 (busybox httpd) serving /index.html =
#   "MINIMAL-GUEST-HTTP index\n". Both start before MINIMAL-GUEST-UP.
# Network, first match wins:
#   kernel command line  avr.ip=ADDR/PREFIX [avr.gw=GW] | avr.ip=dhcp
#   NoCloud seed (iso9660 cidata CD-ROM or disk): first IPv4 CIDR (or address + netmask) and
#   gateway/gateway4/via in network-config (v1 or v2), dhcp4: true / type: dhcp;
#   local-hostname from meta-data. A best-effort reader, not a YAML parser: it serves the
#   runtime's own seeds, which put one interface first.

export PATH=/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /run /tmp /seed /var/log
mount -t devpts devpts /dev/pts

con=/dev/ttyS0
say() { echo "$*" >"$con"; }

# Powering off: acpid (power button) and busybox's own poweroff both end up here, because
# poweroff without -f signals PID 1 with SIGUSR2 and the button handler runs poweroff.
off() {
    say MINIMAL-GUEST-POWEROFF
    sync
    poweroff -f
}
trap off USR2 TERM

# modules.dep holds the dependencies; -a loads them all, quietly skipping none missing.
modprobe -a virtio_pci virtio_net virtio_blk virtio_scsi virtio_console \
    ata_piix sd_mod sr_mod isofs button evdev 2>/dev/null

ip link set lo up
hostname minimal

param() { # value of NAME=... on the kernel command line
    read -r cmdline </proc/cmdline
    for w in $cmdline; do
        case $w in "$1"=*) echo "${w#*=}"; return 0 ;; esac
    done
    return 1
}

ip4='([0-9]{1,3}\.){3}[0-9]{1,3}'
seed_net() { # prints "ADDR/PREFIX GW|- [ON-LINK...]" or "dhcp" from a NoCloud seed, if any
    for dev in /dev/sr0 /dev/sr1 /dev/vd? /dev/sd?; do
        [ -b "$dev" ] || continue
        mount -t iso9660 -o ro "$dev" /seed 2>/dev/null || continue
        if [ -f /seed/meta-data ]; then
            h=$(sed -n 's/^local-hostname:[[:space:]]*//p' /seed/meta-data | tr -d "\"' ")
            [ -n "$h" ] && hostname "$h"
            nc=/seed/network-config
            if [ -f "$nc" ]; then
                if grep -qE 'dhcp4:[[:space:]]*(true|yes)|type:[[:space:]]*dhcp' "$nc"; then
                    echo dhcp
                else
                    a=$(grep -oE "$ip4/[0-9]{1,2}" "$nc" | grep -v '^0\.0\.0\.0/' | head -n1)
                    if [ -z "$a" ]; then
                        a=$(sed -nE "s/^[[:space:]-]*address:[[:space:]]*($ip4)[[:space:]]*$/\1/p" "$nc" | head -n1)
                        m=$(sed -nE "s/^[[:space:]-]*netmask:[[:space:]]*($ip4).*/\1/p" "$nc" | head -n1)
                        [ -n "$a" ] && [ -n "$m" ] && a="$a/$(ipcalc -p "$a" "$m" | cut -d= -f2)"
                    fi
                    g=$(grep -E '(gateway4?|via):' "$nc" | grep -oE "$ip4" |
                        grep -v '^0\.0\.0\.0$' | head -n1)
                    # routes "via: 0.0.0.0" are on-link (the way back to PortForward)
                    l=$(awk '$1 == "-" && $2 == "to:" { to = $3 }
                             $1 == "via:" && $2 == "0.0.0.0" { print to }' "$nc" | tr -d "\"'")
                    # shellcheck disable=SC2086  # one word per route
                    [ -n "$a" ] && echo "$a ${g:--}" $l
                fi
            fi
            umount /seed
            return 0
        fi
        umount /seed
    done
}

net=
if addr=$(param avr.ip); then
    net="$addr $(param avr.gw)"
else
    net=$(seed_net)
fi
if [ -n "$net" ]; then
    # shellcheck disable=SC2086  # split "ADDR GW" into $1 $2
    set -- $net
    ip link set eth0 up
    if [ "$1" = dhcp ]; then
        # -q: exit once leased; -n: do not fail the boot without a DHCP server;
        # -O staticroutes: ask for option 121 (udhcpc does not by default).
        udhcpc -i eth0 -q -n -t 5 -O staticroutes -s /etc/udhcpc.script >/dev/null 2>&1
        say "MINIMAL-GUEST-NET eth0 $(ip -4 -o addr show dev eth0 | awk '{print $4}')"
    else
        ip addr add "$1" dev eth0
        [ "${2:--}" != - ] && ip route add default via "$2"
        if [ $# -ge 2 ]; then shift 2; else shift $#; fi
        for r in "$@"; do ip route add "$r" dev eth0; done
        say "MINIMAL-GUEST-NET eth0 $(ip -4 -o addr show dev eth0 | awk '{print $4}')"
    fi
fi

# The power button arrives as an input event (button + evdev); busybox acpid maps it to
# /etc/acpi/PWRF/00000080, which signals us.
acpid -c /etc/acpi -l /var/log/acpid.log

# A TCP echo service on port 7, so tests can prove TCP reaches the guest with data.
nc -ll -p 7 -e cat >/dev/null 2>&1 &
# A small web server on port 80 with one known page (port-forward tests fetch it).
mkdir -p /www
echo "MINIMAL-GUEST-HTTP index" >/www/index.html
httpd -p 80 -h /www

# Console input: each line typed on ttyS0 is said back, so an attach test can type a line
# and see it come back (the line discipline maps the terminal's CR to NL).
(while IFS= read -r line; do say "MINIMAL-GUEST-ECHO $line"; done <"$con") &

say MINIMAL-GUEST-UP

# NICs other than eth0 (hot-plugged, or attached while stopped) get DHCP once each.
# wait returns when a trapped signal arrives; sleep alone would delay the trap.
seen=" eth0 "
while :; do
    for d in /sys/class/net/eth*; do
        [ -e "$d" ] || continue
        n=${d##*/}
        case $seen in *" $n "*) continue ;; esac
        seen="$seen$n "
        ip link set "$n" up
        udhcpc -i "$n" -q -n -t 5 -O staticroutes -s /etc/udhcpc.script >/dev/null 2>&1
        say "MINIMAL-GUEST-NET $n $(ip -4 -o addr show dev "$n" | awk '{print $4}')"
    done
    sleep 1 &
    wait $!
done
