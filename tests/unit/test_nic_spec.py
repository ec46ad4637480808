"""The pod network's annotations and NIC records on their own (parse_vm_config's tests in
test_vmconfig.py cover them through the annotations), and the NicSpec check of the
hot-plug RPCs: one rule per value, from checks."""

from __future__ import annotations

import pytest

from arktos_vm_runtime.errors import InvalidArgument
from arktos_vm_runtime.service.nic_hotplug import validate_nic
from arktos_vm_runtime.service.nic_spec import (
    ANN_CNI_ARGS,
    ANN_NICS,
    ANN_VPC,
    NicInfo,
    nic_name_problem,
    parse_cni_args,
    parse_nics,
    parse_vpc,
)


def test_not_set() -> None:
    assert parse_vpc(None) == "" and parse_nics(None) == () and parse_cni_args(None) == ()


@pytest.mark.parametrize("name", ["eth0", "net1", "e_1", "a.b", "x" * 15])
def test_nic_names(name: str) -> None:
    assert nic_name_problem(name) is None


@pytest.mark.parametrize(("name", "why"), [
    ("", "not an interface name"), ("-x", "not an interface name"),
    (".x", "not an interface name"), ("x" * 16, "not an interface name"),
    ("a b", "not an interface name"), ("a/b", "not an interface name"),
    ("lo", "reserved"), ("avbr0", "reserved"), ("avt123", "reserved"),
])
def test_bad_nic_names(name: str, why: str) -> None:
    assert why in (nic_name_problem(name) or "")


def test_contract_dict_round_trip() -> None:
    nic = NicInfo(name="eth1", subnet_name="s", port_id="p", ip_address="fd00::1", tag="t",
                  ipv6_enabled=True)
    assert NicInfo.from_contract_dict(nic.to_contract_dict()) == nic
    assert NicInfo.from_contract_dict({}) == NicInfo()


@pytest.mark.parametrize(("parse", "raw", "annotation"), [
    (parse_vpc, "a;b", ANN_VPC),
    (parse_nics, '[{"name": "lo"}]', ANN_NICS),
    (parse_nics, '[{"tag": "' + "x" * 254 + '"}]', ANN_NICS),
    (parse_cni_args, "K=a\x1bb", ANN_CNI_ARGS),
    (parse_cni_args, "K;x=1", ANN_CNI_ARGS),
])
def test_errors_name_the_annotation(parse: object, raw: str, annotation: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse(raw)  # type: ignore[operator]
    assert str(info.value).startswith(f"annotation {annotation}: ")


def test_error_messages_cut_what_they_echo() -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_nics('[{"name": "' + "x" * 5000 + '"}]')
    assert len(str(info.value)) < 300


def test_cni_args_values_keep_their_length() -> None:
    # cni-args values never had a length limit of their own (the annotation bounds them)
    assert parse_cni_args("K=" + "v" * 1000) == (("K", "v" * 1000),)


@pytest.mark.parametrize(("nic", "vpc", "match"), [
    (NicInfo(name="eth1", tag="a\x00b"), "", "NicSpec.tag .* control characters"),
    (NicInfo(name="eth1", port_id="p" * 254), "", "NicSpec.PortId .* longer than 253"),
    (NicInfo(name="eth1", ip_address="10.0.0.1/24"), "", "NicSpec.IpAddress .* not an IP"),
    (NicInfo(name="eth1"), "a=b", "NicSpec.VPC .* ';' or '='"),
])
def test_nic_requests(nic: NicInfo, vpc: str, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        validate_nic(nic, vpc)
