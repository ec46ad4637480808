"""The one VM container of a sandbox: create, start, stop, remove, and libvirt's events.

Every change is written to the store before the side effect it records (PodState), so
after kill -9 startup can tell what was half-made (a CREATING record) from what exists.
Mutations of one pod are serialised by its pod lock, which may cover I/O; records are
frozen and swapped, so readers never wait for it. Console methods are never called with
PodState's locks held (the console thread takes them to save offsets).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..adapters import qemu_img
from ..adapters.console_log import ConsoleLogs, parts_below
from ..adapters.domain_xml import render_domain
from ..adapters.guest_agent import GuestAgent
from ..adapters.host_volumes import create_disk
from ..adapters.libvirt_domains import STOP_REASONS, Domains, LifecycleEvent
from ..adapters.seed_iso import write_seed_iso
from ..checks import shown
from ..config import Settings
from ..errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from . import designer, faults
from .images import ImageStore
from .pod_network import PodNetworks
from .podstate import PodState
from .quotas import Quotas
from .records import CREATED, CREATING, EXITED, RUNNING, SANDBOX_READY, ContainerRecord
from .seed import render_seed
from .vm_stop import graceful_stop
from .vmconfig import parse_vm_config
from .volumes import DeviceInput, MountInput, plan_volumes

log = logging.getLogger(__name__)

STOP_AFTER_DESTROY = 10.0  # seconds to wait for libvirt's STOPPED event after destroy
# A StopContainer timeout (int64 seconds) beyond what a thread can wait is "wait for ever".
MAX_STOP_TIMEOUT = int(threading.TIMEOUT_MAX)


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


def now_ns() -> int:
    return time.time_ns()


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


def _not_running(rec: ContainerRecord | None) -> bool:
    return rec is None or rec.state != RUNNING


class Containers:
    def __init__(self, settings: Settings, state: PodState, domains: Domains,
                 images: ImageStore, networks: PodNetworks, console: ConsoleLogs,
                 vm_root: Path, template_dirs: Sequence[Path],
                 ensure_reconciled: Callable[[], None], quotas: Quotas) -> None:
        self.settings = settings
        self._state = state
        self._domains = domains
        self._images = images
        self._networks = networks
        self._console = console
        self._vm_root = vm_root
        self._templates = list(template_dirs)
        self._ensure_reconciled = ensure_reconciled
        self._quotas = quotas
        #: called with the id of each container removed (its VM's snapshot rows go)
        self.on_removed: list[Callable[[str], None]] = []
        # VMs whose QEMU this runtime replaces on purpose (restart_locked): the stop event of
        # the old QEMU is swallowed (set), so the container never flickers EXITED.
        self._quiet: dict[str, threading.Event] = {}
        self._agent = GuestAgent(domains)
        domains.watch(self._on_event)

    # -- reads ----------------------------------------------------------------------------

    def containers(self) -> list[ContainerRecord]:
        return [c for c in self._state.containers() if c.state != CREATING]

    def container(self, cid: str) -> ContainerRecord:
        rec = self._state.container(cid)
        if rec is None or rec.state == CREATING:
            raise NotFound(f"container {shown(cid)} not found")
        return rec

    def image_in_use(self, digest: str) -> bool:
        return any(c.image_ref == f"sha256:{digest}" for c in self._state.containers())

    # -- events ---------------------------------------------------------------------------

    def _on_event(self, ev: LifecycleEvent) -> None:
        stopped = False
        quiet = self._quiet.get(ev.uuid)
        if ev.stopped and quiet is not None and not quiet.is_set():
            quiet.set()
            return

        def change(rec: ContainerRecord) -> ContainerRecord | None:
            nonlocal stopped
            if rec.state == CREATING:
                return None
            if ev.started and rec.state != RUNNING:
                return dataclasses.replace(rec, state=RUNNING, started_at=now_ns(),
                                           finished_at=0)
            if ev.stopped and rec.state == RUNNING:
                code, reason = STOP_REASONS.get(ev.stop_reason, STOP_REASONS["unknown"])
                if rec.stop_requested and code == 137:
                    reason = "Killed"  # the stop timeout ran out
                stopped = True
                return dataclasses.replace(rec, state=EXITED, finished_at=now_ns(),
                                           exit_code=code, reason=reason,
                                           message=f"VM stopped ({ev.stop_reason})")
            return None

        self._state.change_container(ev.uuid, change)
        if stopped:
            log.info("VM of %s stopped: %s", ev.uuid, ev.stop_reason,
                     extra={"CONTAINER_ID": ev.uuid})
            self._console.flush(ev.uuid)

    # -- lifecycle ------------------------------------------------------------------------

    def create(self, sandbox_id: str, c: ContainerInput) -> str:
        if self._state.sandbox(sandbox_id) is None:  # before any lock: an unknown id
            raise NotFound(f"pod sandbox {shown(sandbox_id)} not found")  # leaves nothing
        self._ensure_reconciled()
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
                                 default_memory_mib=self.settings.default_memory_mib)
            image = self._images.status(c.image)
            if image is None:
                raise NotFound(f"image {c.image[:200]!r} is not pulled")
            self._quotas.check_vm(
                vm, annotations, "the container's memory limit" if c.memory_limit_in_bytes > 0
                else f"the default memory (setting default-memory-mib = "
                f"{self.settings.default_memory_mib})", image.virtual_size)
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
            volumes = plan_volumes(c.mounts, c.devices, vm.extra_disks, self.settings,
                                   self._vm_root / cid, vm.disk_driver)
            rec = ContainerRecord(
                id=cid, sandbox_id=sandbox_id, name=c.name, attempt=c.attempt,
                state=CREATING, created_at=now_ns(), image=c.image, image_ref=image.id,
                vm_dir=str(self._vm_root / cid),
                log_path=log_file(self.settings.pod_logs_dir, sb.log_directory, c.log_path),
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
                plan = designer.design(sb, cid, vm, image, self.settings, Path(rec.vm_dir),
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
                self.undo_create(rec)
                raise
            self._state.set_container(cid, state=CREATED)
        log.info("container %s (VM %s) created in sandbox %s", c.name, cid, sandbox_id,
                 extra={"CONTAINER_ID": cid, "POD_SANDBOX_ID": sandbox_id})
        return cid

    def undo_create(self, rec: ContainerRecord) -> None:
        """Removes whatever part of a create was done; the domain was never started."""
        try:
            self._domains.undefine(rec.id, rec.sandbox_id)
        finally:
            shutil.rmtree(rec.vm_dir, ignore_errors=True)
            self._state.delete_container(rec.id)

    def follow_console(self, rec: ContainerRecord) -> None:
        if rec.log_path:
            self._console.follow(rec.id, designer.VmFiles(Path(rec.vm_dir)).console_log,
                                 Path(rec.log_path), rec.console_offset)

    def start(self, cid: str) -> None:
        self._ensure_reconciled()
        rec = self.container(cid)
        with self._state.pod_lock(rec.sandbox_id):
            rec = self.container(cid)
            if rec.state == RUNNING:
                return
            if rec.removing:
                raise FailedPrecondition(f"container {cid} is being removed")
            sb = self._state.sandbox(rec.sandbox_id)
            if sb is None or sb.state != SANDBOX_READY:
                raise FailedPrecondition(f"pod sandbox {rec.sandbox_id} is stopped")
            previous = rec

            def undo() -> None:
                # Back to the record before this start, keeping the console offset saved
                # meanwhile (the console is followed from here on).
                self._state.change_container(cid, lambda now: dataclasses.replace(
                    previous, console_offset=now.console_offset))

            started = self._state.set_container(
                cid, state=RUNNING, started_at=now_ns(), finished_at=0, exit_code=0,
                reason="", message="", stop_requested=False)
            assert started is not None  # the pod lock keeps it from being removed
            self.follow_console(started)
            sid = rec.sandbox_id
            try:
                faults.point("start_container.recorded", sid)
                self._networks.before_vm_start(sid)
                faults.point("start_container.taps", sid)
                self._domains.start(cid, sid)
            except BaseException:
                undo()
                raise
            try:
                faults.point("start_container.started", sid)
                self._networks.after_vm_started(sid)
            except BaseException:
                # This call started the VM but could not bridge its taps: a VM nobody can
                # reach, that memory would call RUNNING so a retry would do nothing. Undo
                # this start (our own, seconds old) and let the kubelet retry.
                self._domains.destroy(cid, rec.sandbox_id)
                self._state.wait_until(cid, _not_running, STOP_AFTER_DESTROY)
                undo()
                raise
            faults.point("start_container.bridged", sid)
        log.info("container %s started", cid, extra={"CONTAINER_ID": cid})

    def stop(self, cid: str, timeout: int) -> None:
        # T counts from the call, not from the pod lock: the caller waits T in all.
        deadline = time.monotonic() + min(timeout, MAX_STOP_TIMEOUT)
        self._ensure_reconciled()
        rec = self._state.container(cid)
        if rec is None or rec.state == CREATING:
            return  # gone: success
        with self._state.pod_lock(rec.sandbox_id):
            self.stop_locked(cid, max(0.0, deadline - time.monotonic()) if timeout > 0 else 0)
        self.flush_console(cid)

    def flush_console(self, cid: str) -> None:
        self._console.flush(cid)

    def stop_locked(self, cid: str, timeout: float) -> None:
        """StopContainer's work (vm_stop: within `timeout` s); the caller holds the
        container's pod lock."""
        started = time.monotonic()
        deadline = started + min(timeout, MAX_STOP_TIMEOUT)
        rec = self._state.container(cid)
        if rec is None or rec.state != RUNNING:
            return
        self._state.set_container(cid, stop_requested=True)
        faults.point("stop_container.recorded", rec.sandbox_id)
        if timeout > 0:
            if graceful_stop(cid, rec.sandbox_id, deadline, self._domains, self._agent,
                             lambda s: self._state.wait_until(cid, _not_running, s)):
                return
            log.info("VM %s did not power off within %.1f s; destroying it", cid,
                     time.monotonic() - started, extra={"CONTAINER_ID": cid})
        self._domains.destroy(cid, rec.sandbox_id)
        faults.point("stop_container.signalled", rec.sandbox_id)
        log.info("VM %s destroyed %.2f s into its stop", cid, time.monotonic() - started,
                 extra={"CONTAINER_ID": cid})
        # destroy returns once QEMU is gone; the event may lag: read the state by T.
        wait = min(STOP_AFTER_DESTROY, max(0.05, deadline - time.monotonic()))
        if not self._state.wait_until(cid, _not_running, wait):
            # No event came (libvirt reconnecting?): read the state directly.
            st = self._domains.state(cid)
            if st is None or st.state == "shutoff":
                self._state.change_container(cid, lambda r: dataclasses.replace(
                    r, state=EXITED, finished_at=now_ns(), exit_code=137,
                    reason="Killed", message="VM destroyed") if r.state == RUNNING
                    else None)

    def restart_locked(self, cid: str, start: Callable[[], None], why: str) -> None:
        """Replaces the running QEMU of `cid` by the one `start()` starts (a snapshot restore:
        libvirt loads a snapshot's memory only into a new QEMU), its taps made again and
        bridged as at StartContainer; the container stays RUNNING throughout. The caller
        holds the pod lock. On failure the VM is left stopped and shows EXITED."""
        rec = self._state.container(cid)
        assert rec is not None  # the pod lock keeps it
        old_stopped = threading.Event()
        self._quiet[cid] = old_stopped
        try:
            self._domains.destroy(cid, rec.sandbox_id)
            old_stopped.wait(STOP_AFTER_DESTROY)  # its event swallowed, not taken for a stop
        finally:
            self._quiet.pop(cid, None)
        try:
            self._networks.before_vm_start(rec.sandbox_id)
            start()
            self._networks.after_vm_started(rec.sandbox_id)
        except BaseException as e:
            self._domains.destroy(cid, rec.sandbox_id)
            message = getattr(e, "message", str(e))[:500]
            self._state.change_container(cid, lambda r: dataclasses.replace(
                r, state=EXITED, finished_at=now_ns(), exit_code=1, reason=f"{why}Failed",
                message=message) if r.state == RUNNING else None)
            raise

    def remove(self, cid: str) -> None:
        self._ensure_reconciled()
        rec = self._state.container(cid)
        if rec is None:
            return
        with self._state.pod_lock(rec.sandbox_id):
            self.remove_locked(cid)

    def remove_locked(self, cid: str) -> None:
        """RemoveContainer's steps, the record marked first: a removal cut short is
        finished by reconcile or by the next call. The caller holds the pod lock."""
        rec = self._state.container(cid)
        if rec is None:
            return  # removed while the caller waited for the lock
        if not rec.removing:
            rec = self._state.set_container(cid, removing=True) or rec
        faults.point("remove_container.recorded", rec.sandbox_id)
        self._console.forget(cid)
        self._domains.undefine(cid, rec.sandbox_id)
        faults.point("remove_container.undefined", rec.sandbox_id)
        shutil.rmtree(rec.vm_dir, ignore_errors=True)
        faults.point("remove_container.files_removed", rec.sandbox_id)
        self._state.delete_container(cid)
        for hook in self.on_removed:
            hook(cid)
        log.info("container %s removed", cid, extra={"CONTAINER_ID": cid})

    def reopen_log(self, cid: str) -> None:
        rec = self.container(cid)
        if rec.state != RUNNING:
            raise FailedPrecondition(f"container {shown(cid)} is not running")
        self._console.reopen(cid)
