"""Links, bridges, taps, addresses and routes over rtnetlink (pyroute2), in the root network
namespace or in a named one, with netlink errors turned into the runtime's in one place.

Written for pyroute2 0.7.2, Debian 12's, which the .deb runs on:
- No `NetNS`: it forks a Python proxy process without exec, unsafe in a daemon full of gRPC
  and libvirt threads. A netlink socket belongs to the namespace it was made in, for its
  life, whichever thread uses it: `netns.netlink` makes it from a short-lived thread that
  setns(2)s there, and `IPRoute(fileno=...)` drives it from the caller's thread.
- Taps are made with the TUNSETIFF and TUNSETPERSIST ioctls, as `ip tuntap add` does:
  IPRoute's own tuntap path starts a watching thread and a second socket per tap.
- A `Netlink` is one socket for one adapter call; it is not shared between threads.
- Every NetlinkError or OSError goes through `failed`: the message names the operation,
  the link and the namespace, and errno picks the class (a missing link is NotFound).
  Deletes are delete-if-present: a link that is gone is success.
- pyroute2 is imported on the first `Netlink` made, not with this module: it is a fifth of
  the daemon's imports (about 120 ms), and a socket-activated daemon answers its first
  call (Version, a relist) before any pod network is touched.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import ipaddress
import logging
import os
import platform
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import (
    AlreadyExists,
    Internal,
    NotFound,
    ResourceExhausted,
    RuntimeError_,
    Unavailable,
)

if TYPE_CHECKING:
    from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

ROOT = "the root namespace"
IFF_UP, IFF_RUNNING = 0x1, 0x40
IFA_F_NODAD = 0x02
SCOPE_GLOBAL, SCOPE_LINK = 0, 253
RT_TABLE_MAIN = 254
ADDR_GEN_MODE_NONE = 1
# linux/if_tun.h: _IOW('T', 202 and 203, int); powerpc, mips and sparc put "write" elsewhere
_IOC_WRITE = 0x80000000 if platform.machine().startswith(("ppc", "mips", "sparc")) else 0x40000000
TUNSETIFF, TUNSETPERSIST = (_IOC_WRITE | 4 << 16 | ord("T") << 8 | nr for nr in (202, 203))
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000

T = TypeVar("T")

# errno -> the runtime's error; anything else is Internal (a request we got wrong).
_CLASSES: dict[int, type[RuntimeError_]] = {
    errno.ENODEV: NotFound, errno.ENOENT: NotFound, errno.ESRCH: NotFound,
    errno.EADDRNOTAVAIL: NotFound,
    errno.EEXIST: AlreadyExists,
    errno.EBUSY: Unavailable, errno.EAGAIN: Unavailable, errno.EINTR: Unavailable,
    errno.ENOBUFS: ResourceExhausted, errno.ENOMEM: ResourceExhausted,
    errno.ENOSPC: ResourceExhausted, errno.EMFILE: ResourceExhausted,
    errno.ENFILE: ResourceExhausted,
}


@functools.cache
def _pyroute2() -> tuple[Any, type[Exception]]:
    """(IPRoute, NetlinkError), imported on first use."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
    return IPRoute, NetlinkError


def failed(op: str, link: str, where: str, e: NetlinkError | OSError) -> RuntimeError_:
    """The one translation of a netlink (or tap ioctl) failure into the runtime's errors."""
    code = (e.errno if isinstance(e, OSError) else e.code) or 0
    reason = os.strerror(code) if code else str(e)
    if code in (errno.EPERM, errno.EACCES):
        reason += " (the daemon needs CAP_NET_ADMIN)"
    cls = _CLASSES.get(code, Internal)
    return cls(f"{op} {link} in {where} failed: {reason}", errno=code, op=op, link=link,
               netns=where)


