"""Issue 9 items 2 and 8 through the daemon's socket, on a real libvirtd (QEMU under TCG)
with the real bridge + host-local CNI plugins: a 2 MiB pod name is INVALID_ARGUMENT and
leaves nothing (no namespace, network record or directory, sandbox record, CNI call) and
the node works after a restart; quotas (a full node is RESOURCE_EXHAUSTED and parallel
RunPodSandbox calls admit exactly max-pods; a VM over a per-pod limit is INVALID_ARGUMENT
naming the setting, before anything is made); CreateContainer and StopPodSandbox
overlapping RemovePodSandbox leave nothing behind, also after a restart."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.daemon_proc import APIS, Daemon
from tests.integration.test_network_common import CniTestNet
from tests.integration.vmpods import (
    container_config,
    domain_names,
    own_netns_names,
    sandbox_config,
    vm_runtime,
)

pytestmark = pytest.mark.integration
pb = APIS["v1alpha2"][0]


def _ids(d: Daemon, table: str) -> list[str]:
    db = sqlite3.connect(f"file:{d.state_dir}/state.db?mode=ro", uri=True)
    try:
        return [r[0] for r in db.execute(f"SELECT id FROM {table}")]
    finally:
        db.close()


def _has_netns(uid: str) -> bool:
    return f"avr-{uid}" in own_netns_names()


def _code(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def _nothing_of(d: Daemon, uid: str) -> None:
    assert not _has_netns(uid), "no pod namespace"
    assert not (Path(d.state_dir) / "networks" / uid).exists(), "no network directory"
    assert uid not in _ids(d, "sandboxes") and uid not in _ids(d, "networks")


def test_a_2_mib_pod_name_is_refused_and_leaves_nothing(short_tmp: Path,
                                                        cni_net: CniTestNet) -> None:
    d = vm_runtime(short_tmp, cni_net).start()
    try:
        for api in ("v1alpha2", "v1"):
            api_pb = APIS[api][0]
            cfg = sandbox_config(api_pb, short_tmp / "pods")
            cfg.metadata.name = "a" * (2 << 20)
            code, details = _code(lambda: d.runtime(api).RunPodSandbox(  # noqa: B023
                api_pb.RunPodSandboxRequest(config=cfg), timeout=30))  # noqa: B023
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details[:300])
            assert "config.metadata.name" in details and "253" in details
            assert len(details) < 1024, "the name is not echoed"
            _nothing_of(d, cfg.metadata.uid)
            assert not d.runtime(api).ListPodSandbox(api_pb.ListPodSandboxRequest(),
                                                    timeout=10).items
        assert cni_net.calls() == [], "no CNI plugin ran"
        assert max(map(len, d.output().splitlines()), default=0) < 4096, "no 2 MiB log line"
    finally:
        d.stop()
    # The node still works after a restart: reconcile finishes, a pod runs and goes.
    d = vm_runtime(short_tmp, cni_net).start()
    try:
        rt = d.runtime("v1alpha2")
        cfg = sandbox_config(pb, short_tmp / "pods")
        sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=60).pod_sandbox_id
        assert _has_netns(sid)
        rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=60)
        rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60)
        _nothing_of(d, sid)
    finally:
        d.stop()


def test_a_full_node_admits_exactly_max_pods(short_tmp: Path, cni_net: CniTestNet) -> None:
    d = vm_runtime(short_tmp, cni_net, "--max-pods", "2").start()
    try:
        rt = d.runtime("v1alpha2")
        info = rt.Status(pb.StatusRequest(verbose=True), timeout=10).info
        assert json.loads(info["config"])["max_pods"] == 2, "Status shows the setting"
        cfgs = [sandbox_config(pb, short_tmp / "pods") for _ in range(6)]

        def run(cfg: Any) -> tuple[grpc.StatusCode, str]:
            return _code(lambda: rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg),
                                                  timeout=120))

        with ThreadPoolExecutor(len(cfgs)) as ex:
            results = list(ex.map(run, cfgs))
        admitted = [c.metadata.uid for c, r in zip(cfgs, results, strict=True)
                    if r[0] == grpc.StatusCode.OK]
        refused = [(c.metadata.uid, r) for c, r in zip(cfgs, results, strict=True)
                   if r[0] != grpc.StatusCode.OK]
        assert len(admitted) == 2, results
        for uid, (code, details) in refused:
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max-pods" in details
            _nothing_of(d, uid)
        assert len([c for c in cni_net.calls() if c["CNI_COMMAND"] == "ADD"]) == 2
        assert sorted(_ids(d, "sandboxes")) == sorted(admitted)
        rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=admitted[0]),
                            timeout=60)
        last = sandbox_config(pb, short_tmp / "pods")
        rt.RunPodSandbox(pb.RunPodSandboxRequest(config=last), timeout=60)
        for sid in (admitted[1], last.metadata.uid):
            rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60)
    finally:
        d.stop()


def test_a_vm_over_a_per_pod_quota_is_refused_before_anything_is_made(
        short_tmp: Path, cni_net: CniTestNet, served_minimal_image: str) -> None:
    d = vm_runtime(short_tmp, cni_net, "--max-pod-memory-mib", "512",
                   "--max-pod-root-volume-gib", "4").start()
    try:
        rt = d.runtime("v1alpha2")
        d.images("v1alpha2").PullImage(pb.PullImageRequest(
            image=pb.ImageSpec(image=served_minimal_image)), timeout=60)
        big = sandbox_config(pb, short_tmp / "pods",
                             annotations={"VirtletRootVolumeSize": "1Pi"})
        code, details = _code(lambda: rt.RunPodSandbox(pb.RunPodSandboxRequest(config=big),
                                                       timeout=60))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "VirtletRootVolumeSize" in details and "max-pod-root-volume-gib" in details
        _nothing_of(d, big.metadata.uid)

        cfg = sandbox_config(pb, short_tmp / "pods")
        sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=60).pod_sandbox_id
        for memory_mib in (1 << 20, 513):  # 1 TiB, and one MiB over
            code, details = _code(lambda: rt.CreateContainer(pb.CreateContainerRequest(
                pod_sandbox_id=sid, sandbox_config=cfg,
                config=container_config(pb, served_minimal_image,
                                        memory_mib=memory_mib)),  # noqa: B023
                timeout=60))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, details
            assert "max-pod-memory-mib" in details and "512 MiB" in details
            assert _ids(d, "containers") == []
            vms = Path(d.state_dir) / "vms"
            assert not vms.exists() or not any(vms.iterdir()), "no VM directory, no overlay"
        cid = rt.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=sid, sandbox_config=cfg,
            config=container_config(pb, served_minimal_image, memory_mib=512)),
            timeout=60).container_id
        assert f"avr-{cid}" in domain_names()
        rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60)
        assert f"avr-{cid}" not in domain_names()
    finally:
        d.stop()


def test_create_and_stop_overlapping_remove_leave_nothing_after_a_restart(
        short_tmp: Path, cni_net: CniTestNet, served_minimal_image: str) -> None:
    """CreateContainer sent together with RemovePodSandbox (either may come first), and a
    running VM's StopPodSandbox together with RemovePodSandbox; then a restart. Nothing of
    these pods may be left: no record (a sandbox written back would show up again in
    ListPodSandbox), domain, VM directory or namespace."""
    d = vm_runtime(short_tmp, cni_net).start()
    rt = d.runtime("v1alpha2")
    sids: list[str] = []
    try:
        d.images("v1alpha2").PullImage(pb.PullImageRequest(
            image=pb.ImageSpec(image=served_minimal_image)), timeout=60)
        with ThreadPoolExecutor(2) as ex:
            for _ in range(4):
                cfg = sandbox_config(pb, short_tmp / "pods")
                sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg),
                                       timeout=60).pod_sandbox_id
                sids.append(sid)
                create = ex.submit(_code, lambda cfg=cfg, sid=sid: rt.CreateContainer(
                    pb.CreateContainerRequest(pod_sandbox_id=sid, sandbox_config=cfg,
                                              config=container_config(pb,
                                                                      served_minimal_image)),
                    timeout=60))
                remove = ex.submit(_code, lambda sid=sid: rt.RemovePodSandbox(
                    pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60))
                assert remove.result()[0] == grpc.StatusCode.OK, remove.result()
                assert create.result()[0] in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND,
                                              grpc.StatusCode.FAILED_PRECONDITION)
            for _ in range(2):
                cfg = sandbox_config(pb, short_tmp / "pods")
                sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg),
                                       timeout=60).pod_sandbox_id
                sids.append(sid)
                cid = rt.CreateContainer(pb.CreateContainerRequest(
                    pod_sandbox_id=sid, sandbox_config=cfg,
                    config=container_config(pb, served_minimal_image)), timeout=60).container_id
                rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=60)
                stop = ex.submit(_code, lambda sid=sid: rt.StopPodSandbox(
                    pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=90))
                remove = ex.submit(_code, lambda sid=sid: rt.RemovePodSandbox(
                    pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=90))
                assert stop.result()[0] == grpc.StatusCode.OK, stop.result()
                assert remove.result()[0] == grpc.StatusCode.OK, remove.result()
    finally:
        d.stop()
    d = vm_runtime(short_tmp, cni_net).start()
    try:
        rt = d.runtime("v1alpha2")
        assert not rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=10).items
        assert not rt.ListContainers(pb.ListContainersRequest(), timeout=10).containers
        assert _ids(d, "sandboxes") == [] and _ids(d, "containers") == []
        vms = Path(d.state_dir) / "vms"
        assert not vms.exists() or not os.listdir(vms)
        assert not [n for n in domain_names() for s in sids if s in n]
        assert not [s for s in sids if _has_netns(s)]
    finally:
        d.stop()
