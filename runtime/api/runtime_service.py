"""RuntimeService for both CRI versions: validate, convert, call the service layer."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from .. import __version__
from ..service.core import Core
from ..service.health import Condition
from .dispatch import Call

# The kubelet checks this exact value (the CRI's own version field).
KUBELET_API_VERSION = "0.1.0"
RUNTIME_NAME = "arktos-vm-runtime"


def _condition(call: Call, kind: str, c: Condition) -> Any:
    return call.pb.RuntimeCondition(
        type=kind, status=c.ok, reason="" if c.ok else c.reason, message=c.message
    )


class RuntimeServicer:
    def __init__(self, core: Core) -> None:
        self.core = core

    async def Version(self, request: Any, call: Call) -> Any:
        return call.pb.VersionResponse(
            version=KUBELET_API_VERSION,
            runtime_name=RUNTIME_NAME,
            runtime_version=__version__,
            runtime_api_version=call.api_version,
        )

    async def Status(self, request: Any, call: Call) -> Any:
        # Reading the CNI dir touches the disk: keep it off the serving loop.
        network = await asyncio.to_thread(self.core.network_condition)
        status = call.pb.RuntimeStatus(conditions=[
            _condition(call, "RuntimeReady", self.core.runtime_condition()),
            _condition(call, "NetworkReady", network),
        ])
        info = {}
        if request.verbose:
            info["config"] = json.dumps(self.core.settings.as_dict(), sort_keys=True)
            info["libvirtVersion"] = self.core.health.version
            info["stateSchemaVersion"] = str(self.core.state.store.schema_version)
        return call.pb.StatusResponse(status=status, info=info)

    async def UpdateRuntimeConfig(self, request: Any, call: Call) -> Any:
        # The pod CIDR belongs to the CNI plugin's configuration; nothing to keep here.
        return call.pb.UpdateRuntimeConfigResponse()
