"""The daemon's one connection to libvirtd, opened lazily and reopened after a loss, and
`translate`, the one place a libvirt error becomes one of the runtime's errors.

libvirt calls block, so callers run them in worker threads, never on the event loop.
libvirt's default event loop runs in its own thread: it drives connection keepalives
(so a vanished libvirtd is noticed) and the domain lifecycle callbacks.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

import libvirt

from .. import metrics
from ..errors import FailedPrecondition, NotFound, RuntimeError_, Unavailable

log = logging.getLogger(__name__)

# The codes callers act on; every other libvirt error means libvirt could not do it now.
_NOT_FOUND = {libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT}
_WRONG_STATE = {libvirt.VIR_ERR_OPERATION_INVALID}


def translate(e: libvirt.libvirtError, what: str, uuid: str = "") -> RuntimeError_:
    """The runtime's error for libvirt error `e` raised while doing `what` (to the domain
    `uuid`, if any): NotFound for a missing domain, FailedPrecondition for an operation
    its state does not allow, Unavailable for everything else. Every libvirt call of the
    adapter goes through here; raise the result `from e`."""
    code = e.get_error_code()
    context = {"uuid": uuid, "libvirt_code": code} if uuid else {"libvirt_code": code}
    message = f"{what} failed: {e.get_error_message() or e}"
    if code in _NOT_FOUND:
        return NotFound(message, **context)
    if code in _WRONG_STATE:
        return FailedPrecondition(message, **context)
    return Unavailable(message, **context)

_event_loop_started = False
_event_loop_lock = threading.Lock()


@contextlib.contextmanager
def call(what: str, uuid: str = "") -> Iterator[None]:
    """Runs libvirt calls; a libvirt error leaves as the runtime error `translate` picks."""
    try:
        yield
    except libvirt.libvirtError as e:
        raise translate(e, what, uuid) from e


def _ignore_libvirt_error(_ctx: Any, _err: Any) -> None:
    """libvirt prints every error to stderr by default; ours are raised and logged instead."""


def _start_event_loop() -> None:
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.registerErrorHandler(_ignore_libvirt_error, None)
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


class LibvirtConnection:
    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._conn: libvirt.virConnect | None = None
        self._lock = threading.Lock()
        self._on_open: list[Any] = []
        _start_event_loop()

    def current(self) -> libvirt.virConnect | None:
        """The connection as it stands, without the lock, a liveness check or a reconnect
        (for callers on the serving loop, which must never wait on libvirt)."""
        return self._conn

    def on_open(self, callback: Any) -> None:
        """Registers callback(conn), run after each (re)connect, e.g. to subscribe events."""
        self._on_open.append(callback)

    def get(self) -> libvirt.virConnect:
        with self._lock:
            if self._conn is not None:
                try:
                    if self._conn.isAlive():
                        return self._conn
                except libvirt.libvirtError:
                    pass
                log.warning("connection to libvirt at %s was lost; reconnecting", self.uri)
                self._conn = None
                metrics.LIBVIRT_RECONNECTS.inc()
            try:
                conn = libvirt.open(self.uri)
            except libvirt.libvirtError as e:
                raise translate(e, f"connecting to libvirt at {self.uri}") from e
            try:
                conn.setKeepAlive(5, 3)
            except libvirt.libvirtError as e:  # e.g. the test:/// driver has no keepalive
                log.debug("libvirt keepalive not available: %s",
                          translate(e, "setting the keepalive").message)
            self._conn = conn
            log.info("connected to libvirt at %s", self.uri)
        for callback in self._on_open:
            callback(conn)
        return conn

    def probe(self) -> str:
        """A cheap round trip to libvirtd; returns its version as text."""
        try:
            v = self.get().getLibVersion()
        except libvirt.libvirtError as e:
            with self._lock:
                self._conn = None
            raise translate(e, f"asking libvirt at {self.uri} for its version") from e
        return f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}"
