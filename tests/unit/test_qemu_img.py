"""The qemu-img wrapper on real image files: what a file is, and overlays."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from arktos_vm_runtime.adapters import qemu_img
from arktos_vm_runtime.errors import Internal, InvalidArgument


def _create(path: Path, fmt: str, *args: str) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), *args], check=True)
    return path


def test_info_of_usable_images(tmp_path: Path) -> None:
    assert qemu_img.info(_create(tmp_path / "a.qcow2", "qcow2", "1M"), "a") == \
        qemu_img.ImageInfo("qcow2", 1 << 20)
    raw = tmp_path / "d.raw"
    raw.write_bytes(b"\0" * 65536)
    assert qemu_img.info(raw, "d") == qemu_img.ImageInfo("raw", 65536)


@pytest.mark.parametrize(("make", "text"), [
    ("vmdk", "format 'vmdk'"),
    ("backed", "backing file"),
    ("odd-raw", "a raw disk is a non-zero multiple of 512 bytes"),
    ("empty", "not a disk image"),
    ("missing", "not a disk image"),
])
def test_info_refuses(tmp_path: Path, make: str, text: str) -> None:
    path = tmp_path / "f"
    if make == "vmdk":
        _create(path, "vmdk", "1M")
    elif make == "backed":
        base = _create(tmp_path / "base.qcow2", "qcow2", "1M")
        _create(path, "qcow2", "-b", str(base), "-F", "qcow2")
    elif make == "odd-raw":
        path.write_bytes(b"\1" * 1000)
    elif make == "empty":
        path.write_bytes(b"")
    with pytest.raises(InvalidArgument) as exc:
        qemu_img.info(path, "img")
    assert exc.value.message.startswith("image img is not a disk image")
    assert text in exc.value.message


def test_create_overlay(tmp_path: Path) -> None:
    base = _create(tmp_path / "base.qcow2", "qcow2", "1M")
    dest = tmp_path / "root.qcow2"
    qemu_img.create_overlay(base, "qcow2", dest, 4 << 20)
    assert not (tmp_path / "root.qcow2.tmp").exists()
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(dest)],
                                     check=True, capture_output=True).stdout)
    assert info["virtual-size"] == 4 << 20 and info["backing-filename"] == str(base)
    assert info["backing-filename-format"] == "qcow2"
    with pytest.raises(InvalidArgument, match="backing file"):
        qemu_img.info(dest, "overlay")  # an overlay is never taken for an image


def test_create_overlay_failure_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "root.qcow2"
    with pytest.raises(Internal, match="qemu-img create failed"):
        qemu_img.create_overlay(tmp_path / "missing.qcow2", "qcow2", dest, 1 << 20)
    assert list(tmp_path.iterdir()) == []
