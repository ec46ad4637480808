"""Where an image download may connect: denied networks, bounded redirects, watched sockets.

An image name is a URL a tenant chooses, so a pull could make the node fetch from its own
loopback services, the cloud's metadata service or a link-local peer, and store whatever
they answer. Every connection of a download therefore goes through ``NetworkGuard.connect``:
the host is resolved once, *every* address it resolves to is checked against the denied
networks, and the socket connects to those checked addresses, never resolving again, so a
name that resolves to a public address for a check and to 127.0.0.1 for the connection
(DNS rebinding) cannot slip through. TLS still names the original host (SNI, certificate
check) and the request its Host header: only the address is pinned. An IPv6 address that
maps an IPv4 one (``::ffff:127.0.0.1``) is checked in both forms, and so is every IPv4
address, so one list entry covers both spellings.

Redirects are followed only to http(s) URLs of the allowed schemes, at most
``MAX_REDIRECTS`` hops; each hop's connection is checked like the first (and a hop whose
host is a denied address literal is refused before connecting, with a plainer message).
Proxies from the environment are not used: a proxy would connect on the download's behalf,
past these checks.
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import socket
import urllib.parse
import urllib.request
from collections.abc import Iterable
from typing import IO, Any

from ..checks import shown
from ..errors import InvalidArgument, PermissionDenied, Unavailable
from .pull_watch import PullWatch

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Loopback, "this host" (0.0.0.0/8 and ::, which reach the local host too), and link-local,
# which holds the cloud metadata service 169.254.169.254; fd00:ec2::254 is its IPv6 address.
DEFAULT_DENIED_NETWORKS: tuple[str, ...] = (
    "127.0.0.0/8", "::1/128", "0.0.0.0/8", "::/128", "169.254.0.0/16", "fe80::/10",
    "fd00:ec2::254/128",
)
MAX_REDIRECTS = 5


def parse_networks(entries: Iterable[str], what: str = "denied networks") -> tuple[Network, ...]:
    """CIDR networks (a bare address is a /32 or /128); InvalidArgument naming a bad one."""
    out: list[Network] = []
    for entry in entries:
        text = entry.strip()
        if not text:
            continue
        try:
            out.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise InvalidArgument(f"{what}: {shown(text)} is not an IP network "
                                  "(e.g. 127.0.0.0/8 or fe80::/10)") from None
    return tuple(out)


def _forms(address: Address) -> list[Address]:
    """The address and its other spelling: ::ffff:a.b.c.d <-> a.b.c.d."""
    if isinstance(address, ipaddress.IPv6Address):
        plain = ipaddress.IPv6Address(int(address))  # without a %scope
        mapped = plain.ipv4_mapped
        return [plain] if mapped is None else [plain, mapped]
    return [address, ipaddress.IPv6Address(f"::ffff:{address}")]


class NetworkGuard:
    """The networks downloads must not connect to; thread-safe (immutable)."""

    def __init__(self, denied: Iterable[str] = DEFAULT_DENIED_NETWORKS) -> None:
        self.denied = parse_networks(denied)

    def denied_by(self, address: str) -> Network | None:
        """The denied network holding ``address`` (an IP literal), or None."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return None
        for form in _forms(ip):
            for net in self.denied:
                if form.version == net.version and form in net:
                    return net
        return None

    def check(self, host: str, address: str) -> None:
        """PermissionDenied if ``address`` (what ``host`` resolved to) is denied."""
        net = self.denied_by(address)
        if net is None:
            return
        where = (address if host.strip("[]") == address.split("%")[0]
                 else f"{shown(host)}, which resolves to {address},")
        raise PermissionDenied(
            f"{where} is in the denied network {net} (setting image-pull-denied-networks)")

    def connect(self, address: tuple[str, int], timeout: Any = None,
                source_address: tuple[str, int] | None = None) -> socket.socket:
        """socket.create_connection, but to checked addresses only (see the module doc)."""
        host, port = address
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        for info in infos:
            self.check(host, str(info[4][0]))
        error: OSError | None = None
        for family, kind, proto, _name, sockaddr in infos:
            sock = socket.socket(family, kind, proto)
            try:
                if isinstance(timeout, (int, float)):
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                return sock
            except OSError as exc:
                error = exc
                sock.close()
        raise error or OSError(f"{host} resolves to no address")


class _Watched(http.client.HTTPConnection):
    """A connection to checked addresses only, whose socket the download's watch can cut."""

    def __init__(self, *args: Any, watch: PullWatch, guard: NetworkGuard,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._watch = watch
        # http.client's hook for making the socket (HTTPSConnection wraps what it returns).
        self._create_connection = guard.connect

    def connect(self) -> None:
        super().connect()
        self._watch.attach(self.sock)


class _TLSConnection(_Watched, http.client.HTTPSConnection):
    pass


class _Handler(urllib.request.HTTPHandler):
    def __init__(self, watch: PullWatch, guard: NetworkGuard) -> None:
        super().__init__()
        self._make = functools.partial(_Watched, watch=watch, guard=guard)

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._make, req)


class _TLSHandler(urllib.request.HTTPSHandler):
    def __init__(self, watch: PullWatch, guard: NetworkGuard) -> None:
        super().__init__()
        self._make = functools.partial(_TLSConnection, watch=watch, guard=guard)

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._make, req, context=getattr(self, "_context", None))


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows at most MAX_REDIRECTS hops, to allowed http(s) URLs only."""

    # urllib's own loop detection answers with the redirect's HTTPError; ours comes first.
    max_repeats = max_redirections = MAX_REDIRECTS + 1

    def __init__(self, allowed: frozenset[str], guard: NetworkGuard, source: str) -> None:
        self.allowed = allowed
        self.guard = guard
        self.source = source
        self.hops = 0

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int,
                         msg: str, headers: Any, newurl: str) -> urllib.request.Request | None:
        self.hops += 1
        if self.hops > MAX_REDIRECTS:
            raise Unavailable(f"{self.source} redirects more than {MAX_REDIRECTS} times")
        parts = urllib.parse.urlsplit(newurl)
        scheme = parts.scheme.lower()
        if scheme not in self.allowed or scheme not in ("http", "https"):
            raise Unavailable(f"{self.source} redirects to a {shown(scheme or 'relative', 20)} "
                              "URL; refused")
        host = parts.hostname or ""
        self.guard.check(host, host)  # an address literal; names are checked on connect
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def opener(allowed: frozenset[str], guard: NetworkGuard, watch: PullWatch,
           source: str) -> urllib.request.OpenerDirector:
    """The urllib opener of one download: no proxies, guarded redirects and connections."""
    return urllib.request.build_opener(
        urllib.request.ProxyHandler({}), _Redirects(allowed, guard, source),
        _Handler(watch, guard), _TLSHandler(watch, guard))
