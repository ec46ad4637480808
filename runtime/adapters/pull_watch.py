"""An image download's limits: an overall deadline and a minimum speed.

A server that trickles (one byte every 2 s) never trips a per-read timeout, so each
download is watched by a small thread of its own: when the deadline passes, the bytes of
the last ``window`` seconds fall below ``min_speed * window``, or the caller cancels, it
shuts the connection's socket down, which wakes a read blocked on it at once (also while
the status line and headers trickle in). The downloading thread then raises what the watch
saw: DeadlineExceeded naming the image, or Cancelled. The connections it watches are made
in pull_guard.py, which attaches each one's socket.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import socket
import threading
import time

from ..errors import Cancelled, DeadlineExceeded, RuntimeError_

log = logging.getLogger(__name__)

CHECK_INTERVAL = 0.25  # seconds between the watch's looks


@dataclasses.dataclass(frozen=True)
class PullLimits:
    deadline: float = 3600.0  # seconds for a whole download
    min_speed: int = 10240  # bytes per second, averaged over window; 0: no minimum
    window: float = 60.0  # seconds


class SpeedWindow:
    """Bytes received over the last ``window`` seconds against a minimum speed.

    ``add(now, done)`` records the running total; ``too_slow(now)`` says whether the
    last full window carried fewer than ``min_speed * window`` bytes. The first window
    after the start is allowed to fill (connecting, a slow first byte) before it judges.
    """

    def __init__(self, min_speed: int, window: float, now: float) -> None:
        self.min_speed = min_speed
        self.window = window
        self._started = now
        self._done = 0
        # (time, total) samples; the oldest one is the total at or before now - window.
        self._samples: collections.deque[tuple[float, int]] = collections.deque([(now, 0)])

    def add(self, now: float, done: int) -> None:
        self._done = done
        samples = self._samples
        if len(samples) >= 2 and now - samples[-2][0] < self.window / 20:
            samples[-1] = (now, done)  # the newest sample is always the current total
        else:
            samples.append((now, done))  # so at most about 20 samples span a window
        self._prune(now)

    def _prune(self, now: float) -> None:
        while len(self._samples) > 1 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()

    def recent(self, now: float) -> int:
        """Bytes received since ``now - window`` (at the samples' resolution: perhaps a
        little more, never less)."""
        self._prune(now)
        return self._done - self._samples[0][1]

    def too_slow(self, now: float) -> bool:
        if self.min_speed <= 0 or now - self._started < self.window:
            return False
        return self.recent(now) < self.min_speed * self.window


class PullWatch:
    """Watches one download; use as a context manager around the whole fetch."""

    def __init__(self, name: str, source: str, limits: PullLimits,
                 cancel: threading.Event | None) -> None:
        self.name = name
        self.source = source
        self.limits = limits
        self._cancel = cancel
        self._started = time.monotonic()
        self._speed = SpeedWindow(limits.min_speed, limits.window, self._started)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._done = 0
        self._broken: RuntimeError_ | None = None
        self._finished = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pull-watch", daemon=True)

    def attach(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
            broken = self._broken is not None
        if broken:
            self._cut()

    def received(self, done: int) -> None:
        """The running total of body bytes (called by the downloading thread)."""
        with self._lock:
            self._done = done
            self._speed.add(time.monotonic(), done)

    def raise_if_broken(self) -> None:
        """Raises what stopped the download, if the watch stopped it."""
        if self._broken is not None:
            raise self._broken

    def __enter__(self) -> PullWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._finished.set()
        self._thread.join()

    def verdict(self, now: float) -> RuntimeError_ | None:
        """What must stop the download now, if anything."""
        if self._cancel is not None and self._cancel.is_set():
            return Cancelled(f"pull of image {self.name} cancelled")
        with self._lock:
            done = self._done
            too_slow = self._speed.too_slow(now)
            recent = self._speed.recent(now) if too_slow else 0
        lim = self.limits
        if now - self._started > lim.deadline:
            return DeadlineExceeded(
                f"pulling image {self.name}: {self.source} not done within the pull deadline "
                f"of {lim.deadline:g} s ({done} bytes received)")
        if too_slow:
            return DeadlineExceeded(
                f"pulling image {self.name}: {self.source} sent {recent} bytes in the last "
                f"{lim.window:g} s, below the minimum speed of {lim.min_speed} bytes/s")
        return None

    def _run(self) -> None:
        while not self._finished.wait(CHECK_INTERVAL):
            broken = self.verdict(time.monotonic())
            if broken is not None:
                if not isinstance(broken, Cancelled):
                    log.warning("%s", broken.message)
                with self._lock:
                    self._broken = broken
                self._cut()
                return

    def _cut(self) -> None:
        with self._lock:
            sock = self._sock
        if sock is not None:
            # The plain socket's shutdown, also under TLS: SSLSocket.shutdown would drop the
            # TLS object under the reading thread's feet. OSError: the download ended.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
