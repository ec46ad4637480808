"""Internal qcow2 snapshots of our domains through libvirt: disk and memory state kept
inside the VM's own root disk (see the README, "Snapshots", for why internal).

The snapshot XML is built with ElementTree, which escapes every value; the snapshot name
(the caller's snapshot id) is checked before it gets here anyway. Only the qcow2 disks
that the guest writes are snapshotted; the read-only seed ISO (raw) is marked
snapshot='no', since libvirt refuses an internal snapshot of a raw disk.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET

import libvirt

from ..errors import FailedPrecondition
from .libvirt_domains import Domains, call

log = logging.getLogger(__name__)

# libvirt's snapshot states, as the service records them.
RUNNING, PAUSED, SHUTOFF = "running", "paused", "shutoff"


def snapshot_disks(domain_xml: str) -> list[tuple[str, bool]]:
    """(target dev, snapshotted?) for each disk of a domain: internal for writable qcow2
    disks, 'no' for the others (the read-only seed ISO)."""
    out = []
    for disk in ET.fromstring(domain_xml).iter("disk"):
        target = disk.find("target")
        if target is None or not target.get("dev"):
            continue
        driver = disk.find("driver")
        qcow2 = driver is not None and driver.get("type") == "qcow2"
        out.append((str(target.get("dev")), qcow2 and disk.find("readonly") is None))
    return out


def snapshot_xml(name: str, disks: list[tuple[str, bool]], description: str = "") -> str:
    """<domainsnapshot> naming the snapshot and which disks it covers; values escaped."""
    root = ET.Element("domainsnapshot")
    ET.SubElement(root, "name").text = name
    if description:
        ET.SubElement(root, "description").text = description
    disks_el = ET.SubElement(root, "disks")
    for dev, internal in disks:
        ET.SubElement(disks_el, "disk", name=dev, snapshot="internal" if internal else "no")
    return ET.tostring(root, encoding="unicode")


def _state_of(snapshot_xml_text: str) -> str:
    el = ET.fromstring(snapshot_xml_text).find("state")
    state = el.text if el is not None and el.text else SHUTOFF
    return state if state in (RUNNING, PAUSED) else SHUTOFF


def cold_plugged_xml(snapshot_text: str) -> str | None:
    """The snapshot XML with the vCPUs enabled in its saved domain marked not hot-pluggable
    (see DomainSnapshots._cold_plugged); None when there is nothing to change (a disk-only
    snapshot, or no enabled hot-pluggable vCPU)."""
    if _state_of(snapshot_text) == SHUTOFF:
        return None  # disk only: the VM boots, no state is loaded
    root = ET.fromstring(snapshot_text)
    changed = False
    for vcpu in root.findall("./domain/vcpus/vcpu"):
        if vcpu.get("enabled") == "yes" and vcpu.get("hotpluggable") == "yes":
            vcpu.set("hotpluggable", "no")
            changed = True
    return ET.tostring(root, encoding="unicode") if changed else None


class DomainSnapshots:
    """Snapshots of the domains `domains` owns (the same ownership rule: this instance's
    domain of the caller's sandbox)."""

    def __init__(self, domains: Domains) -> None:
        self._domains = domains

    def _dom(self, uuid: str, sandbox_id: str, what: str) -> libvirt.virDomain:
        dom = self._domains.owned(uuid, sandbox_id, what)
        if dom is None:
            raise FailedPrecondition(f"the VM of container {uuid} has no libvirt domain of "
                                     "this runtime (it vanished or is not ours)")
        return dom

    def create(self, uuid: str, sandbox_id: str, name: str) -> str:
        """Takes snapshot `name`: disks and, for a running or paused VM, its memory and
        device state (the VM pauses while its memory is written). Returns the VM state
        the snapshot holds: running, paused or shutoff (disks only)."""
        dom = self._dom(uuid, sandbox_id, "snapshotting")
        with call(f"taking snapshot {name!r} of the VM", uuid):
            xml = snapshot_xml(name, snapshot_disks(dom.XMLDesc(0)),
                               "taken by arktos-vm-runtime (CreateSnapshot)")
            snap = dom.snapshotCreateXML(xml, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC)
            return _state_of(snap.getXMLDesc(0))

    def revert(self, uuid: str, sandbox_id: str, name: str) -> None:
        """Brings the VM back to snapshot `name`; the VM runs afterwards. libvirt 9.0 kills
        a running QEMU and starts a new one with -loadvm: the caller stops the VM first
        and prepares its taps as for a start."""
        dom = self._dom(uuid, sandbox_id, "restoring")
        with call(f"looking up snapshot {name!r} of the VM", uuid):  # NotFound if none
            snap = dom.snapshotLookupByName(name, 0)
        with call(f"restoring the VM to snapshot {name!r}", uuid):
            snap = self._cold_plugged(dom, snap)
            try:
                dom.revertToSnapshot(snap, libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING)
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_SNAPSHOT_REVERT_RISKY:
                    raise FailedPrecondition(
                        f"restoring VM {uuid} to snapshot {name!r} needs a restart of the "
                        f"VM (its devices changed since): {e.get_error_message()}") from e
                raise

    @staticmethod
    def _cold_plugged(dom: libvirt.virDomain,
                      snap: libvirt.virDomainSnapshot) -> libvirt.virDomainSnapshot:
        """The snapshot, its saved domain redefined so that QEMU can load its memory state.

        libvirt starts the new QEMU with -loadvm and adds hot-pluggable vCPUs only once
        QEMU runs, after the state was loaded: a state holding them fails to load
        ("Unknown savevm section or instance 'cpu_common' 1"). Marked not hot-pluggable in
        the snapshot's domain, the vCPUs enabled at the snapshot are on QEMU's command
        line, as in the saved state. The VM's own definition gets them back as hot-pluggable
        after the restore (`rehotpluggable`), for the next start."""
        text = cold_plugged_xml(snap.getXMLDesc(libvirt.VIR_DOMAIN_SNAPSHOT_XML_SECURE))
        if text is None:
            return snap
        flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE
        if snap.isCurrent(0):
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT
        return dom.snapshotCreateXML(text, flags)

    def rehotpluggable(self, uuid: str, sandbox_id: str) -> None:
        """After a restore: every vCPU but the first hot-pluggable again in the VM's
        definition (the running QEMU keeps what it was started with until it stops)."""
        dom = self._domains.owned(uuid, sandbox_id, "redefining")
        if dom is None:
            return
        with call("redefining the VM's vCPUs as hot-pluggable", uuid):
            root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE
                                             | libvirt.VIR_DOMAIN_XML_SECURE))
            vcpus = [v for v in root.findall("./vcpus/vcpu")
                     if v.get("id") != "0" and v.get("hotpluggable") == "no"]
            if not vcpus:
                return
            for v in vcpus:
                v.set("hotpluggable", "yes")
            dom.connect().defineXML(ET.tostring(root, encoding="unicode"))

    def names(self, uuid: str, sandbox_id: str) -> dict[str, str] | None:
        """The VM's snapshots as libvirt lists them: name -> VM state held; None when the
        VM has no domain of ours."""
        dom = self._domains.owned(uuid, sandbox_id, "listing the snapshots of")
        if dom is None:
            return None
        with call("listing the VM's snapshots", uuid):
            return {s.getName(): _state_of(s.getXMLDesc(0)) for s in dom.listAllSnapshots(0)}
