"""The sandbox and container records in memory, written through to the state store.

Memory answers List and Status; the store is what survives a crash. A change is a new
frozen record: written to the store first, then swapped into memory. Locks, always taken
in this order and never the other way round:

- a pod's lock (`pod_lock`) serialises the lifecycle calls of one pod and may cover any
  I/O (libvirt, CNI, files); libvirt's event thread and the console thread never take it.
  Callers look the pod up first and lock only one they know (or are making, in
  RunPodSandbox, with a checked id); the lock exists only while held or awaited, so an
  unknown or removed id leaves nothing behind (keyed_locks);
- `_write` orders the record writers, so a change is computed from the current record and
  no writer swaps a stale record over a newer one; it covers store writes only. A record
  is inserted once (add_sandbox, put_container) and afterwards only updated: an update of
  a deleted record writes nothing, so nothing removed comes back;
- `lock`, the memory lock, covers dict lookups and swaps only, never I/O: a List or
  Status call never waits for a disk or for libvirt.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from ..errors import AlreadyExists
from .events import Event, container_kinds, now_ns, sandbox_kinds
from .keyed_locks import KeyedLocks
from .records import CREATING, ContainerRecord, SandboxRecord
from .store import Store

Change = Callable[[ContainerRecord], ContainerRecord | None]
SandboxChange = Callable[[SandboxRecord], SandboxRecord | None]


def _row(rec: ContainerRecord) -> tuple[str, dict[str, Any], dict[str, str]]:
    return rec.id, rec.to_dict(), {"sandbox_id": rec.sandbox_id}


class PodState:
    def __init__(self, store: Store, publish: Callable[[Event], None] | None = None) -> None:
        self._store = store
        #: receives the lifecycle events of the writes below (events.py); never blocks
        self._publish = publish
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self._write = threading.Lock()
        self.pod_locks = KeyedLocks()
        self._sandboxes = {sb.id: sb for sb in map(SandboxRecord.from_dict,
                                                   store.all("sandboxes"))}
        self._containers = {c.id: c for c in map(ContainerRecord.from_dict,
                                                 store.all("containers"))}

    @contextmanager
    def pod_lock(self, sandbox_id: str) -> Iterator[None]:
        """Holds the lock serialising mutations of one pod. Two threads asking at once share
        one; it is dropped when its last holder or waiter leaves (nothing per id is kept
        after a pod's removal, nor for an id that names no pod)."""
        with self.pod_locks.hold(sandbox_id):
            yield

    # -- reads (memory only) --------------------------------------------------------------

    def sandbox(self, sandbox_id: str) -> SandboxRecord | None:
        with self.lock:
            return self._sandboxes.get(sandbox_id)

    def sandboxes(self) -> list[SandboxRecord]:
        with self.lock:
            return list(self._sandboxes.values())

    def container(self, cid: str) -> ContainerRecord | None:
        with self.lock:
            return self._containers.get(cid)

    def containers(self) -> list[ContainerRecord]:
        """Every container record, those still CREATING included."""
        with self.lock:
            return list(self._containers.values())

    def containers_of(self, sandbox_id: str) -> list[ContainerRecord]:
        with self.lock:
            return [c for c in self._containers.values() if c.sandbox_id == sandbox_id]

    def wait_until(self, cid: str, done: Callable[[ContainerRecord | None], bool],
                   timeout: float) -> bool:
        """Waits (up to `timeout` s) until done(the container's record) holds."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while not done(self._containers.get(cid)):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(left)
        return True

    # -- writes: the store first, then memory ---------------------------------------------

    def add_sandbox(self, sb: SandboxRecord,
                    admit: Callable[[int], None] | None = None) -> None:
        """A new sandbox's record. `admit(number of sandboxes held)` raises to refuse it; it
        is asked in the same step as the record is written, so parallel calls against K
        free places admit exactly K (a held record is a taken place)."""
        with self._write:
            with self.lock:
                held = len(self._sandboxes)
                exists = sb.id in self._sandboxes
            if exists:
                raise AlreadyExists(f"pod sandbox {sb.id} has a record already")
            if admit is not None:
                admit(held)
            self._store.put("sandboxes", sb.id, sb.to_dict())
            with self.lock:
                self._sandboxes[sb.id] = sb
            self._sandbox_events(None, sb)

    def change_sandbox(self, sandbox_id: str, change: SandboxChange) -> SandboxRecord | None:
        """Applies change(current record) -> new record, or None for no change, as one step
        among writers; returns the record now held, None when there is none. Updates only:
        a removed sandbox is never written back (issue 9 item 8: a StopPodSandbox holding a
        record read before RemovePodSandbox deleted it brought it back after a restart)."""
        with self._write:
            old = self.sandbox(sandbox_id)
            if old is None:
                return None
            new = change(old)
            if new is None or new == old:
                return old
            assert new.id == sandbox_id
            if not self._store.update("sandboxes", sandbox_id, new.to_dict()):
                return None  # the store and memory agree under _write; never reached
            with self.lock:
                self._sandboxes[sandbox_id] = new
            self._sandbox_events(old, new)
            return new

    def delete_sandbox(self, sandbox_id: str) -> None:
        with self._write:
            self._store.delete("sandboxes", sandbox_id)
            with self.lock:
                old = self._sandboxes.pop(sandbox_id, None)
            self._sandbox_events(old, None)

    def put_container(self, rec: ContainerRecord) -> None:
        with self._write:
            id_, data, columns = _row(rec)
            self._store.put("containers", id_, data, **columns)
            self._swap([rec])

    def change_container(self, cid: str, change: Change) -> ContainerRecord | None:
        """Applies change(current record) -> new record, or None for no change, as one
        step among writers; returns the record now held (None if there is none)."""
        with self._write:
            old = self.container(cid)
            if old is None:
                return None
            new = change(old)
            if new is None or new == old:
                return old
            id_, data, columns = _row(new)
            if not self._store.update("containers", id_, data, **columns):
                return None  # updates only: a removed record is never written back
            self._swap([new])
            self._container_events(old, new)
            return new

    def set_container(self, cid: str, **changes: Any) -> ContainerRecord | None:
        return self.change_container(cid, lambda rec: dataclasses.replace(rec, **changes))

    def delete_container(self, cid: str) -> None:
        with self._write:
            self._store.delete("containers", cid)
            with self.lock:
                old = self._containers.pop(cid, None)
                self.changed.notify_all()
            self._container_events(old, None)

    def save_console_offsets(self, offsets: Mapping[str, int]) -> None:
        """The console follower's batch of offsets, in one store transaction."""
        with self._write:
            with self.lock:
                news = [dataclasses.replace(rec, console_offset=off)
                        for cid, off in offsets.items()
                        if (rec := self._containers.get(cid)) is not None
                        and rec.console_offset != off]
            if news:
                self._store.update_many("containers", map(_row, news))
                self._swap(news)

    def _swap(self, recs: list[ContainerRecord]) -> None:
        with self.lock:
            for rec in recs:
                self._containers[rec.id] = rec
            self.changed.notify_all()

    # -- lifecycle events (events.py); called under _write, so in the order of the writes -

    def _container_events(self, old: ContainerRecord | None,
                          new: ContainerRecord | None) -> None:
        rec = new or old
        if self._publish is not None and rec is not None:
            for kind in container_kinds(old, new):
                self._event(kind, rec.id, rec.sandbox_id)

    def _sandbox_events(self, old: SandboxRecord | None, new: SandboxRecord | None) -> None:
        rec = new or old
        if self._publish is not None and rec is not None:
            for kind in sandbox_kinds(old, new):
                self._event(kind, rec.id, rec.id)

    def _event(self, kind: str, id_: str, sandbox_id: str) -> None:
        assert self._publish is not None
        with self.lock:
            sb = self._sandboxes.get(sandbox_id)
            cs = tuple(c for c in self._containers.values()
                       if c.sandbox_id == sandbox_id and c.state != CREATING)
        self._publish(Event(kind, id_, now_ns(), sb, cs))
