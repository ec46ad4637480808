"""One WebSocket connection of the channel protocols, server side, on a blocking socket.

The `websockets` library does the WebSocket part in its sans-I/O form (handshake checks,
frames, masking, PING -> PONG, the close handshake); this module moves its bytes and turns
messages into channel events: binary `[channel] + data`, or with a base64 subprotocol text
`'0'+channel` + base64 (/work/shared/streaming.md section 5). v5's `[0xFF, channel]` half-closes
a channel. Runs on the connection's own thread like spdy_conn; any thread may send.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import http
import logging
import select
import socket
import threading
import time
from typing import Protocol

from websockets.connection import State
from websockets.datastructures import Headers
from websockets.exceptions import InvalidState
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.server import ServerConnection
from websockets.typing import Subprotocol

from .http_head import RequestHead

log = logging.getLogger(__name__)

MAX_MESSAGE = 1024 * 1024
POLL = 0.5
LINGER = 2.0
CLOSE_CHANNEL = 0xFF


class WsHandler(Protocol):
    def message(self, channel: int, data: bytes) -> None: ...

    def channel_closed(self, channel: int) -> None:
        """v5: the client half-closed `channel`."""
        ...

    def tick(self, now: float) -> None: ...

    def ended(self) -> None: ...


class ServerProtocol(ServerConnection):
    """websockets' sans-I/O server (10.4, Debian 12's version) with the subprotocol that
    negotiate.py chose: first client offer the server speaks, or none."""

    def __init__(self, subprotocol: str) -> None:
        super().__init__(max_size=MAX_MESSAGE)
        self.chosen = Subprotocol(subprotocol) if subprotocol else None

    def process_subprotocol(self, headers: Headers) -> Subprotocol | None:
        return self.chosen


def handshake(head: RequestHead, subprotocol: str) -> tuple[ServerProtocol, bytes, bool]:
    """The protocol object, the response bytes, and whether it is a 101. The library parses
    the head itself (its checks: method, Upgrade, Connection, key, version)."""
    proto = ServerProtocol(subprotocol)
    proto.receive_data(head.raw)
    requests = [e for e in proto.events_received() if isinstance(e, Request)]
    if requests:
        resp = proto.accept(requests[0])
    else:
        resp = proto.reject(http.HTTPStatus.BAD_REQUEST, "malformed WebSocket handshake\n")
    ok = resp.status_code == 101
    if not ok:
        resp.headers["Connection"] = "close"
    proto.send_response(resp)
    return proto, b"".join(proto.data_to_send()), ok


class WsConnection:
    def __init__(self, sock: socket.socket, proto: ServerProtocol, handler: WsHandler, *,
                 base64_channels: bool, idle_timeout: float, initial: bytes = b"",
                 channels: bool = True) -> None:
        self.sock = sock
        self.proto = proto
        self.handler = handler
        self.base64 = base64_channels
        self.channels = channels     # False: whole binary messages (the SPDY tunnel)
        self.idle_timeout = idle_timeout
        self.gone = threading.Event()
        self._initial = initial
        self._proto_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._activity = time.monotonic()
        self._finish_by: float | None = None
        self._parts: list[bytes] = []
        self._parts_size = 0

    # -- writing (any thread) ---------------------------------------------------------------
    def send(self, channel: int, data: bytes) -> bool:
        """One message on `channel` (channel -1: `data` as it is, one binary message)."""
        with self._proto_lock:
            if self.gone.is_set() or self.proto.state is not State.OPEN:
                return False
            try:
                if channel < 0:
                    self.proto.send_binary(data)
                elif self.base64:
                    self.proto.send_text(bytes([48 + channel]) + base64.b64encode(data))
                else:
                    self.proto.send_binary(bytes([channel]) + data)
            except InvalidState:
                return False
            out = self.proto.data_to_send()
        return self._flush(out)

    def _flush(self, out: list[bytes]) -> bool:
        if not out:
            return True
        with self._send_lock:
            try:
                for chunk in out:
                    if chunk:
                        self.sock.sendall(chunk)
                    else:       # the library's end-of-stream: close handshake done
                        self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self.gone.set()
                return False
        self._activity = time.monotonic()
        return True

    def finish(self, code: int = 1000) -> None:
        """Close with `code`; `serve` waits up to LINGER s for the client's close."""
        with self._proto_lock:
            if self._finish_by is not None or self.gone.is_set():
                return
            self._finish_by = time.monotonic() + LINGER
            with contextlib.suppress(InvalidState):
                self.proto.send_close(code)
            out = self.proto.data_to_send()
        self._flush(out)
        self.gone.set()

    def abort(self) -> None:
        self.gone.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    # -- reading (the connection's thread) ----------------------------------------------------
    def serve(self) -> None:
        try:
            self._loop()
        except (OSError, EOFError) as e:
            log.debug("websocket: connection error: %s", e)
        finally:
            self.gone.set()
            with contextlib.suppress(OSError):      # wakes writers blocked on a stuck client
                self.sock.shutdown(socket.SHUT_RDWR)
            self.handler.ended()

    def _loop(self) -> None:
        self.sock.settimeout(None)
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        data = self._initial
        while True:
            if data:
                self._activity = time.monotonic()
                with self._proto_lock:
                    self.proto.receive_data(data)
                    events = self.proto.events_received()
                    out = self.proto.data_to_send()
                self._flush(out)
                for event in events:
                    if isinstance(event, Frame):
                        self._frame(event)
                closing = self.proto.state is State.CLOSED or self.proto.close_expected()
                if closing and self._finish_by is None:
                    self._finish_by = time.monotonic() + LINGER
                    self.gone.set()
            now = time.monotonic()
            if self._finish_by is not None and (now > self._finish_by
                                                or self.proto.state is State.CLOSED):
                return
            if self._finish_by is None and self.gone.is_set():
                return
            if now - self._activity > self.idle_timeout:
                log.info("websocket: closing a connection idle for %.0f s", self.idle_timeout)
                return
            self.handler.tick(now)
            data = b""
            if poller.poll(POLL * 1000):
                data = self.sock.recv(65536)
                if not data:
                    with self._proto_lock:
                        self.proto.receive_eof()
                    return

    def _frame(self, frame: Frame) -> None:
        if frame.opcode not in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
            return      # PING/PONG/CLOSE: the protocol object answered
        self._parts.append(bytes(frame.data))
        self._parts_size += len(frame.data)
        if self._parts_size > MAX_MESSAGE:
            self.finish(1009)
            return
        if not frame.fin:
            return
        message = b"".join(self._parts)
        self._parts, self._parts_size = [], 0
        if self._finish_by is not None or not message:
            return
        if not self.channels:
            self.handler.message(-1, message)
        elif self.base64:
            if message[0] < 48:
                return
            try:
                payload = base64.b64decode(message[1:], validate=True)
            except (binascii.Error, ValueError):
                log.info("websocket: a base64 message that does not decode, dropped")
                return
            self.handler.message(message[0] - 48, payload)
        elif message[0] == CLOSE_CHANNEL:
            if len(message) >= 2:
                self.handler.channel_closed(message[1])
        else:
            self.handler.message(message[0], message[1:])
