"""ImageService for both CRI versions."""

from __future__ import annotations

from ..service.core import Core


class ImageServicer:
    def __init__(self, core: Core) -> None:
        self.core = core
