"""Image fetch: one HTTP(S) download streamed into a file, hashed as it arrives.

Where a download may connect, which redirects it follows and how many are in
pull_guard.py; its overall deadline and minimum speed in pull_watch.py. The caller's
cancel event is polled between chunks, so a pull the kubelet gave up on stops within one
chunk. A size cap refuses a Content-Length above it before reading, and stops a body
without one as soon as it passes the cap. Errors are the runtime's, in plain words that
never echo what the server sent (its body, headers or reason phrase) and echo the URL only
cut short: NotFound for 404/410, PermissionDenied for a denied network, ResourceExhausted
for an image over the cap or a full local disk, Unavailable for the server's other
failures, DeadlineExceeded for a silent, trickling or too slow server, Cancelled.
"""

from __future__ import annotations

import hashlib
import http
import http.client
import logging
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from ..checks import shown
from ..errors import (
    Cancelled,
    DeadlineExceeded,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    RuntimeError_,
    Unavailable,
)
from .fsutil import storage_error
from .pull_guard import NetworkGuard, opener
from .pull_watch import PullLimits, PullWatch

log = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20
PROGRESS_INTERVAL = 0.5

# progress(bytes done, bytes announced or None without a Content-Length)
Progress = Callable[[int, int | None], None]


def redact(url: str) -> str:
    """The URL for logs and messages: without a query, which may carry a token."""
    parts = urllib.parse.urlsplit(url)
    if parts.query or parts.fragment:
        return urllib.parse.urlunsplit(parts._replace(query="...", fragment=""))
    return url


def source_of(url: str) -> str:
    """The URL as messages show it: without its query, cut short, quoted."""
    return shown(redact(url))


def _network_error(exc: BaseException, name: str, url: str) -> RuntimeError_:
    """A plain message for a failed connection or read; ``url`` is already shown()."""
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
        exc = exc.reason
    if isinstance(exc, TimeoutError):
        return DeadlineExceeded(f"pulling image {name}: {url} did not answer in time")
    if isinstance(exc, ConnectionRefusedError):
        return Unavailable(f"pulling image {name}: connection to {url} refused")
    if isinstance(exc, socket.gaierror):
        return Unavailable(f"pulling image {name}: cannot resolve the host of {url} "
                           f"({exc.strerror or 'no address'})")
    if isinstance(exc, ssl.SSLError):
        why = exc.reason or type(exc).__name__
        return Unavailable(f"pulling image {name}: TLS with {url} failed ({why})")
    if isinstance(exc, http.client.RemoteDisconnected):
        return Unavailable(f"pulling image {name}: {url} closed the connection without "
                           "an answer")
    if isinstance(exc, http.client.IncompleteRead):
        return Unavailable(f"pulling image {name}: the connection to {url} ended early")
    if isinstance(exc, http.client.HTTPException):
        return Unavailable(f"pulling image {name}: {url} did not answer in valid HTTP")
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
    return Unavailable(f"pulling image {name}: reading {url} failed ({why})")


def _http_status(code: int) -> str:
    try:
        return f"HTTP {code} {http.HTTPStatus(code).phrase}"
    except ValueError:
        return f"HTTP {code}"


@dataclass(frozen=True)
class SizeCap:
    """The most bytes a download may bring (0: no cap), and the setting that says so."""

    limit: int = 0
    setting: str = "image-max-size-mib"

    def refuse(self, name: str, url: str, size: int, announced: bool) -> ResourceExhausted:
        mib = f"{self.limit / 2**20:g} MiB"
        what = f"announces {size} bytes" if announced else f"sent more than {self.limit} bytes"
        return ResourceExhausted(
            f"pulling image {name}: {url} {what}, more than the limit of {mib} (setting "
            f"{self.setting}); refused")


@dataclass(frozen=True)
class Fetched:
    digest: str  # sha256 hex of the bytes written
    size: int


