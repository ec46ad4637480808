"""The Prometheus endpoint: GET /metrics on --metrics-address:--metrics-port (off unless a
port is set; loopback by default), served from threads of its own, never the gRPC loop:
at most MAX_SCRAPES at once (more get 503), a connection that sends no request within
REQUEST_TIMEOUT is dropped, any other path is 404.

The daemon registers the scrape-time collectors (service/vm_metrics.py) on the shared
registry (metrics.REGISTRY) while the endpoint runs and removes them when it stops. The
socket-activated daemon serves it the same way: only the CRI socket comes from systemd.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

from .. import metrics

log = logging.getLogger(__name__)

MAX_SCRAPES = 4  # scrapes served at once (each reads libvirt); more get 503
REQUEST_TIMEOUT = 10.0  # seconds a connection may take to send its request


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Quiet(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT  # a client that sends no request is dropped

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics: " + format, *args)


def _only_metrics(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    busy = threading.BoundedSemaphore(MAX_SCRAPES)

    def serve(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") not in ("/metrics", "/metrics/"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"only /metrics is served here\n"]
        if not busy.acquire(blocking=False):
            start_response("503 Service Unavailable", [("Content-Type", "text/plain"),
                                                       ("Retry-After", "1")])
            return [b"too many scrapes at once\n"]
        try:
            return list(app(environ, start_response))
        finally:
            busy.release()

    return serve


class MetricsServer:
    def __init__(self, address: str, port: int, collectors: list[Any]) -> None:
        self.address = address
        self.port = port
        self._collectors = collectors
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Binds and serves; OSError when the address cannot be bound."""
        cls = _Server6 if ipaddress.ip_address(self.address).version == 6 else _Server
        self._server = make_server(self.address, self.port,
                                   _only_metrics(make_wsgi_app(metrics.REGISTRY)),
                                   server_class=cls, handler_class=_Quiet)
        self.port = self._server.server_address[1]
        for c in self._collectors:
            metrics.REGISTRY.register(c)
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics",
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5.0)
        for c in self._collectors:
            metrics.REGISTRY.unregister(c)
        self._server = None
