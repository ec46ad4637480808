"""The Prometheus endpoint without root: the real HTTP server on loopback scraped and read
back with prometheus_client's own parser; the per-VM collector over the real Stats with the
bulk-stats reader replaced (test:/// gives no figures), its one libvirt call per scrape,
label escaping and the cardinality cap; the RPC hook through the real dispatch; the
settings' checks."""

from __future__ import annotations

import dataclasses
import urllib.error
import urllib.request
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from arktos_vm_runtime import metrics
from arktos_vm_runtime.adapters.domain_stats import BlockStats, DomainStats
from arktos_vm_runtime.config import Settings, validate
from arktos_vm_runtime.daemon.metrics_http import MetricsServer
from arktos_vm_runtime.errors import InvalidArgument, Unavailable
from arktos_vm_runtime.service.records import EXITED
from arktos_vm_runtime.service.stats import InterfaceUsage, Stats
from arktos_vm_runtime.service.vm_metrics import StateCollector, VmCollector
from tests.unit.test_dispatch import Client, serve
from tests.unit.test_stats_events import container, sandbox

GIB = 2**30


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """name + sorted labels -> value, as prometheus_client's parser reads the page."""
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(page: dict[Any, float], name: str, **labels: str) -> float | None:
    want = tuple(sorted(labels.items()))
    for (n, ls), v in page.items():
        if n == name and all(item in ls for item in want):
            return v
    return None


class Reader:
    def __init__(self) -> None:
        self.calls = 0
        self.cpu = 10**9
        self.fail = False

    def read(self) -> dict[str, DomainStats]:
        self.calls += 1
        if self.fail:
            raise Unavailable("libvirt is not answering")
        disk = BlockStats("vda", "/state/vms/c1/root.qcow2", 1, 2 * GIB, 4 * GIB,
                          read_bytes=1000, write_bytes=2000)
        return {f"c{i}": DomainStats(f"c{i}", True, cpu_time_ns=self.cpu + i,
                                     memory_bytes=GIB, rss_bytes=GIB // 2, blocks=(disk,))
                for i in range(1, 4)}


def collectors(reader: Reader, max_vms: int = 10) -> list[Any]:
    sbs = [sandbox("sb1"), dataclasses.replace(sandbox("sb2"), name='we"ird\\name\nx')]
    cs = [container("c1", "sb1"), container("c2", "sb2"), container("c3", "sb2", state=EXITED)]
    stats = Stats(lambda: cs, lambda: sbs, reader.read,
                  lambda sid: [InterfaceUsage("eth0", 100, 0, 200, 1)], "/state/vms")
    return [StateCollector(lambda: sbs, lambda: cs), VmCollector(stats.list_sandboxes, max_vms)]


@pytest.fixture
def endpoint() -> Any:
    reader = Reader()
    server = MetricsServer("127.0.0.1", 0, collectors(reader))
    server.start()
    try:
        yield server, reader
    finally:
        server.stop()


def test_scrape_reads_libvirt_once_and_series_move(endpoint: Any) -> None:
    server, reader = endpoint
    page = scrape(server.url)
    assert reader.calls == 1, "one bulk-stats call per scrape"
    assert value(page, "arktos_vm_runtime_pods", state="SANDBOX_READY") == 2
    assert value(page, "arktos_vm_runtime_vms", state="CONTAINER_RUNNING") == 2
    assert value(page, "arktos_vm_runtime_vms", state="CONTAINER_EXITED") == 1
    assert value(page, "arktos_vm_cpu_seconds_total", pod="pod-sb1", namespace="ns",
                 tenant="t", container_id="c1") == pytest.approx(1.000000001)
    assert value(page, "arktos_vm_disk_write_bytes_total", container_id="c1",
                 device="vda") == 2000
    assert value(page, "arktos_vm_network_transmit_bytes_total", container_id="c1",
                 interface="eth0") == 200
    # The label value with a quote, a backslash and a newline comes back as it was.
    assert value(page, "arktos_vm_up", container_id="c2",
                 pod='we"ird\\name\nx') == 1
    reader.cpu += 5 * 10**9
    page2 = scrape(server.url)
    assert reader.calls == 2
    assert value(page2, "arktos_vm_cpu_seconds_total", container_id="c1") == \
        pytest.approx(6.000000001)


def test_cardinality_cap_counts_dropped_series(endpoint: Any) -> None:
    server, _ = endpoint
    server._collectors[1].max_vms = 1
    before = server._collectors[1].dropped_series
    page = scrape(server.url)
    assert value(page, "arktos_vm_up", container_id="c1") == 1
    assert value(page, "arktos_vm_up", container_id="c2") is None
    assert value(page, "arktos_vm_up", container_id="c3") is None
    dropped = value(page, "arktos_vm_runtime_metrics_dropped_series_total")
    assert dropped is not None and dropped - before >= 6


def test_libvirt_down_leaves_the_runtime_figures(endpoint: Any) -> None:
    server, reader = endpoint
    reader.fail = True
    page = scrape(server.url)
    assert value(page, "arktos_vm_runtime_pods", state="SANDBOX_READY") == 2
    assert value(page, "arktos_vm_up") is None
    assert (value(page, "arktos_vm_runtime_metrics_scrape_errors_total") or 0) >= 1


def test_only_metrics_path(endpoint: Any) -> None:
    server, _ = endpoint
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(server.url.replace("/metrics", "/other"), timeout=10)
    assert e.value.code == 404


def test_stop_unregisters_and_frees_the_port() -> None:
    server = MetricsServer("127.0.0.1", 0, collectors(Reader()))
    server.start()
    url = server.url
    server.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)
    again = MetricsServer("127.0.0.1", 0, collectors(Reader()))
    again.start()  # registering the same kinds again works: the first ones are gone
    again.stop()


