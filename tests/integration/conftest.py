"""Integration-tier hygiene: a test that fails half-way must not leave VMs behind for the
next one (or for CI's next run). Each test's new domains of ours are removed after it; the
tests themselves assert that the runtime removed them, this only cleans up after a failure."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

VIRSH = ["virsh", "-c", "qemu:///system"]


def _our_domains() -> set[str]:
    r = subprocess.run([*VIRSH, "list", "--all", "--name"], capture_output=True, text=True)
    return {n for n in r.stdout.split() if n.startswith("avr-")} if r.returncode == 0 else set()


@pytest.fixture(autouse=True)
def remove_leftover_domains() -> Iterator[None]:
    before = _our_domains()
    yield
    for name in _our_domains() - before:
        subprocess.run([*VIRSH, "destroy", name], capture_output=True)
        subprocess.run([*VIRSH, "undefine", "--nvram", name], capture_output=True)
