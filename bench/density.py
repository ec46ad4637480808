"""Density: minimal-guest VM pods (busybox, 1 vCPU, --memory MiB) started one after another
through the runtime's socket until --pods run or an error; then the same count of raw
libvirt-python domains of the same guest and shape (the baseline, no network). At each
checkpoint (10, 50, 100 pods or the --checkpoints given): every guest up, the daemon's RSS
and open fds, each VM's QEMU RSS, whether every pod answers ping on its CNI address (from a
probe namespace on the pod network), and the relist figures (bench/relist.py). Daemon CPU
over --cpu-seconds of once-a-second relisting at the last checkpoint.

    .venv/bin/python -m bench.density [--pods 100] [--memory 128] [--lock /tmp/avr-integration.lock]

Prints the tables; writes bench/results/density.json and relist.json (--name changes the
stem). Every pod, domain, file and network is removed at the end, also on error or Ctrl-C.
Each pod's guest is waited for before the next starts (start time vs count = what the Nth
pod costs with N-1 running). Stops early, and says why, when the host's MemAvailable falls
below --min-free-mib, a guest takes longer than --max-boot-s, or a phase has run
--budget-s (TCG guests are CPU: the machine's cores run out long before its memory).
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path
from typing import Any

from bench import relist
from bench.fleet import (
    RawDomain,
    RawFleet,
    RuntimeFleet,
    cleanup_stack,
    cpu_s,
    fds,
    fmt,
    maybe_lock,
    pings,
    qemu_pid,
    raw_fleet,
    raw_wait_up,
    rss_kib,
    runtime_fleet,
    scratch,
    summary,
    wait_up,
    write_json,
)
from bench.profiling import print_top, profile


def mem_available_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


def host() -> dict[str, Any]:
    return {"loadavg_1m": os.getloadavg()[0], "mem_available_mib": mem_available_mib()}


def checkpoints(arg: str, pods: int) -> list[int]:
    cps = sorted({int(x) for x in arg.split(",") if x and int(x) < pods} | {pods})
    return cps


def qemu_cpu_pct(domains: list[str], seconds: float = 5.0) -> list[float]:
    """Each QEMU's CPU over `seconds`, % of one core (idle guests: TCG's timer ticks)."""
    pids = [p for p in (qemu_pid(n) for n in domains) if p]
    c0 = {p: cpu_s(p) for p in pids}
    time.sleep(seconds)
    return [100 * (cpu_s(p) - c0[p]) / seconds for p in pids]


def qemu_rss(domains: list[str]) -> list[float]:
    out = []
    for name in domains:
        pid = qemu_pid(name)
        if pid:
            out.append(rss_kib(pid) / 1024)
    return out


class Watcher:
    """Fills each pod's up_s as its marker appears, in the background (0.5 s polls)."""

    def __init__(self, poll: Any) -> None:
        self.poll = poll
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            self.poll()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def runtime_phase(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    res: dict[str, Any] = {"per_pod": [], "checkpoints": [], "stopped": None}
    rel: dict[str, Any] = {"checkpoints": []}
    with cleanup_stack() as stack:
        tmp = scratch(stack)
        fleet = runtime_fleet(stack, tmp, args.memory, args.pods)
        assert fleet.d.proc is not None
        pid = fleet.d.proc.pid
        res["daemon_start"] = {"rss_mib": round(rss_kib(pid) / 1024, 1), "fds": fds(pid)}
        watcher = Watcher(lambda: wait_up(list(fleet.pods), 0))
        stack.callback(watcher.close)
        cps = checkpoints(args.checkpoints, args.pods)
        t_phase = time.monotonic()
        print(f"density: runtime, minimal guest, 1 vCPU, {args.memory} MiB, up to "
              f"{args.pods} pods (checkpoints {cps})", flush=True)
        print(f"  {'pods':>5} {'api s':>7} {'up s':>7} {'daemon RSS MiB':>15} {'fds':>5} "
              f"{'QEMU RSS MiB p50/max':>21} {'ping ok':>8} {'QEMU CPU %/VM':>13} {'all QEMU':>8} "
              f"{'load':>5} {'free MiB':>9}", flush=True)
        for i in range(args.pods):
            if mem_available_mib() < args.min_free_mib:
                res["stopped"] = (f"before pod {i + 1}: host MemAvailable "
                                  f"{mem_available_mib()} MiB < {args.min_free_mib}")
                break
            if time.monotonic() - t_phase > args.budget_s:
                res["stopped"] = (f"before pod {i + 1}: the phase's time budget "
                                  f"({args.budget_s:.0f} s) is spent; load {host()}")
                break
            try:
                pod = fleet.start_pod(i)
            except Exception as e:
                res["stopped"] = f"pod {i + 1}: {e!r}"[:500]
                break
            if wait_up([pod], args.max_boot_s):
                res["stopped"] = (f"pod {i + 1}: its guest was not up within "
                                  f"{args.max_boot_s:.0f} s; {host()}")
                break
            if i + 1 in cps:
                checkpoint(fleet, args, res, rel, pid)
        if res["stopped"]:
            print(f"  stopped: {res['stopped']}", flush=True)
            if fleet.pods and len(fleet.pods) not in cps:
                checkpoint(fleet, args, res, rel, pid)
        if fleet.pods:
            rel["cpu"] = relist.cpu_while_relisting(fleet, args.cpu_seconds)
            if args.profile:
                print("  profiling 10 relists (pair + statuses, v1) with py-spy:", flush=True)
                rel["profile"] = profile(pid, lambda: [relist.relist_round(fleet, "v1")
                                                       for _ in range(10)])
                print_top(rel["profile"])
        watcher.close()
        res["per_pod"] = [{"pod": p.i + 1, "api_s": round(p.api_s, 3),
                           "up_s": round(p.up_s, 3)} for p in sorted(fleet.pods,
                                                                      key=lambda p: p.i)]
        problems = fleet.cleanup(stop_daemon=False)
        res["after_removal"] = {"rss_mib": round(rss_kib(pid) / 1024, 1), "fds": fds(pid),
                                "problems": problems}
        print(f"  all pods removed: daemon RSS {res['after_removal']['rss_mib']} MiB, "
              f"fds {res['after_removal']['fds']} (at start: {res['daemon_start']})",
              flush=True)
    return res, rel


def checkpoint(fleet: RuntimeFleet, args: argparse.Namespace, res: dict[str, Any],
               rel: dict[str, Any], pid: int) -> None:
    n = len(fleet.pods)
    late = wait_up(fleet.pods, args.boot_timeout)
    ips = {p.sid: fleet.pod_ip(p.sid) for p in fleet.pods}
    bad = [p.i + 1 for p in fleet.pods if not ips[p.sid] or not pings(fleet.net, ips[p.sid])]
    q = qemu_rss([f"avr-{p.cid}" for p in fleet.pods])
    qcpu = qemu_cpu_pct([f"avr-{p.cid}" for p in fleet.pods])
    cp = {"qemu_cpu_pct": summary(qcpu), "qemu_cpu_total_cores": round(sum(qcpu) / 100, 2),
          "pods": n, "daemon_rss_mib": round(rss_kib(pid) / 1024, 1), "daemon_fds": fds(pid),
          "qemu_rss_mib": summary(q), "guest_mib": args.memory, "not_up": [p.i + 1 for p in late],
          "ping_failed": bad, **host()}
    res["checkpoints"].append(cp)
    last = max(fleet.pods, key=lambda p: p.i)
    print(f"  {n:>5} {last.api_s:7.2f} {last.up_s:7.1f} {cp['daemon_rss_mib']:15.1f} "
          f"{cp['daemon_fds']:>5} {cp['qemu_rss_mib'].get('p50', 0):10.1f}/"
          f"{cp['qemu_rss_mib'].get('max', 0):<10.1f} {n - len(bad):>4}/{n:<3} "
          f"{cp['qemu_cpu_pct'].get('p50', 0):13.1f} {cp['qemu_cpu_total_cores']:8.2f} "
          f"{cp['loadavg_1m']:5.1f} {cp['mem_available_mib']:9}", flush=True)
    r = relist.measure(fleet, args.relist_rounds, args.status_rounds)
    rel["checkpoints"].append(r)


def baseline_phase(args: argparse.Namespace, count: int) -> dict[str, Any]:
    res: dict[str, Any] = {"per_domain": [], "checkpoints": [], "stopped": None}
    cps = checkpoints(args.checkpoints, count)
    with cleanup_stack() as stack:
        fleet: RawFleet = raw_fleet(stack, args.memory)
        print(f"baseline: raw libvirt-python, same guest, 1 vCPU, {args.memory} MiB, "
              f"{count} domains, no network", flush=True)
        print(f"  {'doms':>5} {'prep+create s':>14} {'up s':>7} {'QEMU RSS MiB p50/max':>21} "
              f"{'QEMU CPU %/VM':>13} {'all QEMU':>8} {'load':>5} {'free MiB':>9}", flush=True)
        doms: list[RawDomain] = []
        t_phase = time.monotonic()
        watcher = Watcher(lambda: raw_wait_up(list(doms), 0))
        stack.callback(watcher.close)
        for i in range(count):
            if mem_available_mib() < args.min_free_mib:
                res["stopped"] = f"before domain {i + 1}: MemAvailable below {args.min_free_mib}"
                break
            budget = args.baseline_budget_s or args.budget_s
            if time.monotonic() - t_phase > budget:
                res["stopped"] = (f"before domain {i + 1}: the phase's time budget "
                                  f"({budget:.0f} s) is spent; load {host()}")
                break
            try:
                doms.append(fleet.start(i))
            except Exception as e:
                res["stopped"] = f"domain {i + 1}: {e!r}"[:500]
                break
            if raw_wait_up(doms[-1:], args.max_boot_s):
                res["stopped"] = (f"domain {i + 1}: its guest was not up within "
                                  f"{args.max_boot_s:.0f} s; {host()}")
                break
            if i + 1 in cps:
                late = raw_wait_up(doms, args.boot_timeout)
                q = qemu_rss([d.name for d in doms])
                qcpu = qemu_cpu_pct([d.name for d in doms])
                cp = {"qemu_cpu_pct": summary(qcpu),
                      "qemu_cpu_total_cores": round(sum(qcpu) / 100, 2),
                      "domains": len(doms), "qemu_rss_mib": summary(q),
                      "not_up": [d.i + 1 for d in late], **host()}
                res["checkpoints"].append(cp)
                d = doms[-1]
                print(f"  {len(doms):>5} {d.prep_s + d.create_s:14.2f} {d.up_s:7.1f} "
                      f"{cp['qemu_rss_mib'].get('p50', 0):10.1f}/"
                      f"{cp['qemu_rss_mib'].get('max', 0):<10.1f} "
                      f"{cp['qemu_cpu_pct'].get('p50', 0):13.1f} "
                      f"{cp['qemu_cpu_total_cores']:8.2f} {cp['loadavg_1m']:5.1f} "
                      f"{cp['mem_available_mib']:9}", flush=True)
        watcher.close()
        res["per_domain"] = [{"domain": d.i + 1, "prep_s": round(d.prep_s, 3),
                              "create_s": round(d.create_s, 3), "up_s": round(d.up_s, 3)}
                             for d in doms]
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pods", type=int, default=100)
    ap.add_argument("--memory", type=int, default=128, help="MiB per guest (64-128)")
    ap.add_argument("--checkpoints", default="10,50,100")
    ap.add_argument("--relist-rounds", type=int, default=200)
    ap.add_argument("--status-rounds", type=int, default=5)
    ap.add_argument("--cpu-seconds", type=int, default=60)
    ap.add_argument("--boot-timeout", type=float, default=900)
    ap.add_argument("--min-free-mib", type=int, default=2048)
    ap.add_argument("--max-boot-s", type=float, default=240,
                    help="stop when one guest takes longer than this to come up")
    ap.add_argument("--baseline-budget-s", type=float, default=0,
                    help="the baseline phase's own budget (0: --budget-s)")
    ap.add_argument("--budget-s", type=float, default=600,
                    help="stop starting pods (domains) after this long in a phase")
    ap.add_argument("--profile", action="store_true", help="py-spy on the relists")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--lock", help="flock this file around each phase (not across both)")
    ap.add_argument("--name", default="density")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    with maybe_lock(args.lock):
        rt, rel = runtime_phase(args)
    reached = len(rt["per_pod"])
    base = None
    if not args.skip_baseline and reached:
        with maybe_lock(args.lock):
            base = baseline_phase(args, reached)
    api = [p["api_s"] for p in rt["per_pod"]]
    up = [p["up_s"] for p in rt["per_pod"] if p["up_s"]]
    print(f"summary, {reached} pods:")
    print(fmt("runtime: RunPodSandbox..StartContainer", api, "s"))
    print(fmt("runtime: ..guest up (marker)", up, "s"))
    if base:
        print(fmt("baseline: overlay + seed + createXML",
                  [d["prep_s"] + d["create_s"] for d in base["per_domain"]], "s"))
        print(fmt("baseline: ..guest up (marker)",
                  [d["up_s"] for d in base["per_domain"] if d["up_s"]], "s"))
    config = {k: v for k, v in vars(args).items() if k != "lock"}
    write_json(args.name, {"config": config, "runtime": rt, "baseline": base,
                           "wall_s": round(time.monotonic() - t0, 1)})
    write_json(f"relist{args.name.removeprefix('density')}", {"config": config, **rel})


if __name__ == "__main__":
    main()
