"""What VM a pod asks for: the Virtlet annotations and container limits, parsed and validated.

Pure code: no libvirt, no gRPC, no disk. `parse_vm_config` turns the sandbox annotations of
the contract (shared/cri-arktos.md) plus the container's CPU and memory limits into one
frozen `VMConfig`. Every malformed annotation raises `InvalidArgument` whose message names
the annotation, so CreateContainer fails before anything is created. Unknown annotations are
ignored.

Conventions, the same for every annotation:
- a missing annotation and one whose value is empty (or only whitespace) mean "not set";
- booleans are true only for the exact string "true"; any other value is false;
- enumerations are matched exactly (case-sensitive), after stripping surrounding whitespace.
"""

from __future__ import annotations

import ipaddress
import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, cast

from ..adapters.vmnet import BRIDGE_PREFIX, TAP_PREFIX
from ..checks import is_uuid, shown
from ..errors import InvalidArgument
from .ssh_keys import parse_ssh_keys
from .user_data import parse_yaml_mapping
from .vm_size import memory_mib, parse_root_volume, parse_vcpu_count, vcpus_from_limit

T = TypeVar("T")

# --- annotation names (the contract table) -------------------------------------------------

ANN_ROOT_VOLUME_SIZE = "VirtletRootVolumeSize"
ANN_SSH_KEYS = "VirtletSSHKeys"
ANN_USER_DATA = "VirtletCloudInitUserData"
ANN_USER_DATA_SCRIPT = "VirtletCloudInitUserDataScript"
ANN_META_DATA = "VirtletCloudInitMetaData"
ANN_USER_DATA_OVERWRITE = "VirtletCloudInitUserDataOverwrite"
ANN_CLOUD_INIT_TYPE = "VirtletCloudInitImageType"
ANN_VCPU_COUNT = "VirtletVCPUCount"
ANN_DISK_DRIVER = "VirtletDiskDriver"
ANN_CPU_MODEL = "VirtletCPUModel"
ANN_SYSTEM_UUID = "VirtletSystemUUID"
ANN_FORCE_DHCP = "VirtletForceDHCPNetworkConfig"
ANN_VPC = "VPC"
ANN_NICS = "NICs"
ANN_CNI_ARGS = "arktos.futurewei.com/cni-args"

ALL_ANNOTATIONS = (
    ANN_ROOT_VOLUME_SIZE,
    ANN_SSH_KEYS,
    ANN_USER_DATA,
    ANN_USER_DATA_SCRIPT,
    ANN_META_DATA,
    ANN_USER_DATA_OVERWRITE,
    ANN_CLOUD_INIT_TYPE,
    ANN_VCPU_COUNT,
    ANN_DISK_DRIVER,
    ANN_CPU_MODEL,
    ANN_SYSTEM_UUID,
    ANN_FORCE_DHCP,
    ANN_VPC,
    ANN_NICS,
    ANN_CNI_ARGS,
)

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

DiskDriver = Literal["virtio", "scsi"]
CPUModel = Literal["", "host-model"]
CloudInitType = Literal["nocloud", "configdrive"]

# --- the result ---------------------------------------------------------------------------


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


def nics_to_json(nics: Sequence[NicInfo]) -> str:
    """Compact JSON of the NICs for CNI_ARGS; never contains ';' or '=' (values are checked)."""
    return json.dumps([n.to_contract_dict() for n in nics], separators=(",", ":"))


@dataclass(frozen=True)
class VMConfig:
    """Everything the pod asks of its VM, validated. Build it with `parse_vm_config`."""

    vcpus: int = 1
    memory_mib: int = 1024
    #: 0 when not set: the root disk is then as large as the image.
    root_volume_bytes: int = 0
    disk_driver: DiskDriver = "virtio"
    cpu_model: CPUModel = ""
    #: canonical lower-case UUID string, or None
    system_uuid: str | None = None
    ssh_keys: tuple[str, ...] = ()
    user_data: dict[str, Any] | None = None
    user_data_script: str | None = None
    meta_data: dict[str, Any] | None = None
    user_data_overwrite: bool = False
    cloud_init_type: CloudInitType = "nocloud"
    force_dhcp: bool = False
    vpc: str = ""
    nics: tuple[NicInfo, ...] = ()
    cni_args: tuple[tuple[str, str], ...] = field(default=())


