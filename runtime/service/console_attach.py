"""Attach: a running VM's serial console, shared by every attacher.

One libvirt console stream per VM (libvirt allows one session per console), opened when
the first attacher comes and closed when the last one leaves. Its output is fanned out:
each attacher has its own bounded buffer (MAX_BUFFERED bytes) filled on libvirt's event
thread without blocking; an attacher that reads slower than the guest prints loses the
oldest output in its buffer (counted, logged at DEBUG) and never slows the others or the
daemon. Input from any attacher goes to the console, in the order each one typed it.

The console log (`kubectl logs`) is not fed from here: QEMU writes the serial port to
virtlogd's file whether or not anyone is attached (adapters/console_log.py copies it).

A serial console has no terminal size: resize events are accepted and ignored. The
container's `stdin` (ContainerConfig, kept in its record) is honoured: when it was false,
what an attacher sends is read and dropped. `tty` needs nothing here: the console is one
byte stream (stdout); with tty off nothing is written to stderr either.

Threads: the caller's (the streaming server's session thread) pumps output; one more
per attacher with stdin reads its input. Both end promptly once `io.gone` is set, the VM
stops, or the console stream ends.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from ..checks import shown
from ..errors import FailedPrecondition, NotFound, RuntimeError_
from .podstate import PodState
from .records import CREATING, RUNNING
from .stream_io import StreamIO

log = logging.getLogger(__name__)

MAX_BUFFERED = 256 * 1024  # bytes of console output held for one attacher
WAIT = 0.1  # seconds between checks of io.gone while idle
STATE_EVERY = 1.0  # seconds between checks that the container still runs


class Console(Protocol):
    def send(self, data: bytes, timeout: float = ...) -> None: ...
    def close(self) -> None: ...


class ConsoleOpener(Protocol):
    """adapters.libvirt_console.Consoles"""

    def open(self, uuid: str, sandbox_id: str, on_data: Callable[[bytes], None],
             on_end: Callable[[str], None]) -> Console: ...


class _Attacher:
    """One attacher's output buffer: filled on libvirt's event thread, drained by the
    attacher's own thread."""

    def __init__(self, limit: int, writes: bool = False) -> None:
        self.writes = writes  # it has stdin (a writer: the node CLI's console counts them)
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._limit = limit
        self.dropped = 0
        self.ended = ""
        self._cond = threading.Condition()

    def push(self, data: bytes) -> None:
        with self._cond:
            if len(data) > self._limit:
                self.dropped += len(data) - self._limit
                data = data[-self._limit:]
            self._chunks.append(data)
            self._size += len(data)
            while self._size > self._limit:
                old = self._chunks.popleft()
                self._size -= len(old)
                self.dropped += len(old)
            self._cond.notify()

    def end(self, reason: str) -> None:
        with self._cond:
            self.ended = reason or "ended"
            self._cond.notify()

    def take(self, timeout: float) -> bytes:
        """What is buffered (b"" when nothing came within `timeout` s, or at the end)."""
        with self._cond:
            self._cond.wait_for(lambda: self._chunks or self.ended, timeout)
            data = b"".join(self._chunks)
            self._chunks.clear()
            self._size = 0
            return data


class _Hub:
    """The console stream of one VM and its attachers."""

    def __init__(self, cid: str) -> None:
        self.cid = cid
        self.lock = threading.Lock()  # attachers, ended
        self.open_lock = threading.Lock()  # held while the stream is opened or closed
        self.attachers: set[_Attacher] = set()
        self.stream: Console | None = None
        self.ended = ""

    def feed(self, data: bytes) -> None:  # libvirt's event thread
        with self.lock:
            attachers = list(self.attachers)
        for att in attachers:
            att.push(data)

    def end(self, reason: str) -> None:  # libvirt's event thread
        with self.lock:
            self.ended = reason
            attachers = list(self.attachers)
        for att in attachers:
            att.end(reason)


