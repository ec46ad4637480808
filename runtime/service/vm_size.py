"""How big a pod's VM is: vCPUs, memory and root disk, within the runtime's bounds.

From the annotations' values (VirtletVCPUCount, VirtletRootVolumeSize) and the container's
CPU and memory limits. Annotation values that do not parse raise ValueError (vmconfig names
the annotation); limits out of bounds raise InvalidArgument naming the limit.
"""

from __future__ import annotations

import re

from ..checks import shown
from ..errors import InvalidArgument
from .quantity import parse_quantity_bytes

MIN_VCPUS = 1
MAX_VCPUS = 64
MIN_MEMORY_MIB = 64
MAX_MEMORY_MIB = 1024 * 1024  # 1 TiB
MAX_ROOT_VOLUME_BYTES = 1 << 50  # 1 PiB: a sanity cap, far above any real root disk

_DIGITS = re.compile(r"[0-9]{1,6}")


def parse_vcpu_count(text: str) -> int:
    """VirtletVCPUCount: a plain decimal integer within MIN_VCPUS..MAX_VCPUS."""
    digits = text.strip()
    if not _DIGITS.fullmatch(digits):
        raise ValueError(f"{shown(text)} is not an integer")
    vcpus = int(digits)
    if not MIN_VCPUS <= vcpus <= MAX_VCPUS:
        raise ValueError(f"{vcpus} is outside {MIN_VCPUS}..{MAX_VCPUS}")
    return vcpus


def vcpus_from_limit(cpu_quota: int, cpu_period: int) -> int:
    """ceil(quota / period) when both are positive, else 1."""
    if cpu_quota <= 0 or cpu_period <= 0:
        return 1
    vcpus = -(-cpu_quota // cpu_period)  # ceil without floats
    if vcpus > MAX_VCPUS:
        raise InvalidArgument(
            f"cpu limit: quota {cpu_quota} / period {cpu_period} asks for {vcpus} vCPUs,"
            f" more than {MAX_VCPUS}",
            cpu_quota=cpu_quota,
            cpu_period=cpu_period,
        )
    return vcpus


def memory_mib(memory_limit_bytes: int, default_memory_mib: int) -> int:
    """The limit rounded up to MiB when positive, else the default; within the bounds."""
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


def parse_root_volume(text: str) -> int:
    """VirtletRootVolumeSize: a Kubernetes quantity, in bytes."""
    try:
        return parse_quantity_bytes(text, MAX_ROOT_VOLUME_BYTES)
    except ValueError as exc:
        raise ValueError(
            f"{shown(text)} is not a valid size ({exc}); use a Kubernetes quantity like 4Gi"
        ) from None
