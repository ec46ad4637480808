"""The kubelet's steady load at N running VM pods: the relist pair (ListPodSandbox +
ListContainers, no filter) and one ContainerStatus per container, over the socket, for both
CRI versions, beside libvirt's own listAllDomains on the same libvirtd; and the daemon's CPU
over a stretch of once-a-second kubelet-like relisting. Run from bench/density.py at each
checkpoint (10/50/100 pods), which owns the pods; see there for the command.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import libvirt

from bench.fleet import RuntimeFleet, cpu_s, fmt, summary
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
    print(f"relist at {n} running pods ({rounds} pairs, {status_rounds} x {n} statuses "
          "per version)", flush=True)
    for api in ("v1alpha2", "v1"):
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
        out[api] = {"pair_ms": summary(pairs), "container_status_ms": summary(statuses)}
        print(fmt(f"{api}: ListPodSandbox + ListContainers", pairs, "ms"), flush=True)
        print(fmt(f"{api}: ContainerStatus (each)", statuses, "ms"), flush=True)
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


def cpu_while_relisting(fleet: RuntimeFleet, seconds: int, api: str = "v1") -> dict[str, Any]:
    """The daemon's CPU (utime + stime from /proc) over `seconds` of one kubelet-like relist a
    second (pair + a status per container), and over the same time idle just before."""
    assert fleet.d.proc is not None
    pid = fleet.d.proc.pid
    c0, t0 = cpu_s(pid), time.monotonic()
    time.sleep(seconds)
    idle = (cpu_s(pid) - c0) / (time.monotonic() - t0) * 100
    c0, t0 = cpu_s(pid), time.monotonic()
    tick = t0
    for _ in range(seconds):
        relist_round(fleet, api)
        tick += 1.0
        time.sleep(max(0.0, tick - time.monotonic()))
    busy = (cpu_s(pid) - c0) / (time.monotonic() - t0) * 100
    n = len(fleet.pods)
    print(f"  daemon CPU, {seconds} s idle: {idle:5.2f} % of one core; {seconds} s of one "
          f"relist a second ({api}, pair + {n} statuses): {busy:5.2f} % of one core",
          flush=True)
    return {"pods": n, "seconds": seconds, "api": api, "idle_cpu_pct": round(idle, 2),
            "relisting_cpu_pct": round(busy, 2)}
