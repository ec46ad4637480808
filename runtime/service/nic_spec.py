"""What a pod asks of its network: the Arktos `VPC`, `NICs` and `cni-args` annotations,
parsed and checked, and the NIC record (`NicInfo`) the NIC hot-plug RPCs carry too.

Pure code. Every value here travels in CNI_ARGS (K=V;K=V) or names an interface in the
pod's namespace, so each is checked with the shared rules of `checks`: no ';', '=' or
control characters in a CNI value, interface names as the kernel takes them and not one
of the runtime's own. Errors are InvalidArgument naming the annotation.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..adapters.vmnet import BRIDGE_PREFIX, TAP_PREFIX
from ..checks import cni_key_problem, cni_value_problem, ifname_problem, shown
from ..errors import InvalidArgument

ANN_VPC = "VPC"
ANN_NICS = "NICs"
ANN_CNI_ARGS = "arktos.futurewei.com/cni-args"

#: CNI_ARGS keys the runtime sets itself; a pod may not override them through cni-args.
RESERVED_CNI_KEYS = frozenset(
    {
        "IgnoreUnknown",
        "K8S_POD_TENANT",
        "K8S_POD_NAMESPACE",
        "K8S_POD_NAME",
        "K8S_POD_INFRA_CONTAINER_ID",
        "VPC",
        "NICs",
    }
)

# Names the runtime uses itself inside the pod's namespace (vmnet's bridges and taps).
_RESERVED_IFNAMES = ("lo",)
_RESERVED_IFNAME_PREFIXES = (BRIDGE_PREFIX, TAP_PREFIX)


@dataclass(frozen=True)
class NicInfo:
    """One entry of the `NICs` annotation (keys as in the contract)."""

    name: str = ""
    subnet_name: str = ""
    port_id: str = ""
    ip_address: str = ""
    tag: str = ""
    ipv6_enabled: bool = False

    def to_contract_dict(self) -> dict[str, Any]:
        """The entry with the contract's JSON keys (empty strings and false left out)."""
        out: dict[str, Any] = {}
        for key, value in (
            ("name", self.name),
            ("subnetName", self.subnet_name),
            ("portId", self.port_id),
            ("ipAddress", self.ip_address),
            ("tag", self.tag),
        ):
            if value:
                out[key] = value
        if self.ipv6_enabled:
            out["ipv6Enabled"] = True
        return out

    @classmethod
    def from_contract_dict(cls, d: dict[str, Any]) -> NicInfo:
        """The inverse of `to_contract_dict`, for stored records (checked when they were
        first parsed)."""
        return cls(name=d.get("name", ""), subnet_name=d.get("subnetName", ""),
                   port_id=d.get("portId", ""), ip_address=d.get("ipAddress", ""),
                   tag=d.get("tag", ""), ipv6_enabled=bool(d.get("ipv6Enabled", False)))


def nics_to_json(nics: Sequence[NicInfo]) -> str:
    """Compact JSON of the NICs for CNI_ARGS; never contains ';' or '=' (values are checked).
    Non-ASCII stays as it is (UTF-8): never longer than the annotation it was parsed from,
    where \\u escapes would make a 4-byte character 12 bytes of CNI_ARGS."""
    return json.dumps([n.to_contract_dict() for n in nics], separators=(",", ":"),
                      ensure_ascii=False)


def nic_name_problem(name: str) -> str | None:
    """Why `name` cannot be a pod NIC's interface name, or None when it can. Shared by the
    NICs annotation and the NIC hot-plug RPCs."""
    problem = ifname_problem(name)
    if problem is not None:
        return problem
    if name in _RESERVED_IFNAMES or name.startswith(_RESERVED_IFNAME_PREFIXES):
        return f"{name!r} is reserved for the runtime's own interfaces"
    return None


def ip_problem(value: str) -> str | None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return f"{shown(value)} is not an IP address"
    return None


# --- the annotations ----------------------------------------------------------------------


def _bad(annotation: str, message: str) -> InvalidArgument:
    return InvalidArgument(f"annotation {annotation}: {message}", annotation=annotation)


def parse_vpc(raw: str | None) -> str:
    """The `VPC` annotation (None: not set)."""
    if raw is None:
        return ""
    value = raw.strip()
    problem = cni_value_problem(value)
    if problem is not None:
        raise _bad(ANN_VPC, f"VPC {problem}")
    return value


_NIC_STRING_KEYS = {
    "name": "name",
    "subnetName": "subnet_name",
    "portId": "port_id",
    "ipAddress": "ip_address",
    "tag": "tag",
}


def _parse_nic(index: int, item: object) -> NicInfo:
    where = f"NIC #{index}"
    if not isinstance(item, dict):
        raise _bad(ANN_NICS, f"{where} must be a JSON object")
    fields: dict[str, Any] = {}
    for key, attr in _NIC_STRING_KEYS.items():
        value = item.get(key, "")
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise _bad(ANN_NICS, f"{where}: {key} must be a string")
        problem = cni_value_problem(value)
        if problem is not None:
            raise _bad(ANN_NICS, f"{where}: {key} {problem}")
        fields[attr] = value
    ipv6 = item.get("ipv6Enabled", False)
    if ipv6 is None:
        ipv6 = False
    if not isinstance(ipv6, bool):
        raise _bad(ANN_NICS, f"{where}: ipv6Enabled must be true or false")
    fields["ipv6_enabled"] = ipv6
    if fields["name"]:
        problem = nic_name_problem(fields["name"])
        if problem:
            raise _bad(ANN_NICS, f"{where}: name {problem}")
    if fields["ip_address"]:
        problem = ip_problem(fields["ip_address"])
        if problem:
            raise _bad(ANN_NICS, f"{where}: ipAddress {problem}")
    return NicInfo(**fields)


def parse_nics(raw: str | None) -> tuple[NicInfo, ...]:
    """The `NICs` annotation, a JSON array of the contract's NIC objects (None: not set)."""
    if raw is None:
        return ()
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise _bad(ANN_NICS, f"not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise _bad(ANN_NICS, f"must be a JSON array, not {type(data).__name__}")
    nics: list[NicInfo] = []
    seen: set[str] = set()
    for index, item in enumerate(data):
        nic = _parse_nic(index, item)
        if nic.name:
            if nic.name in seen:
                raise _bad(ANN_NICS, f"NIC #{index}: name {nic.name!r} appears twice")
            seen.add(nic.name)
        nics.append(nic)
    return tuple(nics)


def parse_cni_args(raw: str | None) -> tuple[tuple[str, str], ...]:
    """The `cni-args` annotation, `K=V;K=V` (None: not set), in order."""
    if raw is None:
        return ()
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for segment in raw.split(";"):
        segment = segment.strip()
        if not segment:
            continue
        key, sep, value = segment.partition("=")
        if not sep:
            raise _bad(ANN_CNI_ARGS, f"{shown(segment)} is not of the form KEY=VALUE")
        problem = cni_key_problem(key)
        if problem is not None:
            raise _bad(ANN_CNI_ARGS, f"key {problem}")
        if key in RESERVED_CNI_KEYS:
            raise _bad(ANN_CNI_ARGS, f"key {key!r} is set by the runtime and cannot be overridden")
        if key in seen:
            raise _bad(ANN_CNI_ARGS, f"key {key!r} appears twice")
        # No length limit of its own beyond the annotation's (there never was one).
        problem = cni_value_problem(value, max_len=len(raw))
        if problem is not None:
            raise _bad(ANN_CNI_ARGS, f"value of {key} {problem}")
        seen.add(key)
        pairs.append((key, value))
    return tuple(pairs)

