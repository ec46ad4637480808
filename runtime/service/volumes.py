"""What the kubelet mounts for a pod, and how each reaches the VM (CreateContainer).

The kubelet hands the runtime host paths (`Mount{container_path, host_path, readonly}`)
and block devices (`Device{container_path, host_path, permissions}`); here each is
checked and turned into a part of the VM:

- ConfigMap, Secret, projected and downward-API volumes (host paths below the kubelet's
  `volumes/kubernetes.io~configmap|secret|projected|downward-api/` directories), and any
  mount of a single regular file (a subPath): their files are read on the host (bounded
  by the setting volume-files-max-kib, no symlink leading out of the volume) and written
  into the guest at the container path by the seed (cloud-init write_files, base64, with
  the file's mode; Secret and projected files readable by root alone in the guest).
  The seed ISO that carries them is root's, 0600 (adapters/seed_iso).
- Any other directory (emptyDir, hostPath): shared with virtiofs (a virtiofsd per share,
  started by libvirt), mounted at the container path on every boot by the seed; readonly
  mounts are mounted read-only by the guest (libvirt 9 cannot make virtiofs read-only).
  The resolved host path must lie below one of the allowed roots (setting
  volume-allowed-roots), never be `/`, and exist.
- Devices (block PVs): the resolved host path must be a block device; attached as a raw
  disk with serial `d-N`, linked at the container path inside the guest by the seed
  (/dev/disk/by-id/...); read-only when the permissions lack "w".
- Extra disks (annotation VirtletExtraDisks, service/extra_disks): new qcow2s in the VM's
  directory, formatted (ext4) and mounted by the seed when asked.
Devices and extra disks together are at most the setting max-vm-disks.

The kubelet's own per-container files (/etc/hosts, /dev/termination-log) are left out:
the guest keeps its own. Every refusal is InvalidArgument naming the mount, before
anything is made; no file content is ever logged.
"""

from __future__ import annotations

import base64
import logging
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..adapters import host_volumes
from ..adapters.domain_xml import DiskBus, DiskSpec, FilesystemSpec
from ..checks import shown
from ..config import Settings, volume_allowed_roots
from ..errors import InvalidArgument
from .extra_disks import ExtraDisk
from .guest_paths import check_guest_path

log = logging.getLogger(__name__)

FILE_VOLUME_KINDS = ("kubernetes.io~configmap", "kubernetes.io~secret",
                     "kubernetes.io~projected", "kubernetes.io~downward-api")
SECRET_KINDS = ("kubernetes.io~secret", "kubernetes.io~projected")
KUBELET_FILES = ("/etc/hosts", "/dev/termination-log")
MAX_VOLUME_FILES = 1000
MAX_HOST_PATH = 4096


@dataclass(frozen=True)
class MountInput:
    container_path: str
    host_path: str
    readonly: bool = False


@dataclass(frozen=True)
class DeviceInput:
    container_path: str
    host_path: str
    permissions: str = "rwm"


@dataclass(frozen=True)
class GuestFile:
    path: str
    data: bytes
    mode: int

    @property
    def context(self) -> dict[str, str]:
        return {"path": self.path, "content": base64.b64encode(self.data).decode("ascii"),
                "permissions": f"0{self.mode:o}"}


@dataclass(frozen=True)
class VolumePlan:
    files: tuple[GuestFile, ...] = ()
    disks: tuple[DiskSpec, ...] = ()
    #: (path, size in bytes) of each extra qcow2 to create in the VM's directory
    new_disks: tuple[tuple[Path, int], ...] = ()
    filesystems: tuple[FilesystemSpec, ...] = ()
    #: the shell lines the guest runs on every boot (mounts, links); each value quoted
    boot_lines: tuple[str, ...] = ()

    @property
    def boot_script(self) -> str:
        if not self.boot_lines:
            return ""
        return "\n".join(("udevadm settle --timeout=30 || true", *self.boot_lines)) + "\n"


def _bad(what: str, problem: str) -> InvalidArgument:
    return InvalidArgument(f"{what}: {problem}")


def _guest_path(what: str, path: str) -> str:
    problem = check_guest_path(path)
    if problem:
        raise _bad(what, f"container_path {problem}")
    return path


def _host_path(what: str, path: str) -> Path:
    if not path or len(path) > MAX_HOST_PATH or "\0" in path or not path.startswith("/"):
        raise _bad(what, "host_path must be an absolute path")
    resolved = host_volumes.real_path(Path(path))
    if resolved is None:
        raise _bad(what, "host_path does not exist")
    return resolved


def _under_roots(what: str, resolved: Path, roots: Sequence[Path]) -> None:
    for root in roots:
        real_root = host_volumes.real_path(root)
        if real_root is None or real_root == Path("/"):
            continue
        if resolved == real_root or real_root in resolved.parents:
            return
    raise _bad(what, f"host_path is outside the allowed roots "
                     f"({', '.join(map(str, roots)) or 'none'}; setting volume-allowed-roots)")


def _volume_kind(host_path: str) -> str | None:
    parts = Path(host_path).parts
    for kind in FILE_VOLUME_KINDS:
        if len(parts) >= 2 and parts[-2] == kind:
            return kind
    return None


