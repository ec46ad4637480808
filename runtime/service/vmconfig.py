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

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, cast

from ..checks import is_uuid, shown
from ..errors import InvalidArgument
from .extra_disks import ANN_EXTRA_DISKS, ExtraDisk, parse_extra_disks
from .nic_spec import (
    ANN_CNI_ARGS,
    ANN_NICS,
    ANN_VPC,
    NicInfo,
    parse_cni_args,
    parse_nics,
    parse_vpc,
)
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
    ANN_EXTRA_DISKS,
)


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
    extra_disks: tuple[ExtraDisk, ...] = ()


# --- helpers ------------------------------------------------------------------------------

def _bad(annotation: str, message: str) -> InvalidArgument:
    return InvalidArgument(f"annotation {annotation}: {message}", annotation=annotation)


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
        vpc=parse_vpc(_get(annotations, ANN_VPC)),
        nics=parse_nics(_get(annotations, ANN_NICS)),
        cni_args=parse_cni_args(_get(annotations, ANN_CNI_ARGS)),
        extra_disks=_parsed(annotations, ANN_EXTRA_DISKS, parse_extra_disks) or (),
    )
