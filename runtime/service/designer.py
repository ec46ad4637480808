"""The designer: every choice about a pod's VM, taken in one place, as Nova's designer does.

It turns a pod (its sandbox record), its VMConfig, the image and the settings into a
`VmDesign`: the container id, the files in the VM's directory, the root disk's size and the
DomainSpec. adapters/domain_xml.py only renders that spec and checks its structure; it
holds no defaults. Pure functions: no I/O here.
"""

from __future__ import annotations

import dataclasses
import uuid as uuid_mod
from pathlib import Path
from typing import Protocol

from ..adapters.domain_xml import DiskCache, DomainMetadata, DomainSpec, DomainType, InterfaceSpec
from ..adapters.libvirt_domains import domain_name
from ..config import Settings
from ..errors import InvalidArgument
from .quotas import Quotas
from .records import SandboxRecord
from .vm_size import MAX_VCPUS
from .vmconfig import ANN_SYSTEM_UUID, VMConfig
from .volumes import VolumePlan

# Container ids are name-based UUIDs of the sandbox id (the contract), in this namespace.
ID_NAMESPACE = uuid_mod.UUID("6f1d3c1e-7a43-5b0e-9d2f-8a5c4e3b2a10")
# The only machine type the template and the test guests are made for.
MACHINE = "pc"
# The overlay is this VM's alone and guests flush through virtio: the host page cache is
# safe and much faster under TCG than O_DIRECT ("none").
DISK_CACHE: DiskCache = "writeback"


class ImageFacts(Protocol):
    """What the designer needs of a pulled image."""

    @property
    def virtual_size(self) -> int: ...


@dataclasses.dataclass(frozen=True)
class VmFiles:
    """The files of one VM, all in its own directory."""

    dir: Path

    @property
    def root_disk(self) -> Path:
        return self.dir / "root.qcow2"

    @property
    def seed_iso(self) -> Path:
        return self.dir / "seed.iso"

    @property
    def console_log(self) -> Path:
        return self.dir / "console.log"

    @property
    def agent_socket(self) -> Path:
        return self.dir / "agent.sock"


@dataclasses.dataclass(frozen=True)
class VmDesign:
    files: VmFiles
    root_disk_bytes: int
    domain: DomainSpec


def container_id(sandbox_id: str, vm: VMConfig) -> str:
    """The pod's own SMBIOS UUID when it asks for one, else one derived from the sandbox,
    so a repeated CreateContainer for the same sandbox names the same VM.

    The two come from id spaces that cannot meet: a derived id is a name-based SHA-1 UUID
    (version 5, RFC 4122 variant) of the pod UID, and a pod knowing another pod's UID can
    compute it; so a requested UUID (libvirt makes the domain UUID equal the SMBIOS one)
    must be of any other version (random version 4 is what one generates). Otherwise a
    pod could take the id another pod derives to and make that pod's CreateContainer
    fail ALREADY_EXISTS.
    """
    if vm.system_uuid is None:
        return str(uuid_mod.uuid5(ID_NAMESPACE, sandbox_id))
    requested = uuid_mod.UUID(vm.system_uuid)
    if requested.variant == uuid_mod.RFC_4122 and requested.version == 5:
        raise InvalidArgument(
            f"{ANN_SYSTEM_UUID} {vm.system_uuid}: a name-based (version 5) UUID is reserved "
            "for the ids the runtime derives from pod UIDs; use a random (version 4) UUID")
    return vm.system_uuid


def headroom(vm: VMConfig, settings: Settings, quotas: Quotas | None) -> tuple[int, int]:
    """The most vCPUs and MiB of memory the VM can be resized to live: the settings
    vm_max_vcpus (0: the vCPU quota) and vm_max_memory_mib (0: none), capped by the
    quotas (and MAX_VCPUS), never below the VM's own size."""
    quota_vcpus = quotas.max_vcpus if quotas is not None else vm.vcpus
    quota_mib = quotas.max_memory_mib if quotas is not None else vm.memory_mib
    vcpus = min(settings.vm_max_vcpus or quota_vcpus, quota_vcpus, MAX_VCPUS)
    mib = min(settings.vm_max_memory_mib or vm.memory_mib, quota_mib)
    return max(vm.vcpus, vcpus), max(vm.memory_mib, mib)


def design(pod: SandboxRecord, cid: str, vm: VMConfig, image: ImageFacts, settings: Settings,
           vm_dir: Path, interfaces: tuple[InterfaceSpec, ...], instance: str = "",
           quotas: Quotas | None = None, volumes: VolumePlan | None = None) -> VmDesign:
    files = VmFiles(vm_dir)
    # TCG when KVM is disabled (no usable /dev/kvm); host-model CPUs only mean anything
    # under KVM, so TCG gets QEMU's default CPU.
    domain_type: DomainType = "qemu" if settings.disable_kvm else "kvm"
    max_vcpus, max_memory_mib = headroom(vm, settings, quotas)
    spec = DomainSpec(
        name=domain_name(cid), uuid=cid, vcpus=vm.vcpus, memory_mib=vm.memory_mib,
        root_disk=files.root_disk, console_log=files.console_log,
        guest_agent_socket=files.agent_socket,
        metadata=DomainMetadata(sandbox_id=pod.id, pod_name=pod.name,
                                pod_namespace=pod.namespace, pod_tenant=pod.tenant,
                                attempt=pod.attempt, instance=instance),
        seed_iso=files.seed_iso, domain_type=domain_type,
        cpu_model=vm.cpu_model if domain_type == "kvm" else "",
        machine=MACHINE, disk_bus=vm.disk_driver, disk_cache=DISK_CACHE,
        system_uuid=vm.system_uuid, interfaces=interfaces, emulator=None,
        max_vcpus=max_vcpus, max_memory_mib=max_memory_mib,
        disks=volumes.disks if volumes else (),
        filesystems=volumes.filesystems if volumes else ())
    # The root disk is never smaller than the image; the pod may ask for more.
    return VmDesign(files, max(image.virtual_size, vm.root_volume_bytes), spec)
