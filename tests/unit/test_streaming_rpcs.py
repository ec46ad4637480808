"""Exec, Attach and PortForward RPCs over the wire (both CRI versions) in-process: grpcio on
a unix socket over the real Core (state store, libvirt on test:///default), with a stub in
place of the streaming server (only its URL methods are called here; the server is issue
11's other half). The checks of /work/shared/streaming.md §1 and the URL handed back."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from arktos_vm_runtime.adapters.libvirt_conn import LibvirtConnection
from arktos_vm_runtime.api.dispatch import all_handlers, api_modules
from arktos_vm_runtime.api.image_service import ImageServicer
from arktos_vm_runtime.api.pools import Pools
from arktos_vm_runtime.api.runtime_service import RuntimeServicer
from arktos_vm_runtime.config import Settings
from arktos_vm_runtime.service.core import Core
from arktos_vm_runtime.service.records import (
    CREATED,
    RUNNING,
    SANDBOX_READY,
    ContainerRecord,
    SandboxRecord,
)
from arktos_vm_runtime.service.statedir import StateDir

URI = "test:///default"


class StubServer:
    """StreamingServer's URL methods (the API fixed in issue11-common.md)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def exec_url(self, container_id: str, cmd: list[str], *, tty: bool, stdin: bool,
                 stdout: bool, stderr: bool) -> str:
        self.calls.append(("exec", container_id, cmd, tty, stdin, stdout, stderr))
        return "http://127.0.0.1:1/exec/TOKEN001"

    def attach_url(self, container_id: str, *, tty: bool, stdin: bool, stdout: bool,
                   stderr: bool) -> str:
        self.calls.append(("attach", container_id, tty, stdin, stdout, stderr))
        return "http://127.0.0.1:1/attach/TOKEN002"

    def port_forward_url(self, sandbox_id: str, ports: list[int]) -> str:
        self.calls.append(("portforward", sandbox_id, ports))
        return "http://127.0.0.1:1/portforward/TOKEN003"


Test = Callable[[Core, grpc.aio.Channel, StubServer | None], Awaitable[None]]


def serve(tmp_path: Path, test: Test, with_server: bool = True) -> None:
    settings = Settings(libvirt_uri=URI, state_dir=str(tmp_path / "state"),
                        cni_conf_dir=str(tmp_path / "cni"),
                        template_dir=str(tmp_path / "templates"))
    state = StateDir(settings.state_dir)
    core = Core(settings, state, LibvirtConnection(URI))
    sock = f"unix:{tmp_path}/cri.sock"
    stub = StubServer() if with_server else None

    async def main() -> None:
        server = grpc.aio.server()
        pools = Pools()
        servicer = RuntimeServicer(core, pools)
        servicer.streaming = stub
        server.add_generic_rpc_handlers(all_handlers(servicer, ImageServicer(core, pools)))
        server.add_insecure_port(sock)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(sock) as channel:
                await test(core, channel, stub)
        finally:
            await server.stop(None)
            pools.shutdown()

    try:
        asyncio.run(main())
    finally:
        core.close()
        state.close()


def records(core: Core) -> None:
    """Sandbox s1 with container c-run (running); sandbox s2 with c-made (created)."""
    for sid in ("s1", "s2"):
        core.pods.state.add_sandbox(SandboxRecord(
            id=sid, name=sid, namespace="default", uid=sid, tenant="", attempt=0,
            state=SANDBOX_READY, created_at=1))
    for cid, sid, st in (("c-run", "s1", RUNNING), ("c-made", "s2", CREATED)):
        core.pods.state.put_container(ContainerRecord(
            id=cid, sandbox_id=sid, name="vm", attempt=0, state=st, created_at=1, image="i",
            image_ref="sha256:x", vm_dir="/nonexistent", tty=True, stdin=True))


async def rpc(channel: grpc.aio.Channel, api: str, method: str, req: Any) -> Any:
    pb = api_modules()[api]
    out = getattr(pb, f"{method}Response")
    call = channel.unary_unary(f"/runtime.{api}.RuntimeService/{method}",
                               request_serializer=lambda m: m.SerializeToString(),
                               response_deserializer=out.FromString)
    return await call(req, timeout=10)


async def code_of(channel: grpc.aio.Channel, api: str, method: str,
                  req: Any) -> tuple[grpc.StatusCode, str]:
    try:
        await rpc(channel, api, method, req)
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    raise AssertionError(f"{method} succeeded")


