"""Joining a VM NIC at layer 2 to a CNI interface in the pod's network namespace.

QEMU runs in libvirtd's (the root) namespace and libvirt opens a tap by name there, while
CNI puts the pod's interface in the pod's namespace. The route taken here (measured in
shared/guest-image.md and by tests/integration/test_network_vm.py):

1. `wire`, after CNI ADD: in the pod namespace a bridge (`avbrN`) is made; the CNI
   interface's addresses and routes are read and then taken off it (the guest owns them
   now), its MAC is given to the guest and it gets a fresh one, and it is enslaved. The
   bridge carries only the DHCP server's link-local /32. A persistent tap (`tap_name`) is
   created in the root namespace for the domain's `<interface type='ethernet'>`.
2. `move_opened_taps`, after the domain started: each tap QEMU has opened (it has carrier)
   moves into the pod namespace and joins the bridge. QEMU's fd keeps working; the tap now
   lives and dies with the pod's namespace, outside the root namespace.
3. `ensure_taps`, before a (re)start: a persistent tap outlives QEMU closing it and stays
   in the pod namespace; libvirt would then find no tap by that name in its namespace
   ("target managed='no' but specified dev doesn't exist"). An unopened tap found in the
   pod namespace is deleted and a fresh one made in the root namespace.

A daemon restart changes nothing (QEMU holds the fd, the tap is in the pod namespace);
a tap left in the root namespace by a crash between start and move is moved by
`move_opened_taps` from `PodNetworks.restore`. A libvirtd restart leaves QEMU and its fds
alone. On hot-unplug QEMU closes the fd and the persistent tap stays; `unwire` deletes it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import secrets
import socket
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import Internal
from . import netns
from .domain_xml import InterfaceSpec

log = logging.getLogger(__name__)

TAP_PREFIX = "avt"
BRIDGE_PREFIX = "avbr"


def tap_name(sandbox_id: str, slot: int) -> str:
    """`avt` + 9 hex digits of the sandbox id's hash + the slot in hex: at most 15
    characters (IFNAMSIZ - 1). 36 bits: two pods of one node share a name with odds of
    about 1e-5 per thousand pods, and `make_tap` refuses to take over a tap in use."""
    if not 0 <= slot < 4096:
        raise Internal(f"NIC slot {slot} out of range")
    return f"{TAP_PREFIX}{hashlib.sha256(sandbox_id.encode()).hexdigest()[:9]}{slot:x}"


def bridge_name(slot: int) -> str:
    return f"{BRIDGE_PREFIX}{slot}"


def random_mac() -> str:
    """A locally administered unicast MAC."""
    b = bytearray(secrets.token_bytes(6))
    b[0] = (b[0] & 0xFC) | 0x02
    return ":".join(f"{x:02x}" for x in b)


@dataclass(frozen=True)
class Port:
    """One VM NIC and the CNI interface it stands in for."""

    ifname: str  # the CNI interface in the pod namespace
    slot: int
    bridge: str
    tap: str
    guest_mac: str  # the CNI interface's MAC, now the guest's
    mtu: int
    addresses: tuple[str, ...] = ()  # CIDRs
    gateways: tuple[str, ...] = ()
    routes: tuple[tuple[str, str], ...] = field(default=())  # (dst CIDR, via)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Port:
        return cls(ifname=d["ifname"], slot=int(d["slot"]), bridge=d["bridge"], tap=d["tap"],
                   guest_mac=d["guest_mac"], mtu=int(d["mtu"]),
                   addresses=tuple(d.get("addresses", ())),
                   gateways=tuple(d.get("gateways", ())),
                   routes=tuple((str(a), str(b)) for a, b in d.get("routes", ())))

    @property
    def interface_spec(self) -> InterfaceSpec:
        return InterfaceSpec(target_dev=self.tap, mac=self.guest_mac)

    @property
    def ipv4(self) -> list[str]:
        return [a for a in self.addresses if ipaddress.ip_interface(a).version == 4]


# --- reading the CNI interface ------------------------------------------------------------


def _addresses(ns: str, ifname: str) -> list[str]:
    data = netns.ip("addr", "show", "dev", ifname, netns=ns, json_out=True)
    out = []
    for entry in data:
        for a in entry.get("addr_info", []):
            if a.get("family") in ("inet", "inet6") and a.get("scope") == "global":
                out.append(f"{a['local']}/{a['prefixlen']}")
    return out


def _routes(ns: str, ifname: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(default gateways, other routes with a gateway) on the interface."""
    gateways: list[str] = []
    routes: list[tuple[str, str]] = []
    for family in ("-4", "-6"):
        for r in netns.ip(family, "route", "show", "dev", ifname, netns=ns, json_out=True):
            via = r.get("gateway")
            dst = r.get("dst", "")
            if not via:
                continue  # on-link routes: the subnet's own, or ones the guest cannot take
            if dst == "default":
                if via not in gateways:
                    gateways.append(via)
            else:
                if "/" not in dst:
                    dst += "/32" if family == "-4" else "/128"
                routes.append((dst, via))
    return gateways, routes


