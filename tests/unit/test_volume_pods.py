"""Volumes through the real Pods on test:///default (the fixtures of test_pods): what
CreateContainer makes for them (domain devices, extra qcow2s, the seed), that a refused
volume leaves nothing, and that everything goes with the pod."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import libvirt
import pytest

from arktos_vm_runtime.errors import InvalidArgument
from arktos_vm_runtime.service.volumes import DeviceInput, MountInput
from tests.unit.test_pods import URI, Env, base_image, container_input, env, sandbox

__all__ = ["base_image", "env"]  # fixtures


def test_volumes_reach_the_domain_and_go_with_the_pod(env: Env, tmp_path: Path) -> None:
    kubelet = tmp_path / "kubelet"
    share = kubelet / "pod" / "volumes" / "kubernetes.io~empty-dir" / "scratch"
    share.mkdir(parents=True)
    pods = env.pods(volume_allowed_roots=str(kubelet))
    sb = sandbox(annotations={"VirtletExtraDisks": json.dumps(
        [{"name": "data", "size": "32Mi", "format": "ext4", "mountPath": "/data"}])})
    pods.run_sandbox(sb)
    cid = pods.create_container(sb.id, container_input(
        mounts=[MountInput("/scratch", str(share))]))
    vm_dir = Path(pods.container(cid).vm_dir)
    assert {p.name for p in vm_dir.iterdir()} == {"root.qcow2", "seed.iso", "disk-data.qcow2"}
    info = subprocess.run(["qemu-img", "info", "--output=json", str(vm_dir / "disk-data.qcow2")],
                          capture_output=True, text=True, check=True).stdout
    assert json.loads(info)["virtual-size"] == 32 << 20
    xml = libvirt.open(URI).lookupByUUIDString(cid).XMLDesc(0)
    assert "<serial>x-data</serial>" in xml and f"<source dir='{share}'/>" in xml
    assert "<access mode='shared'/>" in xml
    assert (vm_dir / "seed.iso").stat().st_mode & 0o077 == 0
    pods.remove_sandbox(sb.id)
    assert not vm_dir.exists() and share.is_dir()


def test_a_refused_volume_leaves_nothing(env: Env, tmp_path: Path) -> None:
    pods = env.pods(volume_allowed_roots=str(tmp_path / "kubelet"), max_vm_disks=1)
    sb = sandbox(annotations={"VirtletExtraDisks": json.dumps(
        [{"name": "a", "size": "32Mi"}])})
    pods.run_sandbox(sb)
    for bad, match in ((dict(mounts=[MountInput("/data", "/etc")]), "allowed roots"),
                       (dict(devices=[DeviceInput("/dev/xvdb", "/dev/null")]),
                        "not a block device|2 disks")):
        with pytest.raises(InvalidArgument, match=match):
            pods.create_container(sb.id, container_input(**bad))
        assert pods.containers() == [] and env.store.all("containers") == []
        assert not any((env.root / "vms").iterdir())
