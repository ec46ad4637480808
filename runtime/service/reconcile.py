"""Reconciliation: the records brought in line with libvirt and the pod networks, once when
libvirt is first reachable, then again for each sandbox whose part failed.

Two phases, each sandbox on its own under its pod lock. First the containers (libvirt
only: quick), while mutations wait; then, in the background, the networks (interrupted
removals finished, orphan networks torn down, dnsmasq and taps restored: CNI can be slow).
A failure in either (a CNI DEL that keeps failing, a network that cannot be restored) is
logged, the sandbox marked pending, and the pass goes on to the next one; pending
sandboxes are retried in the background on later libvirt probes, with a delay doubling
from RETRY_FIRST up to RETRY_MAX. One sandbox never holds up another's RPCs.

Never destroys a VM because of doubt: a domain with our prefix but no record is logged and
left alone; a record whose domain vanished shows the container EXITED. Removals a caller
asked for (records marked `removing`) and creates cut short (CREATING) are finished or
rolled back. A domain counts as the one a record names only when its metadata names the
record's sandbox and this runtime instance (`domain_xml.not_owned`; a domain from before
instance ids, naming the sandbox, is ours): another instance's domain is never ours.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .. import metrics
from ..adapters.console_log import ConsoleLogs
from ..adapters.domain_xml import not_owned
from ..adapters.libvirt_domains import STOP_REASONS, Domains, OurDomain, domain_name
from .containers import Containers
from .events import now_ns
from .pod_network import PodNetworks
from .podstate import PodState
from .records import CREATED, CREATING, EXITED, RUNNING, ContainerRecord

log = logging.getLogger(__name__)

RETRY_FIRST = 5.0
RETRY_MAX = 60.0

Found = Mapping[str, OurDomain | None]  # container id -> its domain, None when it has none


class Reconciler:
    def __init__(self, state: PodState, domains: Domains, networks: PodNetworks,
                 console: ConsoleLogs, containers: Containers,
                 remove_sandbox: Callable[[str], None],
                 after: Sequence[Callable[[], None]] = ()) -> None:
        self._state = state
        self._domains = domains
        self._networks = networks
        self._console = console
        self._containers = containers
        self._remove_sandbox = remove_sandbox  # finishes a removal; pod lock held
        self._after = list(after)  # more reconciling once the containers are (snapshots)
        self._done = False
        self._lock = threading.Lock()  # held during the first pass: mutations wait on it
        self._start_lock = threading.Lock()
        self._running = False
        self._pending: dict[str, str] = {}  # sandbox id -> why its reconcile failed
        self._pending_lock = threading.Lock()
        self._retry_at = 0.0
        self._retry_delay = RETRY_FIRST
        self._networks_todo: list[str] = []  # the second phase, after the first pass

    def pending(self) -> dict[str, str]:
        """The sandboxes whose reconcile failed and waits for a retry, with the reason."""
        with self._pending_lock:
            return dict(self._pending)

    def mark(self, sandbox_id: str, why: str) -> None:
        """Marks a sandbox for the background retry (also used by RunPodSandbox when its
        undo left a network behind)."""
        with self._pending_lock:
            self._pending[sandbox_id] = why[:500]
            self._retry_at = min(self._retry_at, time.monotonic() + RETRY_FIRST) \
                if self._retry_at else time.monotonic() + RETRY_FIRST
        log.warning("sandbox %s left for a reconcile retry: %s", sandbox_id, why[:500],
                    extra={"POD_SANDBOX_ID": sandbox_id})

    def ensure(self) -> None:
        """Called before every mutation: it waits for (or runs) the first pass."""
        if self._done:
            return
        with self._lock:
            if not self._done:
                self.reconcile()

    def start(self) -> None:
        """Called on each healthy libvirt probe: runs the first pass, or a due retry, in a
        thread of its own (a slow CNI DEL is never taken for a hung libvirt); returns at
        once."""
        with self._start_lock:
            if self._running:
                return
            if self._done and not self._networks_todo:
                with self._pending_lock:
                    if not self._pending or time.monotonic() < self._retry_at:
                        return
            self._running = True
        threading.Thread(target=self._background, name="reconcile", daemon=True).start()

    def settle(self) -> None:
        """Both phases now, in the caller's thread (pending retries are left for later)."""
        self.ensure()
        self._second_phase()

    def _background(self) -> None:
        try:
            self.settle()
            self.retry()
        except Exception:
            log.exception("reconcile failed; retried at the next libvirt probe or mutation")
        finally:
            with self._start_lock:
                self._running = False

    def reconcile(self) -> None:
        """The first pass: every sandbox the store or libvirt knows of."""
        try:
            self._first_pass()
        except Exception:
            metrics.RECONCILE_RUNS.labels("failed").inc()
            raise
        metrics.RECONCILE_RUNS.labels("partial" if self.pending() else "ok").inc()

    def _first_pass(self) -> None:
        doms = {d.uuid: d for d in self._domains.ours()}  # libvirt unreachable: raises
        found = self._match(doms, self._state.containers())
        for uuid, dom in doms.items():
            if uuid in found:
                continue
            other = dom.metadata is not None and dom.metadata.instance not in (
                "", self._domains.instance)
            if other:
                log.debug("domain %s belongs to another runtime instance", domain_name(uuid))
            else:
                log.warning("domain %s has our prefix but no record here; leaving it "
                            "untouched", domain_name(uuid), extra={"CONTAINER_ID": uuid})
        sids = ({sb.id for sb in self._state.sandboxes()}
                | {c.sandbox_id for c in self._state.containers()}
                | set(self._networks.sandbox_ids()))
        for sid in sorted(sids):
            self._isolated(sid, functools.partial(self._containers_of, sid, found))
        for step in self._after:
            try:
                step()
            except Exception:  # never blocks the mutations waiting for this pass
                log.exception("reconcile step %s failed", getattr(step, "__qualname__", step))
        self._networks_todo = sorted(sids)
        self._done = True
        log.info("reconciled %d sandboxes and %d containers with libvirt (%d left to retry)",
                 len(self._state.sandboxes()), len(self._state.containers()),
                 len(self.pending()))

    def _second_phase(self) -> None:
        todo, self._networks_todo = self._networks_todo, []
        for sid in todo:
            if sid not in self.pending():  # else its retry does it all
                self._isolated(sid, functools.partial(self._network_of, sid))
        if todo:
            log.info("reconciled the networks of %d sandboxes (%d left to retry)",
                     len(todo), len(self.pending()))

    def retry(self) -> None:
        """Reconciles the pending sandboxes again."""
        sids = sorted(self.pending())
        if not sids or time.monotonic() < self._retry_at:
            return
        for sid in sids:
            self._isolated(sid, functools.partial(self._all_of, sid))
        metrics.RECONCILE_RUNS.labels("partial" if self.pending() else "ok").inc()
        with self._pending_lock:
            self._retry_delay = min(self._retry_delay * 2, RETRY_MAX) if self._pending \
                else RETRY_FIRST
            self._retry_at = time.monotonic() + self._retry_delay

    def _match(self, doms: dict[str, OurDomain],
               recs: list[ContainerRecord]) -> dict[str, OurDomain | None]:
        """Each container record's domain: None when it has none or the one with its UUID
        is not this instance's domain of the record's sandbox."""
        found: dict[str, OurDomain | None] = {}
        for rec in recs:
            dom = doms.get(rec.id)
            why = None if dom is None else not_owned(dom.metadata, self._domains.instance,
                                                     rec.sandbox_id)
            if why is not None:
                log.warning("domain %s is not the VM of record %s (%s); leaving it untouched",
                            domain_name(rec.id), rec.id, why, extra={"CONTAINER_ID": rec.id})
                dom = None
            found[rec.id] = dom
        return found

    def _isolated(self, sid: str, work: Callable[[], None]) -> None:
        """Runs one sandbox's part under its pod lock; a failure marks it pending."""
        try:
            with self._state.pod_lock(sid):
                work()
        except Exception as e:
            log.exception("reconciling sandbox %s failed", sid, extra={"POD_SANDBOX_ID": sid})
            self.mark(sid, str(e) or type(e).__name__)
            return
        with self._pending_lock:
            retried = self._pending.pop(sid, None) is not None
        if retried:
            log.info("sandbox %s reconciled on a retry", sid, extra={"POD_SANDBOX_ID": sid})

    def _all_of(self, sid: str) -> None:
        """A retry: the domains read under the pod lock, so no RPC of the pod runs between
        the scan and what is made of it."""
        self._containers_of(sid, self._match({d.uuid: d for d in self._domains.ours()},
                                             self._state.containers_of(sid)))
        self._network_of(sid)

    def _containers_of(self, sid: str, found: Found) -> None:
        for rec in self._state.containers_of(sid):
            if rec.id in found:  # else made after the scan: its RPC took care of it
                self._container(rec, found[rec.id])

    def _network_of(self, sid: str) -> None:
        sb = self._state.sandbox(sid)
        if sb is not None and sb.removing:
            log.info("finishing the removal of sandbox %s, cut short before", sid,
                     extra={"POD_SANDBOX_ID": sid})
            self._remove_sandbox(sid)
            return
        if sb is None and sid in self._networks.sandbox_ids():
            # A RunPodSandbox whose CNI ADD failed and whose undo (CNI DEL) failed too.
            # No RPC names it any more; its DEL releases the address.
            log.warning("tearing down the network of unknown sandbox %s (orphan rule: no "
                        "sandbox record)", sid, extra={"POD_SANDBOX_ID": sid})
            self._networks.teardown(sid)
            return
        self._networks.restore_sandbox(sid)

    def _set(self, rec: ContainerRecord, **changes: Any) -> ContainerRecord:
        return self._state.set_container(rec.id, **changes) or rec

    def _container(self, rec: ContainerRecord, dom: OurDomain | None) -> None:
        if rec.removing:
            log.info("finishing the removal of %s, cut short before", rec.id,
                     extra={"CONTAINER_ID": rec.id})
            self._containers.remove_locked(rec.id)
            return
        if rec.state == CREATING:
            if dom is not None:
                log.info("finishing %s: its domain was defined before a restart", rec.id)
                self._set(rec, state=CREATED)
            else:
                log.info("rolling back %s: created only in part before a restart", rec.id)
                self._containers.undo_create(rec)
            return
        if dom is None:
            if rec.state in (CREATED, RUNNING):
                self._set(rec, state=EXITED, finished_at=rec.finished_at or now_ns(),
                          exit_code=1, reason="DomainMissing",
                          message="the VM's libvirt domain no longer exists")
            return
        if dom.state.state in ("running", "paused"):
            if rec.state != RUNNING:
                rec = self._set(rec, state=RUNNING, started_at=rec.started_at or now_ns())
            self._containers.follow_console(rec)
        elif rec.state == RUNNING:
            code, reason = STOP_REASONS.get(dom.state.stop_reason, STOP_REASONS["unknown"])
            rec = self._set(rec, state=EXITED, finished_at=now_ns(), exit_code=code,
                            reason=reason, message="stopped while the runtime was down")
            # Copy what it printed after our last saved offset, then let go of it.
            self._containers.follow_console(rec)
            self._console.forget(rec.id)
