"""The seed ISO of one pod VM: the files of a seed laid out on an ISO 9660 image. No policy.

`SeedFiles` holds the texts the service layer rendered (service/seed.py); `write_seed_iso`
lays them out for NoCloud (volume label `cidata`, files at the root) or ConfigDrive (label
`config-2`, files under openstack/latest/) and builds the image with genisoimage into a
temporary file beside the destination, fsyncs it and renames it into place, mode 0600
(user-data may hold secrets); nothing is left behind on failure.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import InvalidArgument
from . import proc
from .fsutil import fsync_dir

NOCLOUD_LABEL = "cidata"
CONFIGDRIVE_LABEL = "config-2"
CONFIGDRIVE_DIR = "openstack/latest"
GENISOIMAGE = "genisoimage"
GENISOIMAGE_TIMEOUT = 60.0

SeedKind = Literal["nocloud", "configdrive"]


@dataclass(frozen=True)
class SeedFiles:
    """The texts of one seed; `write_seed_iso` picks those its kind needs."""

    #: user-data (NoCloud `user-data`, ConfigDrive `openstack/latest/user_data`)
    user_data: str
    #: NoCloud `meta-data` (YAML)
    meta_data: str
    #: NoCloud `network-config` (YAML, version 2), None: let the guest use its default (DHCP)
    network_config: str | None
    #: ConfigDrive `openstack/latest/meta_data.json`
    meta_data_json: str
    #: ConfigDrive `openstack/latest/network_data.json`, None when there is no network info
    network_data_json: str | None


def seed_layout(files: SeedFiles, kind: SeedKind) -> tuple[str, dict[str, str]]:
    """The volume label and {path on the ISO: text} of a seed of `kind`."""
    if kind == "nocloud":
        layout = {"user-data": files.user_data, "meta-data": files.meta_data}
        if files.network_config is not None:
            layout["network-config"] = files.network_config
        return NOCLOUD_LABEL, layout
    if kind == "configdrive":
        layout = {
            f"{CONFIGDRIVE_DIR}/meta_data.json": files.meta_data_json,
            f"{CONFIGDRIVE_DIR}/user_data": files.user_data,
        }
        if files.network_data_json is not None:
            layout[f"{CONFIGDRIVE_DIR}/network_data.json"] = files.network_data_json
        return CONFIGDRIVE_LABEL, layout
    raise InvalidArgument(f"cloud-init image type {kind!r}: nocloud or configdrive")


def write_seed_iso(files: SeedFiles, kind: SeedKind, dest: Path) -> None:
    """Build the seed ISO of `kind` at `dest`, atomically (temp file, fsync, rename).

    libvirt's DAC driver hands the 0600 file to QEMU. genisoimage's errors are proc.run's:
    Unavailable when it is not installed, DeadlineExceeded past its timeout, Internal
    (ProcessFailed) when it fails; the destination is untouched then.
    """
    label, layout = seed_layout(files, kind)
    dest = Path(dest)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.d.") as staging:
            root = Path(staging)
            for rel, text in layout.items():
                path = root / rel
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                # user-data may carry a pod's Secrets: root's alone, whatever the umask
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                with os.fdopen(fd, "wb") as out:
                    out.write(text.encode("utf-8"))
            argv = [
                GENISOIMAGE,
                "-output", str(tmp),
                "-volid", label,
                "-joliet",
                "-rock",
                "-input-charset", "utf-8",
                "-quiet",
                str(root),
            ]  # fmt: skip
            proc.run(argv, timeout=GENISOIMAGE_TIMEOUT, what=f"{GENISOIMAGE} for {dest.name}")
        with open(tmp, "rb+") as f:
            os.fchmod(f.fileno(), 0o600)
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
