"""A domain's serial console as a libvirt stream (virDomainOpenConsole), for Attach.

The stream is non-blocking and driven by libvirt's default event loop, which the daemon
already runs on its own thread (libvirt_conn): data is read in a stream event callback
and handed to `on_data`, so no thread of ours blocks in a libvirt call that only another
thread could interrupt (virsh console works the same way). `on_data` and `on_end` run on
libvirt's event thread: they must only hand the data on, never block.

libvirt allows one console session per domain: the caller (service/console_attach.py)
opens one stream per running VM and fans its output out. The VM's console log is
independent of this stream: QEMU writes every byte of the serial port to virtlogd's log
file whether or not a console stream is open, and input written here is echoed into that
log only by the guest's own terminal echo.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

import libvirt

from ..errors import FailedPrecondition, NotFound, Unavailable
from .libvirt_domains import Domains, call

log = logging.getLogger(__name__)

READ_SIZE = 64 * 1024
SEND_RETRY = 0.01  # seconds between tries while the stream's send buffer is full
_EVENTS = (libvirt.VIR_STREAM_EVENT_READABLE | libvirt.VIR_STREAM_EVENT_ERROR
           | libvirt.VIR_STREAM_EVENT_HANGUP)
OPEN_RETRY_FOR = 2.0  # seconds: a console session we closed a moment ago may linger


class ConsoleStream:
    """One open console stream. `on_end(reason)` is called once, when the stream ends by
    itself (the VM stopped, libvirt went away); `close` ends it from our side."""

    def __init__(self, uuid: str, stream: libvirt.virStream,
                 on_data: Callable[[bytes], None], on_end: Callable[[str], None]) -> None:
        self.uuid = uuid
        self._stream = stream
        self._on_data = on_data
        self._on_end = on_end
        self._lock = threading.Lock()
        self._done = False
        self._send_lock = threading.Lock()

    def _start(self) -> None:
        with call("watching the console stream", self.uuid):
            self._stream.eventAddCallback(_EVENTS, self._event, None)

    def _event(self, _stream: libvirt.virStream, events: int, _opaque: object) -> None:
        # Runs on libvirt's event thread.
        if self._done:
            return
        reason = ""
        try:
            if events & libvirt.VIR_STREAM_EVENT_READABLE:
                while True:
                    data = self._stream.recv(READ_SIZE)
                    if data == -2:  # nothing more for now
                        break
                    if not data:
                        reason = "the console closed (the VM stopped)"
                        break
                    self._on_data(data)
            if not reason and events & (libvirt.VIR_STREAM_EVENT_ERROR
                                        | libvirt.VIR_STREAM_EVENT_HANGUP):
                reason = "the console stream ended (the VM stopped or libvirt went away)"
        except libvirt.libvirtError as e:
            reason = f"reading the console failed: {e.get_error_message() or e}"
        except Exception:  # never let an error escape into libvirt's loop
            log.exception("console stream of %s: handing data on failed", self.uuid)
            reason = "the console reader failed"
        if reason and self._finish(abort=True):
            self._on_end(reason)

    def send(self, data: bytes, timeout: float = 5.0) -> None:
        """Writes `data` to the guest's serial port; Unavailable once the stream ended or
        when the guest does not take it within `timeout` s."""
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        with self._send_lock:
            while view:
                if self._done:
                    raise Unavailable(f"the console of VM {self.uuid} is closed")
                try:
                    n = self._stream.send(bytes(view[:READ_SIZE]))
                except libvirt.libvirtError as e:
                    raise Unavailable(f"writing to the console of VM {self.uuid} failed: "
                                      f"{e.get_error_message() or e}") from e
                if n == -2:
                    if time.monotonic() > deadline:
                        raise Unavailable(f"the console of VM {self.uuid} takes no input")
                    time.sleep(SEND_RETRY)
                    continue
                view = view[n:]

    def _finish(self, abort: bool) -> bool:
        with self._lock:
            if self._done:
                return False
            self._done = True
        with contextlib.suppress(libvirt.libvirtError):
            self._stream.eventRemoveCallback()
        if abort:
            with contextlib.suppress(libvirt.libvirtError):
                self._stream.abort()
        return True

    def close(self) -> None:
        """Ends the console session; the VM keeps running. Safe to repeat."""
        self._finish(abort=True)

    @property
    def closed(self) -> bool:
        return self._done


class Consoles:
    def __init__(self, domains: Domains) -> None:
        self._domains = domains

    def open(self, uuid: str, sandbox_id: str, on_data: Callable[[bytes], None],
             on_end: Callable[[str], None]) -> ConsoleStream:
        """Opens the serial console of our running domain `uuid`. FailedPrecondition when
        it is not running; Unavailable when another console session holds it."""
        dom = self._domains.owned(uuid, sandbox_id, "opening the console of")
        if dom is None:
            raise NotFound(f"the domain of container {uuid} does not exist or is not ours")
        deadline = time.monotonic() + OPEN_RETRY_FOR
        while True:
            with call("reading the state of the domain", uuid):
                if not dom.isActive():
                    raise FailedPrecondition(f"VM {uuid} is not running: there is no "
                                             "console to attach to")
                stream = dom.connect().newStream(libvirt.VIR_STREAM_NONBLOCK)
            try:
                dom.openConsole(None, stream, 0)
                break
            except libvirt.libvirtError as e:
                with contextlib.suppress(libvirt.libvirtError):
                    stream.abort()
                msg = e.get_error_message() or str(e)
                if "session" in msg and time.monotonic() < deadline:
                    time.sleep(0.1)  # ours, closed a moment ago, or someone's virsh console
                    continue
                if e.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:
                    raise FailedPrecondition(f"VM {uuid} is not running: there is no "
                                             f"console to attach to ({msg})") from e
                raise Unavailable(f"opening the console of VM {uuid} failed: {msg}",
                                  uuid=uuid, libvirt_code=e.get_error_code()) from e
        console = ConsoleStream(uuid, stream, on_data, on_end)
        try:
            console._start()
        except BaseException:
            console.close()
            raise
        return console
