"""What four volumes add to a pod's start: pods with a ConfigMap, a Secret, an emptyDir
(virtiofs) and an extra 256 MiB ext4 disk, beside the same pod without volumes, alternating,
through the runtime's socket.

    .venv/bin/python -m bench.volumes {minimal,cloud} [--runs 3]

Per run: CreateContainer (files read, seed, the extra qcow2, the domain), StartContainer
(QEMU, and a virtiofsd per share with shared memory), and the marker line: the minimal
guest's (host-side cost only: it mounts nothing), or on the cloud guest a runcmd line
written after cloud-init's bootcmd mounted the share and made and mounted the disk.
Prints min/median/max of each, with and without volumes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

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

MARKERS = {"minimal": "MINIMAL-GUEST-UP", "cloud": "BENCH-VOLUMES-MARKER"}


def kubelet_volume(root: Path, kind: str, name: str, files: dict[str, bytes]) -> Path:
    vol = root / "volumes" / f"kubernetes.io~{kind}" / name
    stamp = vol / "..2026_12_01"
    stamp.mkdir(parents=True)
    for key, data in files.items():
        (stamp / key).write_bytes(data)
        os.symlink(f"..data/{key}", vol / key)
    os.symlink(stamp.name, vol / "..data")
    return vol


def one_run(d: Daemon, image: str, kind: str, kubelet: Path, i: int, volumes: bool
            ) -> tuple[float, float, float]:
    pb, _ = APIS["v1alpha2"]
    rt = d.runtime("v1alpha2")
    annotations = {"VirtletVCPUCount": "2"}
    if kind == "cloud":
        annotations["VirtletCloudInitUserData"] = (
            f"runcmd:\n  - echo {MARKERS['cloud']} > /dev/ttyS0\n")
    mounts = []
    if volumes:
        pod = kubelet / f"pod{i}"
        cm = kubelet_volume(pod, "configmap", "cfg", {f"k{n}": b"v" * 1024 for n in range(8)})
        sec = kubelet_volume(pod, "secret", "s", {"password": b"x" * 64})
        ed = pod / "volumes" / "kubernetes.io~empty-dir" / "scratch"
        ed.mkdir(parents=True)
        mounts = [pb.Mount(container_path="/etc/cfg", host_path=str(cm)),
                  pb.Mount(container_path="/etc/s", host_path=str(sec)),
                  pb.Mount(container_path="/scratch", host_path=str(ed))]
        annotations["VirtletExtraDisks"] = json.dumps([{
            "name": "data", "size": "256Mi", "format": "ext4", "mountPath": "/data"}])
    log_dir = d.pod_logs / f"run{i}"
    cfg = sandbox_config(pb, log_dir, annotations=annotations, name=f"bench-vol-{i}")
    sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=60).pod_sandbox_id
    cc = container_config(pb, image, memory_mib=512)
    cc.mounts.extend(mounts)
    t0 = time.monotonic()
    cid = rt.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=sid, sandbox_config=cfg, config=cc), timeout=120).container_id
    created = time.monotonic() - t0
    rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=120)
    started = time.monotonic() - t0
    log = log_dir / "vm" / "0.log"
    marker = 0.0
    while time.monotonic() < t0 + 600:
        if any(line.endswith(" " + MARKERS[kind]) for line in log_text(log).splitlines()):
            marker = time.monotonic() - t0
            break
        time.sleep(0.02)
    rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    if not marker:
        raise SystemExit(f"run {i}: no marker within 600 s")
    return created, started, marker


def stats(name: str, values: list[float]) -> str:
    return (f"  {name:<30} min {min(values):6.2f}  median {statistics.median(values):6.2f}  "
            f"max {max(values):6.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["minimal", "cloud"])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    src = minimal_guest().disk if args.kind == "minimal" else cloud_guest_image()
    tmp = Path(tempfile.mkdtemp(prefix="avr-bench-", dir="/tmp"))
    tmp.chmod(0o711)
    kubelet = tmp / "kubelet"
    kubelet.mkdir()
    try:
        (tmp / "img").mkdir()
        (tmp / "img" / "guest.qcow2").symlink_to(src)
        with image_server({"guest.qcow2": tmp / "img" / "guest.qcow2"}) as host, \
                cni_test_network() as net:
            d = vm_runtime(tmp, net, "--volume-allowed-roots", str(kubelet)).start()
            try:
                image = f"{host}/guest.qcow2"
                pb, _ = APIS["v1alpha2"]
                d.images("v1alpha2").PullImage(
                    pb.PullImageRequest(image=pb.ImageSpec(image=image)), timeout=600)
                runs: dict[bool, list[tuple[float, float, float]]] = {False: [], True: []}
                for i in range(args.runs):
                    for volumes in (False, True):
                        runs[volumes].append(one_run(d, image, args.kind, kubelet,
                                                     2 * i + volumes, volumes))
            finally:
                d.stop()
        print(f"arktos-vm-runtime, {args.kind} guest, {args.runs} runs each")
        for volumes, label in ((False, "no volumes"), (True, "4 volumes")):
            print(f" {label}:")
            print(stats("CreateContainer", [r[0] for r in runs[volumes]]))
            print(stats("..StartContainer done", [r[1] for r in runs[volumes]]))
            print(stats("..marker line", [r[2] for r in runs[volumes]]))
        added = [b[2] - a[2] for a, b in zip(runs[False], runs[True], strict=True)]
        print(stats("added to the marker (pairs)", added))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
