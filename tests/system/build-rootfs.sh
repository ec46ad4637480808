#!/usr/bin/env bash
# Builds (once) the Debian 12 root filesystem the system test boots as nodes, and prints its
# path. The result is cached under $AVR_SYSTEM_CACHE (default
# /var/cache/arktos-vm-runtime-tests/system), keyed by a hash of this script, so editing the
# package list below rebuilds it and nothing else does.
#
# The node image carries what a freshly provisioned bare-metal node has (systemd, sshd,
# python3 for Ansible) plus the runtime's Debian dependencies, preinstalled so that each test
# run installs only the .deb itself instead of downloading qemu and libvirt twice. Packages a
# newer control file adds are still fetched by apt on the node from the same mirror.
set -euo pipefail

cache=${AVR_SYSTEM_CACHE:-/var/cache/arktos-vm-runtime-tests/system}
key=$(sha256sum "$0" | cut -c1-16)
rootfs=$cache/rootfs-$key
if [ -e "$rootfs/.complete" ]; then
  echo "$rootfs"
  exit 0
fi

# The mirror this machine's apt uses (deb822 or one-line format): never hard-coded.
mirror=$(python3 - <<'PY'
import glob, re
for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.sources")),
             *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
    try:
        text = open(path).read()
    except OSError:
        continue
    if path.endswith(".sources"):
        for stanza in re.split(r"\n\s*\n", text):
            fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M))
            if "bookworm" in fields.get("Suites", "").split() and fields.get("Enabled", "yes") != "no":
                print(fields["URIs"].split()[0]); raise SystemExit
    else:
        for line in text.splitlines():
            m = re.match(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", line)
            if m:
                print(m.group(1)); raise SystemExit
raise SystemExit("no bookworm mirror in /etc/apt")
PY
)

packages=(
  # a node: init, sshd, what Ansible needs
  systemd systemd-sysv dbus openssh-server python3 python3-apt sudo
  # the runtime's dependencies (packaging/deb/debian/control)
  python3-grpcio python3-protobuf python3-libvirt python3-systemd python3-jinja2 python3-yaml
  python3-pyroute2 python3-websockets python3-prometheus-client libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils
  genisoimage
  containernetworking-plugins dnsmasq-base iproute2
)
mkdir -p "$cache"
rm -rf "$rootfs.tmp"
echo "build-rootfs: mmdebstrap bookworm from $mirror into $rootfs" >&2
mmdebstrap --quiet --variant=apt --include="$(IFS=,; echo "${packages[*]}")" \
  --customize-hook='rm -f "$1"/etc/machine-id "$1"/var/lib/dbus/machine-id; touch "$1"/etc/machine-id' \
  --customize-hook='rm -f "$1"/etc/ssh/ssh_host_*' \
  --customize-hook='chroot "$1" apt-get clean' \
  bookworm "$rootfs.tmp" "deb $mirror bookworm main" >&2
touch "$rootfs.tmp/.complete"
mv "$rootfs.tmp" "$rootfs"
# Older images of this script are of no further use.
find "$cache" -maxdepth 1 -name 'rootfs-*' ! -name "rootfs-$key" -exec rm -rf {} +
echo "$rootfs"
