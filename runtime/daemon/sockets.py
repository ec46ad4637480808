"""The listening socket: one the daemon creates itself, or one systemd hands over.

Created sockets follow containerd's rules: the file is mode 0660 with a configurable
group, in a directory only root can write, and an existing socket file is replaced only
when no daemon answers on it.

Socket activation: grpcio cannot serve on an inherited listening socket (binding the
same path would unlink systemd's socket and strand the connection that triggered the
start). So grpcio listens on a private socket in a root-only directory, and a small
asyncio relay accepts on systemd's socket and splices each connection to it. The relay
is byte-for-byte (HTTP/2 passes through untouched); bench/socket_latency.py measures its
cost per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import logging
import os
import socket
import stat
from collections.abc import Iterator, MutableMapping

from ..errors import StartupError

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
_CHUNK = 256 * 1024


def inherited_socket(env: MutableMapping[str, str] | None = None) -> socket.socket | None:
    """The listening unix socket systemd passed us (LISTEN_FDS), or None.

    The LISTEN_* variables are removed so that children (CNI plugins, qemu-img) do not
    believe the descriptors are theirs.
    """
    if env is None:
        env = os.environ
    try:
        pid = int(env.get("LISTEN_PID", "0"))
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return None
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    if pid != os.getpid() or count < 1:
        return None
    if count > 1:
        log.warning("systemd passed %d sockets; serving on the first only", count)
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise StartupError("the socket systemd passed is not a unix stream socket")
    os.set_inheritable(sock.fileno(), False)
    return sock


def _check_parent(path: str) -> None:
    parent = os.path.dirname(path) or "/"
    try:
        os.makedirs(parent, mode=0o711, exist_ok=True)
        st = os.stat(parent)
    except OSError as e:
        raise StartupError(f"cannot create the socket directory {parent}: {e.strerror}") from e
    # Anyone who can write the directory could swap the socket for their own.
    if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StartupError(
            f"socket directory {parent} must be owned by uid {os.geteuid()} "
            "and writable by it alone"
        )


def answers(path: str, timeout: float = 1.0) -> bool:
    """True when something accepts connections on the unix socket at path."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(timeout)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def clear_stale(path: str) -> None:
    """Removes a socket file left by a dead daemon; refuses to touch anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"{path} exists and is not a socket; refusing to replace it")
    if answers(path):
        raise StartupError(f"another daemon is already serving on {path}")
    log.info("removing stale socket %s (nothing answers on it)", path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def prepare_path(path: str) -> None:
    _check_parent(path)
    clear_stale(path)


@contextlib.contextmanager
def private_umask() -> Iterator[None]:
    """Sockets bound inside are created 0600; permissions are widened explicitly after."""
    old = os.umask(0o177)
    try:
        yield
    finally:
        os.umask(old)


def set_permissions(path: str, group: str) -> None:
    gid = -1
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError as e:
            raise StartupError(f"socket group {group!r} does not exist") from e
    os.chown(path, -1, gid)
    os.chmod(path, 0o660)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()


class Relay:
    """Accepts on the inherited socket and splices each connection to grpcio's socket."""

    def __init__(self, listener: socket.socket, target: str) -> None:
        self._listener = listener
        self._target = target
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._listener.setblocking(False)
        self._server = await asyncio.start_unix_server(self._serve, sock=self._listener)

    async def _serve(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            s_reader, s_writer = await asyncio.open_unix_connection(self._target)
        except OSError as e:
            log.error("relay: cannot reach the gRPC server at %s: %s", self._target, e)
            c_writer.close()
            self._conns.discard(task)
            return
        try:
            await asyncio.gather(_pump(c_reader, s_writer), _pump(s_reader, c_writer))
        finally:
            for w in (c_writer, s_writer):
                w.close()
            self._conns.discard(task)

    def stop_accepting(self) -> None:
        """Stops taking new connections; the ones open go on until the gRPC server closes."""
        if self._server is not None:
            self._server.close()

    async def wait_closed(self, timeout: float) -> None:
        if self._conns:
            await asyncio.wait(set(self._conns), timeout=timeout)
        for t in self._conns:
            t.cancel()


def remove_socket(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as e:
        if e.errno != errno.ENOENT:
            log.warning("cannot remove socket %s: %s", path, e)
