"""Minimal SPDY/3.1 client for the tests (remote command and port forward, as client-go does
them); the WebSocket one is tests/ws_client.py.

The SPDY client uses the runtime's own frame codec (runtime/streaming/spdy_frames.py), so
the independent check of the codec is tests/go/spdyclient (docker/spdystream) via
tests/go_client.py. Every wait has a timeout; a test never hangs on a broken server.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from arktos_vm_runtime.streaming import spdy_frames as sf

TIMEOUT = 10.0


@dataclass
class HttpReply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    sock: socket.socket | None = None

    def get_all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


def _connect(url: str) -> tuple[socket.socket, str, str]:
    u = urlsplit(url)
    sock = socket.create_connection((u.hostname or "", u.port or 80), timeout=TIMEOUT)
    return sock, u.path, u.netloc


def _read_reply(sock: socket.socket) -> HttpReply:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(1)       # one byte at a time: never read past the head
        if not chunk:
            break
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1]) if lines[0] else 0
    headers = []
    for line in lines[1:]:
        n, _, v = line.partition(":")
        headers.append((n.strip(), v.strip()))
    reply = HttpReply(status, headers, rest)
    if status != 101:
        while True:
            try:
                chunk = sock.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            reply.body += chunk
    return reply


def http_request(url: str, method: str = "POST", headers: list[tuple[str, str]] | None = None,
                 raw: bytes | None = None) -> HttpReply:
    """One request; a 101 keeps the socket open in `reply.sock`, others are closed."""
    sock, path, netloc = _connect(url)
    if raw is None:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {netloc}"]
        lines += [f"{n}: {v}" for n, v in headers or []]
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode()
    sock.sendall(raw)
    reply = _read_reply(sock)
    if reply.status == 101:
        reply.sock = sock
    else:
        sock.close()
    return reply


def spdy_headers(protocols: list[str] | None) -> list[tuple[str, str]]:
    h = [("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1")]
    h += [("X-Stream-Protocol-Version", p) for p in protocols or []]
    return h


class ClientStream:
    def __init__(self, client: SpdyClient, stream_id: int) -> None:
        self.client = client
        self.id = stream_id
        self.replied = threading.Event()
        self.refused = False
        self.eof = threading.Event()
        self.reset = False
        self._data = bytearray()
        self._cond = threading.Condition()

    def write(self, data: bytes) -> None:
        self.client.send(sf.DataFrame(self.id, data))

    def close(self) -> None:
        self.client.send(sf.DataFrame(self.id, b"", fin=True))

    def rst(self) -> None:
        self.client.send(sf.RstStream(self.id, sf.RST_CANCEL))

    def _push(self, data: bytes) -> None:
        with self._cond:
            self._data += data
            self._cond.notify_all()

    def read_until(self, want: bytes, timeout: float = TIMEOUT) -> bytes:
        with self._cond:
            self._cond.wait_for(lambda: want in self._data or self.eof.is_set(), timeout)
            return bytes(self._data)

    def read_count(self, n: int, timeout: float = TIMEOUT) -> int:
        """Waits until `n` bytes have come (or the stream ended); how many came."""
        with self._cond:
            self._cond.wait_for(lambda: len(self._data) >= n or self.eof.is_set(), timeout)
            return len(self._data)

    def read_all(self, timeout: float = TIMEOUT) -> bytes:
        """Everything until FIN or RST."""
        if not self.eof.wait(timeout):
            raise TimeoutError(f"stream {self.id}: no FIN in {timeout} s")
        return bytes(self._data)


@dataclass
class SpdyClient:
    """An upgraded SPDY connection, client side, with a reader thread."""

    sock: socket.socket
    protocol: str
    streams: dict[int, ClientStream] = field(default_factory=dict)
    pings: list[int] = field(default_factory=list)
    goaway: sf.GoAway | None = None
    closed: threading.Event = field(default_factory=threading.Event)
    frames_in: list[sf.Frame] = field(default_factory=list)
    reading: threading.Event = field(default_factory=threading.Event)   # clear: stop reading

    def __post_init__(self) -> None:
        self._next = 1
        self._lock = threading.Lock()
        self._comp = sf.HeaderCompressor()
        self.reading.set()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @classmethod
    def connect(cls, url: str, protocols: list[str] | None) -> SpdyClient:
        reply = http_request(url, "POST", spdy_headers(protocols))
        if reply.status != 101 or reply.sock is None:
            raise AssertionError(f"upgrade: {reply.status} {reply.body!r}")
        versions = reply.get_all("X-Stream-Protocol-Version")
        return cls(reply.sock, versions[0] if versions else "")

    def send(self, frame: sf.Frame) -> None:
        with self._lock:
            self.sock.sendall(sf.encode_frame(frame, self._comp))

    def open(self, headers: dict[str, str], wait: bool = True) -> ClientStream:
        with self._lock:
            sid = self._next
            self._next += 2
            stream = ClientStream(self, sid)
            self.streams[sid] = stream
            frame = sf.SynStream(sid, {k: [v] for k, v in headers.items()})
            self.sock.sendall(sf.encode_frame(frame, self._comp))
        if wait and not stream.replied.wait(TIMEOUT):
            raise TimeoutError(f"stream {headers}: no SYN_REPLY")
        return stream

    def _read(self) -> None:
        parser = sf.FrameParser(max_frame=sf.MAX_DATA_LENGTH)
        try:
            while True:
                self.reading.wait()
                data = self.sock.recv(65536)
                if not data:
                    break
                for frame in parser.feed(data):
                    self.frames_in.append(frame)
                    self._dispatch(frame)
        except OSError:
            pass
        finally:
            self.closed.set()
            for s in self.streams.values():
                s.eof.set()
                with s._cond:
                    s._cond.notify_all()

    def _dispatch(self, frame: sf.Frame) -> None:
        if isinstance(frame, sf.SynReply):
            self.streams[frame.stream_id].replied.set()
        elif isinstance(frame, sf.DataFrame):
            s = self.streams[frame.stream_id]
            if not s.replied.is_set():
                raise AssertionError(f"DATA on stream {s.id} before its SYN_REPLY")
            s._push(frame.data)
            if frame.fin:
                s.eof.set()
                s._push(b"")
        elif isinstance(frame, sf.RstStream):
            s = self.streams[frame.stream_id]
            s.refused = not s.replied.is_set()
            s.reset = True
            s.replied.set()
            s.eof.set()
            s._push(b"")
        elif isinstance(frame, sf.Ping):
            self.pings.append(frame.ping_id)
        elif isinstance(frame, sf.GoAway):
            self.goaway = frame

    def close(self) -> None:
        self.reading.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)   # wakes the reader; close() alone does not
        self._reader.join(TIMEOUT)
        self.sock.close()

    def wait_closed(self, timeout: float = TIMEOUT) -> bool:
        return self.closed.wait(timeout)


def exec_streams(client: SpdyClient, *, stdin: bool, stdout: bool, stderr: bool,
                 tty: bool) -> dict[str, ClientStream]:
    """Opens the remote-command streams in client-go's order."""
    out = {"error": client.open({"streamtype": "error"})}
    if stdin:
        out["stdin"] = client.open({"streamtype": "stdin"})
    if stdout:
        out["stdout"] = client.open({"streamtype": "stdout"})
    if stderr and not tty:
        out["stderr"] = client.open({"streamtype": "stderr"})
    if tty and client.protocol in ("v3.channel.k8s.io", "v4.channel.k8s.io"):
        out["resize"] = client.open({"streamtype": "resize"})
    return out
