"""The systemd watchdog, fed from a thread of its own.

The serving loop proves it answers by beating a Heartbeat (a task that does nothing else,
so no call, pool or slow outside work can hold it up). The Watchdog thread sends
WATCHDOG=1 every quarter of WatchdogSec (at most every second) unless the daemon is in a
hang it cannot recover from by itself:
  - the serving loop has not beaten for LOOP_STALL_LIMIT seconds (a wedged loop), or
  - a libvirt probe has hung past its timeout (a wedged libvirt connection).
Slow outside work (downloads, CNI plugins, a reconcile) never withholds a ping: it runs in
pools and threads the loop does not wait for. The same thread starts the libvirt probes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from .. import metrics
from .notify import Notifier

log = logging.getLogger(__name__)

BEAT_INTERVAL = 0.5  # the loop beats this often
LOOP_STALL_LIMIT = 10.0  # seconds without a beat that count as a wedged loop
PROBE_INTERVAL = 5.0  # seconds between libvirt probes
MAX_PING_INTERVAL = 1.0


class Health(Protocol):
    def wedged(self) -> bool: ...
    def start_probe(self) -> None: ...


class Heartbeat:
    """The time of the serving loop's last beat (written by the loop, read by the thread)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last = clock()

    def beat(self) -> None:
        self._last = self._clock()

    def age(self) -> float:
        return self._clock() - self._last


def ping_interval(watchdog_usec: int) -> float | None:
    """Seconds between pings for WATCHDOG_USEC (None: no watchdog asked for)."""
    if watchdog_usec <= 0:
        return None
    return min(watchdog_usec / 4e6, MAX_PING_INTERVAL)


def withhold_reason(heartbeat: Heartbeat, health: Health,
                    stall_limit: float = LOOP_STALL_LIMIT) -> str | None:
    """Why the watchdog must not be fed now, or None to feed it."""
    age = heartbeat.age()
    if age > stall_limit:
        return f"the serving loop has not answered for over {stall_limit:.0f} s"
    if health.wedged():
        return "libvirt is not answering"
    return None


class Watchdog:
    def __init__(self, notifier: Notifier, heartbeat: Heartbeat, health: Health) -> None:
        self._notifier = notifier
        self._heartbeat = heartbeat
        self._health = health
        self._interval = ping_interval(notifier.watchdog_usec)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        tick = self._interval or BEAT_INTERVAL
        next_probe = 0.0
        withheld: str | None = None
        while True:
            now = time.monotonic()
            if now >= next_probe:
                self._health.start_probe()
                next_probe = now + PROBE_INTERVAL
            if self._interval is not None:
                reason = withhold_reason(self._heartbeat, self._health)
                if reason is None:
                    self._notifier.watchdog()
                    metrics.WATCHDOG_PINGS.inc()
                else:
                    metrics.WATCHDOG_WITHHELD.inc()
                    if reason != withheld:
                        log.error("%s; withholding the watchdog ping", reason)
                withheld = reason
            self._notifier.retry()  # a STATUS= the reader had no room for
            if self._stop.wait(tick):
                return
