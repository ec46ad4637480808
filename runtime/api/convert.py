"""Records of the service layer to CRI messages, for whichever API version was called.

Both versions share field names for everything used here; a field only one version has
(the Arktos `tenant`, `resources`) is set only when the message has it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from ..service.image_records import ImageRecord
from ..service.network_state import NetworkStatus, NicStatus
from ..service.records import ContainerRecord, SandboxRecord
from ..service.resize import Reported
from .dispatch import Call

R = TypeVar("R", SandboxRecord, ContainerRecord)


class MessageCache(Generic[R]):
    """The list message of each record, per API version, kept until the record changes:
    the kubelet lists every pod and container every second, and building the messages was
    most of a list's own time at 50 pods (bench/relist.py). Records are frozen values
    replaced on every change, so the record object itself tells whether a kept message is
    current. Used from the serving loop only (one thread): no lock."""

    def __init__(self, build: Callable[[Call, R], Any]) -> None:
        self._build: Callable[[Call, R], Any] = build
        self._kept: dict[str, dict[str, tuple[R, Any]]] = {}  # api version -> id -> (rec, msg)

    def messages(self, call: Call, records: Sequence[R], every: bool) -> list[Any]:
        """The messages of `records`; `every`: they are all current records, so what is
        kept for others (removed since) is dropped."""
        kept = self._kept.setdefault(call.api_version, {})
        fresh: dict[str, tuple[R, Any]] = {}
        for rec in records:
            hit = kept.get(rec.id)
            fresh[rec.id] = hit if hit is not None and hit[0] is rec \
                else (rec, self._build(call, rec))
        if every:
            self._kept[call.api_version] = fresh
        else:
            kept.update(fresh)
        return [msg for _rec, msg in fresh.values()]


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


def matches_all(f: Any) -> bool:
    """Whether a filter's shared parts are all unset (as the kubelet's relist sends it)."""
    return not f.id and not f.HasField("state") and not f.label_selector


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
