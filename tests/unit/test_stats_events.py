"""Stats and events without root: libvirt's bulk-stats answer parsed, the service's figures,
filters and its one libvirt call per request, the lifecycle events PodState publishes, the
bounded subscriber queues, and both through the real dispatch (grpcio on a unix socket,
both CRI versions, the Core on test:///default). The domain statistics reader is replaced
only where test:/// cannot give figures (it reports a domain's state alone)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from arktos_vm_runtime.adapters.domain_stats import DomainStats, parse
from arktos_vm_runtime.adapters.libvirt_conn import LibvirtConnection
from arktos_vm_runtime.api.dispatch import TRANSPORT_LIMIT, all_handlers, api_modules
from arktos_vm_runtime.api.image_service import ImageServicer
from arktos_vm_runtime.api.pools import Pools
from arktos_vm_runtime.api.runtime_service import RuntimeServicer
from arktos_vm_runtime.config import Settings
from arktos_vm_runtime.errors import NotFound
from arktos_vm_runtime.service import events
from arktos_vm_runtime.service.core import Core
from arktos_vm_runtime.service.events import EventHub
from arktos_vm_runtime.service.podstate import PodState
from arktos_vm_runtime.service.records import (
    CREATED,
    CREATING,
    EXITED,
    RUNNING,
    SANDBOX_NOTREADY,
    SANDBOX_READY,
    ContainerRecord,
    SandboxRecord,
)
from arktos_vm_runtime.service.statedir import StateDir
from arktos_vm_runtime.service.stats import InterfaceUsage, Stats, memory_usage
from arktos_vm_runtime.service.store import Store

KIB = 1024
URI = "test:///default"


def sandbox(sid: str = "sb1", **labels: str) -> SandboxRecord:
    return SandboxRecord(id=sid, name=f"pod-{sid}", namespace="ns", uid=sid, tenant="t",
                         attempt=1, state=SANDBOX_READY, created_at=1, labels=dict(labels),
                         annotations={"a": sid})


def container(cid: str, sid: str = "sb1", state: str = RUNNING, **labels: str) -> ContainerRecord:
    return ContainerRecord(id=cid, sandbox_id=sid, name=f"vm-{cid}", attempt=2, state=state,
                           created_at=1, image="img", image_ref="sha256:x",
                           vm_dir=f"/state/vms/{cid}", labels=dict(labels),
                           annotations={"note": cid})


def running_params(cid: str, cpu: int = 5_000_000_000, **extra: Any) -> dict[str, Any]:
    return {"state.state": 1, "state.reason": 1, "cpu.time": cpu,
            "balloon.current": 262144, "balloon.maximum": 262144, "balloon.rss": 120000,
            "block.count": 2, "block.0.name": "hdc", "block.0.path": f"/state/vms/{cid}/seed.iso",
            "block.0.physical": 376832,
            "block.1.name": "vda", "block.1.path": f"/state/vms/{cid}/root.qcow2",
            "block.1.allocation": 200704, "block.1.physical": 196616,
            "block.1.capacity": 41943040, **extra}


# -- the adapter's parsing ------------------------------------------------------------------


def test_parse_a_running_domain() -> None:
    d = parse("c1", running_params("c1"))
    assert d.active and d.cpu_time_ns == 5_000_000_000
    assert d.memory_bytes == 262144 * KIB and d.rss_bytes == 120000 * KIB
    assert d.guest_usable_bytes is None  # no balloon driver reporting
    assert [b.name for b in d.blocks] == ["hdc", "vda"]
    assert d.blocks[1].physical == 196616 and d.blocks[1].capacity == 41943040


def test_parse_a_stopped_domain_keeps_only_its_disks() -> None:
    # libvirt reports a CPU time for a shut-off domain too (seen on 9.0): meaningless
    d = parse("c1", {**running_params("c1"), "state.state": 5})
    assert not d.active
    assert d.cpu_time_ns is None and d.memory_bytes is None and d.rss_bytes is None
    assert len(d.blocks) == 2


def test_memory_with_and_without_the_guests_view() -> None:
    host = parse("c", running_params("c"))
    m = memory_usage(host)
    assert m is not None
    assert m.working_set_bytes == 120000 * KIB  # QEMU's resident memory, below the VM's
    assert m.available_bytes == (262144 - 120000) * KIB
    assert m.rss_bytes == 120000 * KIB
    big = memory_usage(parse("c", running_params("c", **{"balloon.rss": 400000})))
    assert big is not None and big.working_set_bytes == 262144 * KIB  # capped
    assert big.available_bytes == 0 and big.rss_bytes == 400000 * KIB
    guest = memory_usage(parse("c", running_params(
        "c", **{"balloon.available": 250000, "balloon.usable": 200000,
                "balloon.unused": 150000, "balloon.major_fault": 7,
                "balloon.minor_fault": 70})))
    assert guest is not None
    assert guest.working_set_bytes == 50000 * KIB
    assert guest.available_bytes == 200000 * KIB
    assert guest.usage_bytes == 100000 * KIB  # page cache included
    assert guest.major_page_faults == 7 and guest.page_faults == 70
    assert memory_usage(parse("c", {"state.state": 5})) is None


# -- the service: filters and one libvirt call per request ----------------------------------


class Domains:
    def __init__(self, stats: dict[str, DomainStats]) -> None:
        self.stats = stats
        self.calls = 0

    def read(self) -> dict[str, DomainStats]:
        self.calls += 1
        return self.stats


ETH0 = InterfaceUsage(name="eth0", rx_bytes=1000, rx_errors=1, tx_bytes=2000, tx_errors=2)


def make_stats(recs: list[ContainerRecord], pods: list[SandboxRecord],
               doms: Domains) -> Stats:
    return Stats(lambda: recs, lambda: pods, doms.read,
                 lambda sid: [ETH0] if sid == "sb1" else [], "/state/vms")


def test_list_filters_and_one_call() -> None:
    recs = [container("c1", "sb1", app="a"), container("c2", "sb2", app="b"),
            container("c3", "sb3", state=EXITED, app="a")]
    doms = Domains({"c1": parse("c1", running_params("c1", cpu=7)),
                    "c2": parse("c2", running_params("c2", cpu=9)),
                    "c3": parse("c3", {**running_params("c3"), "state.state": 5})})
    st = make_stats(recs, [sandbox("sb1"), sandbox("sb2")], doms)
    all_ = st.list_containers()
    assert [u.container.id for u in all_] == ["c1", "c2", "c3"]
    assert doms.calls == 1, "one libvirt call for three VMs"
    assert all_[0].cpu_ns == 7 and all_[1].cpu_ns == 9
    assert all_[2].cpu_ns is None and all_[2].memory is None
    assert all_[2].root_used_bytes == 196616  # the root overlay, not the seed ISO
    assert all(u.interfaces == () for u in all_), "container stats read no NIC counters"
    assert [u.container.id for u in st.list_containers(sandbox_id="sb2")] == ["c2"]
    assert [u.container.id for u in st.list_containers(labels={"app": "a"})] == ["c1", "c3"]
    assert [u.container.id for u in st.list_containers(id_="c3", labels={"app": "a"})] == ["c3"]
    assert doms.calls == 4
    assert st.list_containers(id_="nope") == [] and st.list_containers(labels={"x": "y"}) == []
    assert doms.calls == 4, "a request that picks nothing asks libvirt nothing"
    with pytest.raises(NotFound, match="nope"):
        st.container("nope")
    assert st.container("c2").container.name == "vm-c2"


def test_pod_figures_and_a_vm_libvirt_does_not_know() -> None:
    recs = [container("c1", "sb1"), container("c2", "sb2")]
    doms = Domains({"c1": parse("c1", running_params("c1", cpu=7))})
    st = make_stats(recs, [sandbox("sb1", team="x"), sandbox("sb2"), sandbox("sb3")], doms)
    pods = st.list_sandboxes()
    assert doms.calls == 1
    assert [p.sandbox.id for p in pods] == ["sb1", "sb2", "sb3"]
    assert pods[0].cpu_ns == 7 and pods[0].memory is not None
    assert pods[0].interfaces == (ETH0,), "pod stats carry the NICs' counters"
    assert pods[1].cpu_ns is None and pods[1].vms[0].root_used_bytes is None
    assert pods[2].vms == () and pods[2].memory is None
    assert [p.sandbox.id for p in st.list_sandboxes(labels={"team": "x"})] == ["sb1"]
    with pytest.raises(NotFound):
        st.sandbox("nope")


# -- events -------------------------------------------------------------------------------


def test_event_kinds() -> None:
    c = container("c1")
    k = events.container_kinds
    assert k(None, dataclasses.replace(c, state=CREATING)) == []
    assert k(dataclasses.replace(c, state=CREATING), dataclasses.replace(c, state=CREATED)) \
        == [events.CREATED]
    assert k(dataclasses.replace(c, state=CREATED), c) == [events.STARTED]
    assert k(c, dataclasses.replace(c, state=EXITED)) == [events.STOPPED]
    assert k(c, dataclasses.replace(c, state=CREATED)) == [events.STOPPED]  # start undone
    assert k(c, dataclasses.replace(c, console_offset=9)) == []
    assert k(dataclasses.replace(c, state=EXITED), None) == [events.DELETED]
    assert k(dataclasses.replace(c, state=CREATING), None) == []  # a create rolled back
    s = sandbox()
    assert events.sandbox_kinds(None, s) == [events.CREATED, events.STARTED]
    assert events.sandbox_kinds(s, dataclasses.replace(s, state=SANDBOX_NOTREADY)) \
        == [events.STOPPED]
    assert events.sandbox_kinds(s, None) == [events.DELETED]


def lifecycle(state: PodState) -> None:
    state.add_sandbox(sandbox())
    state.put_container(container("c1", state=CREATING))
    state.set_container("c1", state=CREATED)
    state.set_container("c1", state=RUNNING)
    state.set_container("c1", console_offset=100)  # no event
    state.set_container("c1", state=EXITED)
    state.change_sandbox("sb1", lambda sb: dataclasses.replace(sb, state=SANDBOX_NOTREADY))
    state.delete_container("c1")
    state.delete_sandbox("sb1")


EXPECTED = [("CONTAINER_CREATED_EVENT", "sb1"), ("CONTAINER_STARTED_EVENT", "sb1"),
            ("CONTAINER_CREATED_EVENT", "c1"), ("CONTAINER_STARTED_EVENT", "c1"),
            ("CONTAINER_STOPPED_EVENT", "c1"), ("CONTAINER_STOPPED_EVENT", "sb1"),
            ("CONTAINER_DELETED_EVENT", "c1"), ("CONTAINER_DELETED_EVENT", "sb1")]


def test_podstate_publishes_the_lifecycle_in_order(tmp_path: Path) -> None:
    hub = EventHub()
    state = PodState(Store(tmp_path / "state.db"), hub.publish)
    notified = []
    sub = hub.subscribe(lambda: notified.append(1))
    assert sub is not None
    lifecycle(state)
    got = sub.take()
    assert [(e.kind, e.container_id) for e in got] == EXPECTED
    assert len(notified) == len(EXPECTED)
    started = got[3]
    assert started.sandbox is not None and started.sandbox.id == "sb1"
    assert [c.state for c in started.containers] == [RUNNING]
    assert got[-1].sandbox is None and got[-1].containers == ()
    sub.close()
    assert hub.subscribers == 0


def test_a_subscriber_that_never_reads_is_cut_off_and_blocks_nobody(tmp_path: Path) -> None:
    hub = EventHub(limit=5)
    state = PodState(Store(tmp_path / "state.db"), hub.publish)
    stuck = hub.subscribe(lambda: None)
    reader = hub.subscribe(lambda: None)
    assert stuck is not None and reader is not None
    seen = []
    started = time.monotonic()
    for i in range(20):
        state.add_sandbox(sandbox(f"s{i}"))  # two events each
        seen += reader.take()
    assert time.monotonic() - started < 5
    assert len(seen) == 40, "the reading subscriber misses nothing"
    assert stuck.overflowed and stuck.take() == [], "cut off, its queue dropped"
    assert not reader.overflowed


def test_subscriber_limit_and_a_failing_notify() -> None:
    hub = EventHub(max_subscribers=2)

    def broken() -> None:
        raise RuntimeError("loop closed")

    a = hub.subscribe(broken)
    assert a is not None and hub.subscribe(lambda: None) is not None
    assert hub.subscribe(lambda: None) is None
    hub.publish(events.Event(events.CREATED, "x", 1, None, ()))  # does not raise
    assert len(a.take()) == 1


# -- through the dispatch (grpcio, both versions) -------------------------------------------


def serve(tmp_path: Path, test: Callable[[Core, grpc.aio.Channel], Awaitable[None]]) -> None:
    settings = Settings(libvirt_uri=URI, state_dir=str(tmp_path / "state"),
                        cni_conf_dir=str(tmp_path / "cni"),
                        template_dir=str(tmp_path / "templates"))
    state = StateDir(settings.state_dir)
    core = Core(settings, state, LibvirtConnection(URI))
    sock = f"unix:{tmp_path}/cri.sock"

    async def main() -> None:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", TRANSPORT_LIMIT)])
        pools = Pools()
        server.add_generic_rpc_handlers(all_handlers(RuntimeServicer(core, pools),
                                                     ImageServicer(core, pools)))
        server.add_insecure_port(sock)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(sock) as channel:
                await test(core, channel)
        finally:
            await server.stop(None)
            pools.shutdown()

    try:
        asyncio.run(main())
    finally:
        core.close()
        state.close()


def stub(channel: grpc.aio.Channel, api: str, method: str) -> Any:
    pb = api_modules()[api]
    svc = pb.DESCRIPTOR.services_by_name["RuntimeService"].methods_by_name[method]
    resp = getattr(pb, svc.output_type.name)
    path = f"/runtime.{api}.RuntimeService/{method}"
    make = channel.unary_stream if svc.server_streaming else channel.unary_unary
    return make(path, request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=resp.FromString)


@pytest.mark.parametrize("api", ["v1alpha2", "v1"])
def test_stats_over_the_wire(tmp_path: Path, api: str) -> None:
    pb = api_modules()[api]

    async def test(core: Core, channel: grpc.aio.Channel) -> None:
        st = core.pods.state
        st.add_sandbox(sandbox("sb1", app="a"))
        st.put_container(dataclasses.replace(container("c1", app="a"), state=CREATING,
                                             vm_dir=str(Path(core.stats.disks_dir) / "c1")))
        st.set_container("c1", state=RUNNING)
        doms = Domains({"c1": parse("c1", {
            **running_params("c1"), "block.1.path": f"{core.stats.disks_dir}/c1/root.qcow2"})})
        core.stats._read = doms.read  # test:/// reports states only
        core.stats._interfaces = lambda sid: [ETH0]  # no pod namespace here
        resp = await stub(channel, api, "ListContainerStats")(pb.ListContainerStatsRequest())
        assert doms.calls == 1 and len(resp.stats) == 1
        s = resp.stats[0]
        assert s.attributes.id == "c1" and s.attributes.metadata.name == "vm-c1"
        assert s.attributes.metadata.attempt == 2
        assert dict(s.attributes.labels) == {"app": "a"}
        assert dict(s.attributes.annotations) == {"note": "c1"}
        assert s.cpu.usage_core_nano_seconds.value == 5_000_000_000 and s.cpu.timestamp > 0
        assert s.memory.working_set_bytes.value == 120000 * KIB
        assert s.writable_layer.used_bytes.value == 196616
        assert s.writable_layer.fs_id.mountpoint == core.stats.disks_dir
        if api == "v1":
            assert s.memory.available_bytes.value == (262144 - 120000) * KIB
            assert s.memory.rss_bytes.value == 120000 * KIB
            assert not s.memory.HasField("major_page_faults"), "unknown: unset, not zero"
        for f in (pb.ContainerStatsFilter(id="nope"), pb.ContainerStatsFilter(
                pod_sandbox_id="other"), pb.ContainerStatsFilter(label_selector={"app": "b"})):
            r = await stub(channel, api, "ListContainerStats")(
                pb.ListContainerStatsRequest(filter=f))
            assert not r.stats
        r = await stub(channel, api, "ListContainerStats")(pb.ListContainerStatsRequest(
            filter=pb.ContainerStatsFilter(pod_sandbox_id="sb1", label_selector={"app": "a"})))
        assert [x.attributes.id for x in r.stats] == ["c1"]
        one = await stub(channel, api, "ContainerStats")(pb.ContainerStatsRequest(
            container_id="c1"))
        assert one.stats.cpu.usage_core_nano_seconds.value == 5_000_000_000
        assert doms.calls == 3
        for method, req, code in (
                ("ContainerStats", pb.ContainerStatsRequest(container_id="nope"),
                 grpc.StatusCode.NOT_FOUND),
                ("ContainerStats", pb.ContainerStatsRequest(), grpc.StatusCode.INVALID_ARGUMENT)):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub(channel, api, method)(req)
            assert e.value.code() == code, (method, e.value.details())
        if api == "v1alpha2":
            return
        ps = await stub(channel, api, "ListPodSandboxStats")(pb.ListPodSandboxStatsRequest())
        assert len(ps.stats) == 1
        p = ps.stats[0]
        assert p.attributes.id == "sb1" and p.attributes.metadata.name == "pod-sb1"
        assert dict(p.attributes.annotations) == {"a": "sb1"}
        assert p.linux.cpu.usage_core_nano_seconds.value == 5_000_000_000
        assert p.linux.memory.working_set_bytes.value == 120000 * KIB
        assert [i.name for i in p.linux.network.interfaces] == ["eth0"]
        assert p.linux.network.default_interface.rx_bytes.value == 1000
        assert p.linux.network.default_interface.tx_errors.value == 2
        assert [c.attributes.id for c in p.linux.containers] == ["c1"]
        one_pod = await stub(channel, api, "PodSandboxStats")(pb.PodSandboxStatsRequest(
            pod_sandbox_id="sb1"))
        assert one_pod.stats.attributes.id == "sb1"
        r2 = await stub(channel, api, "ListPodSandboxStats")(pb.ListPodSandboxStatsRequest(
            filter=pb.PodSandboxStatsFilter(label_selector={"app": "nope"})))
        assert not r2.stats
        for req, code in ((pb.PodSandboxStatsRequest(pod_sandbox_id="nope"),
                           grpc.StatusCode.NOT_FOUND),
                          (pb.PodSandboxStatsRequest(), grpc.StatusCode.INVALID_ARGUMENT)):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub(channel, api, "PodSandboxStats")(req)
            assert e.value.code() == code

    serve(tmp_path, test)


def test_events_over_the_wire_two_subscribers_and_one_that_never_reads(tmp_path: Path) -> None:
    pb = api_modules()["v1"]

    async def test(core: Core, channel: grpc.aio.Channel) -> None:
        hub = core.pods.events
        streams = [stub(channel, "v1", "GetContainerEvents")(pb.GetEventsRequest())
                   for _ in range(3)]
        deadline = time.monotonic() + 10
        while hub.subscribers < 3:
            assert time.monotonic() < deadline, "subscribed"
            await asyncio.sleep(0.02)
        # the runtime's writes happen in worker threads, as they do in the daemon
        started = time.monotonic()
        await asyncio.get_running_loop().run_in_executor(None, lifecycle, core.pods.state)
        assert time.monotonic() - started < 5

        async def first(stream: Any, n: int) -> list[Any]:
            out = []
            async for ev in stream:
                out.append(ev)
                if len(out) == n:
                    break
            return out

        got = await asyncio.wait_for(asyncio.gather(first(streams[0], len(EXPECTED)),
                                                    first(streams[1], len(EXPECTED))), 10)
        for evs in got:
            assert [(pb.ContainerEventType.Name(e.container_event_type), e.container_id)
                    for e in evs] == EXPECTED
            started_ev = evs[3]
            assert started_ev.pod_sandbox_status.id == "sb1"
            assert started_ev.pod_sandbox_status.metadata.name == "pod-sb1"
            assert [c.state for c in started_ev.containers_statuses] \
                == [pb.ContainerState.CONTAINER_RUNNING]
            assert started_ev.created_at > 0
        # the third never read: nothing waited for it
        for s in streams:
            s.cancel()
        deadline = time.monotonic() + 10
        while hub.subscribers:
            assert time.monotonic() < deadline, "cancelled streams unsubscribe"
            await asyncio.sleep(0.02)

    serve(tmp_path, test)


def test_a_subscriber_cut_off_gets_resource_exhausted(tmp_path: Path) -> None:
    pb = api_modules()["v1"]

    async def test(core: Core, channel: grpc.aio.Channel) -> None:
        hub = core.pods.events
        hub.limit = 3
        stream = stub(channel, "v1", "GetContainerEvents")(pb.GetEventsRequest())
        deadline = time.monotonic() + 10
        while hub.subscribers < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        # published at once from another thread, before the stream's task runs again
        t = threading.Thread(target=lambda: [hub.publish(events.Event(
            events.CREATED, f"x{i}", 1, None, ())) for i in range(10)])
        t.start()
        t.join()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in stream:
                pass
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "missed events" in (e.value.details() or "")

    serve(tmp_path, test)


def test_closing_the_hub_ends_every_stream_at_once(tmp_path: Path) -> None:
    """At daemon shutdown: an open stream would hold the server's stop for its grace."""
    pb = api_modules()["v1"]

    async def test(core: Core, channel: grpc.aio.Channel) -> None:
        hub = core.pods.events
        streams = [stub(channel, "v1", "GetContainerEvents")(pb.GetEventsRequest())
                   for _ in range(2)]
        deadline = time.monotonic() + 10
        while hub.subscribers < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        started = time.monotonic()
        hub.close()
        for s in streams:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in s:
                    pass
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 5
        assert hub.subscribers == 0
        late = stub(channel, "v1", "GetContainerEvents")(pb.GetEventsRequest())
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in late:
                pass
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    serve(tmp_path, test)


def test_server_streams_get_the_uniform_checks(tmp_path: Path) -> None:
    """A malformed request to a streaming method is INVALID_ARGUMENT naming it, a streaming
    method the runtime lacks is UNIMPLEMENTED naming itself."""

    async def test(core: Core, channel: grpc.aio.Channel) -> None:
        raw = channel.unary_stream("/runtime.v1.RuntimeService/GetContainerEvents")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in raw(b"\xff\xff\xff", timeout=10):
                pass
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed GetEventsRequest" in (e.value.details() or "")
        path = "/runtime.v1.RuntimeService/StreamContainerStats"
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in channel.unary_stream(path)(b"", timeout=10):
                pass
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert path in (e.value.details() or "")
        assert core.pods.events.subscribers == 0

    serve(tmp_path, test)
