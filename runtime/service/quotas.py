"""Quotas: how many pods one node holds, and how big one pod's VM may be.

The settings (config.py), each checked before anything is made for the pod:

- max_pods: sandboxes held at once (110, the kubelet's own default maxPods; 0: no limit).
  Every sandbox record counts, ready or stopped, until RemovePodSandbox; a RunPodSandbox
  over it is RESOURCE_EXHAUSTED before any namespace or record is made. The count and the
  new record are one step (PodState.add_sandbox), so N parallel calls against K free
  places admit exactly K.
- max_pod_vcpus (0: the host's CPUs), max_pod_memory_mib (0: the host's memory) and
  max_pod_root_volume_gib (256; 0: no limit below vm_size's 1 PiB sanity cap): one VM's
  size. Over one: INVALID_ARGUMENT naming what asked (annotation, container limit,
  default, image) and the setting, at CreateContainer before its record, directory or
  overlay; and already at RunPodSandbox, before the network, for the size annotations
  (VirtletVCPUCount, VirtletRootVolumeSize) a pod can never run with. A malformed
  annotation is left to CreateContainer, where the contract reports it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from ..config import Settings
from ..errors import InvalidArgument, ResourceExhausted
from .vm_size import parse_root_volume, parse_vcpu_count
from .vmconfig import ANN_ROOT_VOLUME_SIZE, ANN_VCPU_COUNT, VMConfig

GIB = 1 << 30
MIB = 1 << 20


def host_cpus() -> int:
    return os.cpu_count() or 1


def host_memory_mib() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // MIB


def _size(n: int) -> str:
    for unit, scale in (("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", GIB), ("MiB", MIB)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n} bytes"


@dataclasses.dataclass(frozen=True)
class Quotas:
    max_pods: int  # 0: no limit
    max_vcpus: int
    max_memory_mib: int
    max_root_bytes: int  # 0: no limit

    @classmethod
    def from_settings(cls, s: Settings, cpus: int | None = None,
                      memory_mib: int | None = None) -> Quotas:
        """The settings, with 0 for vCPUs and memory meaning the host's (`cpus` and
        `memory_mib` stand for the host in tests)."""
        return cls(
            max_pods=s.max_pods,
            max_vcpus=s.max_pod_vcpus or (cpus if cpus is not None else host_cpus()),
            max_memory_mib=s.max_pod_memory_mib or (
                memory_mib if memory_mib is not None else host_memory_mib()),
            max_root_bytes=s.max_pod_root_volume_gib * GIB)

    def admit_pod(self, held: int) -> None:
        """RunPodSandbox of a new sandbox while `held` are held: refused when full."""
        if self.max_pods and held >= self.max_pods:
            raise ResourceExhausted(
                f"this node holds {held} pod sandboxes, its maximum (setting max-pods = "
                f"{self.max_pods}); remove a pod first", max_pods=self.max_pods)

    def check_vcpus(self, vcpus: int, source: str) -> None:
        if vcpus > self.max_vcpus:
            raise InvalidArgument(
                f"{source} asks for {vcpus} vCPUs; a pod may have at most {self.max_vcpus} "
                "(setting max-pod-vcpus; 0 means the host's CPUs)", vcpus=vcpus)

    def check_root(self, size: int, source: str) -> None:
        if self.max_root_bytes and size > self.max_root_bytes:
            raise InvalidArgument(
                f"{source} asks for a root disk of {_size(size)}; a pod may have at most "
                f"{_size(self.max_root_bytes)} (setting max-pod-root-volume-gib)",
                root_disk_bytes=size)

    def check_annotations(self, annotations: Mapping[str, str]) -> None:
        """At RunPodSandbox: the size annotations that parse, against the quotas (one that
        does not parse is CreateContainer's to report, as the contract says)."""
        for name, parse, check in ((ANN_VCPU_COUNT, parse_vcpu_count, self.check_vcpus),
                                   (ANN_ROOT_VOLUME_SIZE, parse_root_volume,
                                    self.check_root)):
            raw = annotations.get(name)
            if not isinstance(raw, str) or not raw.strip():
                continue
            try:
                value = parse(raw)
            except ValueError:
                continue
            check(value, f"annotation {name}")

    def check_vm(self, vm: VMConfig, annotations: Mapping[str, str], memory_source: str,
                 image_size: int) -> None:
        """At CreateContainer, before anything is made: the VM as designed (its root disk
        is the larger of the image and VirtletRootVolumeSize)."""
        given = bool((annotations.get(ANN_VCPU_COUNT) or "").strip())
        self.check_vcpus(vm.vcpus, f"annotation {ANN_VCPU_COUNT}" if given
                         else "the container's CPU limit")
        if vm.memory_mib > self.max_memory_mib:
            raise InvalidArgument(
                f"{memory_source} gives the VM {vm.memory_mib} MiB of memory; a pod may have "
                f"at most {self.max_memory_mib} MiB (setting max-pod-memory-mib; 0 means "
                "the host's memory)", memory_mib=vm.memory_mib)
        if vm.root_volume_bytes >= image_size:
            self.check_root(vm.root_volume_bytes, f"annotation {ANN_ROOT_VOLUME_SIZE}")
        else:
            self.check_root(image_size, "the image's virtual size")
