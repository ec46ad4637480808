"""RebootVM (Arktos, v1alpha2 only) and ExecSync (both versions): a mixin of RuntimeServicer."""

from __future__ import annotations

from typing import Any

from ..errors import InvalidArgument
from ..service.core import Core
from .dispatch import Call
from .pools import Kind, Pools


class VmOpsRpcs:
    core: Core
    pools: Pools

    async def RebootVM(self, request: Any, call: Call) -> Any:
        spec = request.rebootSpec
        await self.pools.run(Kind.LIBVIRT, self.core.reboots.reboot, request.vm_id,
                             int(spec.delayInSeconds), int(spec.domainRebootFlag))
        return call.pb.RebootVMResponse()

    async def ExecSync(self, request: Any, call: Call) -> Any:
        if request.timeout < 0:
            raise InvalidArgument("ExecSync: field timeout must not be negative")
        r = await self.pools.run(Kind.LIBVIRT, self.core.guest_exec.exec_sync,
                                 request.container_id, list(request.cmd), int(request.timeout))
        return call.pb.ExecSyncResponse(stdout=r.stdout, stderr=r.stderr, exit_code=r.exit_code)
