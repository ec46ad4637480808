"""The CRI streaming server: URLs with single-use tokens for Exec, Attach and PortForward, and
the HTTP/1.1 server those URLs point to, upgrading to SPDY/3.1 or WebSocket.

Threads: one accepting; one per connection (at most `max_connections`, more get 503), which
reads the request head, upgrades and then reads the client; plus per session a worker for the
backend (exec, attach) or two per forwarded TCP connection. A slow or vanished client holds
only its own threads; `stop` ends every session and joins every thread.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import select
import socket
import threading

from ..service.stream_io import StreamBackends
from . import negotiate as ng
from .http_head import HeadError, RequestHead, read_head, response
from .pf_spdy import SpdyPortForward
from .pf_tunnel import serve_tunnel
from .pf_ws import MAX_WS_PORTS, WsPortForward
from .rc_spdy import SpdyRemoteCommand
from .rc_ws import WsRemoteCommand
from .spdy_conn import SpdyConnection
from .tokens import (
    TOKEN_TTL,
    AttachRequest,
    ExecRequest,
    PortForwardRequest,
    Request,
    TokenCache,
)
from .ws_conn import WsConnection, handshake

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 4 * 3600.0
STREAM_TIMEOUT = 30.0
JOIN_TIMEOUT = 40.0
NOT_FOUND = "404 page not found"


class _Session:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.conn: SpdyConnection | WsConnection | None = None
        self.thread: threading.Thread | None = None

    def abort(self) -> None:
        conn = self.conn
        if conn is not None:
            conn.abort()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class StreamingServer:
    def __init__(self, backends: StreamBackends, address: str = "127.0.0.1", port: int = 0,
                 *, base_url: str = "", max_connections: int = 64,
                 idle_timeout: float = IDLE_TIMEOUT, stream_timeout: float = STREAM_TIMEOUT,
                 token_ttl: float = TOKEN_TTL) -> None:
        self.backends = backends
        self.address = address
        self.port = port
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.stream_timeout = stream_timeout
        self.tokens = TokenCache(ttl=token_ttl)
        self._base_url = base_url if not base_url or base_url.endswith("/") else base_url + "/"
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._sessions: set[_Session] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        family = socket.AF_INET
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(self.address).version == 6:
                family = socket.AF_INET6
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.address, self.port))
            listener.listen(128)
        except OSError:
            listener.close()
            raise
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._accept_thread = threading.Thread(target=self._accept_loop,
                                               name="stream-accept", daemon=True)
        self._accept_thread.start()
        log.info("streaming server listening on %s", self.base_url)

    def stop(self) -> None:
        self._stopping.set()
        if self._accept_thread is not None:
            self._accept_thread.join(JOIN_TIMEOUT)
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            sessions = list(self._sessions)
        for s in sessions:
            s.abort()
        for s in sessions:
            if s.thread is not None:
                s.thread.join(JOIN_TIMEOUT)

    @property
    def base_url(self) -> str:
        if self._base_url:
            return self._base_url
        host = self.address
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/"

    # -- URLs (gRPC threads) ------------------------------------------------------------------
    def exec_url(self, container_id: str, cmd: list[str], *, tty: bool, stdin: bool,
                 stdout: bool, stderr: bool) -> str:
        req = ExecRequest(container_id, tuple(cmd), tty, stdin, stdout, stderr)
        return self.base_url + "exec/" + self.tokens.issue(req)

    def attach_url(self, container_id: str, *, tty: bool, stdin: bool, stdout: bool,
                   stderr: bool) -> str:
        req = AttachRequest(container_id, tty, stdin, stdout, stderr)
        return self.base_url + "attach/" + self.tokens.issue(req)

    def port_forward_url(self, sandbox_id: str, ports: list[int]) -> str:
        req = PortForwardRequest(sandbox_id, tuple(ports))
        return self.base_url + "portforward/" + self.tokens.issue(req)

    def session_count(self) -> int:
        with self._lock:
            return len(self._sessions)

    # -- connections --------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None
        poller = select.poll()
        poller.register(self._listener, select.POLLIN)
        while not self._stopping.is_set():
            if not poller.poll(200):
                continue
            try:
                sock, _peer = self._listener.accept()
            except OSError:
                continue
            with contextlib.suppress(OSError):   # typed keys and echoes are small writes
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                full = len(self._sessions) >= self.max_connections
                if not full:
                    session = _Session(sock)
                    self._sessions.add(session)
            if full:
                log.info("streaming: %d sessions open; refusing one more",
                         self.max_connections)
                with contextlib.suppress(OSError):
                    sock.setblocking(False)
                    sock.send(response(503, body="too many streaming sessions"))
                sock.close()
                continue
            session.thread = threading.Thread(target=self._serve, args=(session,),
                                              name="stream-conn", daemon=True)
            session.thread.start()

    def _serve(self, session: _Session) -> None:
        sock = session.sock
        try:
            self._serve_one(session)
        except OSError as e:
            log.debug("streaming: connection ended: %s", e)
        except Exception:
            log.exception("streaming: a session failed")
        finally:
            sock.close()
            with self._lock:
                self._sessions.discard(session)

    def _serve_one(self, session: _Session) -> None:
        sock = session.sock
        try:
            head, rest = read_head(sock)
        except HeadError as e:
            log.info("streaming: bad request: %s", e.message)
            if e.status:
                sock.sendall(response(e.status, body=e.message))
            return
        if head.method not in ("GET", "POST"):
            sock.sendall(response(405, [("Allow", "GET, POST")], "method not allowed"))
            return
        parts = head.path.split("/")
        route = parts[1] if len(parts) == 3 else ""
        request = self.tokens.consume(route, parts[2]) if route else None
        if request is None:
            sock.sendall(response(404, body=NOT_FOUND))
            return
        if self._stopping.is_set():
            return
        self._upgrade(session, head, rest, request)

    def _upgrade(self, session: _Session, head: RequestHead, rest: bytes,
                 request: Request) -> None:
        sock = session.sock
        pf = isinstance(request, PortForwardRequest)
        try:
            up = ng.negotiate(head, ng.PF_SPDY if pf else ng.RC_SPDY,
                              ng.PF_WS if pf else ng.RC_WS)
        except ng.Refused as e:
            log.info("streaming: upgrade refused: %s", e)
            sock.sendall(e.reply)
            return
        if up.websocket:
            self._websocket(session, head, rest, request, up.protocol)
            return
        handler: SpdyRemoteCommand | SpdyPortForward
        if isinstance(request, PortForwardRequest):
            handler = SpdyPortForward(self.backends, request, self.stream_timeout)
        else:
            handler = SpdyRemoteCommand(self.backends, request, ng.RC_VERSION[up.protocol],
                                        self.stream_timeout)
        conn = SpdyConnection(sock, handler, idle_timeout=self.idle_timeout, initial=rest)
        handler.conn = conn
        session.conn = conn
        sock.sendall(ng.spdy_switching(up.protocol))
        try:
            conn.serve()
        finally:
            handler.join()

    def _websocket(self, session: _Session, head: RequestHead, rest: bytes, request: Request,
                   protocol: str) -> None:
        sock = session.sock
        if isinstance(request, PortForwardRequest) and protocol == ng.PF_TUNNEL:
            self._tunnel(session, head, rest, request)
            return
        if isinstance(request, PortForwardRequest) and not (
                0 < len(request.ports) <= MAX_WS_PORTS):
            sock.sendall(response(400, body="port forward over WebSocket needs 1 to "
                                  f"{MAX_WS_PORTS} ports in the request"))
            return
        proto, reply, ok = handshake(head, protocol)
        sock.sendall(reply)
        if not ok:
            return
        handler: WsRemoteCommand | WsPortForward
        if isinstance(request, PortForwardRequest):
            handler = WsPortForward(self.backends, request)
        else:
            handler = WsRemoteCommand(self.backends, request, ng.RC_VERSION[protocol])
        conn = WsConnection(sock, proto, handler, base64_channels="base64" in protocol,
                            idle_timeout=self.idle_timeout, initial=rest)
        handler.conn = conn
        session.conn = conn
        try:
            handler.begin()
            conn.serve()
        finally:
            handler.join()

    def _tunnel(self, session: _Session, head: RequestHead, rest: bytes,
                request: PortForwardRequest) -> None:
        proto, reply, ok = handshake(head, ng.PF_TUNNEL)
        session.sock.sendall(reply)
        if not ok:
            return
        inner = SpdyPortForward(self.backends, request, self.stream_timeout)

        def register(conn: WsConnection) -> None:
            session.conn = conn
        serve_tunnel(session.sock, proto, rest, inner, self.idle_timeout, register)
