"""Remote command (exec, attach): what SPDY and WebSocket sessions share.

A `Command` turns the cached CRI request into a `StreamIO` for the backend, runs the backend
on the session's worker thread, and renders the outcome for the error channel in the
negotiated version (/work/shared/streaming.md section 4): v1-v3 plain text on failure only, v4
and v5 one JSON Status (Success, NonZeroExitCode with the exit code as cause, InternalError).
Resize events are JSON `{"Width":W,"Height":H}` objects, split anywhere across messages.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import RuntimeError_
from ..service.stream_io import InputPipe, StreamBackends, StreamIO
from .tokens import AttachRequest, ExecRequest

log = logging.getLogger(__name__)

MAX_RESIZE_BUFFER = 4096
FEED_POLL = 0.25      # s between checks of the session's end while stdin is full
WORKER_GRACE = 30.0    # s the session waits for a backend to return after `gone`

Send = Callable[[bytes], bool]   # False once the client can no longer be written to


@dataclass(frozen=True)
class Outcome:
    status: str                 # "Success" or "Failure"
    message: str = ""
    reason: str = ""            # "NonZeroExitCode" or "InternalError"
    exit_code: int | None = None

    def render(self, version: int) -> bytes:
        """The error channel's bytes (b"" = write nothing)."""
        if version < 4:
            return b"" if self.status == "Success" else self.message.encode()
        status: dict[str, object] = {"metadata": {}, "status": self.status}
        if self.status != "Success":
            status["message"] = self.message
            status["reason"] = self.reason
            if self.reason == "NonZeroExitCode":
                status["details"] = {"causes": [{"reason": "ExitCode",
                                                 "message": str(self.exit_code)}]}
            else:
                cause = self.message.removeprefix("Internal error occurred: ")
                status["details"] = {"causes": [{"message": cause}]}
                status["code"] = 500
        return json.dumps(status, separators=(",", ":")).encode()


SUCCESS = Outcome("Success")


def internal(message: str) -> Outcome:
    return Outcome("Failure", f"Internal error occurred: {message}", "InternalError")


class ResizeParser:
    """Bytes of the resize stream to (width, height) events."""

    def __init__(self) -> None:
        self._buf = ""
        self._dec = json.JSONDecoder()

    def feed(self, data: bytes) -> list[tuple[int, int]]:
        self._buf += data.decode("utf-8", "replace")
        if len(self._buf) > MAX_RESIZE_BUFFER:
            self._buf = ""
            log.info("remote command: resize stream sent %d bytes of no JSON; dropped",
                     MAX_RESIZE_BUFFER)
            return []
        sizes: list[tuple[int, int]] = []
        while True:
            text = self._buf.lstrip()
            if not text:
                self._buf = ""
                return sizes
            try:
                obj, end = self._dec.raw_decode(text)
            except json.JSONDecodeError:
                self._buf = text
                return sizes      # incomplete (or garbage: dropped at the bound)
            self._buf = text[end:]
            if isinstance(obj, dict):
                w, h = obj.get("Width"), obj.get("Height")
                if (isinstance(w, int) and isinstance(h, int) and 0 <= w <= 0xFFFF
                        and 0 <= h <= 0xFFFF):
                    sizes.append((w, h))


class Command:
    """One exec or attach: the StreamIO, the worker thread, the outcome."""

    def __init__(self, backends: StreamBackends, request: ExecRequest | AttachRequest) -> None:
        self.backends = backends
        self.request = request
        self.stdin = InputPipe() if request.stdin else None
        self.io = StreamIO(stdin=self.stdin, stdout=None, stderr=None, tty=request.tty)
        self.resizes = ResizeParser()
        self._stdin_closed = False
        self._worker: threading.Thread | None = None

    def writer(self, send: Send) -> Callable[[bytes], None]:
        gone = self.io.gone

        def write(data: bytes) -> None:
            if data and not gone.is_set() and not send(data):
                gone.set()
        return write

    def feed_stdin(self, data: bytes, stop: threading.Event) -> None:
        """Client bytes for the backend; waits while the pipe is full (the connection's
        reader pauses: backpressure) until there is room, stdin closes or `stop` is set."""
        while self.stdin is not None and not self._stdin_closed and not stop.is_set():
            if self.stdin.feed(data, FEED_POLL):
                return

    def close_stdin(self) -> None:
        self._stdin_closed = True
        if self.stdin is not None:
            self.stdin.close()

    def resize(self, data: bytes) -> None:
        if self.request.tty:
            for w, h in self.resizes.feed(data):
                self.io.resize(w, h)

    def start(self, done: Callable[[Outcome], None]) -> None:
        """Runs the backend on a worker thread; `done(outcome)` there when it returns."""
        def work() -> None:
            done(self.run())
        self._worker = threading.Thread(target=work, name="stream-command", daemon=True)
        self._worker.start()

    def run(self) -> Outcome:
        req = self.request
        try:
            if isinstance(req, ExecRequest):
                code = self.backends.exec(req.container_id, list(req.cmd), self.io)
                if code == 0:
                    return SUCCESS
                return Outcome("Failure", "command terminated with non-zero exit code: "
                               f"error executing command [{' '.join(req.cmd)}], exit code "
                               f"{code}", "NonZeroExitCode", code)
            self.backends.attach(req.container_id, self.io)
            return SUCCESS
        except RuntimeError_ as e:
            return internal(e.message)
        except Exception as e:
            log.exception("remote command: the backend failed")
            return internal(f"{type(e).__name__}: {e}")
        finally:
            self.close_stdin()

    def end(self) -> None:
        """The client went away or the session is over: tell the backend."""
        self.io.gone.set()
        self.close_stdin()

    def join(self) -> None:
        worker = self._worker
        if worker is not None:
            worker.join(WORKER_GRACE)
            if worker.is_alive():
                log.warning("remote command: backend still running %.0f s after the client "
                            "left", WORKER_GRACE)
