"""Container and pod sandbox statistics: the records picked by the request's filter, then
ONE libvirt bulk-stats call (adapters/domain_stats) for all of them, never one per VM. A
request that picks no container makes no libvirt call at all.

What the figures mean for a VM (README "Stats"):
  cpu           CPU time of the VM's QEMU process (vCPUs and emulator), nanoseconds
  working set   the guest's used memory (total minus usable) when its balloon driver reports
                it, else the QEMU process's resident memory on the host, capped at the VM's
                memory; available = the VM's memory minus the working set (the guest's
                usable memory when it reports); usage = the guest's total minus unused when
                reported, else the capped resident memory; rss = the QEMU process's resident
                memory on the host (it includes QEMU's own overhead, uncapped)
  writable layer the root disk's qcow2 overlay: its size on the host; fs_id names the
                directory holding the VMs' disks, which the kubelet measures itself
  network       per pod interface (the CNI ifname the tap stands in for), the guest's view,
                read from the tap in the pod's namespace (one netlink dump per running pod:
                libvirt cannot read a tap moved out of its namespace)
CPU and memory are reported only while the VM runs; a created or exited VM has its disk.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from ..adapters.domain_stats import BlockStats, DomainStats
from ..checks import shown
from ..errors import NotFound
from .designer import VmFiles
from .records import ContainerRecord, SandboxRecord

PRIMARY_IFNAME = "eth0"


@dataclasses.dataclass(frozen=True)
class InterfaceUsage:
    name: str
    rx_bytes: int
    rx_errors: int
    tx_bytes: int
    tx_errors: int


@dataclasses.dataclass(frozen=True)
class MemoryUsage:
    working_set_bytes: int
    available_bytes: int
    usage_bytes: int
    rss_bytes: int | None = None
    page_faults: int | None = None
    major_page_faults: int | None = None


@dataclasses.dataclass(frozen=True)
class VmUsage:
    container: ContainerRecord
    timestamp: int  # ns since the epoch, when libvirt was asked
    cpu_ns: int | None = None
    memory: MemoryUsage | None = None
    root_used_bytes: int | None = None
    interfaces: tuple[InterfaceUsage, ...] = ()
    disks: tuple[BlockStats, ...] = ()  # as libvirt reported them (the metrics use them)


@dataclasses.dataclass(frozen=True)
class PodUsage:
    sandbox: SandboxRecord
    timestamp: int
    vms: tuple[VmUsage, ...]

    @property
    def cpu_ns(self) -> int | None:
        known = [v.cpu_ns for v in self.vms if v.cpu_ns is not None]
        return sum(known) if known else None

    @property
    def memory(self) -> MemoryUsage | None:
        known = [v.memory for v in self.vms if v.memory is not None]
        if not known:
            return None
        return MemoryUsage(
            working_set_bytes=sum(m.working_set_bytes for m in known),
            available_bytes=sum(m.available_bytes for m in known),
            usage_bytes=sum(m.usage_bytes for m in known),
            rss_bytes=sum(m.rss_bytes or 0 for m in known))

    @property
    def interfaces(self) -> tuple[InterfaceUsage, ...]:
        return tuple(i for v in self.vms for i in v.interfaces)


def memory_usage(d: DomainStats) -> MemoryUsage | None:
    if not d.active or d.memory_bytes is None:
        return None
    faults = {"page_faults": d.minor_faults, "major_page_faults": d.major_faults}
    if d.guest_available_bytes is not None and d.guest_usable_bytes is not None:
        total = d.guest_available_bytes
        used = max(0, total - d.guest_usable_bytes)
        usage = max(used, total - (d.guest_unused_bytes
                                   if d.guest_unused_bytes is not None else total))
        return MemoryUsage(working_set_bytes=used, available_bytes=min(d.guest_usable_bytes,
                                                                       total),
                           usage_bytes=usage, rss_bytes=d.rss_bytes, **faults)
    if d.rss_bytes is None:
        return None
    used = min(d.rss_bytes, d.memory_bytes)
    return MemoryUsage(working_set_bytes=used, available_bytes=d.memory_bytes - used,
                       usage_bytes=used, rss_bytes=d.rss_bytes, **faults)


def vm_usage(rec: ContainerRecord, d: DomainStats | None, timestamp: int,
             interfaces: tuple[InterfaceUsage, ...] = ()) -> VmUsage:
    if d is None:  # libvirt has no such domain (now): nothing measured
        return VmUsage(rec, timestamp)
    root = str(VmFiles(Path(rec.vm_dir)).root_disk)
    disk = next((b for b in d.blocks if b.path == root), None)
    used = None if disk is None else (disk.physical if disk.physical is not None
                                      else disk.allocation)
    return VmUsage(rec, timestamp, cpu_ns=d.cpu_time_ns, memory=memory_usage(d),
                   root_used_bytes=used, interfaces=interfaces if d.active else (),
                   disks=d.blocks)


def _labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


class Stats:
    def __init__(self, containers: Callable[[], list[ContainerRecord]],
                 sandboxes: Callable[[], list[SandboxRecord]],
                 read: Callable[[], dict[str, DomainStats]],
                 interfaces: Callable[[str], list[InterfaceUsage]], disks_dir: str) -> None:
        self._containers = containers
        self._sandboxes = sandboxes
        self._read = read
        self._interfaces = interfaces
        #: the filesystem holding every VM's disks (the writable layer's fs_id)
        self.disks_dir = disks_dir

    def _measure(self, recs: list[ContainerRecord], network: bool = False) -> list[VmUsage]:
        """`network`: read the NICs' counters too (pod stats carry them, container stats
        do not: ListContainerStats then makes no netlink call)."""
        if not recs:
            return []
        timestamp = time.time_ns()
        domains = self._read()  # the one libvirt call of this request
        out = []
        for rec in recs:
            d = domains.get(rec.id)
            ifaces = tuple(self._interfaces(rec.sandbox_id)) \
                if network and d is not None and d.active else ()
            out.append(vm_usage(rec, d, timestamp, ifaces))
        return out

    # -- containers -----------------------------------------------------------------------

    def list_containers(self, id_: str = "", sandbox_id: str = "",
                        labels: Mapping[str, str] | None = None) -> list[VmUsage]:
        return self._measure([
            c for c in self._containers()
            if (not id_ or c.id == id_) and (not sandbox_id or c.sandbox_id == sandbox_id)
            and _labels_match(labels or {}, c.labels)])

    def container(self, cid: str) -> VmUsage:
        found = self.list_containers(id_=cid)
        if not found:
            raise NotFound(f"container {shown(cid)} not found")
        return found[0]

    # -- sandboxes ------------------------------------------------------------------------

    def list_sandboxes(self, id_: str = "",
                       labels: Mapping[str, str] | None = None) -> list[PodUsage]:
        pods = [sb for sb in self._sandboxes()
                if (not id_ or sb.id == id_) and _labels_match(labels or {}, sb.labels)]
        if not pods:
            return []
        wanted = {sb.id for sb in pods}
        vms = self._measure([c for c in self._containers() if c.sandbox_id in wanted],
                            network=True)
        timestamp = vms[0].timestamp if vms else time.time_ns()
        return [PodUsage(sb, timestamp, tuple(v for v in vms if v.container.sandbox_id == sb.id))
                for sb in pods]

    def sandbox(self, sandbox_id: str) -> PodUsage:
        found = self.list_sandboxes(id_=sandbox_id)
        if not found:
            raise NotFound(f"pod sandbox {shown(sandbox_id)} not found")
        return found[0]