# --- wiring ---------------------------------------------------------------------------------


def wire(ns: str, ifname: str, sandbox_id: str, slot: int, server_address: str) -> Port:
    """Bridges the CNI interface `ifname` for a VM NIC and makes its tap (see module doc)."""
    info = netns.link(ifname, ns)
    if info is None:
        raise Internal(f"CNI interface {ifname} is not in {ns}")
    mac = str(info.get("address", "")).lower()
    mtu = int(info.get("mtu", 1500))
    addresses = _addresses(ns, ifname)
    gateways, routes = _routes(ns, ifname)
    port = Port(ifname=ifname, slot=slot, bridge=bridge_name(slot),
                tap=tap_name(sandbox_id, slot), guest_mac=mac, mtu=mtu,
                addresses=tuple(addresses), gateways=tuple(gateways), routes=tuple(routes))
    br = port.bridge
    if netns.link(br, ns) is not None:
        netns.delete_link(br, ns)  # left by an attempt cut short
    netns.ip("link", "add", br, "type", "bridge", netns=ns)
    # No IPv6 link-local addresses on the namespace's side: it is not a host on this wire.
    for dev in (br, ifname):
        netns.ip("link", "set", "dev", dev, "addrgenmode", "none", netns=ns, check=False)
    netns.ip("link", "set", "dev", br, "address", random_mac(), "mtu", str(mtu), netns=ns)
    netns.ip("addr", "flush", "dev", ifname, netns=ns)
    netns.ip("link", "set", "dev", ifname, "down", netns=ns)
    netns.ip("link", "set", "dev", ifname, "address", random_mac(), netns=ns)
    netns.ip("link", "set", "dev", ifname, "master", br, "up", netns=ns)
    netns.ip("addr", "add", f"{server_address}/32", "dev", br, netns=ns)
    netns.ip("link", "set", "dev", br, "up", netns=ns)
    make_tap(port)
    return port


def make_tap(port: Port) -> None:
    """The port's tap in the root namespace, up, ready for libvirt to open."""
    old = netns.link(port.tap)
    if old is not None:
        if _opened(old):
            raise Internal(f"tap {port.tap} exists and is in use; not taking it over")
        netns.delete_link(port.tap)  # a leftover of ours: names derive from the sandbox id
    netns.ip("tuntap", "add", "dev", port.tap, "mode", "tap")
    netns.ip("link", "set", "dev", port.tap, "addrgenmode", "none", check=False)
    netns.ip("link", "set", "dev", port.tap, "mtu", str(port.mtu), "up")


def _opened(link: dict[str, Any]) -> bool:
    """A tap has carrier exactly while a process (QEMU) holds it open."""
    flags = link.get("flags", [])
    return "NO-CARRIER" not in flags and "UP" in flags


def unwire(ns: str, port: Port) -> None:
    """Deletes the port's tap wherever it is and its bridge; safe to repeat."""
    netns.delete_link(port.tap)
    netns.delete_link(port.tap, ns)
    netns.delete_link(port.bridge, ns)


def move_opened_taps(ns: str, ports: Sequence[Port]) -> list[str]:
    """Moves each tap that QEMU opened from the root namespace to the bridge in `ns`.

    Returns the taps moved. A tap QEMU has not opened stays where libvirt looks for it.
    """
    moved = []
    for port in ports:
        link = netns.link(port.tap)
        if link is None or not _opened(link):
            continue
        netns.ip("link", "set", "dev", port.tap, "netns", ns)
        netns.ip("link", "set", "dev", port.tap, "addrgenmode", "none", netns=ns, check=False)
        netns.ip("link", "set", "dev", port.tap, "master", port.bridge, "mtu", str(port.mtu),
                 "up", netns=ns)
        moved.append(port.tap)
    return moved


