"""What the streaming server (Exec, Attach, PortForward) and the service layer hand each other.

The streaming server (arktos_vm_runtime.streaming) speaks the wire protocols (SPDY/3.1 and
WebSocket; remote command v1-v5, port forward) and turns one upgraded connection into a
`StreamIO` (for exec and attach) or into one TCP socket per forwarded stream. The service
layer behind `StreamBackends` does the VM's side: the guest agent, the serial console, a TCP
connection inside the pod's network namespace. Neither knows the other's details: the
server is tested with a fake `StreamBackends`, the backends without any HTTP.

Threads: every backend call blocks and runs on a thread of the streaming server's own
bounded pool, never on a gRPC worker.
"""

from __future__ import annotations

import collections
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

MAX_PENDING_INPUT = 1024 * 1024  # bytes of stdin buffered before `feed` blocks the reader


class InputPipe:
    """Bytes from the client's stdin to the backend: the server feeds, the backend reads.
    Bounded: `feed` waits while MAX_PENDING_INPUT bytes are unread (so a client that types
    faster than the guest reads slows down instead of filling the daemon's memory)."""

    def __init__(self, limit: int = MAX_PENDING_INPUT) -> None:
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._limit = limit
        self._closed = False
        self._cond = threading.Condition()

    def feed(self, data: bytes, timeout: float | None = None) -> bool:
        """Adds `data`; False if the pipe was closed or stayed full for `timeout` s."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._closed or self._size < self._limit,
                                       timeout):
                return False
            if self._closed:
                return False
            if data:
                self._chunks.append(data)
                self._size += len(data)
                self._cond.notify_all()
            return True

    def close(self) -> None:
        """End of input (the client half-closed stdin, or went away)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def read(self, timeout: float | None = None) -> bytes | None:
        """The next bytes; b"" once closed and drained; None if nothing came in `timeout`."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._chunks or self._closed, timeout):
                return None
            if not self._chunks:
                return b""
            data = self._chunks.popleft()
            self._size -= len(data)
            self._cond.notify_all()
            return data


Writer = Callable[[bytes], None]


@dataclass
class StreamIO:
    """One exec or attach session as the backend sees it.

    stdin:  None unless the request asked for stdin.
    stdout, stderr: None unless asked for (stderr is None with a tty: it shares stdout).
        A writer may block while the client is slow (bounded buffers), and returns at once,
        dropping the data, once `gone` is set.
    resizes: terminal sizes (width, height), the initial one first, when tty was asked for;
        the backend registers a callback with `on_resize`.
    gone: set when the client went away or the session ends; the backend must then return
        promptly and release what it holds (agent process, console reader).
    """

    stdin: InputPipe | None
    stdout: Writer | None
    stderr: Writer | None
    tty: bool
    gone: threading.Event = field(default_factory=threading.Event)
    _resize_cb: Callable[[int, int], None] | None = None

    def on_resize(self, cb: Callable[[int, int], None]) -> None:
        self._resize_cb = cb

    def resize(self, width: int, height: int) -> None:
        cb = self._resize_cb
        if cb is not None:
            cb(width, height)


class StreamBackends(Protocol):
    """The VM's side of the three streaming operations. Errors are the runtime's own
    (errors.NotFound, FailedPrecondition, Unavailable, ...): the server puts their message
    on the error channel (remote command) or error stream (port forward)."""

    def exec(self, container_id: str, cmd: list[str], io: StreamIO) -> int:
        """Runs `cmd` in the guest; returns its exit code once it ended and its output was
        written. Ends the guest process if `io.gone` is set first."""
        ...

    def attach(self, container_id: str, io: StreamIO) -> None:
        """Joins the VM's serial console: console output to io.stdout (every attacher gets
        all of it; the log file keeps receiving everything), io.stdin to the console.
        Returns when io.gone is set or the VM stops; leaves the VM running."""
        ...

    def port_connect(self, sandbox_id: str, port: int, timeout: float) -> socket.socket:
        """A connected TCP socket to `port` of the pod's VM, from inside the pod's network
        namespace (blocking mode). Raises with a message saying why it could not."""
        ...
