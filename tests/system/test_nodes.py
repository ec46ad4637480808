"""The runtime installed by the .deb and the Ansible role on two booted systemd nodes.

Tests run in file order and share the nodes: provisioning, then the units' behaviour, then
upgrade, then purge. Each node's libvirt runs VMs under TCG (no KVM in a container).
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from .conftest import NODE_NAMES, Ansible, Debs
from .nodes import Node

pytestmark = pytest.mark.system

SERVICE = "arktos-vm-runtime.service"
SOCKET = "arktos-vm-runtime.socket"
CHECK = "arktos-vm-runtime check --listen /run/virtlet.sock"
# A guest with neither disk nor network: SeaBIOS finds nothing to boot and idles, which is
# all a "running VM" needs to be here. The metadata namespace marks it as the runtime's.
VM_XML = """<domain type='qemu'>
  <name>avr-system-test</name>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <metadata>
    <avr:pod xmlns:avr='https://arktos-vm-runtime/xmlns/domain/1'>
      <avr:sandbox-id>system-test</avr:sandbox-id>
    </avr:pod>
  </metadata>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
</domain>
"""


def start_vm(node: Node) -> str:
    """Starts the test VM (if it is not running) and returns its qemu pid."""
    node.put("/var/tmp/avr-system-test.xml", VM_XML)
    if "avr-system-test" not in node.out("virsh -q list --name"):
        node.out("virsh -q create /var/tmp/avr-system-test.xml")
    return node.out("cat /run/libvirt/qemu/avr-system-test.pid")


def stop_vm(node: Node) -> None:
    node.ssh("virsh -q destroy avr-system-test", check=False)


def test_first_run_provisions_both_nodes(provisioned: list[dict[str, dict[str, int]]]) -> None:
    first = provisioned[0]
    for name in NODE_NAMES:
        assert first[name]["failed"] == 0 and first[name]["unreachable"] == 0
        assert first[name]["changed"] > 0, first


def test_second_run_changes_nothing(provisioned: list[dict[str, dict[str, int]]]) -> None:
    second = provisioned[1]
    for name in NODE_NAMES:
        assert second[name] == {**second[name], "changed": 0, "failed": 0}, second


def test_units_verify_and_exposure(node: Node) -> None:
    r = node.ssh(f"systemd-analyze verify {SOCKET} {SERVICE}")
    assert r.stderr.strip() == "", r.stderr
    last = node.out(f"systemd-analyze security --no-pager {SERVICE} | tail -1")
    exposure = float(re.search(r"exposure level for \S+: ([0-9.]+)", last)[1])  # type: ignore[index]
    print(f"{node.name}: {last}")
    assert exposure <= 6.0
    # The daemon shares the host's mount namespace (pod netns pinned under /run/netns).
    node.out(CHECK)  # socket activation: a call makes sure the daemon runs
    pid = node.prop(SERVICE, "MainPID")
    assert pid != "0"
    assert node.out("readlink /proc/1/ns/mnt") == node.out(f"readlink /proc/{pid}/ns/mnt")


def test_socket_activation(node: Node) -> None:
    node.out(f"systemctl stop {SERVICE}")
    assert node.ssh(f"systemctl is-active {SOCKET}").stdout.strip() == "active"
    assert node.ssh(f"systemctl is-active {SERVICE}", check=False).stdout.strip() == "inactive"
    time.sleep(1)  # nothing starts it but a connection
    assert node.ssh(f"systemctl is-active {SERVICE}", check=False).stdout.strip() == "inactive"
    group = "libvirt" if node.name == "node2" else "root"
    assert node.out("stat -c '%F %a %U %G' /run/virtlet.sock") == f"socket 660 root {group}"

    answer = node.out(CHECK, timeout=60)
    assert answer == "arktos-vm-runtime 0.1.0 (CRI v1alpha2, version 0.1.0)"
    assert node.out(f"{CHECK} --api v1") == "arktos-vm-runtime 0.1.0 (CRI v1, version 0.1.0)"
    assert node.out(f"systemctl is-active {SERVICE}") == "active"
    assert node.prop(SERVICE, "TriggeredBy") == SOCKET


def test_status_line(node: Node) -> None:
    node.out(CHECK)
    status = node.wait_for(f"systemctl status --no-pager {SERVICE} | grep 'Status: '")
    assert 'Status: "serving CRI v1alpha2+v1 on /run/virtlet.sock; libvirt ok' in status, status


def test_journal_fields(node: Node) -> None:
    node.out(CHECK)
    node.out("journalctl --sync || true")
    lines = node.out(f"journalctl -u {SERVICE} -o json --no-pager").splitlines()
    entries = [json.loads(line) for line in lines]
    calls = [e for e in entries if e.get("CRI_METHOD") == "Version"]
    assert calls, f"no CRI_METHOD=Version in {len(entries)} journal entries"
    assert calls[-1]["GRPC_CODE"] == "OK"
    assert calls[-1]["SYSLOG_IDENTIFIER"] == "arktos-vm-runtime"


def test_watchdog_restarts_a_hung_daemon(node: Node) -> None:
    dropin = "/etc/systemd/system/arktos-vm-runtime.service.d/50-system-test.conf"
    node.put(dropin, "[Service]\nWatchdogSec=3s\nTimeoutAbortSec=2s\n")
    try:
        node.out(f"systemctl daemon-reload && systemctl restart {SERVICE}")
        node.out(CHECK)
        pid = node.prop(SERVICE, "MainPID")
        restarts = int(node.prop(SERVICE, "NRestarts"))
        node.out(f"kill -STOP {pid}")
        node.wait_for(
            f"test \"$(systemctl show -P MainPID {SERVICE})\" != {pid} && "
            f"test \"$(systemctl show -P MainPID {SERVICE})\" != 0 && "
            f"systemctl is-active {SERVICE}",
            timeout=30,
        )
        assert int(node.prop(SERVICE, "NRestarts")) == restarts + 1
        journal = node.out(f"journalctl -u {SERVICE} --no-pager -n 50")
        assert "Watchdog timeout" in journal, journal
        node.out(CHECK)
    finally:
        node.ssh(f"rm -f {dropin} && systemctl daemon-reload && systemctl restart {SERVICE}")


def test_restart_keeps_serving(node: Node) -> None:
    node.out(CHECK)
    before = node.prop(SERVICE, "MainPID")
    vm = start_vm(node)
    # Calls go on while the daemon restarts: the socket stays open and holds them.
    loop = node.ssh_argv(
        f"for i in $(seq 30); do {CHECK} >/dev/null || echo FAILED; sleep 0.1; done; echo done"
    )
    with subprocess.Popen(loop, stdout=subprocess.PIPE, text=True) as calls:
        time.sleep(0.5)
        node.out(f"systemctl restart {SERVICE}")
        out, _ = calls.communicate(timeout=120)
    assert out.strip() == "done", out
    assert node.prop(SERVICE, "MainPID") not in ("0", before)
    assert node.out("cat /run/libvirt/qemu/avr-system-test.pid") == vm


def test_upgrade_restarts_the_daemon_not_the_vms(nodes: dict[str, Node], ansible: Ansible,
                                                  debs: Debs,
                                                  provisioned: object) -> None:
    before = {}
    for node in nodes.values():
        node.out(CHECK)
        before[node.name] = {
            "vm": start_vm(node),
            "daemon": node.prop(SERVICE, "MainPID"),
            "socket": node.prop(SOCKET, "ActiveEnterTimestampMonotonic"),
            "libvirtd": node.prop("libvirtd.service", "MainPID"),
        }
    recap, _ = ansible.run(debs.newer)
    for node in nodes.values():
        b = before[node.name]
        assert recap[node.name]["changed"] > 0
        assert node.out("dpkg-query -W -f '${Version}' arktos-vm-runtime") == "0.1.0-2"
        assert node.prop(SERVICE, "MainPID") not in ("0", b["daemon"]), "not restarted"
        assert node.prop(SOCKET, "ActiveEnterTimestampMonotonic") == b["socket"]
        assert node.prop("libvirtd.service", "MainPID") == b["libvirtd"]
        assert node.out("cat /run/libvirt/qemu/avr-system-test.pid") == b["vm"]
        assert node.out("virsh -q domstate avr-system-test") == "running"
    again, _ = ansible.run(debs.newer)
    assert all(again[n]["changed"] == 0 for n in NODE_NAMES), again


def test_purge_keeps_the_state_of_running_vms(node: Node) -> None:
    vm = start_vm(node)
    r = node.ssh("apt-get purge -y -q arktos-vm-runtime")
    said = r.stdout + r.stderr  # apt runs dpkg on a pty: the warning may be on either
    assert "NOT removing /var/lib/arktos-vm-runtime" in said, said
    assert "libvirt domain avr-system-test" in said
    assert node.ssh("test -d /var/lib/arktos-vm-runtime", check=False).returncode == 0
    assert node.out("cat /run/libvirt/qemu/avr-system-test.pid") == vm
    assert node.ssh("test -e /etc/arktos-vm-runtime", check=False).returncode != 0


def test_purge_leaves_no_files(node: Node, debs: Debs) -> None:
    stop_vm(node)
    deb = f"/var/cache/arktos-vm-runtime-deb/{debs.newer.name}"
    node.out(f"apt-get install -y -q {deb}", timeout=300)
    node.out(CHECK)
    files = node.out("dpkg -L arktos-vm-runtime").splitlines()
    node.out("apt-get purge -y -q arktos-vm-runtime", timeout=300)
    left = node.out(
        "for f in " + " ".join(files) + "; do"
        " [ -e \"$f\" ] && [ ! -d \"$f\" ] && echo \"$f\"; done; true"
    )
    assert left == "", f"files of the package left behind: {left}"
    for path in ("/etc/arktos-vm-runtime", "/var/lib/arktos-vm-runtime",
                 "/usr/share/arktos-vm-runtime", "/usr/lib/python3/dist-packages/arktos_vm_runtime",
                 "/run/virtlet.sock", "/etc/systemd/system/sockets.target.wants/" + SOCKET):
        assert node.ssh(f"test -e {path} || test -L {path}", check=False).returncode != 0, path
    assert node.ssh(f"systemctl is-active {SOCKET} {SERVICE}", check=False).stdout.split() == \
        ["inactive", "inactive"]
    # What is left with "arktos" in its name was put there by the Ansible role, not the
    # package: the copied .deb, node1's CNI network and node2's socket drop-in.
    leftovers = node.out(
        "find / -xdev \\( -path /proc -o -path /sys \\) -prune -o -name '*arktos*' -print"
    ).splitlines()
    by_the_role = (
        "/var/cache/arktos-vm-runtime-deb",
        "/etc/systemd/system/arktos-vm-runtime.socket.d",
        "/etc/cni/net.d/10-arktos-vm-runtime.conflist",
    )
    ours = [p for p in leftovers if not p.startswith(by_the_role)]
    assert ours == [], ours
