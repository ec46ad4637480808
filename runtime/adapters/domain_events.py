"""libvirt's events for the domains this runtime made (named with the domains' prefix).

Subscribed again on every connection libvirt_conn opens. Three kinds of listener:
- lifecycle (`watch`): a domain started, stopped (with why) or crashed: the containers'
  states and RebootVM follow these;
- changes (`watch_changes`): anything that may change what virDomainGetInfo says of a
  domain (any lifecycle event, the balloon's size, a device such as a vCPU added or removed,
  a tunable): what a reader keeps of a domain is dropped on these;
- undefined (`watch_undefined`): the domain is gone.
Listeners run on libvirt's event thread and must not block. `watched_connection` tells a
reader whether the change events are subscribed on the connection it reads through: what
it keeps is valid only while they are.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import libvirt

from ..errors import Unavailable
from .libvirt_conn import LibvirtConnection, call

log = logging.getLogger(__name__)

_EVENT_STOP_DETAIL = {
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: "destroyed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED: "failed",
}
# Events that may change what virDomainGetInfo says of a domain, besides the lifecycle:
# the balloon's actual size (libvirt's own figure follows this event), devices (vCPU
# hot-plug and unplug), tunables.
_CHANGE_EVENTS = (libvirt.VIR_DOMAIN_EVENT_ID_BALLOON_CHANGE,
                  libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED,
                  libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED,
                  libvirt.VIR_DOMAIN_EVENT_ID_TUNABLE)


@dataclasses.dataclass(frozen=True)
class LifecycleEvent:
    uuid: str
    started: bool = False
    stopped: bool = False
    stop_reason: str = ""


class DomainEvents:
    def __init__(self, conn: LibvirtConnection, prefix: str) -> None:
        self._conn = conn
        self._prefix = prefix
        self._lifecycle: list[Callable[[LifecycleEvent], None]] = []
        self._changes: list[Callable[[str], None]] = []
        self._undefined: list[Callable[[str], None]] = []
        # The connection on which every change event is subscribed (see watched_connection).
        self._watched: libvirt.virConnect | None = None
        conn.on_open(self._subscribe)

    def watch(self, listener: Callable[[LifecycleEvent], None]) -> None:
        self._lifecycle.append(listener)

    def watch_changes(self, listener: Callable[[str], None]) -> None:
        self._changes.append(listener)

    def watch_undefined(self, listener: Callable[[str], None]) -> None:
        self._undefined.append(listener)

    def changed(self, uuid: str) -> None:
        """Tells the change listeners now (the runtime's own change, before libvirt's
        event comes)."""
        for listener in self._changes:
            listener(uuid)

    def watched_connection(self) -> libvirt.virConnect | None:
        """The current connection if every change event is subscribed on it (else None)."""
        conn = self._conn.get()
        return conn if conn is self._watched else None

    def watched_now(self) -> libvirt.virConnect | None:
        """As `watched_connection`, never waiting on libvirt (the connection as it stands:
        one found dead is replaced by the next call that uses libvirt)."""
        conn = self._conn.current()
        return conn if conn is not None and conn is self._watched else None

    def _subscribe(self, conn: libvirt.virConnect) -> None:
        with call("subscribing to domain lifecycle events"):
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                        self._on_lifecycle, None)
        try:
            with call("subscribing to domain change events"):
                for event_id in _CHANGE_EVENTS:
                    conn.domainEventRegisterAny(None, event_id, self._on_change, None)
        except Unavailable as e:  # a driver without them: readers keep nothing
            log.warning("libvirt change events unavailable, sizes are read every time: %s",
                        e.message)
            return
        self._watched = conn

    def _ours(self, dom: libvirt.virDomain) -> str | None:
        """The domain's UUID if it is named as ours (the handle's own fields, no call)."""
        with call("reading the domain of an event"):
            return dom.UUIDString() if dom.name().startswith(self._prefix) else None

    def _on_change(self, _conn: libvirt.virConnect, dom: libvirt.virDomain,
                   *_event: object) -> None:
        try:
            uuid = self._ours(dom)
            if uuid is not None:
                self.changed(uuid)
        except Exception:
            log.exception("handling a libvirt change event failed")

    def _on_lifecycle(self, _conn: libvirt.virConnect, dom: libvirt.virDomain, event: int,
                      detail: int, _opaque: object) -> None:
        try:
            uuid = self._ours(dom)
            if uuid is None:
                return
            self.changed(uuid)
            if event == libvirt.VIR_DOMAIN_EVENT_UNDEFINED:
                for gone in self._undefined:
                    gone(uuid)
                return
            if event == libvirt.VIR_DOMAIN_EVENT_STARTED:
                ev = LifecycleEvent(uuid, started=True)
            elif event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
                ev = LifecycleEvent(uuid, stopped=True,
                                    stop_reason=_EVENT_STOP_DETAIL.get(detail, "unknown"))
            elif event == libvirt.VIR_DOMAIN_EVENT_CRASHED:
                ev = LifecycleEvent(uuid, stopped=True, stop_reason="crashed")
            else:
                return
            log.debug("libvirt event for %s%s: %s", self._prefix, uuid, ev,
                      extra={"CONTAINER_ID": uuid})
            for listener in self._lifecycle:
                listener(ev)
        except Exception:
            log.exception("handling a libvirt lifecycle event failed")
