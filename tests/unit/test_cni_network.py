"""The pure parts of pod networking: dnsmasq's configuration (a golden file pins it;
AVR_REGEN_GOLDEN=1 rewrites it), tap and bridge names, the interface XML for hot-plug,
NicSpec validation and the stored state's round trip."""

from __future__ import annotations

import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from arktos_vm_runtime.adapters import cni, dhcp, vmnet
from arktos_vm_runtime.adapters.domain_xml import InterfaceSpec, render_interface
from arktos_vm_runtime.errors import InvalidArgument
from arktos_vm_runtime.service.network_state import Attachment, PodState
from arktos_vm_runtime.service.nic_hotplug import validate_nic
from arktos_vm_runtime.service.nic_spec import NicInfo

GOLDEN = Path(__file__).parent / "golden"
TEMPLATES = [Path(__file__).resolve().parents[2] / "templates"]


HOSTS = [
    dhcp.DhcpHost(tag="p0", bridge="avbr0", mac="0a:58:0a:58:00:05", address="10.88.0.5/24",
                  gateway="10.88.0.1", routes=(("10.96.0.0/12", "10.88.0.254"),),
                  link_routes=("169.254.253.1/32",),
                  dns_servers=("10.96.0.10",), dns_search=("svc.cluster.local",),
                  mtu=1450),
    dhcp.DhcpHost(tag="p1", bridge="avbr1", mac="0a:58:0a:59:00:07",
                  address="10.89.0.7/16"),
]


def check_golden(name: str, text: str) -> None:
    golden = GOLDEN / name
    if os.environ.get("AVR_REGEN_GOLDEN") == "1":
        golden.write_text(text)
    assert golden.is_file(), f"missing {golden}: run with AVR_REGEN_GOLDEN=1"
    assert text == golden.read_text(), f"{name} differs; AVR_REGEN_GOLDEN=1 rewrites it"


def test_dnsmasq_conf_golden(tmp_path: Path) -> None:
    text = dhcp.render_conf(HOSTS, Path("/var/lib/x/sb"))
    check_golden("dnsmasq.conf", text)
    # dnsmasq's own syntax check; shared-network names a bridge that only exists in the
    # pod's namespace (dnsmasq looks it up while parsing), so those lines stay out of it.
    if shutil.which("dnsmasq") is None:
        pytest.fail("dnsmasq is missing: apt-get install dnsmasq-base")
    conf = tmp_path / "dnsmasq.conf"
    conf.write_text("".join(line for line in text.splitlines(keepends=True)
                            if not line.startswith("shared-network=")))
    r = subprocess.run(["dnsmasq", "--test", "-C", str(conf)], capture_output=True,
                       text=True, check=False)
    assert r.returncode == 0 and "syntax check OK" in r.stderr, r.stderr


def test_dnsmasq_conf_static_leases_routes_and_one_router() -> None:
    text = dhcp.render_conf(HOSTS, Path("/var/lib/x/sb"))
    lines = text.splitlines()
    for expected in [
        "port=0", "leasefile-ro", "no-resolv", "user=nobody",
        "pid-file=/var/lib/x/sb/dnsmasq.pid",
        "dhcp-range=set:p0,10.88.0.0,static,255.255.255.0,infinite",
        "shared-network=avbr0,10.88.0.0",
        "dhcp-host=0a:58:0a:58:00:05,set:p0,10.88.0.5,infinite",
        "dhcp-option=tag:p0,option:router,10.88.0.1",
        # option 121 replaces the router option (RFC 3442), so the default route is in it;
        # the server's address on the link (router 0.0.0.0) is PortForward's way back
        "dhcp-option=tag:p0,option:classless-static-route,0.0.0.0/0,10.88.0.1,"
        "169.254.253.1/32,0.0.0.0,10.96.0.0/12,10.88.0.254",
        "dhcp-option=tag:p0,option:dns-server,10.96.0.10",
        "dhcp-option=tag:p0,option:domain-search,svc.cluster.local",
        "dhcp-option=tag:p0,option:mtu,1450",
        "dhcp-range=set:p1,10.89.0.0,static,255.255.0.0,infinite",
        "dhcp-host=0a:58:0a:59:00:07,set:p1,10.89.0.7,infinite",
        "dhcp-option=tag:p1,option:router",  # none: not dnsmasq's own address
        "dhcp-option=tag:p1,option:dns-server",
    ]:
        assert expected in lines, expected
    assert not [x for x in lines if x.startswith("dhcp-option=tag:p1,option:mtu")]


