"""Volumes: which mount becomes what (seed files, virtiofs shares, disks), the checks on
host and guest paths, the limits, and what the seed says for them."""

from __future__ import annotations

import base64
import dataclasses
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from arktos_vm_runtime.config import Settings, build
from arktos_vm_runtime.errors import InvalidArgument
from arktos_vm_runtime.service.extra_disks import parse_extra_disks
from arktos_vm_runtime.service.seed import render_seed
from arktos_vm_runtime.service.vmconfig import VMConfig, parse_vm_config
from arktos_vm_runtime.service.volumes import (
    DeviceInput,
    MountInput,
    VolumePlan,
    plan_volumes,
)

TEMPLATES = [Path(__file__).resolve().parents[2] / "templates"]


def kubelet_volume(pods: Path, kind: str, name: str, files: dict[str, tuple[bytes, int]]) -> Path:
    """A volume directory laid out as the kubelet's atomic writer does."""
    vol = pods / "uid-1" / "volumes" / f"kubernetes.io~{kind}" / name
    stamp = vol / "..2026_12_01_10_00_00.123"
    for rel, (data, mode) in files.items():
        f = stamp / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data)
        os.chmod(f, mode)
    os.symlink(stamp.name, vol / "..data")
    for top in {rel.split("/")[0] for rel in files}:
        os.symlink(f"..data/{top}", vol / top)
    return vol


@pytest.fixture
def pods(tmp_path: Path) -> Path:
    p = tmp_path / "pods"
    p.mkdir()
    return p


@pytest.fixture
def settings(pods: Path) -> Settings:
    return Settings(volume_allowed_roots=str(pods))


def plan(settings: Settings, mounts: list[MountInput], devices: list[DeviceInput] | None = None,
         extra: str = "", tmp: Path = Path("/var/lib/avr/vm")) -> VolumePlan:
    return plan_volumes(mounts, devices or [], parse_extra_disks(extra) if extra else (),
                        settings, tmp, "virtio")


def test_configmap_and_secret_files_with_modes(pods: Path, settings: Settings) -> None:
    cm = kubelet_volume(pods, "configmap", "cfg", {"app.conf": (b"a=1\n", 0o644),
                                                   "sub/x.bin": (b"\x00\xff", 0o755)})
    sec = kubelet_volume(pods, "secret", "tok", {"token": (b"s3cret", 0o644)})
    p = plan(settings, [MountInput("/etc/app", str(cm), True),
                        MountInput("/var/run/secrets/tok", str(sec), True)])
    got = {f.path: (f.data, f.mode) for f in p.files}
    assert got == {"/etc/app/app.conf": (b"a=1\n", 0o644),
                   "/etc/app/sub/x.bin": (b"\x00\xff", 0o755),
                   # a Secret is never readable by others in the guest
                   "/var/run/secrets/tok/token": (b"s3cret", 0o600)}
    assert not p.disks and not p.filesystems and not p.boot_lines


def test_symlink_out_of_the_volume_refused(pods: Path, settings: Settings,
                                           tmp_path: Path) -> None:
    cm = kubelet_volume(pods, "configmap", "cfg", {"ok": (b"1", 0o644)})
    (tmp_path / "host-secret").write_text("root's")
    os.symlink(tmp_path / "host-secret", cm / "evil")
    with pytest.raises(InvalidArgument, match="'evil' leads outside the volume"):
        plan(settings, [MountInput("/etc/app", str(cm))])


def test_size_limit(pods: Path, settings: Settings) -> None:
    small = dataclasses.replace(settings, volume_files_max_kib=1)
    cm = kubelet_volume(pods, "configmap", "big", {"blob": (b"x" * 1025, 0o644)})
    with pytest.raises(InvalidArgument, match=r"larger than 1024 bytes.*volume-files-max-kib"):
        plan(small, [MountInput("/etc/big", str(cm))])
    # the limit is over all of the pod's file volumes together
    a = kubelet_volume(pods, "configmap", "a", {"f": (b"x" * 600, 0o644)})
    b = kubelet_volume(pods, "configmap", "b", {"f": (b"x" * 600, 0o644)})
    with pytest.raises(InvalidArgument, match="volume-files-max-kib"):
        plan(small, [MountInput("/etc/a", str(a)), MountInput("/etc/b", str(b))])
    assert len(plan(small, [MountInput("/etc/a", str(a))]).files) == 1