def ensure_taps(ns: str, ports: Sequence[Port]) -> None:
    """Before the domain starts: every port's tap unopened in the root namespace."""
    for port in ports:
        inside = netns.link(port.tap, ns)
        if inside is not None:
            if _opened(inside):
                log.info("tap %s is in use in %s; leaving it", port.tap, ns)
                continue
            netns.delete_link(port.tap, ns)
        if netns.link(port.tap) is None:
            make_tap(port)


def tap_location(ns: str, port: Port) -> str:
    """'netns' (bridged, the normal state of a running VM), 'root' or 'missing'."""
    if netns.link(port.tap, ns) is not None:
        return "netns"
    if netns.link(port.tap) is not None:
        return "root"
    return "missing"


# --- reaching the guest from inside the pod namespace ------------------------------------
# The namespace has no address in the pod's subnet (the guest has it), and a guest answers
# an IPv4 source outside its subnet through its gateway, away from us. IPv6 link-local
# works with no guest configuration: every Linux guest gives its NIC fe80::EUI-64(MAC)
# (unless told to use stable-privacy addresses), and link-local replies stay on the link.


def eui64_link_local(mac: str) -> str:
    b = [int(x, 16) for x in mac.split(":")]
    b[0] ^= 0x02
    iid = [*b[:3], 0xFF, 0xFE, *b[3:]]
    groups = [f"{iid[i] << 8 | iid[i + 1]:x}" for i in range(0, 8, 2)]
    return str(ipaddress.IPv6Address("fe80::" + ":".join(groups)))


def ensure_link_local(ns: str, bridge: str) -> int:
    """Gives the bridge a random link-local address (no DAD: it is random) if it has none;
    returns the bridge's ifindex, the scope id for sockets."""
    data = netns.ip("addr", "show", "dev", bridge, netns=ns, json_out=True)
    if not data:
        raise Internal(f"bridge {bridge} is not in {ns}")
    if not any(a.get("family") == "inet6" and a.get("scope") == "link"
               for a in data[0].get("addr_info", [])):
        iid = secrets.token_bytes(8)
        groups = ":".join(f"{iid[i] << 8 | iid[i + 1]:x}" for i in range(0, 8, 2))
        netns.ip("addr", "add", f"fe80::{groups}/64", "dev", bridge, "nodad", netns=ns)
    return int(data[0]["ifindex"])


def connect_guest(ns: str, port: Port, tcp_port: int, timeout: float) -> socket.socket:
    """A TCP connection from inside the pod namespace to the guest's `tcp_port`, over the
    NIC's link-local address. OSError (ConnectionRefusedError, TimeoutError...) as connect
    raises it."""
    scope = ensure_link_local(ns, port.bridge)
    s = netns.socket_in(ns, socket.AF_INET6, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect((eui64_link_local(port.guest_mac), tcp_port, 0, scope))
    except BaseException:
        s.close()
        raise
    return s


@dataclass(frozen=True)
class InterfaceUsage:
    """Counters of a CNI interface in the pod namespace: the pod's traffic, as a container
    runtime reports its eth0 (libvirt cannot count a tap that left its namespace)."""

    name: str
    rx_bytes: int
    rx_errors: int
    tx_bytes: int
    tx_errors: int


def usage(ns: str, ifnames: Sequence[str]) -> list[InterfaceUsage]:
    if not netns.exists(ns):
        return []
    out = []
    for entry in netns.ip("-s", "link", "show", netns=ns, json_out=True):
        if entry.get("ifname") not in ifnames:
            continue
        st = entry.get("stats64", {})
        rx, tx = st.get("rx", {}), st.get("tx", {})
        out.append(InterfaceUsage(name=entry["ifname"], rx_bytes=int(rx.get("bytes", 0)),
                                  rx_errors=int(rx.get("errors", 0)),
                                  tx_bytes=int(tx.get("bytes", 0)),
                                  tx_errors=int(tx.get("errors", 0))))
    out.sort(key=lambda u: list(ifnames).index(u.name))
    return out
