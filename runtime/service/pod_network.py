"""Pod networking: a namespace per sandbox, CNI ADD/DEL, the VM's NICs bridged to CNI's
interfaces, DHCP, and (through nic_hotplug) the Arktos NIC hot-plug RPCs.

The records and their persistence are in network_state (the store's `networks` table,
written before each side effect); the per-sandbox directory under `root` holds only
artefacts (dnsmasq's configuration, leases and pid). Status answers from memory.

Where the pod lifecycle calls it:
  reconciling             restore_sandbox(id) for each sandbox (idempotent)
  RunPodSandbox           setup(sandbox_id, tenant, namespace, name, vm) -> PodNetwork
  CreateContainer         network(sandbox_id): .network_info for render_seed,
                          .interfaces for DomainSpec (every (re)definition of the domain)
  StartContainer          before_vm_start(id); domain start; after_vm_started(id)
                          (and around anything else that starts a new QEMU process)
  PodSandboxStatus        status(sandbox_id): .ip, .ips, .nics
  Stop/RemovePodSandbox   teardown(sandbox_id), after the VM is stopped
  Attach/Detach/ListNetworkInterfaces  attach_nic / detach_nic / list_nics
  reconciling             sandbox_ids()
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from ..adapters import cni, dhcp, libvirt_nics, netns, vmnet
from ..adapters.fsutil import make_dirs
from ..checks import check_id
from ..errors import AlreadyExists, FailedPrecondition, RuntimeError_
from . import faults
from .network_state import (
    ADDING,
    DETACHING,
    NETNS_PREFIX,
    PRIMARY_IFNAME,
    READY,
    Attachment,
    NetworkRecords,
    NetworkStatus,
    NicStatus,
    PodNetwork,
    PodState,
    nic_statuses,
    pod_ips,
)
from .nic_hotplug import NicHotplug
from .nic_spec import NicInfo, nics_to_json
from .pod_wiring import PodWiring
from .stats import InterfaceUsage
from .store import Store
from .vmconfig import VMConfig

log = logging.getLogger(__name__)


class PodNetworks:
    def __init__(
        self,
        root: Path,
        store: Store,
        *,
        conf_dir: str,
        bin_dirs: Sequence[str] = cni.DEFAULT_BIN_DIRS,
        libvirt_conn: libvirt_nics.ConnGetter | None = None,
        cni_timeout: float = cni.DEFAULT_TIMEOUT,
        detach_timeout: float = libvirt_nics.DETACH_TIMEOUT,
        template_dirs: Sequence[Path | str] | None = None,
    ) -> None:
        self.root = Path(root)
        make_dirs(self.root, 0o755)
        self.conf_dir = conf_dir
        self._records = NetworkRecords(store)
        self._wiring = PodWiring(self.root, self._records, cni.CNI(bin_dirs, cni_timeout))
        self._nics = NicHotplug(self._records, self._wiring, libvirt_conn, template_dirs,
                                detach_timeout)

    def sandbox_ids(self) -> list[str]:
        """Sandboxes with network state here (for reconciling with the sandbox store)."""
        return self._records.ids()

    # -- the pod's network --------------------------------------------------------------------

    def setup(self, sandbox_id: str, tenant: str, namespace: str, name: str,
              vm: VMConfig) -> PodNetwork:
        """RunPodSandbox: namespace, CNI ADD (eth0), bridge, tap, DHCP. Idempotent.

        On failure everything made is undone (CNI DEL included) and the error raised:
        Unavailable (plugin failed / garbage / no config), DeadlineExceeded (plugin hung),
        InvalidArgument (a value CNI_ARGS cannot carry).
        """
        check_id("pod sandbox id", sandbox_id)
        records, wiring = self._records, self._wiring
        with records.locked(sandbox_id):
            old = records.get(sandbox_id)
            if old is not None and old.ready:
                return wiring.view(old)
            if old is not None:
                log.info("redoing the half-made network of %s", sandbox_id,
                         extra={"POD_SANDBOX_ID": sandbox_id})
                self._teardown_locked(old)
            st = PodState(sandbox_id=sandbox_id, netns=NETNS_PREFIX + sandbox_id,
                          config=cni.load_network_config(self.conf_dir), tenant=tenant,
                          namespace=namespace, name=name, vpc=vm.vpc,
                          extra_args=tuple(vm.cni_args), server_address=dhcp.SERVER_ADDRESS)
            args = wiring.base_args(st, vm.vpc, nics_to_json(vm.nics) if vm.nics else "",
                                    vm.cni_args)
            att = Attachment(ifname=PRIMARY_IFNAME, args=args, vpc=vm.vpc, nics=tuple(vm.nics))
            # before the first side effect: teardown finds whatever follows
            st = records.save(st.with_attachment(att))
            try:
                faults.point("run_sandbox.network_recorded", sandbox_id)
                # Ours alone: a namespace of this name that exists already was not made by
                # this runtime (every one of ours has a record, written before it is made
                # and forgotten after it is deleted); it may be another runtime's on this
                # host with the same sandbox id. Nothing of it is touched, not even by the
                # undo below: CNI DEL in it would unwire that runtime's pod.
                netns.create(st.netns, exclusive=True)
            except AlreadyExists:
                records.forget(sandbox_id)
                raise
            try:
                faults.point("run_sandbox.netns", sandbox_id)
                result = wiring.cni.add(st.config, wiring.rt(st, att))
                faults.point("run_sandbox.cni_added", sandbox_id)
                st = records.save(st.with_attachment(dataclasses.replace(att, result=result)))
                faults.point("run_sandbox.cni_recorded", sandbox_id)
                st = dataclasses.replace(st, server_address=dhcp.server_address(
                    [ipc.address for ipc in cni.parse_result(result).ips]))
                st = wiring.wire(st, PRIMARY_IFNAME, ())
                faults.point("run_sandbox.wired", sandbox_id)
                wiring.restart_dhcp(st)
                faults.point("run_sandbox.dhcp", sandbox_id)
                att = dataclasses.replace(st.attachment(PRIMARY_IFNAME), state=READY)
                st = records.save(dataclasses.replace(st.with_attachment(att), ready=True))
            except BaseException:
                try:
                    # the record as last saved: it names everything made so far
                    self._teardown_locked(records.get(sandbox_id) or st)
                except Exception:
                    log.exception("undoing the network of %s failed", sandbox_id,
                                  extra={"POD_SANDBOX_ID": sandbox_id})
                raise
        log.info("network of %s ready: %s", sandbox_id, pod_ips(st)[0] or "(no address)",
                 extra={"POD_SANDBOX_ID": sandbox_id})
        return wiring.view(st)

    def network(self, sandbox_id: str) -> PodNetwork:
        """CreateContainer: the NICs, seed network and pod IP (hot-plugged NICs included)."""
        return self._wiring.view(self._records.current(sandbox_id))

    def status(self, sandbox_id: str) -> NetworkStatus:
        """PodSandboxStatus: the pod IP and NIC states, from memory (no libvirt call)."""
        st = self._records.current(sandbox_id)
        ip, ips = pod_ips(st)
        return NetworkStatus(ip=ip, ips=ips, nics=tuple(nic_statuses(st, None)),
                             netns_present=netns.exists(st.netns))

    def endpoint(self, sandbox_id: str) -> tuple[str, str] | None:
        """PortForward: (the pod's namespace, the VM's primary address), None when the
        pod has no network record."""
        st = self._records.get(sandbox_id)
        return None if st is None else (st.netns, pod_ips(st)[0])

    def interface_usage(self, sandbox_id: str) -> list[InterfaceUsage]:
        """Stats: each VM NIC's counters as the guest sees them (its tap's, rx and tx
        swapped), by pod interface name, from one netlink dump in the pod's namespace
        (libvirt cannot read a tap moved there); empty when the pod has no network."""
        st = self._records.get(sandbox_id)
        if st is None or not st.ports():
            return []
        try:
            with netns.open_netlink(st.netns) as nl:
                links = {link.name: link for link in nl.links()}
        except RuntimeError_ as e:  # the namespace went meanwhile (a teardown): no figures,
            log.debug("no network counters for %s: %s", sandbox_id, e.message,  # not an error
                      extra={"POD_SANDBOX_ID": sandbox_id})
            return []
        return [InterfaceUsage(name=p.ifname, rx_bytes=link.tx_bytes, rx_errors=link.tx_errors,
                               tx_bytes=link.rx_bytes, tx_errors=link.rx_errors)
                for p in st.ports() if (link := links.get(p.tap)) is not None]

    def teardown(self, sandbox_id: str) -> None:
        """StopPodSandbox / RemovePodSandbox: dnsmasq, taps, CNI DEL, namespace. Idempotent.

        Works from the stored state alone (after a daemon restart or a host reboot). A DEL
        that fails keeps the state and raises (Unavailable/DeadlineExceeded); call again.
        """
        if self._records.get(sandbox_id) is None:  # looked up before any lock
            return  # nothing of ours (see below)
        with self._records.locked(sandbox_id):
            st = self._records.get(sandbox_id)
            if st is None:
                # Nothing of ours: a namespace is made only after its record is saved and
                # the record forgotten only once the namespace is deleted. One of this
                # name would be someone else's (another runtime's on this host).
                return
            self._teardown_locked(st)
        log.info("network of %s removed", sandbox_id, extra={"POD_SANDBOX_ID": sandbox_id})

    def _teardown_locked(self, st: PodState) -> None:
        # Not ready from here on, even if a CNI DEL fails below: restore_sandbox() must not bring
        # DHCP back for a pod half torn down; the next teardown retries the DEL.
        records, wiring = self._records, self._wiring
        sid = st.sandbox_id
        if st.ready:
            st = records.save(dataclasses.replace(st, ready=False))
        faults.point("network_teardown.recorded", sid)
        artefacts = wiring.artefacts(st.sandbox_id)
        dhcp.stop(artefacts)
        faults.point("network_teardown.dhcp_stopped", sid)
        for slot in range(st.next_slot):
            tap = vmnet.tap_name(st.sandbox_id, slot)
            netns.delete_link(tap)
            netns.delete_link(tap, st.netns)
        faults.point("network_teardown.taps_deleted", sid)
        first: Exception | None = None
        for att in reversed(st.attachments):
            try:
                wiring.cni.delete(st.config, wiring.rt(st, att), att.result)
            except RuntimeError_ as e:
                log.error("CNI DEL of %s/%s failed: %s", st.sandbox_id, att.ifname, e,
                          extra={"POD_SANDBOX_ID": st.sandbox_id})
                first = first or e
                continue
            faults.point("network_teardown.cni_deleted", sid)
            st = records.save(st.without_attachment(att.ifname))
        if first is not None:
            raise first
        netns.delete(st.netns)
        faults.point("network_teardown.netns_deleted", sid)
        # the artefacts go first: a crash in between leaves a record whose teardown repeats
        shutil.rmtree(artefacts, ignore_errors=True)
        records.forget(st.sandbox_id)

    # -- the VM's lifecycle ---------------------------------------------------------------------

    def before_vm_start(self, sandbox_id: str) -> None:
        """StartContainer, before the domain starts: every NIC's tap unopened in the root
        namespace, where libvirt looks for it (a previous run left it in the pod's)."""
        with self._records.locked(sandbox_id):
            st = self._records.current(sandbox_id)
            if not netns.exists(st.netns):
                raise FailedPrecondition(
                    f"the network namespace of pod sandbox {sandbox_id} is gone (was the host "
                    "rebooted?); the pod needs a new sandbox")
            vmnet.ensure_taps(st.netns, st.ports())

    def after_vm_started(self, sandbox_id: str) -> None:
        """StartContainer, once the domain runs: QEMU opened the taps; bridge them."""
        with self._records.locked(sandbox_id):
            st = self._records.current(sandbox_id)
            moved = vmnet.move_opened_taps(st.netns, st.ports())
            log.debug("moved taps %s into %s", moved, st.netns,
                      extra={"POD_SANDBOX_ID": sandbox_id})

    def restore_sandbox(self, sandbox_id: str) -> None:
        """Reconciling: brings one pod network back to its steady state; raises when that
        fails (the caller retries later).

        dnsmasq is restarted where it is not running (systemd ends it with the daemon);
        taps QEMU opened while the daemon was down are bridged; a hot-plug cut short by a
        crash is rolled back (its DEL run), a hot-unplug cut short finished. A network
        whose namespace vanished (host reboot) is left for teardown, which still runs its
        DEL.
        """
        with self._records.locked(sandbox_id):
            self._restore_locked(sandbox_id)

    def restore(self) -> None:
        """restore_sandbox for every pod network, each failure logged."""
        for sandbox_id in self.sandbox_ids():
            try:
                self.restore_sandbox(sandbox_id)
            except Exception:
                log.exception("restoring the network of %s failed", sandbox_id,
                              extra={"POD_SANDBOX_ID": sandbox_id})

    def _restore_locked(self, sandbox_id: str) -> None:
        st = self._records.get(sandbox_id)
        if st is None or not st.ready:
            return
        if not netns.exists(st.netns):
            log.warning("network namespace %s of %s is gone; teardown will run its CNI DEL",
                        st.netns, sandbox_id, extra={"POD_SANDBOX_ID": sandbox_id})
            return
        failed: Exception | None = None
        for att in [a for a in st.attachments
                    if a.hotplug and a.state in (ADDING, DETACHING)]:
            log.info("%s NIC %s of %s: its %s was cut short",
                     "rolling back" if att.state == ADDING else "finishing the detach of",
                     att.ifname, sandbox_id, "attach" if att.state == ADDING else "detach",
                     extra={"POD_SANDBOX_ID": sandbox_id})
            try:
                self._nics.remove(self._records.current(sandbox_id), att.ifname)
            except Exception as e:  # the pod's other NICs still need their taps/DHCP
                log.exception("removing NIC %s of %s failed", att.ifname,
                              sandbox_id, extra={"POD_SANDBOX_ID": sandbox_id})
                failed = failed or e
        st = self._records.current(sandbox_id)
        vmnet.move_opened_taps(st.netns, st.ports())
        vmnet.ensure_routes_to_guest(st.netns, st.ports(), st.server_address)
        if not dhcp.running(self._wiring.artefacts(sandbox_id)):
            self._wiring.restart_dhcp(st)
        if failed is not None:
            raise failed

    # -- NICs (nic_hotplug) ---------------------------------------------------------------------

    def attach_nic(self, sandbox_id: str, domain_uuid: str | None, nic: NicInfo,
                   vpc: str = "") -> NicStatus:
        """AttachNetworkInterface; see NicHotplug.attach_nic."""
        return self._nics.attach_nic(sandbox_id, domain_uuid, nic, vpc)

    def detach_nic(self, sandbox_id: str, domain_uuid: str | None, nic_name: str) -> None:
        """DetachNetworkInterface; see NicHotplug.detach_nic."""
        self._nics.detach_nic(sandbox_id, domain_uuid, nic_name)

    def list_nics(self, sandbox_id: str, domain_uuid: str | None = None) -> list[NicStatus]:
        """ListNetworkInterfaces; see NicHotplug.list_nics."""
        return self._nics.list_nics(sandbox_id, domain_uuid)
