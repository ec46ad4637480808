"""Pod lifecycle without root: the real Pods, store, designer, domain XML, seed ISO, qcow2
overlay and libvirt adapter on libvirt's test:///default driver (whose domains "run"
without QEMU and send real lifecycle events). The pod network is a fake at PodNetworks'
interface (a real one needs root for namespaces and taps); the image store is a fake at
ImageStore's interface over a real qcow2 file."""

from __future__ import annotations

import dataclasses
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from arktos_vm_runtime.adapters.libvirt_conn import LibvirtConnection
from arktos_vm_runtime.adapters.libvirt_domains import Domains, domain_name
from arktos_vm_runtime.config import Settings
from arktos_vm_runtime.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from arktos_vm_runtime.service import designer
from arktos_vm_runtime.service.pods import ContainerInput, Pods, now_ns
from arktos_vm_runtime.service.records import (
    CREATED,
    CREATING,
    EXITED,
    RUNNING,
    SANDBOX_NOTREADY,
    SANDBOX_READY,
    ContainerRecord,
    SandboxRecord,
)
from arktos_vm_runtime.service.store import Store
from arktos_vm_runtime.service.vmconfig import VMConfig

URI = "test:///default"
TEMPLATES = [Path(__file__).resolve().parents[2] / "templates"]


@dataclasses.dataclass(frozen=True)
class FakeImage:
    id: str
    path: Path
    virtual_size: int
    format: str = "qcow2"


class FakeImages:
    """ImageStore's `status` and `still_stored` over one real qcow2 file."""

    def __init__(self, path: Path) -> None:
        self.image = FakeImage("sha256:" + "ab" * 32, path, 64 << 20)

    def status(self, name: str) -> FakeImage | None:
        return self.image if name in ("img", self.image.id) else None

    def still_stored(self, image_id: str) -> bool:
        return self.status(image_id) is not None


@dataclasses.dataclass(frozen=True)
class FakeNetwork:
    network_info: Any = None
    interfaces: tuple[Any, ...] = ()


