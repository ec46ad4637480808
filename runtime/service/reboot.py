"""RebootVM: libvirt's reboot of a running VM, now or after a delay.

A delayed reboot is a timer; while it is pending another RebootVM of the same VM is
FailedPrecondition. The reboot itself runs under the pod lock, so it never races a Stop or
Remove of the same pod; a pending reboot is dropped when the VM stops (libvirt's event). The
container stays RUNNING: a reboot is a reset of the same QEMU process (on_reboot=restart),
which libvirt reports as a REBOOT event, not as stopped/started (containers._on_event).
"""

from __future__ import annotations

import logging
import threading

from ..adapters.guest_agent import GuestAgent
from ..adapters.libvirt_domains import REBOOT_FLAGS, Domains, LifecycleEvent
from ..checks import shown
from ..errors import FailedPrecondition, InvalidArgument, NotFound, RuntimeError_
from .podstate import PodState
from .records import CREATING, RUNNING, ContainerRecord

log = logging.getLogger(__name__)

MAX_REBOOT_DELAY = 24 * 3600  # seconds
GUEST_AGENT_ONLY = 2  # libvirt's VIR_DOMAIN_REBOOT_GUEST_AGENT alone: no ACPI fallback


class Reboots:
    def __init__(self, state: PodState, domains: Domains, agent: GuestAgent) -> None:
        self._state = state
        self._domains = domains
        self._agent = agent
        self._lock = threading.Lock()
        self._pending: dict[str, threading.Timer] = {}
        domains.watch(self._on_event)

    def _on_event(self, ev: LifecycleEvent) -> None:
        if ev.stopped:  # a reboot scheduled for this run of the VM is void
            with self._lock:
                timer = self._pending.get(ev.uuid)
                if timer is not None and timer.interval > 0:
                    self._pending.pop(ev.uuid)
                    timer.cancel()
                    log.info("pending reboot of VM %s dropped: the VM stopped", ev.uuid,
                             extra={"CONTAINER_ID": ev.uuid})

    def _running(self, cid: str) -> ContainerRecord:
        rec = self._state.container(cid)
        if rec is None or rec.state == CREATING:
            raise NotFound(f"container {shown(cid)} not found")
        if rec.state != RUNNING:
            raise FailedPrecondition(f"VM {cid} is not running ({rec.state})")
        return rec

    def reboot(self, cid: str, delay: int, flags: int) -> None:
        if flags not in REBOOT_FLAGS:
            allowed = ", ".join(f"{k} ({v})" for k, v in REBOOT_FLAGS.items())
            raise InvalidArgument(f"RebootVM: domainRebootFlag {flags} is not one of {allowed}")
        if not 0 <= delay <= MAX_REBOOT_DELAY:
            raise InvalidArgument(f"RebootVM: delayInSeconds {delay} is not between 0 and "
                                  f"{MAX_REBOOT_DELAY}")
        with self._lock:
            if cid in self._pending:
                raise FailedPrecondition(f"a reboot of VM {cid} is already scheduled or "
                                         "in progress")
            rec = self._running(cid)
            if delay == 0:
                self._pending[cid] = threading.Timer(0, lambda: None)  # "in progress"
            else:
                if flags == GUEST_AGENT_ONLY:  # fail now rather than at the deadline
                    self._agent.ping(cid, rec.sandbox_id)
                timer = threading.Timer(delay, self._delayed, (cid, flags))
                timer.daemon = True
                timer.name = f"reboot-{cid[:8]}"
                self._pending[cid] = timer
                timer.start()
                log.info("reboot of VM %s in %d s (%s)", cid, delay, REBOOT_FLAGS[flags],
                         extra={"CONTAINER_ID": cid})
                return
        try:
            self._now(cid, flags)
        finally:
            with self._lock:
                self._pending.pop(cid, None)

    def _now(self, cid: str, flags: int) -> None:
        rec = self._running(cid)
        with self._state.pod_lock(rec.sandbox_id):
            rec = self._running(cid)
            self._domains.reboot(cid, rec.sandbox_id, flags)
        log.info("VM %s rebooting (%s)", cid, REBOOT_FLAGS[flags], extra={"CONTAINER_ID": cid})

    def _delayed(self, cid: str, flags: int) -> None:
        try:
            self._now(cid, flags)
        except RuntimeError_ as e:
            log.warning("delayed reboot of VM %s not done: %s", cid, e.message,
                        extra={"CONTAINER_ID": cid})
        except Exception:
            log.exception("delayed reboot of VM %s failed", cid, extra={"CONTAINER_ID": cid})
        finally:
            with self._lock:
                self._pending.pop(cid, None)

    def close(self) -> None:
        with self._lock:
            timers, self._pending = list(self._pending.values()), {}
        for t in timers:
            t.cancel()
