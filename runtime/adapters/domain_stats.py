"""Statistics of our domains, read with ONE libvirt call (`getAllDomainStats`) per request.

libvirt answers for every domain of the connection in one round trip; the domains of other
programs (names without our prefix) are dropped here, and the caller keeps only the UUIDs
it holds records of. Names and UUIDs of the returned domain objects are read from the
client's copy (no further round trip). `NOWAIT` keeps a domain busy with a long job (a
snapshot, a migration) from holding up the whole answer: its job-bound figures are then
missing for that call, never late.

Figures are as libvirt gives them, in bytes and nanoseconds:
  cpu.time           CPU time of the whole QEMU process (vCPUs and emulator threads)
  balloon.current    the memory the guest has now (KiB in libvirt, bytes here)
  balloon.rss        resident memory of the QEMU process on the host
  balloon.available, balloon.usable, balloon.unused, balloon.major_fault, .minor_fault
                     the guest's own view, only when the guest runs a balloon driver that
                     reports (stats period set in the domain's <memballoon>)
  block.N.*          per disk: path, allocation (highest written offset of the image
                     file), physical (the file's size on the host), capacity (virtual size),
                     rd.bytes and wr.bytes (the guest's reads and writes since QEMU started)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import libvirt

from .libvirt_conn import LibvirtConnection
from .libvirt_domains import PREFIX, call

# Not VIR_DOMAIN_STATS_INTERFACE: libvirt reads a tap's counters in its own namespace, and
# ours are moved into the pod's once QEMU opened them (libvirt then reports zeros); the
# network figures are read in the pod's namespace instead (service/pod_network).
STATS = (libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
         | libvirt.VIR_DOMAIN_STATS_BALLOON | libvirt.VIR_DOMAIN_STATS_BLOCK)
FLAGS = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT

_ACTIVE = {libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED, libvirt.VIR_DOMAIN_PAUSED,
           libvirt.VIR_DOMAIN_SHUTDOWN, libvirt.VIR_DOMAIN_PMSUSPENDED}


@dataclasses.dataclass(frozen=True)
class BlockStats:
    name: str  # the guest's device name (vda, sda, hdc)
    path: str
    allocation: int | None
    physical: int | None
    capacity: int | None
    read_bytes: int | None = None  # since QEMU started
    write_bytes: int | None = None


@dataclasses.dataclass(frozen=True)
class DomainStats:
    uuid: str
    active: bool
    cpu_time_ns: int | None = None
    memory_bytes: int | None = None  # balloon.current
    rss_bytes: int | None = None
    guest_available_bytes: int | None = None
    guest_usable_bytes: int | None = None
    guest_unused_bytes: int | None = None
    major_faults: int | None = None
    minor_faults: int | None = None
    blocks: tuple[BlockStats, ...] = ()


def _int(d: Mapping[str, Any], key: str, scale: int = 1) -> int | None:
    v = d.get(key)
    return int(v) * scale if isinstance(v, int) and v >= 0 else None


def parse(uuid: str, d: Mapping[str, Any]) -> DomainStats:
    """One domain's typed parameters (as getAllDomainStats returns them) as DomainStats."""
    active = d.get("state.state") in _ACTIVE
    blocks = tuple(
        BlockStats(name=str(d.get(f"block.{i}.name", "")), path=str(d.get(f"block.{i}.path", "")),
                   allocation=_int(d, f"block.{i}.allocation"),
                   physical=_int(d, f"block.{i}.physical"),
                   capacity=_int(d, f"block.{i}.capacity"),
                   read_bytes=_int(d, f"block.{i}.rd.bytes"),
                   write_bytes=_int(d, f"block.{i}.wr.bytes"))
        for i in range(_int(d, "block.count") or 0))
    if not active:  # a stopped domain's CPU and memory figures mean nothing
        return DomainStats(uuid, False, blocks=blocks)
    return DomainStats(
        uuid, True, cpu_time_ns=_int(d, "cpu.time"),
        memory_bytes=_int(d, "balloon.current", 1024), rss_bytes=_int(d, "balloon.rss", 1024),
        guest_available_bytes=_int(d, "balloon.available", 1024),
        guest_usable_bytes=_int(d, "balloon.usable", 1024),
        guest_unused_bytes=_int(d, "balloon.unused", 1024),
        major_faults=_int(d, "balloon.major_fault"), minor_faults=_int(d, "balloon.minor_fault"),
        blocks=blocks)


class DomainStatsReader:
    def __init__(self, conn: LibvirtConnection) -> None:
        self._conn = conn
        #: libvirt round trips made for statistics (one per `read`), for tests and benches
        self.calls = 0

    def read(self) -> dict[str, DomainStats]:
        """Statistics of every domain with our prefix, by UUID, in one libvirt call."""
        with call("reading domain statistics"):
            self.calls += 1
            records = self._conn.get().getAllDomainStats(STATS, FLAGS)
            out = {}
            for dom, params in records:
                if dom.name().startswith(PREFIX):
                    uuid = dom.UUIDString()
                    out[uuid] = parse(uuid, params)
        return out
