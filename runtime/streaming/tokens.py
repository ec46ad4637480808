"""Single-use tokens that key a streaming URL to the CRI request it was issued for.

As the kubelet's streaming server: 8 characters (unpadded URL-safe base64 of 6 random
bytes), valid 60 s from issue, removed by their first use, at most 1000 live (more is
RESOURCE_EXHAUSTED). A token is bound to its route: an exec token on /attach/ is unknown.
"""

from __future__ import annotations

import base64
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ResourceExhausted

TOKEN_TTL = 60.0
MAX_TOKENS = 1000


@dataclass(frozen=True)
class ExecRequest:
    container_id: str
    cmd: tuple[str, ...]
    tty: bool
    stdin: bool
    stdout: bool
    stderr: bool


@dataclass(frozen=True)
class AttachRequest:
    container_id: str
    tty: bool
    stdin: bool
    stdout: bool
    stderr: bool


@dataclass(frozen=True)
class PortForwardRequest:
    sandbox_id: str
    ports: tuple[int, ...]


Request = ExecRequest | AttachRequest | PortForwardRequest

ROUTES: dict[str, type[ExecRequest] | type[AttachRequest] | type[PortForwardRequest]] = {
    "exec": ExecRequest, "attach": AttachRequest, "portforward": PortForwardRequest}


def new_token() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(6)).decode().rstrip("=")


class TokenCache:
    """Thread-safe: the RPCs issue on gRPC threads, the server consumes on its own."""

    def __init__(self, ttl: float = TOKEN_TTL, max_live: int = MAX_TOKENS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._max = max_live
        self._clock = clock
        self._lock = threading.Lock()
        self._live: OrderedDict[str, tuple[float, Request]] = OrderedDict()  # issue order

    def _expire(self, now: float) -> None:
        while self._live:
            token, (deadline, _) = next(iter(self._live.items()))
            if deadline > now:
                return
            del self._live[token]

    def issue(self, request: Request) -> str:
        with self._lock:
            now = self._clock()
            self._expire(now)
            if len(self._live) >= self._max:
                raise ResourceExhausted(
                    f"maximum number of in-flight streaming requests ({self._max}) exceeded")
            token = new_token()
            while token in self._live:
                token = new_token()
            self._live[token] = (now + self._ttl, request)
            return token

    def consume(self, route: str, token: str) -> Request | None:
        """The request for `token` if it is live and was issued for `route`; removes it
        (even for the wrong route, as a token is never good twice)."""
        with self._lock:
            self._expire(self._clock())
            entry = self._live.pop(token, None)
        if entry is None:
            return None
        request = entry[1]
        return request if isinstance(request, ROUTES.get(route, ())) else None

    def __len__(self) -> int:
        with self._lock:
            self._expire(self._clock())
            return len(self._live)
