"""Cold start under socket activation: systemd-socket-activate listens on the socket (as the
.socket unit does) and starts the daemon on the first connection; measured from the client's
connect to the first answer of Version, beside a warm Version call on the same daemon. Each
run starts a fresh activator; the state directory is kept between runs (as on a node: run 1
also creates it). One more run with PYTHONPROFILEIMPORTTIME lists the slowest imports.

    .venv/bin/python -m bench.cold_start [--runs 5] [--libvirt-uri qemu:///system]

Prints the table; writes bench/results/cold_start.json. Starts no VM.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc

from arktos_vm_runtime.api.gen.v1alpha2 import api_pb2 as pb
from arktos_vm_runtime.api.gen.v1alpha2 import api_pb2_grpc as pb_grpc
from bench.fleet import cleanup_stack, fmt, scratch, summary, write_json
from tests.daemon_proc import PYTHON

IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)")


def one_run(tmp: Path, uri: str, warm_calls: int, importtime: bool) -> dict[str, Any]:
    run = tmp / "run"
    run.mkdir(mode=0o711, exist_ok=True)
    sock = run / "virtlet.sock"
    log = tmp / "daemon.log"
    env = ["-E", "PYTHONPROFILEIMPORTTIME=1"] if importtime else []
    activate = shutil.which("systemd-socket-activate") or "systemd-socket-activate"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [activate, "-l", str(sock), *env, "-E", "PYTHONPATH=" + os.environ.get(
                "PYTHONPATH", ""),
             PYTHON, "-m", "arktos_vm_runtime", "serve", "--listen", str(sock),
             "--state-dir", str(tmp / "state"), "--libvirt-uri", uri,
             "--cni-conf-dir", str(tmp), "--log-level", "warning"],
            stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"systemd-socket-activate did not listen: {log.read_text()}")
            time.sleep(0.01)
        time.sleep(0.2)  # nothing runs before the first connection
        t0 = time.perf_counter()
        with grpc.insecure_channel(f"unix:{sock}") as ch:
            stub = pb_grpc.RuntimeServiceStub(ch)
            stub.Version(pb.VersionRequest(), timeout=60)
            cold = time.perf_counter() - t0
            warm = []
            for _ in range(warm_calls):
                t = time.perf_counter()
                stub.Version(pb.VersionRequest(), timeout=10)
                warm.append((time.perf_counter() - t) * 1000)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {"cold_s": cold, "warm_ms": warm, "log": log.read_text(errors="replace")}


def slowest_imports(text: str, n: int = 12) -> list[dict[str, Any]]:
    """Top-level-ish packages by cumulative import time (us), from -X importtime lines."""
    rows = []
    for line in text.splitlines():
        m = IMPORT_LINE.match(line)
        if m and len(m[3]) <= 3:  # the outermost two levels
            rows.append({"module": m[4], "cumulative_ms": round(int(m[2]) / 1000, 1)})
    rows.sort(key=lambda r: -r["cumulative_ms"])
    return rows[:n]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warm-calls", type=int, default=200)
    ap.add_argument("--libvirt-uri", default="qemu:///system")
    ap.add_argument("--name", default="cold_start")
    args = ap.parse_args(argv)
    with cleanup_stack() as stack:
        tmp = scratch(stack)
        runs = [one_run(tmp, args.libvirt_uri, args.warm_calls, False)
                for _ in range(args.runs)]
        prof = one_run(tmp, args.libvirt_uri, 1, True)
    cold = [r["cold_s"] * 1000 for r in runs]
    warm = [x for r in runs for x in r["warm_ms"]]
    imports = slowest_imports(prof["log"])
    total = next((r["cumulative_ms"] for r in imports
                  if r["module"] == "arktos_vm_runtime.__main__"), None)
    print(f"socket activation (systemd-socket-activate), {args.runs} runs, "
          f"libvirt {args.libvirt_uri}")
    print(fmt("cold: connect .. first Version answer", cold, "ms"))
    print(fmt("warm: one Version call (same daemon)", warm, "ms"))
    print("  slowest imports at startup (cumulative ms, under -X importtime):")
    for r in imports[:8]:
        print(f"    {r['cumulative_ms']:8.1f}  {r['module']}")
    write_json(args.name, {"runs": args.runs, "libvirt_uri": args.libvirt_uri,
                           "cold_ms": [round(x, 1) for x in cold], "cold": summary(cold),
                           "warm": summary(warm), "imports": imports,
                           "daemon_main_import_ms": total})


if __name__ == "__main__":
    main()
