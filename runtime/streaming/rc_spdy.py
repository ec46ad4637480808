"""Remote command over SPDY (/work/shared/streaming.md section 4).

The client opens `error` first, then stdin, stdout, stderr and resize as its request asked,
each after the previous SYN_REPLY; every stream is replied to at once, and the command starts
once all expected ones are there (any order; unknown types are ignored). Short of them after
the stream-creation timeout, the session is abandoned. At the end: the status on `error`, FIN
on every stream, GOAWAY.
"""

from __future__ import annotations

import logging
import time

from ..service.stream_io import StreamBackends
from .remotecommand import Command, Outcome
from .spdy_conn import SpdyConnection, SpdyStream
from .tokens import AttachRequest, ExecRequest

log = logging.getLogger(__name__)

KNOWN = ("error", "stdin", "stdout", "stderr", "resize")


class SpdyRemoteCommand:
    """A SpdyHandler; `conn` is set by the caller before serving."""

    conn: SpdyConnection

    def __init__(self, backends: StreamBackends, request: ExecRequest | AttachRequest,
                 version: int, stream_timeout: float) -> None:
        self.cmd = Command(backends, request)
        self.version = version
        self.streams: dict[str, SpdyStream] = {}
        self.expected = {"error"}
        if request.stdin:
            self.expected.add("stdin")
        if request.stdout:
            self.expected.add("stdout")
        if request.stderr and not request.tty:
            self.expected.add("stderr")
        if request.tty and version >= 3:
            self.expected.add("resize")
        self.deadline = time.monotonic() + stream_timeout
        self.started = False

    def accept(self, stream: SpdyStream) -> bool:
        return True

    def opened(self, stream: SpdyStream) -> None:
        kind = stream.header("streamtype") or ""
        if kind not in KNOWN:
            log.info("remote command: ignoring a stream of type %r", kind[:40])
            return
        if kind in self.streams or self.started:
            return
        self.streams[kind] = stream
        if self.expected <= set(self.streams):
            self._start()

    def _start(self) -> None:
        self.started = True
        io = self.cmd.io
        if "stdout" in self.streams:
            io.stdout = self.cmd.writer(self.streams["stdout"].write)
        if "stderr" in self.streams:
            io.stderr = self.cmd.writer(self.streams["stderr"].write)
        self.cmd.start(self._done)

    def _done(self, outcome: Outcome) -> None:
        data = outcome.render(self.version)
        if data and not self.cmd.io.gone.is_set():
            self.streams["error"].write(data)
        self.conn.finish()

    def data(self, stream: SpdyStream, data: bytes) -> None:
        if stream is self.streams.get("stdin"):
            self.cmd.feed_stdin(data, self.conn.gone)
        elif stream is self.streams.get("resize"):
            self.cmd.resize(data)

    def half_closed(self, stream: SpdyStream) -> None:
        if stream is self.streams.get("stdin"):
            self.cmd.close_stdin()

    def tick(self, now: float) -> None:
        if not self.started and now > self.deadline:
            missing = sorted(self.expected - set(self.streams))
            log.info("remote command: client created no %s stream in time; abandoned",
                     "/".join(missing))
            self.started = True     # it never will now
            err = self.streams.get("error")
            if err is not None:
                err.write(b"timed out waiting for client to create streams: missing "
                          + ", ".join(missing).encode())
            self.conn.finish()

    def ended(self) -> None:
        self.cmd.end()

    def join(self) -> None:
        self.cmd.join()