@dataclass(frozen=True)
class Link:
    name: str
    index: int
    mac: str  # lower case; "" for a link without one
    mtu: int
    flags: int
    master: int  # the bridge's ifindex, 0 for none
    kind: str  # "bridge", "veth", "tun", ...; "" when the kernel names none
    rx_bytes: int = 0
    rx_errors: int = 0
    tx_bytes: int = 0
    tx_errors: int = 0

    @property
    def up(self) -> bool:
        return bool(self.flags & IFF_UP)

    @property
    def opened(self) -> bool:
        """For a tap: up with carrier, which it has exactly while a process (QEMU) holds it."""
        return bool(self.flags & IFF_UP and self.flags & IFF_RUNNING)

    @classmethod
    def from_msg(cls, msg: Any) -> Link:
        info = msg.get_attr("IFLA_LINKINFO")
        kind = (info.get_attr("IFLA_INFO_KIND") if info is not None else None) or ""
        st = msg.get_attr("IFLA_STATS64") or {}
        return cls(name=msg.get_attr("IFLA_IFNAME"), index=int(msg["index"]),
                   mac=str(msg.get_attr("IFLA_ADDRESS") or "").lower(),
                   mtu=int(msg.get_attr("IFLA_MTU") or 0), flags=int(msg["flags"]),
                   master=int(msg.get_attr("IFLA_MASTER") or 0), kind=kind,
                   rx_bytes=int(st.get("rx_bytes", 0)), rx_errors=int(st.get("rx_errors", 0)),
                   tx_bytes=int(st.get("tx_bytes", 0)), tx_errors=int(st.get("tx_errors", 0)))


@dataclass(frozen=True)
class Address:
    cidr: str  # "10.88.0.5/16", "fe80::1/64"
    family: int
    scope: int  # SCOPE_GLOBAL, SCOPE_LINK, ...


@dataclass(frozen=True)
class Route:
    dst: str  # CIDR; "" for the default route
    gateway: str  # "" for an on-link route
    family: int


