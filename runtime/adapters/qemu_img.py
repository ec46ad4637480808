"""The one qemu-img wrapper: what a downloaded file is, and a VM's overlay over an image.

Both run qemu-img through proc.run, so a missing program, a hang and a full disk are
reported the one way the runtime reports them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidArgument
from . import proc

QEMU_IMG = "qemu-img"
TIMEOUT = 120.0
ACCEPTED_FORMATS = ("qcow2", "raw")


@dataclass(frozen=True)
class ImageInfo:
    format: str  # "qcow2" or "raw": the backing format an overlay must name
    virtual_size: int  # disk size the guest sees


def info(path: Path, name: str) -> ImageInfo:
    """The format and virtual size of a file that must be a qcow2 or raw disk image this
    runtime can use; InvalidArgument (naming image ``name``) says why it is not."""
    result = proc.run([QEMU_IMG, "info", "--output=json", str(path)], timeout=TIMEOUT,
                      what=f"qemu-img info on image {name}", check=False)
    if result.returncode != 0:
        why = (result.err.splitlines() or ["qemu-img info failed"])[-1]
        raise InvalidArgument(f"image {name} is not a disk image: {why}")
    try:
        data = json.loads(result.out)
        found = ImageInfo(data["format"], int(data["virtual-size"]))
    except (ValueError, KeyError, TypeError):
        raise InvalidArgument(
            f"image {name} is not a disk image: qemu-img info gave no format and size"
        ) from None
    _check_usable(data, found, path, name)
    return found


def _check_usable(data: dict[str, Any], found: ImageInfo, path: Path, name: str) -> None:
    """A guest must see only this file: no other format, backing file, data file or key."""
    if found.format not in ACCEPTED_FORMATS:
        raise InvalidArgument(
            f"image {name} is not a disk image this runtime accepts: format {found.format!r} "
            f"(accepted: {', '.join(ACCEPTED_FORMATS)})"
        )
    specific = (data.get("format-specific") or {}).get("data") or {}
    if "backing-filename" in data or "full-backing-filename" in data:
        raise InvalidArgument(f"image {name} is not a disk image to use: it has a backing file")
    if "data-file" in specific or data.get("encrypted"):
        raise InvalidArgument(
            f"image {name} is not a disk image to use: external data file or encryption"
        )
    if found.format == "raw":
        size = path.stat().st_size
        if size == 0 or size % 512:
            raise InvalidArgument(
                f"image {name} is not a disk image: {size} bytes of raw data "
                "(a raw disk is a non-zero multiple of 512 bytes)"
            )
    if found.virtual_size <= 0:
        raise InvalidArgument(
            f"image {name} is not a disk image: virtual size {found.virtual_size}"
        )


def create_overlay(base: Path, base_format: str, dest: Path, size_bytes: int) -> None:
    """A qcow2 at dest backed by base, at least size_bytes large; written atomically."""
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.unlink(missing_ok=True)
    proc.run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-F", base_format, "-b", str(base),
              str(tmp), str(size_bytes)], timeout=TIMEOUT, what="qemu-img create")
    tmp.rename(dest)


def apply_snapshot(disk: Path, name: str) -> None:
    """Sets the disk of a stopped VM back to its internal snapshot `name` (disk state only;
    `qemu-img snapshot -a`). The name is a checked id; it travels as one argv element."""
    proc.run([QEMU_IMG, "snapshot", "-a", name, str(disk)], timeout=TIMEOUT,
             what=f"qemu-img snapshot -a on {disk.name}")
