"""Paths inside the guest a pod names (a mount's container_path, a device's devicePath,
an extra disk's mountPath): checked before they reach the seed, where they are written
as YAML data and as shell words quoted by shlex.quote."""

from __future__ import annotations

import posixpath

from ..checks import has_control

MAX_GUEST_PATH = 1024
#: where a path in the guest must not go: the guest's own system trees, whose loss (a
#: mount over /proc) would leave a VM that cannot boot or be reached
RESERVED = ("/", "/proc", "/sys", "/dev", "/run", "/boot", "/etc", "/usr", "/bin", "/sbin",
            "/lib", "/lib64", "/var", "/tmp")


def check_guest_path(path: str, *, device: bool = False) -> str | None:
    """Why `path` cannot be used in the guest, or None. A device link may live in /dev."""
    if not isinstance(path, str) or not path:
        return "must not be empty"
    if len(path) > MAX_GUEST_PATH:
        return f"is longer than {MAX_GUEST_PATH} characters"
    if "\0" in path or has_control(path):
        return "contains control characters"
    if not path.startswith("/"):
        return "must be an absolute path"
    if ".." in path.split("/"):
        return "must not contain '..'"
    norm = posixpath.normpath(path)
    if norm in RESERVED and not (device and norm.startswith("/dev/") and norm != "/dev"):
        return f"{norm!r} is a system directory of the guest"
    return None
