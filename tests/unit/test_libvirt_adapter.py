"""The libvirt adapter and the health probe on libvirt's test:///default driver: domain
operations, lifecycle events, and every libvirt error through the one `translate`."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from arktos_vm_runtime.adapters import libvirt_resize
from arktos_vm_runtime.adapters.domain_xml import render_domain
from arktos_vm_runtime.adapters.libvirt_conn import LibvirtConnection, translate
from arktos_vm_runtime.adapters.libvirt_domains import (
    Domains,
    LifecycleEvent,
    domain_name,
    lookup_ours,
)
from arktos_vm_runtime.adapters.libvirt_resize import DomainResizer, VmPresent
from arktos_vm_runtime.config import Settings
from arktos_vm_runtime.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    NotFound,
    Unavailable,
)
from arktos_vm_runtime.service import designer
from arktos_vm_runtime.service.health import LibvirtHealth
from arktos_vm_runtime.service.records import SandboxRecord
from arktos_vm_runtime.service.vmconfig import VMConfig

URI = "test:///default"
TEMPLATES = [Path(__file__).resolve().parents[2] / "templates"]


class Image:
    virtual_size = 1 << 30


INSTANCE = "inst-1"


def our_xml(cid: str, instance: str = INSTANCE, sandbox: str = "sb-1") -> str:
    pod = SandboxRecord(id=sandbox, name="p", namespace="n", uid=sandbox, tenant="t",
                        attempt=0, state="SANDBOX_READY", created_at=1)
    plan = designer.design(pod, cid, VMConfig(memory_mib=64), Image(),
                           Settings(disable_kvm=True), Path("/var/lib/avr/vms") / cid, (),
                           instance)
    return render_domain(plan.domain, TEMPLATES)


@pytest.fixture
def domains() -> Iterator[Domains]:
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    yield Domains(LibvirtConnection(URI), INSTANCE)


@pytest.fixture
def cid(domains: Domains) -> Iterator[str]:
    cid = str(uuid.uuid4())
    yield cid
    dom = libvirt.open(URI).lookupByUUIDString(cid) if domains.known(cid) else None
    if dom is not None:
        if dom.isActive():
            dom.destroy()
        dom.undefine()


def test_domain_operations_and_events(domains: Domains, cid: str) -> None:
    events: list[LifecycleEvent] = []
    got = threading.Event()

    def listen(ev: LifecycleEvent) -> None:
        if ev.uuid == cid:
            events.append(ev)
            got.set()

    domains.watch(listen)
    assert domains.state(cid) is None and not domains.exists(cid)
    domains.define_new(cid, our_xml(cid))
    assert domains.exists(cid) and domains.state(cid).state == "shutoff"  # type: ignore[union-attr]
    ours = {d.uuid: d for d in domains.ours()}
    assert ours[cid].metadata is not None and ours[cid].metadata.sandbox_id == "sb-1"
    assert ours[cid].metadata.instance == INSTANCE
    test_uuid = libvirt.open(URI).lookupByName("test").UUIDString()
    assert test_uuid not in ours  # the driver's own domain is not ours

    domains.start(cid, "sb-1")
    domains.start(cid, "sb-1")  # already running: nothing to do
    assert domains.state(cid).state == "running"  # type: ignore[union-attr]
    assert got.wait(5) and events[0] == LifecycleEvent(cid, started=True)
    got.clear()
    domains.destroy(cid, "sb-1")
    domains.destroy(cid, "sb-1")  # not running: success
    st = domains.state(cid)
    assert st is not None and (st.state, st.stop_reason) == ("shutoff", "destroyed")
    assert got.wait(5)
    assert events[-1] == LifecycleEvent(cid, stopped=True, stop_reason="destroyed")

    domains.undefine(cid, "sb-1")
    domains.undefine(cid, "sb-1")  # gone: success
    assert domains.state(cid) is None
    with pytest.raises(NotFound, match="does not exist"):
        domains.start(cid, "sb-1")


def test_errors_are_translated(domains: Domains, cid: str) -> None:
    domains.define_new(cid, our_xml(cid))
    domains.start(cid, "sb-1")
    # The test driver has no ACPI: its refusal arrives as a runtime error, code attached.
    with pytest.raises(Unavailable, match="shutting down the VM failed") as e:
        domains.shutdown(cid, "sb-1")
    assert e.value.context["uuid"] == cid
    assert e.value.context["libvirt_code"] == libvirt.VIR_ERR_INVALID_ARG
    with pytest.raises(Unavailable, match="defining the domain failed"):
        domains.define_new(str(uuid.uuid4()), "<domain type='qemu'><name>avr-broken")
    domains.destroy(cid, "sb-1")


def test_translate_picks_the_runtime_error() -> None:
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    conn = libvirt.open(URI)
    with pytest.raises(libvirt.libvirtError) as missing:
        conn.lookupByUUIDString(str(uuid.uuid4()))
    err = translate(missing.value, "looking up", "u1")
    assert isinstance(err, NotFound) and err.context["uuid"] == "u1"
    assert err.message.startswith("looking up failed: ")
    dom = conn.lookupByName("test")
    dom.destroy()
    try:
        with pytest.raises(libvirt.libvirtError) as inactive:
            dom.destroy()
        assert isinstance(translate(inactive.value, "stopping"), FailedPrecondition)
    finally:
        dom.create()


def test_a_foreign_domain_with_a_uuid_is_never_touched(domains: Domains) -> None:
    conn = libvirt.open(URI)
    foreign = conn.lookupByName("test")
    domains.destroy(foreign.UUIDString(), "sb-1")
    domains.undefine(foreign.UUIDString(), "sb-1")
    assert foreign.isActive() and foreign.isPersistent()
    with pytest.raises(Internal, match="not ours"):  # the NIC adapter's lookup
        lookup_ours(conn, foreign.UUIDString())
    with pytest.raises(AlreadyExists, match=foreign.UUIDString()):
        domains.define_new(foreign.UUIDString(), our_xml(foreign.UUIDString()))
    assert conn.lookupByName("test").UUIDString() == foreign.UUIDString()
    assert domain_name("x") == "avr-x"


def test_only_this_instances_domain_of_the_sandbox_is_touched(domains: Domains,
                                                               cid: str) -> None:
    """Another instance's domain (or a legacy one of another sandbox) with our prefix:
    not started, stopped, undefined or redefined; a legacy domain (no instance id) of the
    sandbox named is ours, as the previous version defined it."""
    conn = libvirt.open(URI)
    conn.defineXML(our_xml(cid, instance="other-instance"))
    conn.lookupByUUIDString(cid).create()
    before = conn.lookupByUUIDString(cid).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    with pytest.raises(NotFound, match="not ours"):
        domains.start(cid, "sb-1")
    domains.shutdown(cid, "sb-1")
    domains.destroy(cid, "sb-1")
    domains.undefine(cid, "sb-1")
    with pytest.raises(AlreadyExists, match=cid):
        domains.define_new(cid, our_xml(cid))
    dom = conn.lookupByUUIDString(cid)
    assert dom.isActive() and dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) == before
    dom.destroy()
    dom.undefine()

    conn.defineXML(our_xml(cid, instance=""))  # as the previous version defined it
    assert "instance" not in conn.lookupByUUIDString(cid).XMLDesc(0)
    domains.undefine(cid, "sb-other")  # names another sandbox: not this record's VM
    assert domains.known(cid)
    domains.start(cid, "sb-1")
    domains.undefine(cid, "sb-1")
    assert not domains.known(cid)


def test_connection_errors_are_translated() -> None:
    conn = LibvirtConnection("test:///nonexistent/definitely-missing.xml")
    with pytest.raises(Unavailable, match="connecting to libvirt at test:///nonexistent"):
        conn.get()
    assert LibvirtConnection(URI).probe().count(".") == 2


def _condition_after_probe(health: LibvirtHealth) -> object:
    health.start_probe()
    deadline = time.monotonic() + 5
    while health._probe_started is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    return health.condition


def test_health_probe() -> None:
    healthy: list[bool] = []
    health = LibvirtHealth(LibvirtConnection(URI), 10)
    assert not health.condition.ok and health.condition.reason == "LibvirtNotChecked"
    health.on_healthy(lambda: healthy.append(True))
    cond = _condition_after_probe(health)
    assert cond.ok and healthy == [True]  # type: ignore[attr-defined]
    assert health.version.count(".") == 2 and not health.wedged()

    down = LibvirtHealth(LibvirtConnection("test:///nonexistent/missing.xml"), 10)
    cond = _condition_after_probe(down)
    assert not cond.ok and cond.reason == "LibvirtUnreachable"  # type: ignore[attr-defined]
    assert not down.wedged(), "unreachable is not wedged: the watchdog is still fed"


class HangingConnection:
    """A libvirt connection that hangs mid-call: what libvirtd cannot do on cue."""

    uri = "test:///hanging"

    def __init__(self) -> None:
        self.release = threading.Event()

    def probe(self) -> str:
        self.release.wait(10)
        return "9.0.0"


def test_health_probe_that_hangs_is_wedged() -> None:
    conn = HangingConnection()
    health = LibvirtHealth(conn, 0.1)  # type: ignore[arg-type]
    health.start_probe()
    health.start_probe()  # one in flight: no pile-up
    time.sleep(0.2)
    try:
        assert health.wedged()
        assert health.condition.reason == "LibvirtNotResponding"
    finally:
        conn.release.set()
    deadline = time.monotonic() + 5
    while health.wedged() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert health.condition.ok


def test_ownership_reads_our_metadata_element_alone() -> None:
    """Domains._owned reads only our <metadata> element (virDomainGetMetadata, which hands
    it back without its namespace): the same DomainMetadata as parsing the whole XML; None
    for a domain with no metadata of ours (none at all, or another namespace's)."""
    import uuid as uuid_mod

    from arktos_vm_runtime.adapters.domain_xml import METADATA_NS, parse_metadata
    from arktos_vm_runtime.adapters.libvirt_domains import _our_metadata

    conn = libvirt.open("test:///default")
    ours = (f"<avr:pod xmlns:avr='{METADATA_NS}'><avr:sandbox-id>sb-1</avr:sandbox-id>"
            "<avr:name>web</avr:name><avr:attempt>2</avr:attempt>"
            "<avr:instance>inst-9</avr:instance></avr:pod>")
    other = "<o:pod xmlns:o='https://example.invalid/other'><o:sandbox-id>x</o:sandbox-id></o:pod>"
    made = []
    try:
        for meta in (ours, other, ""):
            name = f"avr-{uuid_mod.uuid4()}"
            xml = (f"<domain type='test'><name>{name}</name><memory>1024</memory>"
                   f"<os><type>hvm</type></os><metadata>{meta}</metadata></domain>")
            made.append(conn.defineXML(xml))
        got = [_our_metadata(d) for d in made]
        assert got[0] == parse_metadata(made[0].XMLDesc(0))
        assert got[0] is not None and (got[0].sandbox_id, got[0].pod_name, got[0].attempt,
                                       got[0].instance) == ("sb-1", "web", 2, "inst-9")
        assert got[1] is None and got[2] is None
    finally:
        for d in made:
            d.undefine()
        conn.close()


def test_size_reads_check_ownership_once_per_domain(domains: Domains, cid: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """ContainerStatus's size read: the ownership check is made once per domain; a domain
    gone, undefined, or redefined by someone else is checked (and refused) again."""
    monkeypatch.setattr(libvirt_resize, "SIZE_MAX_AGE", 0.0)  # this test: no kept answers
    checks: list[str] = []
    real = domains._owned

    def counted(uuid: str, sandbox_id: str, what: str) -> libvirt.virDomain | None:
        checks.append(sandbox_id)
        return real(uuid, sandbox_id, what)

    monkeypatch.setattr(domains, "_owned", counted)
    resizer = DomainResizer(domains)
    domains.define_new(cid, our_xml(cid))
    first = resizer.present(cid, "sb-1")
    assert first is not None and first.vcpus >= 1 and first.memory_kib == 64 * 1024
    assert resizer.present(cid, "sb-1") == first
    assert checks == ["sb-1"]  # the second read used the kept handle
    assert resizer.present(cid, "sb-other") is None  # another sandbox's record: not ours
    assert checks == ["sb-1", "sb-other"]

    conn = libvirt.open(URI)
    conn.lookupByUUIDString(cid).undefine()  # behind the runtime's back
    assert resizer.present(cid, "sb-1") is None
    conn.defineXML(our_xml(cid, instance="other-instance"))  # the same UUID, not ours
    assert resizer.present(cid, "sb-1") is None
    assert checks[-1] == "sb-1"  # checked again, whether the UNDEFINED event came first
    conn.lookupByUUIDString(cid).undefine()

    domains.define_new(cid, our_xml(cid))
    assert resizer.present(cid, "sb-1") is not None
    domains.undefine(cid, "sb-1")  # ours: the kept handle goes with it
    assert resizer.present(cid, "sb-1") is None


def test_a_size_is_kept_until_libvirt_says_the_domain_changed(
        domains: Domains, cid: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`present` keeps libvirt's answer: a change no event reports shows after SIZE_MAX_AGE;
    a lifecycle event, our own resize or our undefine drop it at once; another sandbox's
    record never gets it."""
    monkeypatch.setattr(libvirt_resize, "SIZE_MAX_AGE", 3600.0)
    resizer = DomainResizer(domains)
    domains.define_new(cid, our_xml(cid))
    assert resizer.kept(cid, "sb-1") is None  # nothing read yet
    assert resizer.present(cid, "sb-1") == VmPresent(1, 64 * 1024)
    assert resizer.kept(cid, "sb-1") == VmPresent(1, 64 * 1024)  # the serving loop's peek
    assert resizer.kept(cid, "sb-other") is None
    resizer.apply(cid, "sb-1", None, 40)  # ours: the next read is libvirt's new answer
    assert resizer.kept(cid, "sb-1") is None
    assert resizer.present(cid, "sb-1") == VmPresent(1, 40 * 1024)
    conn = libvirt.open(URI)
    dom = conn.lookupByUUIDString(cid)
    dom.setMemoryFlags(48 * 1024, libvirt.VIR_DOMAIN_AFFECT_CONFIG)  # no event for this
    assert resizer.present(cid, "sb-1") == VmPresent(1, 40 * 1024)  # kept
    assert resizer.present(cid, "sb-other") is None  # kept for sb-1's record only

    dom.create()  # STARTED: libvirt says the domain changed
    deadline = time.monotonic() + 10
    while resizer.present(cid, "sb-1") != VmPresent(1, 48 * 1024):
        assert time.monotonic() < deadline, "the STARTED event did not drop the kept size"
        time.sleep(0.05)

    dom.setMemoryFlags(32 * 1024, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    monkeypatch.setattr(libvirt_resize, "SIZE_MAX_AGE", 0.0)  # as if it had aged out
    assert resizer.present(cid, "sb-1") == VmPresent(1, 32 * 1024)
    domains.undefine(cid, "sb-1")
    assert resizer.present(cid, "sb-1") is None