def test_rpc_hook_counts_calls_by_method_and_code(tmp_path: Any) -> None:
    def count(method: str, code: str) -> float:
        return metrics.REGISTRY.get_sample_value(
            "arktos_vm_runtime_rpc_duration_seconds_count",
            {"method": method, "code": code}) or 0.0

    ok, missing = count("Version", "OK"), count("PodSandboxStatus", "NOT_FOUND")

    async def test(call: Client) -> None:
        from arktos_vm_runtime.api.gen.v1 import api_pb2 as pb
        for _ in range(3):
            code, _ = await call("v1", "Version", pb.VersionRequest().SerializeToString())
            assert code == grpc.StatusCode.OK
        code, _ = await call("v1", "PodSandboxStatus", pb.PodSandboxStatusRequest(
            pod_sandbox_id="nope").SerializeToString())
        assert code == grpc.StatusCode.NOT_FOUND

    serve(tmp_path, test)
    assert count("Version", "OK") == ok + 3
    assert count("PodSandboxStatus", "NOT_FOUND") == missing + 1


@pytest.mark.parametrize("bad", [{"metrics_address": "localhost"}, {"metrics_port": 70000},
                                 {"metrics_max_vms": -1}])
def test_settings_checked(bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument, match="metrics"):
        validate(Settings(**bad))


def test_concurrent_scrapes_are_bounded() -> None:
    import threading

    from arktos_vm_runtime.daemon import metrics_http

    gate = threading.Event()
    entered = threading.Semaphore(0)

    class Slow:
        def describe(self) -> list[Any]:
            return []

        def collect(self) -> Any:
            entered.release()
            gate.wait(10)
            return iter(())

    server = MetricsServer("127.0.0.1", 0, [Slow()])
    server.start()
    results: list[int] = []

    def get() -> None:
        try:
            with urllib.request.urlopen(server.url, timeout=20) as r:
                results.append(r.status)
        except urllib.error.HTTPError as e:
            results.append(e.code)

    try:
        held = [threading.Thread(target=get) for _ in range(metrics_http.MAX_SCRAPES)]
        for t in held:
            t.start()
        for _ in held:
            assert entered.acquire(timeout=10)
        get()  # one more while all are busy
        assert results == [503]
        gate.set()
        for t in held:
            t.join(10)
        assert sorted(results) == [200] * metrics_http.MAX_SCRAPES + [503]
    finally:
        gate.set()
        server.stop()
