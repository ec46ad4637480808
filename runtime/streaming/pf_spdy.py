"""Port forward over SPDY (/work/shared/streaming.md section 6).

Per forwarded TCP connection the client opens an `error` and a `data` stream with the same
`requestid` and `port` headers; the pair becomes a `Forward` once both are there. Streams with
a bad type or port, or one more than MAX_PAIRS live pairs, are refused (RST); a pair still
incomplete after the stream-creation timeout gets `... timed out waiting for streams` on its
error stream. The port comes from the header, not the cached request.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass, field

from ..service.stream_io import StreamBackends
from . import spdy_frames as sf
from .pf_pump import Forward
from .spdy_conn import SpdyConnection, SpdyStream
from .tokens import PortForwardRequest

log = logging.getLogger(__name__)

MAX_PAIRS = 32


@dataclass
class Pair:
    request_id: str
    port: int
    deadline: float
    streams: dict[str, SpdyStream] = field(default_factory=dict)
    forward: Forward | None = None


class SpdyPortForward:
    """A SpdyHandler; `conn` is set by the caller before serving."""

    conn: SpdyConnection

    def __init__(self, backends: StreamBackends, request: PortForwardRequest,
                 stream_timeout: float) -> None:
        self.backends = backends
        self.request = request
        self.stream_timeout = stream_timeout
        self.pairs: dict[str, Pair] = {}
        self.by_stream: dict[int, Pair] = {}
        self._lock = threading.Lock()        # pairs end on their own threads
        self._forwards: list[Forward] = []

    def accept(self, stream: SpdyStream) -> bool:
        kind = stream.header("streamtype")
        port_text = stream.header("port") or ""
        if kind not in ("error", "data"):
            log.info("port forward: refusing a stream of type %r", (kind or "")[:40])
            return False
        if not (port_text.isdigit() and len(port_text) <= 5 and 1 <= int(port_text) <= 65535):
            log.info("port forward: refusing a stream for port %r", port_text[:40])
            return False
        rid = stream.header("requestid")
        if rid is None:
            rid = str(stream.id if kind == "error" else stream.id - 2)
        with self._lock:
            pair = self.pairs.get(rid)
            if pair is None:
                if len(self.pairs) >= MAX_PAIRS:
                    log.info("port forward: %d forwards live on one connection; refusing more",
                             MAX_PAIRS)
                    return False
                pair = Pair(rid, int(port_text), time.monotonic() + self.stream_timeout)
                self.pairs[rid] = pair
            if kind in pair.streams or pair.port != int(port_text):
                return False
            pair.streams[kind] = stream
            self.by_stream[stream.id] = pair
        return True

    def opened(self, stream: SpdyStream) -> None:
        pair = self.by_stream[stream.id]
        if len(pair.streams) == 2 and pair.forward is None:
            data, error = pair.streams["data"], pair.streams["error"]
            pair.forward = Forward(self.backends, self.request.sandbox_id, pair.port,
                                   send_data=data.write, send_error=error.write,
                                   done=functools.partial(self._forward_done, pair))
            with self._lock:
                self._forwards.append(pair.forward)
            pair.forward.start()

    def _forward_done(self, pair: Pair, _fwd: Forward, _connected: bool) -> None:
        self._pair_done(pair)

    def _pair_done(self, pair: Pair) -> None:
        for stream in pair.streams.values():
            stream.close()
        with self._lock:
            if pair.forward in self._forwards:
                self._forwards.remove(pair.forward)
            self.pairs.pop(pair.request_id, None)
            for s in pair.streams.values():
                self.by_stream.pop(s.id, None)

    def data(self, stream: SpdyStream, data: bytes) -> None:
        pair = self.by_stream.get(stream.id)
        if pair is not None and pair.forward is not None and stream.header("streamtype") == "data":
            pair.forward.feed(data, self.conn.gone)

    def half_closed(self, stream: SpdyStream) -> None:
        pair = self.by_stream.get(stream.id)
        if pair is None or stream.header("streamtype") != "data":
            return      # the client FINs its error stream at once: nothing to do
        if pair.forward is not None:
            if stream.reset_in:
                pair.forward.abort()
            else:
                pair.forward.client_eof()

    def tick(self, now: float) -> None:
        with self._lock:
            late = [p for p in self.pairs.values() if p.forward is None and now > p.deadline]
        for pair in late:
            log.info("port forward: request %s: timed out waiting for streams", pair.request_id)
            err = pair.streams.get("error")
            if err is not None:
                err.write(f"(conn={id(self.conn):#x}, request={pair.request_id}) timed out "
                          "waiting for streams".encode())
                err.close()
            data = pair.streams.get("data")
            if data is not None:
                data.reset(sf.RST_CANCEL)
            self._pair_done(pair)

    def ended(self) -> None:
        with self._lock:
            forwards = list(self._forwards)
        for fwd in forwards:
            fwd.abort()

    def join(self) -> None:
        with self._lock:
            forwards = list(self._forwards)
        for fwd in forwards:
            fwd.join()
