"""Bare grpcio servers in their own process (no runtime code), the baselines of the call
benches: RuntimeService.Version in the daemon's server model (grpc.aio) or grpcio's classic
thread-pool server (bench/call_cost.py); and `replay`, grpc.aio answering each call with the
bytes the daemon answered the same request with (recorded by bench/relist.py, a JSON file
of {method path: {base64 request: base64 response}}): the floor of what serving the
kubelet's relist costs in Python gRPC, with the daemon's own answers.

    .venv/bin/python -m bench.bare_grpc_server SOCKET {aio,sync}
    .venv/bin/python -m bench.bare_grpc_server SOCKET replay ANSWERS.json

`start` runs one in its own process for a bench, stopped by the bench's cleanup stack.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from arktos_vm_runtime.api.gen.v1alpha2 import api_pb2 as pb
from arktos_vm_runtime.api.gen.v1alpha2 import api_pb2_grpc as pb_grpc

ANSWER = pb.VersionResponse(version="0.1.0", runtime_name="bare", runtime_version="0",
                            runtime_api_version="v1alpha2")


class Sync(pb_grpc.RuntimeServiceServicer):
    def Version(self, request: pb.VersionRequest, context: object) -> pb.VersionResponse:
        return ANSWER


class Aio(pb_grpc.RuntimeServiceServicer):
    async def Version(self, request: pb.VersionRequest,  # type: ignore[override]
                      context: object) -> pb.VersionResponse:
        return ANSWER


async def serve_aio(sock: str) -> None:
    server = grpc.aio.server()
    pb_grpc.add_RuntimeServiceServicer_to_server(Aio(), server)
    server.add_insecure_port(f"unix:{sock}")
    await server.start()
    await server.wait_for_termination()


def _replay_handler(table: dict[bytes, bytes]) -> grpc.RpcMethodHandler:
    async def answer(request: bytes, context: Any) -> bytes:  # no (de)serializer: bytes
        return table[request]
    return grpc.unary_unary_rpc_method_handler(answer)


async def serve_replay(sock: str, answers_file: str) -> None:
    with open(answers_file) as f:
        recorded = json.load(f)
    by_service: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
    for path, table in recorded.items():  # "/runtime.v1.RuntimeService/ListContainers"
        service, method = path.strip("/").split("/")
        by_service.setdefault(service, {})[method] = _replay_handler(
            {base64.b64decode(k): base64.b64decode(v) for k, v in table.items()})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(tuple(
        grpc.method_handlers_generic_handler(service, methods)
        for service, methods in by_service.items()))
    server.add_insecure_port(f"unix:{sock}")
    await server.start()
    await server.wait_for_termination()


def stop(p: subprocess.Popen[bytes]) -> None:
    p.terminate()
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def start(stack: Any, tmp: Path, kind: str, *args: str) -> tuple[str, subprocess.Popen[bytes]]:
    """The server of `kind` (aio, sync, replay ANSWERS) on a socket in `tmp`, in its own
    process and session, stopped by `stack`; its socket path and process."""
    sock = str(tmp / f"bare-{kind}.sock")
    p = subprocess.Popen([sys.executable, "-m", "bench.bare_grpc_server", sock, kind, *args],
                         start_new_session=True)
    stack.callback(stop, p)
    deadline = time.monotonic() + 20
    while not os.path.exists(sock):
        if time.monotonic() > deadline or p.poll() is not None:
            raise SystemExit(f"the bare {kind} server did not start")
        time.sleep(0.05)
    return sock, p


def main() -> None:
    sock, kind = sys.argv[1], sys.argv[2]
    if kind == "replay":
        asyncio.run(serve_replay(sock, sys.argv[3]))
        return
    if kind == "aio":
        asyncio.run(serve_aio(sock))
        return
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_RuntimeServiceServicer_to_server(Sync(), server)
    server.add_insecure_port(f"unix:{sock}")
    server.start()
    server.wait_for_termination()


if __name__ == "__main__":
    main()
