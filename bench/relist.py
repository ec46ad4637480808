"""The kubelet's steady load at N running VM pods: the relist pair (ListPodSandbox +
ListContainers, no filter) and one ContainerStatus per container, over the socket, for both
CRI versions, beside libvirt's own listAllDomains on the same libvirtd; and the daemon's CPU
over a stretch of once-a-second kubelet-like relisting. Run from bench/density.py at each
checkpoint (10/50/100 pods), which owns the pods; see there for the command. Run alone, it
makes --pods pods whose VMs are defined but not booted (--start boots them, unwaited): the
runtime's own cost without TCG guests loading the machine.

    .venv/bin/python -m bench.relist [--pods 100] [--cpu-seconds 60] [--profile]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import libvirt

from bench import bare_grpc_server
from bench.fleet import (
    RuntimeFleet,
    cleanup_stack,
    cpu_s,
    fmt,
    maybe_lock,
    rss_kib,
    runtime_fleet,
    scratch,
    summary,
    write_json,
)
from bench.profiling import print_top, profile
from tests.daemon_proc import APIS


def _timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def relist_round(fleet: RuntimeFleet, api: str) -> tuple[float, list[float], int]:
    """One kubelet-like relist: the pair, then a status per container. Returns the pair's
    ms, each status's ms, and how many containers the list returned."""
    pb, _ = APIS[api]
    rt = fleet.d.runtime(api)
    t0 = time.perf_counter()
    rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30)
    containers = rt.ListContainers(pb.ListContainersRequest(), timeout=30).containers
    pair = (time.perf_counter() - t0) * 1000
    statuses = []
    for c in containers:
        t = time.perf_counter()
        rt.ContainerStatus(pb.ContainerStatusRequest(container_id=c.id), timeout=30)
        statuses.append((time.perf_counter() - t) * 1000)
    return pair, statuses, len(containers)


def measure(fleet: RuntimeFleet, rounds: int, status_rounds: int) -> dict[str, Any]:
    """Per API version: `rounds` pairs back to back, and `status_rounds` full relists for
    the statuses. Then listAllDomains on our libvirtd."""
    n = len(fleet.pods)
    out: dict[str, Any] = {"pods": n}
    print(f"relist at {n} pods ({rounds} pairs, {status_rounds} x {n} statuses "
          "per version)", flush=True)
    for api in ("v1alpha2", "v1"):
        pb, _ = APIS[api]
        for _ in range(3):
            relist_round(fleet, api)  # warm up
        pairs, statuses = [], []
        for _ in range(rounds):
            pair, _, got = relist_round_pair_only(fleet, api)
            if got != n:
                raise SystemExit(f"ListContainers returned {got} containers, expected {n}")
            pairs.append(pair)
        for _ in range(status_rounds):
            statuses += relist_round(fleet, api)[1]
        rt = fleet.d.runtime(api)
        sandbox_statuses = []
        for _ in range(status_rounds):
            for p in fleet.pods:
                req = pb.PodSandboxStatusRequest(pod_sandbox_id=p.sid)
                t = time.perf_counter()
                rt.PodSandboxStatus(req, timeout=30)
                sandbox_statuses.append((time.perf_counter() - t) * 1000)
        out[api] = {"pair_ms": summary(pairs), "container_status_ms": summary(statuses),
                    "pod_sandbox_status_ms": summary(sandbox_statuses)}
        print(fmt(f"{api}: ListPodSandbox + ListContainers", pairs, "ms"), flush=True)
        print(fmt(f"{api}: ContainerStatus (each)", statuses, "ms"), flush=True)
        print(fmt(f"{api}: PodSandboxStatus (each)", sandbox_statuses, "ms"), flush=True)
    conn = libvirt.open("qemu:///system")
    try:
        ours = {f"avr-{p.cid}" for p in fleet.pods}
        mine = [d for d in conn.listAllDomains() if d.name() in ours]
        assert len(mine) == n, f"libvirt has {len(mine)} of our {n} domains"
        lad = _timed(conn.listAllDomains, rounds)
        total = len(conn.listAllDomains())
    finally:
        conn.close()
    out["listAllDomains_ms"] = summary(lad)
    out["libvirt_domains_total"] = total
    print(fmt(f"baseline: libvirt listAllDomains ({total} domains)", lad, "ms"), flush=True)
    return out


