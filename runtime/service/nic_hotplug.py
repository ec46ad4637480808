"""The Arktos NIC hot-plug RPCs on a pod network: Attach/Detach/ListNetworkInterfaces.

A NIC is one more CNI ADD (CNI_IFNAME = the NIC's name) with its own CNI_ARGS, bridged to
a tap like the pod's own NICs, given a static DHCP lease, and plugged into the VM's
definition (and the running VM) when there is one. Every step is recorded before it is
taken, and undone in reverse on failure; a restart finds an attach cut short by a crash
in the record (state "adding") and `PodNetworks.restore_sandbox` rolls it back with
`remove`; a detach cut short (state "detaching") it finishes the same way.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

from ..adapters import libvirt_nics, netns, vmnet
from ..adapters.domain_xml import render_interface
from ..checks import cni_value_problem, shown
from ..errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from . import faults
from .network_state import (
    ADDING,
    DETACHING,
    NIC_READY,
    READY,
    Attachment,
    NetworkRecords,
    NicStatus,
    PodState,
    nic_statuses,
)
from .nic_spec import NicInfo, ip_problem, nic_name_problem, nics_to_json
from .pod_wiring import PodWiring

log = logging.getLogger(__name__)


def validate_nic(nic: NicInfo, vpc: str = "") -> None:
    """A NicSpec from AttachNetworkInterface; InvalidArgument naming the bad field."""
    if not nic.name:
        raise InvalidArgument("NicSpec.Name is required")
    problem = nic_name_problem(nic.name)
    if problem:
        raise InvalidArgument(f"NicSpec.Name {problem}")
    for field, value in (("SubnetName", nic.subnet_name), ("PortId", nic.port_id),
                         ("IpAddress", nic.ip_address), ("tag", nic.tag), ("VPC", vpc)):
        problem = cni_value_problem(value)
        if problem is not None:
            raise InvalidArgument(f"NicSpec.{field} {problem}, which CNI_ARGS cannot carry")
    if nic.ip_address:
        problem = ip_problem(nic.ip_address)
        if problem:
            raise InvalidArgument(f"NicSpec.IpAddress {problem}")


class NicHotplug:
    def __init__(self, records: NetworkRecords, wiring: PodWiring,
                 libvirt_conn: libvirt_nics.ConnGetter | None,
                 template_dirs: Sequence[Path | str] | None,
                 detach_timeout: float) -> None:
        self._records = records
        self._wiring = wiring
        self._conn = libvirt_conn
        self._template_dirs = template_dirs
        self._detach_timeout = detach_timeout

    def _libvirt(self) -> libvirt_nics.ConnGetter:
        if self._conn is None:
            raise FailedPrecondition("no libvirt connection was given to PodNetworks")
        return self._conn

    def _xml(self, port: vmnet.Port) -> str:
        return render_interface(port.interface_spec, self._template_dirs)

    def attach_nic(self, sandbox_id: str, domain_uuid: str | None, nic: NicInfo,
                   vpc: str = "") -> NicStatus:
        """AttachNetworkInterface: CNI ADD on CNI_IFNAME = nic.name, with CNI_ARGS the pod's
        plus VPC (the NIC's, else the pod's), NICs=[this NIC] and IP=nic.ip_address (when
        given); a bridge and tap; a static DHCP lease; the NIC plugged into the domain
        (definition, and the running VM) when `domain_uuid` is given. All undone on failure.
        """
        validate_nic(nic, vpc)
        records, wiring = self._records, self._wiring
        records.current(sandbox_id)  # NotFound before any lock
        with records.locked(sandbox_id):
            st = records.current(sandbox_id)
            if not st.ready:
                raise FailedPrecondition(f"the network of pod sandbox {sandbox_id} is not ready")
            cut_short = next((a for a in st.attachments if a.ifname == nic.name
                              and a.hotplug and a.state == ADDING), None)
            if cut_short is not None:
                # An attach of this NIC cut short by a crash (one in progress would hold
                # the lock): the kubelet's retry rolls it back and attaches afresh.
                log.info("rolling back NIC %s of %s, its attach cut short, before attaching "
                         "it again", nic.name, sandbox_id, extra={"POD_SANDBOX_ID": sandbox_id})
                self.remove(st, nic.name)
                st = records.current(sandbox_id)
            for att in st.attachments:
                if att.ifname == nic.name or any(n.name == nic.name for n in att.nics):
                    raise AlreadyExists(f"NIC {nic.name} is already attached to pod sandbox "
                                        f"{sandbox_id}")
            if not netns.exists(st.netns):
                raise FailedPrecondition(f"the network namespace of {sandbox_id} is gone")
            if netns.link(nic.name, st.netns) is not None:
                raise AlreadyExists(f"pod sandbox {sandbox_id} already has an interface "
                                    f"{nic.name}")
            the_vpc = vpc or st.vpc
            # The pod's cni-args may carry IP= for eth0; a new NIC never inherits it.
            extra = [(k, v) for k, v in st.extra_args if k != "IP"]
            if nic.ip_address:
                extra.append(("IP", nic.ip_address))
            args = wiring.base_args(st, the_vpc, nics_to_json([nic]), extra)
            att = Attachment(ifname=nic.name, args=args, hotplug=True, vpc=the_vpc,
                             nics=(nic,))
            st = records.save(st.with_attachment(att))
            plugged = False
            try:
                faults.point("attach_nic.recorded", sandbox_id)
                result = wiring.cni.add(st.config, wiring.rt(st, att))
                faults.point("attach_nic.cni_added", sandbox_id)
                st = records.save(st.with_attachment(dataclasses.replace(att, result=result)))
                st = wiring.wire(st, nic.name, (nic.name,))
                faults.point("attach_nic.wired", sandbox_id)
                wiring.restart_dhcp(st)
                faults.point("attach_nic.dhcp", sandbox_id)
                if domain_uuid is not None:
                    att = dataclasses.replace(st.attachment(nic.name), domain=domain_uuid)
                    st = records.save(st.with_attachment(att))
                    for port in att.ports:
                        plugged = libvirt_nics.attach(self._libvirt(), domain_uuid,
                                                      port.guest_mac, self._xml(port)) or plugged
                    vmnet.move_opened_taps(st.netns, att.ports)
                faults.point("attach_nic.plugged", sandbox_id)
                att = dataclasses.replace(st.attachment(nic.name), state=READY)
                st = records.save(st.with_attachment(att))
            except BaseException:
                try:
                    # the record as last saved: it names everything made so far
                    latest = records.current(sandbox_id)
                    self.remove(latest, nic.name)
                except Exception:
                    log.exception("undoing NIC %s of %s failed", nic.name, sandbox_id,
                                  extra={"POD_SANDBOX_ID": sandbox_id})
                raise
        log.info("NIC %s attached to %s%s", nic.name, sandbox_id,
                 " (live)" if plugged else "", extra={"POD_SANDBOX_ID": sandbox_id})
        return NicStatus(nic=nic, vpc=the_vpc, state=NIC_READY)

    def detach_nic(self, sandbox_id: str, domain_uuid: str | None, nic_name: str) -> None:
        """DetachNetworkInterface: unplug from the VM and the definition, tap, bridge, lease,
        CNI DEL. NotFound if no such NIC; the pod's own NICs (from RunPodSandbox) cannot
        be detached (FailedPrecondition)."""
        self._records.current(sandbox_id)  # NotFound before any lock
        with self._records.locked(sandbox_id):
            st = self._records.current(sandbox_id)
            att = next((a for a in st.attachments
                        if a.hotplug and (a.ifname == nic_name
                                          or any(n.name == nic_name for n in a.nics))), None)
            if att is None:
                if any(n.name == nic_name or a.ifname == nic_name
                       for a in st.attachments for n in [*a.nics, NicInfo(name=a.ifname)]):
                    raise FailedPrecondition(
                        f"NIC {shown(nic_name)} came with pod sandbox {sandbox_id}; it cannot be "
                        "detached")
                raise NotFound(f"pod sandbox {sandbox_id} has no NIC {shown(nic_name)}")
            att = dataclasses.replace(att, state=DETACHING, domain=domain_uuid or att.domain)
            st = self._records.save(st.with_attachment(att))
            faults.point("detach_nic.recorded", sandbox_id)
            self.remove(st, att.ifname)
        log.info("NIC %s detached from %s", nic_name, sandbox_id,
                 extra={"POD_SANDBOX_ID": sandbox_id})

    def remove(self, st: PodState, ifname: str) -> None:
        """Reverses attach_nic of attachment `ifname` in order, unplugging it from the
        domain it records; safe to repeat from any point. The caller holds the lock."""
        records, wiring = self._records, self._wiring
        att = st.attachment(ifname)
        sid = st.sandbox_id
        if att.domain:
            for port in att.ports:
                libvirt_nics.detach(self._libvirt(), att.domain, port.guest_mac,
                                    self._xml(port), self._detach_timeout)
        faults.point("detach_nic.unplugged", sid)
        wired = {p.slot for p in att.ports}
        for port in att.ports:
            vmnet.unwire(st.netns, port)
        # a slot reserved but not yet recorded in att.ports (wire cut short)
        others = {p.slot for p in st.ports()}
        for slot in range(st.next_slot):
            if slot not in others and slot not in wired:
                vmnet.unwire(st.netns, vmnet.Port(
                    ifname="", slot=slot, bridge=vmnet.bridge_name(slot),
                    tap=vmnet.tap_name(st.sandbox_id, slot), guest_mac="", mtu=1500))
        st = records.save(st.with_attachment(dataclasses.replace(att, ports=())))
        faults.point("detach_nic.unwired", sid)
        wiring.restart_dhcp(st)
        faults.point("detach_nic.dhcp", sid)
        wiring.cni.delete(st.config, wiring.rt(st, att), att.result)
        faults.point("detach_nic.cni_deleted", sid)
        records.save(st.without_attachment(ifname))

    def list_nics(self, sandbox_id: str, domain_uuid: str | None = None) -> list[NicStatus]:
        """ListNetworkInterfaces: every NIC of the pod, checked against the domain when given
        (live devices if it runs, else its definition): a NIC the VM lacks is NIC_FAILED."""
        st = self._records.current(sandbox_id)
        macs: list[str] | None = None
        if domain_uuid is not None:
            try:
                live, config = libvirt_nics.domain_macs(self._libvirt(), domain_uuid)
                macs = live if live is not None else config
            except NotFound:
                macs = None
        return nic_statuses(st, macs)

