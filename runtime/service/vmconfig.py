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

import base64
import binascii
import math
import re
import struct
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, cast

import yaml

from ..errors import InvalidArgument
from .nic_spec import (
    ANN_CNI_ARGS,
    ANN_NICS,
    ANN_VPC,
    NicInfo,
    parse_cni_args,
    parse_nics,
    parse_vpc,
)

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
# ANN_VPC, ANN_NICS and ANN_CNI_ARGS: the pod network's annotations, in nic_spec

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

# --- bounds -------------------------------------------------------------------------------

MIN_VCPUS = 1
MAX_VCPUS = 64
MIN_MEMORY_MIB = 64
MAX_MEMORY_MIB = 1024 * 1024  # 1 TiB
MAX_ROOT_VOLUME_BYTES = 1 << 50  # 1 PiB: a sanity cap, far above any real root disk

DiskDriver = Literal["virtio", "scsi"]
CPUModel = Literal["", "host-model"]
CloudInitType = Literal["nocloud", "configdrive"]

# --- the result ---------------------------------------------------------------------------


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
_DIGITS = re.compile(r"[0-9]{1,6}")


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


def _parse_choice(
    annotations: Mapping[str, str], name: str, choices: Sequence[str], default: str
) -> str:
    raw = _get(annotations, name)
    if raw is None:
        return default
    value = raw.strip()
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices if c)
        raise _bad(name, f"{_shown(raw)} is not one of {allowed}")
    return value


# --- Kubernetes quantities ----------------------------------------------------------------

_QUANTITY = re.compile(
    r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
    r"(?:(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)|[eE](?P<exp>[+-]?[0-9]{1,3}))?"
)
_SUFFIX_MULTIPLIER = {
    "Ki": 1 << 10,
    "Mi": 1 << 20,
    "Gi": 1 << 30,
    "Ti": 1 << 40,
    "Pi": 1 << 50,
    "Ei": 1 << 60,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
}


def parse_quantity_bytes(text: str) -> int:
    """A Kubernetes quantity ("4Gi", "1.5Gi", "500M", "1e9", "1024") as whole bytes.

    Fractions of a byte round up, as Kubernetes' Quantity.Value() does. Raises ValueError on
    anything else (negative numbers, milli units, garbage).
    """
    s = text.strip()
    if s.startswith("+"):
        s = s[1:]
    if len(s) > 64:
        raise ValueError("too long")
    m = _QUANTITY.fullmatch(s)
    if m is None:
        raise ValueError("not a quantity")
    try:
        number = Decimal(m.group("number"))
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only decimals
        raise ValueError("not a number") from exc
    if m.group("suffix"):
        value = number * _SUFFIX_MULTIPLIER[m.group("suffix")]
    elif m.group("exp"):
        value = number.scaleb(int(m.group("exp")))
    else:
        value = number
    if value > MAX_ROOT_VOLUME_BYTES:
        raise ValueError("too large")
    return math.ceil(value)


# --- individual annotations ---------------------------------------------------------------


def _parse_root_volume(annotations: Mapping[str, str]) -> int:
    raw = _get(annotations, ANN_ROOT_VOLUME_SIZE)
    if raw is None:
        return 0
    try:
        return parse_quantity_bytes(raw)
    except ValueError as exc:
        raise _bad(
            ANN_ROOT_VOLUME_SIZE,
            f"{_shown(raw)} is not a valid size ({exc}); use a Kubernetes quantity like 4Gi",
        ) from None