def relist_round_pair_only(fleet: RuntimeFleet, api: str) -> tuple[float, None, int]:
    pb, _ = APIS[api]
    rt = fleet.d.runtime(api)
    t0 = time.perf_counter()
    rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30)
    got = len(rt.ListContainers(pb.ListContainersRequest(), timeout=30).containers)
    return (time.perf_counter() - t0) * 1000, None, got


# The once-a-second loads the CPU is measured under: what a stock kubelet's PLEG sends; what
# the Arktos kubelet was seen sending (../shared/kubelet/README.md: the pair and a
# PodSandboxStatus per pod every second); and the load, a ContainerStatus per
# container on top of the pair (what every pod's status refresh at once would cost).
LOADS = {
    "pair": "ListPodSandbox + ListContainers",
    "arktos": "pair + PodSandboxStatus per pod",
    "statuses": "pair + ContainerStatus per container",
}


def load_calls(fleet: RuntimeFleet, api: str, load: str) -> list[tuple[str, bytes]]:
    """One second's calls of `load`, as (method path, serialized request)."""
    pb, _ = APIS[api]
    svc = f"/runtime.{api}.RuntimeService/"
    calls = [(svc + "ListPodSandbox", pb.ListPodSandboxRequest().SerializeToString()),
             (svc + "ListContainers", pb.ListContainersRequest(
                 filter=pb.ContainerFilter()).SerializeToString())]  # the kubelet's empty filter
    if load == "arktos":
        calls += [(svc + "PodSandboxStatus", pb.PodSandboxStatusRequest(
            pod_sandbox_id=p.sid).SerializeToString()) for p in fleet.pods]
    elif load == "statuses":
        calls += [(svc + "ContainerStatus", pb.ContainerStatusRequest(
            container_id=p.cid).SerializeToString()) for p in fleet.pods]
    return calls


class RawCaller:
    """Calls by method path with bytes in and out, so the daemon and the replay server get
    the same requests from the same client code."""

    def __init__(self, sock: str) -> None:
        self.channel = grpc.insecure_channel(f"unix:{sock}")
        self._stubs: dict[str, Any] = {}

    def __call__(self, path: str, request: bytes) -> bytes:
        stub = self._stubs.get(path)
        if stub is None:
            stub = self._stubs[path] = self.channel.unary_unary(path)
        return bytes(stub(request, timeout=30))

    def close(self) -> None:
        self.channel.close()


def _cpu_pct(pid: int, seconds: int, work: Callable[[], object] | None) -> float:
    """A process's CPU (utime + stime) over `seconds`, with `work` run once a second."""
    c0, t0 = cpu_s(pid), time.monotonic()
    tick = t0
    for _ in range(seconds):
        if work is not None:
            work()
        tick += 1.0
        time.sleep(max(0.0, tick - time.monotonic()))
    return (cpu_s(pid) - c0) / (time.monotonic() - t0) * 100


def _each(caller: RawCaller, calls: list[tuple[str, bytes]]) -> Callable[[], None]:
    def run() -> None:
        for path, req in calls:
            caller(path, req)
    return run


