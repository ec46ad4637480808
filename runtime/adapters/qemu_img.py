"""The one qemu-img wrapper: what a downloaded file is, and a VM's overlay over an image.

A downloaded file is untrusted. Its format is told by its first bytes here, never by
qemu-img's probing (a raw image that starts like a qcow2 header must not become one with a
backing file on the host): a qcow2 magic means qcow2, the magic of another format this
runtime does not run is refused, anything else is raw. qemu-img then reads the file with
that format given explicitly (``-f``), under a CPU time and address space limit, as
OpenStack does (a crafted image can make qemu-img spin or allocate without bound). A raw
image smaller than MIN_RAW_SIZE is refused: a short error page served with 200 OK is not
a root disk. Both commands run through proc.run, so a missing program, a hang and a full
disk are reported the one way the runtime reports them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidArgument, RuntimeError_
from . import proc

QEMU_IMG = "qemu-img"
TIMEOUT = 120.0
ACCEPTED_FORMATS = ("qcow2", "raw")
LIMITS = proc.Limits(cpu_seconds=30, address_space=1 << 30)
MIN_RAW_SIZE = 1 << 20  # bytes

QCOW_MAGIC = b"QFI\xfb"
# Formats recognised by their first bytes and refused (offset, magic, name).
_OTHER_MAGIC = (
    (0, b"KDMV", "vmdk"), (0, b"COWD", "vmdk"), (0, b"# Disk DescriptorFile", "vmdk"),
    (0, b"conectix", "vpc"), (0, b"vhdxfile", "vhdx"), (0, b"QED\0", "qed"),
    (0, b"LUKS\xba\xbe", "luks"), (0x40, b"\x7f\x10\xda\xbe", "vdi"),
    (0, b"Bochs Virtual HD Image", "bochs"), (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"), (0, b"#!/bin/sh\n#V2.0 Format", "cloop"),
)


@dataclass(frozen=True)
class ImageInfo:
    format: str  # "qcow2" or "raw": the backing format an overlay must name
    virtual_size: int  # disk size the guest sees


def detect_format(path: Path, name: str) -> str:
    """'qcow2' or 'raw' from the file's first bytes; InvalidArgument for another format."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as exc:
        raise InvalidArgument(f"image {name} is not a disk image: cannot read it "
                              f"({exc.strerror})") from None
    if head.startswith(QCOW_MAGIC):
        version = int.from_bytes(head[4:8], "big")
        if version in (2, 3):
            return "qcow2"
        raise InvalidArgument(f"image {name} is not a disk image this runtime accepts: "
                              f"qcow version {version} (accepted: {', '.join(ACCEPTED_FORMATS)})")
    for offset, magic, fmt in _OTHER_MAGIC:
        if head[offset:offset + len(magic)] == magic:
            raise InvalidArgument(
                f"image {name} is not a disk image this runtime accepts: format {fmt!r} "
                f"(accepted: {', '.join(ACCEPTED_FORMATS)})")
    return "raw"


def info(path: Path, name: str) -> ImageInfo:
    """The format and virtual size of a file that must be a qcow2 or raw disk image this
    runtime can use; InvalidArgument (naming image ``name``) says why it is not."""
    fmt = detect_format(path, name)
    if fmt == "raw":
        _check_raw_size(path, name)
    try:
        result = proc.run([QEMU_IMG, "info", "-f", fmt, "--output=json", str(path)],
                          timeout=TIMEOUT, what=f"qemu-img info on image {name}", check=False,
                          limits=LIMITS)
    except RuntimeError_ as exc:
        if "not installed" in exc.message:
            raise
        raise InvalidArgument(f"image {name} is not a disk image to use: {exc.message}") from None
    if result.returncode != 0:
        if result.returncode < 0:
            why = (f"qemu-img info was {proc.exit_text(result.returncode)} (limits: "
                   f"{LIMITS.cpu_seconds} s CPU, {LIMITS.address_space >> 20} MiB address space)")
        else:
            why = (result.err.splitlines() or ["qemu-img info failed"])[-1]
        raise InvalidArgument(f"image {name} is not a disk image: {why}")
    try:
        data = json.loads(result.out)
        found = ImageInfo(data["format"], int(data["virtual-size"]))
    except (ValueError, KeyError, TypeError):
        raise InvalidArgument(
            f"image {name} is not a disk image: qemu-img info gave no format and size"
        ) from None
    _check_usable(data, found, fmt, name)
    return found


def _check_raw_size(path: Path, name: str) -> None:
    size = path.stat().st_size
    if size < MIN_RAW_SIZE or size % 512:
        raise InvalidArgument(
            f"image {name} is not a disk image: {size} bytes of raw data (a raw disk image "
            f"is at least {MIN_RAW_SIZE >> 20} MiB and a multiple of 512 bytes)"
        )


def _check_usable(data: dict[str, Any], found: ImageInfo, fmt: str, name: str) -> None:
    """A guest must see only this file: no other format, backing file, data file or key."""
    if found.format != fmt or found.format not in ACCEPTED_FORMATS:
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
    if found.virtual_size <= 0:
        raise InvalidArgument(
            f"image {name} is not a disk image: virtual size {found.virtual_size}"
        )


def create_overlay(base: Path, base_format: str, dest: Path, size_bytes: int) -> None:
    """A qcow2 at dest backed by base, at least size_bytes large; written atomically."""
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.unlink(missing_ok=True)
    proc.run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-F", base_format, "-b", str(base),
              str(tmp), str(size_bytes)], timeout=TIMEOUT, what="qemu-img create",
             limits=LIMITS)
    tmp.rename(dest)


def apply_snapshot(disk: Path, name: str) -> None:
    """Sets the disk of a stopped VM back to its internal snapshot `name` (disk state only;
    `qemu-img snapshot -a`). The name is a checked id; it travels as one argv element."""
    proc.run([QEMU_IMG, "snapshot", "-a", name, str(disk)], timeout=TIMEOUT,
             what=f"qemu-img snapshot -a on {disk.name}")
