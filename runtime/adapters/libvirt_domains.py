"""Domain operations and lifecycle events, for domains this runtime made.

Every domain of ours is named PREFIX + its UUID and carries our <metadata>. Nothing here
acts on a domain without that prefix, so domains the runtime did not create are never
touched. libvirt errors become the runtime's error family here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable

import libvirt

from ..errors import Internal, NotFound, Unavailable
from .domain_xml import DomainMetadata, parse_metadata
from .libvirt_conn import LibvirtConnection

log = logging.getLogger(__name__)

# One fixed prefix for every domain this runtime defines; see module docstring.
PREFIX = "avr-"

STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "running",  # shutting down: still running
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "paused",
}

# How a domain stopped, from the detail of a STOPPED event or a SHUTOFF state reason:
# (exit code, CRI reason).
STOP_REASONS = {
    "shutdown": (0, "Completed"),
    "destroyed": (137, "Killed"),
    "crashed": (1, "Crashed"),
    "failed": (1, "QemuFailed"),
    "unknown": (1, "Unknown"),
}
_EVENT_STOP_DETAIL = {
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: "destroyed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED: "failed",
}
_SHUTOFF_REASON = {
    libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED: "destroyed",
    libvirt.VIR_DOMAIN_SHUTOFF_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_SHUTOFF_FAILED: "failed",
}


def domain_name(uuid: str) -> str:
    return PREFIX + uuid


@dataclasses.dataclass(frozen=True)
class DomainState:
    state: str  # running, paused, shutoff, crashed, nostate
    stop_reason: str = ""  # for shutoff: shutdown, destroyed, crashed, failed, unknown


@dataclasses.dataclass(frozen=True)
class LifecycleEvent:
    uuid: str
    started: bool = False
    stopped: bool = False
    stop_reason: str = ""


@dataclasses.dataclass(frozen=True)
class OurDomain:
    uuid: str
    state: DomainState
    metadata: DomainMetadata | None


def _is_missing(e: libvirt.libvirtError) -> bool:
    return e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN


# --- shared with the other adapters that act on our domains by UUID (libvirt_nics) -------


def is_missing(e: libvirt.libvirtError) -> bool:
    """The error says the domain does not exist (any more): "already gone"."""
    return _is_missing(e)


def lookup_ours(conn: libvirt.virConnect, uuid: str) -> libvirt.virDomain | None:
    """Our domain with this UUID, None when there is none; Unavailable when libvirt fails,
    Internal when the UUID belongs to a domain that is not ours (the rules of `_lookup`)."""
    try:
        dom = conn.lookupByUUIDString(uuid)
    except libvirt.libvirtError as e:
        if _is_missing(e):
            return None
        raise Unavailable(f"libvirt lookup of {uuid} failed: {e}") from e
    if not dom.name().startswith(PREFIX):
        raise Internal(f"domain {dom.name()} has uuid {uuid} but is not ours; not touching it")
    return dom


class Domains:
    def __init__(self, conn: LibvirtConnection) -> None:
        self._conn = conn
        self._listeners: list[Callable[[LifecycleEvent], None]] = []
        self._lock = threading.Lock()
        conn.on_open(self._subscribe)

    # -- events ---------------------------------------------------------------------------

    def watch(self, listener: Callable[[LifecycleEvent], None]) -> None:
        self._listeners.append(listener)

    def _subscribe(self, conn: libvirt.virConnect) -> None:
        conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                    self._on_lifecycle, None)

    def _on_lifecycle(self, _conn: libvirt.virConnect, dom: libvirt.virDomain, event: int,
                      detail: int, _opaque: object) -> None:
        # Runs on libvirt's event thread: no blocking libvirt calls here.
        try:
            name = dom.name()
            if not name.startswith(PREFIX):
                return
            uuid = dom.UUIDString()
            if event == libvirt.VIR_DOMAIN_EVENT_STARTED:
                ev = LifecycleEvent(uuid, started=True)
            elif event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
                ev = LifecycleEvent(uuid, stopped=True,
                                    stop_reason=_EVENT_STOP_DETAIL.get(detail, "unknown"))
            elif event == libvirt.VIR_DOMAIN_EVENT_CRASHED:
                ev = LifecycleEvent(uuid, stopped=True, stop_reason="crashed")
            else:
                return
            log.debug("libvirt event for %s: %s", name, ev, extra={"CONTAINER_ID": uuid})
            for listener in self._listeners:
                listener(ev)
        except Exception:
            log.exception("handling a libvirt lifecycle event failed")

    # -- operations -----------------------------------------------------------------------

    def _lookup(self, uuid: str) -> libvirt.virDomain | None:
        try:
            dom = self._conn.get().lookupByUUIDString(uuid)
        except libvirt.libvirtError as e:
            if _is_missing(e):
                return None
            raise Unavailable(f"libvirt lookup of {uuid} failed: {e}") from e
        if not dom.name().startswith(PREFIX):
            raise Internal(f"domain {dom.name()} has uuid {uuid} but is not ours; not touching it")
        return dom

    def define(self, xml: str) -> None:
        try:
            self._conn.get().defineXML(xml)
        except libvirt.libvirtError as e:
            raise Unavailable(f"libvirt refused the domain: {e}") from e

    def exists(self, uuid: str) -> bool:
        return self._lookup(uuid) is not None

    def state(self, uuid: str) -> DomainState | None:
        dom = self._lookup(uuid)
        if dom is None:
            return None
        try:
            state, reason = dom.state()
        except libvirt.libvirtError as e:
            if _is_missing(e):
                return None
            raise Unavailable(f"libvirt state of {uuid} failed: {e}") from e
        name = STATE_NAMES.get(state, "nostate")
        stop = _SHUTOFF_REASON.get(reason, "unknown") if name == "shutoff" else ""
        return DomainState(name, stop)

    def start(self, uuid: str) -> None:
        dom = self._lookup(uuid)
        if dom is None:
            raise NotFound(f"domain of container {uuid} does not exist")
        try:
            if not dom.isActive():
                dom.create()
        except libvirt.libvirtError as e:
            raise Unavailable(f"starting the VM of {uuid} failed: {e}") from e

    def shutdown(self, uuid: str) -> None:
        """Asks the guest to power off (ACPI); returns at once."""
        dom = self._lookup(uuid)
        try:
            if dom is not None and dom.isActive():
                dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
        except libvirt.libvirtError as e:
            if _is_missing(e) or e.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:
                return  # it stopped meanwhile
            raise Unavailable(f"shutting down the VM of {uuid} failed: {e}") from e

    def destroy(self, uuid: str) -> None:
        dom = self._lookup(uuid)
        try:
            if dom is not None and dom.isActive():
                dom.destroy()
        except libvirt.libvirtError as e:
            if _is_missing(e) or e.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:
                return
            raise Unavailable(f"stopping the VM of {uuid} failed: {e}") from e

    def undefine(self, uuid: str) -> None:
        dom = self._lookup(uuid)
        if dom is None:
            return
        try:
            if dom.isActive():
                dom.destroy()
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
                              | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                              | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
        except libvirt.libvirtError as e:
            if _is_missing(e):
                return
            raise Unavailable(f"removing the VM of {uuid} failed: {e}") from e

    def ours(self) -> list[OurDomain]:
        """Every domain with our prefix: one libvirt scan, used at startup only."""
        try:
            doms = self._conn.get().listAllDomains()
        except libvirt.libvirtError as e:
            raise Unavailable(f"listing libvirt domains failed: {e}") from e
        out = []
        for dom in doms:
            try:
                if not dom.name().startswith(PREFIX):
                    continue
                uuid = dom.UUIDString()
                meta = parse_metadata(dom.XMLDesc(0))
                out.append(OurDomain(uuid, self.state(uuid) or DomainState("nostate"), meta))
            except libvirt.libvirtError as e:
                if not _is_missing(e):
                    raise Unavailable(f"reading domain {dom.name()} failed: {e}") from e
        return out
