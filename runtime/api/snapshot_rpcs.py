"""The Arktos snapshot RPCs (runtime.v1alpha2 only): CreateSnapshot and RestoreToSnapshot
with vmID = the container id, the caller's snapshotID and flags (0)."""

from __future__ import annotations

from typing import Any

from ..service.core import Core
from .dispatch import Call
from .pools import Kind, Pools


class SnapshotRpcs:
    core: Core
    pools: Pools

    async def CreateSnapshot(self, request: Any, call: Call) -> Any:
        await self.pools.run(Kind.LIBVIRT, self.core.pods.snapshots.create, request.vmID,
                             request.snapshotID, int(request.flags))
        return call.pb.CreateSnapshotResponse()

    async def RestoreToSnapshot(self, request: Any, call: Call) -> Any:
        await self.pools.run(Kind.LIBVIRT, self.core.pods.snapshots.restore, request.vmID,
                             request.snapshotID, int(request.flags))
        return call.pb.RestoreToSnapshotResponse()
