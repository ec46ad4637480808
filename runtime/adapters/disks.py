"""Files a VM runs on: its qcow2 overlay over a stored image."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ..errors import Internal, ResourceExhausted

QEMU_IMG = "qemu-img"


def _qemu_img(*args: str) -> str:
    try:
        r = subprocess.run([QEMU_IMG, *args], capture_output=True, text=True, timeout=120,
                           check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Internal(f"qemu-img {args[0]} failed: {e}") from e
    if r.returncode != 0:
        msg = r.stderr.strip() or r.stdout.strip()
        if "No space left" in msg:
            raise ResourceExhausted(f"no space for a VM disk: {msg}")
        raise Internal(f"qemu-img {args[0]} failed: {msg}")
    return r.stdout


def create_overlay(base: Path, base_format: str, dest: Path, size_bytes: int) -> None:
    """A qcow2 at dest backed by base, at least size_bytes large; written atomically."""
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.unlink(missing_ok=True)
    _qemu_img("create", "-q", "-f", "qcow2", "-F", base_format, "-b", str(base), str(tmp),
              str(size_bytes))
    tmp.rename(dest)