# --- helpers ------------------------------------------------------------------------------

_CONTROL_CHARS_OR_NEWLINE = re.compile(r"[\x00-\x1f\x7f]")


def _bad(annotation: str, message: str) -> InvalidArgument:
    return InvalidArgument(f"annotation {annotation}: {message}", annotation=annotation)


def _shown(value: str, limit: int = 60) -> str:
    """A value for an error message: repr'd (so control characters show) and shortened."""
    if len(value) > limit:
        value = value[:limit] + "..."
    return repr(value)


def _get(annotations: Mapping[str, str], name: str) -> str | None:
    value = annotations.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _bad(name, f"value must be a string, not {type(value).__name__}")
    if not value.strip():
        return None
    return value


def _parse_bool(annotations: Mapping[str, str], name: str) -> bool:
    return annotations.get(name) == "true"


def _parsed(annotations: Mapping[str, str], name: str, parse: Callable[[str], T]) -> T | None:
    """`parse` of the annotation's value, None when it is not set; its ValueError becomes
    InvalidArgument naming the annotation."""
    raw = _get(annotations, name)
    if raw is None:
        return None
    try:
        return parse(raw)
    except ValueError as exc:
        raise _bad(name, str(exc)) from None


def _parse_choice(
    annotations: Mapping[str, str], name: str, choices: Sequence[str], default: str
) -> str:
    raw = _get(annotations, name)
    if raw is None:
        return default
    value = raw.strip()
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices if c)
        raise _bad(name, f"{shown(raw)} is not one of {allowed}")
    return value


# --- individual annotations ---------------------------------------------------------------


def _parse_system_uuid(annotations: Mapping[str, str]) -> str | None:
    raw = _get(annotations, ANN_SYSTEM_UUID)
    if raw is None:
        return None
    text = raw.strip().lower()
    if not is_uuid(text):
        raise _bad(ANN_SYSTEM_UUID, f"{shown(raw)} is not a UUID")
    value = uuid.UUID(text)
    if value.int == 0:
        raise _bad(ANN_SYSTEM_UUID, "the nil UUID is not a system UUID")
    return str(value)


def _check_cni_value(annotation: str, what: str, value: str, max_len: int = 253) -> None:
    """A value that travels in CNI_ARGS: no ';', '=' or control characters."""
    if len(value) > max_len:
        raise _bad(annotation, f"{what} is longer than {max_len} characters")
    if ";" in value or "=" in value:
        raise _bad(annotation, f"{what} {_shown(value)} contains ';' or '='")
    if _CONTROL_CHARS_OR_NEWLINE.search(value):
        raise _bad(annotation, f"{what} {_shown(value)} contains control characters")


def _parse_vpc(annotations: Mapping[str, str]) -> str:
    raw = _get(annotations, ANN_VPC)
    if raw is None:
        return ""
    value = raw.strip()
    _check_cni_value(ANN_VPC, "VPC", value)
    return value


# An interface name reaches `ip ... dev NAME` and CNI_IFNAME: no leading '-' or '.'.
_IFNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}")
# Names the runtime uses itself inside the pod's namespace (vmnet's bridges and taps).
_RESERVED_IFNAMES = ("lo",)
_RESERVED_IFNAME_PREFIXES = (BRIDGE_PREFIX, TAP_PREFIX)


def ifname_problem(name: str) -> str | None:
    """Why `name` cannot be a pod NIC's interface name, or None when it can. Shared by the
    NICs annotation and the NIC hot-plug RPCs."""
    if not _IFNAME.fullmatch(name):
        return (f"{_shown(name)} is not an interface name (1-15 characters of "
                "[A-Za-z0-9_.-], not starting with '-' or '.')")
    if name in _RESERVED_IFNAMES or name.startswith(_RESERVED_IFNAME_PREFIXES):
        return f"{name!r} is reserved for the runtime's own interfaces"
    return None
_NIC_STRING_KEYS = {
    "name": "name",
    "subnetName": "subnet_name",
    "portId": "port_id",
    "ipAddress": "ip_address",
    "tag": "tag",
}