def test_empty_dir_and_host_path_are_virtiofs_shares(pods: Path, settings: Settings) -> None:
    ed = pods / "uid-1" / "volumes" / "kubernetes.io~empty-dir" / "scratch"
    hp = pods / "host data"
    ed.mkdir(parents=True)
    hp.mkdir()
    p = plan(settings, [MountInput("/scratch", str(ed)),
                        MountInput("/data dir/$(reboot)", str(hp), readonly=True)])
    assert [(f.source, f.tag, f.readonly) for f in p.filesystems] == [
        (ed, "fs0", False), (hp, "fs1", True)]
    script = p.boot_script
    assert "mount -t virtiofs fs0 /scratch" in script
    assert "mount -t virtiofs -o ro fs1 '/data dir/$(reboot)'" in script
    subprocess.run(["sh", "-n", "-c", script], check=True)  # valid sh


@pytest.mark.parametrize("where", ["/", "/etc", "outside"])
def test_host_path_outside_the_allowed_roots(pods: Path, settings: Settings, tmp_path: Path,
                                             where: str) -> None:
    target = tmp_path / "outside" if where == "outside" else Path(where)
    target.mkdir(exist_ok=True)
    with pytest.raises(InvalidArgument, match="outside the allowed roots"):
        plan(settings, [MountInput("/data", str(target))])
    # nor through a symlink below the root
    link = pods / f"link-{where.strip('/') or 'root'}"
    os.symlink(target, link)
    with pytest.raises(InvalidArgument, match="outside the allowed roots"):
        plan(settings, [MountInput("/data", str(link))])


def test_root_slash_is_never_an_allowed_root() -> None:
    with pytest.raises(InvalidArgument, match="volume-allowed-roots"):
        build(None, {"volume_allowed_roots": "/var/lib/kubelet/pods,/"})


@pytest.mark.parametrize(("container_path", "problem"), [
    ("relative", "absolute"), ("/a/../etc", "'..'"), ("/proc", "system directory"),
    ("/", "system directory"), ("/a\nb", "control"), ("", "empty")])
def test_bad_container_paths(pods: Path, settings: Settings, container_path: str,
                             problem: str) -> None:
    d = pods / "d"
    d.mkdir()
    with pytest.raises(InvalidArgument, match=problem):
        plan(settings, [MountInput(container_path, str(d))])


def test_missing_host_path(pods: Path, settings: Settings) -> None:
    with pytest.raises(InvalidArgument, match="does not exist"):
        plan(settings, [MountInput("/data", str(pods / "nope"))])


def test_kubelet_files_left_out(pods: Path, settings: Settings) -> None:
    hosts = pods / "etc-hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    p = plan(settings, [MountInput("/etc/hosts", str(hosts)),
                        MountInput("/dev/termination-log", "/nonexistent")])
    assert p == VolumePlan()


def test_single_file_mount(pods: Path, settings: Settings) -> None:
    f = pods / "subpath-file"
    f.write_bytes(b"one")
    os.chmod(f, 0o600)
    p = plan(settings, [MountInput("/opt/app/one.txt", str(f))])
    assert [(g.path, g.data, g.mode) for g in p.files] == [("/opt/app/one.txt", b"one", 0o600)]


def test_device_must_be_a_block_device(settings: Settings, pods: Path) -> None:
    f = pods / "disk.img"
    f.write_bytes(b"\0" * 4096)
    for path in ("/dev/null", str(f)):
        with pytest.raises(InvalidArgument, match="not a block device"):
            plan(settings, [], [DeviceInput("/dev/xvdb", path)])


def test_disk_limit(settings: Settings) -> None:
    few = dataclasses.replace(settings, max_vm_disks=2)
    extra = ('[{"name": "a", "size": "1Gi"}, {"name": "b", "size": "1Gi"},'
             ' {"name": "c", "size": "1Gi"}]')
    with pytest.raises(InvalidArgument, match=r"3 disks.*more than 2.*max-vm-disks"):
        plan(few, [], extra=extra)


def test_extra_disks(settings: Settings) -> None:
    p = plan(settings, [], extra='[{"name": "data", "size": "1Gi", "format": "ext4", '
                                 '"mountPath": "/data"}, {"name": "raw", "size": "64Mi", '
                                 '"bus": "scsi", "cache": "none"}]')
    assert [(d.target, d.bus, d.serial, d.cache, d.kind) for d in p.disks] == [
        ("vdb", "virtio", "x-data", "writeback", "file"), ("sda", "scsi", "x-raw", "none", "file")]
    assert p.new_disks == ((Path("/var/lib/avr/vm/disk-data.qcow2"), 1 << 30),
                           (Path("/var/lib/avr/vm/disk-raw.qcow2"), 64 << 20))
    script = p.boot_script
    assert "mkfs.ext4 -q -L data /dev/disk/by-id/virtio-x-data" in script
    assert "mount /dev/disk/by-id/virtio-x-data /data" in script
    assert "x-raw" not in script  # a blank disk is left alone
    subprocess.run(["sh", "-n", "-c", script], check=True)


