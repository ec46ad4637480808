"""CreateContainer: admitting a pod's VM and making it (its record, files and domain).

The checks come first and read only (annotations, image, quotas, a VM uuid nobody holds,
volumes), so bad input leaves nothing; then the CREATING record, written before any side
effect, so that after kill -9 reconcile undoes a create cut short; then the VM's directory,
root overlay, new disks, seed ISO and domain definition, each a fault point.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from ..adapters import qemu_img
from ..adapters.console_log import parts_below
from ..adapters.domain_xml import render_domain
from ..adapters.host_volumes import create_disk
from ..adapters.libvirt_domains import Domains
from ..adapters.seed_iso import write_seed_iso
from ..checks import shown
from ..config import Settings
from ..errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from . import designer, faults
from .events import now_ns
from .images import ImageStore
from .pod_network import PodNetworks
from .podstate import PodState
from .quotas import Quotas
from .records import CREATED, CREATING, SANDBOX_READY, ContainerRecord
from .seed import render_seed
from .vmconfig import parse_vm_config
from .volumes import DeviceInput, MountInput, plan_volumes

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ContainerInput:
    name: str
    attempt: int
    image: str
    log_path: str
    labels: dict[str, str]
    annotations: dict[str, str]
    envs: Sequence[tuple[str, str]]
    sandbox_annotations: dict[str, str] | None
    cpu_period: int = 0
    cpu_quota: int = 0
    memory_limit_in_bytes: int = 0
    tty: bool = False
    stdin: bool = False
    mounts: Sequence[MountInput] = ()
    devices: Sequence[DeviceInput] = ()




def log_file(root: str, directory: str, relative: str) -> str:
    """The container's log file; both parts come from the kubelet and are checked. It must
    lie below `root` (the pod logs directory), where the console follower writes."""
    if not directory or not relative:
        return ""
    for what, value in (("log_directory", directory), ("log_path", relative)):
        if "\0" in value or ".." in Path(value).parts:
            raise InvalidArgument(f"{what} {shown(value)} must not contain NUL or '..'")
    if not os.path.isabs(directory) or os.path.isabs(relative):
        raise InvalidArgument("log_directory must be absolute and log_path relative to it")
    path = os.path.normpath(os.path.join(directory, relative))
    if parts_below(Path(root), Path(path)) is None:
        raise InvalidArgument(f"log_directory {shown(directory)} is not below the pod logs "
                              f"directory {root}")
    return path


class ContainerCreation:
    def __init__(self, settings: Settings, state: PodState, domains: Domains,
                 images: ImageStore, networks: PodNetworks, vm_root: Path,
                 template_dirs: Sequence[Path], quotas: Quotas) -> None:
        self._settings = settings
        self._state = state
        self._domains = domains
        self._images = images
        self._networks = networks
        self._vm_root = vm_root
        self._templates = list(template_dirs)
        self._quotas = quotas

    def create(self, sandbox_id: str, c: ContainerInput) -> str:
        """The VM's checks, then its record, then its files and domain; on any failure
        what was made is undone (a crash is undone by reconcile from the CREATING record)."""
        with self._state.pod_lock(sandbox_id):
            sb = self._state.sandbox(sandbox_id)
            if sb is None:
                raise NotFound(f"pod sandbox {shown(sandbox_id)} not found")
            if sb.state != SANDBOX_READY:
                raise FailedPrecondition(f"pod sandbox {sandbox_id} is not ready")
            for other in self._state.containers_of(sandbox_id):
                if other.state != CREATING:
                    return other.id  # one VM per sandbox: a repeated create gets the same id
            annotations = c.sandbox_annotations if c.sandbox_annotations is not None \
                else sb.annotations
            vm = parse_vm_config(annotations, cpu_quota=c.cpu_quota, cpu_period=c.cpu_period,
                                 memory_limit_bytes=c.memory_limit_in_bytes,
                                 default_memory_mib=self._settings.default_memory_mib)
            image = self._images.status(c.image)
            if image is None:
                raise NotFound(f"image {c.image[:200]!r} is not pulled")
            self._quotas.check_vm(
                vm, annotations, "the container's memory limit" if c.memory_limit_in_bytes > 0
                else f"the default memory (setting default-memory-mib = "
                f"{self._settings.default_memory_mib})", image.virtual_size)
            cid = designer.container_id(sandbox_id, vm)
            clash = self._state.container(cid)
            if clash is not None:
                raise AlreadyExists(f"VM uuid {cid} is already used by pod sandbox "
                                    f"{clash.sandbox_id}")
            if self._domains.known(cid):
                # Another runtime's, an orphan, or anyone's: defining it would replace that
                # domain's definition, and a rollback or a remove would undefine it.
                raise AlreadyExists(f"VM uuid {cid} is already used by a libvirt domain "
                                    "this runtime does not hold")
            # Checked and read before the record: a bad volume leaves nothing behind.
            volumes = plan_volumes(c.mounts, c.devices, vm.extra_disks, self._settings,
                                   self._vm_root / cid, vm.disk_driver)
            rec = ContainerRecord(
                id=cid, sandbox_id=sandbox_id, name=c.name, attempt=c.attempt,
                state=CREATING, created_at=now_ns(), image=c.image, image_ref=image.id,
                vm_dir=str(self._vm_root / cid),
                log_path=log_file(self._settings.pod_logs_dir, sb.log_directory, c.log_path),
                vcpus=vm.vcpus, memory_mib=vm.memory_mib, cpu_period=c.cpu_period,
                cpu_quota=c.cpu_quota, memory_limit_in_bytes=c.memory_limit_in_bytes,
                tty=c.tty, stdin=c.stdin, labels=c.labels, annotations=c.annotations)
            # Under the image's lock, which RemoveImage and the cache's eviction take to ask
            # whether the image is in use: once the record is in, it pins the image
            # (image_in_use); if one of them came first, the bytes are gone.
            with self._images.holding(image.digest):
                self._state.put_container(rec)  # before any side effect: a crash is undone
                present = self._images.status(image.id) is not None
            try:
                faults.point("create_container.recorded", sandbox_id)
                if not present:
                    raise NotFound(f"image {c.image[:200]!r} was removed meanwhile")
                self._images.mark_used(image.digest)
                net = self._networks.network(sandbox_id)
                plan = designer.design(sb, cid, vm, image, self._settings, Path(rec.vm_dir),
                                       net.interfaces, self._domains.instance,
                                       self._quotas, volumes)
                plan.files.dir.mkdir(mode=0o711)
                os.chmod(plan.files.dir, 0o711)  # whatever the umask: QEMU reaches its disks
                faults.point("create_container.dir", sandbox_id)
                qemu_img.create_overlay(image.path, image.format, plan.files.root_disk,
                                     plan.root_disk_bytes)
                for path, size in volumes.new_disks:
                    create_disk(path, size)
                faults.point("create_container.overlay", sandbox_id)
                seed = render_seed(vm, instance_id=cid, hostname=sb.hostname or sb.name,
                                   env=c.envs, network=net.network_info,
                                   template_dirs=self._templates, volumes=volumes)
                write_seed_iso(seed, vm.cloud_init_type, plan.files.seed_iso)
                faults.point("create_container.seed", sandbox_id)
                self._domains.define_new(cid, render_domain(plan.domain, self._templates))
                faults.point("create_container.defined", sandbox_id)
            except BaseException:
                self.undo(rec)
                raise
            self._state.set_container(cid, state=CREATED)
        log.info("container %s (VM %s) created in sandbox %s", c.name, cid, sandbox_id,
                 extra={"CONTAINER_ID": cid, "POD_SANDBOX_ID": sandbox_id})
        return cid

    def undo(self, rec: ContainerRecord) -> None:
        """Removes whatever part of a create was done; the domain was never started."""
        try:
            self._domains.undefine(rec.id, rec.sandbox_id)
        finally:
            shutil.rmtree(rec.vm_dir, ignore_errors=True)
            self._state.delete_container(rec.id)
