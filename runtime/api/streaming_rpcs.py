"""Exec, Attach and PortForward (both CRI versions): a mixin of RuntimeServicer.

Each RPC checks the request and the container or sandbox, then returns a URL of the
streaming server (runtime/streaming/server.py, set as `streaming` by the daemon) that
carries a single-use token for the request; the kubelet proxies the user's connection
there. The streams themselves are the server's and service/stream_backends.py's.
Checks (wire facts: /work/shared/streaming.md §1): a missing id (dispatch's REQUIRED),
tty with stderr, or none of stdin/stdout/stderr is INVALID_ARGUMENT; an unknown
container or sandbox NOT_FOUND; a container that is not running FAILED_PRECONDITION.
"""

from __future__ import annotations

from typing import Any, Protocol

from ..errors import InvalidArgument, Unavailable
from ..service.core import Core
from ..service.port_forward import check_port
from .dispatch import Call
from .pools import Kind, Pools

MAX_PORTS = 64  # ports in one PortForward request


class UrlIssuer(Protocol):
    """What the RPCs need of StreamingServer (the API fixed for issue 11)."""

    def exec_url(self, container_id: str, cmd: list[str], *, tty: bool, stdin: bool,
                 stdout: bool, stderr: bool) -> str: ...

    def attach_url(self, container_id: str, *, tty: bool, stdin: bool, stdout: bool,
                   stderr: bool) -> str: ...

    def port_forward_url(self, sandbox_id: str, ports: list[int]) -> str: ...


def check_streams(method: str, request: Any) -> None:
    if request.tty and request.stderr:
        raise InvalidArgument(f"{method}: fields tty and stderr cannot both be set (with a "
                              "tty, stderr shares stdout)")
    if not (request.stdin or request.stdout or request.stderr):
        raise InvalidArgument(f"{method}: one of the fields stdin, stdout and stderr must be "
                              "set")


class StreamingRpcs:
    core: Core
    pools: Pools
    #: the streaming server, set by the daemon once it runs (None: not running)
    streaming: UrlIssuer | None = None

    def _server(self) -> UrlIssuer:
        if self.streaming is None:
            raise Unavailable("the streaming server of arktos-vm-runtime is not running")
        return self.streaming

    async def Exec(self, request: Any, call: Call) -> Any:
        check_streams("Exec", request)
        cmd = list(request.cmd)
        await self.pools.run(Kind.QUICK, self.core.streams.exec_stream.check,
                             request.container_id, cmd)
        url = self._server().exec_url(request.container_id, cmd, tty=request.tty,
                                      stdin=request.stdin, stdout=request.stdout,
                                      stderr=request.stderr)
        return call.pb.ExecResponse(url=url)

    async def Attach(self, request: Any, call: Call) -> Any:
        check_streams("Attach", request)
        await self.pools.run(Kind.QUICK, self.core.streams.console.check,
                             request.container_id)
        url = self._server().attach_url(request.container_id, tty=request.tty,
                                        stdin=request.stdin, stdout=request.stdout,
                                        stderr=request.stderr)
        return call.pb.AttachResponse(url=url)

    async def PortForward(self, request: Any, call: Call) -> Any:
        ports = [int(p) for p in request.port]
        if len(ports) > MAX_PORTS:
            raise InvalidArgument(f"PortForward: at most {MAX_PORTS} ports, got {len(ports)}")
        for port in ports:
            check_port(port)
        await self.pools.run(Kind.QUICK, self.core.streams.ports.check,
                             request.pod_sandbox_id)
        url = self._server().port_forward_url(request.pod_sandbox_id, ports)
        return call.pb.PortForwardResponse(url=url)
