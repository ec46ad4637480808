"""What a scrape reads at the time it comes: pods and VMs by state (from memory), and the
per-VM figures from ONE libvirt bulk-stats call (Stats.list_sandboxes: getAllDomainStats
once, plus one netlink dump per running pod for its NICs, which libvirt cannot read once
the taps moved into the pods' namespaces).

Per-VM series carry the labels namespace, pod, tenant and container_id (values cut to
MAX_LABEL characters; the exposition format's escaping is prometheus_client's). Their
number is bounded: at most `max_vms` VMs (the first by container id, so the set is stable
from scrape to scrape) are exported; the series of the others are counted in
arktos_vm_runtime_metrics_dropped_series_total (in the same scrape) and logged at DEBUG.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .. import metrics
from ..errors import RuntimeError_
from .records import (
    CREATED,
    EXITED,
    RUNNING,
    SANDBOX_NOTREADY,
    SANDBOX_READY,
    UNKNOWN,
    ContainerRecord,
    SandboxRecord,
)
from .stats import PodUsage, VmUsage

log = logging.getLogger(__name__)

MAX_LABEL = 256
VM_LABELS = ["namespace", "pod", "tenant", "container_id"]
# name -> (kind, help, extra label); kind "counter" names drop their _total here
_FAMILIES: dict[str, tuple[str, str, str | None]] = {
    "arktos_vm_up": ("gauge", "1 while the VM runs, else 0", None),
    "arktos_vm_vcpus": ("gauge", "vCPUs the VM was given", None),
    "arktos_vm_memory_size_bytes": ("gauge", "Memory the VM was given", None),
    "arktos_vm_cpu_seconds": ("counter", "CPU time of the VM's QEMU process", None),
    "arktos_vm_memory_working_set_bytes": (
        "gauge", "The guest's used memory (QEMU's resident memory when the guest's balloon "
        "driver does not report)", None),
    "arktos_vm_memory_rss_bytes": ("gauge", "Resident memory of the QEMU process", None),
    "arktos_vm_disk_read_bytes": ("counter", "Bytes the guest read from the disk", "device"),
    "arktos_vm_disk_write_bytes": ("counter", "Bytes the guest wrote to the disk", "device"),
    "arktos_vm_disk_physical_bytes": ("gauge", "Size of the disk's file on the host",
                                      "device"),
    "arktos_vm_network_receive_bytes": ("counter", "Bytes the guest received", "interface"),
    "arktos_vm_network_transmit_bytes": ("counter", "Bytes the guest sent", "interface"),
    "arktos_vm_network_receive_errors": ("counter", "Receive errors", "interface"),
    "arktos_vm_network_transmit_errors": ("counter", "Transmit errors", "interface"),
}
Sample = tuple[str, tuple[str, ...], float]


def _cut(value: str) -> str:
    return value if len(value) <= MAX_LABEL else value[:MAX_LABEL]


def vm_samples(sb: SandboxRecord, vm: VmUsage) -> list[Sample]:
    """Every sample of one VM: (family, label values, value)."""
    c: ContainerRecord = vm.container
    base = tuple(_cut(v) for v in (sb.namespace, sb.name, sb.tenant, c.id))
    out: list[Sample] = [
        ("arktos_vm_up", base, 1.0 if c.state == RUNNING and vm.cpu_ns is not None else 0.0),
        ("arktos_vm_vcpus", base, float(c.vcpus)),
        ("arktos_vm_memory_size_bytes", base, float(c.memory_mib << 20)),
    ]
    if vm.cpu_ns is not None:
        out.append(("arktos_vm_cpu_seconds", base, vm.cpu_ns / 1e9))
    if vm.memory is not None:
        out.append(("arktos_vm_memory_working_set_bytes", base,
                    float(vm.memory.working_set_bytes)))
        if vm.memory.rss_bytes is not None:
            out.append(("arktos_vm_memory_rss_bytes", base, float(vm.memory.rss_bytes)))
    for d in vm.disks:
        disk = (*base, _cut(d.name))
        for family, value in (("arktos_vm_disk_read_bytes", d.read_bytes),
                              ("arktos_vm_disk_write_bytes", d.write_bytes),
                              ("arktos_vm_disk_physical_bytes", d.physical)):
            if value is not None:
                out.append((family, disk, float(value)))
    for i in vm.interfaces:
        nic = (*base, _cut(i.name))
        out += [("arktos_vm_network_receive_bytes", nic, float(i.rx_bytes)),
                ("arktos_vm_network_transmit_bytes", nic, float(i.tx_bytes)),
                ("arktos_vm_network_receive_errors", nic, float(i.rx_errors)),
                ("arktos_vm_network_transmit_errors", nic, float(i.tx_errors))]
    return out


def families(samples: list[Sample]) -> list[Metric]:
    made: dict[str, Any] = {}
    for name, (kind, help_, extra) in _FAMILIES.items():
        labels = VM_LABELS + ([extra] if extra else [])
        cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        made[name] = cls(name, help_, labels=labels)
    for name, values, value in samples:
        made[name].add_metric(list(values), value)
    return list(made.values())


class VmCollector:
    """Per-VM figures, read when a scrape comes (in the HTTP server's thread)."""

    def __init__(self, measure: Callable[[], list[PodUsage]], max_vms: int) -> None:
        self._measure = measure
        self.max_vms = max_vms
        self._lock = threading.Lock()  # scrapes may overlap (one thread each)
        self.dropped_series = 0
        self.scrape_errors = 0

    def describe(self) -> list[Metric]:
        return []  # registering must not read libvirt

    def collect(self) -> Iterator[Metric]:
        samples: list[Sample] = []
        try:
            pods = self._measure()
        except RuntimeError_ as e:  # libvirt unreachable: the runtime's own figures still go
            with self._lock:
                self.scrape_errors += 1
            log.warning("metrics: per-VM figures not read: %s", e.message)
            pods = []
        vms = sorted(((p.sandbox, v) for p in pods for v in p.vms),
                     key=lambda pair: pair[1].container.id)
        dropped = 0
        for n, (sb, vm) in enumerate(vms):
            got = vm_samples(sb, vm)
            if n < self.max_vms:
                samples += got
            else:
                dropped += len(got)
        if dropped:
            log.debug("metrics: %d VMs over --metrics-max-vms %d; %d series left out",
                      len(vms) - self.max_vms, self.max_vms, dropped)
        with self._lock:
            self.dropped_series += dropped
            totals = (self.dropped_series, self.scrape_errors)
        yield from families(samples)
        yield CounterMetricFamily(
            f"{metrics.NAMESPACE}_metrics_dropped_series",
            "Per-VM series left out of scrapes by --metrics-max-vms (cardinality bound)",
            value=totals[0])
        yield CounterMetricFamily(
            f"{metrics.NAMESPACE}_metrics_scrape_errors",
            "Scrapes whose per-VM figures could not be read (libvirt unreachable)",
            value=totals[1])


class StateCollector:
    """Pods and VMs by state, from the records in memory (no I/O)."""

    def __init__(self, sandboxes: Callable[[], list[SandboxRecord]],
                 containers: Callable[[], list[ContainerRecord]]) -> None:
        self._sandboxes = sandboxes
        self._containers = containers

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        pods = GaugeMetricFamily("arktos_vm_runtime_pods", "Pod sandboxes by CRI state",
                                 labels=["state"])
        counts = dict.fromkeys((SANDBOX_READY, SANDBOX_NOTREADY), 0)
        for sb in self._sandboxes():
            counts[sb.state] = counts.get(sb.state, 0) + 1
        for state, n in sorted(counts.items()):
            pods.add_metric([state], n)
        vms = GaugeMetricFamily("arktos_vm_runtime_vms", "VM containers by CRI state",
                                labels=["state"])
        counts = dict.fromkeys((CREATED, RUNNING, EXITED, UNKNOWN), 0)
        for c in self._containers():
            counts[c.state] = counts.get(c.state, 0) + 1
        for state, n in sorted(counts.items()):
            vms.add_metric([state], n)
        yield pods
        yield vms