def test_server_address_avoids_the_pods_own() -> None:
    assert dhcp.server_address(["10.1.0.2/24"]) == dhcp.SERVER_ADDRESS
    assert dhcp.server_address([f"{dhcp.SERVER_ADDRESS}/24"]) == dhcp.ALT_SERVER_ADDRESS


def test_tap_names_fit_ifnamsiz_and_differ() -> None:
    long_id = "f" * 128
    names = {vmnet.tap_name(long_id, s) for s in range(4096)}
    assert len(names) == 4096
    assert max(len(n) for n in names) <= 15
    assert vmnet.tap_name("a", 0) != vmnet.tap_name("b", 0)
    assert vmnet.tap_name("a", 0).startswith(vmnet.TAP_PREFIX)
    InterfaceSpec(target_dev=vmnet.tap_name(long_id, 4095), mac="02:00:00:00:00:01")


def test_random_macs_are_local_unicast() -> None:
    for _ in range(200):
        first = int(vmnet.random_mac()[:2], 16)
        assert first & 0x02 and not first & 0x01


def test_interface_xml() -> None:
    xml = render_interface(InterfaceSpec(target_dev="avt12345678a", mac="02:00:00:00:00:01"),
                           TEMPLATES)
    el = ET.fromstring(xml)
    assert el.get("type") == "ethernet"
    assert el.find("mac").get("address") == "02:00:00:00:00:01"  # type: ignore[union-attr]
    target = el.find("target")
    assert target is not None and target.get("dev") == "avt12345678a"
    assert target.get("managed") == "no"
    assert el.find("model").get("type") == "virtio"  # type: ignore[union-attr]


@pytest.mark.parametrize("nic, vpc, match", [
    (NicInfo(), "", "Name is required"),
    (NicInfo(name="a" * 16), "", "not an interface name"),
    (NicInfo(name="eth 1"), "", "not an interface name"),
    (NicInfo(name="lo"), "", "reserved"),
    (NicInfo(name="avbr3"), "", "reserved"),
    (NicInfo(name="eth1", ip_address="10.0.0.256"), "", "not an IP address"),
    (NicInfo(name="eth1", port_id="a;b"), "", "PortId"),
    (NicInfo(name="eth1", subnet_name="a=b"), "", "SubnetName"),
    (NicInfo(name="eth1"), "v\n1", "VPC"),
])
def test_bad_nic_specs(nic: NicInfo, vpc: str, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        validate_nic(nic, vpc)


def test_good_nic_specs() -> None:
    validate_nic(NicInfo(name="eth1", subnet_name="s", port_id="p", ip_address="10.0.0.9"))
    validate_nic(NicInfo(name="eth1", ip_address="fd00::9", ipv6_enabled=True), "vpc-1")


def test_state_round_trip() -> None:
    config = cni.parse_network_config({"name": "n", "cniVersion": "1.0.0",
                                       "plugins": [{"type": "bridge"}]}, "/x", conflist=True)
    port = vmnet.Port(ifname="eth0", slot=0, bridge="avbr0", tap="avt0123abcd0",
                      guest_mac="02:00:00:00:00:01", mtu=1450, addresses=("10.0.0.2/24",),
                      gateways=("10.0.0.1",), routes=(("10.9.0.0/16", "10.0.0.254"),))
    st = PodState(sandbox_id="sb", netns="avr-sb", config=config, tenant="t", namespace="n",
                  name="p", vpc="v", extra_args=(("A", "1"),), server_address="169.254.253.1",
                  ready=True, next_slot=1, attachments=(Attachment(
                      ifname="eth0", args=(("IgnoreUnknown", "1"),), state="ready",
                      nics=(NicInfo(name="eth0", port_id="p0"),), result={"ips": []},
                      ports=(port,), domain=""),))
    assert PodState.from_dict(st.to_dict()) == st
