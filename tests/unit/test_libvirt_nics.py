"""NIC hot-plug's libvirt adapter on libvirt's test:///default driver: MACs of a defined and
of a running domain, the error translation (missing, foreign, refused) and the "already
gone" cases of detach. The driver cannot attach devices; test_network_vm.py does that on
a real QEMU."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from arktos_vm_runtime.adapters import libvirt_nics
from arktos_vm_runtime.adapters.domain_xml import (
    DomainMetadata,
    InterfaceSpec,
    render_domain,
    render_interface,
)
from arktos_vm_runtime.errors import Internal, NotFound, Unavailable
from tests.unit.test_domain_xml import make_spec

TEMPLATES = [Path(__file__).resolve().parents[2] / "templates"]
NICS = (InterfaceSpec("avt0000000000", "02:00:00:00:00:0a"),
        InterfaceSpec("avt0000000001", "02:00:00:00:00:0b"))


@pytest.fixture
def conn() -> Iterator[libvirt.virConnect]:
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    c = libvirt.open("test:///default")
    yield c
    c.close()


@pytest.fixture
def dom(conn: libvirt.virConnect) -> Iterator[libvirt.virDomain]:
    uid = str(uuid.uuid4())
    spec = make_spec(name="avr-" + uid, uuid=uid, vcpus=1, memory_mib=128,
                     seed_iso=None, interfaces=NICS,
                     metadata=DomainMetadata("sb", "pod", "ns"))
    d = conn.defineXML(render_domain(spec, TEMPLATES))
    yield d
    if d.isActive():
        d.destroy()
    d.undefine()


def test_macs_of_a_defined_and_of_a_running_domain(conn: libvirt.virConnect,
                                                   dom: libvirt.virDomain) -> None:
    macs = [n.mac for n in NICS]
    assert libvirt_nics.domain_macs(lambda: conn, dom.UUIDString()) == (None, macs)
    dom.create()
    assert libvirt_nics.domain_macs(lambda: conn, dom.UUIDString()) == (macs, macs)


def test_a_missing_domain(conn: libvirt.virConnect) -> None:
    uid = str(uuid.uuid4())
    xml = render_interface(NICS[0], TEMPLATES)
    with pytest.raises(NotFound, match="does not exist"):
        libvirt_nics.domain_macs(lambda: conn, uid)
    with pytest.raises(NotFound, match="does not exist"):
        libvirt_nics.attach(lambda: conn, uid, NICS[0].mac, xml)
    assert libvirt_nics.detach(lambda: conn, uid, NICS[0].mac, xml, timeout=1) is True


def test_a_domain_that_is_not_ours_is_never_touched(conn: libvirt.virConnect) -> None:
    foreign = conn.lookupByName("test").UUIDString()  # the driver's own domain
    xml = render_interface(NICS[0], TEMPLATES)
    with pytest.raises(Internal, match="not ours"):
        libvirt_nics.domain_macs(lambda: conn, foreign)
    with pytest.raises(Internal, match="not ours"):
        libvirt_nics.attach(lambda: conn, foreign, NICS[0].mac, xml)
    with pytest.raises(Internal, match="not ours"):
        libvirt_nics.detach(lambda: conn, foreign, NICS[0].mac, xml, timeout=1)


def test_libvirt_refusing_is_unavailable(conn: libvirt.virConnect,
                                         dom: libvirt.virDomain) -> None:
    nic = InterfaceSpec("avt0000000002", "02:00:00:00:00:0c")
    with pytest.raises(Unavailable, match="attaching NIC 02:00:00:00:00:0c"):
        libvirt_nics.attach(lambda: conn, dom.UUIDString(), nic.mac,
                            render_interface(nic, TEMPLATES))


def test_detaching_a_nic_the_domain_lacks_is_success(conn: libvirt.virConnect,
                                                    dom: libvirt.virDomain) -> None:
    nic = InterfaceSpec("avt0000000002", "02:00:00:00:00:0c")
    dom.create()
    assert libvirt_nics.detach(lambda: conn, dom.UUIDString(), nic.mac,
                               render_interface(nic, TEMPLATES), timeout=1) is True
    macs = [n.mac for n in NICS]
    assert libvirt_nics.domain_macs(lambda: conn, dom.UUIDString()) == (macs, macs)


def test_an_unreachable_libvirt_is_unavailable() -> None:
    def gone() -> libvirt.virConnect:
        c = libvirt.open("test:///default")
        c.close()
        return c  # closed: every call on it fails

    with pytest.raises(Unavailable):
        libvirt_nics.domain_macs(gone, str(uuid.uuid4()))