def _parse_nics(annotations: Mapping[str, str]) -> tuple[NicInfo, ...]:
    raw = _get(annotations, ANN_NICS)
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
            _check_cni_value(ANN_NICS, f"{where}: {key}", value)
            fields[attr] = value
        ipv6 = item.get("ipv6Enabled", False)
        if ipv6 is None:
            ipv6 = False
        if not isinstance(ipv6, bool):
            raise _bad(ANN_NICS, f"{where}: ipv6Enabled must be true or false")
        fields["ipv6_enabled"] = ipv6
        name = fields["name"]
        if name:
            problem = ifname_problem(name)
            if problem:
                raise _bad(ANN_NICS, f"{where}: name {problem}")
            if name in seen:
                raise _bad(ANN_NICS, f"{where}: name {name!r} appears twice")
            seen.add(name)
        if fields["ip_address"]:
            try:
                ipaddress.ip_address(fields["ip_address"])
            except ValueError:
                raise _bad(
                    ANN_NICS,
                    f"{where}: ipAddress {_shown(fields['ip_address'])} is not an IP address",
                ) from None
        nics.append(NicInfo(**fields))
    return tuple(nics)


_CNI_KEY = re.compile(r"[A-Za-z0-9_.-]+")


def _parse_cni_args(annotations: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    raw = _get(annotations, ANN_CNI_ARGS)
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
            raise _bad(ANN_CNI_ARGS, f"{_shown(segment)} is not of the form KEY=VALUE")
        if not _CNI_KEY.fullmatch(key):
            raise _bad(ANN_CNI_ARGS, f"key {_shown(key)} does not match [A-Za-z0-9_.-]+")
        if key in RESERVED_CNI_KEYS:
            raise _bad(ANN_CNI_ARGS, f"key {key!r} is set by the runtime and cannot be overridden")
        if key in seen:
            raise _bad(ANN_CNI_ARGS, f"key {key!r} appears twice")
        if "=" in value:
            raise _bad(ANN_CNI_ARGS, f"value of {key} contains '='")
        if _CONTROL_CHARS_OR_NEWLINE.search(value):
            raise _bad(ANN_CNI_ARGS, f"value of {key} contains control characters")
        seen.add(key)
        pairs.append((key, value))
    return tuple(pairs)


# --- entry point --------------------------------------------------------------------------


def parse_vm_config(
    annotations: Mapping[str, str],
    *,
    cpu_quota: int = 0,
    cpu_period: int = 0,
    memory_limit_bytes: int = 0,
    default_memory_mib: int = 1024,
) -> VMConfig:
    """Validate the sandbox annotations and container limits into a `VMConfig`.

    vCPUs come from VirtletVCPUCount, else ceil(cpu_quota / cpu_period) when both are
    positive, else 1; memory from memory_limit_bytes (rounded up to MiB) when positive, else
    `default_memory_mib`. Raises InvalidArgument naming the annotation on any malformed value.
    """
    return VMConfig(
        vcpus=_parsed(annotations, ANN_VCPU_COUNT, parse_vcpu_count)
        or vcpus_from_limit(cpu_quota, cpu_period),
        memory_mib=memory_mib(memory_limit_bytes, default_memory_mib),
        root_volume_bytes=_parsed(annotations, ANN_ROOT_VOLUME_SIZE, parse_root_volume) or 0,
        disk_driver=cast(
            DiskDriver, _parse_choice(annotations, ANN_DISK_DRIVER, ("virtio", "scsi"), "virtio")
        ),
        cpu_model=cast(CPUModel, _parse_choice(annotations, ANN_CPU_MODEL, ("", "host-model"), "")),
        system_uuid=_parse_system_uuid(annotations),
        ssh_keys=_parsed(annotations, ANN_SSH_KEYS, parse_ssh_keys) or (),
        user_data=_parsed(annotations, ANN_USER_DATA, parse_yaml_mapping),
        user_data_script=_get(annotations, ANN_USER_DATA_SCRIPT),  # verbatim
        meta_data=_parsed(annotations, ANN_META_DATA, parse_yaml_mapping),
        user_data_overwrite=_parse_bool(annotations, ANN_USER_DATA_OVERWRITE),
        cloud_init_type=cast(
            CloudInitType,
            _parse_choice(annotations, ANN_CLOUD_INIT_TYPE, ("nocloud", "configdrive"), "nocloud"),
        ),
        force_dhcp=_parse_bool(annotations, ANN_FORCE_DHCP),
        vpc=_parse_vpc(annotations),
        nics=_parse_nics(annotations),
        cni_args=_parse_cni_args(annotations),
    )
