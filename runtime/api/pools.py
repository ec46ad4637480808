"""One bounded thread pool per kind of blocking work, so no kind can starve another.

The servicers run every blocking service call in the pool of its kind, never in asyncio's
shared default executor: six slow pulls fill the pull pool and then wait in its queue,
while Status, ImageStatus and the daemon's STATUS= line still get threads of their own.

  PULLS    image downloads (minutes each, mostly waiting on the network)
  LIBVIRT  container lifecycle: define, start, stop (which waits for the guest), undefine
  NETWORK  sandbox lifecycle and NICs: CNI plugins, namespaces, dnsmasq
  QUICK    short reads and writes: the CNI config dir, image status, image removal

A call whose caller went away before a thread took it is dropped from the queue.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class Kind(enum.Enum):
    PULLS = "pulls"
    LIBVIRT = "libvirt"
    NETWORK = "network"
    QUICK = "quick"


# (threads per CPU, fewest, most) of each kind. Pulls and libvirt calls mostly wait
# (on a server, on a guest shutting down), so they get more threads than there are CPUs;
# the quick pool only needs to outlast a moment's burst of reads.
_SIZING: Mapping[Kind, tuple[int, int, int]] = {
    Kind.PULLS: (2, 4, 16),
    Kind.LIBVIRT: (4, 8, 32),
    Kind.NETWORK: (2, 4, 16),
    Kind.QUICK: (1, 2, 8),
}


def pool_sizes(cpus: int | None) -> dict[Kind, int]:
    """Threads of each pool for a machine of ``cpus`` CPUs (None: unknown, counted as 1)."""
    n = max(cpus or 1, 1)
    return {kind: min(max(per_cpu * n, least), most)
            for kind, (per_cpu, least, most) in _SIZING.items()}


class Pools:
    def __init__(self, sizes: Mapping[Kind, int] | None = None) -> None:
        sizes = pool_sizes(os.cpu_count()) if sizes is None else sizes
        self.sizes = dict(sizes)
        self._executors = {
            kind: ThreadPoolExecutor(max_workers=size, thread_name_prefix=f"avr-{kind.value}")
            for kind, size in self.sizes.items()}
        log.debug("thread pools: %s", ", ".join(f"{k.value} {n}" for k, n in self.sizes.items()))

    async def run(self, kind: Kind, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` in the pool of ``kind``; cancelling the await drops a queued call
        (one already running goes on: give it a cancel event to stop it)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executors[kind], functools.partial(fn, *args))

    def shutdown(self) -> None:
        """Drops queued calls; calls still running finish in their threads."""
        for executor in self._executors.values():
            executor.shutdown(wait=False, cancel_futures=True)
