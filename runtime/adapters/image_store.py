"""The content-addressed image store: VM disk images downloaded by URL-like names.

Layout under ``root`` (one process owns it, enforced by ``flock`` on ``root/.lock``)::

    blobs/sha256/<hex>     image content, named by its sha256; immutable, mode 0644
    names/<sha256(name)>.json   {name, digest, size, virtual_size, format, url, pulled_at}
    tmp/                   downloads in progress

Every file appears by rename of a fsynced temp file in the same directory, followed by a
fsync of the directory, so a crash leaves either the old or the new state and never a half
written file under its final name. Leftover temp files are removed when the store opens.
A blob is placed before its name record and a name record is removed before its blob, so a
crash can leave a blob without a name (listed with no names, removable by id) but never a
name without its blob.

Image names (the CRI ``image`` string) are URLs without a scheme, e.g.
``download.example.org:8080/images/guest.qcow2``, optionally followed by ``@sha256:<64 hex>``,
which is kept and verified against the downloaded bytes. Tags are ignored; the rule for telling
a tag from a colon in a file name is in :func:`parse_image_name`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import hashlib
import http.client
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    RuntimeError_,
    Unavailable,
)
from .fsutil import fsync_dir
from .image_translations import ImageTranslator

log = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20
PROGRESS_INTERVAL = 0.5
MAX_NAME_LENGTH = 2048
ACCEPTED_FORMATS = ("qcow2", "raw")
QEMU_IMG_TIMEOUT = 120.0

_HEX64 = re.compile(r"[0-9a-f]{64}")
_ID_RE = re.compile(r"sha256:([0-9a-fA-F]{64})")
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_FILE_EXT_RE = re.compile(r"\.[A-Za-z][A-Za-z0-9]*$")
_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_FORBIDDEN_CHARS = frozenset('"<>\\^`{|}#?')
_PATH_CHARS = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:%/"
)
_TMP_PREFIX = ".tmp-"

Progress = Callable[[int, int | None], None]


@dataclass(frozen=True)
class ImageRecord:
    """One stored image: its content id and every name that points at it."""

    id: str  # "sha256:<hex>"
    digest: str  # "<hex>"
    names: list[str]  # sorted; empty for content no name points at any more
    size: int  # bytes of the blob file
    virtual_size: int  # disk size the guest sees
    path: Path  # the blob
    format: str = "qcow2"  # "qcow2" or "raw": the backing format an overlay must name


@dataclass(frozen=True)
class ImageName:
    """A parsed image name: ``name`` is the canonical form (no tag, no digest)."""

    name: str
    digest: str | None  # lower-case hex from "@sha256:", if any
    scheme: str | None  # an explicit "scheme://" the name started with, lower-case
    location: str  # the name without the scheme: "host[:port]/path"


def _show(name: str) -> str:
    return repr(name if len(name) <= 120 else name[:117] + "...")


def parse_image_name(raw: str) -> ImageName:
    """Check the characters of an image name and split off its digest and tag.

    The tag rule: when the last path segment contains ``:``, the text after the last ``:`` is a
    tag, and dropped, if it is a valid Docker tag (``[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}``) that
    does not end like a file extension (a dot followed by a letter and letters/digits). So
    ``guest.qcow2:latest`` and ``guest.qcow2:1.0`` lose their tag, while in ``guest:v2.qcow2``
    the colon is part of the file name and stays in the URL.

    Raises InvalidArgument. The host part is checked by :func:`check_location`.
    """
    if not isinstance(raw, str) or not raw:
        raise InvalidArgument("image name is empty")
    if len(raw) > MAX_NAME_LENGTH:
        raise InvalidArgument(
            f"image name {_show(raw)} is {len(raw)} characters long; at most "
            f"{MAX_NAME_LENGTH} are allowed"
        )
    for ch in raw:
        if not ("\x21" <= ch <= "\x7e"):
            raise InvalidArgument(
                f"image name {_show(raw)} contains {ch!r}: whitespace, control and non-ASCII "
                "characters are not allowed (percent-encode them)"
            )
        if ch in _FORBIDDEN_CHARS:
            raise InvalidArgument(
                f"image name {_show(raw)} contains {ch!r}, which is not allowed "
                "(no query strings or fragments; use an image translation for such URLs)"
            )
    if _BAD_PERCENT.search(raw):
        raise InvalidArgument(f"image name {_show(raw)} has a '%' not followed by two hex digits")
    body, digest = raw, None
    if "@" in raw:
        body, _, suffix = raw.rpartition("@")
        m = _ID_RE.fullmatch(suffix)
        if m is None:
            raise InvalidArgument(
                f"image name {_show(raw)}: only '@sha256:<64 hex digits>' may follow '@' "
                "(user info in image names is not supported)"
            )
        digest = m.group(1).lower()
        if "@" in body:
            raise InvalidArgument(
                f"image name {_show(raw)}: '@' is only allowed before a sha256 digest "
                "(user info in image names is not supported)"
            )
    scheme = None
    location = body
    if "://" in body:
        scheme, _, location = body.partition("://")
        if not _SCHEME_RE.fullmatch(scheme):
            raise InvalidArgument(f"image name {_show(raw)} has a malformed scheme {scheme!r}")
        scheme = scheme.lower()
    head, slash, last = location.rpartition("/")
    if ":" in last:
        base, _, tag = last.rpartition(":")
        if base and _TAG_RE.fullmatch(tag) and not _FILE_EXT_RE.search(tag):
            location = head + slash + base
    if not location:
        raise InvalidArgument(f"image name {_show(raw)} names no image")
    name = f"{scheme}://{location}" if scheme else location
    return ImageName(name=name, digest=digest, scheme=scheme, location=location)


def _check_host(authority: str, raw: str) -> None:
    if not authority:
        raise InvalidArgument(f"image name {_show(raw)} has no host")
    if authority.startswith("["):
        end = authority.find("]")
        host, rest = authority[1:end], authority[end + 1 :]
        try:
            if end < 0 or "%" in host:
                raise ValueError("malformed")
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidArgument(
                f"image name {_show(raw)} has a malformed IPv6 host [{host}]"
            ) from None
        if rest and not rest.startswith(":"):
            raise InvalidArgument(f"image name {_show(raw)}: junk after the IPv6 host")
        port = rest[1:] if rest else None
    else:
        host, colon, port_s = authority.partition(":")
        port = port_s if colon else None
        labels = host.split(".")
        if len(host) > 253 or not all(_LABEL_RE.fullmatch(label) for label in labels):
            raise InvalidArgument(
                f"image name {_show(raw)}: {host!r} is not a valid host name or IPv4 address"
            )
        if labels[-1].isdigit():
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise InvalidArgument(
                    f"image name {_show(raw)}: {host!r} is not a valid IPv4 address"
                ) from None
    if port is not None and not (
        port.isascii() and port.isdigit() and len(port) <= 5 and 0 < int(port) < 65536
    ):
        raise InvalidArgument(f"image name {_show(raw)} has an invalid port {port!r}")


def check_location(ref: ImageName, raw: str) -> None:
    """Strict check of ``host[:port]/path`` (or ``/path`` for file://); InvalidArgument if bad."""
    authority, slash, path = ref.location.partition("/")
    if ref.scheme == "file":
        if authority not in ("", "localhost"):
            raise InvalidArgument(f"image name {_show(raw)}: a file:// URL names no host")
    else:
        _check_host(authority, raw)
    if not slash or not path:
        raise InvalidArgument(f"image name {_show(raw)} has no path after the host")
    bad = sorted(set(path) - _PATH_CHARS)
    if bad:
        raise InvalidArgument(f"image name {_show(raw)}: characters {bad} are not allowed")
    for segment in path.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidArgument(
                f"image name {_show(raw)}: empty, '.' and '..' path segments are not allowed"
            )


def _redact(url: str) -> str:
    """The URL for logs and messages: without a query, which may carry a token."""
    parts = urllib.parse.urlsplit(url)
    if parts.query or parts.fragment:
        return urllib.parse.urlunsplit(parts._replace(query="...", fragment=""))
    return url


def _local_error(exc: OSError, what: str) -> RuntimeError_:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(f"no space left for {what}: {exc.strerror}")
    return Internal(f"{what} failed: {exc}")


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
                f"{_redact(req.full_url)} redirects to a {scheme or 'relative'} URL; refused"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


@dataclass
class _NameEntry:
    name: str
    digest: str
    url: str
    pulled_at: str


@dataclass
class _Blob:
    size: int
    virtual_size: int
    format: str


@dataclass
class _InFlight:
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    digest: str | None = None
    error: BaseException | None = None
    waiters: int = 0


class ImageStore:
    """Pulls, lists and removes VM disk images; the state lives on disk under ``root``.

    Thread-safe. Status and list answer from memory; the disk is read once on open.
    """

    def __init__(
        self,
        root: Path,
        *,
        download_protocol: str = "https",
        allowed_schemes: frozenset[str] = frozenset({"https", "http"}),
        translations: ImageTranslator | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.root = Path(root)
        self.allowed_schemes = frozenset(s.lower() for s in allowed_schemes)
        self.download_protocol = download_protocol.lower()
        if self.download_protocol not in self.allowed_schemes:
            raise InvalidArgument(
                f"download protocol {download_protocol!r} is not among the allowed schemes "
                f"{sorted(self.allowed_schemes)}"
            )
        if timeout <= 0:
            raise InvalidArgument(f"image download timeout must be positive, not {timeout}")
        self.translations = translations
        self.timeout = timeout
        self._blob_dir = self.root / "blobs" / "sha256"
        self._name_dir = self.root / "names"
        self._tmp_dir = self.root / "tmp"
        self._lock = threading.RLock()
        self._inflight_lock = threading.Lock()
        self._inflight: dict[tuple[str, str | None], _InFlight] = {}
        self._names: dict[str, _NameEntry] = {}
        self._blobs: dict[str, _Blob] = {}
        self._opener = urllib.request.build_opener(_RedirectGuard(self.allowed_schemes))
        for d in (self._blob_dir, self._name_dir, self._tmp_dir):
            d.mkdir(mode=0o755, parents=True, exist_ok=True)
        self._lock_file: IO[bytes] | None = open(self.root / ".lock", "ab")  # noqa: SIM115
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            self._lock_file = None
            raise FailedPrecondition(
                f"image store {self.root} is in use by another process or store object"
            ) from None
        try:
            self._recover()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the store's lock on ``root``; the object must not be used afterwards."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def __enter__(self) -> ImageStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- startup ---------------------------------------------------------------------

    def _recover(self) -> None:
        removed = 0
        for entry in self._tmp_dir.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed += 1
        for d in (self._blob_dir, self._name_dir):
            for entry in d.iterdir():
                if entry.name.startswith(_TMP_PREFIX):
                    entry.unlink()
                    removed += 1
        if removed:
            log.info("image store %s: removed %d leftover temporary file(s)", self.root, removed)
        sizes: dict[str, int] = {}
        for entry in self._blob_dir.iterdir():
            if _HEX64.fullmatch(entry.name) and entry.is_file():
                sizes[entry.name] = entry.stat().st_size
            else:
                log.warning("image store: ignoring unexpected file %s", entry)
        for path in sorted(self._name_dir.glob("*.json")):
            try:
                data = json.loads(path.read_bytes())
                name, digest = data["name"], data["digest"]
                if not (isinstance(name, str) and isinstance(digest, str)):
                    raise ValueError("name and digest must be strings")
                if path.name != hashlib.sha256(name.encode()).hexdigest() + ".json":
                    raise ValueError(f"the file name does not match the name {name!r}")
                if digest not in sizes:
                    raise ValueError(f"its blob sha256:{digest} is missing")
                entry_ = _NameEntry(
                    name, digest, str(data.get("url", "")), str(data.get("pulled_at", ""))
                )
                blob = _Blob(sizes[digest], int(data["virtual_size"]), str(data["format"]))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("image store: dropping unusable name record %s: %s", path, exc)
                path.unlink(missing_ok=True)
                continue
            self._names[name] = entry_
            self._blobs.setdefault(digest, blob)
        for digest, size in sizes.items():
            if digest not in self._blobs:
                try:
                    fmt, vsize = self._inspect(self._blob_dir / digest, f"sha256:{digest}")
                except RuntimeError_ as exc:
                    log.warning("image store: blob sha256:%s: %s", digest, exc.message)
                    fmt, vsize = "", 0
                self._blobs[digest] = _Blob(size, vsize, fmt)
        log.info(
            "image store %s: %d image(s), %d name(s)",
            self.root,
            len(self._blobs),
            len(self._names),
        )

    # ---- queries ---------------------------------------------------------------------

    def _lookup(self, name_or_id: str) -> tuple[str | None, ImageName | None]:
        m = _ID_RE.fullmatch(name_or_id) if isinstance(name_or_id, str) else None
        if m:
            return m.group(1).lower(), None
        return None, parse_image_name(name_or_id)

    def _record(self, digest: str, names: list[str] | None = None) -> ImageRecord:
        blob = self._blobs[digest]
        if names is None:
            names = [n for n, e in self._names.items() if e.digest == digest]
        return ImageRecord(
            id=f"sha256:{digest}",
            digest=digest,
            names=sorted(names),
            size=blob.size,
            virtual_size=blob.virtual_size,
            path=self._blob_dir / digest,
            format=blob.format,
        )

    def status(self, name_or_id: str) -> ImageRecord | None:
        """The image for a name, ``sha256:<hex>`` id or ``name@sha256:<hex>``; None if absent.

        A malformed name raises InvalidArgument.
        """
        digest, ref = self._lookup(name_or_id)
        with self._lock:
            if ref is not None:
                entry = self._names.get(ref.name)
                if entry is None or (ref.digest is not None and ref.digest != entry.digest):
                    return None
                digest = entry.digest
            assert digest is not None
            return self._record(digest) if digest in self._blobs else None

    def list(self) -> list[ImageRecord]:
        """One record per stored blob, sorted by id; names are all names pointing at it."""
        with self._lock:
            by_digest: dict[str, list[str]] = {d: [] for d in self._blobs}
            for n, e in self._names.items():
                by_digest[e.digest].append(n)
            return [self._record(d, names) for d, names in sorted(by_digest.items())]

    def blob_path(self, digest: str) -> Path:
        """The blob file of ``digest`` (hex or ``sha256:<hex>``); NotFound if not stored."""
        hexd = digest[7:] if digest.startswith("sha256:") else digest
        hexd = hexd.lower()
        if not _HEX64.fullmatch(hexd):
            raise InvalidArgument(f"{digest!r} is not a sha256 digest")
        with self._lock:
            if hexd not in self._blobs:
                raise NotFound(f"image sha256:{hexd} is not stored")
        return self._blob_dir / hexd

    def fs_usage(self) -> tuple[int, int]:
        """(bytes, inodes) the store uses on its filesystem, for ImageFsInfo."""
        used, inodes = 0, 0
        for dirpath, _dirnames, filenames in os.walk(self.root):
            for path in [dirpath, *(os.path.join(dirpath, f) for f in filenames)]:
                try:
                    st = os.lstat(path)
                except FileNotFoundError:  # a temp file that just went away
                    continue
                used += st.st_blocks * 512
                inodes += 1
        return used, inodes

    # ---- pull ------------------------------------------------------------------------

    def _url_for(self, ref: ImageName, raw: str) -> str:
        url = self.translations.translate(ref.name) if self.translations else None
        if url is not None:
            parts = urllib.parse.urlsplit(url)
            scheme = parts.scheme.lower()
            if scheme not in self.allowed_schemes:
                raise InvalidArgument(
                    f"image {_show(raw)} translates to a {scheme or 'schemeless'} URL; allowed "
                    f"schemes are {sorted(self.allowed_schemes)}"
                )
            if "@" in parts.netloc or any(not ("\x21" <= c <= "\x7e") for c in url):
                raise InvalidArgument(
                    f"image {_show(raw)} translates to a URL with user info or bad characters"
                )
            if scheme != "file" and not parts.hostname:
                raise InvalidArgument(f"image {_show(raw)} translates to a URL with no host")
            # The name fills the rule's groups: it must not climb out of the rule's path.
            segments = urllib.parse.unquote(parts.path).split("/")
            if any(seg in (".", "..") for seg in segments):
                raise InvalidArgument(
                    f"image {_show(raw)} translates to a URL with '.' or '..' path segments"
                )
            return url
        if ref.scheme is not None and ref.scheme not in self.allowed_schemes:
            raise InvalidArgument(
                f"image name {_show(raw)}: scheme {ref.scheme!r} is not allowed (allowed: "
                f"{sorted(self.allowed_schemes)}); image names are URLs without a scheme"
            )
        check_location(ref, raw)
        return f"{ref.scheme or self.download_protocol}://{ref.location}"

    def pull(
        self, name: str, cancel: threading.Event | None = None, progress: Progress | None = None
    ) -> ImageRecord:
        """Download ``name`` (unless its ``@sha256:`` content is already stored) and name it.

        Raises InvalidArgument, NotFound, Unavailable, DeadlineExceeded, ResourceExhausted,
        Cancelled; on any failure the store is unchanged. ``progress(done, total)`` is called
        at most every 0.5 s and once at the end; ``total`` is None without a Content-Length.
        """
        ref = parse_image_name(name)
        url = self._url_for(ref, name)
        shown = _redact(url)
        key = (url, ref.digest)
        while True:
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"pull of image {ref.name} cancelled")
            if ref.digest is not None:
                record = self._commit_name(ref.name, url, ref.digest)
                if record is not None:
                    log.info("image %s: content sha256:%s already stored", ref.name, ref.digest)
                    return record
            with self._inflight_lock:
                flight = self._inflight.get(key)
                leader = flight is None
                if flight is None:
                    flight = self._inflight[key] = _InFlight()
                else:
                    flight.waiters += 1
            if leader:
                return self._lead(flight, key, ref, url, cancel, progress)
            log.info(
                "image %s: waiting for the download of %s already in progress", ref.name, shown
            )
            while not flight.done.wait(0.1):
                if cancel is not None and cancel.is_set():
                    raise Cancelled(f"pull of image {ref.name} cancelled")
            err = flight.error
            if isinstance(err, Cancelled):
                log.info(
                    "image %s: the download this pull waited for was cancelled; retrying", ref.name
                )
                continue
            if isinstance(err, RuntimeError_):
                raise type(err)(err.message, **err.context)
            if err is not None:
                raise Internal(f"pulling image {ref.name} failed: {err!r}") from err
            assert flight.digest is not None
            record = self._commit_name(ref.name, url, flight.digest)
            if record is not None:
                return record
            log.info("image %s: content removed before this pull named it; retrying", ref.name)

    def _lead(
        self,
        flight: _InFlight,
        key: tuple[str, str | None],
        ref: ImageName,
        url: str,
        cancel: threading.Event | None,
        progress: Progress | None,
    ) -> ImageRecord:
        try:
            tmp, blob, digest = self._fetch(ref, url, cancel, progress)
            record = self._install(tmp, blob, digest, ref.name, url)
            flight.digest = digest
            return record
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._inflight_lock:
                del self._inflight[key]
            flight.done.set()

    def _fetch(
        self,
        ref: ImageName,
        url: str,
        cancel: threading.Event | None,
        progress: Progress | None,
    ) -> tuple[Path, _Blob, str]:
        try:
            fd, tmp_name = tempfile.mkstemp(dir=self._tmp_dir, prefix="pull-", suffix=".part")
        except OSError as exc:
            raise _local_error(exc, f"image {ref.name}") from exc
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                digest, size = self._stream(ref.name, url, out, cancel, progress)
                try:
                    out.flush()
                    os.fsync(out.fileno())
                except OSError as exc:
                    raise _local_error(exc, f"image {ref.name}") from exc
            if ref.digest is not None and digest != ref.digest:
                raise InvalidArgument(
                    f"image {ref.name}: digest mismatch: the name asks for sha256:{ref.digest}, "
                    f"{_redact(url)} served sha256:{digest}"
                )
            fmt, vsize = self._inspect(tmp, ref.name)
            return tmp, _Blob(size, vsize, fmt), digest
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _stream(
        self,
        name: str,
        url: str,
        out: IO[bytes],
        cancel: threading.Event | None,
        progress: Progress | None,
    ) -> tuple[str, int]:
        shown = _redact(url)
        log.info("image %s: downloading %s", name, shown)
        req = urllib.request.Request(url, headers={"User-Agent": "arktos-vm-runtime"})
        try:
            resp = self._opener.open(req, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code in (404, 410):
                raise NotFound(f"image {name} not found at {shown}") from None
            raise Unavailable(
                f"pulling image {name}: {shown} answered {exc.code} {exc.reason}"
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            raise _network_error(exc, name, shown) from exc
        with resp:
            total: int | None = None
            length = resp.headers.get("Content-Length") if resp.headers else None
            if length is not None and length.strip().isdigit():
                total = int(length)
            hasher = hashlib.sha256()
            done = 0
            start = last = time.monotonic()
            while True:
                if cancel is not None and cancel.is_set():
                    log.info("image %s: download cancelled after %d bytes", name, done)
                    raise Cancelled(f"pull of image {name} cancelled")
                try:
                    chunk = resp.read1(CHUNK_SIZE)
                except (OSError, http.client.HTTPException) as exc:
                    raise _network_error(exc, name, shown) from exc
                if not chunk:
                    break
                hasher.update(chunk)
                try:
                    out.write(chunk)
                except OSError as exc:
                    raise _local_error(exc, f"image {name}") from exc
                done += len(chunk)
                now = time.monotonic()
                if now - last >= PROGRESS_INTERVAL:
                    last = now
                    log.debug("image %s: %d of %s bytes", name, done, total)
                    if progress is not None:
                        progress(done, total)
        if total is not None and done != total:
            raise Unavailable(
                f"pulling image {name}: {shown} sent {done} bytes but announced {total}"
            )
        if progress is not None:
            progress(done, total)
        log.info("image %s: %d bytes in %.1f s", name, done, time.monotonic() - start)
        return hasher.hexdigest(), done

    def _inspect(self, path: Path, name: str) -> tuple[str, int]:
        """(format, virtual size) of a file that must be a qcow2 or raw disk image."""
        argv = ["qemu-img", "info", "--output=json", str(path)]
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT, check=False
            )
        except FileNotFoundError:
            raise Unavailable("qemu-img is not installed; cannot check images") from None
        except subprocess.TimeoutExpired:
            raise DeadlineExceeded(f"qemu-img info on image {name} did not finish") from None
        if proc.returncode != 0:
            why = (proc.stderr.strip().splitlines() or ["qemu-img info failed"])[-1]
            raise InvalidArgument(f"image {name} is not a disk image: {why}")
        try:
            info = json.loads(proc.stdout)
            fmt, vsize = info["format"], int(info["virtual-size"])
        except (ValueError, KeyError, TypeError):
            raise InvalidArgument(
                f"image {name} is not a disk image: qemu-img info gave no format and size"
            ) from None
        if fmt not in ACCEPTED_FORMATS:
            raise InvalidArgument(
                f"image {name} is not a disk image this runtime accepts: format {fmt!r} "
                f"(accepted: {', '.join(ACCEPTED_FORMATS)})"
            )
        specific = (info.get("format-specific") or {}).get("data") or {}
        if "backing-filename" in info or "full-backing-filename" in info:
            raise InvalidArgument(f"image {name} is not a disk image to use: it has a backing file")
        if "data-file" in specific or info.get("encrypted"):
            raise InvalidArgument(
                f"image {name} is not a disk image to use: external data file or encryption"
            )
        if fmt == "raw":
            size = path.stat().st_size
            if size == 0 or size % 512:
                raise InvalidArgument(
                    f"image {name} is not a disk image: {size} bytes of raw data "
                    "(a raw disk is a non-zero multiple of 512 bytes)"
                )
        if vsize <= 0:
            raise InvalidArgument(f"image {name} is not a disk image: virtual size {vsize}")
        return fmt, vsize

    # ---- writes (all under self._lock) ------------------------------------------------

    def _install(self, tmp: Path, blob: _Blob, digest: str, name: str, url: str) -> ImageRecord:
        with self._lock:
            dst = self._blob_dir / digest
            placed = False
            try:
                if digest in self._blobs and dst.exists():
                    tmp.unlink()
                else:
                    try:
                        os.chmod(tmp, 0o644)
                        os.rename(tmp, dst)
                        placed = True
                        fsync_dir(self._blob_dir)
                    except OSError as exc:
                        raise _local_error(exc, f"storing image {name}") from exc
                    self._blobs[digest] = blob
                record = self._commit_name(name, url, digest)
                assert record is not None
                return record
            except BaseException:
                tmp.unlink(missing_ok=True)
                if placed and not any(e.digest == digest for e in self._names.values()):
                    self._blobs.pop(digest, None)
                    dst.unlink(missing_ok=True)
                raise

    def _commit_name(self, name: str, url: str, digest: str) -> ImageRecord | None:
        """Point ``name`` at stored content; None if that content is not (any more) stored."""
        with self._lock:
            blob = self._blobs.get(digest)
            if blob is None or not (self._blob_dir / digest).exists():
                return None
            pulled_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
            entry = _NameEntry(name, digest, url, pulled_at)
            data = {
                "name": name,
                "digest": digest,
                "size": blob.size,
                "virtual_size": blob.virtual_size,
                "format": blob.format,
                "url": url,
                "pulled_at": pulled_at,
            }
            self._write_atomic(
                self._name_file(name), json.dumps(data, indent=2, sort_keys=True).encode()
            )
            old = self._names.get(name)
            self._names[name] = entry
            if old is not None and old.digest != digest:
                log.info(
                    "image %s now points at sha256:%s instead of sha256:%s",
                    name,
                    digest,
                    old.digest,
                )
            return self._record(digest)

    def _name_file(self, name: str) -> Path:
        return self._name_dir / (hashlib.sha256(name.encode()).hexdigest() + ".json")

    def _write_atomic(self, path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_TMP_PREFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data + b"\n")
                f.flush()
                os.fchmod(f.fileno(), 0o644)
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise _local_error(exc, f"writing {path.name}") from exc

    # ---- remove ----------------------------------------------------------------------

    def remove(self, name_or_id: str, in_use: Callable[[str], bool]) -> None:
        """Drop a name (or, for an id, every name of it) and then the blob if unused.

        The blob goes only when no name points at it and ``in_use(hex digest)`` is False (an
        overlay of a VM may still use it). Removing something absent succeeds.
        """
        digest, ref = self._lookup(name_or_id)
        with self._lock:
            if ref is not None:
                entry = self._names.get(ref.name)
                if entry is None or (ref.digest is not None and ref.digest != entry.digest):
                    log.debug("remove image %s: not present", ref.name)
                    return
                digest, names = entry.digest, [ref.name]
            else:
                names = [n for n, e in self._names.items() if e.digest == digest]
            assert digest is not None
            for n in names:
                self._drop_name(n)
            if digest not in self._blobs or any(e.digest == digest for e in self._names.values()):
                return
        if in_use(digest):
            log.info("image sha256:%s has no name left but is in use; blob kept", digest)
            return
        with self._lock:
            if digest in self._blobs and not any(e.digest == digest for e in self._names.values()):
                self._drop_blob(digest)

    def _drop_name(self, name: str) -> None:
        try:
            self._name_file(name).unlink(missing_ok=True)
            fsync_dir(self._name_dir)
        except OSError as exc:
            raise _local_error(exc, f"removing image name {name}") from exc
        del self._names[name]
        log.info("image name %s removed", name)

    def _drop_blob(self, digest: str) -> None:
        try:
            (self._blob_dir / digest).unlink(missing_ok=True)
            fsync_dir(self._blob_dir)
        except OSError as exc:
            raise _local_error(exc, f"removing image sha256:{digest}") from exc
        del self._blobs[digest]
        log.info("image sha256:%s removed", digest)
