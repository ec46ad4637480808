"""Concurrent pulls of one image URL share one download.

The first pull of a key (URL and asked-for digest) leads: it downloads and stores. Pulls
of the same key that come meanwhile wait and get the leader's result, then name the
content themselves. When the leader's caller went away (Cancelled) the waiters start over,
one of them leading; any other failure of the leader is theirs too, raised again as a copy
so each caller gets its own exception object.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from ..errors import Cancelled, Internal, RuntimeError_

log = logging.getLogger(__name__)

T = TypeVar("T")
WAIT_STEP = 0.1  # seconds between looks at a waiter's own cancel event


@dataclasses.dataclass
class _InFlight(Generic[T]):
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: T | None = None
    error: BaseException | None = None
    waiters: int = 0


class SharedDownloads(Generic[T]):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inflight: dict[Hashable, _InFlight[T]] = {}

    def waiters(self) -> int:
        """How many pulls wait for another's download now (for tests and diagnostics)."""
        with self._lock:
            return sum(f.waiters for f in self._inflight.values())

    def run(self, key: Hashable, lead: Callable[[], T], *, name: str, source: str,
            cancel: threading.Event | None) -> tuple[T, bool] | None:
        """(lead's result, True) if this call led; (the leader's result, False) if it
        waited; None if the download it waited for was cancelled (start over). ``name``
        and ``source`` (the URL, redacted) are for messages."""
        with self._lock:
            flight = self._inflight.get(key)
            leader = flight is None
            if flight is None:
                flight = self._inflight[key] = _InFlight()
            else:
                flight.waiters += 1
        if leader:
            return self._lead(key, flight, lead), True
        log.info("image %s: waiting for the download of %s already in progress", name, source)
        return self._follow(flight, name, cancel)

    def _lead(self, key: Hashable, flight: _InFlight[T], lead: Callable[[], T]) -> T:
        try:
            flight.result = lead()
            return flight.result
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                del self._inflight[key]
            flight.done.set()

    @staticmethod
    def _follow(flight: _InFlight[T], name: str,
                cancel: threading.Event | None) -> tuple[T, bool] | None:
        while not flight.done.wait(WAIT_STEP):
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"pull of image {name} cancelled")
        err = flight.error
        if isinstance(err, Cancelled):
            log.info("image %s: the download this pull waited for was cancelled; retrying",
                     name)
            return None
        if isinstance(err, RuntimeError_):
            raise type(err)(err.message, **err.context)
        if err is not None:
            raise Internal(f"pulling image {name} failed: {err!r}") from err
        assert flight.result is not None
        return flight.result, False
