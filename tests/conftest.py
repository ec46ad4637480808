from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_proc import Daemon


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short private directory: unix socket paths must stay under 108 bytes."""
    d = Path(tempfile.mkdtemp(prefix="avr-", dir="/tmp"))
    d.chmod(0o711)  # QEMU (libvirt-qemu) must traverse it to reach VM disks
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemon(short_tmp: Path) -> Iterator[Daemon]:
    d = Daemon(short_tmp).start()
    yield d
    d.stop()
