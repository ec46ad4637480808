"""Sandboxes and their one VM container: lifecycle, idempotence, rollback, reconciliation.

Memory (two dicts) answers List and Status; libvirt's lifecycle events keep it current.
Every change is written to the store before the side effect it records, so after kill -9
startup can tell what was half-made (a CREATING record) from what exists. Mutations of one
pod are serialised by a per-pod lock; reads take only the short memory lock. Console
methods are never called with the memory lock held (the console thread takes it to save
offsets).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading
import time
import uuid as uuid_mod
from collections.abc import Sequence
from pathlib import Path

from ..adapters import disks
from ..adapters.cloudinit import render_seed, write_seed_iso
from ..adapters.console_log import ConsoleLogs
from ..adapters.domain_xml import DomainMetadata, DomainSpec, render_domain
from ..adapters.image_store import ImageStore
from ..adapters.libvirt_domains import STOP_REASONS, Domains, LifecycleEvent, domain_name
from ..config import Settings
from ..errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from .network_state import NicStatus
from .nic_spec import ANN_CNI_ARGS, ANN_NICS, ANN_VPC, NicInfo
from .pod_network import PodNetworks
from .records import (
    CREATED,
    CREATING,
    EXITED,
    RUNNING,
    SANDBOX_NOTREADY,
    SANDBOX_READY,
    ContainerRecord,
    SandboxRecord,
    check_hostname,
    check_id,
)
from .store import Store
from .vmconfig import parse_vm_config

log = logging.getLogger(__name__)

# Container ids are name-based UUIDs of the sandbox id (the contract), in this namespace.
ID_NAMESPACE = uuid_mod.UUID("6f1d3c1e-7a43-5b0e-9d2f-8a5c4e3b2a10")
STOP_AFTER_DESTROY = 10.0  # seconds to wait for libvirt's STOPPED event after destroy
# The annotations CNI needs at RunPodSandbox; the others are checked at CreateContainer,
# where the contract says a malformed one fails.
NETWORK_ANNOTATIONS = (ANN_VPC, ANN_NICS, ANN_CNI_ARGS)


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


def now_ns() -> int:
    return time.time_ns()


def _log_file(directory: str, relative: str) -> str:
    """The container's log file; both parts come from the kubelet and are checked."""
    if not directory or not relative:
        return ""
    for what, value in (("log_directory", directory), ("log_path", relative)):
        if "\0" in value or ".." in Path(value).parts:
            raise InvalidArgument(f"{what} {value[:100]!r} must not contain NUL or '..'")
    if not os.path.isabs(directory) or os.path.isabs(relative):
        raise InvalidArgument("log_directory must be absolute and log_path relative to it")
    return os.path.normpath(os.path.join(directory, relative))


