"""Small file-system helpers shared by the adapters that write crash-safe files."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from ..errors import Internal, ResourceExhausted, RuntimeError_


def fsync_dir(path: Path) -> None:
    """Makes a rename or unlink in `path` durable (the directory entry itself)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def storage_error(exc: OSError, what: str) -> RuntimeError_:
    """A local file error as the runtime reports it: a full disk is ResourceExhausted (the
    kubelet may free space and retry), anything else Internal."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(f"no space left for {what}: {exc.strerror}")
    return Internal(f"{what} failed: {exc}")


def make_dirs(path: Path, mode: int) -> None:
    """mkdir -p whose new directories, and `path` itself, get exactly `mode` whatever the
    umask (the daemon runs with 077; QEMU, another user, must traverse some of them)."""
    path = Path(path)
    missing = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(mode=mode, parents=True, exist_ok=True)
    for p in {path, *missing}:
        os.chmod(p, mode)
