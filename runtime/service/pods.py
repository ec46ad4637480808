"""Pods as the API sees them: sandbox lifecycle here, the VM container's in containers.py,
startup reconciliation in reconcile.py, the VM's design in designer.py, the records and
their locks in podstate.py.

A sandbox is a pod's network (and its record); its one container is the VM. Memory answers
List and Status; libvirt's lifecycle events keep it current. Every change is written to
the store before the side effect it records; mutations of one pod are serialised by its
pod lock, and reads never wait for I/O.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

from ..adapters.console_log import ConsoleLogs
from ..adapters.fsutil import make_dirs
from ..adapters.libvirt_domains import Domains
from ..adapters.libvirt_resize import DomainResizer
from ..checks import check_hostname, check_id, is_hostname, shown
from ..config import Settings
from ..errors import FailedPrecondition, InvalidArgument, NotFound
from . import faults
from .container_create import ContainerInput
from .containers import Containers
from .events import EventHub, now_ns
from .images import ImageStore
from .network_state import NicStatus
from .nic_spec import ANN_CNI_ARGS, ANN_NICS, ANN_VPC, NicInfo
from .pod_network import PodNetworks
from .podstate import PodState
from .quotas import Quotas
from .reconcile import Reconciler
from .records import CREATING, SANDBOX_NOTREADY, SANDBOX_READY, ContainerRecord, SandboxRecord
from .resize import Resizer
from .snapshots import Snapshots
from .store import Store
from .vmconfig import parse_vm_config

log = logging.getLogger(__name__)

__all__ = ["ContainerInput", "Pods", "now_ns"]

# The annotations CNI needs at RunPodSandbox; the others are checked at CreateContainer,
# where the contract says a malformed one fails.
NETWORK_ANNOTATIONS = (ANN_VPC, ANN_NICS, ANN_CNI_ARGS)


def _not_ready(sb: SandboxRecord) -> SandboxRecord | None:
    return None if sb.state == SANDBOX_NOTREADY else dataclasses.replace(
        sb, state=SANDBOX_NOTREADY)


def _removing(sb: SandboxRecord) -> SandboxRecord | None:
    return None if sb.removing else dataclasses.replace(
        sb, removing=True, state=SANDBOX_NOTREADY)


class Pods:
    def __init__(self, settings: Settings, store: Store, domains: Domains, images: ImageStore,
                 networks: PodNetworks, vm_root: Path, template_dirs: Sequence[Path]) -> None:
        self.settings = settings
        self.networks = networks
        make_dirs(vm_root, 0o711)  # QEMU (another user) reaches its disks by path
        self.events = EventHub()  # GetContainerEvents' subscribers (events.py)
        self.state = PodState(store, self.events.publish)
        self.quotas = Quotas.from_settings(settings)
        self.console = ConsoleLogs(self.state.save_console_offsets,
                                   Path(settings.pod_logs_dir))
        self._containers = Containers(settings, self.state, domains, images, networks,
                                      self.console, vm_root, template_dirs,
                                      self.ensure_reconciled, self.quotas)
        self._domains = domains
        self.snapshots = Snapshots(store, self.state, domains, self._containers,
                                   self.ensure_reconciled)
        self._containers.on_removed.append(self.snapshots.forget)
        self.resize = Resizer(self.state, DomainResizer(domains), self.quotas,
                              self.ensure_reconciled)
        self._reconciler = Reconciler(self.state, domains, networks, self.console,
                                      self._containers, self._remove_locked,
                                      after=[self.snapshots.reconcile])

    def ensure_reconciled(self) -> None:
        """Called before every mutation: waits until reconciled."""
        self._reconciler.ensure()

    def start_reconcile(self) -> None:
        """Called on each healthy libvirt probe: reconciles in the background."""
        self._reconciler.start()

    def reconcile(self) -> None:
        """Both phases of reconcile now (the daemon runs them in the background)."""
        self._reconciler.settle()

    def reconcile_pending(self) -> dict[str, str]:
        """The sandboxes whose reconcile failed, waiting for a retry, with the reason."""
        return self._reconciler.pending()

    def close(self) -> None:
        """At shutdown: the consoles copied and their offsets saved. VMs keep running."""
        self.console.close()

    # -- sandboxes ------------------------------------------------------------------------

    def run_sandbox(self, sb: SandboxRecord) -> str:
        check_id("pod uid", sb.id)
        if sb.hostname:
            check_hostname(sb.hostname)
        elif not is_hostname(sb.name):  # the pod name becomes the guest's hostname
            raise InvalidArgument(f"pod name {shown(sb.name)} cannot be the guest's hostname "
                                  "(an RFC 1123 host name) and no hostname is given")
        net_config = parse_vm_config({k: v for k, v in sb.annotations.items()
                                      if k in NETWORK_ANNOTATIONS})
        self.quotas.check_annotations(sb.annotations)
        with self.state.pod_lock(sb.id):
            existing = self.state.sandbox(sb.id)
            if existing is not None and existing.removing:
                # A RemovePodSandbox cut short: finished before the pod runs again.
                self._remove_locked(sb.id)
                existing = None
            if existing is not None and existing.state == SANDBOX_READY:
                return existing.id  # a repeated call: the same answer
            # New, or stopped before: sandbox id = pod UID, so the kubelet's next attempt
            # for the same pod comes back here. It gets a fresh network; its VM (if any)
            # keeps its disk and is started again by StartContainer.
            sb = dataclasses.replace(
                sb, state=SANDBOX_NOTREADY,  # until its network is up
                created_at=existing.created_at if existing is not None else sb.created_at)
            if existing is None:
                # the place on the node is taken here (or refused: node full)
                self.state.add_sandbox(sb, self.quotas.admit_pod)
            else:
                self.state.change_sandbox(sb.id, lambda _: sb)
            try:
                faults.point("run_sandbox.recorded", sb.id)
                self.networks.setup(sb.id, sb.tenant, sb.namespace, sb.name, net_config)
                faults.point("run_sandbox.network_ready", sb.id)
            except BaseException:
                if existing is None:
                    self._undo_new_sandbox(sb.id)
                raise
            self.state.change_sandbox(sb.id, lambda now: dataclasses.replace(
                now, state=SANDBOX_READY))
        log.info("sandbox %s for pod %s/%s/%s is ready", sb.id, sb.tenant, sb.namespace,
                 sb.name, extra={"POD_SANDBOX_ID": sb.id})
        return sb.id

    def _undo_new_sandbox(self, sandbox_id: str) -> None:
        """A new sandbox whose RunPodSandbox failed: its network (whatever setup did not
        undo itself) and its record go; a network that cannot be torn down now (a CNI
        DEL failing) is left to reconcile's retries, since no RPC names it any more."""
        try:
            self.networks.teardown(sandbox_id)
        except Exception as e:
            self._reconciler.mark(sandbox_id, "the undo of a failed RunPodSandbox left its "
                                  f"network behind: {e}")
        self.state.delete_sandbox(sandbox_id)

    def sandbox(self, sandbox_id: str) -> SandboxRecord:
        sb = self.state.sandbox(sandbox_id)
        if sb is None:
            raise NotFound(f"pod sandbox {shown(sandbox_id)} not found")
        return sb

    def sandboxes(self) -> list[SandboxRecord]:
        return self.state.sandboxes()

    def stop_sandbox(self, sandbox_id: str) -> None:
        if self.state.sandbox(sandbox_id) is None:
            return  # already gone: success, as the CRI requires
        if self.state.containers_of(sandbox_id):
            self.ensure_reconciled()  # as the container calls do
        with self.state.pod_lock(sandbox_id):
            # Marked first, under the pod lock, so a Create or Start waiting for the lock
            # finds the sandbox stopped; the record is read here, never before the lock.
            if self.state.change_sandbox(sandbox_id, _not_ready) is None:
                return  # removed meanwhile
            faults.point("stop_sandbox.recorded", sandbox_id)
            for c in self.state.containers_of(sandbox_id):
                self._containers.stop_locked(c.id, 0)
            faults.point("stop_sandbox.containers_stopped", sandbox_id)
            self.networks.teardown(sandbox_id)
        for c in self.state.containers_of(sandbox_id):
            self._containers.flush_console(c.id)

    def remove_sandbox(self, sandbox_id: str) -> None:
        if self.state.sandbox(sandbox_id) is None:
            return
        if self.state.containers_of(sandbox_id):
            self.ensure_reconciled()  # as the container calls do
        # One hold of the pod lock from the mark to the delete: a CreateContainer either
        # finished before (its VM is removed here) or finds the sandbox removing or gone;
        # before, a VM created between the listing of the containers and the lock
        # outlived its sandbox (issue 9 item 8).
        with self.state.pod_lock(sandbox_id):
            self._remove_locked(sandbox_id)

    def _remove_locked(self, sandbox_id: str) -> None:
        """RemovePodSandbox's steps, the record marked first (so no container is made in
        it from then on, and a removal cut short is finished by reconcile, a repeated call
        or the pod's next RunPodSandbox). The caller holds the pod lock."""
        if self.state.change_sandbox(sandbox_id, _removing) is None:
            return
        faults.point("remove_sandbox.recorded", sandbox_id)
        for c in self.state.containers_of(sandbox_id):
            self._containers.remove_locked(c.id)
        faults.point("remove_sandbox.containers_removed", sandbox_id)
        self.networks.teardown(sandbox_id)
        faults.point("remove_sandbox.network_removed", sandbox_id)
        self.state.delete_sandbox(sandbox_id)
        log.info("sandbox %s removed", sandbox_id, extra={"POD_SANDBOX_ID": sandbox_id})

    # -- containers (containers.py) -------------------------------------------------------

    def containers(self) -> list[ContainerRecord]:
        return self._containers.containers()

    def containers_of(self, sandbox_id: str) -> list[ContainerRecord]:
        return self.state.containers_of(sandbox_id)

    def container(self, cid: str) -> ContainerRecord:
        return self._containers.container(cid)

    def image_in_use(self, digest: str) -> bool:
        return self._containers.image_in_use(digest)

    def create_container(self, sandbox_id: str, c: ContainerInput) -> str:
        return self._containers.create(sandbox_id, c)

    def start_container(self, cid: str) -> None:
        self._containers.start(cid)

    def stop_container(self, cid: str, timeout: int) -> None:
        self._containers.stop(cid, timeout)

    def remove_container(self, cid: str) -> None:
        self._containers.remove(cid)

    def reopen_log(self, cid: str) -> None:
        self._containers.reopen_log(cid)

    # -- Arktos NICs ----------------------------------------------------------------------

    def resolve_pod(self, ref: str) -> SandboxRecord:
        """The sandbox named by an Arktos NIC request: a sandbox id, or (as the Arktos kubelet
        sends it) the pod's name, matched among ready sandboxes."""
        sb = self.state.sandbox(ref)
        if sb is not None:
            return sb
        named = [s for s in self.state.sandboxes()
                 if s.name == ref and s.state == SANDBOX_READY]
        if len(named) == 1:
            return named[0]
        if len(named) > 1:
            raise FailedPrecondition(f"pod name {shown(ref)} is ambiguous: "
                                     f"{len(named)} ready sandboxes carry it; use the id")
        raise NotFound(f"no pod sandbox with id or name {shown(ref)}")

    def _vm_of(self, sandbox_id: str) -> str | None:
        """The UUID of the sandbox's VM, None when it has none or when the domain with that
        UUID is not ours (the VM vanished and another runtime instance took the UUID):
        NIC hot-plug then leaves that domain alone."""
        cid = self._recorded_vm(sandbox_id)
        return None if cid is None or self._domains.foreign(cid, sandbox_id) else cid

    def _recorded_vm(self, sandbox_id: str) -> str | None:
        return next((c.id for c in self.state.containers_of(sandbox_id)
                     if c.state != CREATING), None)

    def attach_nic(self, pod: str, nic: NicInfo, vpc: str) -> None:
        sb = self.resolve_pod(pod)
        with self.state.pod_lock(sb.id):
            vm = self._vm_of(sb.id)
            if vm is None and self._recorded_vm(sb.id) is not None:
                raise FailedPrecondition(f"the VM of pod sandbox {sb.id} is not this "
                                         "runtime's domain any more; not plugging into it")
            self.networks.attach_nic(sb.id, vm, nic, vpc)

    def detach_nic(self, pod: str, name: str) -> None:
        sb = self.resolve_pod(pod)
        with self.state.pod_lock(sb.id):
            self.networks.detach_nic(sb.id, self._vm_of(sb.id), name)

    def list_nics(self, pod: str) -> list[NicStatus]:
        sb = self.resolve_pod(pod)
        return self.networks.list_nics(sb.id, self._vm_of(sb.id))
