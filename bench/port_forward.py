"""PortForward throughput: bytes through the guest's TCP echo (port 7 of the minimal guest),
via the runtime's streaming server, beside the baseline: a direct TCP connection made
inside the pod's network namespace to the same port (what the streaming server itself
does for each forwarded stream).

    .venv/bin/python -m bench.port_forward [--mib 8] [--runs 3]
        [--json bench/results/port_forward.json]

One minimal (busybox) pod is booted through the daemon. Each run sends --mib MiB and reads
them back, for: the direct connection, the project's SPDY client (tests/spdy_client.py),
a WebSocket client (v4.channel.k8s.io, tests/ws_client.py) and client-go's SPDY library
(spdystream, the Go client of tests/go_client.py: one process per run, so its start is in
its figure). Figures are MiB/s of payload echoed (each byte crosses twice). The guest's
echo is busybox `nc -e cat` under TCG: the baseline shows the ceiling that sets.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from arktos_vm_runtime.adapters import pod_socket
from bench.pods import MARKERS, Bench, bench_daemon
from tests.daemon_proc import APIS
from tests.go_client import spdyclient
from tests.integration.vmpods import container_config, log_text, sandbox_config
from tests.spdy_client import SpdyClient
from tests.ws_client import WsClient

ECHO_PORT = 7
CHUNK = 64 * 1024


def _direct(ns: str, ip: str, payload: bytes) -> float:
    t0 = time.monotonic()
    with pod_socket.connect(ns, ip, ECHO_PORT, 10) as s:
        def send() -> None:
            for i in range(0, len(payload), CHUNK):
                s.sendall(payload[i:i + CHUNK])
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        got = 0
        while got < len(payload):
            chunk = s.recv(1 << 20)
            if not chunk:
                raise SystemExit(f"direct: the echo closed after {got} bytes")
            got += len(chunk)
        sender.join()
    return time.monotonic() - t0


def _spdy(url: str, payload: bytes) -> float:
    t0 = time.monotonic()
    c = SpdyClient.connect(url, ["portforward.k8s.io"])
    try:
        c.open({"streamtype": "error", "port": str(ECHO_PORT), "requestid": "0"}).close()
        data = c.open({"streamtype": "data", "port": str(ECHO_PORT), "requestid": "0"})
        def send() -> None:
            for i in range(0, len(payload), CHUNK):
                data.write(payload[i:i + CHUNK])
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        got = data.read_count(len(payload), timeout=600)
        if got < len(payload):
            raise SystemExit(f"spdy: {got} of {len(payload)} bytes came back")
        sender.join()
    finally:
        c.close()
    return time.monotonic() - t0


def _ws(url: str, payload: bytes) -> float:
    prefix = ECHO_PORT.to_bytes(2, "little")
    t0 = time.monotonic()
    ws = WsClient(url, ["v4.channel.k8s.io"])
    try:
        ws.wait_for(1, prefix)
        for i in range(0, len(payload), CHUNK):
            ws.send(0, payload[i:i + CHUNK])
        got = ws.wait_count(0, len(payload) + len(prefix), timeout=600)
        if got < len(payload) + len(prefix):
            raise SystemExit(f"websocket: {got - len(prefix)} of {len(payload)} bytes came back")
    finally:
        ws.close()
    return time.monotonic() - t0


def _go(url: str, payload: bytes) -> float:
    t0 = time.monotonic()
    r = subprocess.run([str(spdyclient()), "portforward", url, str(ECHO_PORT)], input=payload,
                       capture_output=True, timeout=600)
    took = time.monotonic() - t0
    if r.stdout != payload:
        raise SystemExit(f"go client: {len(r.stdout)} of {len(payload)} bytes came back; "
                         f"{r.stderr[-300:]!r}")
    return took


def _boot(b: Bench) -> tuple[str, str]:
    """One minimal pod, up; (its sandbox id, its pod IP)."""
    pb, _ = APIS["v1"]
    rt = b.d.runtime("v1")
    cfg = sandbox_config(pb, b.tmp / "pods", name="bench-pf")
    sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=60).pod_sandbox_id
    cid = rt.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=sid, sandbox_config=cfg, config=container_config(pb, b.image)),
        timeout=120).container_id
    rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=120)
    log = b.tmp / "pods" / "vm" / "0.log"
    t0 = time.monotonic()
    while MARKERS["minimal"] not in log_text(log):
        if time.monotonic() - t0 > 300:
            raise SystemExit("the guest did not come up within 300 s")
        time.sleep(0.1)
    ip = rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid),
                             timeout=15).status.network.ip
    return sid, ip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=float, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    payload = os.urandom(int(args.mib * 1024 * 1024))
    results: dict[str, list[float]] = {"direct": [], "spdy": [], "websocket": [], "go": []}
    with bench_daemon("minimal", api="v1") as b:
        sid, ip = _boot(b)
        pb, _ = APIS["v1"]

        def url() -> str:
            return str(b.d.runtime("v1").PortForward(pb.PortForwardRequest(
                pod_sandbox_id=sid, port=[ECHO_PORT]), timeout=15).url)

        runs: dict[str, Callable[[], float]] = {
            "direct": lambda: _direct(f"avr-{sid}", ip, payload),
            "spdy": lambda: _spdy(url(), payload),
            "websocket": lambda: _ws(url(), payload),
            "go": lambda: _go(url(), payload),
        }
        try:
            for _ in range(args.runs):  # interleaved: TCG's drift hits each alike
                for name, run in runs.items():
                    results[name].append(run())
        finally:
            b.d.runtime("v1").RemovePodSandbox(
                pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    titles = {"direct": "baseline: direct TCP from the pod namespace",
              "spdy": "PortForward, SPDY/3.1 (project client)",
              "websocket": "PortForward, WebSocket v4.channel.k8s.io",
              "go": "PortForward, SPDY/3.1 (client-go spdystream)"}
    print(f"PortForward throughput: {args.mib:g} MiB echoed by the minimal guest's port "
          f"{ECHO_PORT} (TCG), {args.runs} runs each, interleaved; MiB/s of payload")
    base = statistics.median(results["direct"])
    for name, times in results.items():
        rates = [args.mib / t for t in times]
        med = statistics.median(times)
        print(f"  {titles[name]:<46} min {min(rates):6.2f}  median {args.mib / med:6.2f}  "
              f"max {max(rates):6.2f} MiB/s  ({med / base:4.2f}x the baseline's time)")
    if args.json:
        args.json.write_text(json.dumps({"mib": args.mib, "runs": args.runs,
                                         "seconds": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
