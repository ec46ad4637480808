"""Making the streaming server (Exec, Attach, PortForward) the daemon starts and stops.

The server is runtime/streaming/server.py; the VM side it calls is the service layer's
`StreamBackends` (Core.streams). It listens on --streaming-address / --streaming-port.
"""

from __future__ import annotations

from ..config import Settings
from ..service.stream_io import StreamBackends
from ..streaming.server import StreamingServer


def make_server(backends: StreamBackends, settings: Settings) -> StreamingServer:
    """A StreamingServer for `backends` on the configured address and port, not started."""
    return StreamingServer(backends, settings.streaming_address, settings.streaming_port)
