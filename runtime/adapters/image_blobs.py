"""Image blobs: the content-addressed files of VM disk images.

Layout under ``root`` (one process owns it, enforced by ``flock`` on ``root/.lock``)::

    blobs/sha256/<hex>     image content, named by its sha256; immutable, mode 0644
    tmp/                   downloads in progress

These files are artefacts, not records: which names point at which content lives in the
state store. A blob appears by rename of a fsynced temp file followed by a fsync of the
directory, so a crash leaves either no blob or the whole blob, never a half written file
under its final name; temp files left by a crash are removed when the store opens.

``names/`` held the name records of the previous version; the state store's migration
carries them over, and opening removes what is left of that directory when it is empty.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, TypeVar

from ..errors import FailedPrecondition
from .fsutil import fsync_dir, make_dirs, storage_error

log = logging.getLogger(__name__)

_HEX64 = re.compile(r"[0-9a-f]{64}")
_TMP_PREFIX = ".tmp-"  # the previous version's temp files next to final names
_LEGACY_NAMES = "names"

T = TypeVar("T")


class BlobStore:
    """The blob files under ``root``; not thread-safe for writes of the same digest (the
    image service serialises its writes)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._blob_dir = self.root / "blobs" / "sha256"
        self._tmp_dir = self.root / "tmp"
        # QEMU (another user) opens the blobs as backing files: it must traverse to them.
        for d in (self.root, self._blob_dir.parent, self._blob_dir):
            make_dirs(d, 0o755)
        self._tmp_dir.mkdir(mode=0o700, exist_ok=True)
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
            self._remove_leftovers()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the lock on ``root``; the object must not be used afterwards."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _remove_leftovers(self) -> None:
        removed = 0
        for entry in self._tmp_dir.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed += 1
        legacy = self.root / _LEGACY_NAMES
        for d in (self._blob_dir, legacy):
            for entry in d.glob(_TMP_PREFIX + "*"):
                entry.unlink()
                removed += 1
        if removed:
            log.info("image store %s: removed %d leftover temporary file(s)", self.root, removed)
        try:
            legacy.rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            log.warning("image store: %s holds files the state store did not carry over; "
                        "left for an operator", legacy)

    def scan(self) -> dict[str, int]:
        """The stored blobs: sha256 hex -> size in bytes."""
        sizes: dict[str, int] = {}
        for entry in self._blob_dir.iterdir():
            if _HEX64.fullmatch(entry.name) and entry.is_file():
                sizes[entry.name] = entry.stat().st_size
            else:
                log.warning("image store: ignoring unexpected file %s", entry)
        return sizes

    def path(self, digest: str) -> Path:
        return self._blob_dir / digest

    def has(self, digest: str) -> bool:
        return self.path(digest).exists()

    def mtime(self, digest: str) -> float:
        """When the blob was last used (its mtime, see touch); 0 if unreadable."""
        try:
            return self.path(digest).stat().st_mtime
        except OSError:
            return 0.0

    def touch(self, digest: str, when: float) -> None:
        """Records a use of the blob in its mtime, so the order of use survives a restart
        (the content never changes; best effort: a failure is logged)."""
        try:
            os.utime(self.path(digest), (when, when))
        except OSError as exc:
            log.warning("image store: cannot mark sha256:%s used: %s", digest, exc.strerror)

    def write_temp(self, what: str, write: Callable[[IO[bytes]], T]) -> tuple[Path, T]:
        """A new temp file filled by ``write(file)`` and fsynced, with what ``write``
        returned; on any failure the file is gone. ``what`` names it in errors."""
        try:
            fd, tmp_name = tempfile.mkstemp(dir=self._tmp_dir, prefix="pull-", suffix=".part")
        except OSError as exc:
            raise storage_error(exc, what) from exc
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                result = write(out)
                try:
                    out.flush()
                    os.fsync(out.fileno())
                except OSError as exc:
                    raise storage_error(exc, what) from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp, result

    def discard(self, tmp: Path) -> None:
        """Drop a temp file of write_temp (absent already is fine)."""
        tmp.unlink(missing_ok=True)

    def place(self, tmp: Path, digest: str, what: str) -> None:
        """Make the temp file the blob of ``digest`` (durably); the temp file is consumed."""
        dst = self.path(digest)
        try:
            os.chmod(tmp, 0o644)
            os.rename(tmp, dst)
            fsync_dir(self._blob_dir)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise storage_error(exc, what) from exc

    def remove(self, digest: str) -> None:
        try:
            self.path(digest).unlink(missing_ok=True)
            fsync_dir(self._blob_dir)
        except OSError as exc:
            raise storage_error(exc, f"removing image sha256:{digest}") from exc

    def fs_usage(self) -> tuple[int, int]:
        """(bytes, inodes) the blobs and their directories use, for ImageFsInfo."""
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
