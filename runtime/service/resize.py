"""Live vertical scaling: UpdateContainerResources as the Arktos kubelet drives it, and
the size ContainerStatus reports.

The kubelet sends the container's new CPU and memory limits and re-sends them until
ContainerStatus.resources reports them. A VM's vCPUs are ceil(cpu_quota / cpu_period);
its memory is memory_limit_in_bytes rounded up to MiB. A quota of 0 or -1 (no CPU limit)
leaves the vCPUs as they are, a memory limit of 0 the memory; a positive quota with a
zero or negative period, a negative period or memory, or memory below MIN_MEMORY_MIB is
INVALID_ARGUMENT. So is a size above the VM's headroom (the maxima its domain was defined
with: settings vm-max-vcpus and vm-max-memory-mib, see designer.headroom) or above the
per-pod quotas (max-pod-vcpus, max-pod-memory-mib, which may have been lowered since the
VM was made). Checked before anything changes; the domain is changed live and in its
config when it runs, in its config only when it does not (adapters/libvirt_resize).

What is reported is what libvirt says the VM has now: the vCPUs present and the memory the
guest holds (the balloon's actual size), libvirt's answer kept until libvirt reports a
change to the domain or this runtime makes one (adapters/libvirt_resize, `present`).
When that equals what the last request asked for, the request's own numbers are reported
back (so the kubelet's comparison ends); otherwise the VM's own size in the request's
units. The domain XML is the only place the size is stored, so it survives a restart of
the daemon; the container record keeps the last request (the units to report in) and the
configured size.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Protocol

from ..adapters.libvirt_resize import DomainResizer, VmResources
from ..checks import shown
from ..errors import InvalidArgument, NotFound, RuntimeError_
from .podstate import PodState
from .quotas import Quotas
from .records import CREATING, ContainerRecord
from .vm_size import MIN_MEMORY_MIB

log = logging.getLogger(__name__)

MIB = 1 << 20
KIB = 1 << 10
# The CFS period the kubelet uses; reported when the container never had one.
DEFAULT_CPU_PERIOD = 100_000


@dataclasses.dataclass(frozen=True)
class ResizeRequest:
    cpu_period: int = 0
    cpu_quota: int = 0
    memory_limit_in_bytes: int = 0


@dataclasses.dataclass(frozen=True)
class Target:
    vcpus: int | None  # None: unchanged
    memory_mib: int | None


@dataclasses.dataclass(frozen=True)
class Reported:
    """ContainerStatus.resources, in LinuxContainerResources' units."""

    cpu_period: int
    cpu_quota: int
    memory_limit_in_bytes: int


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def target(req: ResizeRequest) -> Target:
    """The vCPUs and memory a request asks for; INVALID_ARGUMENT for what cannot be one."""
    if req.cpu_period < 0:
        raise InvalidArgument(f"cpu_period {req.cpu_period} is negative", cpu_period=req.cpu_period)
    if req.cpu_quota < -1:
        raise InvalidArgument(f"cpu_quota {req.cpu_quota}: a quota is positive, or 0 or -1 "
                              "for no CPU limit", cpu_quota=req.cpu_quota)
    vcpus = None
    if req.cpu_quota > 0:
        if req.cpu_period == 0:
            raise InvalidArgument(f"cpu_quota {req.cpu_quota} with a zero cpu_period: the vCPU "
                                  "count is quota / period", cpu_quota=req.cpu_quota)
        vcpus = _ceil_div(req.cpu_quota, req.cpu_period)
    memory = None
    if req.memory_limit_in_bytes < 0:
        raise InvalidArgument(f"memory_limit_in_bytes {req.memory_limit_in_bytes} is negative")
    if req.memory_limit_in_bytes > 0:
        memory = _ceil_div(req.memory_limit_in_bytes, MIB)
        if memory < MIN_MEMORY_MIB:
            raise InvalidArgument(
                f"memory_limit_in_bytes {req.memory_limit_in_bytes} gives the VM {memory} MiB; "
                f"a VM has at least {MIN_MEMORY_MIB} MiB", memory_mib=memory)
    return Target(vcpus, memory)


