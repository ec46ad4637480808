"""Stats and events of the service layer to CRI messages, for whichever API version was
called (v1alpha2 has container stats only; v1 adds available bytes, rss, page faults,
pod sandbox stats and events). A figure the runtime does not know is left unset, never
sent as zero."""

from __future__ import annotations

from typing import Any

from ..service.events import Event
from ..service.network_state import NetworkStatus
from ..service.stats import PRIMARY_IFNAME, InterfaceUsage, MemoryUsage, PodUsage, VmUsage
from . import convert
from .convert import has
from .dispatch import Call


def _cpu(call: Call, timestamp: int, ns: int | None) -> Any:
    msg = call.pb.CpuUsage(timestamp=timestamp)
    if ns is not None:
        msg.usage_core_nano_seconds.value = ns
    return msg


def _memory(call: Call, timestamp: int, m: MemoryUsage | None) -> Any:
    msg = call.pb.MemoryUsage(timestamp=timestamp)
    if m is None:
        return msg
    msg.working_set_bytes.value = m.working_set_bytes
    if has(call.pb.MemoryUsage, "available_bytes"):  # v1
        msg.available_bytes.value = m.available_bytes
        msg.usage_bytes.value = m.usage_bytes
        if m.rss_bytes is not None:
            msg.rss_bytes.value = m.rss_bytes
        if m.page_faults is not None:
            msg.page_faults.value = m.page_faults
        if m.major_page_faults is not None:
            msg.major_page_faults.value = m.major_page_faults
    return msg


def container_stats(call: Call, u: VmUsage, disks_dir: str) -> Any:
    c = u.container
    layer = call.pb.FilesystemUsage(timestamp=u.timestamp,
                                    fs_id=call.pb.FilesystemIdentifier(mountpoint=disks_dir))
    if u.root_used_bytes is not None:
        layer.used_bytes.value = u.root_used_bytes
    return call.pb.ContainerStats(
        attributes=call.pb.ContainerAttributes(
            id=c.id, metadata=call.pb.ContainerMetadata(name=c.name, attempt=c.attempt),
            labels=c.labels, annotations=c.annotations),
        cpu=_cpu(call, u.timestamp, u.cpu_ns), memory=_memory(call, u.timestamp, u.memory),
        writable_layer=layer)


def _interface(call: Call, i: InterfaceUsage) -> Any:
    return call.pb.NetworkInterfaceUsage(
        name=i.name, rx_bytes=call.pb.UInt64Value(value=i.rx_bytes),
        rx_errors=call.pb.UInt64Value(value=i.rx_errors),
        tx_bytes=call.pb.UInt64Value(value=i.tx_bytes),
        tx_errors=call.pb.UInt64Value(value=i.tx_errors))


def sandbox_stats(call: Call, p: PodUsage, disks_dir: str) -> Any:
    """v1 PodSandboxStats (linux): the VM's figures are the pod's."""
    sb = p.sandbox
    ifaces = p.interfaces
    network = call.pb.NetworkUsage(timestamp=p.timestamp,
                                   interfaces=[_interface(call, i) for i in ifaces])
    default = next((i for i in ifaces if i.name == PRIMARY_IFNAME), ifaces[0] if ifaces else None)
    if default is not None:
        network.default_interface.CopyFrom(_interface(call, default))
    return call.pb.PodSandboxStats(
        attributes=call.pb.PodSandboxAttributes(
            id=sb.id, metadata=convert.sandbox_metadata(call, sb), labels=sb.labels,
            annotations=sb.annotations),
        linux=call.pb.LinuxPodSandboxStats(
            cpu=_cpu(call, p.timestamp, p.cpu_ns), memory=_memory(call, p.timestamp, p.memory),
            network=network,
            containers=[container_stats(call, v, disks_dir) for v in p.vms]))


def container_event(call: Call, ev: Event, net: NetworkStatus | None) -> Any:
    msg = call.pb.ContainerEventResponse(
        container_id=ev.container_id,
        container_event_type=call.pb.ContainerEventType.Value(ev.kind),
        created_at=ev.created_at,
        containers_statuses=[convert.container_status(call, c) for c in ev.containers])
    if ev.sandbox is not None:
        msg.pod_sandbox_status.CopyFrom(convert.sandbox_status(call, ev.sandbox, net))
    return msg
