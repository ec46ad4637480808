"""The image cache's size: which unused images go when the stored images exceed it.

After a pull, while the blobs together are larger than the cache size, the least recently
used blob goes, with every name pointing at it (so ImageStatus says absent and the kubelet
pulls it again when a pod needs it). Never the image just pulled, and never one a
container uses: its overlay is backed by the blob. Whether a container uses a blob is
asked under the blob's lock (ImageStore.holding), which CreateContainer holds while it
records that it uses the blob, so an eviction and a create of one image cannot cross.
What the cache cannot free (images in use) stays, and the log says so.

Pure policy (and the size cap it implies for one download): the image store carries it out.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..adapters.image_fetch import SizeCap
from .image_records import Blob


def size_cap(max_size: int, cache_size: int) -> SizeCap:
    """The most one download may bring: the maximum image size, or the cache size when
    that is smaller (an image larger than the whole cache could not stay in it)."""
    if cache_size and (not max_size or cache_size < max_size):
        return SizeCap(cache_size, "image-cache-size-mib, the size of the whole image cache")
    return SizeCap(max_size, "image-max-size-mib")


def candidates(blobs: Mapping[str, Blob], keep: str) -> list[str]:
    """The blobs that may be evicted, least recently used first (then by digest)."""
    return sorted((d for d in blobs if d != keep), key=lambda d: (blobs[d].used, d))


def over(blobs: Mapping[str, Blob], cap: int) -> int:
    """Bytes above the cache size ``cap`` (0: no cap, never over)."""
    if cap <= 0:
        return 0
    return max(0, sum(b.size for b in blobs.values()) - cap)


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
