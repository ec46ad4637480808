"""The HTTP/1.1 request head before an upgrade: read bounded, answered with a short response.

Only what the streaming routes need: a request line and header lines, at most MAX_HEAD bytes
and MAX_HEADERS lines within a deadline; anything else is a 400 and the connection closes.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

MAX_HEAD = 16 * 1024
MAX_HEADERS = 100
HEAD_TIMEOUT = 30.0

REASONS = {101: "Switching Protocols", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 431: "Request Header Fields Too Large",
           503: "Service Unavailable"}


class HeadError(Exception):
    """The head cannot be served; `status` says how to answer (0: just close)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class RequestHead:
    method: str
    target: str
    headers: tuple[tuple[str, str], ...]   # (lowercased name, value) in arrival order
    raw: bytes = b""                         # the head as received, final CRLF CRLF included

    def get_all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name.lower()]

    def values(self, name: str) -> list[str]:
        """Every comma-separated element of every `name` line, stripped, empty ones dropped."""
        return [x.strip() for v in self.get_all(name) for x in v.split(",") if x.strip()]

    def has_token(self, name: str, token: str) -> bool:
        return token.lower() in (x.lower() for x in self.values(name))

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


def read_head(sock: socket.socket, timeout: float = HEAD_TIMEOUT) -> tuple[RequestHead, bytes]:
    """The request head and the bytes read past it. Sets and leaves a socket timeout."""
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\r\n\r\n" not in buf:
        if len(buf) > MAX_HEAD:
            raise HeadError(431, f"request head over {MAX_HEAD} bytes")
        left = deadline - time.monotonic()
        if left <= 0:
            raise HeadError(0, "request head not complete in time")
        sock.settimeout(left)
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            raise HeadError(0, "request head not complete in time") from None
        if not chunk:
            raise HeadError(0, "connection closed before the request head ended")
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    if len(head) > MAX_HEAD:
        raise HeadError(431, f"request head over {MAX_HEAD} bytes")
    parsed = parse_head(head)
    return RequestHead(parsed.method, parsed.target, parsed.headers, head + b"\r\n\r\n"), rest


def parse_head(head: bytes) -> RequestHead:
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise HeadError(400, "request head is not text") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
        raise HeadError(400, "malformed request line")
    if len(lines) - 1 > MAX_HEADERS:
        raise HeadError(431, f"more than {MAX_HEADERS} header lines")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or any(c in name for c in " \t"):
            raise HeadError(400, "malformed header line")
        headers.append((name.lower(), value.strip()))
    return RequestHead(parts[0], parts[1], tuple(headers))


def response(status: int, headers: list[tuple[str, str]] | None = None, body: str = "") -> bytes:
    """A complete response; a body (plain text) closes the connection after it."""
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}"]
    for name, value in headers or ():
        lines.append(f"{name}: {value}")
    if status != 101:
        data = (body + "\n").encode() if body else b""
        lines += ["Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(data)}",
                  "Connection: close"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + data
    return ("\r\n".join(lines) + "\r\n\r\n").encode()
