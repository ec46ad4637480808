"""Fault injection at every step of every multi-step RPC, on the real parts (libvirtd, QEMU
under TCG, the real bridge + host-local CNI plugins, dnsmasq, the minimal busybox guest).

For each point (service/faults.py) and both kinds: the pod is driven up to the RPC that
reaches the point; the fault fires (an error, or the daemon dies by os._exit); for a crash
the daemon is started again without that fault; then the kubelet does what it does: it
repeats the RPC that failed, and then stops and removes the pod. Afterwards nothing of the
pod is left: no domain, overlay, seed ISO, namespace, tap or veth, dnsmasq process or lease
(host-local address), nor any record in the store. Only what this daemon instance made is
counted (its state directory, its pods' ids, its own test CNI bridge).

Daemon starts are shared: every raise fault is armed at once, each for its own pod, in one
daemon; crash faults are chained, each restart (without the previous pod's fault) armed
with the next pod's, so a crash costs one daemon start.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from arktos_vm_runtime.service import designer, faults
from arktos_vm_runtime.service.vmconfig import VMConfig
from tests.daemon_proc import APIS, Daemon
from tests.integration.test_network_common import PLUGINS, CniTestNet
from tests.integration.vmpods import container_config, instance_leftovers, sandbox_config

pytestmark = pytest.mark.integration
pb, _ = APIS["v1alpha2"]

# The RPC that reaches each operation's points, and what must be done before it.
TARGET = {
    "run_sandbox": ("run", ()),
    "create_container": ("create", ("run",)),
    "start_container": ("start", ("run", "create")),
    "attach_nic": ("attach", ("run", "create")),
    "detach_nic": ("detach", ("run", "create", "attach")),
    "stop_container": ("stop_container", ("run", "create", "start")),
    "stop_sandbox": ("stop_sandbox", ("run", "create", "start")),
    "network_teardown": ("stop_sandbox", ("run", "create", "start")),
    "remove_container": ("remove_container", ("run", "create", "start", "stop_container")),
    # RemovePodSandbox of a running pod: every container and the network go in it
    "remove_sandbox": ("remove_sandbox", ("run", "create", "start")),
}
POINTS = [f"{op}.{step}" for op, steps in faults.POINTS.items() for step in steps]
# What leftovers() reports for a pod with a stopped VM and its network (one word each;
# its tap is in the pod namespace by then, and goes with it)
SELF_CHECK = {"domain", "vm", "network", "netns", "veth", "dnsmasq", "host-local",
              "sandboxes", "containers", "networks"}
FAULTS_ON = {faults.ENABLE_ENV: faults.ENABLE_VALUE}


def daemon(tmp: Path, net: CniTestNet, armed: list[str]) -> Daemon:
    """The daemon as vm_runtime makes it, with these faults (point=kind@sandbox) armed."""
    env = {faults.SPEC_ENV: ",".join(armed), **FAULTS_ON} if armed else {}
    return Daemon(tmp, libvirt_uri="qemu:///system", cni_dir=net.conf_dir, env=env,
                  args=["--disable-kvm", "--image-download-protocol", "http",
                        "--cni-bin-dir", str(PLUGINS)])


class Pod:
    """One pod and the kubelet's calls for it."""

    def __init__(self, point: str, image: str, logs: Path) -> None:
        self.point = point
        self.image = image
        name = point.replace("_", "-").replace(".", "-")
        self.cfg = sandbox_config(pb, logs / name, name=name)
        self.sid = self.cfg.metadata.uid
        self.cid = designer.container_id(self.sid, VMConfig())

    def call(self, rt: Any, step: str) -> None:
        sid, cid = self.sid, self.cid
        t = 120
        if step == "run":
            rt.RunPodSandbox(pb.RunPodSandboxRequest(config=self.cfg), timeout=t)
        elif step == "create":
            assert rt.CreateContainer(pb.CreateContainerRequest(
                pod_sandbox_id=sid, sandbox_config=self.cfg,
                config=container_config(pb, self.image, memory_mib=128)),
                timeout=t).container_id == cid
        elif step == "start":
            rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=t)
        elif step == "attach":
            rt.AttachNetworkInterface(pb.DeviceAttachDetachRequest(
                PodSandboxID=sid, Nic=pb.NicSpec(Name="eth1", SubnetName="subnet-b",
                                                 PortId="port-2")), timeout=t)
        elif step == "detach":
            try:
                rt.DetachNetworkInterface(pb.DeviceAttachDetachRequest(
                    PodSandboxID=sid, Nic=pb.NicSpec(Name="eth1")), timeout=t)
            except grpc.RpcError as e:  # a detach that a restart finished is gone
                if e.code() != grpc.StatusCode.NOT_FOUND:
                    raise
        elif step == "stop_container":
            rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0), timeout=t)
        elif step == "stop_sandbox":
            rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=t)
        elif step == "remove_container":
            rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=t)
        elif step == "remove_sandbox":
            rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=t)
        else:
            raise AssertionError(step)

    @property
    def target(self) -> str:
        return TARGET[self.point.split(".")[0]][0]

    def drive(self, rt: Any) -> None:
        """Every call before the one that reaches the point, then that one (which fails)."""
        for step in TARGET[self.point.split(".")[0]][1]:
            self.call(rt, step)
        self.call(rt, self.target)

    def retry_and_remove(self, rt: Any) -> list[str]:
        """The kubelet repeats the call that failed, then stops and removes the pod;
        returns what went wrong (the removal is tried whatever the retry did)."""
        errors = []
        try:
            self.call(rt, self.target)
        except grpc.RpcError as e:
            errors.append(f"retry of {self.target}: {e.code().name}: {e.details()}")
        try:
            rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=self.sid),
                              timeout=120)
            for c in rt.ListContainers(pb.ListContainersRequest(filter=pb.ContainerFilter(
                    pod_sandbox_id=self.sid)), timeout=10).containers:
                rt.RemoveContainer(pb.RemoveContainerRequest(container_id=c.id),
                                   timeout=120)
            rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=self.sid),
                                timeout=120)
        except grpc.RpcError as e:
            errors.append(f"removal: {e.code().name}: {e.details()}")
        return errors