class Netlink:
    """One rtnetlink socket in one namespace; a context manager that closes it."""

    def __init__(self, sock: socket.socket | None = None, where: str = ROOT) -> None:
        """`sock`: a NETLINK_ROUTE socket made in the namespace (None: the caller's, root)."""
        self.where = where
        # name -> ifindex of links this session saw: an index is never reused while the
        # session lives (the kernel counts them up), so one lookup per link is enough
        self._indexes: dict[str, int] = {}
        fd = sock.detach() if sock is not None else None
        try:
            ip_route, self._error = _pyroute2()
            self._ipr = ip_route(fileno=fd) if fd is not None else ip_route()
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise

    def close(self) -> None:
        self._ipr.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _call(self, op: str, link: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except (self._error, OSError) as e:
            raise failed(op, link, self.where, e) from None

    # -- reading -------------------------------------------------------------------------

    def link(self, name: str) -> Link | None:
        """The link, or None when there is none by that name."""
        try:
            msgs = self._call("reading link", name, self._ipr.link, "get", ifname=name)
        except NotFound:
            self._indexes.pop(name, None)
            return None
        link = Link.from_msg(msgs[0])
        self._indexes[name] = link.index
        return link

    def index(self, name: str) -> int:
        """The link's ifindex; NotFound naming it when there is none."""
        if name not in self._indexes and self.link(name) is None:
            raise failed("finding link", name, self.where, OSError(errno.ENODEV, ""))
        return self._indexes[name]

    def links(self) -> list[Link]:
        return [Link.from_msg(m) for m in self._call("listing links", "", self._ipr.get_links)]

    def addresses(self, name: str) -> list[Address]:
        """The link's addresses, IPv4 first, in the kernel's order."""
        index = self.index(name)
        out = []
        for m in self._call("reading the addresses of", name, self._ipr.get_addr):
            if m["index"] != index:
                continue
            local = m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")
            out.append(Address(f"{local}/{m['prefixlen']}", int(m["family"]), int(m["scope"])))
        return out

    def routes(self, name: str) -> list[Route]:
        """Routes of the main table leaving through the link, IPv4 then IPv6."""
        index = self.index(name)
        out = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for m in self._call("reading the routes of", name, self._ipr.route, "dump",
                                family=family):
                table = m.get_attr("RTA_TABLE") or m["table"]
                if table != RT_TABLE_MAIN or m.get_attr("RTA_OIF") != index:
                    continue
                dst = m.get_attr("RTA_DST")
                out.append(Route(dst=f"{dst}/{m['dst_len']}" if dst else "",
                                 gateway=m.get_attr("RTA_GATEWAY") or "", family=family))
        return out

    # -- changing ------------------------------------------------------------------------

    def add_bridge(self, name: str) -> None:
        self._call("creating bridge", name, self._ipr.link, "add", ifname=name, kind="bridge")

    def set(self, name: str, *, mac: str | None = None, mtu: int | None = None,
            master: str | None = None, up: bool | None = None) -> None:
        """Sets what is given in one request (the master is a bridge's name)."""
        index = self.index(name)
        fields: dict[str, Any] = {}
        if mac is not None:
            fields["address"] = mac
        if mtu is not None:
            fields["mtu"] = mtu
        if master is not None:
            fields["master"] = self.index(master)
        if up is not None:
            fields["state"] = "up" if up else "down"
        op = "setting " + ", ".join(f"{k} {v}" for k, v in fields.items()) + " of link"
        self._call(op, name, self._ipr.link, "set", index=index, **fields)

    def no_ipv6_link_local(self, name: str) -> bool:
        """addrgenmode none: the namespace's side is no host on this wire. False (logged)
        when the kernel refuses, e.g. with IPv6 off; nothing depends on it."""
        spec = {"attrs": [["AF_INET6", {"attrs": [["IFLA_INET6_ADDR_GEN_MODE",
                                                    ADDR_GEN_MODE_NONE]]}]]}
        try:
            index = self.index(name)
            self._call("setting addrgenmode none of link", name, self._ipr.link, "set",
                       index=index, af_spec=spec)
        except RuntimeError_ as e:
            log.debug("%s", e)
            return False
        return True

    def add_address(self, name: str, cidr: str, *, nodad: bool = False) -> None:
        iface = ipaddress.ip_interface(cidr)
        index = self.index(name)
        self._call(f"adding address {cidr} to", name, self._ipr.addr, "add", index=index,
                   address=str(iface.ip), prefixlen=iface.network.prefixlen,
                   flags=IFA_F_NODAD if nodad else 0)

    def replace_host_route(self, name: str, address: str, source: str) -> None:
        """A /32 (or /128) route to `address` on-link through the link, answered from
        `source`: idempotent (replace)."""
        ip = ipaddress.ip_address(address)
        index = self.index(name)
        self._call(f"adding a route to {ip} through", name, self._ipr.route, "replace",
                   dst=f"{ip}/{ip.max_prefixlen}", oif=index, prefsrc=source,
                   scope=SCOPE_LINK, family=socket.AF_INET if ip.version == 4
                   else socket.AF_INET6)

    def flush_addresses(self, name: str) -> None:
        """Removes every address of the link (deleting a primary IPv4 address can take its
        secondaries with it: one gone already is fine)."""
        index = self.index(name)
        for _ in range(3):
            left = [m for m in self._call("reading the addresses of", name, self._ipr.get_addr)
                    if m["index"] == index]
            if not left:
                return
            for m in left:
                address = m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")
                with contextlib.suppress(NotFound):
                    self._call(f"deleting address {address} of", name, self._ipr.addr, "del",
                               index=index, address=address, prefixlen=m["prefixlen"],
                               family=m["family"])
        raise Internal(f"the addresses of {name} in {self.where} keep coming back")

    def move(self, name: str, target: Path, target_name: str) -> None:
        """Moves the link into the namespace whose file is `target`."""
        index = self.index(name)
        op = f"moving to network namespace {target_name} link"
        try:
            fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise failed(op, name, self.where, e) from None
        try:
            self._call(op, name, self._ipr.link, "set", index=index, net_ns_fd=fd)
        finally:
            os.close(fd)
        self._indexes.pop(name, None)

    def delete(self, name: str) -> bool:
        """Deletes the link; a missing one is success. True when this call deleted it."""
        if name not in self._indexes and self.link(name) is None:
            return False
        index = self._indexes.pop(name)
        try:
            self._call("deleting link", name, self._ipr.link, "del", index=index)
        except NotFound:
            return False
        return True


def make_tap(name: str) -> None:
    """A persistent tap (no packet info header) in the calling thread's namespace, down and
    unopened, as `ip tuntap add dev NAME mode tap` makes it. Like ip, an unopened tap of
    that name is taken as it is; one held open fails (EBUSY: Unavailable)."""
    ifr = struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI)
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise failed("creating tap", name, ROOT, e) from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, ifr)
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    except OSError as e:
        raise failed("creating tap", name, ROOT, e) from None
    finally:
        os.close(fd)
