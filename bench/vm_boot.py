"""Time from RunPodSandbox to the guest's first console line and to its marker line,
through the runtime's socket (pod network by the real bridge + host-local CNI plugins),
next to raw libvirt booting the same guest (bench/baseline_raw_libvirt.py: same TCG domain
shape, 2 vCPUs, 512 MiB).

    .venv/bin/python -m bench.vm_boot {minimal,cloud} [--runs 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench import baseline_raw_libvirt
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

MARKERS = {"minimal": "MINIMAL-GUEST-UP", "cloud": "BENCH-CLOUD-INIT-MARKER"}


def one_run(d: Daemon, image: str, kind: str, tmp: Path, i: int) -> tuple[float, float, float]:
    pb, _ = APIS["v1alpha2"]
    rt = d.runtime("v1alpha2")
    annotations = {"VirtletVCPUCount": "2"}
    if kind == "cloud":
        annotations["VirtletCloudInitUserData"] = (
            f"runcmd:\n  - echo {MARKERS['cloud']} > /dev/ttyS0\n")
    log_dir = d.pod_logs / f"run{i}"
    cfg = sandbox_config(pb, log_dir, annotations=annotations, name=f"bench-{i}")
    t0 = time.monotonic()
    sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=60).pod_sandbox_id
    cid = rt.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=sid, sandbox_config=cfg,
        config=container_config(pb, image, memory_mib=512)), timeout=120).container_id
    rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=120)
    started = time.monotonic() - t0
    log = log_dir / "vm" / "0.log"
    first = marker = 0.0
    deadline = t0 + 600
    while time.monotonic() < deadline:
        text = log_text(log)
        if text and not first:
            first = time.monotonic() - t0
        if any(line.endswith(" " + MARKERS[kind]) for line in text.splitlines()):
            marker = time.monotonic() - t0
            break
        time.sleep(0.02)
    rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    if not marker:
        raise SystemExit(f"run {i}: no marker within 600 s")
    return started, first, marker


def stats(name: str, values: list[float]) -> str:
    return (f"  {name:<28} min {min(values):6.1f}  median {statistics.median(values):6.1f}  "
            f"max {max(values):6.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["minimal", "cloud"])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    src = minimal_guest().disk if args.kind == "minimal" else cloud_guest_image()
    tmp = Path(tempfile.mkdtemp(prefix="avr-bench-", dir="/tmp"))
    tmp.chmod(0o711)
    try:
        (tmp / "img").mkdir()
        (tmp / "img" / "guest.qcow2").symlink_to(src)
        with image_server({"guest.qcow2": tmp / "img" / "guest.qcow2"}) as host, \
                cni_test_network() as net:
            d = vm_runtime(tmp, net).start()
            try:
                image = f"{host}/guest.qcow2"
                pb, _ = APIS["v1alpha2"]
                t = time.monotonic()
                d.images("v1alpha2").PullImage(
                    pb.PullImageRequest(image=pb.ImageSpec(image=image)), timeout=600)
                pull = time.monotonic() - t
                runs = [one_run(d, image, args.kind, tmp, i) for i in range(args.runs)]
            finally:
                d.stop()
        print(f"arktos-vm-runtime, {args.kind} guest, {args.runs} runs "
              f"(PullImage of {src.stat().st_size / 2**20:.0f} MiB over loopback: {pull:.1f} s)")
        print(stats("RunPodSandbox..Start done", [r[0] for r in runs]))
        print(stats("..first console line", [r[1] for r in runs]))
        print(stats("..marker line", [r[2] for r in runs]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"baseline: raw libvirt, same guest, {args.runs} runs")
    baseline_raw_libvirt.main([args.kind, "--runs", str(args.runs)])


if __name__ == "__main__":
    main()
