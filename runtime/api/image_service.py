"""ImageService for both CRI versions."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from ..service.core import Core
from . import convert
from .dispatch import Call
from .pools import Kind, Pools


class ImageServicer:
    def __init__(self, core: Core, pools: Pools) -> None:
        self.core = core
        self.pools = pools

    async def PullImage(self, request: Any, call: Call) -> Any:
        cancel = threading.Event()
        try:
            rec = await self.pools.run(Kind.PULLS, self.core.pull, request.image.image, cancel)
        except asyncio.CancelledError:
            cancel.set()  # the caller went away: the download stops and leaves nothing
            raise
        return call.pb.PullImageResponse(image_ref=rec.id)

    async def ImageStatus(self, request: Any, call: Call) -> Any:
        rec = await self.pools.run(Kind.QUICK, self.core.images.status, request.image.image)
        if rec is None:
            return call.pb.ImageStatusResponse()  # absent: no image, not an error
        return call.pb.ImageStatusResponse(image=convert.image(call, rec))

    async def ListImages(self, request: Any, call: Call) -> Any:
        wanted = request.filter.image.image if request.HasField("filter") else ""
        if wanted:
            rec = await self.pools.run(Kind.QUICK, self.core.images.status, wanted)
            recs = [rec] if rec is not None else []
        else:
            recs = await self.pools.run(Kind.QUICK, self.core.images.list)
        return call.pb.ListImagesResponse(images=convert.images(call, recs))

    async def RemoveImage(self, request: Any, call: Call) -> Any:
        await self.pools.run(Kind.QUICK, self.core.images.remove, request.image.image,
                             self.core.pods.image_in_use)
        return call.pb.RemoveImageResponse()

    async def ImageFsInfo(self, request: Any, call: Call) -> Any:
        used, inodes = await self.pools.run(Kind.QUICK, self.core.images.fs_usage)
        usage = call.pb.FilesystemUsage(
            timestamp=time.time_ns(),
            fs_id=call.pb.FilesystemIdentifier(mountpoint=str(self.core.state.root / "images")),
            used_bytes=call.pb.UInt64Value(value=used),
            inodes_used=call.pb.UInt64Value(value=inodes))
        if "image_filesystems" in call.pb.ImageFsInfoResponse.DESCRIPTOR.fields_by_name:
            return call.pb.ImageFsInfoResponse(image_filesystems=[usage])
        return call.pb.ImageFsInfoResponse()
