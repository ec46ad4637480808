"""One upgraded SPDY/3.1 connection, server side, on a blocking socket.

The connection's own thread runs `serve`: reads frames, replies to each SYN_STREAM at once
(SYN_REPLY, or RST CANCEL when the handler refuses it), answers the client's PINGs, ends on
GOAWAY, EOF, a framing error, the idle timeout or `finish`/`abort`, and hands streams and their
data to a `SpdyHandler`. Any thread may write: one lock keeps frames whole and the header
compressor in wire order. Flow control is not enforced (spdystream never sends WINDOW_UPDATE).
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time
from typing import Protocol

from . import spdy_frames as sf

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
POLL = 0.5            # s between deadline checks while nothing arrives
LINGER = 2.0          # s to wait for the client's close after our GOAWAY
MAX_STREAMS = 256     # open streams per connection (port forward: 2 per TCP connection)


class SpdyStream:
    def __init__(self, conn: SpdyConnection, stream_id: int, headers: sf.Headers) -> None:
        self.conn = conn
        self.id = stream_id
        self.headers = headers
        self.fin_in = False      # the client half-closed it (or reset it)
        self.fin_out = False     # we half-closed it (or reset it)
        self.reset_in = False    # the client reset it

    def header(self, name: str) -> str | None:
        values = self.headers.get(name)
        return values[0] if values else None

    def write(self, data: bytes) -> bool:
        """Sends `data`; False once the stream or the connection is closed."""
        for pos in range(0, len(data), CHUNK):
            if not self.conn.send(sf.DataFrame(self.id, data[pos:pos + CHUNK]), self):
                return False
        return True

    def close(self) -> None:
        """Half-closes our side (empty DATA with FIN), once."""
        self.conn.send(sf.DataFrame(self.id, b"", fin=True), self, closing=True)

    def reset(self, status: int = sf.RST_CANCEL) -> None:
        self.conn.send(sf.RstStream(self.id, status), self, closing=True)


class SpdyHandler(Protocol):
    """What a protocol (remote command, port forward) does with the connection's events;
    all called on the connection's thread, in wire order."""

    def accept(self, stream: SpdyStream) -> bool:
        """False: the stream is refused with RST_STREAM."""
        ...

    def opened(self, stream: SpdyStream) -> None:
        """After its SYN_REPLY went out."""
        ...

    def data(self, stream: SpdyStream, data: bytes) -> None: ...

    def half_closed(self, stream: SpdyStream) -> None:
        """The client FINed or reset the stream."""
        ...

    def tick(self, now: float) -> None:
        """Now and then (every POLL s at least): time for the handler's deadlines."""
        ...

    def ended(self) -> None:
        """The connection is over (any reason); called once, last."""
        ...


