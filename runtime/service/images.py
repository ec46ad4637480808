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

A download is refused when it connects to a denied network (adapters/pull_guard.py) or
grows past the size cap: the maximum image size, or the image cache size when that is
smaller, since an image larger than the whole cache cannot stay in it. After each pull the
cache is brought back under its size by evicting unused images (image_cache.py). A blob is
removed, by RemoveImage or eviction, only under its lock (``holding``), after asking
whether a container uses it.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import datetime
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ..adapters import qemu_img
from ..adapters.image_blobs import BlobStore
from ..adapters.image_fetch import Fetcher, Progress, source_of
from ..adapters.pull_guard import DEFAULT_DENIED_NETWORKS, NetworkGuard
from ..adapters.pull_watch import PullLimits
from ..checks import shown
from ..errors import Cancelled, InvalidArgument, NotFound, RuntimeError_
from . import image_cache
from .image_load import TABLE, load
from .image_names import ImageName, Translator, parse_id, parse_image_name, url_for
from .image_pulls import SharedDownloads
from .image_records import Blob, ImageRecord, Memory, Name
from .keyed_locks import KeyedLocks
from .store import Store

log = logging.getLogger(__name__)

LABEL = 160  # characters of an image name a pull's error message echoes



def _check_cancel(cancel: threading.Event | None, name: str) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"pull of image {name} cancelled")


def _lookup(name_or_id: str) -> tuple[str | None, ImageName | None]:
    digest = parse_id(name_or_id)
    return (digest, None) if digest is not None else (None, parse_image_name(name_or_id))


def _label(name: str) -> str:
    """An image name as error messages echo it: whole up to LABEL characters, else cut."""
    return name if len(name) <= LABEL else shown(name, LABEL)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


