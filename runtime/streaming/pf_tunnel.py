"""Port forward over SPDY tunnelled in WebSocket: subprotocol `SPDY/3.1+portforward.k8s.io`
(crictl v1.36 `--transport websocket`; /work/shared/streaming.md section 7).

The client's binary messages concatenate to a SPDY/3.1 byte stream (no inner HTTP; message
and frame bounds differ), and ours carry the server's. A socket pair joins the two: the
WebSocket connection's thread writes the client's bytes into one end, the unchanged SPDY
port-forward session (spdy_conn + pf_spdy) serves the other end on its own thread, and a pump
thread sends what it writes back as binary messages. Whichever side ends, both end.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable

from .pf_spdy import SpdyPortForward
from .spdy_conn import SpdyConnection
from .ws_conn import ServerProtocol, WsConnection

JOIN_GRACE = 15.0


class TunnelBridge:
    """A WsHandler: client messages into the bridge socket."""

    conn: WsConnection

    def __init__(self, bridge: socket.socket) -> None:
        self.bridge = bridge

    def message(self, channel: int, data: bytes) -> None:
        try:
            self.bridge.sendall(data)       # blocks while the SPDY side is behind
        except OSError:
            self.conn.finish(1011)

    def channel_closed(self, channel: int) -> None:
        pass

    def tick(self, now: float) -> None:
        pass

    def ended(self) -> None:
        with contextlib.suppress(OSError):
            self.bridge.shutdown(socket.SHUT_RDWR)

    def join(self) -> None:
        pass


def serve_tunnel(sock: socket.socket, proto: ServerProtocol, rest: bytes,
                 inner: SpdyPortForward, idle_timeout: float,
                 register: Callable[[WsConnection], None]) -> None:
    """Runs the tunnel on the calling thread (the WebSocket side) until both sides ended;
    `register` gets the WebSocket connection (for the server's stop)."""
    outer, spdy_end = socket.socketpair()
    bridge = TunnelBridge(outer)
    ws = WsConnection(sock, proto, bridge, base64_channels=False,
                      idle_timeout=idle_timeout, initial=rest, channels=False)
    bridge.conn = ws
    register(ws)
    spdy = SpdyConnection(spdy_end, inner, idle_timeout=idle_timeout)
    inner.conn = spdy

    def pump() -> None:
        while True:
            try:
                data = outer.recv(65536)
            except OSError:
                data = b""
            if not data or not ws.send(-1, data):
                break
        ws.finish(1000)

    spdy_thread = threading.Thread(target=spdy.serve, name="stream-tunnel-spdy", daemon=True)
    pump_thread = threading.Thread(target=pump, name="stream-tunnel-pump", daemon=True)
    spdy_thread.start()
    pump_thread.start()
    try:
        ws.serve()
    finally:
        spdy.abort()
        with contextlib.suppress(OSError):
            outer.shutdown(socket.SHUT_RDWR)
        spdy_thread.join(JOIN_GRACE)
        pump_thread.join(JOIN_GRACE)
        inner.join()
        outer.close()
        spdy_end.close()
