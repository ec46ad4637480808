"""Named network namespaces (/run/netns/NAME), the netlink socket and the commands that
work inside them.

Links inside a namespace are driven over netlink (adapters/netlink.py) through a socket made
by `socket_in`: a short-lived thread setns(2)s into the namespace, makes the socket and
ends, and the socket stays in that namespace whichever thread uses it. That replaces
pyroute2's `NetNS`, which on Debian 12's pyroute2 0.7 forks a Python proxy process (fork
without exec, from a daemon full of gRPC and libvirt threads).

Making and removing the namespace itself stays with `ip netns add/delete` (one fork each,
per pod): it also makes /run/netns a shared mount so the name is seen in every mount
namespace. Programs run in a namespace (dnsmasq) through `ip netns exec`, whose setns
happens in a fresh exec'd process. Both go through proc.run.

Deletes are safe to repeat: deleting a namespace or a link that is gone succeeds.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import socket
import threading
from collections.abc import Sequence
from pathlib import Path

from ..errors import AlreadyExists, Internal, InvalidArgument, NotFound
from . import netlink, proc

log = logging.getLogger(__name__)

IP = "ip"
NETNS_DIR = Path("/run/netns")
IP_TIMEOUT = 30.0

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}")


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise InvalidArgument(f"network namespace name {name[:80]!r} is not valid")
    return name


def path(name: str) -> Path:
    """The namespace's file, the CNI_NETNS a plugin gets."""
    return NETNS_DIR / check_name(name)


def exists(name: str) -> bool:
    return path(name).exists()


def where(name: str | None) -> str:
    """How messages name a namespace."""
    return netlink.ROOT if name is None else f"network namespace {name}"


def create(name: str, *, exclusive: bool = False) -> None:
    """Creates the namespace with its loopback up; an existing one is reused, or with
    `exclusive` refused (AlreadyExists): then it is someone else's, e.g. another runtime's
    on the same host, and nothing of it is touched."""
    if exclusive and exists(name):
        raise AlreadyExists(f"network namespace {name} already exists")
    if not exists(name):
        try:
            proc.run([IP, "netns", "add", name], timeout=IP_TIMEOUT,
                     what=f"creating network namespace {name}", failure=Internal)
        except Internal:
            if not exists(name):  # another creator came first; anything else is an error
                raise
            if exclusive:
                raise AlreadyExists(f"network namespace {name} already exists") from None
    with open_netlink(name) as nl:
        nl.set("lo", up=True)


def delete(name: str) -> None:
    """Removes the namespace's name; gone already is success.

    The namespace itself ends when nothing uses it any more (no process, no open fd).
    """
    if not exists(name):
        return
    try:
        proc.run([IP, "netns", "delete", name], timeout=IP_TIMEOUT,
                 what=f"deleting network namespace {name}", failure=Internal)
    except Internal:
        if exists(name):
            raise


def names() -> list[str]:
    try:
        return sorted(e.name for e in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def exec_argv(name: str, argv: Sequence[str]) -> list[str]:
    """The command line that runs `argv` inside the namespace."""
    return [IP, "netns", "exec", check_name(name), *argv]


def open_netlink(name: str | None = None) -> netlink.Netlink:
    """A netlink session in the namespace (None: the root namespace); NotFound when the
    namespace does not exist. Close it (it is a context manager)."""
    if name is None:
        return netlink.Netlink()
    if not exists(name):
        raise NotFound(f"network namespace {name} does not exist")
    sock = socket_in(name, socket.AF_NETLINK, socket.SOCK_DGRAM, socket.NETLINK_ROUTE)
    try:
        return netlink.Netlink(sock, where(name))
    except BaseException:
        sock.close()
        raise


def link(name: str, netns: str | None = None) -> netlink.Link | None:
    """The link, or None if there is no such link (or namespace)."""
    try:
        with open_netlink(netns) as nl:
            return nl.link(name)
    except NotFound:
        return None


def delete_link(name: str, netns: str | None = None) -> None:
    """Deletes a link; a missing link (or namespace) is success."""
    try:
        with open_netlink(netns) as nl:
            nl.delete(name)
    except NotFound:
        pass


_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def socket_in(name: str, family: int = socket.AF_INET6,
              kind: int = socket.SOCK_STREAM, proto: int = 0) -> socket.socket:
    """A socket that belongs to the namespace: made by a short-lived thread that entered
    it with setns(2) (which moves only the calling thread). The socket stays in that
    namespace for its life, whichever thread uses it."""
    out: list[socket.socket | BaseException] = []

    def make() -> None:
        try:
            with open(path(name)) as ns:
                if _libc.setns(ns.fileno(), _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {name}: {os.strerror(err)}")
            out.append(socket.socket(family, kind, proto))
        except BaseException as e:
            out.append(e)

    t = threading.Thread(target=make, name=f"netns-{name}"[:15], daemon=True)
    t.start()
    t.join()
    result = out[0]
    if isinstance(result, BaseException):
        if isinstance(result, FileNotFoundError):
            raise Internal(f"network namespace {name} does not exist") from None
        raise Internal(f"cannot make a socket in network namespace {name}: {result}")
    return result

