"""UpdateContainerResources (both CRI versions): the Arktos kubelet's live vertical scaling.

The request's LinuxContainerResources carries the new limits (service/resize.py says
what they mean for a VM); the fields that mean nothing to a VM (cpu_shares, cpuset,
oom_score_adj, hugepages, unified, v1's windows) are ignored. A request without `linux`
asks for nothing and succeeds.
"""

from __future__ import annotations

from typing import Any

from ..service.core import Core
from ..service.resize import ResizeRequest
from .dispatch import Call
from .pools import Kind, Pools


class ResizeRpcs:
    core: Core
    pools: Pools

    async def UpdateContainerResources(self, request: Any, call: Call) -> Any:
        linux = request.linux if request.HasField("linux") else None
        req = ResizeRequest() if linux is None else ResizeRequest(
            cpu_period=linux.cpu_period, cpu_quota=linux.cpu_quota,
            memory_limit_in_bytes=linux.memory_limit_in_bytes)
        await self.pools.run(Kind.LIBVIRT, self.core.pods.resize.update,
                             request.container_id, req)
        return call.pb.UpdateContainerResourcesResponse()
