"""The image service at startup: its memory from the state store's name records and the
blob files on disk.

A name record whose blob is missing or whose data is unusable is deleted; a blob no record
describes (a crash came between placing it and naming it) is inspected and listed without
names. Each blob's last use is its file's mtime (image_records.Blob.used).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..adapters import qemu_img
from ..adapters.image_blobs import BlobStore
from ..checks import shown
from ..errors import RuntimeError_
from .image_records import Blob, Memory, Name
from .store import Store

log = logging.getLogger(__name__)

TABLE = "image_names"


def load(root: Path, files: BlobStore, store: Store) -> Memory:
    sizes = files.scan()
    names: dict[str, Name] = {}
    blobs: dict[str, Blob] = {}
    for data in store.all(TABLE):
        usable = _usable(store, data, sizes)
        if usable is not None:
            entry, blob = usable
            names[entry.name] = entry
            blobs.setdefault(entry.digest, blob)
    for digest, size in sizes.items():
        if digest not in blobs:
            blobs[digest] = _inspect_orphan(files, digest, size)
    blobs = {d: dataclasses.replace(b, used=files.mtime(d)) for d, b in blobs.items()}
    log.info("image store %s: %d image(s), %d name(s)", root, len(blobs), len(names))
    return Memory(names, blobs)


def _usable(store: Store, data: Any, sizes: Mapping[str, int]) -> tuple[Name, Blob] | None:
    """The name record and its blob's facts; an unusable record is deleted (or, without
    a name to delete it by, left for an operator)."""
    name = data.get("name") if isinstance(data, dict) else None
    try:
        digest = data["digest"]
        if not (isinstance(name, str) and isinstance(digest, str)):
            raise ValueError("name and digest must be strings")
        if digest not in sizes:
            raise ValueError(f"its blob sha256:{digest} is missing")
        entry = Name(name, digest, str(data.get("url", "")), str(data.get("pulled_at", "")))
        return entry, Blob(sizes[digest], int(data["virtual_size"]), str(data["format"]))
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("image store: dropping unusable name record %s: %s", shown(name), exc)
    if isinstance(name, str):
        store.delete(TABLE, name)
    return None


def _inspect_orphan(files: BlobStore, digest: str, size: int) -> Blob:
    """Facts of a blob no name record describes (a crash came between the two)."""
    try:
        info = qemu_img.info(files.path(digest), f"sha256:{digest}")
    except RuntimeError_ as exc:
        log.warning("image store: blob sha256:%s: %s", digest, exc.message)
        return Blob(size, 0, "")
    return Blob(size, info.virtual_size, info.format)
