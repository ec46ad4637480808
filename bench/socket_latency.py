"""Per-call latency of Version over the daemon's socket, served directly and through
socket activation (the relay), and the daemon's idle RSS.

    .venv/bin/python -m bench.socket_latency [--calls 2000]

Prints min/median/p99 per mode in microseconds, with the raw grpcio server (no runtime
code at all, same socket kind) as the baseline.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

import grpc

from arktos_vm_runtime.api.gen.v1alpha2 import api_pb2 as pb
from arktos_vm_runtime.api.gen.v1alpha2 import api_pb2_grpc as pb_grpc


def measure(sock: str, calls: int) -> list[float]:
    with grpc.insecure_channel(f"unix:{sock}") as ch:
        stub = pb_grpc.RuntimeServiceStub(ch)
        for _ in range(50):  # warm up the connection
            stub.Version(pb.VersionRequest(), timeout=10)
        out = []
        for _ in range(calls):
            t0 = time.perf_counter()
            stub.Version(pb.VersionRequest(), timeout=10)
            out.append((time.perf_counter() - t0) * 1e6)
    return out


def wait_socket(path: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + 20
    while not os.path.exists(path):
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"process exited: {proc.returncode}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{path} never appeared")
        time.sleep(0.05)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def baseline(tmp: Path, calls: int) -> list[float]:
    class Plain(pb_grpc.RuntimeServiceServicer):
        def Version(self, request: pb.VersionRequest, context: object) -> pb.VersionResponse:
            return pb.VersionResponse(version="0.1.0", runtime_name="plain",
                                      runtime_version="0", runtime_api_version="v1alpha2")

    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_RuntimeServiceServicer_to_server(Plain(), server)
    sock = str(tmp / "plain.sock")
    server.add_insecure_port(f"unix:{sock}")
    server.start()
    try:
        return measure(sock, calls)
    finally:
        server.stop(0)


def daemon(tmp: Path, calls: int, activated: bool) -> tuple[list[float], int]:
    run = tmp / ("act" if activated else "direct")
    run.mkdir(mode=0o700)
    sock = str(run / "virtlet.sock")
    cmd = [sys.executable, "-m", "arktos_vm_runtime", "serve", "--listen", sock,
           "--state-dir", str(run / "state"), "--libvirt-uri", "test:///default",
           "--cni-conf-dir", str(run)]
    if activated:
        cmd = [shutil.which("systemd-socket-activate") or "systemd-socket-activate",
               "-l", sock, *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_socket(sock, proc)
        lat = measure(sock, calls)
        time.sleep(2)  # idle
        # systemd-socket-activate execs the daemon in place: same pid either way
        return lat, rss_kib(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def row(name: str, lat: list[float], rss: int | None = None) -> str:
    q = statistics.quantiles(lat, n=100)
    extra = f"  idle RSS {rss / 1024:.1f} MiB" if rss else ""
    return (f"{name:<34} min {min(lat):7.0f}  median {statistics.median(lat):7.0f}  "
            f"p99 {q[98]:7.0f} us{extra}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="avr-bench-") as t:
        tmp = Path(t)
        print(f"Version over a unix socket, {args.calls} sequential calls, one channel")
        print(row("baseline: bare grpcio server", baseline(tmp, args.calls)))
        lat, rss = daemon(tmp, args.calls, activated=False)
        print(row("arktos-vm-runtime, own socket", lat, rss))
        lat, rss = daemon(tmp, args.calls, activated=True)
        print(row("arktos-vm-runtime, socket-activated", lat, rss))


if __name__ == "__main__":
    main()
