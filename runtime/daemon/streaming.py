"""Starting and stopping the streaming server (Exec, Attach, PortForward) with the daemon.

The server is runtime/streaming/server.py (`StreamingServer(backends, address, port)`,
`start()`, `stop()`, and the *_url methods the RPCs call). It is looked up by name so the
daemon runs on a tree that does not have it yet: then Exec, Attach and PortForward answer
UNAVAILABLE ("the streaming server ... is not running") and everything else works.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from ..config import Settings
from ..service.stream_io import StreamBackends

log = logging.getLogger(__name__)

SERVER_MODULE = "arktos_vm_runtime.streaming.server"


def make_server(backends: StreamBackends, settings: Settings) -> Any | None:
    """A StreamingServer for `backends` on the configured address and port, not started;
    None when this tree has no streaming server."""
    try:
        module = importlib.import_module(SERVER_MODULE)
    except ModuleNotFoundError as e:
        if e.name != SERVER_MODULE:
            raise
        log.warning("no streaming server in this build: Exec, Attach and PortForward "
                    "answer UNAVAILABLE")
        return None
    return module.StreamingServer(backends, settings.streaming_address,
                                  settings.streaming_port)
