"""A TCP connection to a pod's VM made inside the pod's network namespace (PortForward).

The socket is made by netns.socket_in (a short-lived thread that setns(2)s into the
namespace); connecting it then happens from the caller's thread, and it stays in the pod's
namespace for its life. Failures become the runtime's errors with a message naming the
port, the address and why: refused (nothing listens), unreachable, or no answer in time.
"""

from __future__ import annotations

import errno
import ipaddress
import socket

from ..errors import DeadlineExceeded, InvalidArgument, RuntimeError_, Unavailable
from . import netns


def connect(netns_name: str, address: str, port: int, timeout: float) -> socket.socket:
    """A connected, blocking TCP socket to address:port from inside `netns_name`."""
    if not 1 <= port <= 65535:
        raise InvalidArgument(f"port {port} is not a TCP port (1-65535)")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise InvalidArgument(f"{address[:80]!r} is not an IP address") from None
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    where = f"port {port} of {address} (in network namespace {netns_name})"
    sock = netns.socket_in(netns_name, family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((str(ip), port))
        sock.settimeout(None)
        return sock
    except BaseException as e:
        sock.close()
        raise _failed(where, timeout, e) from e


def _failed(where: str, timeout: float, e: BaseException) -> BaseException:
    if isinstance(e, RuntimeError_) or not isinstance(e, OSError):
        return e
    if isinstance(e, TimeoutError) or e.errno == errno.ETIMEDOUT:
        return DeadlineExceeded(f"connecting to {where}: no answer within {timeout:g} s")
    if isinstance(e, ConnectionRefusedError):
        return Unavailable(f"connecting to {where}: connection refused (nothing listens on "
                           "that port in the guest)")
    if e.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return Unavailable(f"connecting to {where}: {e.strerror} (the VM is not reachable "
                           "from its pod's network namespace)")
    return Unavailable(f"connecting to {where} failed: {e.strerror or e}")