@pytest.mark.parametrize("api", ["v1alpha2", "v1"])
def test_exec_attach_portforward_checks_and_urls(tmp_path: Path, api: str) -> None:
    pb = api_modules()[api]
    INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION

    async def test(core: Core, ch: grpc.aio.Channel, stub: StubServer | None) -> None:
        assert stub is not None
        records(core)
        # Exec
        r = await rpc(ch, api, "Exec", pb.ExecRequest(container_id="c-run", cmd=["uname", "-a"],
                                                       tty=True, stdin=True, stdout=True))
        assert r.url == "http://127.0.0.1:1/exec/TOKEN001"
        assert stub.calls[-1] == ("exec", "c-run", ["uname", "-a"], True, True, True, False)
        bad: list[tuple[Any, grpc.StatusCode, str]] = [
            (pb.ExecRequest(cmd=["true"], stdout=True), INVALID, "container_id"),
            (pb.ExecRequest(container_id="c-run", cmd=["true"], tty=True, stdout=True,
                            stderr=True), INVALID, "tty and stderr"),
            (pb.ExecRequest(container_id="c-run", cmd=["true"]), INVALID, "stdin, stdout"),
            (pb.ExecRequest(container_id="c-run", stdout=True), INVALID, "cmd"),
            (pb.ExecRequest(container_id="c-run", cmd=["a\0b"], stdout=True), INVALID, "NUL"),
            (pb.ExecRequest(container_id="nope", cmd=["true"], stdout=True), NOT_FOUND,
             "nope"),
            (pb.ExecRequest(container_id="c-made", cmd=["true"], stdout=True), PRECONDITION,
             "not running"),
        ]
        for req, code, words in bad:
            got, details = await code_of(ch, api, "Exec", req)
            assert (got, words in details) == (code, True), (req, got, details)
        # Attach
        r = await rpc(ch, api, "Attach", pb.AttachRequest(container_id="c-run", stdin=True,
                                                           stdout=True, tty=True))
        assert r.url == "http://127.0.0.1:1/attach/TOKEN002"
        assert stub.calls[-1] == ("attach", "c-run", True, True, True, False)
        bad = [
            (pb.AttachRequest(stdout=True), INVALID, "container_id"),
            (pb.AttachRequest(container_id="c-run", tty=True, stderr=True), INVALID,
             "tty and stderr"),
            (pb.AttachRequest(container_id="c-run"), INVALID, "stdin, stdout"),
            (pb.AttachRequest(container_id="nope", stdout=True), NOT_FOUND, "nope"),
            (pb.AttachRequest(container_id="c-made", stdout=True), PRECONDITION,
             "not running"),
        ]
        for req, code, words in bad:
            got, details = await code_of(ch, api, "Attach", req)
            assert (got, words in details) == (code, True), (req, got, details)
        # PortForward
        r = await rpc(ch, api, "PortForward", pb.PortForwardRequest(pod_sandbox_id="s1",
                                                                     port=[80, 7]))
        assert r.url == "http://127.0.0.1:1/portforward/TOKEN003"
        assert stub.calls[-1] == ("portforward", "s1", [80, 7])
        r = await rpc(ch, api, "PortForward", pb.PortForwardRequest(pod_sandbox_id="s1"))
        assert stub.calls[-1] == ("portforward", "s1", []), "ports may come with the streams"
        bad = [
            (pb.PortForwardRequest(port=[80]), INVALID, "pod_sandbox_id"),
            (pb.PortForwardRequest(pod_sandbox_id="s1", port=[0]), INVALID, "1-65535"),
            (pb.PortForwardRequest(pod_sandbox_id="s1", port=[65536]), INVALID, "1-65535"),
            (pb.PortForwardRequest(pod_sandbox_id="s1", port=[-5]), INVALID, "1-65535"),
            (pb.PortForwardRequest(pod_sandbox_id="nope", port=[80]), NOT_FOUND, "nope"),
        ]
        for req, code, words in bad:
            got, details = await code_of(ch, api, "PortForward", req)
            assert (got, words in details) == (code, True), (req, got, details)
        assert len(stub.calls) == 4, "no URL for a refused request"

    serve(tmp_path, test)


def test_without_a_streaming_server_the_rpcs_are_unavailable(tmp_path: Path) -> None:
    pb = api_modules()["v1"]

    async def test(core: Core, ch: grpc.aio.Channel, stub: StubServer | None) -> None:
        records(core)
        code, details = await code_of(ch, "v1", "Attach", pb.AttachRequest(
            container_id="c-run", stdout=True))
        assert code == grpc.StatusCode.UNAVAILABLE and "streaming server" in details

    serve(tmp_path, test, with_server=False)


def test_the_daemon_makes_the_server_on_the_configured_address() -> None:
    from arktos_vm_runtime.daemon import streaming

    settings = Settings(streaming_address="127.0.0.1", streaming_port=0)
    server = streaming.make_server(object(), settings)  # type: ignore[arg-type]
    server.start()
    try:
        assert server.base_url.startswith("http://127.0.0.1:")
        assert not server.base_url.endswith(":0/")
    finally:
        server.stop()


def test_streaming_settings_are_checked() -> None:
    from arktos_vm_runtime.config import build
    from arktos_vm_runtime.errors import InvalidArgument

    s = build(None, {})
    assert (s.streaming_address, s.streaming_port) == ("127.0.0.1", 0)
    assert build(None, {"streaming_port": 10010}).streaming_port == 10010
    for bad in ({"streaming_port": 70000}, {"streaming_port": -1},
                {"streaming_address": "localhost"}, {"streaming_address": "1.2.3"}):
        with pytest.raises(InvalidArgument, match="streaming"):
            build(None, bad)
