"""Startup reconciliation: the records brought in line with libvirt, once, when libvirt is
first reachable. Never destroys a VM: a domain with our prefix but no record is logged and
left alone; a record whose domain vanished shows the container EXITED. A domain counts as
the one a record names only when its metadata names the record's sandbox and this runtime
instance (`domain_xml.not_owned`; a domain from before instance ids, naming the sandbox,
is ours): another instance's domain on the same host is never taken for ours.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ..adapters.console_log import ConsoleLogs
from ..adapters.domain_xml import not_owned
from ..adapters.libvirt_domains import STOP_REASONS, Domains, OurDomain, domain_name
from .containers import Containers, now_ns
from .pod_network import PodNetworks
from .podstate import PodState
from .records import CREATED, CREATING, EXITED, RUNNING, ContainerRecord

log = logging.getLogger(__name__)


class Reconciler:
    def __init__(self, state: PodState, domains: Domains, networks: PodNetworks,
                 console: ConsoleLogs, containers: Containers,
                 after: Sequence[Callable[[], None]] = ()) -> None:
        self._state = state
        self._domains = domains
        self._networks = networks
        self._console = console
        self._containers = containers
        self._after = list(after)  # more reconciling once the containers are (snapshots)
        self._done = False
        self._lock = threading.Lock()  # held while reconciling: mutations wait on it
        self._start_lock = threading.Lock()
        self._running = False

    def ensure(self) -> None:
        """Called before every mutation: it waits for (or runs) the reconcile."""
        if self._done:
            return
        with self._lock:
            if not self._done:
                self.reconcile()

    def start(self) -> None:
        """Called on each healthy libvirt probe: reconciles in a thread of its own, so a slow
        CNI DEL is never taken for a hung libvirt; returns at once."""
        with self._start_lock:
            if self._done or self._running:
                return
            self._running = True
        threading.Thread(target=self._background, name="reconcile", daemon=True).start()

    def _background(self) -> None:
        try:
            self.ensure()
        except Exception:
            log.exception("reconcile failed; retried at the next libvirt probe or mutation")
        finally:
            with self._start_lock:
                self._running = False

    def reconcile(self) -> None:
        instance = self._domains.instance
        doms = {d.uuid: d for d in self._domains.ours()}
        for rec in self._state.containers():
            dom = doms.pop(rec.id, None)
            why = None if dom is None else not_owned(dom.metadata, instance, rec.sandbox_id)
            if why is not None:
                log.warning("domain %s is not the VM of record %s (%s); leaving it untouched",
                            domain_name(rec.id), rec.id, why, extra={"CONTAINER_ID": rec.id})
                dom = None
            self._container(rec, dom)
        for uuid, dom in doms.items():
            other = dom.metadata is not None and dom.metadata.instance not in ("", instance)
            if other:
                log.debug("domain %s belongs to another runtime instance", domain_name(uuid))
            else:
                log.warning("domain %s has our prefix but no record here; leaving it "
                            "untouched", domain_name(uuid), extra={"CONTAINER_ID": uuid})
        # A network without a sandbox record: a RunPodSandbox whose CNI ADD failed and whose
        # undo (CNI DEL) failed too. No RPC names it any more; its DEL releases the address.
        known = {sb.id for sb in self._state.sandboxes()}
        for sid in set(self._networks.sandbox_ids()) - known:
            log.warning("tearing down the network of unknown sandbox %s (orphan rule: no "
                        "sandbox record)", sid, extra={"POD_SANDBOX_ID": sid})
            self._networks.teardown(sid)
        self._networks.restore()
        for step in self._after:
            step()
        self._done = True
        log.info("reconciled %d sandboxes and %d containers with libvirt",
                 len(known), len(self._state.containers()))

    def _set(self, rec: ContainerRecord, **changes: Any) -> ContainerRecord:
        return self._state.set_container(rec.id, **changes) or rec

    def _container(self, rec: ContainerRecord, dom: OurDomain | None) -> None:
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
