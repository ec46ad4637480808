"""Parallel start: --pods VM pods (minimal guest, 1 vCPU, --memory MiB) started at once, one
thread each running RunPodSandbox + CreateContainer + StartContainer through the socket;
then the same number of raw libvirt-python domains at once (a thread each: qcow2 overlay,
seed ISO, createXML on one shared connection). Wall time until every one is RUNNING (the
last StartContainer / createXML returned), per pod p50/p99, errors; and until every guest
printed its marker.

    .venv/bin/python -m bench.parallel_start [--pods 20] [--memory 128]
        [--lock /tmp/avr-integration.lock] [--profile] [--skip-up]

--profile samples the daemon with py-spy while the pods start (where the runtime's time
goes, against the baseline's); --skip-up does not wait for the guests' markers (a quicker
run when only the time to RUNNING matters). Each half records the load average before it.

Prints the table; writes bench/results/parallel_start.json. Removes everything it made,
also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from bench.fleet import (
    at_once,
    cleanup_stack,
    cpu_s,
    fmt,
    host_cpu_s,
    maybe_lock,
    raw_fleet,
    raw_wait_up,
    runtime_fleet,
    scratch,
    summary,
    wait_up,
    write_json,
)
from bench.profiling import print_top, profile


def load() -> float:
    return round(os.getloadavg()[0], 2)


def runtime_run(args: argparse.Namespace) -> dict[str, Any]:
    with cleanup_stack() as stack:
        fleet = runtime_fleet(stack, scratch(stack), args.memory, args.pods,
                              cni_record=args.cni_record)
        fleet.start_pod(999)  # one pod first: the image's first use and the network warm
        wait_up(fleet.pods, args.boot_timeout)
        warm = fleet.cleanup(stop_daemon=False)
        assert not warm, warm
        fleet.pods.clear()
        got: dict[str, Any] = {"load": load()}
        assert fleet.d.proc is not None
        pid = fleet.d.proc.pid

        def work() -> None:
            c0, h0 = cpu_s(pid), host_cpu_s()
            got["wall"], got["pods"], got["errors"] = at_once(args.pods, fleet.start_pod)
            got["daemon_cpu"], got["host_cpu"] = cpu_s(pid) - c0, host_cpu_s() - h0
        prof = None
        if args.profile:
            prof = profile(pid, work)
        else:
            work()
        wall, pods, errors = got["wall"], got["pods"], got["errors"]
        ok = [p for p in pods if p is not None]
        t_up = time.monotonic()
        late = [] if args.skip_up else wait_up(ok, args.boot_timeout)
        all_up = max((p.t0 + p.up_s for p in ok if p.up_s), default=t_up) - min(
            (p.t0 for p in ok), default=t_up)
        return {"load_before": got["load"], "wall_running_s": round(wall, 3),
                "daemon_cpu_s": round(got["daemon_cpu"], 2),
                "host_cpu_s": round(got["host_cpu"], 2),
                "wall_up_s": None if args.skip_up else round(all_up, 3),
                "per_pod_s": summary([p.api_s for p in ok]),
                "run_sandbox_s": summary([p.run_s for p in ok]),
                "create_container_s": summary([p.create_s for p in ok]),
                "start_container_s": summary([p.start_s for p in ok]),
                "per_pod_up_s": summary([p.up_s for p in ok if p.up_s]),
                "errors": errors, "not_up": len(late), "profile": prof,
                "_api": [p.api_s for p in ok], "_up": [p.up_s for p in ok if p.up_s],
                "_calls": {"RunPodSandbox": [p.run_s for p in ok],
                           "CreateContainer": [p.create_s for p in ok],
                           "StartContainer": [p.start_s for p in ok]}}


def raw_run(args: argparse.Namespace) -> dict[str, Any]:
    with cleanup_stack() as stack:
        fleet = raw_fleet(stack, args.memory)
        first = fleet.start(999)  # warm as the runtime's run is
        raw_wait_up([first], args.boot_timeout)
        fleet.cleanup_one(first.name)
        fleet.doms.clear()
        load_before = load()
        h0 = host_cpu_s()
        wall, doms, errors = at_once(args.pods, fleet.start)
        host_cpu = host_cpu_s() - h0
        ok = [d for d in doms if d is not None]
        late = [] if args.skip_up else raw_wait_up(ok, args.boot_timeout)
        t_up = time.monotonic()
        all_up = max((d.t0 + d.up_s for d in ok if d.up_s), default=t_up) - min(
            (d.t0 for d in ok), default=t_up)
        total = [d.prep_s + d.create_s for d in ok]
        return {"load_before": load_before, "wall_running_s": round(wall, 3),
                "host_cpu_s": round(host_cpu, 2),
                "wall_up_s": None if args.skip_up else round(all_up, 3),
                "per_pod_s": summary(total), "prep_s": summary([d.prep_s for d in ok]),
                "create_only_s": summary([d.create_s for d in ok]),
                "per_pod_up_s": summary([d.up_s for d in ok if d.up_s]),
                "errors": errors, "not_up": len(late),
                "_api": total, "_up": [d.up_s for d in ok if d.up_s],
                "_calls": {"overlay + seed ISO": [d.prep_s for d in ok],
                           "createXML": [d.create_s for d in ok]}}


def sandboxes_profile(args: argparse.Namespace) -> None:
    """RunPodSandbox alone, --pods at once (no VM starts, so no lock needed), with py-spy
    on the daemon: where the runtime's extra time in a parallel start goes."""
    with cleanup_stack() as stack:
        fleet = runtime_fleet(stack, scratch(stack), args.memory, args.pods,
                              cni_record=args.cni_record)
        fleet.start_sandbox(999)  # warm
        assert fleet.d.proc is not None
        got: dict[str, Any] = {}

        def work() -> None:
            got["wall"], got["each"], got["errors"] = at_once(args.pods, fleet.start_sandbox)
        prof = profile(fleet.d.proc.pid, work, native=args.native)
    print(f"RunPodSandbox alone, {args.pods} at once (namespace + CNI bridge/host-local + "
          f"dnsmasq, no VM): all done after {got['wall']:.2f} s, errors {len(got['errors'])}")
    print(fmt("per sandbox", [x for x in got["each"] if x is not None], "s"))
    print_top(prof, 14)
    write_json(f"{args.name}-sandboxes", {"pods": args.pods, "wall_s": round(got["wall"], 3),
                                          "per_sandbox_s": summary(got["each"]),
                                          "errors": got["errors"], "profile": prof})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pods", type=int, default=20)
    ap.add_argument("--memory", type=int, default=128, help="MiB per guest")
    ap.add_argument("--boot-timeout", type=float, default=900)
    ap.add_argument("--lock", help="flock this file around each half")
    ap.add_argument("--name", default="parallel_start")
    ap.add_argument("--sandboxes-only", action="store_true",
                    help="RunPodSandbox alone, profiled (starts no VM)")
    ap.add_argument("--native", action="store_true", help="py-spy --native")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy on the daemon while the runtime's pods start")
    ap.add_argument("--cni-record", action="store_true",
                    help="chain the tests' recording CNI plugin (a Python script, as runs "
                         "before this flag did) after bridge + host-local")
    ap.add_argument("--skip-up", action="store_true",
                    help="do not wait for the guests' markers (time to RUNNING only)")
    args = ap.parse_args(argv)
    if args.sandboxes_only:
        sandboxes_profile(args)
        return
    with maybe_lock(args.lock):
        rt = runtime_run(args)
    with maybe_lock(args.lock):
        raw = raw_run(args)
    n = args.pods
    print(f"parallel start of {n} minimal-guest VMs at once (1 vCPU, {args.memory} MiB, TCG)")
    for label, r in (("arktos-vm-runtime (Run+Create+Start)", rt),
                     ("baseline: raw libvirt (overlay+seed+createXML)", raw)):
        up = "" if r["wall_up_s"] is None else \
            f", all guests up after {r['wall_up_s']:.1f} s, not up {r['not_up']}"
        daemon = f", the daemon {r['daemon_cpu_s']:.2f}" if "daemon_cpu_s" in r else ""
        print(f"{label} (load {r['load_before']}): all RUNNING after "
              f"{r['wall_running_s']:.2f} s, errors {len(r['errors'])}{up}")
        print(f"  CPU seconds meanwhile: the host {r['host_cpu_s']:.2f}{daemon}")
        print(fmt("per VM, to RUNNING", r.pop("_api"), "s"))
        for call, values in r.pop("_calls").items():
            print(fmt(f"  of it {call}", values, "s"))
        if r["wall_up_s"] is not None:
            print(fmt("per VM, to the guest's marker", r.pop("_up"), "s"))
        r.pop("_up", None)
    ratio = rt["wall_running_s"] / raw["wall_running_s"] if raw["wall_running_s"] else 0
    print(f"ratio runtime/raw, wall time to all RUNNING: {ratio:.2f}x (target <= 1.2x)")
    print_top(rt["profile"], 14)
    write_json(args.name, {"config": {"pods": n, "memory_mib": args.memory,
                                      "cni_plugins": ["bridge", "host-local"] + (
                                          ["record"] if args.cni_record else [])},
                           "runtime": rt, "baseline": raw, "ratio": round(ratio, 3)})


if __name__ == "__main__":
    main()
