"""One forwarded TCP connection: the backend's socket pumped both ways (port forward over
SPDY and over WebSocket).

Two threads: `down` connects through the backend and copies guest -> client; `up` copies
client -> guest from a bounded pipe that the session's connection thread feeds. The client's
end of input half-closes the guest socket (the guest may still answer); the guest's EOF, an
error, or `abort` ends the forward. A connect failure goes to the error writer as
`error forwarding port <p> to pod <sandbox-id>, uid : <why>`.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable

from ..errors import RuntimeError_
from ..service.stream_io import InputPipe, StreamBackends

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
READ_SIZE = 64 * 1024
PIPE_LIMIT = 256 * 1024
JOIN_GRACE = 15.0
FEED_POLL = 0.25

Send = Callable[[bytes], bool]


class Forward:
    def __init__(self, backends: StreamBackends, sandbox_id: str, port: int, *,
                 send_data: Send, send_error: Send, done: Callable[[Forward, bool], None]) -> None:
        self.backends = backends
        self.sandbox_id = sandbox_id
        self.port = port
        self.send_data = send_data
        self.send_error = send_error
        self.done = done            # (self, connected) once the forward is over, on `down`
        self.pipe = InputPipe(PIPE_LIMIT)
        self.sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._aborted = False
        self._ended = False
        self._input_closed = False
        self._down = threading.Thread(target=self._run_down, name=f"pf-down-{port}",
                                      daemon=True)
        self._up: threading.Thread | None = None

    def start(self) -> None:
        self._down.start()

    def feed(self, data: bytes, stop: threading.Event) -> None:
        """Client bytes for the guest; waits while PIPE_LIMIT bytes wait (the connection's
        reader pauses: backpressure) until there is room, the forward ends or `stop`."""
        while not self._ended and not self._input_closed and not stop.is_set():
            if self.pipe.feed(data, FEED_POLL):
                return

    def client_eof(self) -> None:
        self._input_closed = True
        self.pipe.close()

    def abort(self) -> None:
        with self._lock:
            self._aborted = self._ended = True
            sock = self.sock
        self.pipe.close()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def join(self) -> None:
        if self._down.ident is not None:
            self._down.join(JOIN_GRACE)
        if self._up is not None:
            self._up.join(JOIN_GRACE)

    def _run_down(self) -> None:
        connected = False
        try:
            connected = self._connect()
            if connected:
                self._copy_down()
        finally:
            self._ended = True
            self.pipe.close()
            up = self._up
            if up is not None:
                self._shutdown()
                up.join(JOIN_GRACE)
            if self.sock is not None:
                self.sock.close()
            self.done(self, connected)

    def _connect(self) -> bool:
        try:
            sock = self.backends.port_connect(self.sandbox_id, self.port, CONNECT_TIMEOUT)
        except RuntimeError_ as e:
            why = e.message
        except OSError as e:
            why = str(e)
        except Exception as e:
            log.exception("port forward: the backend failed")
            why = f"{type(e).__name__}: {e}"
        else:
            with self._lock:
                self.sock = sock
                aborted = self._aborted
            if aborted:
                return False
            sock.settimeout(None)
            self._up = threading.Thread(target=self._run_up, name=f"pf-up-{self.port}",
                                        daemon=True)
            self._up.start()
            return True
        self.send_error(f"error forwarding port {self.port} to pod {self.sandbox_id}, "
                        f"uid : {why}".encode())
        return False

    def _copy_down(self) -> None:
        assert self.sock is not None
        while True:
            try:
                data = self.sock.recv(READ_SIZE)
            except OSError:
                return
            if not data or not self.send_data(data):
                return

    def _run_up(self) -> None:
        assert self.sock is not None
        while True:
            data = self.pipe.read()
            if data is None:
                continue
            if not data:
                break
            try:
                self.sock.sendall(data)
            except OSError:
                break
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def _shutdown(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
