"""Image fetch: one HTTP(S) download streamed into a file, hashed as it arrives.

Redirects are followed only to schemes the runtime allows, and never to anything but
http(s), so a server cannot point a pull at a local file. The caller's cancel event is
polled between chunks, so a pull the kubelet gave up on stops within one chunk. Each
download has an overall deadline and a minimum speed (pull_watch.py). Errors are the
runtime's: NotFound for 404/410, Unavailable for the server's failures, DeadlineExceeded
for a silent, trickling or too slow server, ResourceExhausted for a full local disk,
Cancelled.
"""

from __future__ import annotations

import hashlib
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

from ..errors import (
    Cancelled,
    DeadlineExceeded,
    NotFound,
    RuntimeError_,
    Unavailable,
)
from .fsutil import storage_error
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


def _network_error(exc: BaseException, name: str, url: str) -> RuntimeError_:
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
        exc = exc.reason
    if isinstance(exc, TimeoutError):
        return DeadlineExceeded(f"pulling image {name}: {url} did not answer in time")
    if isinstance(exc, ConnectionRefusedError):
        return Unavailable(f"pulling image {name}: connection to {url} refused")
    if isinstance(exc, socket.gaierror):
        return Unavailable(f"pulling image {name}: cannot resolve the host of {url}: {exc}")
    if isinstance(exc, ssl.SSLError):
        return Unavailable(f"pulling image {name}: TLS with {url} failed: {exc}")
    return Unavailable(f"pulling image {name} from {url} failed: {exc}")


class _RedirectGuard(urllib.request.HTTPRedirectHandler):
    """Follows redirects only to schemes the store allows (never to file:// by surprise)."""

    def __init__(self, allowed: frozenset[str]) -> None:
        self.allowed = allowed

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in self.allowed or scheme not in ("http", "https"):
            raise Unavailable(
                f"{redact(req.full_url)} redirects to a {scheme or 'relative'} URL; refused"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


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
                 limits: PullLimits | None = None) -> None:
        self.timeout = timeout
        self.limits = limits or PullLimits()
        self._allowed = allowed_schemes

    def fetch(
        self,
        url: str,
        out: IO[bytes],
        *,
        name: str,
        cancel: threading.Event | None = None,
        progress: Progress | None = None,
    ) -> Fetched:
        """Write the body of ``url`` to ``out``; ``name`` is the image the messages name."""
        shown = redact(url)
        log.info("image %s: downloading %s", name, shown)
        with PullWatch(name, shown, self.limits, cancel) as watch:
            opener = urllib.request.build_opener(_RedirectGuard(self._allowed),
                                                 *watch.handlers())
            try:
                resp = self._open(opener, url, name, shown)
                with resp:
                    length = resp.headers.get("Content-Length") if resp.headers else None
                    total = (int(length) if length is not None and length.strip().isdigit()
                             else None)
                    meter = _Meter(name, total, progress, watch)
                    digest = self._copy(resp, out, meter, name, shown, cancel)
            except RuntimeError_:
                watch.raise_if_broken()  # the watch cut the connection: say why
                raise
            watch.raise_if_broken()  # a cut connection can look like the end of the body
        if total is not None and meter.done != total:
            raise Unavailable(
                f"pulling image {name}: {shown} sent {meter.done} bytes but announced {total}"
            )
        meter.finish()
        return Fetched(digest, meter.done)

    def _open(self, opener: urllib.request.OpenerDirector, url: str, name: str,
              shown: str) -> Any:
        req = urllib.request.Request(url, headers={"User-Agent": "arktos-vm-runtime"})
        try:
            return opener.open(req, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code in (404, 410):
                raise NotFound(f"image {name} not found at {shown}") from None
            raise Unavailable(
                f"pulling image {name}: {shown} answered {exc.code} {exc.reason}"
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            raise _network_error(exc, name, shown) from exc

    @staticmethod
    def _copy(resp: Any, out: IO[bytes], meter: _Meter, name: str, shown: str,
              cancel: threading.Event | None) -> str:
        hasher = hashlib.sha256()
        while True:
            if cancel is not None and cancel.is_set():
                log.info("image %s: download cancelled after %d bytes", name, meter.done)
                raise Cancelled(f"pull of image {name} cancelled")
            try:
                chunk = resp.read1(CHUNK_SIZE)
            except (OSError, http.client.HTTPException) as exc:
                raise _network_error(exc, name, shown) from exc
            if not chunk:
                return hasher.hexdigest()
            hasher.update(chunk)
            try:
                out.write(chunk)
            except OSError as exc:
                raise storage_error(exc, f"image {name}") from exc
            meter.add(len(chunk))
