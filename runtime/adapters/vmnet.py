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

import contextlib
import hashlib
import ipaddress
import logging
import secrets
import socket
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import Internal, NotFound
from . import netlink, netns
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


def _routes(nl: netlink.Netlink, ifname: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(default gateways, other routes with a gateway) on the interface."""
    gateways: list[str] = []
    routes: list[tuple[str, str]] = []
    for r in nl.routes(ifname):
        if not r.gateway:
            continue  # on-link routes: the subnet's own, or ones the guest cannot take
        if not r.dst:
            if r.gateway not in gateways:
                gateways.append(r.gateway)
        else:
            routes.append((r.dst, r.gateway))
    return gateways, routes


@contextlib.contextmanager
def _session(ns: str | None) -> Iterator[netlink.Netlink | None]:
    """A netlink session in `ns`, or None when the namespace is gone (so are its links)."""
    try:
        nl = netns.open_netlink(ns)
    except NotFound:
        yield None
        return
    with nl:
        yield nl


# --- wiring ---------------------------------------------------------------------------------


def wire(ns: str, ifname: str, sandbox_id: str, slot: int, server_address: str) -> Port:
    """Bridges the CNI interface `ifname` for a VM NIC and makes its tap (see module doc)."""
    with netns.open_netlink(ns) as nl:
        info = nl.link(ifname)
        if info is None:
            raise Internal(f"CNI interface {ifname} is not in {ns}")
        addresses = [a.cidr for a in nl.addresses(ifname) if a.scope == netlink.SCOPE_GLOBAL]
        gateways, routes = _routes(nl, ifname)
        port = Port(ifname=ifname, slot=slot, bridge=bridge_name(slot),
                    tap=tap_name(sandbox_id, slot), guest_mac=info.mac, mtu=info.mtu or 1500,
                    addresses=tuple(addresses), gateways=tuple(gateways), routes=tuple(routes))
        br = port.bridge
        nl.delete(br)  # left by an attempt cut short
        nl.add_bridge(br)
        # No IPv6 link-local addresses on the namespace's side: it is not a host on this wire.
        for dev in (br, ifname):
            nl.no_ipv6_link_local(dev)
        nl.set(br, mac=random_mac(), mtu=port.mtu)
        nl.flush_addresses(ifname)
        nl.set(ifname, up=False)
        nl.set(ifname, mac=random_mac())
        nl.set(ifname, master=br, up=True)
        nl.add_address(br, f"{server_address}/32")
        nl.set(br, up=True)
        _route_to_guest(nl, port, server_address)
    make_tap(port)
    return port


def _route_to_guest(nl: netlink.Netlink, port: Port, server_address: str) -> None:
    """On-link /32 routes to the guest's IPv4 addresses through the bridge, from the
    server's link-local address: PortForward connects to the guest from the namespace,
    and the guest answers through its on-link route to that address (`guest_return_route`)."""
    for cidr in port.ipv4:
        nl.replace_host_route(port.bridge, cidr.split("/")[0], server_address)


def ensure_routes_to_guest(ns: str, ports: Sequence[Port], server_address: str) -> None:
    """`wire`'s routes again, for pods wired before they existed (restore after upgrade)."""
    with _session(ns) as nl:
        if nl is None:
            return
        for port in ports:
            if nl.link(port.bridge) is not None:
                _route_to_guest(nl, port, server_address)


def guest_return_route(server_address: str) -> str:
    """The route the primary NIC's guest needs back to the namespace (DHCP option 121
    and the seed's network-config give it): the server's address, on-link."""
    return f"{server_address}/32"


def make_tap(port: Port) -> None:
    """The port's tap in the root namespace, up, ready for libvirt to open."""
    with netns.open_netlink() as nl:
        old = nl.link(port.tap)
        if old is not None:
            if old.opened:
                raise Internal(f"tap {port.tap} exists and is in use; not taking it over")
            nl.delete(port.tap)  # a leftover of ours: names derive from the sandbox id
        netlink.make_tap(port.tap)
        nl.no_ipv6_link_local(port.tap)
        nl.set(port.tap, mtu=port.mtu, up=True)


def unwire(ns: str, port: Port) -> None:
    """Deletes the port's tap wherever it is and its bridge; safe to repeat."""
    netns.delete_link(port.tap)
    with _session(ns) as nl:
        if nl is not None:
            nl.delete(port.tap)
            nl.delete(port.bridge)


def move_opened_taps(ns: str, ports: Sequence[Port]) -> list[str]:
    """Moves each tap that QEMU opened from the root namespace to the bridge in `ns`.

    Returns the taps moved. A tap QEMU has not opened stays where libvirt looks for it.
    """
    moved: list[str] = []
    with netns.open_netlink() as root:
        opened = [p for p in ports if (t := root.link(p.tap)) is not None and t.opened]
        if not opened:
            return moved
        with netns.open_netlink(ns) as nl:
            for port in opened:
                root.move(port.tap, netns.path(ns), ns)
                nl.no_ipv6_link_local(port.tap)
                nl.set(port.tap, master=port.bridge, mtu=port.mtu, up=True)
                moved.append(port.tap)
    return moved


def ensure_taps(ns: str, ports: Sequence[Port]) -> None:
    """Before the domain starts: every port's tap unopened in the root namespace."""
    with _session(ns) as nl:
        for port in ports:
            if nl is not None and (inside := nl.link(port.tap)) is not None:
                if inside.opened:
                    log.info("tap %s is in use in %s; leaving it", port.tap, ns)
                    continue
                nl.delete(port.tap)
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
    with netns.open_netlink(ns) as nl:
        link = nl.link(bridge)
        if link is None:
            raise Internal(f"bridge {bridge} is not in {ns}")
        if not any(a.family == socket.AF_INET6 and a.scope == netlink.SCOPE_LINK
                   for a in nl.addresses(bridge)):
            iid = secrets.token_bytes(8)
            groups = ":".join(f"{iid[i] << 8 | iid[i + 1]:x}" for i in range(0, 8, 2))
            nl.add_address(bridge, f"fe80::{groups}/64", nodad=True)
        return link.index


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
    with _session(ns) as nl:
        links = nl.links() if nl is not None else []
    out = [InterfaceUsage(name=link.name, rx_bytes=link.rx_bytes, rx_errors=link.rx_errors,
                          tx_bytes=link.tx_bytes, tx_errors=link.tx_errors)
           for link in links if link.name in ifnames]
    out.sort(key=lambda u: list(ifnames).index(u.name))
    return out
