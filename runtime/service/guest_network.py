"""The guest's network as the runtime learned it from CNI: what the seed tells the guest.

The network service builds these from the CNI results (addresses, gateways, routes, DNS)
and the NICs it wired; `seed.render_seed` turns them into netplan's network-config
(NoCloud) and OpenStack's network_data.json (ConfigDrive). They are checked here, once,
so no template ever sees an address that is not one.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..checks import ifname_problem, is_mac, is_search_domain, shown
from ..errors import InvalidArgument


@dataclass(frozen=True)
class NetInterface:
    """One guest NIC, matched by MAC; static addresses unless the pod forces DHCP."""

    mac: str
    #: name the guest gives the NIC (set-name); empty: ethN by position
    name: str = ""
    #: CIDR addresses, "10.1.2.3/24" or "fd00::3/64"
    addresses: tuple[str, ...] = ()
    #: default gateways (IPv4 and/or IPv6)
    gateways: tuple[str, ...] = ()
    #: extra routes as (destination CIDR, via)
    routes: tuple[tuple[str, str], ...] = ()
    #: destinations on the link itself, no gateway (the route back to PortForward's source)
    link_routes: tuple[str, ...] = ()
    mtu: int | None = None

    def __post_init__(self) -> None:
        if not is_mac(self.mac):
            raise InvalidArgument(f"network: MAC {shown(self.mac)} is not a lower-case MAC address")
        if self.name:
            problem = ifname_problem(self.name)
            if problem:
                raise InvalidArgument(f"network: {problem}")
        try:
            for addr in self.addresses:
                if "/" not in addr:
                    raise ValueError(f"{addr!r} has no prefix length")
                ipaddress.ip_interface(addr)
            for gw in self.gateways:
                ipaddress.ip_address(gw)
            for dest, via in self.routes:
                ipaddress.ip_network(dest, strict=False)
                ipaddress.ip_address(via)
            for dest in self.link_routes:
                ipaddress.ip_network(dest, strict=False)
        except ValueError as exc:
            raise InvalidArgument(f"network: interface {self.mac}: {exc}") from None
        if self.mtu is not None and not 68 <= self.mtu <= 65535:
            raise InvalidArgument(f"network: MTU {self.mtu} out of range")


@dataclass(frozen=True)
class NetworkInfo:
    """The guest's network, as the runtime learned it from CNI."""

    interfaces: tuple[NetInterface, ...] = ()
    dns_servers: tuple[str, ...] = ()
    dns_search: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        try:
            for server in self.dns_servers:
                ipaddress.ip_address(server)
        except ValueError as exc:
            raise InvalidArgument(f"network: DNS server: {exc}") from None
        for domain in self.dns_search:
            if not is_search_domain(domain):
                raise InvalidArgument(f"network: {shown(domain)} is not a search domain")
        macs = [i.mac for i in self.interfaces]
        if len(macs) != len(set(macs)):
            raise InvalidArgument("network: two interfaces share a MAC address")
