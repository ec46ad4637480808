"""The `VirtletExtraDisks` annotation: extra qcow2 disks a pod asks for.

Virtlet declared extra disks as flexvolumes; Arktos turns a VM pod's spec into sandbox
annotations, so here they are one annotation, a JSON array of objects:

    [{"name": "data", "size": "1Gi", "bus": "virtio", "cache": "writeback",
      "format": "ext4", "mountPath": "/data"}]

  name       [a-z0-9-]{1,12}, unique in the pod; the guest finds the disk by the serial
             `x-NAME` (/dev/disk/by-id/virtio-x-NAME)
  size       a Kubernetes quantity (as VirtletRootVolumeSize), at least 1 MiB
  bus        "virtio" (default) or "scsi"
  cache      "writeback" (default) or "none"
  format     "" (default: a blank disk) or "ext4": made by the guest on first boot, when
             the disk holds no filesystem yet
  mountPath  where the guest mounts it (with format; absolute)

Each disk is a new qcow2 in the VM's directory, removed with the pod. Pure parsing; the
count limit and the size quota are checked with the pod's other disks (service/volumes).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from .guest_paths import check_guest_path
from .vm_size import parse_root_volume

ANN_EXTRA_DISKS = "VirtletExtraDisks"
MAX_ENTRIES = 64  # beyond any disk limit; a bound on the parse itself
MIB = 1 << 20
_NAME = re.compile(r"[a-z0-9-]{1,12}")
_KEYS = {"name", "size", "bus", "cache", "format", "mountPath"}


@dataclass(frozen=True)
class ExtraDisk:
    name: str
    size_bytes: int
    bus: Literal["virtio", "scsi"] = "virtio"
    cache: Literal["writeback", "none"] = "writeback"
    format: Literal["", "ext4"] = ""
    mount_path: str = ""

    @property
    def serial(self) -> str:
        return f"x-{self.name}"


def _choice(entry: dict[str, Any], key: str, choices: tuple[str, ...], where: str) -> Any:
    value = entry.get(key, choices[0])
    if value not in choices:
        raise ValueError(f"{where}: {key} must be one of {', '.join(map(repr, choices))}")
    return value


def parse_extra_disks(text: str) -> tuple[ExtraDisk, ...]:
    """The disks of the annotation's JSON; ValueError saying what is wrong."""
    try:
        raw = json.loads(text)
    except ValueError:
        raise ValueError("not valid JSON (a list of disks)") from None
    if not isinstance(raw, list):
        raise ValueError("must be a JSON list of disks")
    if len(raw) > MAX_ENTRIES:
        raise ValueError(f"more than {MAX_ENTRIES} disks")
    disks: list[ExtraDisk] = []
    for index, entry in enumerate(raw):
        where = f"disk {index}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: must be an object")
        unknown = set(entry) - _KEYS
        if unknown:
            raise ValueError(f"{where}: unknown key {sorted(unknown)[0][:40]!r}")
        name = entry.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"{where}: name must match [a-z0-9-]{{1,12}}")
        where = f"disk {name!r}"
        size = entry.get("size")
        if not isinstance(size, str):
            raise ValueError(f"{where}: size must be a quantity string such as '1Gi'")
        size_bytes = parse_root_volume(size)
        if size_bytes < MIB:
            raise ValueError(f"{where}: size must be at least 1Mi")
        fmt = _choice(entry, "format", ("", "ext4"), where)
        mount_path = entry.get("mountPath", "")
        if not isinstance(mount_path, str):
            raise ValueError(f"{where}: mountPath must be a string")
        if fmt and not mount_path:
            raise ValueError(f"{where}: a formatted disk needs a mountPath")
        if mount_path and not fmt:
            raise ValueError(f"{where}: a mountPath needs a format")
        if mount_path:
            problem = check_guest_path(mount_path)
            if problem:
                raise ValueError(f"{where}: mountPath {problem}")
        disks.append(ExtraDisk(name=name, size_bytes=size_bytes,
                               bus=_choice(entry, "bus", ("virtio", "scsi"), where),
                               cache=_choice(entry, "cache", ("writeback", "none"), where),
                               format=fmt, mount_path=mount_path))
    names = [d.name for d in disks]
    if len(names) != len(set(names)):
        raise ValueError("two disks share a name")
    return tuple(disks)
