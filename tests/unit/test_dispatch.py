"""The API dispatch in-process, without root: both CRI versions served by grpcio on a unix
socket in a temp dir over the real Core (state store, libvirt on test:///default); the
uniform checks and the one error mapping, including an unexpected exception."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from arktos_vm_runtime.adapters.libvirt_conn import LibvirtConnection
from arktos_vm_runtime.api.dispatch import (
    MAX_MESSAGE,
    TRANSPORT_LIMIT,
    all_handlers,
    api_modules,
)
from arktos_vm_runtime.api.image_service import ImageServicer
from arktos_vm_runtime.api.pools import Pools
from arktos_vm_runtime.api.runtime_service import RuntimeServicer
from arktos_vm_runtime.config import Settings
from arktos_vm_runtime.service.core import Core
from arktos_vm_runtime.service.statedir import StateDir

URI = "test:///default"
Client = Callable[[str, str, bytes], Awaitable[tuple[grpc.StatusCode, bytes | str]]]


class Broken(RuntimeServicer):
    async def Version(self, request: Any, call: Any) -> Any:
        raise KeyError("a bug")


def serve(tmp_path: Path, test: Callable[[Client], Awaitable[None]],
          servicer: type[RuntimeServicer] = RuntimeServicer) -> None:
    settings = Settings(libvirt_uri=URI, state_dir=str(tmp_path / "state"),
                        cni_conf_dir=str(tmp_path / "cni"),
                        template_dir=str(tmp_path / "templates"))
    state = StateDir(settings.state_dir)
    core = Core(settings, state, LibvirtConnection(URI))
    sock = f"unix:{tmp_path}/cri.sock"

    async def main() -> None:
        limits = [("grpc.max_receive_message_length", TRANSPORT_LIMIT),
                  ("grpc.max_send_message_length", TRANSPORT_LIMIT)]
        server = grpc.aio.server(options=limits)  # as the daemon makes it
        pools = Pools()
        server.add_generic_rpc_handlers(all_handlers(servicer(core, pools),
                                                     ImageServicer(core, pools)))
        server.add_insecure_port(sock)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(sock, options=limits) as channel:
                async def call(api: str, method: str,
                               body: bytes) -> tuple[grpc.StatusCode, bytes | str]:
                    service = "ImageService" if "Image" in method else "RuntimeService"
                    stub = channel.unary_unary(f"/runtime.{api}.{service}/{method}")
                    try:
                        return grpc.StatusCode.OK, await stub(body, timeout=10)
                    except grpc.aio.AioRpcError as e:
                        return e.code(), e.details() or ""

                await test(call)
        finally:
            await server.stop(None)
            pools.shutdown()

    try:
        asyncio.run(main())
    finally:
        core.close()
        state.close()


@pytest.mark.parametrize("api", ["v1alpha2", "v1"])
def test_both_versions_answer_from_one_implementation(tmp_path: Path, api: str) -> None:
    pb = api_modules()[api]

    async def test(call: Client) -> None:
        code, body = await call(api, "Version", pb.VersionRequest().SerializeToString())
        assert code == grpc.StatusCode.OK
        assert isinstance(body, bytes)
        assert pb.VersionResponse.FromString(body).runtime_api_version == api
        code, body = await call(api, "ListPodSandbox",
                                pb.ListPodSandboxRequest().SerializeToString())
        assert code == grpc.StatusCode.OK and isinstance(body, bytes)
        assert not pb.ListPodSandboxResponse.FromString(body).items
        # NotFound maps to NOT_FOUND; Stop/Remove of what is gone succeed (the CRI says so).
        code, detail = await call(api, "PodSandboxStatus", pb.PodSandboxStatusRequest(
            pod_sandbox_id="nope").SerializeToString())
        assert code == grpc.StatusCode.NOT_FOUND and "nope" in str(detail)
        for method, req in (("StopPodSandbox", pb.StopPodSandboxRequest),
                            ("RemovePodSandbox", pb.RemovePodSandboxRequest)):
            code, _ = await call(api, method, req(pod_sandbox_id="nope").SerializeToString())
            assert code == grpc.StatusCode.OK, method
        code, _ = await call(api, "RemoveContainer", pb.RemoveContainerRequest(
            container_id="nope").SerializeToString())
        assert code == grpc.StatusCode.OK

    serve(tmp_path, test)


def test_uniform_checks(tmp_path: Path) -> None:
    pb = api_modules()["v1alpha2"]

    async def test(call: Client) -> None:
        code, detail = await call("v1alpha2", "Version", b"\xff\xff\xff")
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in str(detail)
        code, detail = await call("v1", "PodSandboxStatus", pb.PodSandboxStatusRequest(
        ).SerializeToString())
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "pod_sandbox_id" in str(detail)
        big = pb.VersionRequest(version="x" * (MAX_MESSAGE + 10)).SerializeToString()
        code, detail = await call("v1alpha2", "Version", big)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "limit" in str(detail)
        # Required ids are checked before the servicer runs; a method the runtime leaves
        # unimplemented (CheckpointContainer) is UNIMPLEMENTED naming it.
        code, detail = await call("v1", "PortForward", b"")
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "pod_sandbox_id" in str(detail)
        code, detail = await call("v1", "CheckpointContainer", b"")
        assert code == grpc.StatusCode.UNIMPLEMENTED
        assert "CheckpointContainer" in str(detail)

    serve(tmp_path, test)


def test_unexpected_exception_is_internal_never_unknown(tmp_path: Path) -> None:
    async def test(call: Client) -> None:
        code, detail = await call("v1", "Version", b"")
        assert code == grpc.StatusCode.INTERNAL and "a bug" in str(detail)

    serve(tmp_path, test, Broken)
