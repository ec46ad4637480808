"""The one VM container of a sandbox: start, stop, remove, and libvirt's events (create is
container_create's).

Every change is written to the store before the side effect it records (PodState), so
after kill -9 startup can tell what was half-made (a CREATING record) from what exists.
Mutations of one pod are serialised by its pod lock, which may cover I/O; records are
frozen and swapped, so readers never wait for it. Console methods are never called with
PodState's locks held (the console thread takes them to save offsets).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..adapters.console_log import ConsoleLogs
from ..adapters.guest_agent import GuestAgent
from ..adapters.libvirt_domains import STOP_REASONS, Domains, LifecycleEvent
from ..checks import shown
from ..config import Settings
from ..errors import FailedPrecondition, NotFound
from . import designer, faults
from .container_create import ContainerCreation, ContainerInput
from .events import now_ns
from .images import ImageStore
from .pod_network import PodNetworks
from .podstate import PodState
from .quotas import Quotas
from .records import CREATING, EXITED, RUNNING, SANDBOX_READY, ContainerRecord
from .vm_stop import graceful_stop

log = logging.getLogger(__name__)

STOP_AFTER_DESTROY = 10.0  # seconds to wait for libvirt's STOPPED event after destroy
# A StopContainer timeout (int64 seconds) beyond what a thread can wait is "wait for ever".
MAX_STOP_TIMEOUT = int(threading.TIMEOUT_MAX)


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
        self._networks = networks
        self._console = console
        self._ensure_reconciled = ensure_reconciled
        #: called with the id of each container removed (its VM's snapshot rows go)
        self.on_removed: list[Callable[[str], None]] = []
        # VMs whose QEMU this runtime replaces on purpose (restart_locked): the stop event of
        # the old QEMU is swallowed (set), so the container never flickers EXITED.
        self._quiet: dict[str, threading.Event] = {}
        self._agent = GuestAgent(domains)
        self._creation = ContainerCreation(settings, state, domains, images, networks,
                                           vm_root, template_dirs, quotas)
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
        return self._creation.create(sandbox_id, c)

    def undo_create(self, rec: ContainerRecord) -> None:
        """Removes whatever part of a create was done; the domain was never started."""
        self._creation.undo(rec)

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
