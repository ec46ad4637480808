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
import statistics
from pathlib import Path

from bench.pods import PodTimes, bench_daemon, marker_annotations, timed_pod
from tests.daemon_proc import APIS, Daemon


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
    """(CreateContainer, ..StartContainer done, ..marker line) in seconds from the
    CreateContainer call."""
    pb, _ = APIS["v1alpha2"]
    annotations = marker_annotations(kind)
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
    t: PodTimes = timed_pod(d, image, kind, f"bench-vol-{i}", annotations, mounts)
    return t.created - t.sandbox, t.started - t.sandbox, t.marker - t.sandbox


def stats(name: str, values: list[float]) -> str:
    return (f"  {name:<30} min {min(values):6.2f}  median {statistics.median(values):6.2f}  "
            f"max {max(values):6.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["minimal", "cloud"])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    runs: dict[bool, list[tuple[float, float, float]]] = {False: [], True: []}

    def kubelet_dir(tmp: Path) -> list[str]:
        """The kubelet's volumes' root, in the bench's directory; the daemon allows it."""
        (tmp / "kubelet").mkdir()
        return ["--volume-allowed-roots", str(tmp / "kubelet")]

    with bench_daemon(args.kind, daemon_args=kubelet_dir) as b:
        kubelet_root = b.tmp / "kubelet"
        for i in range(args.runs):
            for volumes in (False, True):
                runs[volumes].append(one_run(b.d, b.image, args.kind, kubelet_root,
                                             2 * i + volumes, volumes))
    print(f"arktos-vm-runtime, {args.kind} guest, {args.runs} runs each")
    for volumes, label in ((False, "no volumes"), (True, "4 volumes")):
        print(f" {label}:")
        print(stats("CreateContainer", [r[0] for r in runs[volumes]]))
        print(stats("..StartContainer done", [r[1] for r in runs[volumes]]))
        print(stats("..marker line", [r[2] for r in runs[volumes]]))
    added = [b[2] - a[2] for a, b in zip(runs[False], runs[True], strict=True)]
    print(stats("added to the marker (pairs)", added))


if __name__ == "__main__":
    main()