def _letters(n: int) -> str:
    """0 -> a, 25 -> z, 26 -> aa: the disk name suffix libvirt and Linux use."""
    return (_letters(n // 26 - 1) if n >= 26 else "") + chr(ord("a") + n % 26)


def by_id(bus: DiskBus, serial: str) -> str:
    """The guest's udev link of a disk with this serial on this bus."""
    return (f"/dev/disk/by-id/virtio-{serial}" if bus == "virtio"
            else f"/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_{serial}")


class _Targets:
    """Guest device names: the root disk first on its bus, then each disk in order."""

    def __init__(self, root_bus: DiskBus) -> None:
        self.next = {"virtio": 0, "scsi": 0}
        self.next[root_bus] = 1

    def take(self, bus: DiskBus) -> str:
        n = self.next[bus]
        self.next[bus] = n + 1
        return ("vd" if bus == "virtio" else "sd") + _letters(n)


def plan_volumes(mounts: Sequence[MountInput], devices: Sequence[DeviceInput],
                 extra: Sequence[ExtraDisk], settings: Settings, vm_dir: Path,
                 root_bus: DiskBus) -> VolumePlan:
    """Checks every mount, device and extra disk; reads the file volumes. Raises
    InvalidArgument naming the first bad one; makes nothing."""
    ndisks = len(devices) + len(extra)
    if ndisks > settings.max_vm_disks:
        raise InvalidArgument(
            f"the pod asks for {ndisks} disks ({len(devices)} block devices, {len(extra)} "
            f"extra disks): more than {settings.max_vm_disks} (setting max-vm-disks)")
    roots = [Path(r) for r in volume_allowed_roots(settings)]
    budget = settings.volume_files_max_kib * 1024
    files: list[GuestFile] = []
    filesystems: list[FilesystemSpec] = []
    boot: list[str] = []
    seen_paths: set[str] = set()

    def claim(what: str, path: str) -> None:
        if path in seen_paths:
            raise _bad(what, f"container_path {shown(path)} is used twice")
        seen_paths.add(path)

    for index, m in enumerate(mounts):
        what = f"mount {index} ({shown(m.container_path, 80)})"
        if m.container_path in KUBELET_FILES:
            continue
        dest = _guest_path(what, m.container_path)
        claim(what, dest)
        resolved = _host_path(what, m.host_path)
        _under_roots(what, resolved, roots)
        kind = host_volumes.kind_of(resolved)
        volume = _volume_kind(m.host_path)
        secret = volume in SECRET_KINDS
        if volume is not None or kind == "file":
            read = (host_volumes.read_volume_files(resolved, what, budget, MAX_VOLUME_FILES)
                    if kind == "dir" else [host_volumes.read_file(resolved, what, budget)])
            for f in read:
                budget -= len(f.data)
                mode = f.mode & (0o700 if secret else 0o777)
                files.append(GuestFile(f"{dest.rstrip('/')}/{f.rel}" if f.rel else dest,
                                       f.data, mode))
        elif kind == "dir":
            tag = f"fs{len(filesystems)}"
            filesystems.append(FilesystemSpec(resolved, tag, m.readonly))
            opts = "-o ro " if m.readonly else ""
            q = shlex.quote(dest)
            boot.append(f"mkdir -p {q} && mount -t virtiofs {opts}{tag} {q}")
        else:
            raise _bad(what, "host_path is not a directory or a regular file")

    disks: list[DiskSpec] = []
    new_disks: list[tuple[Path, int]] = []
    targets = _Targets(root_bus)
    for index, d in enumerate(devices):
        what = f"device {index} ({shown(d.container_path, 80)})"
        dest = _guest_path(what, d.container_path)
        claim(what, dest)
        resolved = _host_path(what, d.host_path)
        if host_volumes.kind_of(resolved) != "block":
            raise _bad(what, "host_path is not a block device")
        serial = f"d-{index}"
        disks.append(DiskSpec(resolved, "block", targets.take(root_bus), root_bus, serial,
                              "none", readonly="w" not in d.permissions))
        q = shlex.quote(dest)
        boot.append(f"mkdir -p \"$(dirname {q})\" && ln -sfn {by_id(root_bus, serial)} {q}")
    max_disk = settings.max_pod_root_volume_gib << 30
    for x in extra:
        what = f"extra disk {x.name!r}"
        if max_disk and x.size_bytes > max_disk:
            raise _bad(what, f"size {x.size_bytes} bytes is over "
                             f"{settings.max_pod_root_volume_gib} GiB "
                             "(setting max-pod-root-volume-gib)")
        path = vm_dir / f"disk-{x.name}.qcow2"
        disks.append(DiskSpec(path, "file", targets.take(x.bus), x.bus, x.serial, x.cache))
        new_disks.append((path, x.size_bytes))
        if x.format:
            claim(what, x.mount_path)
            dev, q = by_id(x.bus, x.serial), shlex.quote(x.mount_path)
            boot.append(f"{{ blkid -p {dev} >/dev/null 2>&1; [ $? != 2 ] || "
                        f"mkfs.ext4 -q -L {x.name} {dev}; }} && mkdir -p {q} && "
                        f"mount {dev} {q}")
    return VolumePlan(tuple(files), tuple(disks), tuple(new_disks), tuple(filesystems),
                      tuple(boot))