class ImageStore:
    """Pulls, lists and removes VM disk images: blobs under ``root``, names in ``store``.

    Thread-safe. Status and list answer from memory; the disk is read once on open.
    """

    def __init__(self, root: Path, store: Store, *, download_protocol: str = "https",
                 allowed_schemes: frozenset[str] = frozenset({"https", "http"}),
                 translations: Translator | None = None, timeout: float = 60.0,
                 limits: PullLimits | None = None,
                 denied_networks: Iterable[str] = DEFAULT_DENIED_NETWORKS,
                 max_size: int = 0, cache_size: int = 0) -> None:
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
        if max_size < 0 or cache_size < 0:
            raise InvalidArgument("image size limits must not be negative")
        self.translations = translations
        self.timeout = timeout
        self.cache_size = cache_size  # bytes; 0: no cap
        self.cap = image_cache.size_cap(max_size, cache_size)
        self._store = store
        self._fetcher = Fetcher(self.allowed_schemes, timeout, limits,
                                NetworkGuard(denied_networks))
        self._lock = threading.Lock()  # guards the swap of self._memory; never held over I/O
        self._write_lock = threading.Lock()  # serialises changes of names and blobs
        self._holds = KeyedLocks()  # per blob: removing it vs. a container taking it
        self._downloads: SharedDownloads[ImageRecord] = SharedDownloads()
        self._blobs = BlobStore(self.root)
        try:
            self._memory = load(self.root, self._blobs, self._store)
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

    # ---- queries ---------------------------------------------------------------------

    def _snapshot(self) -> Memory:
        with self._lock:
            return self._memory

    def _swap(self, memory: Memory) -> None:
        with self._lock:
            self._memory = memory

    def _record(self, mem: Memory, digest: str, names: list[str] | None = None) -> ImageRecord:
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
             progress: Progress | None = None,
             in_use: Callable[[str], bool] | None = None) -> ImageRecord:
        """Download ``name`` (unless its ``@sha256:`` content is already stored) and name it.

        Raises InvalidArgument, PermissionDenied, NotFound, Unavailable, DeadlineExceeded,
        ResourceExhausted, Cancelled; on any failure the store is unchanged.
        ``progress(done, total)`` is called at most every 0.5 s and once at the end;
        ``total`` is None without a Content-Length. Then, with a cache size and ``in_use``
        (hex digest -> a container uses it), unused images are evicted down to the size.
        """
        ref = parse_image_name(name)
        url = url_for(ref, name, allowed_schemes=self.allowed_schemes,
                      download_protocol=self.download_protocol, translations=self.translations)
        while True:
            record = self._pull_once(ref, url, cancel, progress)
            if record is not None:
                break
        if in_use is not None:
            try:
                self.evict(keep=record.digest, in_use=in_use)
            except RuntimeError_ as exc:  # the pull itself succeeded
                log.warning("image cache: eviction after pulling %s failed: %s",
                            _label(ref.name), exc.message)
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

        shared = self._downloads.run((url, ref.digest), lead, name=_label(ref.name),
                                     source=source_of(url), cancel=cancel)
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
                  progress: Progress | None) -> tuple[Path, str, Blob]:
        """A checked temp file: (its path, its sha256, its facts)."""
        tmp, got = self._blobs.write_temp(
            f"image {_label(ref.name)}",
            lambda out: self._fetcher.fetch(url, out, name=_label(ref.name), cancel=cancel,
                                            progress=progress, cap=self.cap))
        try:
            if ref.digest is not None and got.digest != ref.digest:
                raise InvalidArgument(
                    f"image {_label(ref.name)}: digest mismatch: the name asks for "
                    f"sha256:{ref.digest}, "
                    f"{source_of(url)} served sha256:{got.digest}"
                )
            info = qemu_img.info(tmp, _label(ref.name))
        except BaseException:
            self._blobs.discard(tmp)
            raise
        return tmp, got.digest, Blob(got.size, info.virtual_size, info.format)

    # ---- changes (each under self._write_lock) ----------------------------------------

    def _install(self, tmp: Path, digest: str, blob: Blob, name: str, url: str) -> ImageRecord:
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
                     new_blob: Blob | None = None) -> ImageRecord | None:
        mem = self._snapshot()
        blob = new_blob or mem.blobs.get(digest)
        if blob is None or not self._blobs.has(digest):
            return None
        entry = Name(name, digest, url, _now())
        self._store.put(TABLE, name, entry.data(blob), digest=digest)
        used = time.time()
        new = mem.with_name(entry, dataclasses.replace(blob, used=max(blob.used, used)))
        self._swap(new)
        self._blobs.touch(digest, used)
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
            if not self._unnamed_blob(digest):
                return
        with self.holding(digest):
            # Asked under the blob's lock only: in_use takes the pods' memory lock.
            if in_use(digest):
                log.info("image sha256:%s has no name left but is in use; blob kept", digest)
                return
            with self._write_lock:
                if self._unnamed_blob(digest):
                    self._remove_blob(digest)
                    log.info("image sha256:%s removed", digest)

    @contextlib.contextmanager
    def holding(self, digest: str) -> Iterator[None]:
        """Holds the lock of one blob: no RemoveImage or eviction removes it meanwhile.
        CreateContainer records its use of the blob under it."""
        with self._holds.hold(digest):
            yield

    def mark_used(self, digest: str) -> None:
        """A container was made from this blob: it is the most recently used."""
        used = time.time()
        with self._lock:
            self._memory = self._memory.used_at(digest, used)
        self._blobs.touch(digest, used)

    def evict(self, keep: str, in_use: Callable[[str], bool]) -> builtins.list[str]:
        """Evicts unused blobs (and their names), least recently used first, until the
        store fits the cache size; never ``keep`` nor a blob ``in_use``. Returns what went."""
        gone: builtins.list[str] = []
        if not self.cache_size:
            return gone
        mem = self._snapshot()
        for digest in image_cache.candidates(mem.blobs, keep):
            if not image_cache.over(self._snapshot().blobs, self.cache_size):
                break
            with self.holding(digest):
                if in_use(digest):
                    continue
                with self._write_lock:
                    now = self._snapshot()
                    blob = now.blobs.get(digest)
                    if blob is None:
                        continue
                    names = now.names_of(digest)
                    for n in names:
                        self._drop_name(n)
                    self._remove_blob(digest)
            gone.append(digest)
            log.info("image cache: evicted sha256:%s (%s, names %s) to stay within the cache "
                     "size of %s", digest, image_cache.mib(blob.size), names or "none",
                     image_cache.mib(self.cache_size))
        excess = image_cache.over(self._snapshot().blobs, self.cache_size)
        if excess:
            log.warning("image cache: %s above its size of %s after evicting every unused "
                        "image; the rest is in use by containers or was just pulled",
                        image_cache.mib(excess), image_cache.mib(self.cache_size))
        return gone

    def _remove_blob(self, digest: str) -> None:
        """The blob's file and memory entry (under the write lock, its names gone first)."""
        self._blobs.remove(digest)
        self._swap(self._snapshot().without_blob(digest))

    def _unnamed_blob(self, digest: str) -> bool:
        mem = self._snapshot()
        return digest in mem.blobs and not mem.names_of(digest)

    def _drop_name(self, name: str) -> None:
        self._store.delete(TABLE, name)
        self._swap(self._snapshot().without_name(name))
        log.info("image name %s removed", name)
