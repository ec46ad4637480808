"""The WebSocket client for the streaming tests: the channel protocols (binary and base64,
v5's CLOSE) on websockets' sans-I/O client over a plain socket, and the SPDY port-forward
tunnel inside WebSocket (crictl v1.36's --transport websocket)."""

from __future__ import annotations

import base64
import contextlib
import socket
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from websockets.client import ClientConnection
from websockets.connection import State
from websockets.datastructures import Headers
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from tests.spdy_client import TIMEOUT, SpdyClient


class _ClientConnection(ClientConnection):
    """websockets' client, taking the server's subprotocol as written: SPDY/3.1+portforward...
    is no RFC 7230 token, which the library's parser insists on (Go's clients do not)."""

    def process_subprotocol(self, headers: Headers) -> Subprotocol | None:
        values = headers.get_all("Sec-WebSocket-Protocol")
        if not values:
            return None
        if len(values) > 1 or values[0] not in (self.available_subprotocols or []):
            raise AssertionError(f"server chose subprotocol {values}")
        return Subprotocol(values[0])


class WsClient:
    """The channel protocols over websockets' sans-I/O client on a plain socket."""

    def __init__(self, url: str, subprotocols: list[str] | None,
                 on_raw: Callable[[bytes], None] | None = None) -> None:
        """on_raw: every binary message as it is (no channels; the SPDY tunnel)."""
        self.on_raw = on_raw
        u = urlsplit(url)
        self.sock = socket.create_connection((u.hostname or "", u.port or 80), timeout=TIMEOUT)
        self.proto = _ClientConnection(
            parse_uri("ws://" + u.netloc + u.path),
            subprotocols=[Subprotocol(p) for p in subprotocols] if subprotocols else None)
        self.base64 = False
        self.messages: list[tuple[int, bytes]] = []
        self.text_frames = 0
        self.binary_frames = 0
        self.close_code: int | None = None
        self.closed = threading.Event()
        self.response: Response | None = None
        self._cond = threading.Condition()
        self._lock = threading.Lock()
        request = self.proto.connect()
        if subprotocols:      # as Go clients write it (the library refuses '/' and '+')
            del request.headers["Sec-WebSocket-Protocol"]
            request.headers["Sec-WebSocket-Protocol"] = ", ".join(subprotocols)
        self.proto.send_request(request)
        self._flush()
        self._handshake()

    def _flush(self) -> None:
        for chunk in self.proto.data_to_send():
            if chunk:
                self.sock.sendall(chunk)

    def _handshake(self) -> None:
        while self.response is None:
            data = self.sock.recv(65536)
            if not data:
                raise AssertionError("websocket: closed during the handshake")
            self.proto.receive_data(data)
            for ev in self.proto.events_received():
                if isinstance(ev, Response):
                    self.response = ev
                else:
                    self._event(ev)
        self.subprotocol = self.response.headers.get("Sec-WebSocket-Protocol")
        self.base64 = bool(self.subprotocol and "base64" in self.subprotocol)
        if self.proto.state is State.OPEN:
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
        else:
            self.closed.set()

    @property
    def status(self) -> int:
        assert self.response is not None
        return self.response.status_code

    def _read(self) -> None:
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    with self._lock:
                        self.proto.receive_eof()
                    break
                with self._lock:
                    self.proto.receive_data(data)
                    events = self.proto.events_received()
                    self._flush()
                for ev in events:
                    self._event(ev)
        except OSError:
            pass
        finally:
            self.closed.set()
            with self._cond:
                self._cond.notify_all()

    def _event(self, ev: object) -> None:
        if not isinstance(ev, Frame):
            return
        if ev.opcode == Opcode.CLOSE:
            self.close_code = int.from_bytes(ev.data[:2], "big") if len(ev.data) >= 2 else 1005
            return
        if ev.opcode not in (Opcode.TEXT, Opcode.BINARY):
            return
        data = bytes(ev.data)
        if self.on_raw is not None:
            self.on_raw(data)
            return
        if ev.opcode == Opcode.TEXT:
            self.text_frames += 1
            ch, payload = data[0] - 48, base64.b64decode(data[1:])
        else:
            self.binary_frames += 1
            ch, payload = data[0], data[1:]
        with self._cond:
            self.messages.append((ch, payload))
            self._cond.notify_all()

    def send(self, channel: int, data: bytes) -> None:
        with self._lock:
            if self.base64:
                self.proto.send_text(bytes([48 + channel]) + base64.b64encode(data))
            else:
                self.proto.send_binary(bytes([channel]) + data)
            self._flush()

    def send_raw(self, message: bytes) -> None:
        with self._lock:
            self.proto.send_binary(message)
            self._flush()

    def channel(self, ch: int) -> bytes:
        with self._cond:
            return b"".join(d for c, d in self.messages if c == ch)

    def wait_for(self, ch: int, want: bytes, timeout: float = TIMEOUT) -> bytes:
        with self._cond:
            self._cond.wait_for(lambda: want in self.channel_unlocked(ch) or self.closed.is_set(),
                                timeout)
            return self.channel_unlocked(ch)

    def wait_count(self, ch: int, n: int, timeout: float = TIMEOUT) -> int:
        """Waits until `n` bytes have come on channel `ch` (or the connection closed)."""
        def count() -> int:
            return sum(len(d) for c, d in self.messages if c == ch)
        with self._cond:
            self._cond.wait_for(lambda: count() >= n or self.closed.is_set(), timeout)
            return count()

    def channel_unlocked(self, ch: int) -> bytes:
        return b"".join(d for c, d in self.messages if c == ch)

    def wait_closed(self, timeout: float = TIMEOUT) -> bool:
        return self.closed.wait(timeout)

    def close(self) -> None:
        with contextlib.suppress(Exception), self._lock:
            self.proto.send_close(1000)
            self._flush()
        deadline = time.monotonic() + 2
        while not self.closed.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def drop(self) -> None:
        """Vanish: the socket closes with no WebSocket close."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def tunnel_client(url: str) -> tuple[WsClient, SpdyClient]:
    """Port forward as crictl v1.36 `--transport websocket`: SPDY inside binary WebSocket
    messages (subprotocol SPDY/3.1+portforward.k8s.io), bridged through a socket pair."""
    mine, bridge = socket.socketpair()
    ws = WsClient(url, ["SPDY/3.1+portforward.k8s.io"], on_raw=bridge.sendall)
    if ws.status != 101:
        bridge.close()
        mine.close()
        raise AssertionError(f"tunnel upgrade: {ws.status}")

    def pump() -> None:
        while True:
            try:
                data = bridge.recv(65536)
            except OSError:
                break
            if not data:
                break
            try:
                ws.send_raw(data)
            except Exception:
                break
        bridge.close()

    threading.Thread(target=pump, daemon=True).start()
    return ws, SpdyClient(mine, "portforward.k8s.io")
