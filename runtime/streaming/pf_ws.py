"""Port forward over WebSocket (/work/shared/streaming.md section 7).

The ports are the cached request's list; port i uses channel 2i for data and 2i+1 for errors.
The server first writes each port as 2 bytes little-endian on its data then its error channel,
then forwards one TCP connection per port; client data carries no prefix. The socket closes
(1000) once every port's connection ended.
"""

from __future__ import annotations

import functools
import threading

from ..service.stream_io import StreamBackends
from .pf_pump import Forward
from .tokens import PortForwardRequest
from .ws_conn import WsConnection

MAX_WS_PORTS = 64   # channels 0..127: within one byte, and '0'+channel for base64


class WsPortForward:
    """A WsHandler; `conn` is set by the caller, then `begin` once the 101 went out."""

    conn: WsConnection

    def __init__(self, backends: StreamBackends, request: PortForwardRequest) -> None:
        self.backends = backends
        self.request = request
        self.forwards: list[Forward] = []
        self._lock = threading.Lock()
        self._live = 0

    def begin(self) -> None:
        for i, port in enumerate(self.request.ports):
            prefix = port.to_bytes(2, "little")
            self.conn.send(2 * i, prefix)
            self.conn.send(2 * i + 1, prefix)
        with self._lock:
            for i, port in enumerate(self.request.ports):
                self.forwards.append(Forward(
                    self.backends, self.request.sandbox_id, port,
                    send_data=functools.partial(self.conn.send, 2 * i),
                    send_error=functools.partial(self.conn.send, 2 * i + 1),
                    done=self._done))
            self._live = len(self.forwards)
        for fwd in self.forwards:
            fwd.start()

    def _done(self, _fwd: Forward, _connected: bool) -> None:
        with self._lock:
            self._live -= 1
            last = self._live == 0
        if last:
            self.conn.finish(1000)

    def message(self, channel: int, data: bytes) -> None:
        if channel % 2 == 0 and channel // 2 < len(self.forwards):
            self.forwards[channel // 2].feed(data, self.conn.gone)

    def channel_closed(self, channel: int) -> None:
        pass

    def tick(self, now: float) -> None:
        pass

    def ended(self) -> None:
        for fwd in self.forwards:
            fwd.abort()

    def join(self) -> None:
        for fwd in self.forwards:
            fwd.join()
