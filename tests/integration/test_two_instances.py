"""Two runtime instances on one host (two state directories and sockets, one libvirtd, one
CNI network), and a domain with our prefix that no instance made: neither instance touches
the other's domains, namespaces or taps, whatever UUID a pod asks for, across removes and
restarts (reconcile), and the orphan is never undefined."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from arktos_vm_runtime.adapters import vmnet
from arktos_vm_runtime.service import designer
from arktos_vm_runtime.service.vmconfig import VMConfig
from tests.daemon_proc import APIS, Daemon
from tests.integration.test_network_common import CniTestNet, link_names, netns_names
from tests.integration.vmpods import container_config, sandbox_config, vm_runtime, wait_for

pytestmark = pytest.mark.integration
VIRSH = ["virsh", "-c", "qemu:///system"]
pb, _ = APIS["v1alpha2"]


def virsh(*args: str, check: bool = True) -> str:
    r = subprocess.run([*VIRSH, *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 or not check, r.stderr
    return r.stdout


def definition(cid: str) -> str:
    return virsh("dumpxml", "--inactive", f"avr-{cid}")


def defined(cid: str) -> bool:
    return f"avr-{cid}" in virsh("list", "--all", "--name").split()


def qemu_pid(cid: str) -> int:
    pidfile = Path(f"/run/libvirt/qemu/avr-{cid}.pid")
    return int(pidfile.read_text().strip()) if pidfile.exists() else 0


def restarted(d: Daemon, tmp: Path, net: CniTestNet) -> Daemon:
    """The daemon stopped and started again on its state directory, once it reconciled."""
    assert d.stop() == 0
    seen = d.output().count("reconciled ")
    d = vm_runtime(tmp, net).start()
    wait_for("the restarted daemon to reconcile",
             lambda: d.output().count("reconciled ") > seen, 30)
    return d


def instance_id(d: Daemon) -> str:
    db = sqlite3.connect(f"file:{d.state_dir}/state.db?mode=ro", uri=True)
    try:
        (value,) = db.execute("SELECT value FROM settings WHERE key='instance_id'").fetchone()
    finally:
        db.close()
    return str(value)


class Pods:
    """One daemon's pods, removed at the end whatever happened."""

    def __init__(self, d: Daemon, image: str, log_dir: Path) -> None:
        self.d, self.image, self.log_dir = d, image, log_dir
        self.sids: list[str] = []
        self.pull()

    def pull(self) -> None:
        self.d.images("v1alpha2").PullImage(pb.PullImageRequest(
            image=pb.ImageSpec(image=self.image)), timeout=60)

    @property
    def rt(self) -> Any:
        return self.d.runtime("v1alpha2")

    def run(self, name: str, system_uuid: str | None = None) -> tuple[str, Any]:
        ann = {"VirtletSystemUUID": system_uuid} if system_uuid else {}
        cfg = sandbox_config(pb, self.log_dir / name, annotations=ann, name=name)
        sid = self.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg),
                                    timeout=60).pod_sandbox_id
        self.sids.append(sid)
        return sid, cfg

    def create(self, sid: str, cfg: Any) -> str:
        return str(self.rt.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=sid, sandbox_config=cfg,
            config=container_config(pb, self.image, memory_mib=128)), timeout=60).container_id)

    def remove(self, sid: str) -> None:
        self.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
        self.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60)
        self.sids.remove(sid)

    def remove_all(self) -> None:
        for sid in list(self.sids):
            with contextlib.suppress(grpc.RpcError):
                self.remove(sid)


