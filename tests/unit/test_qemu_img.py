"""The qemu-img wrapper on real image files: what a file is, and overlays."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from arktos_vm_runtime.adapters import proc, qemu_img
from arktos_vm_runtime.errors import Internal, InvalidArgument


def _create(path: Path, fmt: str, *args: str) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), *args], check=True)
    return path


def test_info_of_usable_images(tmp_path: Path) -> None:
    assert qemu_img.info(_create(tmp_path / "a.qcow2", "qcow2", "1M"), "a") == \
        qemu_img.ImageInfo("qcow2", 1 << 20)
    raw = tmp_path / "d.raw"
    raw.write_bytes(b"\0" * (1 << 20))
    assert qemu_img.info(raw, "d") == qemu_img.ImageInfo("raw", 1 << 20)


@pytest.mark.parametrize(("make", "text"), [
    ("vmdk", "format 'vmdk'"),
    ("vdi", "format 'vdi'"),
    ("qcow1", "qcow version 1"),
    ("backed", "backing file"),
    ("data-file", "external data file"),
    ("odd-raw", "a multiple of 512 bytes"),
    ("small-raw", "512 bytes of raw data (a raw disk image is at least 1 MiB"),
    ("fake-qcow2", "not a disk image"),
    ("empty", "0 bytes of raw data"),
    ("missing", "not a disk image"),
])
def test_info_refuses(tmp_path: Path, make: str, text: str) -> None:
    path = tmp_path / "f"
    if make in ("vmdk", "vdi"):
        _create(path, make, "1M")
    elif make == "qcow1":
        _create(path, "qcow", "1M")
    elif make == "backed":
        base = _create(tmp_path / "base.qcow2", "qcow2", "1M")
        _create(path, "qcow2", "-b", str(base), "-F", "qcow2")
    elif make == "data-file":
        _create(path, "qcow2", "-o", f"data_file={tmp_path / 'data'}", "1M")
    elif make == "odd-raw":
        path.write_bytes(b"\1" * ((1 << 20) + 1000))
    elif make == "small-raw":
        path.write_bytes(b"\1" * 512)  # an error page served with 200 OK, say
    elif make == "fake-qcow2":
        path.write_bytes(b"QFI\xfb\0\0\0\3" + b"\xff" * (1 << 20))
    elif make == "empty":
        path.write_bytes(b"")
    with pytest.raises(InvalidArgument) as exc:
        qemu_img.info(path, "img")
    assert exc.value.message.startswith("image img is not a disk image")
    assert text in exc.value.message


def test_a_raw_image_that_looks_like_qcow2_to_probing_is_not_taken_for_one(
        tmp_path: Path) -> None:
    """The format is told by the first bytes and given to qemu-img (-f); a raw image whose
    bytes qemu-img would probe as something else is still read as raw."""
    path = tmp_path / "r"
    with open(path, "wb") as f:
        f.write(b"\0" * 1024)  # e.g. the guest wrote a qcow2 header at sector 2
        f.write(QCOW_HEADER_LIKE)
        f.truncate(2 << 20)
    assert qemu_img.detect_format(path, "r") == "raw"
    assert qemu_img.info(path, "r") == qemu_img.ImageInfo("raw", 2 << 20)


QCOW_HEADER_LIKE = b"QFI\xfb\0\0\0\3"


def test_qemu_img_runs_under_its_limits(tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """With an address space too small for qemu-img to start its threads, info fails: the
    limits reach the process (prlimit), and the failure is a plain refusal."""
    image = _create(tmp_path / "a.qcow2", "qcow2", "1M")
    monkeypatch.setattr(qemu_img, "LIMITS", proc.Limits(cpu_seconds=30,
                                                         address_space=32 << 20))
    with pytest.raises(InvalidArgument) as exc:
        qemu_img.info(image, "a")
    assert "killed by SIG" in exc.value.message and "32 MiB address space" in exc.value.message
    monkeypatch.undo()
    assert qemu_img.info(image, "a").format == "qcow2"


def test_info_names_the_format_and_the_limits(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[tuple[str, ...], object]] = []
    real = proc.run

    def spy(argv: list[str], **kw: object) -> proc.Result:
        seen.append((tuple(argv), kw.get("limits")))
        return real(argv, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(proc, "run", spy)
    qemu_img.info(_create(tmp_path / "a.qcow2", "qcow2", "1M"), "a")
    (argv, limits), = seen
    assert argv[:4] == ("qemu-img", "info", "-f", "qcow2")
    assert limits == proc.Limits(30, 1 << 30)


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
