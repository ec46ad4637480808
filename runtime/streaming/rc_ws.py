"""Remote command over WebSocket (/work/shared/streaming.md section 5).

Channels 0 stdin, 1 stdout, 2 stderr, 3 error, 4 resize; unrequested ones are discarded. An
empty message first on the first writable of stdout, stderr, error; at the end the status on
3 (JSON for v4 and v5, plain text on failure for the unversioned names) and Close 1000. v5:
`[0xFF, 0]` from the client is the end of stdin.
"""

from __future__ import annotations

from ..service.stream_io import StreamBackends
from .remotecommand import Command, Outcome
from .tokens import AttachRequest, ExecRequest
from .ws_conn import WsConnection

STDIN, STDOUT, STDERR, ERROR, RESIZE = range(5)


class WsRemoteCommand:
    """A WsHandler; `conn` is set by the caller, then `begin` once the 101 went out."""

    conn: WsConnection

    def __init__(self, backends: StreamBackends, request: ExecRequest | AttachRequest,
                 version: int) -> None:
        self.cmd = Command(backends, request)
        self.version = version

    def begin(self) -> None:
        req = self.cmd.request
        first = STDOUT if req.stdout else STDERR if (req.stderr and not req.tty) else ERROR
        self.conn.send(first, b"")
        io = self.cmd.io
        if req.stdout:
            io.stdout = self.cmd.writer(lambda d: self.conn.send(STDOUT, d))
        if req.stderr and not req.tty:
            io.stderr = self.cmd.writer(lambda d: self.conn.send(STDERR, d))
        self.cmd.start(self._done)

    def _done(self, outcome: Outcome) -> None:
        data = outcome.render(self.version)
        if data and not self.cmd.io.gone.is_set():
            self.conn.send(ERROR, data)
        self.conn.finish(1000)

    def message(self, channel: int, data: bytes) -> None:
        if channel == STDIN:
            self.cmd.feed_stdin(data, self.conn.gone)
        elif channel == RESIZE:
            self.cmd.resize(data)

    def channel_closed(self, channel: int) -> None:
        if self.version >= 5 and channel == STDIN:
            self.cmd.close_stdin()

    def tick(self, now: float) -> None:
        pass

    def ended(self) -> None:
        self.cmd.end()

    def join(self) -> None:
        self.cmd.join()
