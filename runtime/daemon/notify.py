"""sd_notify(3): READY, STATUS, STOPPING and WATCHDOG messages to systemd.

Implemented on a plain datagram socket (the protocol is one datagram per message) so it
works the same under systemd, systemd-socket-activate, and a test's own NOTIFY_SOCKET.
The socket never blocks: STATUS= is sent from the serving loop, and a reader that lags
(PID 1 busy, a full receive queue: net.unix.max_dgram_qlen is 10 on some hosts) would
otherwise stop the daemon answering. A message that does not fit is dropped and said once,
except the last STATUS= (state, not an event: the latest one is what counts), which is sent
again with the next message or on the watchdog thread's next tick (retry).
"""

from __future__ import annotations

import logging
import os
import socket
import threading

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # abstract namespace
            address = "\0" + address[1:]
        self._address = address or None
        self._sock: socket.socket | None = None
        self._failing = False  # the last send failed: the next failure is not logged again
        self._unsent_status: str | None = None  # the latest STATUS= that did not fit
        self._lock = threading.Lock()  # the serving loop and the watchdog thread send
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                                       | socket.SOCK_NONBLOCK)
        self.watchdog_usec = _watchdog_usec(env)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *lines: str) -> None:
        if self._sock is None or self._address is None:
            return
        status = next((line for line in lines if line.startswith("STATUS=")), None)
        with self._lock:
            if status is not None:
                self._unsent_status = None  # superseded by this one
            elif self._unsent_status is not None and self._send_locked(self._unsent_status):
                self._unsent_status = None
            if not self._send_locked("\n".join(lines)) and status is not None:
                self._unsent_status = status

    def retry(self) -> None:
        """Sends the latest STATUS= that did not fit, if any (the watchdog thread calls
        this on every tick, also while it withholds its pings)."""
        with self._lock:
            if self._unsent_status is not None and self._send_locked(self._unsent_status):
                self._unsent_status = None

    def _send_locked(self, message: str) -> bool:
        assert self._sock is not None and self._address is not None
        try:
            self._sock.sendto(message.encode(), self._address)
        except OSError as e:  # systemd gone or its queue full: never fatal, never blocking
            if not self._failing:
                log.warning("sd_notify to %s failed (%s); dropping messages until it works",
                            self._address.lstrip("\0"), e)
            self._failing = True
            return False
        if self._failing:
            log.info("sd_notify to %s works again", self._address.lstrip("\0"))
            self._failing = False
        return True

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def stopping(self, status: str = "Stopping") -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_usec(env: dict[str, str]) -> int:
    """WATCHDOG_USEC when it is meant for this process (WATCHDOG_PID unset or ours)."""
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return 0
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return 0
    return max(usec, 0)