@dataclass
class _Meter:
    """Counts bytes and reports progress at most every PROGRESS_INTERVAL seconds."""

    name: str
    total: int | None
    progress: Progress | None
    watch: PullWatch | None = None
    done: int = 0
    started: float = 0.0
    last: float = 0.0

    def __post_init__(self) -> None:
        self.started = self.last = time.monotonic()

    def add(self, n: int) -> None:
        self.done += n
        if self.watch is not None:
            self.watch.received(self.done)
        now = time.monotonic()
        if now - self.last >= PROGRESS_INTERVAL:
            self.last = now
            log.debug("image %s: %d of %s bytes", self.name, self.done, self.total)
            if self.progress is not None:
                self.progress(self.done, self.total)

    def finish(self) -> None:
        if self.progress is not None:
            self.progress(self.done, self.total)
        log.info("image %s: %d bytes in %.1f s", self.name, self.done,
                 time.monotonic() - self.started)


class Fetcher:
    """Downloads image URLs of the allowed schemes; thread-safe (an opener per download)."""

    def __init__(self, allowed_schemes: frozenset[str], timeout: float,
                 limits: PullLimits | None = None, guard: NetworkGuard | None = None) -> None:
        self.timeout = timeout
        self.limits = limits or PullLimits()
        self.guard = guard or NetworkGuard()
        self._allowed = allowed_schemes

    def fetch(
        self,
        url: str,
        out: IO[bytes],
        *,
        name: str,
        cancel: threading.Event | None = None,
        progress: Progress | None = None,
        cap: SizeCap | None = None,
    ) -> Fetched:
        """Write the body of ``url`` to ``out``; ``name`` is the image the messages name."""
        source = source_of(url)
        cap = cap or SizeCap()
        log.info("image %s: downloading %s", name, source)
        with PullWatch(name, source, self.limits, cancel) as watch:
            urls = opener(self._allowed, self.guard, watch, source)
            try:
                resp = self._open(urls, url, name, source)
                with resp:
                    length = resp.headers.get("Content-Length") if resp.headers else None
                    total = (int(length) if length is not None and length.strip().isdigit()
                             else None)
                    if cap.limit and total is not None and total > cap.limit:
                        raise cap.refuse(name, source, total, announced=True)
                    meter = _Meter(name, total, progress, watch)
                    digest = self._copy(resp, out, meter, name, source, cancel, cap)
            except RuntimeError_:
                watch.raise_if_broken()  # the watch cut the connection: say why
                raise
            watch.raise_if_broken()  # a cut connection can look like the end of the body
        if total is not None and meter.done != total:
            raise Unavailable(
                f"pulling image {name}: {source} sent {meter.done} bytes but announced {total}"
            )
        meter.finish()
        return Fetched(digest, meter.done)

    def _open(self, urls: urllib.request.OpenerDirector, url: str, name: str,
              source: str) -> Any:
        req = urllib.request.Request(url, headers={"User-Agent": "arktos-vm-runtime"})
        try:
            return urls.open(req, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code in (404, 410):
                raise NotFound(f"image {name} not found at {source} "
                               f"({_http_status(exc.code)})") from None
            raise Unavailable(
                f"pulling image {name}: {source} answered {_http_status(exc.code)}"
            ) from None
        except PermissionDenied as exc:
            log.warning("image %s: %s: %s", name, source, exc.message)
            raise PermissionDenied(f"pulling image {name} from {source} refused: "
                                   f"{exc.message}") from None
        except Unavailable as exc:  # a refused redirect
            raise Unavailable(f"pulling image {name}: {exc.message}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise _network_error(exc, name, source) from exc

    @staticmethod
    def _copy(resp: Any, out: IO[bytes], meter: _Meter, name: str, source: str,
              cancel: threading.Event | None, cap: SizeCap) -> str:
        hasher = hashlib.sha256()
        while True:
            if cancel is not None and cancel.is_set():
                log.info("image %s: download cancelled after %d bytes", name, meter.done)
                raise Cancelled(f"pull of image {name} cancelled")
            try:
                chunk = resp.read1(CHUNK_SIZE)
            except (OSError, http.client.HTTPException) as exc:
                raise _network_error(exc, name, source) from exc
            if not chunk:
                return hasher.hexdigest()
            if cap.limit and meter.done + len(chunk) > cap.limit:
                raise cap.refuse(name, source, meter.done + len(chunk), announced=False)
            hasher.update(chunk)
            try:
                out.write(chunk)
            except OSError as exc:
                raise storage_error(exc, f"image {name}") from exc
            meter.add(len(chunk))
