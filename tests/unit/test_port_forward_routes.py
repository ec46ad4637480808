"""PortForward's routes: the guest's primary NIC, and only it, is told its on-link route back
to the pod namespace's address (by DHCP and by the seed), whichever address the pod uses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from arktos_vm_runtime.adapters import dhcp, vmnet
from arktos_vm_runtime.service.network_state import READY, Attachment, PodState
from arktos_vm_runtime.service.pod_wiring import PodWiring


def port(slot: int, addresses: tuple[str, ...]) -> vmnet.Port:
    return vmnet.Port(ifname=f"eth{slot}", slot=slot, bridge=f"avbr{slot}",
                      tap=f"avt{slot}", guest_mac=f"0a:58:0a:58:00:0{slot}", mtu=1500,
                      addresses=addresses, gateways=("10.88.0.1",) if slot == 0 else ())


def state(server: str, first: tuple[str, ...] = ("10.88.0.5/24",)) -> PodState:
    config: Any = None  # not read by the views under test
    return PodState(
        sandbox_id="sb", netns="avr-sb", config=config, tenant="t", namespace="n", name="p",
        vpc="", extra_args=(), server_address=server, ready=True, next_slot=2,
        attachments=(Attachment(ifname="eth0", args=(), state=READY,
                                ports=(port(0, first),)),
                     Attachment(ifname="eth1", args=(), state=READY, hotplug=True,
                                ports=(port(1, ("10.89.0.7/16",)),))))


def wiring() -> PodWiring:
    records: Any = None
    cni_: Any = None
    return PodWiring(Path("/nonexistent"), records, cni_)


def test_dhcp_gives_the_route_back_to_the_primary_nic_only() -> None:
    hosts = wiring()._dhcp_hosts(state(dhcp.SERVER_ADDRESS))
    assert [h.link_routes for h in hosts] == [("169.254.253.1/32",), ()]
    text = dhcp.render_conf(hosts, Path("/x"))
    assert ("dhcp-option=tag:p0,option:classless-static-route,0.0.0.0/0,10.88.0.1,"
            "169.254.253.1/32,0.0.0.0") in text.splitlines()
    assert "tag:p1,option:classless-static-route" not in text


def test_the_route_follows_the_server_address_the_pod_leaves_free() -> None:
    hosts = wiring()._dhcp_hosts(state(dhcp.ALT_SERVER_ADDRESS))
    assert hosts[0].link_routes == ("169.254.253.2/32",)
    info = wiring().view(state(dhcp.ALT_SERVER_ADDRESS)).network_info
    assert [i.link_routes for i in info.interfaces] == [("169.254.253.2/32",), ()]


def test_no_route_for_a_primary_nic_without_ipv4() -> None:
    info = wiring().view(state(dhcp.SERVER_ADDRESS, ("fd00::5/64",))).network_info
    assert [i.link_routes for i in info.interfaces] == [(), ()]