def _parse_vcpus(annotations: Mapping[str, str], cpu_quota: int, cpu_period: int) -> int:
    raw = _get(annotations, ANN_VCPU_COUNT)
    if raw is not None:
        text = raw.strip()
        if not _DIGITS.fullmatch(text):
            raise _bad(ANN_VCPU_COUNT, f"{_shown(raw)} is not an integer")
        vcpus = int(text)
        if not MIN_VCPUS <= vcpus <= MAX_VCPUS:
            raise _bad(ANN_VCPU_COUNT, f"{vcpus} is outside {MIN_VCPUS}..{MAX_VCPUS}")
        return vcpus
    if cpu_quota > 0 and cpu_period > 0:
        vcpus = -(-cpu_quota // cpu_period)  # ceil without floats
        if vcpus > MAX_VCPUS:
            raise InvalidArgument(
                f"cpu limit: quota {cpu_quota} / period {cpu_period} asks for {vcpus} vCPUs,"
                f" more than {MAX_VCPUS}",
                cpu_quota=cpu_quota,
                cpu_period=cpu_period,
            )
        return vcpus
    return 1


def _parse_memory(memory_limit_bytes: int, default_memory_mib: int) -> int:
    if memory_limit_bytes > 0:
        mib = -(-memory_limit_bytes // (1 << 20))
        source = f"memory limit {memory_limit_bytes} bytes"
    else:
        mib = default_memory_mib
        source = f"default memory {default_memory_mib} MiB"
    if not MIN_MEMORY_MIB <= mib <= MAX_MEMORY_MIB:
        raise InvalidArgument(
            f"{source} gives {mib} MiB, outside {MIN_MEMORY_MIB} MiB..{MAX_MEMORY_MIB} MiB",
            memory_mib=mib,
        )
    return mib


_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def _parse_system_uuid(annotations: Mapping[str, str]) -> str | None:
    raw = _get(annotations, ANN_SYSTEM_UUID)
    if raw is None:
        return None
    text = raw.strip()
    if not _UUID.fullmatch(text):
        raise _bad(ANN_SYSTEM_UUID, f"{_shown(raw)} is not a UUID")
    value = uuid.UUID(text)
    if value.int == 0:
        raise _bad(ANN_SYSTEM_UUID, "the nil UUID is not a system UUID")
    return str(value)


# OpenSSH public key types (the plain keys and their certificates).
_SSH_KEY_TYPES = frozenset(
    {
        "ssh-rsa",
        "ssh-dss",
        "ssh-ed25519",
        "ssh-ed448",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
        "ssh-rsa-cert-v01@openssh.com",
        "ssh-dss-cert-v01@openssh.com",
        "ssh-ed25519-cert-v01@openssh.com",
        "ecdsa-sha2-nistp256-cert-v01@openssh.com",
        "ecdsa-sha2-nistp384-cert-v01@openssh.com",
        "ecdsa-sha2-nistp521-cert-v01@openssh.com",
        "sk-ssh-ed25519-cert-v01@openssh.com",
        "sk-ecdsa-sha2-nistp256-cert-v01@openssh.com",
    }
)
_SSH_KEY_LINE = re.compile(r"(?P<type>\S+) (?P<blob>[A-Za-z0-9+/]+={0,2})(?: (?P<comment>.*))?")


def check_ssh_public_key(line: str) -> str:
    """Return `line` normalised (single spaces) if it is an OpenSSH public key, else raise.

    Accepts "TYPE BASE64 [COMMENT]" where BASE64 decodes to a key blob that starts with the
    same TYPE; authorized_keys options (command=..., from=...) are not accepted.
    """
    text = re.sub(r"[ \t]+", " ", line.strip(" \t"))
    if _CONTROL_CHARS_OR_NEWLINE.search(text):
        raise ValueError("contains control characters")
    m = _SSH_KEY_LINE.fullmatch(text)
    if m is None:
        raise ValueError("not of the form 'TYPE BASE64 [COMMENT]'")
    key_type = m.group("type")
    if key_type not in _SSH_KEY_TYPES:
        raise ValueError(f"unknown key type {_shown(key_type, 40)}")
    try:
        blob = base64.b64decode(m.group("blob"), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the key is not valid base64") from None
    if len(blob) < 4:
        raise ValueError("the key blob is too short")
    (length,) = struct.unpack(">I", blob[:4])
    if blob[4 : 4 + length] != key_type.encode() or len(blob) <= 4 + length:
        raise ValueError("the key blob does not match its type")
    return text


def _parse_ssh_keys(annotations: Mapping[str, str]) -> tuple[str, ...]:
    raw = _get(annotations, ANN_SSH_KEYS)
    if raw is None:
        return ()
    keys: list[str] = []
    for number, line in enumerate(raw.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        try:
            keys.append(check_ssh_public_key(line))
        except ValueError as exc:
            raise _bad(ANN_SSH_KEYS, f"line {number} is not an OpenSSH public key: {exc}") from None
    return tuple(keys)


# libyaml's loader: fast, and its parser refuses nesting deeper than 1000 by itself; the
# pure-Python one is quadratic on deep flow nesting and recurses in its composer.
_YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
MAX_YAML_DEPTH = 64


def _check_yaml_structure(text: str) -> None:
    """Refuse aliases (a few can expand to gigabytes once dumped) and deep nesting."""
    depth = 0
    for event in yaml.parse(text, Loader=_YAML_LOADER):
        if isinstance(event, yaml.AliasEvent):
            raise ValueError("YAML aliases (*name) are not allowed")
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise ValueError(f"YAML nested deeper than {MAX_YAML_DEPTH} levels")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _parse_yaml_mapping(annotations: Mapping[str, str], name: str) -> dict[str, Any] | None:
    raw = _get(annotations, name)
    if raw is None:
        return None
    try:
        _check_yaml_structure(raw)
        value = yaml.load(raw, Loader=_YAML_LOADER)  # CSafeLoader or SafeLoader
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _bad(name, f"not valid YAML: {first}") from None
    except ValueError as exc:
        raise _bad(name, str(exc)) from None
    except RecursionError:
        raise _bad(name, "YAML nested too deeply") from None
    if not isinstance(value, dict):
        raise _bad(name, f"must be a YAML mapping, not {type(value).__name__}")
    return value


def _parse_user_data_script(annotations: Mapping[str, str]) -> str | None:
    return _get(annotations, ANN_USER_DATA_SCRIPT)


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
        vcpus=_parse_vcpus(annotations, cpu_quota, cpu_period),
        memory_mib=_parse_memory(memory_limit_bytes, default_memory_mib),
        root_volume_bytes=_parse_root_volume(annotations),
        disk_driver=cast(
            DiskDriver, _parse_choice(annotations, ANN_DISK_DRIVER, ("virtio", "scsi"), "virtio")
        ),
        cpu_model=cast(CPUModel, _parse_choice(annotations, ANN_CPU_MODEL, ("", "host-model"), "")),
        system_uuid=_parse_system_uuid(annotations),
        ssh_keys=_parse_ssh_keys(annotations),
        user_data=_parse_yaml_mapping(annotations, ANN_USER_DATA),
        user_data_script=_parse_user_data_script(annotations),
        meta_data=_parse_yaml_mapping(annotations, ANN_META_DATA),
        user_data_overwrite=_parse_bool(annotations, ANN_USER_DATA_OVERWRITE),
        cloud_init_type=cast(
            CloudInitType,
            _parse_choice(annotations, ANN_CLOUD_INIT_TYPE, ("nocloud", "configdrive"), "nocloud"),
        ),
        force_dhcp=_parse_bool(annotations, ANN_FORCE_DHCP),
        vpc=parse_vpc(_get(annotations, ANN_VPC)),
        nics=parse_nics(_get(annotations, ANN_NICS)),
        cni_args=parse_cni_args(_get(annotations, ANN_CNI_ARGS)),
    )
