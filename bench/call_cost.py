"""Per-call cost: Version (and an empty ListPodSandbox) over the daemon's own socket, beside a
bare grpcio server of Version in its own process, in grpcio's thread-pool model (what
bench/socket_latency.py compares with) and in grpc.aio (the daemon's model), quiet and
under load (--load busy-looping processes, default one per core). Calls alternate between
the servers in blocks so drift hits all alike. Then py-spy samples the daemon over
--profile-calls Version calls: where the time per call goes.

    .venv/bin/python -m bench.call_cost [--calls 3000] [--load 2]

Prints median/p99 in microseconds and the ratios; writes bench/results/call_cost.json.
Starts no VM; every process it starts is ended at the end.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import grpc

from arktos_vm_runtime.api.gen.v1alpha2 import api_pb2 as pb
from arktos_vm_runtime.api.gen.v1alpha2 import api_pb2_grpc as pb_grpc
from bench import bare_grpc_server as bare
from bench.fleet import BenchDaemon, cleanup_stack, scratch, summary, write_json
from bench.profiling import print_top, profile

BLOCK = 250


def measure(targets: dict[str, Callable[[], object]], calls: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in targets}
    for fn in targets.values():
        for _ in range(100):
            fn()
    for _ in range(max(1, calls // BLOCK)):
        for name, fn in targets.items():
            for _ in range(BLOCK):
                t0 = time.perf_counter()
                fn()
                out[name].append((time.perf_counter() - t0) * 1e6)
    return out


def table(label: str, got: dict[str, list[float]]) -> dict[str, Any]:
    print(f"{label}:")
    res: dict[str, Any] = {}
    for name, us in got.items():
        s = summary(us)
        res[name] = s
        print(f"  {name:<44} median {s['p50']:7.0f}  p99 {s['p99']:7.0f} us")
    d, a, t = (res["daemon: Version"]["p50"], res["bare grpc.aio: Version"]["p50"],
               res["bare grpcio thread pool: Version"]["p50"])
    res["ratio_vs_aio"] = round(d / a, 2)
    res["ratio_vs_thread_pool"] = round(d / t, 2)
    print(f"  ratio daemon/bare (medians): {d / a:.2f}x vs grpc.aio, {d / t:.2f}x vs the "
          "thread-pool server (target <= 1.2x)")
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--load", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--profile-calls", type=int, default=5000)
    ap.add_argument("--native", action="store_true",
                    help="py-spy --native: C/Cython frames too (grpcio's core)")
    ap.add_argument("--name", default="call_cost")
    args = ap.parse_args(argv)
    out: dict[str, Any] = {"calls": args.calls, "load_processes": args.load}
    with cleanup_stack() as stack:
        tmp = scratch(stack)
        d = BenchDaemon(tmp, libvirt_uri="qemu:///system", notify=False,
                        args=["--log-level", "warning"])
        stack.callback(d.stop)
        d.start()
        chans = {k: stack.enter_context(grpc.insecure_channel(f"unix:{s}")) for k, s in (
            ("sync", bare.start(stack, tmp, "sync")[0]), ("aio", bare.start(stack, tmp, "aio")[0]),
            ("daemon", d.socket))}
        stubs = {k: pb_grpc.RuntimeServiceStub(c) for k, c in chans.items()}
        targets: dict[str, Callable[[], object]] = {
            "bare grpcio thread pool: Version":
                lambda: stubs["sync"].Version(pb.VersionRequest(), timeout=10),
            "bare grpc.aio: Version": lambda: stubs["aio"].Version(pb.VersionRequest(),
                                                                   timeout=10),
            "daemon: Version": lambda: stubs["daemon"].Version(pb.VersionRequest(),
                                                                timeout=10),
            "daemon: ListPodSandbox (no pods)": lambda: stubs["daemon"].ListPodSandbox(
                pb.ListPodSandboxRequest(), timeout=10),
        }
        print(f"per-call latency, one channel each, {args.calls} calls each in blocks of "
              f"{BLOCK}, alternating")
        out["quiet"] = table("quiet", measure(targets, args.calls))
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                 start_new_session=True) for _ in range(args.load)]
        for h in hogs:
            stack.callback(bare.stop, h)
        time.sleep(1)
        out["loaded"] = table(f"under load ({args.load} busy-looping processes)",
                              measure(targets, args.calls))
        for h in hogs:
            bare.stop(h)
        assert d.proc is not None
        print(f"py-spy{' --native' if args.native else ''} on the daemon over "
              f"{args.profile_calls} Version calls (quiet):")
        out["profile"] = profile(d.proc.pid, lambda: [
            stubs["daemon"].Version(pb.VersionRequest(), timeout=10)
            for _ in range(args.profile_calls)], native=args.native)
        print_top(out["profile"], 14)
    write_json(args.name, out)


if __name__ == "__main__":
    main()
