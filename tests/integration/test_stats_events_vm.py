"""Stats and events of a real VM pod (libvirtd, QEMU under TCG, the minimal busybox guest,
the test CNI network): the figures move while the guest runs (CPU time, network counters
after a ping), carry the container's real metadata, labels and annotations, answer both
API versions and every filter; the events of the pod's life reach two subscribers in
order, while a third that never reads holds nothing up."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.daemon_proc import APIS, Daemon
from tests.integration.test_network_common import CniTestNet
from tests.integration.vmpods import (
    container_config,
    log_text,
    own_netns_names,
    sandbox_config,
    vm_runtime,
    wait_for,
)

pytestmark = pytest.mark.integration
MARKER = "MINIMAL-GUEST-UP"
BOOT_TIMEOUT = 180


@pytest.fixture
def vm_daemon(short_tmp: Path, cni_net: CniTestNet) -> Iterator[Daemon]:
    before = own_netns_names()
    d = vm_runtime(short_tmp, cni_net).start()
    yield d
    d.stop()
    assert not own_netns_names() - before, "a pod netns leaked"


class Subscriber:
    """A v1 GetContainerEvents stream read in a thread of its own."""

    def __init__(self, d: Daemon) -> None:
        pb, _ = APIS["v1"]
        self.stream = d.runtime("v1").GetContainerEvents(pb.GetEventsRequest())
        self.events: list[tuple[str, str]] = []
        self.raw: list[Any] = []
        self.error: grpc.RpcError | None = None
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        pb, _ = APIS["v1"]
        try:
            for ev in self.stream:
                self.raw.append(ev)
                self.events.append((pb.ContainerEventType.Name(ev.container_event_type),
                                    ev.container_id))
        except grpc.RpcError as e:
            self.error = e

    def of(self, id_: str) -> list[str]:
        return [k for k, i in self.events if i == id_]

    def close(self) -> None:
        self.stream.cancel()
        self._t.join(10)


def _stats(d: Daemon, api: str, **f: Any) -> list[Any]:
    pb, _ = APIS[api]
    return list(d.runtime(api).ListContainerStats(pb.ListContainerStatsRequest(
        filter=pb.ContainerStatsFilter(**f)), timeout=15).stats)


def test_stats_and_events_of_a_vm_pod(vm_daemon: Daemon, served_minimal_image: str,
                                      short_tmp: Path, cni_net: CniTestNet) -> None:
    d = vm_daemon
    a2, _ = APIS["v1alpha2"]
    v1, _ = APIS["v1"]
    rt, rt1 = d.runtime("v1alpha2"), d.runtime("v1")
    d.images("v1alpha2").PullImage(a2.PullImageRequest(
        image=a2.ImageSpec(image=served_minimal_image)), timeout=60)

    readers = [Subscriber(d), Subscriber(d)]
    never_reads = d.runtime("v1").GetContainerEvents(v1.GetEventsRequest())  # never iterated
    time.sleep(1)  # the streams are open before the pod's first event

    log_dir = short_tmp / "pods" / "default_vm-pod"
    sb_cfg = sandbox_config(a2, log_dir, annotations={"pod-note": "p1"})
    sid = rt.RunPodSandbox(a2.RunPodSandboxRequest(config=sb_cfg), timeout=60).pod_sandbox_id
    cfg = container_config(a2, served_minimal_image)
    cfg.annotations["vm-note"] = "n1"
    cid = rt.CreateContainer(a2.CreateContainerRequest(
        pod_sandbox_id=sid, config=cfg, sandbox_config=sb_cfg), timeout=60).container_id

    # created, not started: the disk is there, no CPU or memory figures
    [s] = _stats(d, "v1alpha2", id=cid)
    assert s.writable_layer.used_bytes.value > 0
    assert not s.cpu.HasField("usage_core_nano_seconds")

    started = time.monotonic()
    rt.StartContainer(a2.StartContainerRequest(container_id=cid), timeout=60)
    wait_for("the guest's marker", lambda: MARKER in log_text(log_dir / "vm" / "0.log"),
             BOOT_TIMEOUT)

    for api in ("v1alpha2", "v1"):
        pb, _ = APIS[api]
        [first] = _stats(d, api)
        attrs = first.attributes
        assert attrs.id == cid and attrs.metadata.name == "vm" and attrs.metadata.attempt == 0
        assert dict(attrs.labels) == {"role": "guest"}
        assert dict(attrs.annotations) == {"vm-note": "n1"}
        cpu1 = first.cpu.usage_core_nano_seconds.value
        assert 0 < cpu1 <= (time.monotonic() - started + 5) * 10**9 * 2, cpu1
        ws = first.memory.working_set_bytes.value
        assert 16 * 2**20 < ws <= 256 * 2**20, ws  # the guest's 256 MiB at most
        assert first.writable_layer.used_bytes.value > 0
        assert first.writable_layer.fs_id.mountpoint == str(Path(d.state_dir) / "vms")
        if api == "v1":
            assert first.memory.available_bytes.value == 256 * 2**20 - ws
            assert first.memory.rss_bytes.value >= ws
        time.sleep(2)
        [later] = _stats(d, api, pod_sandbox_id=sid, label_selector={"role": "guest"})
        assert later.cpu.usage_core_nano_seconds.value > cpu1, "CPU time grows"
        assert later.cpu.timestamp > first.cpu.timestamp
        # filters and unknown ids
        assert [x.attributes.id for x in _stats(d, api, id=cid)] == [cid]
        assert _stats(d, api, id="no-such-container") == []
        assert _stats(d, api, pod_sandbox_id="no-such-pod") == []
        assert _stats(d, api, label_selector={"role": "other"}) == []
        one = d.runtime(api).ContainerStats(pb.ContainerStatsRequest(container_id=cid),
                                            timeout=15).stats
        assert one.attributes.id == cid
        with pytest.raises(grpc.RpcError) as e:
            d.runtime(api).ContainerStats(pb.ContainerStatsRequest(container_id="nope"),
                                          timeout=15)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND

    # v1 pod stats: the network counters move after a ping of the guest
    ip = rt.PodSandboxStatus(a2.PodSandboxStatusRequest(pod_sandbox_id=sid),
                             timeout=10).status.network.ip

    def pod() -> Any:
        return rt1.PodSandboxStats(v1.PodSandboxStatsRequest(pod_sandbox_id=sid),
                                   timeout=15).stats

    p0 = pod()
    assert p0.attributes.id == sid and p0.attributes.metadata.name == "vm-pod"
    assert dict(p0.attributes.labels) == {"app": "vm"}
    assert dict(p0.attributes.annotations) == {"pod-note": "p1"}
    assert [c.attributes.id for c in p0.linux.containers] == [cid]
    assert p0.linux.cpu.usage_core_nano_seconds.value > 0
    assert p0.linux.memory.working_set_bytes.value > 0
    assert [i.name for i in p0.linux.network.interfaces] == ["eth0"]
    assert p0.linux.network.default_interface.name == "eth0"
    assert " 0% packet loss" in cni_net.ping(ip, count=5)
    p1 = pod()
    rx0, tx0 = (p0.linux.network.default_interface.rx_bytes.value,
                p0.linux.network.default_interface.tx_bytes.value)
    rx1, tx1 = (p1.linux.network.default_interface.rx_bytes.value,
                p1.linux.network.default_interface.tx_bytes.value)
    assert rx1 >= rx0 + 5 * 84 and tx1 >= tx0 + 5 * 84, (rx0, rx1, tx0, tx1)  # 5 echoes
    listed = rt1.ListPodSandboxStats(v1.ListPodSandboxStatsRequest(
        filter=v1.PodSandboxStatsFilter(label_selector={"app": "vm"})), timeout=15).stats
    assert [x.attributes.id for x in listed] == [sid]
    assert not rt1.ListPodSandboxStats(v1.ListPodSandboxStatsRequest(
        filter=v1.PodSandboxStatsFilter(id="nope")), timeout=15).stats
    with pytest.raises(grpc.RpcError) as e:
        rt1.PodSandboxStats(v1.PodSandboxStatsRequest(pod_sandbox_id="nope"), timeout=15)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND

    # the VM stopped behind the runtime's back: the STOPPED event comes from libvirt's
    subprocess.run(["virsh", "-c", "qemu:///system", "destroy", f"avr-{cid}"], check=True,
                   capture_output=True)
    wait_for("the STOPPED event", lambda: all(r.of(cid)[-1:] == ["CONTAINER_STOPPED_EVENT"]
                                              for r in readers), 30)
    [stopped] = _stats(d, "v1alpha2", id=cid)
    assert not stopped.cpu.HasField("usage_core_nano_seconds")
    rt.RemoveContainer(a2.RemoveContainerRequest(container_id=cid), timeout=60)
    rt.StopPodSandbox(a2.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=60)
    rt.RemovePodSandbox(a2.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60)

    life = ["CONTAINER_CREATED_EVENT", "CONTAINER_STARTED_EVENT", "CONTAINER_STOPPED_EVENT",
            "CONTAINER_DELETED_EVENT"]
    for r in readers:
        wait_for("the sandbox's DELETED event", lambda r=r: "CONTAINER_DELETED_EVENT"  # type: ignore[misc]
                 in r.of(sid), 30)
        assert r.of(cid) == life, r.events
        assert r.of(sid) == life, r.events
        assert r.error is None
        started_ev = next(ev for ev in r.raw if ev.container_id == cid
                          and ev.container_event_type == v1.CONTAINER_STARTED_EVENT)
        assert started_ev.pod_sandbox_status.id == sid
        assert started_ev.pod_sandbox_status.network.ip == ip
        assert [c.id for c in started_ev.containers_statuses] == [cid]
        assert started_ev.containers_statuses[0].state == v1.CONTAINER_RUNNING
    assert [k for k, i in readers[0].events] == [k for k, i in readers[1].events]
    # the stream that was never read held nothing up (the lifecycle above completed), and
    # the runtime still answers
    rt.Version(a2.VersionRequest(), timeout=10)
    never_reads.cancel()
    for r in readers:
        r.close()
