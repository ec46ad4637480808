"""The runtime's own Prometheus figures: one registry per process, shared by every layer.

Every layer counts what it does here (this module imports nothing of the runtime's
layers, like errors and checks): the API's dispatch observes each RPC, the service layer
its pulls and reconcile passes, the libvirt adapter its reconnects, the daemon its
watchdog pings. What is read at scrape time (pods and VMs by state, the per-VM figures)
comes from collectors the daemon registers (service/vm_metrics.py, which also counts the
series its cap leaves out and the scrapes libvirt could not answer); the HTTP endpoint is
daemon/metrics_http.py, off unless --metrics-port is set.

The RPC hook is the hot path (the kubelet calls List* every second): `observe_rpc` keeps
one Histogram child per (method, code) in a dict, so a call costs one dict lookup and one
observe (measured by bench/socket_latency.py).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

NAMESPACE = "arktos_vm_runtime"

#: What the endpoint serves; not prometheus_client's global registry (no process or
#: platform collectors from import side effects; tests in one process stay apart).
REGISTRY = CollectorRegistry(auto_describe=True)

RPC_SECONDS = Histogram(
    "rpc_duration_seconds",
    "CRI calls by method and gRPC status code, and how long they took "
    "(_count is the number of calls)",
    ["method", "code"], namespace=NAMESPACE, registry=REGISTRY,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
             10, 30, 60, 300))
PULLS_IN_FLIGHT = Gauge("image_pulls_in_flight", "Image downloads under way",
                        namespace=NAMESPACE, registry=REGISTRY)
PULL_BYTES = Counter("image_pull_bytes", "Bytes brought by image downloads",
                     namespace=NAMESPACE, registry=REGISTRY)
PULLS = Counter("image_pulls", "Image pulls finished, by outcome (ok, failed)",
                ["outcome"], namespace=NAMESPACE, registry=REGISTRY)
RECONCILE_RUNS = Counter(
    "reconcile_runs",
    "Reconcile passes with libvirt and the networks, by outcome: ok (nothing left), "
    "partial (sandboxes left for a retry), failed (the pass itself failed)",
    ["outcome"], namespace=NAMESPACE, registry=REGISTRY)
LIBVIRT_RECONNECTS = Counter("libvirt_reconnects",
                             "Connections to libvirt made again after one was lost",
                             namespace=NAMESPACE, registry=REGISTRY)
WATCHDOG_PINGS = Counter("watchdog_pings", "WATCHDOG=1 messages sent to systemd",
                         namespace=NAMESPACE, registry=REGISTRY)
WATCHDOG_WITHHELD = Counter("watchdog_withheld",
                            "Watchdog pings withheld (a stuck loop or a wedged libvirt)",
                            namespace=NAMESPACE, registry=REGISTRY)
for _outcome in ("ok", "failed"):
    PULLS.labels(_outcome)
for _outcome in ("ok", "partial", "failed"):
    RECONCILE_RUNS.labels(_outcome)

_rpc_children: dict[tuple[str, str], Histogram] = {}


def observe_rpc(method: str, code: str, seconds: float) -> None:
    """One CRI call done: its method, status code name and duration."""
    child = _rpc_children.get((method, code))
    if child is None:  # methods x codes: bounded by the CRI's descriptors
        child = _rpc_children[(method, code)] = RPC_SECONDS.labels(method, code)
    child.observe(seconds)