def cpu_while_relisting(fleet: RuntimeFleet, seconds: int,
                        api: str = "v1alpha2") -> dict[str, Any]:
    """The daemon's CPU over `seconds` idle, then over `seconds` of each of LOADS once a
    second; beside it, the same calls answered by a bare grpc.aio server replaying the
    daemon's own answers (bench/bare_grpc_server.py replay), measured the same way."""
    assert fleet.d.proc is not None
    pid = fleet.d.proc.pid
    n = len(fleet.pods)
    out: dict[str, Any] = {"pods": n, "seconds": seconds, "api": api}
    daemon = RawCaller(fleet.d.socket)
    answers: dict[str, dict[str, str]] = {}
    try:
        out["idle_cpu_pct"] = round(_cpu_pct(pid, seconds, None), 2)
        for load in LOADS:
            calls = load_calls(fleet, api, load)
            for path, req in calls:  # warm, and the answers the replay server will give
                answers.setdefault(path, {})[base64.b64encode(req).decode()] = \
                    base64.b64encode(daemon(path, req)).decode()
            out[f"{load}_cpu_pct"] = round(_cpu_pct(pid, seconds, _each(daemon, calls)), 2)
    finally:
        daemon.close()
    with contextlib.ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="avr-replay-"))
        stack.callback(shutil.rmtree, tmp, True)
        (tmp / "answers.json").write_text(json.dumps(answers))
        sock, proc = bare_grpc_server.start(stack, tmp, "replay", str(tmp / "answers.json"))
        bare = RawCaller(sock)
        stack.callback(bare.close)
        out["bare_idle_cpu_pct"] = round(_cpu_pct(proc.pid, min(seconds, 10), None), 2)
        for load in LOADS:
            calls = load_calls(fleet, api, load)
            for path, req in calls:  # warm, and the replay gives the daemon's answers
                if base64.b64encode(bare(path, req)).decode() != answers[path][
                        base64.b64encode(req).decode()]:
                    raise SystemExit(f"the replay server's answer to {path} differs")
            out[f"bare_{load}_cpu_pct"] = round(_cpu_pct(proc.pid, seconds,
                                                         _each(bare, calls)), 2)
    print(f"  CPU over {seconds} s at {n} pods ({api}), % of one core: daemon idle "
          f"{out['idle_cpu_pct']:.2f}; bare grpc.aio replaying the daemon's answers idle "
          f"{out['bare_idle_cpu_pct']:.2f}", flush=True)
    for load, what in LOADS.items():
        ncalls = 2 + (n if load != "pair" else 0)
        print(f"    once a second, {what} ({ncalls} calls): daemon "
              f"{out[f'{load}_cpu_pct']:5.2f} %, bare {out[f'bare_{load}_cpu_pct']:5.2f} %",
              flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="relist cost at N pods whose VMs are defined "
                                 "(not booted unless --start): the runtime's side alone")
    ap.add_argument("--pods", type=int, default=100)
    ap.add_argument("--start", action="store_true", help="also start the VMs (not waited for)")
    ap.add_argument("--memory", type=int, default=128)
    ap.add_argument("--relist-rounds", type=int, default=200)
    ap.add_argument("--status-rounds", type=int, default=5)
    ap.add_argument("--cpu-seconds", type=int, default=60)
    ap.add_argument("--profile", action="store_true", help="py-spy on 10 relists")
    ap.add_argument("--lock", help="flock this file for the run")
    ap.add_argument("--name", default="relist-defined")
    args = ap.parse_args(argv)
    out: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k != "lock"}}
    with maybe_lock(args.lock), cleanup_stack() as stack:
        tmp = scratch(stack)
        fleet = runtime_fleet(stack, tmp, args.memory, args.pods)
        assert fleet.d.proc is not None
        t0 = time.monotonic()
        for i in range(args.pods):
            fleet.start_pod(i, start=args.start)
        print(f"{args.pods} pods made in {time.monotonic() - t0:.1f} s "
              f"({'started' if args.start else 'VMs defined, not started'})", flush=True)
        out["measure"] = measure(fleet, args.relist_rounds, args.status_rounds)
        out["cpu"] = cpu_while_relisting(fleet, args.cpu_seconds)
        if args.profile:
            out["profile"] = profile(fleet.d.proc.pid, lambda: [relist_round(fleet, "v1")
                                                                for _ in range(10)])
            print_top(out["profile"])
        out["daemon_rss_mib"] = round(rss_kib(fleet.d.proc.pid) / 1024, 1)
    write_json(args.name, out)


if __name__ == "__main__":
    main()