@pytest.mark.parametrize(("text", "problem"), [
    ("{", "JSON"), ("{}", "list"), ('[{"name": "A", "size": "1Gi"}]', "name"),
    ('[{"name": "a"}]', "size"), ('[{"name": "a", "size": "1"}]', "at least 1Mi"),
    ('[{"name": "a", "size": "1Gi", "bus": "ide"}]', "bus"),
    ('[{"name": "a", "size": "1Gi", "format": "ext4"}]', "needs a mountPath"),
    ('[{"name": "a", "size": "1Gi", "format": "ext4", "mountPath": "/proc"}]', "system"),
    ('[{"name": "a", "size": "1Gi", "x": 1}]', "unknown key"),
    ('[{"name": "a", "size": "1Gi"}, {"name": "a", "size": "1Gi"}]', "share a name")])
def test_extra_disks_bad(text: str, problem: str) -> None:
    with pytest.raises(InvalidArgument, match=f"VirtletExtraDisks.*{problem}"):
        parse_vm_config({"VirtletExtraDisks": text})


def _user_data(vm: VMConfig, p: VolumePlan) -> dict[str, object]:
    seed = render_seed(vm, instance_id="i", hostname="h", env=[], network=None,
                       template_dirs=TEMPLATES, volumes=p)
    assert seed.user_data.startswith("#cloud-config\n")
    data = yaml.safe_load(seed.user_data)
    assert isinstance(data, dict)
    return data


def test_seed_carries_files_and_mounts(pods: Path, settings: Settings) -> None:
    cm = kubelet_volume(pods, "configmap", "cfg", {"k": (b"v: 1\n", 0o640)})
    ed = pods / "ed"
    ed.mkdir()
    p = plan(settings, [MountInput("/etc/cfg", str(cm)), MountInput("/scratch", str(ed))])
    # the pod's own write_files and bootcmd are kept; ours follow them
    vm = VMConfig(user_data={"write_files": [{"path": "/mine", "content": "x"}],
                             "bootcmd": ["echo mine"]})
    data = _user_data(vm, p)
    files = data["write_files"]
    assert isinstance(files, list)
    assert files[0] == {"path": "/mine", "content": "x"}
    ours = files[-1]
    assert ours == {"path": "/etc/cfg/k", "encoding": "b64",
                    "content": base64.b64encode(b"v: 1\n").decode(), "owner": "root:root",
                    "permissions": "0640"}
    assert data["bootcmd"] == ["echo mine", p.boot_script]
    # without volumes the seed is what it was
    plain = _user_data(VMConfig(), VolumePlan())
    assert "bootcmd" not in plain


def test_secret_not_in_a_user_data_script_seed(pods: Path, settings: Settings,
                                               caplog: pytest.LogCaptureFixture) -> None:
    sec = kubelet_volume(pods, "secret", "s", {"password": (b"hunter2", 0o600)})
    p = plan(settings, [MountInput("/etc/s", str(sec))])
    seed = render_seed(VMConfig(user_data_script="#!/bin/sh\necho hi\n"), instance_id="i",
                       hostname="h", env=[], network=None, template_dirs=TEMPLATES, volumes=p)
    assert seed.user_data == "#!/bin/sh\necho hi\n"
    assert "not carried" in caplog.text
    assert "hunter2" not in caplog.text


def test_a_fifo_or_a_directory_link_out_is_refused(pods: Path, settings: Settings,
                                                  tmp_path: Path) -> None:
    cm = kubelet_volume(pods, "configmap", "odd", {"ok": (b"1", 0o644)})
    os.mkfifo(cm / "..data" / "pipe")
    os.symlink("..data/pipe", cm / "pipe")
    with pytest.raises(InvalidArgument, match="'pipe' is not a regular file"):
        plan(settings, [MountInput("/etc/odd", str(cm))])  # and never blocks on the FIFO
    (cm / "pipe").unlink()
    outside = tmp_path / "outside-dir"
    outside.mkdir()
    (outside / "f").write_text("x")
    os.symlink(outside, cm / "..data" / "dir")
    os.symlink("..data/dir", cm / "dir")
    with pytest.raises(InvalidArgument, match="'dir' leads outside the volume"):
        plan(settings, [MountInput("/etc/odd", str(cm))])


def test_two_mounts_at_one_path(pods: Path, settings: Settings) -> None:
    (pods / "a").mkdir()
    (pods / "b").mkdir()
    with pytest.raises(InvalidArgument, match="used twice"):
        plan(settings, [MountInput("/data", str(pods / "a")), MountInput("/data", str(pods / "b"))])


def test_extra_disk_size_quota(settings: Settings) -> None:
    small = dataclasses.replace(settings, max_pod_root_volume_gib=1)
    assert plan(small, [], extra='[{"name": "a", "size": "1Gi"}]').new_disks
    with pytest.raises(InvalidArgument, match="max-pod-root-volume-gib"):
        plan(small, [], extra='[{"name": "a", "size": "2Gi"}]')