class Pods:
    def __init__(self, settings: Settings, store: Store, domains: Domains, images: ImageStore,
                 networks: PodNetworks, vm_root: Path, template_dirs: Sequence[Path]) -> None:
        self.settings = settings
        self.networks = networks
        self._store = store
        self._domains = domains
        self._images = images
        self._vm_root = vm_root
        self._templates = list(template_dirs)
        self._sandboxes: dict[str, SandboxRecord] = {}
        self._containers: dict[str, ContainerRecord] = {}
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._pod_locks: dict[str, threading.Lock] = {}
        self._reconciled = False
        self._reconcile_lock = threading.Lock()
        vm_root.mkdir(mode=0o711, parents=True, exist_ok=True)
        self.console = ConsoleLogs(self._save_console_offset)
        for data in store.all("sandboxes"):
            sb = SandboxRecord.from_dict(data)
            self._sandboxes[sb.id] = sb
        for data in store.all("containers"):
            c = ContainerRecord.from_dict(data)
            self._containers[c.id] = c
        domains.watch(self._on_event)

    def _pod_lock(self, sandbox_id: str) -> threading.Lock:
        """The lock serialising mutations of one pod. Made under the memory lock, so two
        threads asking at once get the same one; kept after removal, since a waiter may
        still hold it (one small object per pod ever seen)."""
        with self._lock:
            return self._pod_locks.setdefault(sandbox_id, threading.Lock())

    # -- persistence ----------------------------------------------------------------------

    def _put(self, rec: SandboxRecord | ContainerRecord) -> None:
        if isinstance(rec, SandboxRecord):
            self._store.put("sandboxes", rec.id, rec.to_dict())
        else:
            self._store.put("containers", rec.id, rec.to_dict(), sandbox_id=rec.sandbox_id)

    def _save_console_offset(self, cid: str, offset: int) -> None:
        with self._lock:
            rec = self._containers.get(cid)
            if rec is not None:
                rec.console_offset = offset
                self._put(rec)

    # -- startup --------------------------------------------------------------------------

    def reconcile(self) -> None:
        """Brings memory in line with libvirt, once, when libvirt is first reachable.

        Never destroys a VM: a domain of ours without a record is logged and left alone;
        a record whose domain vanished shows the container EXITED.
        """
        doms = {d.uuid: d for d in self._domains.ours()}
        for rec in list(self._containers.values()):
            dom = doms.pop(rec.id, None)
            if rec.state == CREATING:
                if dom is not None:
                    log.info("finishing %s: its domain was defined before a restart", rec.id)
                    self._set(rec, state=CREATED)
                else:
                    log.info("rolling back %s: created only in part before a restart", rec.id)
                    self._undo_create(rec)
                continue
            if dom is None:
                if rec.state in (CREATED, RUNNING):
                    self._set(rec, state=EXITED, finished_at=rec.finished_at or now_ns(),
                              exit_code=1, reason="DomainMissing",
                              message="the VM's libvirt domain no longer exists")
                continue
            if dom.state.state in ("running", "paused"):
                if rec.state != RUNNING:
                    self._set(rec, state=RUNNING, started_at=rec.started_at or now_ns())
                self._follow_console(rec)
            elif rec.state == RUNNING:
                code, reason = STOP_REASONS.get(dom.state.stop_reason, STOP_REASONS["unknown"])
                self._set(rec, state=EXITED, finished_at=now_ns(), exit_code=code,
                          reason=reason, message="stopped while the runtime was down")
                # Copy what it printed after our last saved offset, then let go of it.
                self._follow_console(rec)
                self.console.forget(rec.id)
        for uuid in doms:
            log.warning("domain %s has our prefix but no record here; leaving it untouched",
                        domain_name(uuid), extra={"CONTAINER_ID": uuid})
        # A network without a sandbox record: a RunPodSandbox whose CNI ADD failed and whose
        # undo (CNI DEL) failed too. No RPC names it any more; its DEL releases the address.
        for sid in set(self.networks.sandbox_ids()) - set(self._sandboxes):
            log.warning("tearing down the network of unknown sandbox %s (orphan rule: no "
                        "sandbox record)", sid, extra={"POD_SANDBOX_ID": sid})
            self.networks.teardown(sid)
        self.networks.restore()
        self._reconciled = True
        log.info("reconciled %d sandboxes and %d containers with libvirt",
                 len(self._sandboxes), len(self._containers))

    def ensure_reconciled(self) -> None:
        """Called before every mutation and on each healthy libvirt probe."""
        if self._reconciled:
            return
        with self._reconcile_lock:
            if not self._reconciled:
                self.reconcile()

    def _set(self, rec: ContainerRecord, **changes: object) -> None:
        with self._lock:
            for k, v in changes.items():
                setattr(rec, k, v)
            self._put(rec)
            self._changed.notify_all()

    # -- events ---------------------------------------------------------------------------

    def _on_event(self, ev: LifecycleEvent) -> None:
        stopped = False
        with self._lock:
            rec = self._containers.get(ev.uuid)
            if rec is None or rec.state == CREATING:
                return
            if ev.started and rec.state != RUNNING:
                self._set(rec, state=RUNNING, started_at=now_ns(), finished_at=0)
            elif ev.stopped and rec.state == RUNNING:
                code, reason = STOP_REASONS.get(ev.stop_reason, STOP_REASONS["unknown"])
                if rec.stop_requested and code == 137:
                    reason = "Killed"  # the stop timeout ran out
                self._set(rec, state=EXITED, finished_at=now_ns(), exit_code=code,
                          reason=reason, message=f"VM stopped ({ev.stop_reason})")
                stopped = True
        if stopped:
            log.info("VM of %s stopped: %s", ev.uuid, ev.stop_reason,
                     extra={"CONTAINER_ID": ev.uuid})
            self.console.flush(ev.uuid)

    # -- sandboxes ------------------------------------------------------------------------

    def run_sandbox(self, sb: SandboxRecord) -> str:
        check_id("pod uid", sb.id)
        if sb.hostname:
            check_hostname(sb.hostname)
        net_config = parse_vm_config({k: v for k, v in sb.annotations.items()
                                      if k in NETWORK_ANNOTATIONS})
        with self._pod_lock(sb.id):
            existing = self._sandboxes.get(sb.id)
            if existing is not None and existing.state == SANDBOX_READY:
                return existing.id  # a repeated call: the same answer
            # New, or stopped before: sandbox id = pod UID, so the kubelet's next attempt
            # for the same pod comes back here. It gets a fresh network; its VM (if any)
            # keeps its disk and is started again by StartContainer.
            if existing is not None:
                sb.created_at = existing.created_at
            sb.state = SANDBOX_NOTREADY  # until its network is up
            self._put(sb)
            with self._lock:
                self._sandboxes[sb.id] = sb
            try:
                self.networks.setup(sb.id, sb.tenant, sb.namespace, sb.name, net_config)
            except BaseException:
                if existing is None:
                    self._store.delete("sandboxes", sb.id)
                    with self._lock:
                        self._sandboxes.pop(sb.id, None)
                raise
            sb.state = SANDBOX_READY
            self._put(sb)
        log.info("sandbox %s for pod %s/%s/%s is ready", sb.id, sb.tenant, sb.namespace,
                 sb.name, extra={"POD_SANDBOX_ID": sb.id})
        return sb.id

    def sandbox(self, sandbox_id: str) -> SandboxRecord:
        with self._lock:
            sb = self._sandboxes.get(sandbox_id)
        if sb is None:
            raise NotFound(f"pod sandbox {sandbox_id} not found")
        return sb

    def sandboxes(self) -> list[SandboxRecord]:
        with self._lock:
            return list(self._sandboxes.values())

    def stop_sandbox(self, sandbox_id: str) -> None:
        sb = self._sandboxes.get(sandbox_id)
        if sb is None:
            return  # already gone: success, as the CRI requires
        for c in self.containers_of(sandbox_id):
            self.stop_container(c.id, 0)
        with self._pod_lock(sandbox_id):
            with self._lock:
                if sb.state != SANDBOX_NOTREADY:
                    sb.state = SANDBOX_NOTREADY
                    self._put(sb)
            self.networks.teardown(sandbox_id)

    def remove_sandbox(self, sandbox_id: str) -> None:
        if sandbox_id not in self._sandboxes:
            return
        for c in self.containers_of(sandbox_id):
            self.remove_container(c.id)
        with self._pod_lock(sandbox_id):
            self.networks.teardown(sandbox_id)
            self._store.delete("sandboxes", sandbox_id)
            with self._lock:
                self._sandboxes.pop(sandbox_id, None)
        log.info("sandbox %s removed", sandbox_id, extra={"POD_SANDBOX_ID": sandbox_id})

    # -- containers -----------------------------------------------------------------------

    def containers(self) -> list[ContainerRecord]:
        with self._lock:
            return [c for c in self._containers.values() if c.state != CREATING]

    def containers_of(self, sandbox_id: str) -> list[ContainerRecord]:
        with self._lock:
            return [c for c in self._containers.values() if c.sandbox_id == sandbox_id]

    def container(self, cid: str) -> ContainerRecord:
        with self._lock:
            rec = self._containers.get(cid)
        if rec is None or rec.state == CREATING:
            raise NotFound(f"container {cid} not found")
        return rec

    def image_in_use(self, digest: str) -> bool:
        with self._lock:
            return any(c.image_ref == f"sha256:{digest}" for c in self._containers.values())

    def create_container(self, sandbox_id: str, c: ContainerInput) -> str:
        self.ensure_reconciled()
        with self._pod_lock(sandbox_id):
            sb = self.sandbox(sandbox_id)
            if sb.state != SANDBOX_READY:
                raise FailedPrecondition(f"pod sandbox {sandbox_id} is not ready")
            for other in self.containers_of(sandbox_id):
                if other.state != CREATING:
                    return other.id  # one VM per sandbox: a repeated create gets the same id
            annotations = c.sandbox_annotations if c.sandbox_annotations is not None \
                else sb.annotations
            vm = parse_vm_config(annotations, cpu_quota=c.cpu_quota, cpu_period=c.cpu_period,
                                 memory_limit_bytes=c.memory_limit_in_bytes,
                                 default_memory_mib=self.settings.default_memory_mib)
            image = self._images.status(c.image)
            if image is None:
                raise NotFound(f"image {c.image[:200]!r} is not pulled")
            cid = vm.system_uuid or str(uuid_mod.uuid5(ID_NAMESPACE, sandbox_id))
            with self._lock:
                clash = self._containers.get(cid)
            if clash is not None:
                raise AlreadyExists(f"VM uuid {cid} is already used by pod sandbox "
                                    f"{clash.sandbox_id}")
            rec = ContainerRecord(
                id=cid, sandbox_id=sandbox_id, name=c.name, attempt=c.attempt,
                state=CREATING, created_at=now_ns(), image=c.image, image_ref=image.id,
                vm_dir=str(self._vm_root / cid), log_path=_log_file(sb.log_directory,
                                                                     c.log_path),
                vcpus=vm.vcpus, memory_mib=vm.memory_mib, cpu_period=c.cpu_period,
                cpu_quota=c.cpu_quota, memory_limit_in_bytes=c.memory_limit_in_bytes,
                labels=c.labels, annotations=c.annotations)
            self._put(rec)  # before any side effect: a crash from here on is rolled back
            with self._lock:
                self._containers[cid] = rec
            try:
                # The record now pins the image (image_in_use); a RemoveImage that ran
                # between the lookup above and here has taken the bytes away.
                if self._images.status(image.id) is None:
                    raise NotFound(f"image {c.image[:200]!r} was removed meanwhile")
                vm_dir = Path(rec.vm_dir)
                vm_dir.mkdir(mode=0o711)
                disks.create_overlay(image.path, image.format, vm_dir / "root.qcow2",
                                     max(image.virtual_size, vm.root_volume_bytes))
                net = self.networks.network(sandbox_id)
                seed = render_seed(vm, instance_id=cid, hostname=sb.hostname or sb.name,
                                   env=c.envs, network=net.network_info,
                                   template_dirs=self._templates)
                write_seed_iso(seed, vm.cloud_init_type, vm_dir / "seed.iso")
                spec = DomainSpec(
                    name=domain_name(cid), uuid=cid, vcpus=vm.vcpus, memory_mib=vm.memory_mib,
                    root_disk=vm_dir / "root.qcow2", console_log=vm_dir / "console.log",
                    guest_agent_socket=vm_dir / "agent.sock",
                    metadata=DomainMetadata(sandbox_id=sandbox_id, pod_name=sb.name,
                                            pod_namespace=sb.namespace, pod_tenant=sb.tenant,
                                            attempt=sb.attempt),
                    seed_iso=vm_dir / "seed.iso",
                    domain_type="qemu" if self.settings.disable_kvm else "kvm",
                    cpu_model=vm.cpu_model, disk_bus=vm.disk_driver,
                    system_uuid=vm.system_uuid, interfaces=net.interfaces)
                self._domains.define(render_domain(spec, self._templates))
            except BaseException:
                self._undo_create(rec)
                raise
            self._set(rec, state=CREATED)
        log.info("container %s (VM %s) created in sandbox %s", c.name, cid, sandbox_id,
                 extra={"CONTAINER_ID": cid, "POD_SANDBOX_ID": sandbox_id})
        return cid

    def _undo_create(self, rec: ContainerRecord) -> None:
        """Removes whatever part of a create was done; the domain was never started."""
        try:
            self._domains.undefine(rec.id)
        finally:
            shutil.rmtree(rec.vm_dir, ignore_errors=True)
            self._store.delete("containers", rec.id)
            with self._lock:
                self._containers.pop(rec.id, None)

    def _follow_console(self, rec: ContainerRecord) -> None:
        if rec.log_path:
            self.console.follow(rec.id, Path(rec.vm_dir) / "console.log", Path(rec.log_path),
                                rec.console_offset)

    def start_container(self, cid: str) -> None:
        self.ensure_reconciled()
        rec = self.container(cid)
        with self._pod_lock(rec.sandbox_id):
            if rec.state == RUNNING:
                return
            if self.sandbox(rec.sandbox_id).state != SANDBOX_READY:
                raise FailedPrecondition(f"pod sandbox {rec.sandbox_id} is stopped")
            previous = dataclasses.replace(rec)

            def undo() -> None:
                self._set(rec, **{f.name: getattr(previous, f.name)
                                  for f in dataclasses.fields(previous)})

            self._set(rec, state=RUNNING, started_at=now_ns(), finished_at=0, exit_code=0,
                      reason="", message="", stop_requested=False)
            self._follow_console(rec)
            try:
                self.networks.before_vm_start(rec.sandbox_id)
                self._domains.start(cid)
            except BaseException:
                undo()
                raise
            try:
                self.networks.after_vm_started(rec.sandbox_id)
            except BaseException:
                # This call started the VM but could not bridge its taps: a VM nobody can
                # reach, that memory would call RUNNING so a retry would do nothing. Undo
                # this start (our own, seconds old) and let the kubelet retry.
                self._domains.destroy(cid)
                self._wait_state(rec, STOP_AFTER_DESTROY)
                undo()
                raise
        log.info("container %s started", cid, extra={"CONTAINER_ID": cid})

    def _wait_state(self, rec: ContainerRecord, timeout: float) -> bool:
        """Waits for the container to leave RUNNING (a libvirt event); True if it did."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while rec.state == RUNNING:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True

    def stop_container(self, cid: str, timeout: int) -> None:
        self.ensure_reconciled()
        with self._lock:
            rec = self._containers.get(cid)
        if rec is None or rec.state == CREATING:
            return  # gone: success
        with self._pod_lock(rec.sandbox_id):
            if rec.state != RUNNING:
                return
            self._set(rec, stop_requested=True)
            if timeout > 0:
                self._domains.shutdown(cid)
                if self._wait_state(rec, timeout):
                    return
                log.info("VM %s did not power off within %d s; destroying it", cid, timeout,
                         extra={"CONTAINER_ID": cid})
            self._domains.destroy(cid)
            if not self._wait_state(rec, STOP_AFTER_DESTROY):
                # No event came (libvirt reconnecting?): read the state directly.
                st = self._domains.state(cid)
                if st is None or st.state == "shutoff":
                    self._set(rec, state=EXITED, finished_at=now_ns(), exit_code=137,
                              reason="Killed", message="VM destroyed")
        self.console.flush(cid)

    def remove_container(self, cid: str) -> None:
        self.ensure_reconciled()
        with self._lock:
            rec = self._containers.get(cid)
        if rec is None:
            return
        with self._pod_lock(rec.sandbox_id):
            self.console.forget(cid)
            self._domains.undefine(cid)
            shutil.rmtree(rec.vm_dir, ignore_errors=True)
            self._store.delete("containers", cid)
            with self._lock:
                self._containers.pop(cid, None)
                self._changed.notify_all()
        log.info("container %s removed", cid, extra={"CONTAINER_ID": cid})

    def reopen_log(self, cid: str) -> None:
        rec = self.container(cid)
        if rec.state != RUNNING:
            raise FailedPrecondition(f"container {cid} is not running")
        self.console.reopen(cid)

    # -- Arktos NICs ----------------------------------------------------------------------

    def resolve_pod(self, ref: str) -> SandboxRecord:
        """The sandbox named by an Arktos NIC request: a sandbox id, or (as the Arktos kubelet
        sends it) the pod's name, matched among ready sandboxes."""
        with self._lock:
            sb = self._sandboxes.get(ref)
            if sb is not None:
                return sb
            named = [s for s in self._sandboxes.values()
                     if s.name == ref and s.state == SANDBOX_READY]
        if len(named) == 1:
            return named[0]
        if len(named) > 1:
            raise FailedPrecondition(f"pod name {ref[:100]!r} is ambiguous: "
                                     f"{len(named)} ready sandboxes carry it; use the id")
        raise NotFound(f"no pod sandbox with id or name {ref[:100]!r}")

    def _vm_of(self, sandbox_id: str) -> str | None:
        return next((c.id for c in self.containers_of(sandbox_id) if c.state != CREATING),
                    None)

    def attach_nic(self, pod: str, nic: NicInfo, vpc: str) -> None:
        sb = self.resolve_pod(pod)
        with self._pod_lock(sb.id):
            self.networks.attach_nic(sb.id, self._vm_of(sb.id), nic, vpc)

    def detach_nic(self, pod: str, name: str) -> None:
        sb = self.resolve_pod(pod)
        with self._pod_lock(sb.id):
            self.networks.detach_nic(sb.id, self._vm_of(sb.id), name)

    def list_nics(self, pod: str) -> list[NicStatus]:
        sb = self.resolve_pod(pod)
        return self.networks.list_nics(sb.id, self._vm_of(sb.id))