def leftovers(d: Daemon, net: CniTestNet, pods: list[Pod]) -> list[str]:
    return instance_leftovers(d, net, [p.cid for p in pods])


def expect_fault(pod: Pod, rt: Any, d: Daemon, kind: str) -> None:
    with pytest.raises(grpc.RpcError) as e:
        pod.drive(rt)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, (pod.point, e.value)
    if kind == "raise":
        assert f"injected fault at {pod.point}" in (e.value.details() or ""), pod.point
    else:
        assert d.proc is not None
        assert d.proc.wait(30) == faults.CRASH_EXIT_CODE, (pod.point, d.output()[-2000:])


def run_all(kind: str, tmp: Path, net: CniTestNet, image: str,
            report: Callable[[str], None], keep: Path) -> None:
    logs = tmp / "pods"
    pods = [Pod(p, image, logs) for p in POINTS]
    failures: list[str] = []
    t0 = time.monotonic()
    starts = 0
    took: dict[str, float] = {}

    reported: set[str] = set()

    def check(pod: Pod, d: Daemon) -> None:
        left = [x for x in leftovers(d, net, pods) if x not in reported]
        reported.update(left)
        if left:
            failures.append(f"{kind} at {pod.point}: left {left}")

    if kind == "raise":
        d = daemon(tmp, net, [f"{p.point}=raise@{p.sid}" for p in pods]).start()
        starts += 1
        try:
            rt = d.runtime("v1alpha2")
            rt_pull(d, image)
            for pod in pods:
                t1 = time.monotonic()
                try:
                    expect_fault(pod, rt, d, kind)
                except (AssertionError, grpc.RpcError) as e:
                    failures.append(f"{kind} at {pod.point}: {e}")
                if pod.point == "stop_sandbox.containers_stopped":
                    # The leak check sees every kind of thing a pod is made of.
                    kinds = {x.split(" ")[0] for x in leftovers(d, net, pods)}
                    if kinds != SELF_CHECK:
                        failures.append(f"the leak check's self-check saw {sorted(kinds)}")
                failures += [f"{kind} at {pod.point}: {e}" for e in pod.retry_and_remove(rt)]
                check(pod, d)
                took[pod.point] = time.monotonic() - t1
        finally:
            d.stop()
    else:
        previous: Pod | None = None
        for pod in [*pods, None]:
            d = daemon(tmp, net, [f"{pod.point}=crash@{pod.sid}"] if pod else []).start()
            starts += 1
            rt = d.runtime("v1alpha2")
            try:
                if starts == 1:
                    rt_pull(d, image)
                if previous is not None:
                    failures += [f"crash at {previous.point}: {e}"
                                 for e in previous.retry_and_remove(rt)]
                    check(previous, d)
                if pod is not None:
                    try:
                        expect_fault(pod, rt, d, kind)
                    except (AssertionError, grpc.RpcError) as e:
                        failures.append(f"crash at {pod.point}: {e}")
                previous = pod
            finally:
                d.stop()
    report(f"{kind}: {len(pods)} points, {starts} daemon start(s), "
           f"{time.monotonic() - t0:.0f} s")
    if took:
        slow = sorted(took.items(), key=lambda kv: -kv[1])[:3]
        report("slowest: " + ", ".join(f"{p} {t:.1f} s" for p, t in slow))
    if failures:
        shutil.copy(tmp / "daemon.log", keep / f"daemon-{kind}.log")
        report(f"the daemon's log: {keep}/daemon-{kind}.log")
    assert not failures, "\n".join(failures)


def rt_pull(d: Daemon, image: str) -> None:
    """PullImage as the kubelet does it: a transient UNAVAILABLE (the test's loopback server
    once closed a connection without an answer on a loaded machine) is tried again; pulls
    are not what the faults are injected into."""
    req = pb.PullImageRequest(image=pb.ImageSpec(image=image))
    try:
        d.images("v1alpha2").PullImage(req, timeout=60)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        time.sleep(1)
        d.images("v1alpha2").PullImage(req, timeout=60)


@pytest.mark.parametrize("kind", ["raise", "crash"])
def test_a_fault_at_every_step_leaves_nothing_after_a_retry(
        kind: str, short_tmp: Path, cni_net: CniTestNet, served_minimal_image: str,
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines: list[str] = []
    try:
        run_all(kind, short_tmp, cni_net, served_minimal_image, lines.append, tmp_path)
    finally:
        with capsys.disabled():
            for line in lines:
                print(f"\nfault injection: {line}")


def test_faults_are_refused_unless_explicitly_enabled(short_tmp: Path) -> None:
    """A fault spec alone (no opt-in) stops the daemon at startup with a clear error."""
    d = Daemon(short_tmp, env={faults.SPEC_ENV: "run_sandbox.netns=crash"})
    d.start(wait=False)
    assert d.proc is not None
    assert d.proc.wait(30) == 1
    d.stop()
    assert f"{faults.SPEC_ENV} is a testing aid" in d.output()
    assert "FAULT INJECTION ARMED" not in d.output()
