"""The stats RPCs of both versions (ContainerStats, ListContainerStats; v1's PodSandboxStats,
ListPodSandboxStats) and v1's GetContainerEvents stream, as a mixin of RuntimeServicer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from ..errors import NotFound, ResourceExhausted, Unavailable
from ..service.core import Core
from ..service.events import Event
from ..service.network_state import NetworkStatus
from . import stats_convert
from .dispatch import Call
from .pools import Kind, Pools


class StatsRpcs:
    core: Core
    pools: Pools

    # -- stats: one libvirt bulk call per request, in the libvirt pool --------------------

    async def ContainerStats(self, request: Any, call: Call) -> Any:
        u = await self.pools.run(Kind.LIBVIRT, self.core.stats.container, request.container_id)
        return call.pb.ContainerStatsResponse(
            stats=stats_convert.container_stats(call, u, self.core.stats.disks_dir))

    async def ListContainerStats(self, request: Any, call: Call) -> Any:
        f = request.filter
        found = await self.pools.run(Kind.LIBVIRT, self.core.stats.list_containers, f.id,
                                     f.pod_sandbox_id, dict(f.label_selector))
        return call.pb.ListContainerStatsResponse(stats=[
            stats_convert.container_stats(call, u, self.core.stats.disks_dir) for u in found])

    async def PodSandboxStats(self, request: Any, call: Call) -> Any:
        p = await self.pools.run(Kind.LIBVIRT, self.core.stats.sandbox, request.pod_sandbox_id)
        return call.pb.PodSandboxStatsResponse(
            stats=stats_convert.sandbox_stats(call, p, self.core.stats.disks_dir))

    async def ListPodSandboxStats(self, request: Any, call: Call) -> Any:
        f = request.filter
        found = await self.pools.run(Kind.LIBVIRT, self.core.stats.list_sandboxes, f.id,
                                     dict(f.label_selector))
        return call.pb.ListPodSandboxStatsResponse(stats=[
            stats_convert.sandbox_stats(call, p, self.core.stats.disks_dir) for p in found])

    # -- events ---------------------------------------------------------------------------

    def _network(self, ev: Event) -> NetworkStatus | None:
        if ev.sandbox is None:
            return None
        try:
            return self.core.networks.status(ev.sandbox.id)
        except NotFound:
            return None  # stopped: its network is torn down

    async def GetContainerEvents(self, request: Any, call: Call) -> AsyncIterator[Any]:
        """Streams every lifecycle event from the moment of subscribing until the client
        goes away. Publishing never waits for this stream (service/events.py): a subscriber
        that falls QUEUE_LIMIT events behind is cut off with RESOURCE_EXHAUSTED."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        hub = self.core.pods.events

        def notify() -> None:  # any thread; never blocks
            loop.call_soon_threadsafe(wake.set)

        sub = hub.subscribe(notify)
        if sub is None:
            raise ResourceExhausted(f"GetContainerEvents: {hub.max_subscribers} subscribers "
                                    "already, or the runtime is stopping; try again later")
        try:
            while True:
                await wake.wait()
                wake.clear()
                for ev in sub.take():
                    yield stats_convert.container_event(call, ev, self._network(ev))
                if sub.closed:
                    raise Unavailable("GetContainerEvents: the runtime is stopping")
                if sub.overflowed:
                    raise ResourceExhausted(
                        f"GetContainerEvents: this subscriber fell {hub.limit} events behind "
                        "and missed events; list containers again and subscribe again")
        finally:
            sub.close()
