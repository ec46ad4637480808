"""PortForward's connection: TCP to a port of the pod's VM, made inside the pod's network
namespace, to the VM's primary address (the pod IP of the network records: the first IPv4
of the primary NIC, else its IPv6). The streaming server asks for one connection per
forwarded stream; each is independent."""

from __future__ import annotations

import socket
from collections.abc import Callable

from ..adapters import pod_socket
from ..checks import shown
from ..errors import FailedPrecondition, InvalidArgument, NotFound
from .podstate import PodState
from .records import RUNNING, SANDBOX_READY


def check_port(port: int) -> None:
    if not 1 <= port <= 65535:
        raise InvalidArgument(f"port {port} is not a TCP port (1-65535)")


class PortForward:
    def __init__(self, state: PodState,
                 endpoint: Callable[[str], tuple[str, str] | None],
                 connect: Callable[[str, str, int, float], socket.socket] = pod_socket.connect
                 ) -> None:
        self._state = state
        self._endpoint = endpoint
        self._connect = connect

    def check(self, sandbox_id: str) -> None:
        """The RPC's check: NotFound unless the sandbox exists."""
        if self._state.sandbox(sandbox_id) is None:
            raise NotFound(f"pod sandbox {shown(sandbox_id)} not found")

    def port_connect(self, sandbox_id: str, port: int, timeout: float) -> socket.socket:
        check_port(port)
        sb = self._state.sandbox(sandbox_id)
        if sb is None:
            raise NotFound(f"pod sandbox {shown(sandbox_id)} not found")
        if sb.state != SANDBOX_READY:
            raise FailedPrecondition(f"pod sandbox {sandbox_id} is not ready: its network "
                                     "is gone")
        if not any(c.state == RUNNING for c in self._state.containers_of(sandbox_id)):
            raise FailedPrecondition(f"the VM of pod sandbox {sandbox_id} is not running")
        where = self._endpoint(sandbox_id)
        if where is None or not where[1]:
            raise FailedPrecondition(f"pod sandbox {sandbox_id} has no network address to "
                                     "forward to")
        netns_name, address = where
        return self._connect(netns_name, address, port, timeout)
