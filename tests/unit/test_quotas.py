"""Quotas (issue 9 item 8: a 1 PiB root volume and 1 TiB of memory were accepted, and a
node took any number of pods): the settings, their defaults, and the real Pods refusing
what is over them before anything is made. Pods, store, designer and libvirt adapter are
real (test:///default); network and images are test_pods' fakes at their interfaces."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from arktos_vm_runtime.config import Settings, build
from arktos_vm_runtime.errors import InvalidArgument, ResourceExhausted
from arktos_vm_runtime.service.quotas import Quotas, host_cpus, host_memory_mib
from arktos_vm_runtime.service.records import SANDBOX_NOTREADY
from tests.unit import test_pods
from tests.unit.test_pods import Env, container_input, sandbox

# test_pods' fixtures, shared
base_image = test_pods.base_image
env = test_pods.env

GIB = 1 << 30


def test_defaults_are_the_kubelets_and_the_hosts() -> None:
    s = Settings()
    assert (s.max_pods, s.max_pod_vcpus, s.max_pod_memory_mib, s.max_pod_root_volume_gib) \
        == (110, 0, 0, 256)
    q = Quotas.from_settings(s)
    assert q.max_vcpus == os.cpu_count() == host_cpus()
    assert q.max_memory_mib == host_memory_mib() > 0
    assert q.max_root_bytes == 256 * GIB and q.max_pods == 110
    q = Quotas.from_settings(Settings(max_pod_vcpus=8, max_pod_memory_mib=4096,
                                      max_pod_root_volume_gib=0), cpus=2, memory_mib=1024)
    assert (q.max_vcpus, q.max_memory_mib, q.max_root_bytes) == (8, 4096, 0)
    q.check_root(1 << 50, "x")  # 0: no limit of ours (vm_size's 1 PiB cap still holds)


@pytest.mark.parametrize("name", ["max_pods", "max_pod_vcpus", "max_pod_memory_mib",
                                  "max_pod_root_volume_gib"])
def test_settings_are_read_and_checked(name: str, tmp_path: Path) -> None:
    assert getattr(build(None, {name: 7}), name) == 7
    conf = tmp_path / "config.yaml"
    conf.write_text(f"{name.replace('_', '-')}: 9\n")
    assert getattr(build(str(conf), {}), name) == 9
    with pytest.raises(InvalidArgument, match="must not be negative"):
        build(None, {name: -1})


def _nothing_made(env: Env, sandboxes: int = 0) -> None:
    assert env.store.all("containers") == []
    assert len(env.store.all("sandboxes")) == sandboxes
    vms = env.root / "vms"
    assert not vms.exists() or not any(vms.iterdir()), "no VM directory or overlay"


QUOTAS = dict(max_pod_vcpus=2, max_pod_memory_mib=512, max_pod_root_volume_gib=4)


@pytest.mark.parametrize("annotations, setting", [
    ({"VirtletVCPUCount": "3"}, "max-pod-vcpus"),
    ({"VirtletRootVolumeSize": "1Pi"}, "max-pod-root-volume-gib"),
    ({"VirtletRootVolumeSize": "4097Mi"}, "max-pod-root-volume-gib"),
])
def test_a_pod_over_a_size_quota_gets_no_network(env: Env, annotations: dict[str, str],
                                                 setting: str) -> None:
    pods = env.pods(**QUOTAS)
    with pytest.raises(InvalidArgument, match=setting) as e:
        pods.run_sandbox(sandbox(annotations=annotations))
    assert next(iter(annotations)) in e.value.message, "names what asked"
    assert not [c for c in env.networks.calls if c[0] == "setup"], "refused before the network"
    _nothing_made(env)


@pytest.mark.parametrize("change, setting, source", [
    (dict(memory_limit_in_bytes=1 << 40), "max-pod-memory-mib", "memory limit"),
    (dict(memory_limit_in_bytes=513 << 20), "max-pod-memory-mib", "memory limit"),
    (dict(memory_limit_in_bytes=0), "max-pod-memory-mib", "default-memory-mib = 1024"),
    (dict(cpu_quota=300000, cpu_period=100000), "max-pod-vcpus", "CPU limit"),
    (dict(sandbox_annotations={"VirtletVCPUCount": "64"}), "max-pod-vcpus",
     "VirtletVCPUCount"),
    (dict(sandbox_annotations={"VirtletRootVolumeSize": "1Pi"}), "max-pod-root-volume-gib",
     "VirtletRootVolumeSize"),
])
def test_a_vm_over_a_size_quota_is_refused_before_anything_is_made(
        env: Env, change: dict[str, Any], setting: str, source: str) -> None:
    pods = env.pods(default_memory_mib=1024, **QUOTAS)
    sb = sandbox()
    pods.run_sandbox(sb)
    with pytest.raises(InvalidArgument, match=setting) as e:
        pods.create_container(sb.id, container_input(**change))
    assert source in e.value.message
    _nothing_made(env, sandboxes=1)


def test_an_image_larger_than_the_root_quota_is_refused(env: Env) -> None:
    pods = env.pods(**QUOTAS)
    sb = sandbox()
    pods.run_sandbox(sb)
    env.images.image = dataclasses.replace(env.images.image, virtual_size=5 * GIB)
    with pytest.raises(InvalidArgument, match=r"image's virtual size .* 5 GiB"):
        pods.create_container(sb.id, container_input())
    _nothing_made(env, sandboxes=1)


def test_a_vm_at_its_quotas_is_made(env: Env) -> None:
    pods = env.pods(**QUOTAS)
    sb = sandbox(annotations={"VirtletVCPUCount": "2", "VirtletRootVolumeSize": "4Gi"})
    pods.run_sandbox(sb)
    cid = pods.create_container(sb.id, container_input(memory_limit_in_bytes=512 << 20))
    rec = pods.container(cid)
    assert (rec.vcpus, rec.memory_mib) == (2, 512)
    pods.remove_sandbox(sb.id)


def test_a_full_node_is_resource_exhausted_before_anything_is_made(env: Env) -> None:
    pods = env.pods(max_pods=2)
    a, b = sandbox(), sandbox()
    pods.run_sandbox(a)
    pods.run_sandbox(b)
    pods.stop_sandbox(b.id)  # a stopped sandbox still holds its place
    env.networks.calls.clear()
    with pytest.raises(ResourceExhausted, match="max-pods = 2"):
        pods.run_sandbox(sandbox())
    assert ("setup", "") not in [(c[0], "") for c in env.networks.calls]
    assert len(env.store.all("sandboxes")) == 2
    pods.run_sandbox(a)  # a repeated call for a held sandbox is not a new pod
    pods.run_sandbox(b)  # nor the kubelet's next attempt of a stopped one
    assert pods.sandbox(b.id).state != SANDBOX_NOTREADY
    pods.remove_sandbox(b.id)
    c = sandbox()
    assert pods.run_sandbox(c) == c.id, "a removed pod frees its place"
    # A failed RunPodSandbox gives its place back.
    pods.remove_sandbox(c.id)
    env.networks.fail_setup = True
    with pytest.raises(Exception, match="fake"):
        pods.run_sandbox(sandbox())
    env.networks.fail_setup = False
    pods.run_sandbox(sandbox())
    with pytest.raises(ResourceExhausted):
        pods.run_sandbox(sandbox())


def test_parallel_runs_admit_exactly_the_free_places(env: Env) -> None:
    """12 RunPodSandbox at once against max-pods 3: exactly 3 are admitted, the others are
    RESOURCE_EXHAUSTED and leave nothing. The network setup is slowed (at PodNetworks'
    interface) so every call is in flight while the first ones make their networks."""
    pods = env.pods(max_pods=3)
    real_setup = env.networks.setup

    def slow_setup(*args: Any) -> None:
        time.sleep(0.2)
        real_setup(*args)

    env.networks.setup = slow_setup  # type: ignore[method-assign]
    start = threading.Barrier(12)
    results: list[str] = []
    lock = threading.Lock()

    def run() -> None:
        start.wait()
        try:
            pods.run_sandbox(sandbox())
            out = "ok"
        except ResourceExhausted:
            out = "full"
        with lock:
            results.append(out)

    threads = [threading.Thread(target=run) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == ["full"] * 9 + ["ok"] * 3
    assert len(env.store.all("sandboxes")) == 3 == len(pods.sandboxes())
    assert len(env.networks.up) == 3
    for sb in pods.sandboxes():
        pods.remove_sandbox(sb.id)
