"""Container lifecycle events for v1 GetContainerEvents, fanned out to every subscriber.

The events come from the records the runtime already keeps (podstate.PodState calls
`publish` after each write that changes a container's or a sandbox's state), so they
follow whatever made the change: a CRI call, libvirt's lifecycle events (a guest that
powers itself off), startup reconciliation.

  container CREATED   -> CREATED     the VM is defined (CreateContainer done)
  container -> RUNNING               STARTED (StartContainer, or libvirt saw it start)
  container RUNNING -> EXITED        STOPPED (StopContainer, or the guest stopped)
  container record deleted           DELETED (RemoveContainer, RemovePodSandbox)
  sandbox added (READY)              CREATED and STARTED, container_id = the sandbox id
  sandbox READY -> NOTREADY          STOPPED, container_id = the sandbox id
  sandbox record deleted             DELETED, container_id = the sandbox id
(the sandbox events are what containerd sends for its pause container, which evented
PLEG relies on to see a pod's sandbox change).

Publishing never blocks: it runs under the store's writer lock, on libvirt's event thread
among others. Each subscriber has a bounded queue (`QUEUE_LIMIT` events); a subscriber
that falls that far behind is cut off: its queue is dropped and its stream ends with
RESOURCE_EXHAUSTED, so it knows it missed events and relists (a kubelet's evented PLEG
falls back to relisting and subscribes again). Events are never silently skipped.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable

from .records import CREATED as C_CREATED
from .records import CREATING, RUNNING, SANDBOX_NOTREADY, ContainerRecord, SandboxRecord

log = logging.getLogger(__name__)

CREATED, STARTED, STOPPED, DELETED = (
    "CONTAINER_CREATED_EVENT", "CONTAINER_STARTED_EVENT", "CONTAINER_STOPPED_EVENT",
    "CONTAINER_DELETED_EVENT")
QUEUE_LIMIT = 1000
MAX_SUBSCRIBERS = 64


@dataclasses.dataclass(frozen=True)
class Event:
    kind: str  # one of the four above (the CRI's ContainerEventType names)
    container_id: str  # a container id, or a sandbox id for a sandbox's events
    created_at: int  # ns since the epoch
    sandbox: SandboxRecord | None  # the sandbox as it is after the change (None: deleted)
    containers: tuple[ContainerRecord, ...]  # the sandbox's containers after the change


class Subscription:
    def __init__(self, hub: EventHub, notify: Callable[[], None], limit: int) -> None:
        self._hub = hub
        self._notify = notify
        self._limit = limit
        self._lock = threading.Lock()
        self._queue: collections.deque[Event] = collections.deque()
        #: set when the queue overflowed: the subscriber missed events and is cut off
        self.overflowed = False
        self.closed = False

    def offer(self, ev: Event) -> None:
        with self._lock:
            if self.overflowed or self.closed:
                return
            if len(self._queue) >= self._limit:
                self.overflowed = True
                self._queue.clear()
            else:
                self._queue.append(ev)
        try:
            self._notify()
        except Exception:  # the subscriber's loop is gone; it closes itself
            log.debug("notifying an event subscriber failed", exc_info=True)

    def take(self) -> list[Event]:
        """The events queued so far (none once overflowed)."""
        with self._lock:
            out = list(self._queue)
            self._queue.clear()
            return out

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self._queue.clear()
        self._hub.unsubscribe(self)

    def end(self) -> None:
        """The runtime is stopping: the subscriber is woken and its stream ends."""
        with self._lock:
            self.closed = True
        try:
            self._notify()
        except Exception:
            log.debug("notifying an event subscriber failed", exc_info=True)


class EventHub:
    def __init__(self, limit: int = QUEUE_LIMIT, max_subscribers: int = MAX_SUBSCRIBERS) -> None:
        self._lock = threading.Lock()
        self._subs: list[Subscription] = []
        self.limit = limit
        self.max_subscribers = max_subscribers

    def subscribe(self, notify: Callable[[], None]) -> Subscription | None:
        """A new subscriber; `notify()` is called (from any thread, never blocking) after an
        event is queued for it. None when `max_subscribers` are subscribed already."""
        with self._lock:
            if len(self._subs) >= self.max_subscribers:
                return None
            sub = Subscription(self, notify, self.limit)
            self._subs.append(sub)
            return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._subs)

    def close(self) -> None:
        """Ends every stream (daemon shutdown: an open stream would otherwise hold the
        server's stop for its whole grace period); later subscribers are refused."""
        with self._lock:
            subs, self._subs = self._subs, []
            self.max_subscribers = 0
        for sub in subs:
            sub.end()

    def publish(self, ev: Event) -> None:
        with self._lock:
            subs = list(self._subs)
        for sub in subs:
            sub.offer(ev)


def container_kinds(old: ContainerRecord | None, new: ContainerRecord | None) -> list[str]:
    """The events a write of a container record (old -> new, None: none) means."""
    was = old.state if old is not None else None
    now = new.state if new is not None else None
    if was == now or now == CREATING:
        return []
    if now is None:
        return [] if was == CREATING else [DELETED]
    if now == RUNNING:
        return [STARTED]
    if was == RUNNING:  # exited, or a start undone (back to created)
        return [STOPPED]
    if now == C_CREATED and was in (None, CREATING):
        return [CREATED]
    return []


def sandbox_kinds(old: SandboxRecord | None, new: SandboxRecord | None) -> list[str]:
    """The events a write of a sandbox record means (a sandbox is ready when made)."""
    if old is None and new is not None:
        return [CREATED, STARTED]
    if old is not None and new is None:
        return [DELETED]
    if old is not None and new is not None and old.state != new.state \
            and new.state == SANDBOX_NOTREADY:
        return [STOPPED]
    return []


def now_ns() -> int:
    return time.time_ns()
