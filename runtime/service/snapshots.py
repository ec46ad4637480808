"""VM snapshots (the Arktos CreateSnapshot / RestoreToSnapshot): the caller's snapshot id,
disk and memory state of the VM, kept inside the VM's own root disk (internal qcow2
snapshots, adapters/libvirt_snapshots), listed in the state store's `snapshots` table.

- A running VM (or one paused from outside) is snapshotted with its memory and device
  state; a stopped VM (created, or exited) with its disks only.
- Restore of a running VM: libvirt (9.0) loads an internal snapshot only into a new QEMU
  (-loadvm), so the old QEMU is stopped, the VM's taps made again and, once the new QEMU
  opened them, bridged in the pod namespace as at StartContainer (containers.restart_locked);
  the guest continues from the snapshot's moment with its NICs' MACs and addresses, so it
  answers on its CNI address as before. The container stays RUNNING throughout. A
  snapshot of a stopped VM cannot be loaded into a running one (FAILED_PRECONDITION:
  stop the VM first).
- Restore of a stopped VM sets its root disk back (qemu-img); the next StartContainer
  boots from that disk: a stopped VM has no memory state to go back to.
- The row is written (CREATING) before libvirt is asked and marked READY after, so
  reconcile after a crash finishes or drops it; rows go with their container
  (RemoveContainer, RemovePodSandbox), as the snapshots themselves go with its disk.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..adapters import qemu_img
from ..adapters.libvirt_domains import Domains
from ..adapters.libvirt_snapshots import SHUTOFF, DomainSnapshots
from ..checks import check_id, shown
from ..errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RuntimeError_,
)
from .containers import Containers
from .designer import VmFiles
from .events import now_ns
from .podstate import PodState
from .records import CREATING, ContainerRecord
from .store import Store

log = logging.getLogger(__name__)

TABLE = "snapshots"
SNAP_CREATING, SNAP_READY = "CREATING", "READY"


@dataclasses.dataclass(frozen=True)
class SnapshotRecord:
    container_id: str
    snapshot_id: str
    sandbox_id: str
    state: str  # CREATING (asked of libvirt, not confirmed) or READY
    vm_state: str  # what the snapshot holds: running, paused, shutoff (disks only)
    created_at: int

    @property
    def key(self) -> str:
        return f"{self.container_id}/{self.snapshot_id}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SnapshotRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def check_flags(method: str, flags: int) -> None:
    if flags != 0:
        raise InvalidArgument(f"{method}: field flags must be 0 (no flag means anything "
                              f"here); got {flags}")


class Snapshots:
    def __init__(self, store: Store, state: PodState, domains: Domains,
                 containers: Containers, ensure_reconciled: Callable[[], None]) -> None:
        self._store = store
        self._containers = containers
        self._state = state
        self._domains = domains
        self._libvirt = DomainSnapshots(domains)
        self._ensure_reconciled = ensure_reconciled

    # -- reads ----------------------------------------------------------------------------

    def of(self, cid: str) -> list[SnapshotRecord]:
        return [SnapshotRecord.from_dict(d) for d in self._store.all_by(TABLE, "container_id",
                                                                         cid)]

    def _get(self, cid: str, snapshot_id: str) -> SnapshotRecord | None:
        data = self._store.get(TABLE, f"{cid}/{snapshot_id}")
        return None if data is None else SnapshotRecord.from_dict(data)

    def _container(self, cid: str) -> ContainerRecord:
        rec = self._state.container(cid)
        if rec is None or rec.state == CREATING:
            raise NotFound(f"VM (container) {shown(cid)} not found")
        return rec

    # -- CreateSnapshot / RestoreToSnapshot -----------------------------------------------

    def create(self, cid: str, snapshot_id: str, flags: int) -> SnapshotRecord:
        check_id("vmID", cid)
        check_id("snapshotID", snapshot_id)
        check_flags("CreateSnapshot", flags)
        self._ensure_reconciled()
        rec = self._container(cid)
        with self._state.pod_lock(rec.sandbox_id):
            rec = self._container(cid)
            if self._get(cid, snapshot_id) is not None:
                raise AlreadyExists(f"VM {cid} already has a snapshot {shown(snapshot_id)}")
            snap = SnapshotRecord(cid, snapshot_id, rec.sandbox_id, SNAP_CREATING, "",
                                  now_ns())
            self._store.put(TABLE, snap.key, snap.to_dict(), container_id=cid)
            try:
                vm_state = self._libvirt.create(cid, rec.sandbox_id, snapshot_id)
            except BaseException:
                self._store.delete(TABLE, snap.key)
                raise
            snap = dataclasses.replace(snap, state=SNAP_READY, vm_state=vm_state)
            self._store.update(TABLE, snap.key, snap.to_dict(), container_id=cid)
        log.info("snapshot %s of VM %s taken (%s)", snapshot_id, cid, vm_state,
                 extra={"CONTAINER_ID": cid, "POD_SANDBOX_ID": rec.sandbox_id})
        return snap

    def restore(self, cid: str, snapshot_id: str, flags: int) -> None:
        check_id("vmID", cid)
        check_id("snapshotID", snapshot_id)
        check_flags("RestoreToSnapshot", flags)
        self._ensure_reconciled()
        rec = self._container(cid)
        with self._state.pod_lock(rec.sandbox_id):
            rec = self._container(cid)
            snap = self._get(cid, snapshot_id)
            if snap is None or snap.state != SNAP_READY:
                raise NotFound(f"VM {cid} has no snapshot {shown(snapshot_id)}")
            st = self._domains.state(cid)
            if st is None:
                raise FailedPrecondition(f"the VM of container {cid} has no libvirt domain")
            if st.state in ("running", "paused"):
                if snap.vm_state == SHUTOFF:
                    raise FailedPrecondition(
                        f"snapshot {snapshot_id} of VM {cid} was taken while the VM was "
                        "stopped (disks only); stop the VM to restore it")
                self._containers.restart_locked(
                    cid, lambda: self._libvirt.revert(cid, rec.sandbox_id, snapshot_id),
                    "Restore")
                try:
                    self._libvirt.rehotpluggable(cid, rec.sandbox_id)
                except RuntimeError_ as e:  # the restore itself succeeded
                    log.warning("VM %s: its vCPUs stay cold-plugged until it is redefined: "
                                "%s", cid, e, extra={"CONTAINER_ID": cid})
            else:
                qemu_img.apply_snapshot(VmFiles(Path(rec.vm_dir)).root_disk, snapshot_id)
        log.info("VM %s restored to snapshot %s (the VM was %s)", cid, snapshot_id, st.state,
                 extra={"CONTAINER_ID": cid, "POD_SANDBOX_ID": rec.sandbox_id})

    # -- with the VM ----------------------------------------------------------------------

    def forget(self, cid: str) -> None:
        """The rows of a removed VM (its disk, holding the snapshots, is gone with it)."""
        self._store.delete_many(TABLE, [s.key for s in self.of(cid)])

    def reconcile(self) -> None:
        """At startup, after the containers: rows of containers that are gone are dropped;
        a CREATING row is finished when libvirt has the snapshot, dropped when not."""
        rows = [SnapshotRecord.from_dict(d) for d in self._store.all(TABLE)]
        gone = [s.key for s in rows if self._state.container(s.container_id) is None]
        if gone:
            log.warning("dropping %d snapshot row(s) of removed VMs", len(gone))
            self._store.delete_many(TABLE, gone)
        for s in rows:
            if s.state != SNAP_CREATING or s.key in gone:
                continue
            held = self._libvirt.names(s.container_id, s.sandbox_id) or {}
            if s.snapshot_id in held:
                log.info("snapshot %s of VM %s was taken before a restart; recorded",
                         s.snapshot_id, s.container_id)
                done = dataclasses.replace(s, state=SNAP_READY,
                                           vm_state=held[s.snapshot_id])
                self._store.update(TABLE, s.key, done.to_dict(), container_id=s.container_id)
            else:
                log.info("snapshot %s of VM %s was not taken before a restart; dropped",
                         s.snapshot_id, s.container_id)
                self._store.delete(TABLE, s.key)
