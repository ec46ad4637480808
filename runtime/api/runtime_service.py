"""RuntimeService for both CRI versions: validate, convert, call the service layer."""

from __future__ import annotations

import json
from typing import Any

from .. import __version__
from ..errors import InvalidArgument, NotFound
from ..service.core import Core
from ..service.health import Condition
from ..service.network_state import NetworkStatus
from ..service.nic_spec import NicInfo
from ..service.pods import ContainerInput, now_ns
from ..service.records import SANDBOX_READY, SandboxRecord
from ..service.volumes import DeviceInput, MountInput
from . import convert
from .dispatch import Call
from .pools import Kind, Pools
from .resize_rpcs import ResizeRpcs
from .snapshot_rpcs import SnapshotRpcs
from .stats_rpcs import StatsRpcs
from .streaming_rpcs import StreamingRpcs
from .vm_ops_rpcs import VmOpsRpcs

# The kubelet checks this exact value (the CRI's own version field).
KUBELET_API_VERSION = "0.1.0"
RUNTIME_NAME = "arktos-vm-runtime"


def _condition(call: Call, kind: str, c: Condition) -> Any:
    return call.pb.RuntimeCondition(
        type=kind, status=c.ok, reason="" if c.ok else c.reason, message=c.message
    )


class RuntimeServicer(SnapshotRpcs, VmOpsRpcs, ResizeRpcs, StatsRpcs, StreamingRpcs):
    def __init__(self, core: Core, pools: Pools) -> None:
        self.core = core
        self.pools = pools
        self._sandbox_msgs = convert.MessageCache(convert.sandbox)
        self._container_msgs = convert.MessageCache(convert.container)

    async def Version(self, request: Any, call: Call) -> Any:
        return call.pb.VersionResponse(
            version=KUBELET_API_VERSION,
            runtime_name=RUNTIME_NAME,
            runtime_version=__version__,
            runtime_api_version=call.api_version,
        )

    async def Status(self, request: Any, call: Call) -> Any:
        # Reading the CNI dir touches the disk: keep it off the serving loop.
        network = await self.pools.run(Kind.QUICK, self.core.network_condition)
        status = call.pb.RuntimeStatus(conditions=[
            _condition(call, "RuntimeReady", self.core.runtime_condition()),
            _condition(call, "NetworkReady", network),
        ])
        info = {}
        if request.verbose:
            info["config"] = json.dumps(self.core.settings.as_dict(), sort_keys=True)
            info["libvirtVersion"] = self.core.health.version
            info["stateSchemaVersion"] = str(self.core.state.store.schema_version)
            # sandboxes whose reconcile failed and is being retried: id -> reason
            info["reconcilePending"] = json.dumps(self.core.pods.reconcile_pending(),
                                                  sort_keys=True)
        return call.pb.StatusResponse(status=status, info=info)

    async def UpdateRuntimeConfig(self, request: Any, call: Call) -> Any:
        # The pod CIDR belongs to the CNI plugin's configuration; nothing to keep here.
        return call.pb.UpdateRuntimeConfigResponse()

    # -- sandboxes ------------------------------------------------------------------------

    async def RunPodSandbox(self, request: Any, call: Call) -> Any:
        cfg = request.config
        md = cfg.metadata
        sb = SandboxRecord(
            id=md.uid, name=md.name, namespace=md.namespace, uid=md.uid,
            tenant=getattr(md, "tenant", ""), attempt=md.attempt, state=SANDBOX_READY,
            created_at=now_ns(), hostname=cfg.hostname, log_directory=cfg.log_directory,
            runtime_handler=request.runtime_handler, labels=dict(cfg.labels),
            annotations=dict(cfg.annotations))
        sid = await self.pools.run(Kind.NETWORK, self.core.pods.run_sandbox, sb)
        return call.pb.RunPodSandboxResponse(pod_sandbox_id=sid)

    async def StopPodSandbox(self, request: Any, call: Call) -> Any:
        await self.pools.run(Kind.NETWORK, self.core.pods.stop_sandbox, request.pod_sandbox_id)
        return call.pb.StopPodSandboxResponse()

    async def RemovePodSandbox(self, request: Any, call: Call) -> Any:
        await self.pools.run(Kind.NETWORK, self.core.pods.remove_sandbox, request.pod_sandbox_id)
        return call.pb.RemovePodSandboxResponse()

    async def PodSandboxStatus(self, request: Any, call: Call) -> Any:
        sb = self.core.pods.sandbox(request.pod_sandbox_id)
        try:
            net: NetworkStatus | None = self.core.networks.status(sb.id)
        except NotFound:
            net = None  # stopped: its network is torn down
        return call.pb.PodSandboxStatusResponse(status=convert.sandbox_status(call, sb, net))

    async def ListPodSandbox(self, request: Any, call: Call) -> Any:
        f = request.filter
        every = convert.matches_all(f)
        sandboxes = [sb for sb in self.core.pods.sandboxes() if every or convert.matches(
            f, sb.id, call.pb.PodSandboxState.Value(sb.state), sb.labels)]
        return call.pb.ListPodSandboxResponse(
            items=self._sandbox_msgs.messages(call, sandboxes, every))

    # -- containers -----------------------------------------------------------------------

    async def CreateContainer(self, request: Any, call: Call) -> Any:
        cfg = request.config
        linux = cfg.linux.resources if cfg.HasField("linux") else None
        sandbox_annotations = (dict(request.sandbox_config.annotations)
                               if request.HasField("sandbox_config") else None)
        c = ContainerInput(
            name=cfg.metadata.name, attempt=cfg.metadata.attempt, image=cfg.image.image,
            log_path=cfg.log_path, labels=dict(cfg.labels), annotations=dict(cfg.annotations),
            envs=[(e.key, e.value) for e in cfg.envs], sandbox_annotations=sandbox_annotations,
            cpu_period=linux.cpu_period if linux else 0,
            cpu_quota=linux.cpu_quota if linux else 0,
            memory_limit_in_bytes=linux.memory_limit_in_bytes if linux else 0,
            tty=cfg.tty, stdin=cfg.stdin,
            mounts=[MountInput(m.container_path, m.host_path, m.readonly) for m in cfg.mounts],
            devices=[DeviceInput(d.container_path, d.host_path, d.permissions)
                     for d in cfg.devices])
        cid = await self.pools.run(Kind.LIBVIRT, self.core.pods.create_container,
                                   request.pod_sandbox_id, c)
        return call.pb.CreateContainerResponse(container_id=cid)

    async def StartContainer(self, request: Any, call: Call) -> Any:
        await self.pools.run(Kind.LIBVIRT, self.core.pods.start_container, request.container_id)
        return call.pb.StartContainerResponse()

    async def StopContainer(self, request: Any, call: Call) -> Any:
        if request.timeout < 0:
            raise InvalidArgument("StopContainer: field timeout must not be negative")
        await self.pools.run(Kind.LIBVIRT, self.core.pods.stop_container,
                             request.container_id, int(request.timeout))
        return call.pb.StopContainerResponse()

    async def RemoveContainer(self, request: Any, call: Call) -> Any:
        await self.pools.run(Kind.LIBVIRT, self.core.pods.remove_container, request.container_id)
        return call.pb.RemoveContainerResponse()

    async def ListContainers(self, request: Any, call: Call) -> Any:
        f = request.filter
        every = convert.matches_all(f) and not f.pod_sandbox_id
        containers = [c for c in self.core.pods.containers() if every or (
            (not f.pod_sandbox_id or c.sandbox_id == f.pod_sandbox_id)
            and convert.matches(f, c.id, call.pb.ContainerState.Value(c.state), c.labels))]
        return call.pb.ListContainersResponse(
            containers=self._container_msgs.messages(call, containers, every))

    async def ContainerStatus(self, request: Any, call: Call) -> Any:
        c = self.core.pods.container(request.container_id)
        # What the VM has now, from libvirt (the kubelet resizes until it sees its limits):
        # libvirt's kept answer when it holds, else read in the libvirt pool.
        resources = self.core.pods.resize.kept_resources(c)
        if resources is None:
            resources = await self.pools.run(Kind.LIBVIRT, self.core.pods.resize.resources, c)
        info = {}
        if request.verbose:  # the node CLI's `pods` and `console` read it
            vm = await self.pools.run(Kind.QUICK, self.core.vm_info, c.id)
            info["info"] = json.dumps(vm, sort_keys=True)
        return call.pb.ContainerStatusResponse(
            status=convert.container_status(call, c, resources), info=info)

    async def ReopenContainerLog(self, request: Any, call: Call) -> Any:
        self.core.pods.reopen_log(request.container_id)
        return call.pb.ReopenContainerLogResponse()

    # -- Arktos NICs (v1alpha2 only) ------------------------------------------------------

    @staticmethod
    def _nic(spec: Any) -> NicInfo:
        return NicInfo(name=spec.Name, subnet_name=spec.SubnetName, port_id=spec.PortId,
                       ip_address=spec.IpAddress, tag=spec.tag,
                       ipv6_enabled=spec.IsIpV6Enabled)

    async def AttachNetworkInterface(self, request: Any, call: Call) -> Any:
        await self.pools.run(Kind.NETWORK, self.core.pods.attach_nic, request.PodSandboxID,
                             self._nic(request.Nic), request.Nic.VPC)
        return call.pb.DeviceAttachDetachResponse()

    async def DetachNetworkInterface(self, request: Any, call: Call) -> Any:
        await self.pools.run(Kind.NETWORK, self.core.pods.detach_nic, request.PodSandboxID,
                             request.Nic.Name)
        return call.pb.DeviceAttachDetachResponse()

    async def ListNetworkInterfaces(self, request: Any, call: Call) -> Any:
        nics = await self.pools.run(Kind.NETWORK, self.core.pods.list_nics,
                                    request.PodSandboxId)
        return call.pb.ListDeviceResponse(Nics=[
            convert.nic_spec(call, n) for n in nics
            if n.state == "NIC_READY" and (not request.NicName or n.name == request.NicName)])
