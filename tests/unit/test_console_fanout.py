"""ConsoleAttach's fan-out with a fake at its ConsoleOpener interface (the libvirt console
adapter; a real console cannot be made to flood, stall or drop on cue, the integration test
test_console_attach drives the real one): one stream per VM while anyone is attached,
bounded per-attacher buffers (a slow attacher loses the oldest output and slows nobody),
input from every attacher, the container's stdin honoured, resize ignored, and the end of
the stream or io.gone ending attach."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from arktos_vm_runtime.errors import FailedPrecondition, NotFound, Unavailable
from arktos_vm_runtime.service.console_attach import ConsoleAttach
from arktos_vm_runtime.service.podstate import PodState
from arktos_vm_runtime.service.records import EXITED, RUNNING, ContainerRecord
from arktos_vm_runtime.service.store import Store
from arktos_vm_runtime.service.stream_io import InputPipe, StreamIO


class FakeConsole:
    def __init__(self, on_data: Callable[[bytes], None], on_end: Callable[[str], None]
                 ) -> None:
        self.on_data, self.on_end = on_data, on_end
        self.sent: list[bytes] = []
        self.closed = False

    def send(self, data: bytes, timeout: float = 5.0) -> None:
        if self.closed:
            raise Unavailable("closed")
        self.sent.append(data)

    def close(self) -> None:
        self.closed = True


class FakeOpener:
    def __init__(self, fail: Exception | None = None) -> None:
        self.opened: list[FakeConsole] = []
        self.fail = fail

    def open(self, uuid: str, sandbox_id: str, on_data: Callable[[bytes], None],
             on_end: Callable[[str], None]) -> FakeConsole:
        if self.fail is not None:
            raise self.fail
        c = FakeConsole(on_data, on_end)
        self.opened.append(c)
        return c

    @property
    def live(self) -> list[FakeConsole]:
        return [c for c in self.opened if not c.closed]


def wait(what: str, cond: Callable[[], object], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


class Session:
    def __init__(self, attach: ConsoleAttach, cid: str = "c1", stdin: bool = True,
                 hold: threading.Event | None = None) -> None:
        self.out = bytearray()
        self.hold = hold
        self.io = StreamIO(InputPipe() if stdin else None, self._write, None, tty=True)
        self.error: BaseException | None = None
        self.t = threading.Thread(target=self._run, args=(attach, cid), daemon=True)
        self.t.start()

    def _write(self, data: bytes) -> None:
        if self.hold is not None:
            self.hold.wait(30)
        self.out += data

    def _run(self, attach: ConsoleAttach, cid: str) -> None:
        try:
            attach.attach(cid, self.io)
        except BaseException as e:
            self.error = e

    def leave(self) -> None:
        self.io.gone.set()
        self.t.join(5)
        assert not self.t.is_alive()


def make(tmp_path: Path, *, stdin: bool | None = True, state: str = RUNNING,
         fail: Exception | None = None, limit: int = 1024) -> tuple[ConsoleAttach, FakeOpener,
                                                                     PodState]:
    ps = PodState(Store(tmp_path / "s.db"))
    ps.put_container(ContainerRecord(id="c1", sandbox_id="s1", name="vm", attempt=0,
                                     state=state, created_at=1, image="i",
                                     image_ref="sha256:x", vm_dir="/nonexistent",
                                     tty=True, stdin=stdin))
    opener = FakeOpener(fail)
    return ConsoleAttach(ps, opener, buffer_limit=limit), opener, ps  # type: ignore[arg-type]


def test_one_stream_fans_out_and_closes_after_the_last_attacher(tmp_path: Path) -> None:
    attach, opener, _ = make(tmp_path)
    a, b = Session(attach), Session(attach)
    wait("two attachers", lambda: attach.sessions() == {"c1": 2})
    assert len(opener.opened) == 1, "one console stream per VM"
    console = opener.opened[0]
    console.on_data(b"login: ")
    wait("output on both", lambda: a.out == b"login: " and b.out == b"login: ")
    a.io.stdin.feed(b"root\r")  # type: ignore[union-attr]
    b.io.stdin.feed(b"ls\r")  # type: ignore[union-attr]
    wait("input from both", lambda: sorted(console.sent) == [b"ls\r", b"root\r"])
    a.io.resize(80, 24)  # accepted, ignored: a serial console has no size
    a.leave()
    assert not console.closed and attach.sessions() == {"c1": 1}
    console.on_data(b"more")
    wait("output after one left", lambda: b.out == b"login: more")
    assert a.out == b"login: "
    b.leave()
    assert console.closed and attach.sessions() == {}
    c = Session(attach)
    wait("a new stream", lambda: len(opener.live) == 1 and len(opener.opened) == 2)
    c.leave()
    assert not opener.live
    assert (a.error, b.error, c.error) == (None, None, None)


def test_a_slow_attacher_loses_the_oldest_output_and_blocks_nobody(tmp_path: Path) -> None:
    attach, opener, _ = make(tmp_path, limit=1000)
    hold = threading.Event()
    slow, fast = Session(attach, stdin=False, hold=hold), Session(attach, stdin=False)
    wait("two attachers", lambda: attach.sessions() == {"c1": 2})
    console = opener.opened[0]
    console.on_data(b"first-")
    wait("the slow one stuck in its first write", lambda: fast.out == b"first-")
    fed = 0.0
    for i in range(100):  # 100 x 100 bytes while the slow client reads nothing
        t0 = time.monotonic()
        console.on_data(b"%03d" % i + b"." * 97)
        fed = max(fed, time.monotonic() - t0)
        # the fast one keeps up, whatever the slow one does
        wait("the fast one's copy", lambda i=i: len(fast.out) == 6 + (i + 1) * 100)
    assert fed < 0.05, "feeding never waits for an attacher"
    hold.set()
    wait("the slow one catches up", lambda: slow.out.endswith(b"099" + b"." * 97))
    time.sleep(0.2)
    # It got the first write, then only the newest 1000 bytes: the oldest were dropped.
    assert slow.out[:6] == b"first-"
    assert len(slow.out) - 6 <= 1000 and slow.out[6:9] != b"000"
    slow.leave()
    fast.leave()


def test_stdin_of_a_container_made_without_stdin_is_dropped(tmp_path: Path) -> None:
    attach, opener, _ = make(tmp_path, stdin=False)
    a = Session(attach)
    wait("attached", lambda: attach.sessions() == {"c1": 1})
    assert a.io.stdin.feed(b"x" * 5000, timeout=2)  # type: ignore[union-attr]
    a.io.stdin.close()  # type: ignore[union-attr]
    time.sleep(0.3)
    assert opener.opened[0].sent == []
    a.leave()
    # An older record (stdin unknown) takes input, as the kubelet sets stdin on VMs.
    (tmp_path / "old").mkdir()
    attach2, opener2, _ = make(tmp_path / "old", stdin=None)
    b = Session(attach2)
    wait("attached", lambda: attach2.sessions() == {"c1": 1})
    b.io.stdin.feed(b"y")  # type: ignore[union-attr]
    wait("input delivered", lambda: opener2.opened[0].sent == [b"y"])
    b.leave()


def test_attach_returns_when_the_console_ends_or_the_vm_stops(tmp_path: Path) -> None:
    attach, opener, ps = make(tmp_path)
    a, b = Session(attach), Session(attach)
    wait("two attachers", lambda: attach.sessions() == {"c1": 2})
    opener.opened[0].on_data(b"bye")
    opener.opened[0].on_end("the console closed (the VM stopped)")
    a.t.join(5)
    b.t.join(5)
    assert not a.t.is_alive() and not b.t.is_alive()
    assert a.out == b"bye" == b.out and a.error is None
    assert attach.sessions() == {}
    # The record says stopped before the stream ends: attach notices within a second or so.
    c = Session(attach)
    wait("attached again", lambda: attach.sessions() == {"c1": 1})
    ps.set_container("c1", state=EXITED)
    c.t.join(5)
    assert not c.t.is_alive() and c.error is None
    assert not opener.live
    with pytest.raises(FailedPrecondition, match="not running"):
        attach.attach("c1", StreamIO(None, lambda d: None, None, tty=True))
    with pytest.raises(NotFound):
        attach.attach("c2", StreamIO(None, lambda d: None, None, tty=True))


def test_a_console_that_cannot_be_opened_leaves_nothing(tmp_path: Path) -> None:
    attach, _, _ = make(tmp_path, fail=Unavailable("Active console session exists"))
    io = StreamIO(InputPipe(), lambda d: None, None, tty=True)
    with pytest.raises(Unavailable, match="console session"):
        attach.attach("c1", io)
    assert attach.sessions() == {}
    assert threading.active_count() < 20


def test_close_ends_every_session_and_stream(tmp_path: Path) -> None:
    attach, opener, _ = make(tmp_path)
    a, b = Session(attach), Session(attach)
    wait("two attachers", lambda: attach.sessions() == {"c1": 2})
    attach.close()
    a.t.join(5)
    b.t.join(5)
    assert not a.t.is_alive() and not b.t.is_alive()
    assert not opener.live and attach.sessions() == {}
