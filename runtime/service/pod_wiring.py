"""The building blocks pod network setup and NIC hot-plug share: the CNI runtime
configuration and arguments of an attachment, bridging its CNI interfaces to VM taps,
and the pod's DHCP server with a static lease per NIC.

Each step that makes something records it first (`NetworkRecords.save`) and returns the
new record; callers hold the sandbox's lock.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from collections.abc import Sequence
from pathlib import Path

from ..adapters import cni, dhcp, netns, vmnet
from ..adapters.fsutil import make_dirs
from ..checks import is_search_domain
from .guest_network import NetInterface, NetworkInfo
from .network_state import Attachment, NetworkRecords, PodNetwork, PodState, pod_ips

log = logging.getLogger(__name__)



class PodWiring:
    def __init__(self, root: Path, records: NetworkRecords, cni_: cni.CNI) -> None:
        self.root = root
        self.records = records
        self.cni = cni_

    def artefacts(self, sandbox_id: str) -> Path:
        """The sandbox's directory of artefacts: dnsmasq's configuration, leases and pid."""
        return self.root / sandbox_id

    def rt(self, st: PodState, att: Attachment) -> cni.RuntimeConf:
        return cni.RuntimeConf(container_id=st.sandbox_id, netns=str(netns.path(st.netns)),
                               ifname=att.ifname, args=att.args)

    @staticmethod
    def base_args(st: PodState, vpc: str, nics_json: str,
                  extra: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
        return tuple(cni.pod_cni_args(tenant=st.tenant, namespace=st.namespace, name=st.name,
                                      sandbox_id=st.sandbox_id, vpc=vpc, nics_json=nics_json,
                                      extra=extra))

    def wire(self, st: PodState, ifname: str, wanted: Sequence[str]) -> PodState:
        """Bridges each CNI interface of attachment `ifname`'s result for a VM NIC."""
        result = cni.parse_result(st.attachment(ifname).result or {})
        # "lo": a conflist may run the loopback plugin, which reports it as a sandbox interface
        names = [n for n in result.sandbox_interfaces()
                 if n != "lo" and (n in wanted or not wanted)]
        if not names:
            names = [ifname]
        for name in names:
            slot = st.next_slot
            # the slot (so its tap name) is recorded before the tap is made
            st = self.records.save(dataclasses.replace(st, next_slot=slot + 1))
            port = vmnet.wire(st.netns, name, st.sandbox_id, slot, st.server_address)
            att = st.attachment(ifname)
            st = self.records.save(
                st.with_attachment(dataclasses.replace(att, ports=(*att.ports, port))))
        return st

    def restart_dhcp(self, st: PodState) -> None:
        artefacts = self.artefacts(st.sandbox_id)
        make_dirs(artefacts, 0o755)
        dhcp.start(st.netns, artefacts, self._dhcp_hosts(st))

    def _dhcp_hosts(self, st: PodState) -> list[dhcp.DhcpHost]:
        hosts = []
        gateway_given = False
        dns_servers, dns_search = self.dns(st)
        for port in st.ports():
            v4 = port.ipv4
            if not v4:
                continue
            gw = next((g for g in port.gateways if ipaddress.ip_address(g).version == 4), "")
            if gateway_given:
                gw = ""  # one default route: the first NIC's
            gateway_given = gateway_given or bool(gw)
            routes = tuple((d, v) for d, v in port.routes
                           if ipaddress.ip_network(d, strict=False).version == 4)
            hosts.append(dhcp.DhcpHost(
                tag=f"p{port.slot}", bridge=port.bridge, mac=port.guest_mac, address=v4[0],
                gateway=gw, routes=routes, link_routes=self._return_route(st, port),
                dns_servers=tuple(s for s in dns_servers if ipaddress.ip_address(s).version == 4),
                dns_search=dns_search, mtu=port.mtu))
        return hosts

    @staticmethod
    def _return_route(st: PodState, port: vmnet.Port) -> tuple[str, ...]:
        """The primary NIC's on-link route back to the namespace's address (the pod IP is
        its first IPv4 address): PortForward's connections come from there."""
        ports = st.ports()
        if not ports or port != ports[0] or not port.ipv4:
            return ()
        return (vmnet.guest_return_route(st.server_address),)

    @staticmethod
    def dns(st: PodState) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """DNS servers and search domains: the first CNI result's that names any."""
        for att in st.attachments:
            if att.result:
                r = cni.parse_result(att.result)
                servers = []
                for s in r.dns_servers:
                    try:
                        servers.append(str(ipaddress.ip_address(s)))
                    except ValueError:
                        log.warning("CNI result names DNS server %r; not an address", s)
                search = tuple(s for s in r.dns_search if is_search_domain(s))
                return tuple(servers), search
        return (), ()

    def view(self, st: PodState) -> PodNetwork:
        """What the VM needs: its NICs, the seed's network-config and the pod IP."""
        ifaces: list[NetInterface] = []
        gateway_given = False
        for port in st.ports():
            gateways = port.gateways
            if gateway_given:
                gateways = ()
            gateway_given = gateway_given or bool(gateways)
            ifaces.append(NetInterface(mac=port.guest_mac, name=port.ifname,
                                       addresses=port.addresses, gateways=gateways,
                                       routes=port.routes,
                                       link_routes=self._return_route(st, port),
                                       mtu=port.mtu if port.mtu != 1500 else None))
        servers, search = self.dns(st)
        ip, ips = pod_ips(st)
        return PodNetwork(sandbox_id=st.sandbox_id, netns_path=str(netns.path(st.netns)),
                          ip=ip, ips=ips,
                          network_info=NetworkInfo(interfaces=tuple(ifaces),
                                                   dns_servers=servers, dns_search=search),
                          interfaces=tuple(p.interface_spec for p in st.ports()))
