"""The VM's side of Exec, Attach and PortForward as one `StreamBackends` for the streaming
server: the guest agent (guest_exec_stream), the serial console (console_attach) and a TCP
connection inside the pod's network namespace (port_forward)."""

from __future__ import annotations

import socket

from .console_attach import ConsoleAttach
from .guest_exec_stream import GuestExecStream
from .port_forward import PortForward
from .stream_io import StreamBackends, StreamIO


class VmStreams(StreamBackends):
    def __init__(self, exec_: GuestExecStream, attach: ConsoleAttach,
                 ports: PortForward) -> None:
        self.exec_stream = exec_
        self.console = attach
        self.ports = ports

    def exec(self, container_id: str, cmd: list[str], io: StreamIO) -> int:
        return self.exec_stream.exec(container_id, cmd, io)

    def attach(self, container_id: str, io: StreamIO) -> None:
        self.console.attach(container_id, io)

    def port_connect(self, sandbox_id: str, port: int, timeout: float) -> socket.socket:
        return self.ports.port_connect(sandbox_id, port, timeout)
