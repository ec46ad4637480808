"""A bare grpcio server of RuntimeService.Version in its own process (no runtime code): the
baseline of bench/call_cost.py, in the daemon's server model (grpc.aio) or grpcio's
classic thread-pool server.

    .venv/bin/python -m bench.bare_grpc_server SOCKET {aio,sync}
"""

from __future__ import annotations

import asyncio
import sys
from concurrent import futures

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


def main() -> None:
    sock, kind = sys.argv[1], sys.argv[2]
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