@pytest.fixture
def orphan() -> Iterator[str]:
    """A domain with our prefix and our metadata element, defined by hand: no instance holds
    a record of it."""
    u = str(uuid.uuid4())
    xml = (f"<domain type='qemu'><name>avr-{u}</name><uuid>{u}</uuid>"
           "<metadata><avr:pod xmlns:avr='https://arktos-vm-runtime/xmlns/domain/1'>"
           "<avr:sandbox-id>sb-orphan</avr:sandbox-id></avr:pod></metadata>"
           "<memory unit='MiB'>32</memory>"
           "<os><type arch='x86_64' machine='pc'>hvm</type></os></domain>")
    r = subprocess.run([*VIRSH, "define", "/dev/stdin"], input=xml, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    yield u
    virsh("undefine", f"avr-{u}", check=False)


def expect_already_exists(pods: Pods, sid: str, cfg: Any, cid: str) -> None:
    with pytest.raises(grpc.RpcError) as e:
        pods.create(sid, cfg)
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS, e.value.details()
    assert cid in e.value.details()


def test_two_instances_and_an_orphan_leave_each_other_alone(
        short_tmp: Path, cni_net: CniTestNet, served_minimal_image: str,
        orphan: str) -> None:
    (short_tmp / "one").mkdir()
    (short_tmp / "two").mkdir()
    d1 = vm_runtime(short_tmp / "one", cni_net).start()
    d2 = vm_runtime(short_tmp / "two", cni_net).start()
    one = Pods(d1, served_minimal_image, d1.pod_logs)
    two = Pods(d2, served_minimal_image, d2.pod_logs)
    try:
        # Pod A in daemon 1, running, with a UUID of its own choosing.
        a_uuid = str(uuid.uuid4())
        a_sid, a_cfg = one.run("pod-a", a_uuid)
        a_cid = one.create(a_sid, a_cfg)
        assert a_cid == a_uuid
        one.rt.StartContainer(pb.StartContainerRequest(container_id=a_cid), timeout=60)
        a_pid = qemu_pid(a_cid)
        a_xml = definition(a_cid)
        a_ns, a_tap = f"avr-{a_sid}", vmnet.tap_name(a_sid, 0)
        orphan_xml = definition(orphan)

        def a_untouched() -> None:
            assert definition(a_cid) == a_xml, "A's definition was replaced"
            assert a_pid > 0 and qemu_pid(a_cid) == a_pid, "A's VM was stopped"
            assert a_ns in netns_names()
            assert a_tap in link_names(a_ns) | link_names()
            assert definition(orphan) == orphan_xml, "the orphan was touched"

        # Daemon 2's pods ask for A's UUID and for the orphan's: refused, nothing made.
        b_sid, b_cfg = two.run("pod-b", a_cid)
        expect_already_exists(two, b_sid, b_cfg, a_cid)
        c_sid, c_cfg = two.run("pod-c", orphan)
        expect_already_exists(two, c_sid, c_cfg, orphan)
        # ... or for the UUID another pod's UID derives to: refused, the id spaces differ.
        squat_sid, squat_cfg = two.run(
            "pod-squat", designer.container_id(str(uuid.uuid4()), VMConfig()))
        with pytest.raises(grpc.RpcError) as e:
            two.create(squat_sid, squat_cfg)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "VirtletSystemUUID" in e.value.details()
        assert not two.rt.ListContainers(pb.ListContainersRequest(), timeout=10).containers
        assert not any((Path(d2.state_dir) / "vms").iterdir())
        a_untouched()
        assert instance_id(d1) != instance_id(d2)
        assert f"<avr:instance>{instance_id(d1)}</avr:instance>" in a_xml

        # Daemon 2's own pod D gets a domain of its own, naming its own instance.
        x = str(uuid.uuid4())
        d_sid, d_cfg = two.run("pod-d", x)
        assert two.create(d_sid, d_cfg) == x
        assert f"<avr:instance>{instance_id(d2)}</avr:instance>" in definition(x)
        for sid in (b_sid, c_sid, squat_sid):
            two.remove(sid)
        a_untouched()

        # D's domain vanishes while daemon 2 is down, and daemon 1 takes its UUID for pod E:
        # the restarted daemon 2 (reconcile) takes E's domain for none of its own, and
        # removing D leaves E's domain alone.
        d2.stop()
        virsh("undefine", f"avr-{x}")
        e_sid, e_cfg = one.run("pod-e", x)
        assert one.create(e_sid, e_cfg) == x
        e_xml = definition(x)
        d2 = two.d = restarted(d2, short_tmp / "two", cni_net)
        status = two.rt.ContainerStatus(pb.ContainerStatusRequest(container_id=x),
                                        timeout=10).status
        assert (status.state, status.reason) == (pb.CONTAINER_EXITED, "DomainMissing")
        with pytest.raises(grpc.RpcError) as e:  # no NIC is plugged into E's domain
            two.rt.AttachNetworkInterface(pb.DeviceAttachDetachRequest(
                PodSandboxID=d_sid, Nic=pb.NicSpec(Name="eth1", SubnetName="subnet-a")),
                timeout=60)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value.details()
        assert [n.Name for n in two.rt.ListNetworkInterfaces(
            pb.ListDeviceRequest(PodSandboxId=d_sid), timeout=10).Nics] == ["eth0"]
        two.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=x), timeout=60)
        two.remove(d_sid)
        assert definition(x) == e_xml, "daemon 2 touched daemon 1's domain"
        a_untouched()

        # Daemon 2 restarted once more with nothing of its own: A and the orphan stay.
        seen = d2.output().count(f"avr-{orphan} has our prefix but no record")
        d2 = two.d = restarted(d2, short_tmp / "two", cni_net)
        a_untouched()
        assert d2.output().count(f"avr-{orphan} has our prefix but no record") > seen
        assert f"avr-{a_cid} has our prefix" not in d2.output(), "A is another instance's"

        one.remove(e_sid)
        one.remove(a_sid)
        assert not defined(a_cid) and not defined(x)
        assert defined(orphan), "the orphan is never undefined"
        assert a_ns not in netns_names() and a_tap not in link_names()
    finally:
        one.remove_all()
        two.remove_all()
        d1.stop()
        d2.stop()
