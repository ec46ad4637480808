"""The image service's values: what a stored image is, and the one in-memory picture of
every name and blob, replaced whole, never changed in place.

A blob's ``used`` time (seconds since the epoch) orders the image cache's eviction: it is
the later of its last pull and the last container created from it, and survives a restart
as the blob file's mtime.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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
class Blob:
    size: int
    virtual_size: int
    format: str
    used: float = 0.0  # the last pull or container create, seconds since the epoch


@dataclass(frozen=True)
class Name:
    name: str
    digest: str
    url: str
    pulled_at: str

    def data(self, blob: Blob) -> dict[str, Any]:
        return {"name": self.name, "digest": self.digest, "url": self.url,
                "pulled_at": self.pulled_at, "virtual_size": blob.virtual_size,
                "format": blob.format}


@dataclass(frozen=True)
class Memory:
    """Every name and blob, as one value that is replaced, never changed."""

    names: Mapping[str, Name] = dataclasses.field(default_factory=dict)
    blobs: Mapping[str, Blob] = dataclasses.field(default_factory=dict)

    def names_of(self, digest: str) -> list[str]:
        return sorted(n for n, e in self.names.items() if e.digest == digest)

    def with_name(self, entry: Name, blob: Blob) -> Memory:
        return Memory({**self.names, entry.name: entry}, {**self.blobs, entry.digest: blob})

    def without_name(self, name: str) -> Memory:
        return Memory({n: e for n, e in self.names.items() if n != name}, self.blobs)

    def without_blob(self, digest: str) -> Memory:
        return Memory(self.names, {d: b for d, b in self.blobs.items() if d != digest})

    def used_at(self, digest: str, when: float) -> Memory:
        """The blob of ``digest`` marked used at ``when`` (unchanged if absent or later)."""
        blob = self.blobs.get(digest)
        if blob is None or blob.used >= when:
            return self
        return Memory(self.names, {**self.blobs, digest: dataclasses.replace(blob, used=when)})

    def total_size(self) -> int:
        return sum(b.size for b in self.blobs.values())
