"""What the kubelet mounted for a pod, read on the host. No policy: the service layer
(service/volumes.py) decides what each path is for and passes the limits.

- `read_volume_files`: the files of a ConfigMap, Secret or projected volume directory,
  as the kubelet lays them out (`..data` -> `..<timestamp>/`, and each key a symlink
  `key -> ..data/key`). Symlinks are followed only when what they name stays inside the
  volume directory; the bytes read are bounded (`max_bytes`, `max_files`) and counted as
  they are read, so a huge or endless file is never read whole.
- `kind_of`: what a host path is (directory, regular file, block device, other, missing),
  after following symlinks, and `real_path`: its resolved path.
- `create_disk`: an empty qcow2 of a given size (an extra disk of a pod).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import InvalidArgument
from . import proc
from .qemu_img import LIMITS, QEMU_IMG, TIMEOUT

PathKind = Literal["dir", "file", "block", "other", "missing"]
#: names the kubelet's atomic writer keeps beside the keys (`..data`, `..2024_01_01_...`)
KUBELET_HIDDEN_PREFIX = ".."


@dataclass(frozen=True)
class HostFile:
    """One file to write into the guest: its path relative to the volume ("" for a
    single-file mount), its bytes and its permission bits."""

    rel: str
    data: bytes
    mode: int


def real_path(path: Path) -> Path | None:
    """`path` with every symlink resolved, or None when it does not exist."""
    try:
        return Path(os.path.realpath(path, strict=True))
    except OSError:
        return None


def kind_of(path: Path) -> PathKind:
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    if stat.S_ISREG(st.st_mode):
        return "file"
    if stat.S_ISBLK(st.st_mode):
        return "block"
    return "other"


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


class _Budget:
    def __init__(self, what: str, max_bytes: int, max_files: int) -> None:
        self.what, self.left, self.files_left = what, max_bytes, max_files
        self.max_bytes, self.max_files = max_bytes, max_files

    def read(self, path: Path, rel: str) -> HostFile:
        self.files_left -= 1
        if self.files_left < 0:
            raise InvalidArgument(f"{self.what}: more than {self.max_files} files")
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidArgument(f"{self.what}: {rel or path.name!r} is not a regular file")
            chunks: list[bytes] = []
            while True:
                chunk = os.read(fd, min(1 << 20, self.left + 1))
                if not chunk:
                    break
                self.left -= len(chunk)
                if self.left < 0:
                    raise InvalidArgument(
                        f"{self.what}: the files are larger than {self.max_bytes} bytes "
                        "(setting volume-files-max-kib)")
                chunks.append(chunk)
            return HostFile(rel, b"".join(chunks), stat.S_IMODE(st.st_mode))
        finally:
            os.close(fd)


def read_file(path: Path, what: str, max_bytes: int) -> HostFile:
    """One regular file (a subPath or single-file mount), at most `max_bytes`."""
    return _Budget(what, max_bytes, 1).read(path, "")


def read_volume_files(root: Path, what: str, max_bytes: int, max_files: int) -> list[HostFile]:
    """Every regular file below the volume directory `root`, by the path the container
    sees (sorted), reading at most `max_bytes` in all and `max_files` files. A symlink
    that leads outside `root` (after resolving every link) is refused, naming it;
    `..`-prefixed names at any level are the kubelet's own and are only reached through
    the key links."""
    base = real_path(root)
    if base is None or kind_of(base) != "dir":
        raise InvalidArgument(f"{what}: not a directory")
    budget = _Budget(what, max_bytes, max_files)
    out: list[HostFile] = []

    def walk(directory: Path, prefix: str, depth: int) -> None:
        if depth > 32:
            raise InvalidArgument(f"{what}: directories nested too deep")
        for name in sorted(os.listdir(directory)):
            if name.startswith(KUBELET_HIDDEN_PREFIX):
                continue
            rel = f"{prefix}{name}"
            target = real_path(directory / name)
            if target is None:
                continue  # a dangling link: the kubelet is swapping ..data; nothing there
            if not _inside(target, base):
                raise InvalidArgument(f"{what}: {rel[:200]!r} leads outside the volume")
            kind = kind_of(target)
            if kind == "dir":
                walk(target, f"{rel}/", depth + 1)
            elif kind == "file":
                out.append(budget.read(target, rel))
            else:
                raise InvalidArgument(f"{what}: {rel[:200]!r} is not a regular file")

    walk(base, "", 0)
    return out


def create_disk(dest: Path, size_bytes: int) -> None:
    """An empty qcow2 of `size_bytes` at dest, written under a temporary name first."""
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.unlink(missing_ok=True)
    proc.run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(tmp), str(size_bytes)],
             timeout=TIMEOUT, what="qemu-img create", limits=LIMITS)
    tmp.rename(dest)
