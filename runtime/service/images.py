"""The image service: pulls, lists and removes the VM disk images that names point at.

Which names point at which content is a record in the state store (table ``image_names``:
id = the canonical name, column ``digest``, data with url, pulled_at, virtual_size and
format); the content is a blob file of adapters/image_blobs.py. A blob is placed before
its name record is written and a name record is deleted before its blob, so a crash can
leave a blob without a name (listed with no names, removable by id) but never a name
without its blob.

Status and List answer from memory: one immutable value, replaced whole under a lock that
is never held over I/O. Changes (store writes, blob files) are serialised by a second lock;
downloads hold neither. Concurrent pulls of the same URL share one download.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapters import qemu_img
from ..adapters.image_blobs import BlobStore
from ..adapters.image_fetch import Fetcher, Progress, redact
from ..adapters.pull_watch import PullLimits
from ..checks import shown
from ..errors import Cancelled, InvalidArgument, NotFound, RuntimeError_
from .image_names import ImageName, Translator, parse_id, parse_image_name, url_for
from .image_pulls import SharedDownloads
from .store import Store

log = logging.getLogger(__name__)

TABLE = "image_names"


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
class _Blob:
    size: int
    virtual_size: int
    format: str


@dataclass(frozen=True)
class _Name:
    name: str
    digest: str
    url: str
    pulled_at: str

    def data(self, blob: _Blob) -> dict[str, Any]:
        return {"name": self.name, "digest": self.digest, "url": self.url,
                "pulled_at": self.pulled_at, "virtual_size": blob.virtual_size,
                "format": blob.format}


@dataclass(frozen=True)
class _Memory:
    """Every name and blob, as one value that is replaced, never changed."""

    names: Mapping[str, _Name] = dataclasses.field(default_factory=dict)
    blobs: Mapping[str, _Blob] = dataclasses.field(default_factory=dict)

    def names_of(self, digest: str) -> list[str]:
        return sorted(n for n, e in self.names.items() if e.digest == digest)

    def with_name(self, entry: _Name, blob: _Blob) -> _Memory:
        return _Memory({**self.names, entry.name: entry}, {**self.blobs, entry.digest: blob})

    def without_name(self, name: str) -> _Memory:
        return _Memory({n: e for n, e in self.names.items() if n != name}, self.blobs)

    def without_blob(self, digest: str) -> _Memory:
        return _Memory(self.names, {d: b for d, b in self.blobs.items() if d != digest})


def _check_cancel(cancel: threading.Event | None, name: str) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"pull of image {name} cancelled")


def _lookup(name_or_id: str) -> tuple[str | None, ImageName | None]:
    digest = parse_id(name_or_id)
    return (digest, None) if digest is not None else (None, parse_image_name(name_or_id))


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


class ImageStore:
    """Pulls, lists and removes VM disk images: blobs under ``root``, names in ``store``.

    Thread-safe. Status and list answer from memory; the disk is read once on open.
    """

    def __init__(self, root: Path, store: Store, *, download_protocol: str = "https",
                 allowed_schemes: frozenset[str] = frozenset({"https", "http"}),
                 translations: Translator | None = None, timeout: float = 60.0,
                 limits: PullLimits | None = None) -> None:
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
        self._store = store
        self._fetcher = Fetcher(self.allowed_schemes, timeout, limits)
        self._lock = threading.Lock()  # guards the swap of self._memory; never held over I/O
        self._write_lock = threading.Lock()  # serialises changes of names and blobs
        self._downloads: SharedDownloads[ImageRecord] = SharedDownloads()
        self._blobs = BlobStore(self.root)
        try:
            self._memory = self._load()
        except BaseException:
            self._blobs.close()
            raise

    def close(self) -> None:
        """Release the blob store's lock on ``root``; the object must not be used afterwards."""
        self._blobs.close()

    def __enter__(self) -> ImageStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- startup ---------------------------------------------------------------------

    def _load(self) -> _Memory:
        sizes = self._blobs.scan()
        names: dict[str, _Name] = {}
        blobs: dict[str, _Blob] = {}
        for data in self._store.all(TABLE):
            usable = self._usable(data, sizes)
            if usable is not None:
                entry, blob = usable
                names[entry.name] = entry
                blobs.setdefault(entry.digest, blob)
        for digest, size in sizes.items():
            if digest not in blobs:
                blobs[digest] = self._inspect_orphan(digest, size)
        log.info("image store %s: %d image(s), %d name(s)", self.root, len(blobs), len(names))
        return _Memory(names, blobs)

    def _usable(self, data: Any, sizes: Mapping[str, int]) -> tuple[_Name, _Blob] | None:
        """The name record and its blob's facts; an unusable record is deleted (or, without
        a name to delete it by, left for an operator)."""
        name = data.get("name") if isinstance(data, dict) else None
        try:
            digest = data["digest"]
            if not (isinstance(name, str) and isinstance(digest, str)):
                raise ValueError("name and digest must be strings")
            if digest not in sizes:
                raise ValueError(f"its blob sha256:{digest} is missing")
            entry = _Name(name, digest, str(data.get("url", "")), str(data.get("pulled_at", "")))
            return entry, _Blob(sizes[digest], int(data["virtual_size"]), str(data["format"]))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("image store: dropping unusable name record %s: %s", shown(name), exc)
        if isinstance(name, str):
            self._store.delete(TABLE, name)
        return None

    def _inspect_orphan(self, digest: str, size: int) -> _Blob:
        """Facts of a blob no name record describes (a crash came between the two)."""
        try:
            info = qemu_img.info(self._blobs.path(digest), f"sha256:{digest}")
        except RuntimeError_ as exc:
            log.warning("image store: blob sha256:%s: %s", digest, exc.message)
            return _Blob(size, 0, "")
        return _Blob(size, info.virtual_size, info.format)

    # ---- queries ---------------------------------------------------------------------

    def _snapshot(self) -> _Memory:
        with self._lock:
            return self._memory

    def _swap(self, memory: _Memory) -> None:
        with self._lock:
            self._memory = memory

    def _record(self, mem: _Memory, digest: str, names: list[str] | None = None) -> ImageRecord:
        blob = mem.blobs[digest]
        return ImageRecord(
            id=f"sha256:{digest}", digest=digest,
            names=sorted(mem.names_of(digest) if names is None else names), size=blob.size,
            virtual_size=blob.virtual_size, path=self._blobs.path(digest), format=blob.format)

    def status(self, name_or_id: str) -> ImageRecord | None:
        """The image for a name, ``sha256:<hex>`` id or ``name@sha256:<hex>``; None if absent.

        A malformed name raises InvalidArgument.
        """
        digest, ref = _lookup(name_or_id)
        mem = self._snapshot()
        if ref is not None:
            entry = mem.names.get(ref.name)
            if entry is None or (ref.digest is not None and ref.digest != entry.digest):
                return None
            digest = entry.digest
        assert digest is not None
        return self._record(mem, digest) if digest in mem.blobs else None

    def still_stored(self, image_id: str) -> bool:
        """Whether ``image_id``'s content is stored, in order with remove(): who pinned it
        first (a container record) learns it is gone or keeps it while pinned."""
        with self._write_lock:
            return self.status(image_id) is not None

    def list(self) -> list[ImageRecord]:
        """One record per stored blob, sorted by id; names are all names pointing at it."""
        mem = self._snapshot()
        by_digest: dict[str, list[str]] = {d: [] for d in mem.blobs}
        for n, e in mem.names.items():
            by_digest[e.digest].append(n)
        return [self._record(mem, d, names) for d, names in sorted(by_digest.items())]

    def blob_path(self, digest: str) -> Path:
        """The blob file of ``digest`` (hex or ``sha256:<hex>``); NotFound if not stored."""
        hexd = parse_id(digest if digest.startswith("sha256:") else "sha256:" + digest)
        if hexd is None:
            raise InvalidArgument(f"{digest!r} is not a sha256 digest")
        if hexd not in self._snapshot().blobs:
            raise NotFound(f"image sha256:{hexd} is not stored")
        return self._blobs.path(hexd)

    def fs_usage(self) -> tuple[int, int]:
        """(bytes, inodes) the store uses on its filesystem, for ImageFsInfo."""
        return self._blobs.fs_usage()

    # ---- pull ------------------------------------------------------------------------

    def pull(self, name: str, cancel: threading.Event | None = None,
             progress: Progress | None = None) -> ImageRecord:
        """Download ``name`` (unless its ``@sha256:`` content is already stored) and name it.

        Raises InvalidArgument, NotFound, Unavailable, DeadlineExceeded, ResourceExhausted,
        Cancelled; on any failure the store is unchanged. ``progress(done, total)`` is called
        at most every 0.5 s and once at the end; ``total`` is None without a Content-Length.
        """
        ref = parse_image_name(name)
        url = url_for(ref, name, allowed_schemes=self.allowed_schemes,
                      download_protocol=self.download_protocol, translations=self.translations)
        while True:
            record = self._pull_once(ref, url, cancel, progress)
            if record is not None:
                return record

    def _pull_once(self, ref: ImageName, url: str, cancel: threading.Event | None,
                   progress: Progress | None) -> ImageRecord | None:
        """One attempt; None when the pull must start over."""
        _check_cancel(cancel, ref.name)
        if ref.digest is not None:
            record = self._commit_name(ref.name, url, ref.digest)
            if record is not None:
                log.info("image %s: content sha256:%s already stored", ref.name, ref.digest)
                return record

        def lead() -> ImageRecord:
            tmp, digest, blob = self._download(ref, url, cancel, progress)
            return self._install(tmp, digest, blob, ref.name, url)

        shared = self._downloads.run((url, ref.digest), lead, name=ref.name,
                                     source=redact(url), cancel=cancel)
        if shared is None:
            return None
        record, led = shared
        if led:
            return record
        named = self._commit_name(ref.name, url, record.digest)
        if named is None:
            log.info("image %s: content removed before this pull named it; retrying", ref.name)
        return named

    def _download(self, ref: ImageName, url: str, cancel: threading.Event | None,
                  progress: Progress | None) -> tuple[Path, str, _Blob]:
        """A checked temp file: (its path, its sha256, its facts)."""
        tmp, got = self._blobs.write_temp(
            f"image {ref.name}",
            lambda out: self._fetcher.fetch(url, out, name=ref.name, cancel=cancel,
                                            progress=progress))
        try:
            if ref.digest is not None and got.digest != ref.digest:
                raise InvalidArgument(
                    f"image {ref.name}: digest mismatch: the name asks for sha256:{ref.digest}, "
                    f"{redact(url)} served sha256:{got.digest}"
                )
            info = qemu_img.info(tmp, ref.name)
        except BaseException:
            self._blobs.discard(tmp)
            raise
        return tmp, got.digest, _Blob(got.size, info.virtual_size, info.format)

    # ---- changes (each under self._write_lock) ----------------------------------------

    def _install(self, tmp: Path, digest: str, blob: _Blob, name: str, url: str) -> ImageRecord:
        with self._write_lock:
            mem = self._snapshot()
            reuse = digest in mem.blobs and self._blobs.has(digest)
            try:
                if reuse:
                    self._blobs.discard(tmp)
                else:
                    self._blobs.place(tmp, digest, f"storing image {name}")
                record = self._name_locked(name, url, digest, None if reuse else blob)
            except BaseException:
                self._blobs.discard(tmp)
                if not reuse and not mem.names_of(digest):
                    with contextlib.suppress(RuntimeError_):
                        self._blobs.remove(digest)
                raise
        assert record is not None
        return record

    def _commit_name(self, name: str, url: str, digest: str) -> ImageRecord | None:
        """Point ``name`` at stored content; None if that content is not (any more) stored."""
        with self._write_lock:
            return self._name_locked(name, url, digest)

    def _name_locked(self, name: str, url: str, digest: str,
                     new_blob: _Blob | None = None) -> ImageRecord | None:
        mem = self._snapshot()
        blob = new_blob or mem.blobs.get(digest)
        if blob is None or not self._blobs.has(digest):
            return None
        entry = _Name(name, digest, url, _now())
        self._store.put(TABLE, name, entry.data(blob), digest=digest)
        new = mem.with_name(entry, blob)
        self._swap(new)
        old = mem.names.get(name)
        if old is not None and old.digest != digest:
            log.info("image %s now points at sha256:%s instead of sha256:%s",
                     name, digest, old.digest)
        return self._record(new, digest)

    def remove(self, name_or_id: str, in_use: Callable[[str], bool]) -> None:
        """Drop a name (or, for an id, every name of it) and then the blob if unused.

        The blob goes only when no name points at it and ``in_use(hex digest)`` is False (an
        overlay of a VM may still use it). Removing something absent succeeds.
        """
        digest, ref = _lookup(name_or_id)
        with self._write_lock:
            mem = self._snapshot()
            if ref is not None:
                entry = mem.names.get(ref.name)
                if entry is None or (ref.digest is not None and ref.digest != entry.digest):
                    log.debug("remove image %s: not present", ref.name)
                    return
                digest, names = entry.digest, [ref.name]
            else:
                assert digest is not None
                names = mem.names_of(digest)
            for n in names:
                self._drop_name(n)
            # in_use (pods' memory only) under the write lock: see still_stored
            if not self._unnamed_blob(digest):
                return
            if in_use(digest):
                log.info("image sha256:%s has no name left but is in use; blob kept", digest)
                return
            self._blobs.remove(digest)
            self._swap(self._snapshot().without_blob(digest))
            log.info("image sha256:%s removed", digest)

    def _unnamed_blob(self, digest: str) -> bool:
        mem = self._snapshot()
        return digest in mem.blobs and not mem.names_of(digest)

    def _drop_name(self, name: str) -> None:
        self._store.delete(TABLE, name)
        self._swap(self._snapshot().without_name(name))
        log.info("image name %s removed", name)
