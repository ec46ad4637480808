"""Shared by the tests that run one VM pod per module (VM operations, streaming, exec): a
module's private directory, the daemon with one pod booted through it (`vm_pod`), and a
watcher that records every state List and Status report."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from tests.daemon_proc import APIS, Daemon
from tests.integration.test_network_common import CniTestNet, cni_test_network
from tests.integration.vmpods import (
    container_config,
    image_server,
    log_text,
    sandbox_config,
    vm_runtime,
    wait_for,
)

MINIMAL_MARKER = "MINIMAL-GUEST-UP"


@contextmanager
def module_tmp() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="avr-", dir="/tmp"))
    d.chmod(0o711)  # QEMU must traverse it to reach the VM's disks
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@dataclass
class VmPod:
    """One running VM pod of a module's own daemon."""

    d: Daemon
    tmp: Path  # the module's directory (the pod's logs are under tmp/pods)
    image: str  # the image name pulled
    sid: str
    cid: str
    log: Path  # the container's CRI log
    net: CniTestNet  # the test CNI network the pod is on


@contextmanager
def _image_name(image: str | Path, tmp: Path) -> Iterator[str]:
    """An image name: given (already served), or a local disk served over loopback."""
    if isinstance(image, str):
        yield image
        return
    (tmp / "img").mkdir()
    (tmp / "img" / "guest.qcow2").symlink_to(image)
    with image_server({"guest.qcow2": tmp / "img" / "guest.qcow2"}) as host:
        yield f"{host}/guest.qcow2"


def minimal_ready(pod: VmPod) -> bool:
    return MINIMAL_MARKER in log_text(pod.log)


@contextmanager
def vm_pod(image: str | Path, *, name: str, api: str = "v1alpha2",
           ready: Callable[[VmPod], bool] = minimal_ready, ready_timeout: float = 120,
           memory_mib: int = 256, daemon_args: tuple[str, ...] = (),
           annotations: dict[str, str] | None = None,
           envs: dict[str, str] | None = None) -> Iterator[VmPod]:
    """The daemon on a test CNI network with one pod booted through `api` (pull, run the
    sandbox, create and start the VM), yielded once `ready(pod)`; the pod is removed and
    the daemon stopped on the way out, whatever happened."""
    with module_tmp() as tmp, cni_test_network() as net, _image_name(image, tmp) as url:
        d = vm_runtime(tmp, net, *daemon_args).start()
        pb, _ = APIS[api]
        rt = d.runtime(api)
        sid = ""
        try:
            d.images(api).PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=url)),
                                    timeout=300)
            cfg = sandbox_config(pb, tmp / "pods", annotations=annotations, name=name)
            sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg),
                                   timeout=60).pod_sandbox_id
            cid = rt.CreateContainer(pb.CreateContainerRequest(
                pod_sandbox_id=sid, sandbox_config=cfg,
                config=container_config(pb, url, memory_mib=memory_mib, envs=envs)),
                timeout=120).container_id
            rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=60)
            pod = VmPod(d, tmp, url, sid, cid, tmp / "pods" / "vm" / "0.log", net)
            wait_for("the guest to be ready", lambda: ready(pod), ready_timeout, every=0.5)
            yield pod
        finally:
            if sid:
                rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid),
                                    timeout=120)
            d.stop()


def code_of(call: object) -> tuple[grpc.StatusCode, str]:
    """The status code and details of a call expected to fail."""
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    raise AssertionError("the call succeeded")


class StateWatch:
    """Polls ListContainers and ContainerStatus of one container (both API versions) every
    `every` s in a thread; `seen` is every state reported, in order, without repeats."""

    def __init__(self, d: Daemon, cid: str, every: float = 0.1) -> None:
        self.d, self.cid, self.every = d, cid, every
        self.seen: list[str] = []
        self.polls = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _note(self, state: str) -> None:
        if not self.seen or self.seen[-1] != state:
            self.seen.append(state)

    def _run(self) -> None:
        while not self._stop.is_set():
            for api in ("v1alpha2", "v1"):
                pb, _ = APIS[api]
                rt = self.d.runtime(api)
                st = rt.ContainerStatus(pb.ContainerStatusRequest(container_id=self.cid),
                                        timeout=10).status
                self._note(pb.ContainerState.Name(st.state))
                listed = [c for c in rt.ListContainers(pb.ListContainersRequest(),
                                                       timeout=10).containers
                          if c.id == self.cid]
                self._note(pb.ContainerState.Name(listed[0].state) if listed else "MISSING")
            self.polls += 1
            time.sleep(self.every)

    def __enter__(self) -> StateWatch:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(30)
