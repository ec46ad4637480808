"""The API's thread pools: sizes per kind of work, and a full pool of one kind never
delays another kind (real threads, real asyncio loop)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest

from arktos_vm_runtime.api.pools import Kind, Pools, pool_sizes


@pytest.mark.parametrize("cpus, expected", [
    (None, {Kind.PULLS: 4, Kind.LIBVIRT: 8, Kind.NETWORK: 4, Kind.QUICK: 2}),
    (1, {Kind.PULLS: 4, Kind.LIBVIRT: 8, Kind.NETWORK: 4, Kind.QUICK: 2}),
    (2, {Kind.PULLS: 4, Kind.LIBVIRT: 8, Kind.NETWORK: 4, Kind.QUICK: 2}),
    (4, {Kind.PULLS: 8, Kind.LIBVIRT: 16, Kind.NETWORK: 8, Kind.QUICK: 4}),
    (256, {Kind.PULLS: 16, Kind.LIBVIRT: 32, Kind.NETWORK: 16, Kind.QUICK: 8}),
])
def test_pool_sizes_grow_with_cpus_within_bounds(cpus: int | None,
                                                 expected: dict[Kind, int]) -> None:
    assert pool_sizes(cpus) == expected


def test_every_kind_has_a_pool_of_its_own() -> None:
    sizes = pool_sizes(2)
    assert set(sizes) == set(Kind)
    pools = Pools(sizes)
    try:
        assert len({id(e) for e in pools._executors.values()}) == len(Kind)
    finally:
        pools.shutdown()


def test_a_full_pull_pool_does_not_delay_quick_calls_and_its_queue_drops_cancelled() -> None:
    pools = Pools({Kind.PULLS: 2, Kind.LIBVIRT: 1, Kind.NETWORK: 1, Kind.QUICK: 1})
    release = threading.Event()
    started: list[int] = []

    def slow_pull(i: int) -> int:
        started.append(i)
        release.wait(10)
        return i

    async def main() -> tuple[float, list[int]]:
        pulls = [asyncio.ensure_future(pools.run(Kind.PULLS, slow_pull, i)) for i in range(6)]
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        got = await asyncio.wait_for(pools.run(Kind.QUICK, lambda: "ok"), 2)
        quick = time.monotonic() - t0
        assert got == "ok"
        assert sorted(started) == [0, 1], "the pull pool runs two at a time; the rest wait"
        pulls[5].cancel()  # its caller went away while it waited for a thread
        # The cancel reaches the pool's queue through the loop's callbacks: wait for the
        # task to end before freeing the threads, or a busy machine may run the call first.
        with contextlib.suppress(asyncio.CancelledError):
            await pulls[5]
        release.set()
        done = await asyncio.gather(*pulls[:5])
        return quick, done

    try:
        quick, done = asyncio.run(main())
    finally:
        pools.shutdown()
    print(f"quick call answered in {quick * 1000:.1f} ms while the pull pool was full")
    assert quick < 1.0
    assert done == [0, 1, 2, 3, 4]
    assert 5 not in started, "a cancelled call still waiting for a thread never ran"
