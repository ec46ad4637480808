"""NIC hot-plug on libvirt: plug an `<interface>` into one of our domains and pull it out,
and read which MACs a domain has, by the domain's UUID.

The caller renders the `<interface>` (domain_xml.render_interface) and passes the MAC it
carries. Only domains of ours are touched (libvirt_domains.lookup_ours), and libvirt errors
go through the adapter's one translation (libvirt_domains.call): a missing domain is
NotFound where it must exist and success where it is being removed.
"""

from __future__ import annotations

import logging
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable

import libvirt

from ..errors import Internal, NotFound
from .libvirt_domains import call, lookup_ours

log = logging.getLogger(__name__)

DETACH_TIMEOUT = 20.0

ConnGetter = Callable[[], libvirt.virConnect]


def _domain(get_conn: ConnGetter, uuid: str) -> libvirt.virDomain:
    dom = lookup_ours(get_conn(), uuid)
    if dom is None:
        raise NotFound(f"the VM {uuid} does not exist")
    return dom


def _macs(dom: libvirt.virDomain, flags: int) -> list[str]:
    root = ET.fromstring(dom.XMLDesc(flags))
    return [m.get("address", "").lower() for m in root.findall("./devices/interface/mac")]


def domain_macs(get_conn: ConnGetter, uuid: str) -> tuple[list[str] | None, list[str]]:
    """(MACs of the running domain or None when it is not running, MACs of its definition).
    NotFound when there is no such domain."""
    dom = _domain(get_conn, uuid)
    with call("reading the VM's NICs", uuid):
        live = _macs(dom, 0) if dom.isActive() else None
        config = _macs(dom, libvirt.VIR_DOMAIN_XML_INACTIVE)
    return live, config


def attach(get_conn: ConnGetter, uuid: str, mac: str, xml: str) -> bool:
    """Adds the NIC (`xml`, carrying `mac`) to the domain's definition and, if it runs, to
    the running VM. Returns True when it was plugged into a running VM."""
    dom = _domain(get_conn, uuid)
    with call(f"attaching NIC {mac}", uuid):
        live = bool(dom.isActive())
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG if dom.isPersistent() else 0
        if live:
            flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
        if not flags:
            raise Internal(f"the VM {uuid} is neither running nor defined")
        dom.attachDeviceFlags(xml, flags)
    return live


def detach(get_conn: ConnGetter, uuid: str, mac: str, xml: str,
           timeout: float = DETACH_TIMEOUT) -> bool:
    """Removes the NIC (`xml`, carrying `mac`) from the running VM and the definition;
    absent (the NIC or the whole domain) is success.

    Waits up to `timeout` for the guest to release it; returns False if it did not (the
    tap is deleted anyway, which leaves the guest's device with no backend).
    """
    try:
        dom = _domain(get_conn, uuid)
    except NotFound:
        return True
    try:
        with call(f"detaching NIC {mac}", uuid):
            return _detach(dom, uuid, mac, xml, timeout)
    except NotFound:
        return True  # the domain went away meanwhile


def _detach(dom: libvirt.virDomain, uuid: str, mac: str, xml: str, timeout: float) -> bool:
    if dom.isActive() and mac in _macs(dom, 0):
        dom.detachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    if dom.isPersistent() and mac in _macs(dom, libvirt.VIR_DOMAIN_XML_INACTIVE):
        dom.detachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    deadline = time.monotonic() + timeout
    while dom.isActive() and mac in _macs(dom, 0):
        if time.monotonic() > deadline:
            log.warning("the guest of %s did not release NIC %s in %.0f s", uuid, mac,
                        timeout, extra={"CONTAINER_ID": uuid})
            return False
        time.sleep(0.1)
    return True
