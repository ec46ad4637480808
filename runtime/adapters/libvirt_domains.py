"""Domain operations, for domains this runtime instance made (their events: domain_events).

Every domain of ours is named PREFIX + its UUID and carries our <metadata>, which names
its sandbox and the runtime instance that defined it (the state store's random id). The
operations that change a domain (start, shutdown, destroy, undefine) take the sandbox the
caller holds a record of and act only when the domain's metadata names that sandbox and
this instance (`domain_xml.not_owned`): another instance's domain on the same host, an
orphan or a domain outside our prefix is left alone and logged. `define_new` defines only
a UUID libvirt does not know, so no definition is ever replaced. libvirt errors become the
runtime's error family through one function, `libvirt_conn.translate` (re-exported here),
and nowhere else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable

import libvirt

from ..errors import AlreadyExists, FailedPrecondition, Internal, NotFound, Unavailable
from .domain_events import DomainEvents, LifecycleEvent
from .domain_xml import (
    METADATA_NS,
    DomainMetadata,
    not_owned,
    parse_metadata,
    parse_metadata_element,
)
from .libvirt_conn import LibvirtConnection, call, translate

log = logging.getLogger(__name__)

__all__ = ["NO_AGENT", "PREFIX", "REBOOT_FLAGS", "STOP_REASONS", "DomainState", "Domains",
           "LifecycleEvent", "OurDomain", "call", "domain_name", "lookup_ours", "translate"]

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
# RebootVM's domainRebootFlag values that mean something for a QEMU domain.
REBOOT_FLAGS = {
    libvirt.VIR_DOMAIN_REBOOT_DEFAULT: "default (libvirt picks the agent or ACPI)",
    libvirt.VIR_DOMAIN_REBOOT_ACPI_POWER_BTN: "ACPI",
    libvirt.VIR_DOMAIN_REBOOT_GUEST_AGENT: "guest agent",
    libvirt.VIR_DOMAIN_REBOOT_ACPI_POWER_BTN | libvirt.VIR_DOMAIN_REBOOT_GUEST_AGENT:
        "guest agent, else ACPI",
}
# libvirt's codes for "no guest agent here": not connected or not answering, out of sync,
# and "QEMU guest agent is not configured" (no channel).
NO_AGENT = frozenset({libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_ERR_AGENT_UNSYNCED,
                      libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED})
_SHUTOFF_REASON = {
    libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED: "destroyed",
    libvirt.VIR_DOMAIN_SHUTOFF_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_SHUTOFF_FAILED: "failed",
}


def _our_metadata(dom: libvirt.virDomain) -> DomainMetadata | None:
    """Our <metadata> element alone (virDomainGetMetadata), not the whole domain XML: every
    ContainerStatus checks ownership, and fetching and parsing the full XML was the top of
    its profile at 50 pods (bench/density.py). None when the domain has none of ours."""
    try:
        element = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS, 0)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            return None
        raise
    return parse_metadata_element(element)


def domain_name(uuid: str) -> str:
    return PREFIX + uuid


@dataclasses.dataclass(frozen=True)
class DomainState:
    state: str  # running, paused, shutoff, crashed, nostate
    stop_reason: str = ""  # for shutoff: shutdown, destroyed, crashed, failed, unknown


@dataclasses.dataclass(frozen=True)
class OurDomain:
    uuid: str
    state: DomainState
    metadata: DomainMetadata | None


# --- shared with the other adapters that act on our domains by UUID (libvirt_nics) -------


def lookup_ours(conn: libvirt.virConnect, uuid: str) -> libvirt.virDomain | None:
    """Our domain with this UUID, None when there is none; errors as `translate` maps them,
    Internal when the UUID belongs to a domain that is not ours."""
    try:
        with call("looking up the domain", uuid):
            dom = conn.lookupByUUIDString(uuid)
            name = dom.name()
    except NotFound:
        return None
    if not name.startswith(PREFIX):
        raise Internal(f"domain {name} has uuid {uuid} but is not ours; not touching it")
    return dom


class Domains:
    def __init__(self, conn: LibvirtConnection, instance: str = "") -> None:
        self._conn = conn
        #: this runtime instance's id, written into the metadata of every domain it defines
        self.instance = instance
        # Handles of domains found ours, by UUID, with the connection and sandbox they were
        # checked for: `owned_for_reads` (see there). Dropped when the domain is undefined.
        self._handles: dict[str, tuple[libvirt.virConnect, str, libvirt.virDomain]] = {}
        self._handles_lock = threading.Lock()
        self.events = DomainEvents(conn, PREFIX)
        self.events.watch_undefined(self.forget)
        conn.on_open(self._new_connection)

    def watch(self, listener: Callable[[LifecycleEvent], None]) -> None:
        self.events.watch(listener)

    def _new_connection(self, _conn: libvirt.virConnect) -> None:
        with self._handles_lock:  # the old connection's handles are no use
            self._handles.clear()

    # -- operations -----------------------------------------------------------------------
    # Each libvirt call runs inside _call, so every libvirt error is translated by
    # `translate`; "missing" comes back as NotFound, "not in a state for that" as
    # FailedPrecondition, and the callers below decide which of those mean success.

    def _owned(self, uuid: str, sandbox_id: str, what: str) -> libvirt.virDomain | None:
        """The domain with this UUID if it is this instance's domain of `sandbox_id`; None
        when there is none, or (logged, not touched) when it is someone else's."""
        try:
            with call("reading the domain's metadata", uuid):
                dom = self._conn.get().lookupByUUIDString(uuid)
                name = dom.name()
                meta = _our_metadata(dom) if name.startswith(PREFIX) else None
        except NotFound:
            return None
        why = not_owned(meta, self.instance, sandbox_id)
        if why is None:
            return dom
        log.warning("not %s domain %s: %s", what, domain_name(uuid), why,
                    extra={"CONTAINER_ID": uuid, "POD_SANDBOX_ID": sandbox_id})
        return None

    def owned(self, uuid: str, sandbox_id: str, what: str) -> libvirt.virDomain | None:
        """The domain, if it is this instance's domain of `sandbox_id` (for the adapters that
        act on our domains: snapshots, the guest agent, resize); None otherwise, logged when it is
        not ours."""
        return self._owned(uuid, sandbox_id, what)

    def owned_for_reads(self, uuid: str, sandbox_id: str, what: str) -> libvirt.virDomain | None:
        """As `owned`, for a read repeated every second (ContainerStatus's size): a domain
        once found ours is remembered for this connection, so the next read skips the lookup
        and the metadata read (two of its three libvirt calls). Sound because the UUID is
        one this instance made: no one else can define it while ours exists (`define_new`),
        and the handle is dropped when the domain is undefined (our `undefine`, libvirt's
        UNDEFINED event) or the read finds it gone (the caller calls `forget`). Only reads
        use it; what changes a domain checks ownership each time."""
        conn = self._conn.get()
        with self._handles_lock:
            hit = self._handles.get(uuid)
        if hit is not None and hit[0] is conn and hit[1] == sandbox_id:
            return hit[2]
        dom = self._owned(uuid, sandbox_id, what)
        if dom is not None:
            with self._handles_lock:
                self._handles[uuid] = (conn, sandbox_id, dom)
        return dom

    def forget(self, uuid: str) -> None:
        with self._handles_lock:
            self._handles.pop(uuid, None)

    def foreign(self, uuid: str, sandbox_id: str) -> bool:
        """Whether libvirt has a domain with this UUID that is not this instance's domain
        of `sandbox_id` (for callers outside this class that act on it, as NIC hot-plug)."""
        return self.known(uuid) and self._owned(uuid, sandbox_id, "using") is None

    def _lookup(self, uuid: str) -> libvirt.virDomain | None:
        return lookup_ours(self._conn.get(), uuid)

    def known(self, uuid: str) -> bool:
        """Whether libvirt has any domain (ours or not) with this UUID."""
        try:
            with call("looking up the domain", uuid):
                self._conn.get().lookupByUUIDString(uuid)
        except NotFound:
            return False
        return True

    def define_new(self, uuid: str, xml: str) -> None:
        """Defines a domain whose UUID libvirt does not know yet: defineXML on a known UUID
        would replace that domain's definition, whoever made it."""
        if self.known(uuid):
            raise AlreadyExists(f"libvirt already has a domain with uuid {uuid}")
        with call("defining the domain", uuid):
            self._conn.get().defineXML(xml)

    def exists(self, uuid: str) -> bool:
        return self._lookup(uuid) is not None

    def state(self, uuid: str) -> DomainState | None:
        dom = self._lookup(uuid)
        if dom is None:
            return None
        try:
            with call("reading the state of the domain", uuid):
                state, reason = dom.state()
        except NotFound:
            return None
        name = STATE_NAMES.get(state, "nostate")
        stop = _SHUTOFF_REASON.get(reason, "unknown") if name == "shutoff" else ""
        return DomainState(name, stop)

    def start(self, uuid: str, sandbox_id: str) -> None:
        dom = self._owned(uuid, sandbox_id, "starting")
        if dom is None:
            raise NotFound(f"the domain of container {uuid} does not exist or is not ours")
        with call("starting the VM", uuid):
            if not dom.isActive():
                dom.create()

    def shutdown(self, uuid: str, sandbox_id: str) -> None:
        """Asks the guest to power off (ACPI); returns at once."""
        dom = self._owned(uuid, sandbox_id, "shutting down")
        # NotFound or FailedPrecondition: it stopped meanwhile.
        with contextlib.suppress(NotFound, FailedPrecondition), \
                call("shutting down the VM", uuid):
            if dom is not None and dom.isActive():
                dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)

    def reboot(self, uuid: str, sandbox_id: str, flags: int) -> None:
        """virDomainReboot with `flags` (REBOOT_FLAGS); libvirt's errors are raised."""
        dom = self._owned(uuid, sandbox_id, "rebooting")
        if dom is None:
            raise NotFound(f"the domain of container {uuid} does not exist or is not ours")
        try:
            with call("rebooting the VM", uuid):
                dom.reboot(flags)
        except Unavailable as e:
            if e.context.get("libvirt_code") in NO_AGENT:
                raise FailedPrecondition(f"{e.message} (no QEMU guest agent answers in the "
                                         "guest: is qemu-guest-agent installed and running?)",
                                         **e.context) from e
            raise

    def destroy(self, uuid: str, sandbox_id: str) -> None:
        dom = self._owned(uuid, sandbox_id, "stopping")
        with contextlib.suppress(NotFound, FailedPrecondition), call("stopping the VM", uuid):
            if dom is not None and dom.isActive():
                dom.destroy()

    def undefine(self, uuid: str, sandbox_id: str) -> None:
        self.forget(uuid)
        self.events.changed(uuid)  # at once, not when libvirt's UNDEFINED event comes
        dom = self._owned(uuid, sandbox_id, "removing")
        if dom is None:
            return
        flags = (libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                 | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
        with contextlib.suppress(NotFound):
            with call("removing the VM", uuid):
                if dom.isActive():
                    dom.destroy()
            try:
                with call("removing the VM", uuid):
                    dom.undefineFlags(flags)
            except Unavailable as e:
                # A driver without NVRAM or managed save (test:///) refuses those flags,
                # as virsh finds; a domain of such a driver has neither to remove.
                if e.context.get("libvirt_code") != libvirt.VIR_ERR_INVALID_ARG:
                    raise
                with call("removing the VM", uuid):
                    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)

    def ours(self) -> list[OurDomain]:
        """Every domain with our prefix: one libvirt scan, used at startup only."""
        with call("listing libvirt domains"):
            doms = self._conn.get().listAllDomains()
        out = []
        for dom in doms:
            try:
                with call("reading a domain"):
                    name = dom.name()
                    if not name.startswith(PREFIX):
                        continue
                    uuid = dom.UUIDString()
                    meta = parse_metadata(dom.XMLDesc(0))
                out.append(OurDomain(uuid, self.state(uuid) or DomainState("nostate"), meta))
            except NotFound:
                continue  # undefined while we looked
        return out