class ConsoleAttach:
    def __init__(self, state: PodState, consoles: ConsoleOpener, *,
                 buffer_limit: int = MAX_BUFFERED) -> None:
        self._state = state
        self._consoles = consoles
        self._limit = buffer_limit
        self._lock = threading.Lock()
        self._hubs: dict[str, _Hub] = {}

    def check(self, cid: str) -> None:
        """The RPC's check: NotFound / FailedPrecondition unless the container runs."""
        rec = self._state.container(cid)
        if rec is None or rec.state == CREATING:
            raise NotFound(f"container {shown(cid)} not found")
        if rec.state != RUNNING:
            raise FailedPrecondition(f"container {cid} is not running ({rec.state}): its VM "
                                     "has no console to attach to")

    def sessions(self) -> dict[str, int]:
        """Open console streams: container id -> attachers (for tests and status)."""
        with self._lock:
            return {cid: len(h.attachers) for cid, h in self._hubs.items()}

    def writers(self, cid: str) -> int:
        """Attachers of this container's console that have stdin."""
        with self._lock:
            hub = self._hubs.get(cid)
        if hub is None:
            return 0
        with hub.lock:
            return sum(a.writes for a in hub.attachers)

    def attach(self, cid: str, io: StreamIO) -> None:
        self.check(cid)
        rec = self._state.container(cid)
        assert rec is not None
        att = _Attacher(self._limit, writes=io.stdin is not None and rec.stdin is not False)
        hub = self._join(cid, rec.sandbox_id, att)
        io.on_resize(lambda w, h: None)  # a serial console has no size to set
        stop = threading.Event()
        reader: threading.Thread | None = None
        if io.stdin is not None:
            honoured = rec.stdin is not False
            reader = threading.Thread(target=self._input, args=(hub, io, stop, honoured),
                                      name=f"attach-in-{cid[:8]}", daemon=True)
            reader.start()
        out = io.stdout or io.stderr
        checked = time.monotonic()
        try:
            while not io.gone.is_set():
                data = att.take(WAIT)
                if data and out is not None:
                    out(data)
                if att.ended and not data:
                    log.info("attach to %s ended: %s", cid, att.ended,
                             extra={"CONTAINER_ID": cid})
                    break
                if time.monotonic() - checked >= STATE_EVERY:
                    checked = time.monotonic()
                    now = self._state.container(cid)
                    if now is None or now.state != RUNNING:
                        break  # stopped; the stream's own end may come later
        finally:
            stop.set()
            if reader is not None:
                reader.join()
            self._leave(hub, att)
            if att.dropped:
                log.debug("attach to %s: a slow attacher lost %d bytes of console output",
                          cid, att.dropped, extra={"CONTAINER_ID": cid})

    def close(self) -> None:
        """At shutdown: every attach session ends and every console stream is closed (the
        streaming server's stop normally ended them already)."""
        with self._lock:
            hubs = list(self._hubs.values())
        for hub in hubs:
            hub.end("the runtime is stopping")
            with hub.open_lock:
                stream, hub.stream = hub.stream, None
            if stream is not None:
                stream.close()

    # -- the shared stream ---------------------------------------------------------------

    def _join(self, cid: str, sandbox_id: str, att: _Attacher) -> _Hub:
        with self._lock:
            hub = self._hubs.get(cid)
            if hub is None or hub.ended:
                hub = _Hub(cid)
                self._hubs[cid] = hub
            with hub.lock:
                hub.attachers.add(att)
        try:
            with hub.open_lock:
                if hub.stream is None and not hub.ended:
                    hub.stream = self._consoles.open(cid, sandbox_id, hub.feed, hub.end)
                    log.info("console stream of %s opened", cid, extra={"CONTAINER_ID": cid})
        except BaseException:
            self._leave(hub, att)
            raise
        if hub.ended:
            att.end(hub.ended)
        return hub

    def _leave(self, hub: _Hub, att: _Attacher) -> None:
        with self._lock:
            with hub.lock:
                hub.attachers.discard(att)
                last = not hub.attachers
            if last and self._hubs.get(hub.cid) is hub:
                del self._hubs[hub.cid]
        if last:
            with hub.open_lock:
                stream, hub.stream = hub.stream, None
            if stream is not None:
                stream.close()  # the VM keeps running
                log.info("console stream of %s closed: no attacher left", hub.cid,
                         extra={"CONTAINER_ID": hub.cid})

    def _input(self, hub: _Hub, io: StreamIO, stop: threading.Event, honoured: bool) -> None:
        assert io.stdin is not None
        while not stop.is_set() and not io.gone.is_set():
            data = io.stdin.read(WAIT)
            if data is None:
                continue
            if not data:
                return  # the attacher closed its stdin; output goes on
            stream = hub.stream
            if not honoured or stream is None:
                continue  # the container was made without stdin: dropped
            try:
                stream.send(data)
            except RuntimeError_ as e:
                log.info("attach to %s: input not delivered: %s", hub.cid, e.message,
                         extra={"CONTAINER_ID": hub.cid})
                return
