"""Volumes a pod may not have, through the socket: a hostPath outside the allowed roots, a
device that is not a block device, a ConfigMap over the size limit, more disks than the
limit. Each is INVALID_ARGUMENT naming what is wrong, and leaves no container record, VM
file or domain behind. No guest boots: CreateContainer refuses before the VM exists.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from arktos_vm_runtime.service.designer import ID_NAMESPACE
from tests.daemon_proc import APIS, Daemon
from tests.integration.test_network_common import cni_test_network
from tests.integration.vm_ops_common import code_of, module_tmp
from tests.integration.vmpods import (
    container_config,
    domain_names,
    sandbox_config,
    vm_runtime,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def setup(served_minimal_image: str) -> Iterator[tuple[Daemon, str, Path]]:
    with module_tmp() as tmp, cni_test_network() as net:
        kubelet = tmp / "kubelet"
        kubelet.mkdir()
        d = vm_runtime(tmp, net, "--volume-allowed-roots", str(kubelet),
                       "--volume-files-max-kib", "1", "--max-vm-disks", "1").start()
        try:
            pb, _ = APIS["v1alpha2"]
            d.images("v1alpha2").PullImage(pb.PullImageRequest(
                image=pb.ImageSpec(image=served_minimal_image)), timeout=120)
            yield d, served_minimal_image, kubelet
        finally:
            d.stop()


def _refused(setup: tuple[Daemon, str, Path], annotations: dict[str, str] | None = None,
             mounts: list[Any] | None = None, devices: list[Any] | None = None) -> str:
    d, image, kubelet = setup
    pb, _ = APIS["v1alpha2"]
    rt = d.runtime("v1alpha2")
    cfg = sandbox_config(pb, kubelet.parent / "pods", annotations)
    sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=60).pod_sandbox_id
    try:
        cc = container_config(pb, image)
        cc.mounts.extend(mounts or [])
        cc.devices.extend(devices or [])
        code, details = code_of(lambda: rt.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=sid, sandbox_config=cfg, config=cc), timeout=60))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        # nothing half-made: no container, no VM file, no domain of this pod
        assert not rt.ListContainers(pb.ListContainersRequest(), timeout=10).containers
        assert not list((Path(d.state_dir) / "vms").rglob("*"))
        assert f"avr-{uuid.uuid5(ID_NAMESPACE, sid)}" not in domain_names()
        return details
    finally:
        rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60)


def test_host_path_outside_the_allowed_roots(setup: tuple[Daemon, str, Path]) -> None:
    pb, _ = APIS["v1alpha2"]
    for host in ("/", "/etc", str(setup[2].parent)):
        details = _refused(setup, mounts=[pb.Mount(container_path="/data", host_path=host)])
        assert "outside the allowed roots" in details and "volume-allowed-roots" in details


def test_device_that_is_not_a_block_device(setup: tuple[Daemon, str, Path]) -> None:
    pb, _ = APIS["v1alpha2"]
    img = setup[2] / "disk.img"
    img.write_bytes(b"\0" * 65536)
    for host in (str(img), "/dev/null"):
        details = _refused(setup, devices=[pb.Device(container_path="/dev/xvdb",
                                                     host_path=host, permissions="rw")])
        assert "is not a block device" in details


def test_configmap_over_the_size_limit(setup: tuple[Daemon, str, Path]) -> None:
    pb, _ = APIS["v1alpha2"]
    vol = setup[2] / "uid" / "volumes" / "kubernetes.io~configmap" / "big"
    (vol / "..2026_12_01").mkdir(parents=True)
    (vol / "..2026_12_01" / "blob").write_bytes(b"x" * 2048)
    os.symlink("..2026_12_01", vol / "..data")
    os.symlink("..data/blob", vol / "blob")
    details = _refused(setup, mounts=[pb.Mount(container_path="/etc/big", host_path=str(vol),
                                               readonly=True)])
    assert "larger than 1024 bytes" in details and "volume-files-max-kib" in details


def test_more_disks_than_the_limit(setup: tuple[Daemon, str, Path]) -> None:
    disks = [{"name": "a", "size": "64Mi"}, {"name": "b", "size": "64Mi"}]
    details = _refused(setup, annotations={"VirtletExtraDisks": json.dumps(disks)})
    assert "more than 1 (setting max-vm-disks)" in details
