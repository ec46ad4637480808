"""The netlink adapter on the real kernel, in throwaway namespaces: typed errors naming the
link, delete-if-present, a tap moved between namespaces, the CNI interface bridged, and no
`ip` fork, thread, fd, namespace or link left behind. `ip` only observes (and plays CNI).
"""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from arktos_vm_runtime.adapters import netlink, netns, vmnet
from arktos_vm_runtime.errors import AlreadyExists, Internal, NotFound
from tests.integration.test_network_common import (
    ipj,
    link_names,
    netns_names,
    require_root_tools,
    sh,
)

pytestmark = pytest.mark.integration

SERVER = "169.254.253.1"


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def sid() -> str:
    return f"nl-{os.urandom(4).hex()}"


@pytest.fixture
def ns(sid: str) -> Iterator[str]:
    """A namespace of this test; afterwards nothing of it is left, and no thread or fd."""
    require_root_tools()
    name = f"avnl-{sid}"
    threads, fds = set(threading.enumerate()), _fds()
    netns.create(name)
    try:
        yield name
    finally:
        for slot in range(4):
            netns.delete_link(vmnet.tap_name(sid, slot))
        sh("ip", "-n", name, "link", "delete", "eth0", check=False)
        netns.delete(name)
    assert name not in netns_names()
    assert not [n for n in link_names() if n.startswith(vmnet.tap_name(sid, 0)[:-1])]
    # No thread of ours left; another test's thread may end meanwhile.
    assert not set(threading.enumerate()) - threads
    assert _fds() <= fds  # pytest may close some of its own meanwhile, never open ours


def cni_like(ns: str, peer: str) -> str:
    """What the bridge plugin leaves: eth0 with IPv4 and IPv6 addresses and routes.
    Returns eth0's MAC."""
    sh("ip", "link", "add", peer, "type", "veth", "peer", "name", "eth0", "netns", ns)
    sh("ip", "link", "set", peer, "up")
    for args in (["addr", "add", "10.89.0.2/24", "dev", "eth0"],
                 ["addr", "add", "fd89::2/64", "dev", "eth0", "nodad"],
                 ["link", "set", "eth0", "up"],
                 ["route", "add", "default", "via", "10.89.0.1", "dev", "eth0"],
                 ["route", "add", "10.90.0.0/16", "via", "10.89.0.1", "dev", "eth0"],
                 ["route", "add", "10.91.0.7", "via", "10.89.0.1", "dev", "eth0"],
                 ["-6", "route", "add", "default", "via", "fd89::1", "dev", "eth0"]):
        sh("ip", "-n", ns, *args)
    return str(ipj("link", "show", "dev", "eth0", netns=ns)[0]["address"])


