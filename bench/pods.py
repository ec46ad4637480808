"""What the pod benches share: the daemon with a guest image served and pulled
(`bench_daemon`), and one pod's life timed from RunPodSandbox to its guest's marker line
in the pod's CRI log, then removed (`timed_pod`)."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.daemon_proc import APIS, Daemon
from tests.guest.images import cloud_guest_image, minimal_guest
from tests.integration.test_network_common import cni_test_network
from tests.integration.vmpods import (
    container_config,
    image_server,
    log_text,
    sandbox_config,
    vm_runtime,
)

#: the line each guest prints when ready: the minimal guest's own, the cloud guest's by
#: the pod's user-data (runcmd, so after cloud-init configured the network)
MARKERS = {"minimal": "MINIMAL-GUEST-UP", "cloud": "BENCH-CLOUD-INIT-MARKER"}
MARKER_TIMEOUT = 600.0


@dataclass
class Bench:
    d: Daemon
    image: str  # the image name, pulled
    tmp: Path  # removed on the way out
    disk: Path  # the guest's disk file
    pull_s: float  # PullImage's time


def guest_disk(kind: str) -> Path:
    return minimal_guest().disk if kind == "minimal" else cloud_guest_image()


@contextmanager
def bench_daemon(kind: str, api: str = "v1alpha2",
                 daemon_args: Callable[[Path], Sequence[str]] = lambda tmp: ()
                 ) -> Iterator[Bench]:
    """A private directory, the guest disk served over loopback, a test CNI network and the
    daemon (TCG, more flags by `daemon_args(directory)`) with the image pulled; all gone on
    the way out."""
    src = guest_disk(kind)
    tmp = Path(tempfile.mkdtemp(prefix="avr-bench-", dir="/tmp"))
    tmp.chmod(0o711)  # QEMU traverses it to the VMs' disks
    try:
        (tmp / "img").mkdir()
        (tmp / "img" / "guest.qcow2").symlink_to(src)
        with image_server({"guest.qcow2": tmp / "img" / "guest.qcow2"}) as host, \
                cni_test_network() as net:
            d = vm_runtime(tmp, net, *daemon_args(tmp)).start()
            try:
                image = f"{host}/guest.qcow2"
                pb, _ = APIS[api]
                t = time.monotonic()
                d.images(api).PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)),
                                        timeout=600)
                yield Bench(d, image, tmp, src, time.monotonic() - t)
            finally:
                d.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def marker_annotations(kind: str) -> dict[str, str]:
    """2 vCPUs (the raw libvirt baseline's shape), and the cloud guest's marker runcmd."""
    annotations = {"VirtletVCPUCount": "2"}
    if kind == "cloud":
        annotations["VirtletCloudInitUserData"] = (
            f"runcmd:\n  - echo {MARKERS['cloud']} > /dev/ttyS0\n")
    return annotations


@dataclass
class PodTimes:
    """Seconds since RunPodSandbox was called."""

    sandbox: float  # RunPodSandbox returned
    created: float  # CreateContainer returned
    started: float  # StartContainer returned
    first_line: float  # the first console line in the CRI log
    marker: float  # the guest's marker line


def timed_pod(d: Daemon, image: str, kind: str, name: str, annotations: dict[str, str],
              mounts: Sequence[Any] = (), memory_mib: int = 512) -> PodTimes:
    """One pod through the socket (v1alpha2) to its marker line, then stopped and removed;
    SystemExit when no marker comes within MARKER_TIMEOUT."""
    pb, _ = APIS["v1alpha2"]
    rt = d.runtime("v1alpha2")
    log_dir = d.pod_logs / name
    cfg = sandbox_config(pb, log_dir, annotations=annotations, name=name)
    cc = container_config(pb, image, memory_mib=memory_mib)
    cc.mounts.extend(mounts)
    t0 = time.monotonic()
    sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=60).pod_sandbox_id
    sandbox = time.monotonic() - t0
    try:
        cid = rt.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=sid, sandbox_config=cfg, config=cc), timeout=120).container_id
        created = time.monotonic() - t0
        rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=120)
        started = time.monotonic() - t0
        log = log_dir / "vm" / "0.log"
        first = marker = 0.0
        while time.monotonic() < t0 + MARKER_TIMEOUT:
            text = log_text(log)
            if text and not first:
                first = time.monotonic() - t0
            if any(line.endswith(" " + MARKERS[kind]) for line in text.splitlines()):
                marker = time.monotonic() - t0
                break
            time.sleep(0.02)
    finally:
        rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
        rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    if not marker:
        raise SystemExit(f"pod {name}: no marker within {MARKER_TIMEOUT:g} s")
    return PodTimes(sandbox, created, started, first, marker)