class SpdyConnection:
    def __init__(self, sock: socket.socket, handler: SpdyHandler, *, idle_timeout: float,
                 initial: bytes = b"") -> None:
        self.sock = sock
        self.handler = handler
        self.idle_timeout = idle_timeout
        self.gone = threading.Event()    # the connection is over or going
        self._initial = initial
        self._parser = sf.FrameParser()
        self._comp = sf.HeaderCompressor()
        self._send_lock = threading.Lock()
        self._streams_lock = threading.Lock()
        self._streams: dict[int, SpdyStream] = {}
        self._last_in = 0
        self._activity = time.monotonic()
        self._finish_by: float | None = None

    # -- writing (any thread) -------------------------------------------------------------
    def send(self, frame: sf.Frame, stream: SpdyStream | None = None,
             closing: bool = False) -> bool:
        with self._send_lock:
            if self.gone.is_set() and self._finish_by is None:
                return False
            if stream is not None:
                if stream.fin_out:
                    return False
                if closing:
                    stream.fin_out = True
            try:
                self.sock.sendall(sf.encode_frame(frame, self._comp))
            except OSError:
                self.gone.set()
                return False
            self._activity = time.monotonic()
            return True

    def finish(self) -> None:
        """Ends the session politely: FIN on every stream still open on our side (newest
        first, so remote command's error stream closes after stdout and stderr), GOAWAY,
        then `serve` waits up to LINGER s for the client to close (so nothing is reset)."""
        with self._send_lock:
            if self._finish_by is not None or self.gone.is_set():
                return      # finishing already, or the connection is over
            self._finish_by = time.monotonic() + LINGER
            self.gone.set()
        with self._streams_lock:
            open_streams = list(self._streams.values())
        for stream in reversed(open_streams):     # the first opened (error) last
            stream.close()
        self.send(sf.GoAway(self._last_in, sf.GOAWAY_OK))
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def abort(self) -> None:
        """Ends it now (server stop, a vanished client): `serve` returns promptly."""
        self.gone.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    # -- reading (the connection's thread) --------------------------------------------------
    def serve(self) -> None:
        try:
            self._loop()
        except sf.FrameError as e:
            log.info("spdy: closing a connection: %s", e)
            self.send(sf.GoAway(self._last_in, sf.GOAWAY_PROTOCOL_ERROR))
        except OSError as e:
            log.debug("spdy: connection error: %s", e)
        finally:
            self.gone.set()
            with contextlib.suppress(OSError):      # wakes writers blocked on a stuck client
                self.sock.shutdown(socket.SHUT_RDWR)
            try:
                self.handler.ended()
            finally:
                with self._streams_lock:
                    for s in self._streams.values():
                        s.fin_in = s.fin_out = True

    def _loop(self) -> None:
        self.sock.setblocking(True)
        self.sock.settimeout(None)
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        data = self._initial
        while True:
            if data:
                self._activity = time.monotonic()
                for frame in self._parser.feed(data):
                    if not self._dispatch(frame):
                        return
            now = time.monotonic()
            if self._finish_by is not None and now > self._finish_by:
                return
            if self._finish_by is None and self.gone.is_set():
                return
            if now - self._activity > self.idle_timeout:
                log.info("spdy: closing a connection idle for %.0f s", self.idle_timeout)
                return
            self.handler.tick(now)
            data = b""
            if poller.poll(POLL * 1000):
                data = self.sock.recv(CHUNK)
                if not data:
                    return

    def _dispatch(self, frame: sf.Frame) -> bool:
        """False: the connection ends."""
        if isinstance(frame, sf.DataFrame):
            stream = self._streams.get(frame.stream_id)
            if stream is None or stream.fin_in:
                return True      # not ours or already closed by the client: dropped
            if frame.data and self._finish_by is None:
                self.handler.data(stream, frame.data)
            if frame.fin:
                self._half_close(stream)
        elif isinstance(frame, sf.SynStream):
            self._open(frame)
        elif isinstance(frame, sf.RstStream):
            stream = self._streams.get(frame.stream_id)
            if stream is not None:
                stream.fin_out = stream.reset_in = True
                self._half_close(stream)
        elif isinstance(frame, sf.Ping):
            if frame.ping_id % 2 == 1:      # the client's own (ours would be even)
                self.send(frame)
        elif isinstance(frame, sf.GoAway):
            return False
        elif isinstance(frame, sf.HeadersFrame):
            stream = self._streams.get(frame.stream_id)
            if stream is not None and frame.flags & sf.FLAG_FIN:
                self._half_close(stream)
        # SETTINGS, WINDOW_UPDATE, SYN_REPLY (we open no streams): nothing to do
        return True

    def _open(self, frame: sf.SynStream) -> None:
        if frame.stream_id % 2 == 0 or frame.stream_id <= self._last_in:
            raise sf.FrameError(f"client stream id {frame.stream_id} not odd and increasing")
        self._last_in = frame.stream_id
        stream = SpdyStream(self, frame.stream_id, frame.headers)
        with self._streams_lock:
            full = len(self._streams) >= MAX_STREAMS
        if full:
            log.info("spdy: %d streams open on one connection; refusing more", MAX_STREAMS)
            stream.reset(sf.RST_REFUSED_STREAM)
            return
        if self._finish_by is not None or not self.handler.accept(stream):
            stream.reset()
            return
        with self._streams_lock:
            self._streams[stream.id] = stream
        self.send(sf.SynReply(stream.id, {}))
        self.handler.opened(stream)
        if frame.flags & sf.FLAG_FIN:
            self._half_close(stream)

    def _half_close(self, stream: SpdyStream) -> None:
        if not stream.fin_in:
            stream.fin_in = True
            self.handler.half_closed(stream)
        if stream.fin_out:
            with self._streams_lock:
                self._streams.pop(stream.id, None)
