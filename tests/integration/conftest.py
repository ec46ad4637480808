"""Integration-tier hygiene: a test that fails half-way must not leave VMs behind for the
next one (or for CI's next run). Each test's new domains made by a daemon this test process
started (disks under one of its state directories) are removed after it; another runtime
instance's domains on the same host are never touched. The tests themselves assert that
the runtime removed them, this only cleans up after a failure."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

import pytest

from tests.daemon_proc import STATE_DIRS
from tests.guest.images import minimal_guest
from tests.integration.test_network_common import CniTestNet, cni_test_network
from tests.integration.vmpods import image_server, require_libvirtd

VIRSH = ["virsh", "-c", "qemu:///system"]


def _prefixed_domains() -> set[str]:
    r = subprocess.run([*VIRSH, "list", "--all", "--name"], capture_output=True, text=True)
    return {n for n in r.stdout.split() if n.startswith("avr-")} if r.returncode == 0 else set()


def _made_here(name: str) -> bool:
    """Whether a daemon of this test process defined the domain (its disk is under one of
    their state directories)."""
    r = subprocess.run([*VIRSH, "dumpxml", "--inactive", name], capture_output=True,
                       text=True)
    return r.returncode == 0 and any(f"'{d}/vms/" in r.stdout or f'"{d}/vms/' in r.stdout
                                     for d in STATE_DIRS)


@pytest.fixture(autouse=True)
def remove_leftover_domains() -> Iterator[None]:
    before = _prefixed_domains()
    yield
    for name in _prefixed_domains() - before:
        if not _made_here(name):
            continue
        subprocess.run([*VIRSH, "destroy", name], capture_output=True)
        subprocess.run([*VIRSH, "undefine", "--nvram", "--snapshots-metadata", name],
                       capture_output=True)


@pytest.fixture(scope="module")
def served_minimal_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The minimal guest's disk, served on 127.0.0.1; yields its image name."""
    require_libvirtd()
    root = tmp_path_factory.mktemp("images")
    shutil.copy(minimal_guest().disk, root / "minimal.qcow2")
    with image_server({"minimal.qcow2": root / "minimal.qcow2"}) as host:
        yield f"{host}/minimal.qcow2"


@pytest.fixture
def cni_net() -> Iterator[CniTestNet]:
    with cni_test_network() as net:
        yield net
