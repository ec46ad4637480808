"""Records of the service layer to CRI messages, for whichever API version was called.

Both versions share field names for everything used here; a field only one version has
(the Arktos `tenant`, `resources`) is set only when the message has it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..service.image_records import ImageRecord
from ..service.network_state import NetworkStatus, NicStatus
from ..service.records import ContainerRecord, SandboxRecord
from ..service.resize import Reported
from .dispatch import Call


def has(msg_cls: Any, field: str) -> bool:
    return field in msg_cls.DESCRIPTOR.fields_by_name


def sandbox_metadata(call: Call, sb: SandboxRecord) -> Any:
    md = call.pb.PodSandboxMetadata(name=sb.name, uid=sb.uid, namespace=sb.namespace,
                                    attempt=sb.attempt)
    if has(call.pb.PodSandboxMetadata, "tenant"):
        md.tenant = sb.tenant
    return md


def sandbox(call: Call, sb: SandboxRecord) -> Any:
    return call.pb.PodSandbox(
        id=sb.id, metadata=sandbox_metadata(call, sb),
        state=call.pb.PodSandboxState.Value(sb.state), created_at=sb.created_at,
        labels=sb.labels, annotations=sb.annotations, runtime_handler=sb.runtime_handler)


def network_status(call: Call, net: NetworkStatus | None) -> Any:
    msg = call.pb.PodSandboxNetworkStatus(ip=net.ip if net else "")
    if net is None:
        return msg
    if has(call.pb.PodSandboxNetworkStatus, "additional_ips"):  # v1
        msg.additional_ips.extend(call.pb.PodIP(ip=ip) for ip in net.ips[1:])
    if has(call.pb.PodSandboxNetworkStatus, "nics"):  # Arktos v1alpha2
        msg.nics.extend(call.pb.NICStatus(name=n.name, port_id=n.port_id,
                                          state=call.pb.NICState.Value(n.state),
                                          reason=n.reason) for n in net.nics)
    return msg


def sandbox_status(call: Call, sb: SandboxRecord, net: NetworkStatus | None) -> Any:
    return call.pb.PodSandboxStatus(
        id=sb.id, metadata=sandbox_metadata(call, sb),
        state=call.pb.PodSandboxState.Value(sb.state), created_at=sb.created_at,
        network=network_status(call, net),
        labels=sb.labels, annotations=sb.annotations, runtime_handler=sb.runtime_handler)


def nic_spec(call: Call, n: NicStatus) -> Any:
    return call.pb.NicSpec(Name=n.nic.name, SubnetName=n.nic.subnet_name, PortId=n.nic.port_id,
                           IpAddress=n.nic.ip_address, IsIpV6Enabled=n.nic.ipv6_enabled,
                           tag=n.nic.tag, VPC=n.vpc)


def _cmeta(call: Call, c: ContainerRecord) -> Any:
    return call.pb.ContainerMetadata(name=c.name, attempt=c.attempt)


def container(call: Call, c: ContainerRecord) -> Any:
    return call.pb.Container(
        id=c.id, pod_sandbox_id=c.sandbox_id, metadata=_cmeta(call, c),
        image=call.pb.ImageSpec(image=c.image), image_ref=c.image_ref,
        state=call.pb.ContainerState.Value(c.state), created_at=c.created_at,
        labels=c.labels, annotations=c.annotations)


def _linux_resources(call: Call, r: Reported) -> Any:
    return call.pb.LinuxContainerResources(
        cpu_period=r.cpu_period, cpu_quota=r.cpu_quota,
        memory_limit_in_bytes=r.memory_limit_in_bytes)


def container_status(call: Call, c: ContainerRecord, resources: Reported | None = None) -> Any:
    """`resources`: what the VM has now (service/resize.py); None leaves the field unset."""
    status = call.pb.ContainerStatus(
        id=c.id, metadata=_cmeta(call, c), state=call.pb.ContainerState.Value(c.state),
        created_at=c.created_at, started_at=c.started_at, finished_at=c.finished_at,
        exit_code=c.exit_code, image=call.pb.ImageSpec(image=c.image), image_ref=c.image_ref,
        reason=c.reason, message=c.message, labels=c.labels, annotations=c.annotations,
        log_path=c.log_path)
    field = call.pb.ContainerStatus.DESCRIPTOR.fields_by_name.get("resources")
    if field is not None and resources is not None:
        if field.message_type.name == "LinuxContainerResources":  # Arktos v1alpha2
            status.resources.CopyFrom(_linux_resources(call, resources))
        else:  # v1: ContainerResources{linux}
            status.resources.linux.CopyFrom(_linux_resources(call, resources))
    return status


def matches(f: Any, id_: str, state: int, labels: Mapping[str, str]) -> bool:
    """The id, state and label-selector parts shared by PodSandboxFilter and
    ContainerFilter (an unset part matches everything)."""
    return ((not f.id or id_ == f.id)
            and (not f.HasField("state") or state == f.state.state)
            and all(labels.get(k) == v for k, v in f.label_selector.items()))


def image(call: Call, rec: ImageRecord) -> Any:
    digests = [f"{n}@{rec.id}" for n in rec.names]
    return call.pb.Image(id=rec.id, repo_tags=rec.names, repo_digests=digests, size=rec.size)


def images(call: Call, recs: Iterable[ImageRecord]) -> list[Any]:
    return [image(call, r) for r in recs]
