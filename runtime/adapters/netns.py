"""Named network namespaces (/run/netns/NAME) and the `ip` command that works inside them.

Everything here runs iproute2's `ip`, never pyroute2: Debian 12 ships pyroute2 0.7, whose
`NetNS` forks a Python proxy process (fork without exec, from a daemon full of gRPC and
libvirt threads), while PyPI's 0.9 is a different library underneath. `ip -n NAME` does
its setns(2) in a fresh exec'd process, the same on every version, and its `-j` output is
stable JSON. A namespace operation costs one fork+exec (a few ms): nothing next to a VM.

Deletes are safe to repeat: deleting a namespace or a link that is gone succeeds.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import socket
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import Internal, InvalidArgument

log = logging.getLogger(__name__)

IP = "ip"
NETNS_DIR = Path("/run/netns")
IP_TIMEOUT = 30.0

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}")


class IPError(Internal):
    """An `ip` command failed; `stderr` holds its message."""

    def __init__(self, message: str, stderr: str = "", **context: object) -> None:
        super().__init__(message, **context)
        self.stderr = stderr


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise InvalidArgument(f"network namespace name {name[:80]!r} is not valid")
    return name


def path(name: str) -> Path:
    """The namespace's file, the CNI_NETNS a plugin gets."""
    return NETNS_DIR / check_name(name)


def ip(
    *args: str,
    netns: str | None = None,
    json_out: bool = False,
    check: bool = True,
    stdin: str | None = None,
) -> Any:
    """Runs `ip [-n NETNS] [-j] ARGS`; returns parsed JSON (json_out) or stdout.

    Raises IPError (an Internal) with ip's message when it fails and `check` is set;
    with check=False a failure returns None.
    """
    argv = [IP]
    if netns is not None:
        argv += ["-n", check_name(netns)]
    if json_out:
        argv.append("-j")
    argv += list(args)
    try:
        r = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                           timeout=IP_TIMEOUT, check=False)
    except FileNotFoundError:
        raise Internal("the ip command (package iproute2) is not installed") from None
    except subprocess.TimeoutExpired:
        raise Internal(f"{' '.join(argv)} did not finish in {IP_TIMEOUT:.0f} s") from None
    if r.returncode != 0:
        if not check:
            return None
        err = r.stderr.strip()
        raise IPError(f"{' '.join(argv)} failed: {err}", stderr=err)
    if json_out:
        out = r.stdout.strip()
        return json.loads(out) if out else []
    return r.stdout


def exists(name: str) -> bool:
    return path(name).exists()


def create(name: str) -> None:
    """Creates the namespace with its loopback up; an existing one is reused."""
    if not exists(name):
        try:
            ip("netns", "add", name)
        except IPError:
            if not exists(name):  # a concurrent create is fine; anything else is not
                raise
    ip("link", "set", "lo", "up", netns=name)


def delete(name: str) -> None:
    """Removes the namespace's name; gone already is success.

    The namespace itself ends when nothing uses it any more (no process, no open fd).
    """
    if not exists(name):
        return
    try:
        ip("netns", "delete", name)
    except IPError as e:
        if exists(name):
            raise Internal(f"deleting network namespace {name} failed: {e.stderr}") from e


def names() -> list[str]:
    try:
        return sorted(e.name for e in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def exec_argv(name: str, argv: Sequence[str]) -> list[str]:
    """The command line that runs `argv` inside the namespace."""
    return [IP, "netns", "exec", check_name(name), *argv]


def link(name: str, netns: str | None = None) -> dict[str, Any] | None:
    """One link as `ip -j -d link show` describes it, or None if there is no such link."""
    if netns is not None and not exists(netns):
        return None
    data = ip("-d", "link", "show", "dev", name, netns=netns, json_out=True, check=False)
    if not data:
        return None
    return dict(data[0])


def delete_link(name: str, netns: str | None = None) -> None:
    """Deletes a link; a missing link (or namespace) is success."""
    if netns is not None and not exists(netns):
        return
    if ip("link", "delete", "dev", name, netns=netns, check=False) is None \
            and link(name, netns) is not None:
        raise Internal(f"deleting link {name} in {netns or 'the root namespace'} failed")


_CLONE_NEWNET = 0x40000000


def socket_in(name: str, family: int = socket.AF_INET6,
              kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket that belongs to the namespace: made by a short-lived thread that entered
    it with setns(2) (which moves only the calling thread). The socket stays in that
    namespace for its life, whichever thread uses it."""
    out: list[socket.socket | BaseException] = []

    def make() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            with open(path(name)) as ns:
                if libc.setns(ns.fileno(), _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {name}: {os.strerror(err)}")
            out.append(socket.socket(family, kind))
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