def check_fits(t: Target, vm: VmResources, quotas: Quotas) -> None:
    """Within the domain's headroom and the per-pod quotas, or INVALID_ARGUMENT."""
    if t.vcpus is not None:
        if t.vcpus > vm.max_vcpus:
            raise InvalidArgument(
                f"the new CPU limit asks for {t.vcpus} vCPUs; this VM was defined with at most "
                f"{vm.max_vcpus} (its headroom: setting vm-max-vcpus, capped by max-pod-vcpus, "
                "applies to VMs created after it is set)", vcpus=t.vcpus)
        quotas.check_vcpus(t.vcpus, "the new CPU limit")
    if t.memory_mib is not None:
        most = vm.max_memory_kib // KIB
        if t.memory_mib > most:
            raise InvalidArgument(
                f"the new memory limit gives the VM {t.memory_mib} MiB; it was defined with at "
                f"most {most} MiB (its headroom: setting vm-max-memory-mib, capped by "
                "max-pod-memory-mib, applies to VMs created after it is set)",
                memory_mib=t.memory_mib)
        if t.memory_mib > quotas.max_memory_mib:
            raise InvalidArgument(
                f"the new memory limit gives the VM {t.memory_mib} MiB; a pod may have at most "
                f"{quotas.max_memory_mib} MiB (setting max-pod-memory-mib)",
                memory_mib=t.memory_mib)


class Present(Protocol):
    """What `reported` needs of a VM: adapters' VmResources or VmPresent."""

    @property
    def vcpus(self) -> int: ...
    @property
    def memory_kib(self) -> int: ...


def reported(rec: ContainerRecord, vm: Present) -> Reported:
    """What the VM has now, in the units of the container's last request."""
    period = rec.cpu_period if rec.cpu_period > 0 else DEFAULT_CPU_PERIOD
    if rec.cpu_quota > 0 and _ceil_div(rec.cpu_quota, period) == vm.vcpus:
        quota = rec.cpu_quota
    else:
        quota = vm.vcpus * period
    asked = rec.memory_limit_in_bytes
    if asked > 0 and _ceil_div(asked, MIB) * (MIB // KIB) == vm.memory_kib:
        memory = asked
    else:
        memory = vm.memory_kib * KIB
    return Reported(period, quota, memory)


class Resizer:
    def __init__(self, state: PodState, vms: DomainResizer, quotas: Quotas,
                 ensure_reconciled: Callable[[], None]) -> None:
        self._state = state
        self._vms = vms
        self._quotas = quotas
        self._ensure_reconciled = ensure_reconciled

    def _container(self, cid: str) -> ContainerRecord:
        rec = self._state.container(cid)
        if rec is None or rec.state == CREATING:
            raise NotFound(f"container {shown(cid)} not found")
        return rec

    def update(self, cid: str, req: ResizeRequest) -> None:
        t = target(req)  # before any lock or lookup
        self._ensure_reconciled()
        rec = self._container(cid)
        with self._state.pod_lock(rec.sandbox_id):
            rec = self._container(cid)
            if t.vcpus is None and t.memory_mib is None:
                return  # nothing asked
            vm = self._vms.read(cid, rec.sandbox_id)
            if vm is None:
                raise NotFound(f"the VM of container {cid} does not exist any more")
            check_fits(t, vm, self._quotas)
            # Each part recorded once libvirt took it: the units to report it in.
            if t.vcpus is not None:
                self._vms.apply(cid, rec.sandbox_id, t.vcpus, None)
                self._state.set_container(cid, cpu_period=req.cpu_period,
                                          cpu_quota=req.cpu_quota, vcpus=t.vcpus)
            if t.memory_mib is not None:
                self._vms.apply(cid, rec.sandbox_id, None, t.memory_mib)
                self._state.set_container(cid, memory_limit_in_bytes=req.memory_limit_in_bytes,
                                          memory_mib=t.memory_mib)
        log.info("container %s resized to %s vCPUs, %s MiB (%s)", cid, t.vcpus or "same",
                 t.memory_mib or "same", "live" if vm.active else "config only",
                 extra={"CONTAINER_ID": cid})

    def kept_resources(self, rec: ContainerRecord) -> Reported | None:
        """`resources` from libvirt's kept answer, without calling libvirt; None when no
        answer is kept (then call `resources`)."""
        vm = self._vms.kept(rec.id, rec.sandbox_id)
        return None if vm is None else reported(rec, vm)

    def resources(self, rec: ContainerRecord) -> Reported | None:
        """What the VM has now; None when libvirt cannot tell (then nothing is reported
        rather than a guess)."""
        try:
            vm = self._vms.present(rec.id, rec.sandbox_id)
        except RuntimeError_ as e:
            log.debug("size of %s unknown: %s", rec.id, e, extra={"CONTAINER_ID": rec.id})
            return None
        return None if vm is None else reported(rec, vm)
