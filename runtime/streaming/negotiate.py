"""Which protocol an upgrade speaks: SPDY/3.1 with X-Stream-Protocol-Version, or WebSocket with
Sec-WebSocket-Protocol (/work/shared/streaming.md section 2)."""

from __future__ import annotations

from dataclasses import dataclass

from .http_head import RequestHead, response

PROTOCOL_HEADER = "X-Stream-Protocol-Version"
ACCEPTED_HEADER = "X-Accepted-Stream-Protocol-Versions"

# SPDY, preferred first (the reference's list: no v5 over SPDY; clients treat it as v4)
RC_SPDY = ("v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io")
PF_SPDY = ("portforward.k8s.io",)
# WebSocket subprotocols ("" = the client offered none)
RC_WS = ("v5.channel.k8s.io", "v4.channel.k8s.io", "v4.base64.channel.k8s.io",
         "channel.k8s.io", "base64.channel.k8s.io", "")
PF_TUNNEL = "SPDY/3.1+portforward.k8s.io"     # SPDY port forward inside WebSocket
PF_WS = ("v4.channel.k8s.io", "v4.base64.channel.k8s.io", PF_TUNNEL, "")

# channel protocol version of each remote-command protocol name
RC_VERSION = {"channel.k8s.io": 1, "": 1, "v2.channel.k8s.io": 2, "v3.channel.k8s.io": 3,
              "v4.channel.k8s.io": 4, "base64.channel.k8s.io": 1,
              "v4.base64.channel.k8s.io": 4, "v5.channel.k8s.io": 5}


class Refused(Exception):
    """The upgrade cannot go on; `reply` is the whole HTTP answer."""

    def __init__(self, reply: bytes, message: str) -> None:
        super().__init__(message)
        self.reply = reply


@dataclass(frozen=True)
class Upgrade:
    websocket: bool
    protocol: str     # "" when the client offered none


def is_websocket(head: RequestHead) -> bool:
    return head.has_token("connection", "upgrade") and head.has_token("upgrade", "websocket")


def negotiate(head: RequestHead, spdy: tuple[str, ...], ws: tuple[str, ...]) -> Upgrade:
    """The chosen protocol, or Refused with the 400/403 the reference answers."""
    if is_websocket(head):
        offers = head.values("sec-websocket-protocol")
        if not offers:
            if "" in ws:
                return Upgrade(True, "")
            raise _forbidden(offers, ws, [])
        for offer in offers:
            if offer and offer in ws:
                return Upgrade(True, offer)
        raise _forbidden(offers, tuple(p for p in ws if p), [])
    offers = head.values(PROTOCOL_HEADER)
    chosen = ""
    if offers:
        match = [o for o in offers if o in spdy]
        if not match:
            raise _forbidden(offers, spdy, [(ACCEPTED_HEADER, p) for p in spdy])
        chosen = match[0]
    if not (head.has_token("connection", "upgrade") and head.has_token("upgrade", "spdy/3.1")):
        raise Refused(response(400, body="unable to upgrade: missing upgrade headers in request"),
                      "missing upgrade headers")
    return Upgrade(False, chosen)


def _forbidden(offers: list[str], accepts: tuple[str, ...],
               headers: list[tuple[str, str]]) -> Refused:
    msg = (f"unable to upgrade: unable to negotiate protocol: client supports "
           f"[{' '.join(offers)}], server accepts [{' '.join(accepts)}]")
    return Refused(response(403, headers, msg), msg)


def spdy_switching(protocol: str) -> bytes:
    headers = [("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1")]
    if protocol:
        headers.append((PROTOCOL_HEADER, protocol))
    return response(101, headers)
