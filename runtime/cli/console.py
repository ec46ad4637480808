"""`console POD`: a VM's serial console through the daemon, as `kubectl attach -it` gets it.

The CLI asks the daemon's Attach RPC for a URL and speaks the streaming server's WebSocket
channel protocol (v4.channel.k8s.io: one byte of channel, then data) to it, so the console
is shared with every other attacher and the CRI log keeps receiving it (virtlogd writes
the log, not the attachers). Ctrl-] (the escape key, as in `virsh console`) detaches; the
VM keeps running. A second writer is refused unless --force: ContainerStatus' verbose
info counts the attachers with stdin.

On a terminal, stdin is put in raw mode (restored on exit). From a pipe, the lines read
are sent as typed; at its end the console stays open --linger seconds for the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import termios
import threading
import tty
from collections.abc import Iterator
from typing import Any, BinaryIO
from urllib.parse import urlsplit, urlunsplit

import websockets.client
import websockets.exceptions
from websockets.typing import Subprotocol

from .client import Client, CliError, pb
from .views import resolve

ESCAPE = b"\x1d"  # Ctrl-]
PROTOCOL = "v4.channel.k8s.io"
STDIN, STDOUT, STDERR, ERROR = 0, 1, 2, 3


def running_vm(c: Client, pod: str) -> tuple[Any, Any]:
    sb = resolve(c, pod)
    vms = [v for v in c.containers(sb.id) if v.state == pb.CONTAINER_RUNNING]
    if not vms:
        raise CliError(f"pod {sb.metadata.namespace}/{sb.metadata.name} has no running VM")
    return sb, vms[-1]


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[bool]:
    if not os.isatty(fd):
        yield False
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def ws_url(url: str) -> str:
    u = urlsplit(url)
    return urlunsplit(("wss" if u.scheme == "https" else "ws", u.netloc, u.path, u.query, ""))


async def session(url: str, fd: int, out: BinaryIO, is_tty: bool, linger: float) -> str:
    """Pumps until the escape key, the end of a piped stdin (+ linger), or the stream's
    end; returns why it ended ("" for the escape key)."""
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[str] = loop.create_future()
    queue: asyncio.Queue[bytes] = asyncio.Queue()

    def finish(reason: str) -> None:
        if not ended.done():
            ended.set_result(reason)

    def on_input(data: bytes) -> None:  # on the loop, for what the reader thread read
        if not data:
            loop.call_later(linger, finish, "")
            return
        if ESCAPE in data:
            data = data.split(ESCAPE, 1)[0]
            if data:
                queue.put_nowait(data)
            loop.call_soon(finish, "")
            return
        if not is_tty:
            data = data.replace(b"\n", b"\r")  # a serial console's Enter
        queue.put_nowait(data)

    async with websockets.client.connect(ws_url(url), subprotocols=[Subprotocol(PROTOCOL)],
                                          max_size=2**24, ping_interval=None,
                                          open_timeout=30) as ws:

        async def send() -> None:
            while True:
                data = await queue.get()
                await ws.send(bytes([STDIN]) + data)

        async def receive() -> None:
            try:
                async for msg in ws:
                    if isinstance(msg, str) or not msg:
                        continue
                    if msg[0] in (STDOUT, STDERR):
                        out.write(msg[1:])
                        out.flush()
                    elif msg[0] == ERROR and msg[1:].strip():
                        finish(f"the daemon ended the console: {msg[1:].decode(errors='replace')}")
            except websockets.exceptions.ConnectionClosedError as e:
                finish(f"connection lost: {e}")
            finish("the console stream ended (the VM stopped?)")

        def read_stdin() -> None:  # a thread: stdin may be a file or /dev/null (no epoll)
            while not ended.done():
                try:
                    data = os.read(fd, 4096)
                except OSError as e:
                    loop.call_soon_threadsafe(finish, f"reading stdin: {e.strerror}")
                    return
                with contextlib.suppress(RuntimeError):  # the loop closed: we are done
                    loop.call_soon_threadsafe(on_input, data)
                if not data:
                    return

        threading.Thread(target=read_stdin, name="console-stdin", daemon=True).start()
        tasks = [asyncio.create_task(send()), asyncio.create_task(receive())]
        try:
            reason = await ended
            while not queue.empty():
                await asyncio.sleep(0.05)
            return reason
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def run(c: Client, pod: str, force: bool, linger: float) -> int:
    sb, vm = running_vm(c, pod)
    _, info = c.container_status(vm.id)
    writers = int(info.get("consoleWriters") or 0)
    if writers and not force:
        raise CliError(f"the console of {sb.metadata.namespace}/{sb.metadata.name} already has "
                       f"{writers} writer(s) (kubectl attach or another console); "
                       "--force to type alongside")
    url = c.attach_url(vm.id)
    fd = sys.stdin.fileno()
    print(f"Connected to the console of {sb.metadata.namespace}/{sb.metadata.name} "
          f"(VM {vm.id[:12]}); escape character is ^]", file=sys.stderr, flush=True)
    try:
        with raw_terminal(fd) as is_tty:
            reason = asyncio.run(session(url, fd, sys.stdout.buffer, is_tty, linger))
    except (OSError, websockets.exceptions.WebSocketException) as e:
        raise CliError(f"console of {sb.metadata.namespace}/{sb.metadata.name}: "
                       f"{url.split('/attach/')[0]}: {e}") from None
    print(f"\r\nDisconnected{': ' + reason if reason else ''}", file=sys.stderr, flush=True)
    return 0 if not reason or "ended (the VM" in reason else 1
