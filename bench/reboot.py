"""Reboot-to-console time: RebootVM through the runtime's socket, next to libvirt's own
virDomainReboot on the same domain (the baseline: what the runtime adds), alternating.

    .venv/bin/python -m bench.reboot {minimal,cloud} [--runs 3] [--flag 1]
        [--json bench/results/reboot.json]

One pod is booted; each run reboots it and measures, from the call: its return, the new
kernel's first console line ("Linux version") in the pod's CRI log, and the guest's ready
line (MINIMAL-GUEST-UP; for the cloud guest, the QEMU guest agent answering ExecSync).
--flag is domainRebootFlag (default 1, ACPI: the minimal guest has no agent).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import libvirt

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

KERNEL_LINE = "Linux version"
MINIMAL_MARKER = "MINIMAL-GUEST-UP"


def _wait(what: str, check: Callable[[], bool], t0: float, limit: float = 600) -> float:
    while not check():
        if time.monotonic() - t0 > limit:
            raise SystemExit(f"no {what} within {limit} s")
        time.sleep(0.02)
    return time.monotonic() - t0


def _agent_up(d: Daemon, cid: str) -> bool:
    pb, _ = APIS["v1alpha2"]
    try:
        d.runtime("v1alpha2").ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["true"],
                                                          timeout=5), timeout=30)
    except grpc.RpcError:
        time.sleep(0.5)
        return False
    return True


def _ready(kind: str, d: Daemon, cid: str, log: Path, boots: int) -> Callable[[], bool]:
    if kind == "minimal":
        return lambda: log_text(log).count(MINIMAL_MARKER) > boots
    return lambda: _agent_up(d, cid)


def one_run(kind: str, d: Daemon, cid: str, log: Path, reboot: Callable[[], None]
            ) -> tuple[float, float, float]:
    kernels = log_text(log).count(KERNEL_LINE)
    boots = log_text(log).count(MINIMAL_MARKER)
    t0 = time.monotonic()
    reboot()
    returned = time.monotonic() - t0
    console = _wait("new kernel line", lambda: log_text(log).count(KERNEL_LINE) > kernels, t0)
    if kind == "cloud":
        time.sleep(2)  # the agent of the old boot may answer for a moment
    ready = _wait("ready line", _ready(kind, d, cid, log, boots), t0)
    return returned, console, ready


def stats(name: str, values: list[float]) -> str:
    return (f"  {name:<22} min {min(values):6.2f}  median {statistics.median(values):6.2f}  "
            f"max {max(values):6.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["minimal", "cloud"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--flag", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    src = minimal_guest().disk if args.kind == "minimal" else cloud_guest_image()
    tmp = Path(tempfile.mkdtemp(prefix="avr-bench-", dir="/tmp"))
    tmp.chmod(0o711)
    results: dict[str, list[tuple[float, float, float]]] = {"runtime": [], "libvirt": []}
    try:
        (tmp / "img").mkdir()
        (tmp / "img" / "guest.qcow2").symlink_to(src)
        with image_server({"guest.qcow2": tmp / "img" / "guest.qcow2"}) as host, \
                cni_test_network() as net:
            d = vm_runtime(tmp, net).start()
            conn = libvirt.open("qemu:///system")
            try:
                image = f"{host}/guest.qcow2"
                pb, _ = APIS["v1alpha2"]
                rt = d.runtime("v1alpha2")
                d.images("v1alpha2").PullImage(
                    pb.PullImageRequest(image=pb.ImageSpec(image=image)), timeout=600)
                cfg = sandbox_config(pb, tmp / "pods", name="bench-reboot")
                sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg),
                                       timeout=60).pod_sandbox_id
                cid = rt.CreateContainer(pb.CreateContainerRequest(
                    pod_sandbox_id=sid, sandbox_config=cfg,
                    config=container_config(pb, image, memory_mib=512)),
                    timeout=120).container_id
                rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=120)
                log = tmp / "pods" / "vm" / "0.log"
                _wait("first boot", _ready(args.kind, d, cid, log, 0), time.monotonic())
                dom = conn.lookupByUUIDString(cid)

                def via_runtime() -> None:
                    rt.RebootVM(pb.RebootVMRequest(vm_id=cid, rebootSpec=pb.VmRebootSpec(
                        domainRebootFlag=args.flag)), timeout=60)

                for _ in range(args.runs):
                    results["runtime"].append(one_run(args.kind, d, cid, log, via_runtime))
                    results["libvirt"].append(one_run(args.kind, d, cid, log,
                                                      lambda: dom.reboot(args.flag)))
                rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid),
                                    timeout=120)
            finally:
                conn.close()
                d.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ready = "MINIMAL-GUEST-UP" if args.kind == "minimal" else "agent answers"
    print(f"reboot of the {args.kind} guest, domainRebootFlag {args.flag}, {args.runs} runs "
          "each, alternating (TCG)")
    for who, title in (("runtime", "RebootVM via the socket"),
                       ("libvirt", "baseline: virDomainReboot")):
        rs = results[who]
        print(title)
        print(stats("call returned", [r[0] for r in rs]))
        print(stats("new kernel on console", [r[1] for r in rs]))
        print(stats(ready, [r[2] for r in rs]))
    if args.json:
        args.json.write_text(json.dumps({"kind": args.kind, "flag": args.flag,
                                         "runs": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