def open_tap(tap: str) -> int:
    """Holds the tap open as QEMU does."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, netlink.TUNSETIFF,
                struct.pack("16sH", tap.encode(), netlink.IFF_TAP | netlink.IFF_NO_PI))
    return fd


def link(name: str, ns: str | None = None) -> dict[str, Any]:
    return dict(ipj("-d", "link", "show", "dev", name, netns=ns)[0])


def test_namespace_create_and_delete_are_safe_to_repeat(ns: str) -> None:
    netns.create(ns)  # an existing one is reused
    lo = netns.link("lo", ns)
    assert lo is not None and lo.up
    other = f"{ns}-b"
    netns.create(other)
    netns.delete(other)
    netns.delete(other)
    assert other not in netns_names()


def test_deletes_are_delete_if_present(ns: str, sid: str) -> None:
    netns.delete_link("avnl-none", ns)
    netns.delete_link("avnl-none")
    netns.delete_link("eth0", "avnl-no-such-namespace")
    assert netns.link("eth0", "avnl-no-such-namespace") is None
    with netns.open_netlink(ns) as nl:
        nl.add_bridge("avbr7")
        assert nl.delete("avbr7") is True
        assert nl.delete("avbr7") is False
    port = vmnet.Port(ifname="eth0", slot=0, bridge="avbr0", tap=vmnet.tap_name(sid, 0),
                      guest_mac="", mtu=1500)
    vmnet.make_tap(port)
    vmnet.unwire(ns, port)
    assert port.tap not in link_names()
    vmnet.unwire(ns, port)
    vmnet.unwire("avnl-no-such-namespace", port)


def test_errors_are_typed_and_name_the_operation_and_link(ns: str, sid: str) -> None:
    with netns.open_netlink(ns) as nl:
        nl.add_bridge("avbr7")
        with pytest.raises(AlreadyExists, match=f"creating bridge avbr7 in network namespace "
                           f"{ns} failed: File exists") as e:
            nl.add_bridge("avbr7")
        assert e.value.context["link"] == "avbr7"
        with pytest.raises(NotFound, match=f"link avnl-none in network namespace {ns}"):
            nl.set("avnl-none", up=True)
        with pytest.raises(NotFound, match="avnl-none"):
            nl.set("avbr7", master="avnl-none")
    with pytest.raises(NotFound, match="network namespace avnl-no-such-namespace"):
        netns.open_netlink("avnl-no-such-namespace")
    # the kernel refuses to move a link where its name is taken: EEXIST
    tap = vmnet.tap_name(sid, 0)
    netlink.make_tap(tap)
    with netns.open_netlink(ns) as nl:
        nl.add_bridge(tap)
    with netns.open_netlink() as root, pytest.raises(AlreadyExists, match=f"moving .*{tap}"):
        root.move(tap, netns.path(ns), ns)
    # a tap someone holds open is never taken over
    fd = open_tap(tap)
    try:
        port = vmnet.Port(ifname="eth0", slot=0, bridge="avbr0", tap=tap, guest_mac="",
                          mtu=1500)
        sh("ip", "link", "set", tap, "up")
        with pytest.raises(Internal, match="in use"):
            vmnet.make_tap(port)
    finally:
        os.close(fd)


def test_wire_bridges_the_cni_interface_and_gives_its_addresses_to_the_guest(
        ns: str, sid: str) -> None:
    mac = cni_like(ns, f"avnlp{sid[-6:]}")
    port = vmnet.wire(ns, "eth0", sid, 0, SERVER)
    assert port.guest_mac == mac and port.mtu == 1500
    assert port.addresses == ("10.89.0.2/24", "fd89::2/64")
    assert port.gateways == ("10.89.0.1", "fd89::1")
    assert port.routes == (("10.90.0.0/16", "10.89.0.1"), ("10.91.0.7/32", "10.89.0.1"))
    eth0 = ipj("-d", "addr", "show", "dev", "eth0", netns=ns)[0]
    assert eth0["address"] != mac and eth0["master"] == "avbr0"
    assert eth0["addr_info"] == []  # the guest owns them now
    br = ipj("-d", "addr", "show", "dev", "avbr0", netns=ns)[0]
    assert [(a["local"], a["prefixlen"]) for a in br["addr_info"]] == [(SERVER, 32)]
    assert "UP" in br["flags"] and br["linkinfo"]["info_data"]["stp_state"] == 0
    tap = link(port.tap)
    assert tap["linkinfo"]["info_kind"] == "tun" and "UP" in tap["flags"]
    assert tap["linkinfo"]["info_data"]["pi"] is False
    # again (the bridge left by an attempt cut short is redone)
    sh("ip", "-n", ns, "addr", "add", "10.89.0.2/24", "dev", "eth0")
    assert vmnet.wire(ns, "eth0", sid, 0, SERVER).addresses == ("10.89.0.2/24",)
    scope = vmnet.ensure_link_local(ns, "avbr0")
    assert scope == link("avbr0", ns)["ifindex"]
    assert vmnet.ensure_link_local(ns, "avbr0") == scope
    ll = [a for a in ipj("addr", "show", "dev", "avbr0", netns=ns)[0]["addr_info"]
          if a["family"] == "inet6"]
    assert len(ll) == 1 and ll[0]["scope"] == "link"
    assert [u.name for u in vmnet.usage(ns, ["eth0", "nope"])] == ["eth0"]


def test_a_tap_moves_into_the_pod_namespace_once_opened_and_back_when_closed(
        ns: str, sid: str) -> None:
    cni_like(ns, f"avnlp{sid[-6:]}")
    port = vmnet.wire(ns, "eth0", sid, 0, SERVER)
    assert vmnet.tap_location(ns, port) == "root"
    assert vmnet.move_opened_taps(ns, [port]) == []  # unopened: libvirt looks for it here
    fd = open_tap(port.tap)
    try:
        assert vmnet.move_opened_taps(ns, [port]) == [port.tap]
        assert vmnet.tap_location(ns, port) == "netns"
        tap = link(port.tap, ns)
        assert tap["master"] == "avbr0" and "NO-CARRIER" not in tap["flags"]
        assert vmnet.move_opened_taps(ns, [port]) == []  # moved already
        vmnet.ensure_taps(ns, [port])  # in use in the pod namespace: left alone
        assert vmnet.tap_location(ns, port) == "netns"
    finally:
        os.close(fd)
    vmnet.ensure_taps(ns, [port])  # closed (the VM stopped): a fresh one where libvirt looks
    assert vmnet.tap_location(ns, port) == "root"
    assert "NO-CARRIER" in link(port.tap)["flags"]
    vmnet.ensure_taps(ns, [port])
    assert vmnet.tap_location(ns, port) == "root"
    vmnet.unwire(ns, port)
    assert vmnet.tap_location(ns, port) == "missing"
    assert "avbr0" not in link_names(ns)


def test_a_nic_forks_no_process(ns: str, sid: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cni_like(ns, f"avnlp{sid[-6:]}")

    def no_fork(*a: object, **k: object) -> None:
        raise AssertionError(f"forked {a[1] if len(a) > 1 else a}")

    monkeypatch.setattr(subprocess.Popen, "_execute_child", no_fork)
    port = vmnet.wire(ns, "eth0", sid, 0, SERVER)
    fd = open_tap(port.tap)
    try:
        assert vmnet.move_opened_taps(ns, [port]) == [port.tap]
    finally:
        os.close(fd)
    vmnet.ensure_taps(ns, [port])
    vmnet.unwire(ns, port)
    monkeypatch.undo()
