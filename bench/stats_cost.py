"""The cost of ListContainerStats (v1alpha2) and ListPodSandboxStats (v1) at N running VM
pods (the minimal busybox guest, 128 MiB each), through the runtime's socket, next to
libvirt's own getAllDomainStats (same stats groups, in-process, the one call the runtime
makes) and, for scale, one virDomainGetStats-style call per VM (domainListGetStats on each
domain alone: what the runtime avoids).

    .venv/bin/python -m bench.stats_cost [--pods 10] [--calls 50]

Prints min/median/p90 in milliseconds and writes bench/results/stats_cost.json.
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

import libvirt

from arktos_vm_runtime.adapters.domain_stats import FLAGS, STATS
from tests.daemon_proc import APIS, Daemon
from tests.guest.images import minimal_guest
from tests.integration.test_network_common import PLUGINS, cni_test_network
from tests.integration.vmpods import (
    container_config,
    image_server,
    log_text,
    sandbox_config,
)

MARKER = "MINIMAL-GUEST-UP"
RESULTS = Path(__file__).parent / "results" / "stats_cost.json"


def timed(fn: Callable[[], object], calls: int) -> list[float]:
    for _ in range(3):
        fn()  # warm up
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def row(name: str, ms: list[float]) -> dict[str, float | str]:
    q = statistics.quantiles(ms, n=10)
    r: dict[str, float | str] = {
        "what": name, "min_ms": round(min(ms), 3),
        "median_ms": round(statistics.median(ms), 3), "p90_ms": round(q[8], 3)}
    print(f"  {r['what']:<52} min {r['min_ms']:7.2f}  median {r['median_ms']:7.2f}  "
          f"p90 {r['p90_ms']:7.2f} ms", flush=True)
    return r


def start_pods(d: Daemon, image: str, n: int, sids: list[str], memory_mib: int = 128,
               name: str = "stats") -> None:
    """Starts n pods, their ids appended to `sids` as they are made (for the cleanup), and
    waits for every guest's marker."""
    pb, _ = APIS["v1alpha2"]
    rt = d.runtime("v1alpha2")
    logs = []
    for i in range(n):
        log_dir = d.pod_logs / f"pod{i}"
        cfg = sandbox_config(pb, log_dir, name=f"{name}-{i}")
        sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=120).pod_sandbox_id
        sids.append(sid)
        cid = rt.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=sid, sandbox_config=cfg,
            config=container_config(pb, image, memory_mib=memory_mib)),
            timeout=120).container_id
        rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=120)
        logs.append(log_dir / "vm" / "0.log")
    deadline = time.monotonic() + max(600, 300 + 10 * n)
    while not all(MARKER in log_text(p) for p in logs):
        if time.monotonic() > deadline:
            late = [p for p in logs if MARKER not in log_text(p)]
            raise SystemExit(f"{len(late)} of {n} guests did not come up in time; the first's "
                             f"console: {log_text(late[0])[-1500:]!r}")
        time.sleep(1)


def cleanup(d: Daemon, sids: list[str]) -> list[str]:
    """Removes the pods (their VMs destroyed first: a bench needs no clean shutdown) and
    stops the daemon; returns what went wrong instead of raising, so nothing is left
    running behind a removed state directory."""
    pb, _ = APIS["v1alpha2"]
    rt = d.runtime("v1alpha2")
    problems = []
    for sid in sids:
        try:
            for c in rt.ListContainers(pb.ListContainersRequest(filter=pb.ContainerFilter(
                    pod_sandbox_id=sid)), timeout=30).containers:
                rt.StopContainer(pb.StopContainerRequest(container_id=c.id, timeout=0),
                                 timeout=120)
            rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=300)
            rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=300)
        except Exception as e:  # reported; the other pods still go
            problems.append(f"{sid}: {e!r}"[:300])
    if d.stop() != 0:
        problems.append("the daemon exited with an error")
    return problems


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", type=int, default=10)
    ap.add_argument("--calls", type=int, default=50)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="avr-bench-", dir="/tmp"))
    tmp.chmod(0o711)
    rows: list[dict[str, float | str]] = []
    problems: list[str] = ["the daemon did not start"]
    try:
        (tmp / "img").mkdir()
        (tmp / "img" / "guest.qcow2").symlink_to(minimal_guest().disk)
        with image_server({"guest.qcow2": tmp / "img" / "guest.qcow2"}) as host, \
                cni_test_network() as net:
            # As vm_runtime makes it, without a notify listener: nothing here drains one,
            # and the daemon's sd_notify blocks once its queue is full (it froze the first
            # runs of this bench mid-cleanup)
            d = Daemon(tmp, libvirt_uri="qemu:///system", cni_dir=net.conf_dir, notify=False,
                       args=["--disable-kvm", "--image-download-protocol", "http",
                             "--cni-bin-dir", str(PLUGINS), "--max-pods",
                             str(max(args.pods, 110))]).start()
            problems = []
            sids: list[str] = []
            try:
                image = f"{host}/guest.qcow2"
                a2, _ = APIS["v1alpha2"]
                v1, _ = APIS["v1"]
                d.images("v1alpha2").PullImage(a2.PullImageRequest(
                    image=a2.ImageSpec(image=image)), timeout=600)
                start_pods(d, image, args.pods, sids)
                print(f"stats cost, {args.pods} running minimal-guest VM pods, {args.calls} "
                      "calls each (TCG, 2 cores shared)", flush=True)
                rt, rt1 = d.runtime("v1alpha2"), d.runtime("v1")
                got = rt.ListContainerStats(a2.ListContainerStatsRequest(), timeout=30).stats
                assert len(got) == args.pods
                assert all(s.cpu.usage_core_nano_seconds.value > 0 for s in got)
                rows.append(row(f"ListContainerStats v1alpha2, {args.pods} pods", timed(
                    lambda: rt.ListContainerStats(a2.ListContainerStatsRequest(), timeout=30),
                    args.calls)))
                rows.append(row(f"ListPodSandboxStats v1, {args.pods} pods", timed(
                    lambda: rt1.ListPodSandboxStats(v1.ListPodSandboxStatsRequest(),
                                                    timeout=30), args.calls)))
                rows.append(row("ContainerStats v1alpha2, one pod", timed(
                    lambda: rt.ContainerStats(a2.ContainerStatsRequest(
                        container_id=got[0].attributes.id), timeout=30), args.calls)))
                conn = libvirt.open("qemu:///system")
                try:
                    rows.append(row("baseline: libvirt getAllDomainStats (one call)", timed(
                        lambda: conn.getAllDomainStats(STATS, FLAGS), args.calls)))
                    ours = [dom for dom in conn.listAllDomains()
                            if dom.UUIDString() in {s.attributes.id for s in got}]
                    rows.append(row(f"for scale: one domainListGetStats per VM ({len(ours)})",
                                    timed(lambda: [conn.domainListGetStats([dom], STATS, FLAGS)
                                                   for dom in ours], args.calls)))
                finally:
                    conn.close()
            finally:
                problems = cleanup(d, sids)
    finally:
        if problems:  # keep the daemon's log and state for a look
            print(f"cleanup problems (kept {tmp}): {problems}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"pods": args.pods, "calls": args.calls, "rows": rows},
                                  indent=2) + "\n")


if __name__ == "__main__":
    main()