class FakeNetworks:
    """PodNetworks' methods as Pods calls them, recording the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.up: set[str] = set()
        self.fail_setup = False

    def setup(self, sid: str, tenant: str, namespace: str, name: str, config: Any) -> None:
        self.calls.append(("setup", sid))
        if self.fail_setup:
            raise NotFound("no CNI config (fake)")
        self.up.add(sid)

    def teardown(self, sid: str) -> None:
        self.calls.append(("teardown", sid))
        self.up.discard(sid)

    def network(self, sid: str) -> FakeNetwork:
        if sid not in self.up:
            raise NotFound(f"no network for {sid}")
        return FakeNetwork()

    def sandbox_ids(self) -> list[str]:
        return sorted(self.up)

    def restore(self) -> None:
        self.calls.append(("restore", ""))

    def before_vm_start(self, sid: str) -> None:
        self.calls.append(("before_vm_start", sid))

    def after_vm_started(self, sid: str) -> None:
        self.calls.append(("after_vm_started", sid))


@pytest.fixture(scope="module")
def base_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    return path


@dataclasses.dataclass
class Env:
    root: Path
    store: Store
    domains: Domains
    networks: FakeNetworks
    images: FakeImages
    made: list[Pods]

    def pods(self) -> Pods:
        p = Pods(Settings(disable_kvm=True, default_memory_mib=128,
                          pod_logs_dir=str(self.root)), self.store,
                 self.domains, self.images, self.networks, self.root / "vms",  # type: ignore[arg-type]
                 TEMPLATES)
        p.ensure_reconciled()
        self.made.append(p)
        return p


@pytest.fixture
def env(tmp_path: Path, base_image: Path) -> Iterator[Env]:
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    e = Env(tmp_path, Store(tmp_path / "state.db"), Domains(LibvirtConnection(URI), "inst-1"),
            FakeNetworks(), FakeImages(base_image), [])
    yield e
    for p in e.made:
        p.close()
    conn = libvirt.open(URI)
    for dom in conn.listAllDomains():  # whatever a failed test left on the shared driver
        if dom.name().startswith("avr-") and (tmp_path.name in dom.XMLDesc(0)):
            if dom.isActive():
                dom.destroy()
            dom.undefine()
    e.store.close()


def sandbox(**kw: Any) -> SandboxRecord:
    uid = str(uuid.uuid4())
    values: dict[str, Any] = dict(id=uid, name="vm-pod", namespace="default", uid=uid,
                                  tenant="t", attempt=0, state=SANDBOX_READY,
                                  created_at=now_ns(), hostname="vm-pod",
                                  log_directory="", annotations={})
    values.update(kw)
    return SandboxRecord(**values)


def container_input(**kw: Any) -> ContainerInput:
    values: dict[str, Any] = dict(name="vm", attempt=0, image="img", log_path="vm/0.log",
                                  labels={"role": "guest"}, annotations={}, envs=[],
                                  sandbox_annotations=None, memory_limit_in_bytes=128 << 20)
    values.update(kw)
    return ContainerInput(**values)


def wait_for(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return value


def libvirt_state(cid: str) -> int | None:
    try:
        return int(libvirt.open(URI).lookupByUUIDString(cid).state()[0])
    except libvirt.libvirtError:
        return None


def test_lifecycle(env: Env, tmp_path: Path) -> None:
    pods = env.pods()
    sb = sandbox(log_directory=str(tmp_path / "logs"))
    assert pods.run_sandbox(sb) == sb.id
    assert pods.run_sandbox(sb) == sb.id  # idempotent
    assert env.networks.calls.count(("setup", sb.id)) == 1
    assert pods.sandbox(sb.id).state == SANDBOX_READY

    cid = pods.create_container(sb.id, container_input())
    assert pods.create_container(sb.id, container_input()) == cid  # one VM per sandbox
    assert cid == designer.container_id(sb.id, VMConfig())
    rec = pods.container(cid)
    assert rec.state == CREATED and rec.image_ref == env.images.image.id
    assert rec.memory_mib == 128 and rec.log_path == str(tmp_path / "logs" / "vm" / "0.log")
    vm_dir = Path(rec.vm_dir)
    assert {p.name for p in vm_dir.iterdir()} == {"root.qcow2", "seed.iso"}
    assert libvirt_state(cid) == libvirt.VIR_DOMAIN_SHUTOFF
    xml = libvirt.open(URI).lookupByUUIDString(cid).XMLDesc(0)
    assert f"<name>{domain_name(cid)}</name>" in xml and sb.id in xml

    # The console as virtlogd would write it: copied into the CRI log once started.
    (vm_dir / "console.log").write_bytes(b"booting\r\nGUEST-UP\n")
    held = pods.container(cid)
    pods.start_container(cid)
    assert held.state == CREATED, "a record a reader holds never changes under it"
    assert pods.container(cid).state == RUNNING
    assert libvirt_state(cid) == libvirt.VIR_DOMAIN_RUNNING
    log = Path(pods.container(cid).log_path)
    wait_for(lambda: log.exists() and b"GUEST-UP" in log.read_bytes())
    assert ("after_vm_started", sb.id) in env.networks.calls
    pods.start_container(cid)  # idempotent

    # The guest powers itself off (the test driver has no ACPI; integration tests cover
    # StopContainer's ACPI path): libvirt's STOPPED event alone makes it EXITED.
    libvirt.open(URI).lookupByUUIDString(cid).shutdown()
    c = wait_for(lambda: (r := pods.container(cid)).state == EXITED and r)
    assert (c.exit_code, c.reason) == (0, "Completed")
    assert c.finished_at >= c.started_at > 0
    pods.stop_container(cid, 30)  # stopped already: success
    assert env.store.get("containers", cid)["state"] == EXITED  # type: ignore[index]
    # the STOPPED event flushed the console: its offset is saved at once, not in a second
    assert env.store.get("containers", cid)["console_offset"] == 18  # type: ignore[index]

    pods.start_container(cid)
    pods.stop_sandbox(sb.id)  # destroys the VM without waiting for the guest
    c = pods.container(cid)
    assert (c.state, c.exit_code, c.reason) == (EXITED, 137, "Killed")
    assert pods.sandbox(sb.id).state == SANDBOX_NOTREADY
    with pytest.raises(FailedPrecondition):
        pods.start_container(cid)

    pods.remove_sandbox(sb.id)
    pods.remove_sandbox(sb.id)
    with pytest.raises(NotFound):
        pods.container(cid)
    with pytest.raises(NotFound):
        pods.sandbox(sb.id)
    assert libvirt_state(cid) is None and not vm_dir.exists()
    assert env.store.all("containers") == [] and env.store.all("sandboxes") == []
    assert b"GUEST-UP" in log.read_bytes()


def test_failed_network_setup_leaves_no_sandbox(env: Env) -> None:
    pods = env.pods()
    env.networks.fail_setup = True
    sb = sandbox()
    with pytest.raises(NotFound):
        pods.run_sandbox(sb)
    assert pods.sandboxes() == [] and env.store.all("sandboxes") == []


@pytest.mark.parametrize("bad", [{"id": "../../etc"}, {"hostname": "x</name>"}])
def test_bad_sandbox_refused(env: Env, bad: dict[str, str]) -> None:
    with pytest.raises(InvalidArgument):
        env.pods().run_sandbox(sandbox(**bad))


def test_failed_create_is_rolled_back(env: Env) -> None:
    pods = env.pods()
    sb = sandbox()
    pods.run_sandbox(sb)
    with pytest.raises(NotFound, match="not pulled"):
        pods.create_container(sb.id, container_input(image="other"))
    with pytest.raises(InvalidArgument, match="VirtletVCPUCount"):
        pods.create_container(sb.id, container_input(
            sandbox_annotations={"VirtletVCPUCount": "many"}))
    # Fails after the record and the VM directory were made: the network is gone.
    env.networks.up.discard(sb.id)
    with pytest.raises(NotFound, match="no network"):
        pods.create_container(sb.id, container_input())
    assert pods.containers() == [] and env.store.all("containers") == []
    assert not any((env.root / "vms").iterdir())


def test_restart_adopts_running_vm_and_rolls_back_half_made(env: Env) -> None:
    pods = env.pods()
    sb = sandbox()
    pods.run_sandbox(sb)
    cid = pods.create_container(sb.id, container_input())
    pods.start_container(cid)
    pods.close()
    # As a kill -9 mid-create leaves it: a CREATING record with no domain.
    half = ContainerRecord(id=str(uuid.uuid4()), sandbox_id="gone", name="vm", attempt=0,
                           state=CREATING, created_at=1, image="img", image_ref="x",
                           vm_dir=str(env.root / "vms" / "half"))
    (env.root / "vms" / "half").mkdir()
    env.store.put("containers", half.id, half.to_dict(), sandbox_id="gone")
    # A running container whose domain vanished while the daemon was down.
    ghost = dataclasses.replace(half, id=str(uuid.uuid4()), state=RUNNING,
                                vm_dir=str(env.root / "vms" / "ghost"))
    env.store.put("containers", ghost.id, ghost.to_dict(), sandbox_id="gone")

    again = env.pods()  # reconciles
    assert again.container(cid).state == RUNNING
    assert libvirt_state(cid) == libvirt.VIR_DOMAIN_RUNNING, "never restarted or destroyed"
    with pytest.raises(NotFound):
        again.container(half.id)
    assert not (env.root / "vms" / "half").exists()
    g = again.container(ghost.id)
    assert (g.state, g.reason) == (EXITED, "DomainMissing")
    assert ("restore", "") in env.networks.calls
    again.remove_sandbox(sb.id)
    again.remove_container(ghost.id)


def test_vm_stopped_while_down_shows_exited(env: Env) -> None:
    pods = env.pods()
    sb = sandbox()
    pods.run_sandbox(sb)
    cid = pods.create_container(sb.id, container_input())
    pods.start_container(cid)
    pods.close()
    libvirt.open(URI).lookupByUUIDString(cid).destroy()
    # The old Pods object still hears the event and records it; undo that in the store,
    # as if the daemon had been down, so the new one must read libvirt's state.
    wait_for(lambda: pods.container(cid).state == EXITED)
    env.store.put("containers", cid, dataclasses.replace(
        pods.container(cid), state=RUNNING).to_dict(), sandbox_id=sb.id)
    again = env.pods()
    c = again.container(cid)
    assert (c.state, c.exit_code, c.reason) == (EXITED, 137, "Killed")
    assert c.message == "stopped while the runtime was down"
    again.remove_sandbox(sb.id)


def test_readers_never_wait_for_a_store_write(env: Env) -> None:
    """The memory lock never covers I/O: while a store write hangs, List answers."""
    pods = env.pods()
    sb = sandbox()
    pods.run_sandbox(sb)
    cid = pods.create_container(sb.id, container_input())
    entered, release = threading.Event(), threading.Event()
    real_put = env.store.put

    def slow_put(*args: Any, **kw: Any) -> None:
        entered.set()
        release.wait(10)
        real_put(*args, **kw)

    env.store.put = slow_put  # type: ignore[method-assign]
    try:
        t = threading.Thread(target=pods.start_container, args=(cid,))
        t.start()
        assert entered.wait(5)
        t0 = time.monotonic()
        assert [c.id for c in pods.containers()] == [cid]
        assert pods.container(cid).state == CREATED, "memory changes after the store"
        assert time.monotonic() - t0 < 1
    finally:
        release.set()
        t.join(10)
        env.store.put = real_put  # type: ignore[method-assign]
    assert pods.container(cid).state == RUNNING
    pods.remove_sandbox(sb.id)


def test_image_in_use_and_nics_resolve(env: Env) -> None:
    pods = env.pods()
    sb = sandbox(name="named")
    pods.run_sandbox(sb)
    pods.create_container(sb.id, container_input())
    assert pods.image_in_use("ab" * 32) and not pods.image_in_use("cd" * 32)
    assert pods.resolve_pod("named").id == sb.id
    assert pods.resolve_pod(sb.id).id == sb.id
    with pytest.raises(NotFound):
        pods.resolve_pod("nobody")
    pods.remove_sandbox(sb.id)


def test_unknown_and_removed_ids_leave_nothing_behind(env: Env) -> None:
    """Issue 9 item 3: each unknown id used to get a pod lock kept for ever (with the id as
    its key), and NOT_FOUND echoed the whole id."""
    pods = env.pods()
    for i in range(50):
        big = f"{i:03d}" + "x" * 100_000
        with pytest.raises(NotFound) as e:
            pods.create_container(big, container_input())
        assert len(e.value.message) < 300, "the id is cut in the message"
        pods.stop_sandbox(big)
        pods.remove_sandbox(big)
        with pytest.raises(NotFound) as e:
            pods.container(big)
        assert len(e.value.message) < 300
        with pytest.raises(NotFound) as e:
            pods.detach_nic(big, "eth1")
        assert len(e.value.message) < 300
    assert len(pods.state.pod_locks) == 0
    sb = sandbox()
    pods.run_sandbox(sb)
    cid = pods.create_container(sb.id, container_input())
    pods.start_container(cid)
    pods.stop_sandbox(sb.id)
    pods.remove_sandbox(sb.id)
    assert len(pods.state.pod_locks) == 0, "a removed pod keeps no lock"


def test_another_instances_domain_is_left_alone(env: Env, tmp_path: Path) -> None:
    """A second runtime instance (its own store and instance id, the same libvirt) asked
    for the first one's VM UUID is refused before any side effect; holding a record of
    that UUID (for the same sandbox id even), its reconcile sees the domain as missing and
    its remove leaves it defined and running."""
    pods = env.pods()
    sb = sandbox()
    pods.run_sandbox(sb)
    a = str(uuid.uuid4())
    cid = pods.create_container(sb.id, container_input(
        sandbox_annotations={"VirtletSystemUUID": a}))
    assert cid == a
    pods.start_container(cid)
    conn = libvirt.open(URI)
    xml = conn.lookupByUUIDString(cid).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert "<avr:instance>inst-1</avr:instance>" in xml

    (tmp_path / "two").mkdir()
    store2 = Store(tmp_path / "two" / "state.db")
    other = Env(tmp_path / "two", store2, Domains(LibvirtConnection(URI), "inst-2"),
                env.networks, env.images, env.made)
    pods2 = other.pods()
    sb2 = sandbox()
    pods2.run_sandbox(sb2)
    with pytest.raises(AlreadyExists, match=cid):
        pods2.create_container(sb2.id, container_input(
            sandbox_annotations={"VirtletSystemUUID": cid}))
    assert store2.all("containers") == [] and not any((other.root / "vms").iterdir())
    # A record naming A's UUID and A's own sandbox id, as a store copied from instance 1
    # would hold: the instance ids differ, so the domain is not this record's VM.
    store2.put("sandboxes", sb.id, sb.to_dict())
    store2.put("containers", cid, dataclasses.replace(pods.container(cid),
               vm_dir=str(other.root / "vms" / cid)).to_dict(), sandbox_id=sb.id)
    pods2 = other.pods()  # reconciles
    c = pods2.container(cid)
    assert (c.state, c.reason) == (EXITED, "DomainMissing")
    pods2.stop_container(cid, 0)
    pods2.remove_sandbox(sb.id)
    pods2.remove_sandbox(sb2.id)
    dom = conn.lookupByUUIDString(cid)
    assert dom.isActive() and dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) == xml
    assert pods.container(cid).state == RUNNING
    pods.remove_sandbox(sb.id)
    assert libvirt_state(cid) is None
    store2.close()
