"""Attach (the serial console, shared) and PortForward's connection, the VM side of issue 11,
on a minimal (busybox) guest booted by the real daemon on the real libvirtd and the test
CNI network.

The backends run in this test process against that daemon's VM (the wire end to end is
test_streaming_wire's): the real libvirt console adapter on its own libvirt connection, the
real pod-namespace socket adapter, and the daemon's own records read (read-only) from its
state store in place of PodState; so the slow-attacher cases can hold a client on cue. The
guest says back every line typed on its console as `MINIMAL-GUEST-ECHO <line>` and serves
a known page on port 80 (minimal-init.sh).
"""

from __future__ import annotations

import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from arktos_vm_runtime.adapters.guest_agent import GuestAgent
from arktos_vm_runtime.adapters.libvirt_conn import LibvirtConnection
from arktos_vm_runtime.adapters.libvirt_console import Consoles
from arktos_vm_runtime.adapters.libvirt_domains import Domains
from arktos_vm_runtime.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from arktos_vm_runtime.service.console_attach import ConsoleAttach
from arktos_vm_runtime.service.guest_exec_stream import GuestExecStream
from arktos_vm_runtime.service.port_forward import PortForward
from arktos_vm_runtime.service.stream_io import InputPipe, StreamIO
from tests.daemon_proc import APIS, Daemon
from tests.integration.daemon_records import DaemonRecords
from tests.integration.vm_ops_common import vm_pod
from tests.integration.vmpods import (
    echo_line,
    log_text,
    wait_for,
)

pytestmark = pytest.mark.integration
MARKER = "MINIMAL-GUEST-UP"
BOOT_TIMEOUT = 120
VIRSH = ["virsh", "-c", "qemu:///system"]


@dataclass
class Guest:
    d: Daemon
    sid: str
    cid: str
    log: Path
    records: DaemonRecords
    attach: ConsoleAttach
    ports: PortForward
    consoles: Consoles
    exec_: GuestExecStream


@pytest.fixture(scope="module")
def guest(served_minimal_image: str) -> Iterator[Guest]:
    with vm_pod(served_minimal_image, name="attach", api="v1",
                ready_timeout=BOOT_TIMEOUT) as p:
        records = DaemonRecords(p.d.state_dir)
        conn = LibvirtConnection("qemu:///system")
        domains = Domains(conn, records.setting("instance_id"))
        consoles = Consoles(domains)
        yield Guest(p.d, p.sid, p.cid, p.log, records,
                    ConsoleAttach(records, consoles),  # type: ignore[arg-type]
                    PortForward(records, records.endpoint),  # type: ignore[arg-type]
                    consoles,
                    GuestExecStream(records, GuestAgent(domains)))  # type: ignore[arg-type]


@dataclass
class Attacher:
    """One attach session on its own thread, as the streaming server would run it."""

    g: Guest
    stdin: bool = True
    hold: threading.Event | None = None  # set: the client reads nothing until it is set
    out: bytearray = field(default_factory=bytearray)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.io = StreamIO(stdin=InputPipe() if self.stdin else None, stdout=self._write,
                           stderr=None, tty=True)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _write(self, data: bytes) -> None:
        if self.hold is not None:
            self.hold.wait(60)
        with self.lock:
            self.out += data

    def _run(self) -> None:
        try:
            self.g.attach.attach(self.g.cid, self.io)
        except BaseException as e:
            self.error = e

    def text(self) -> str:
        with self.lock:
            return self.out.decode(errors="replace")

    def type(self, line: str) -> None:
        assert self.io.stdin is not None
        assert self.io.stdin.feed(line.encode() + b"\r", timeout=5)

    def leave(self, timeout: float = 5.0) -> float:
        t0 = time.monotonic()
        self.io.gone.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "attach did not return after io.gone"
        return time.monotonic() - t0


def domstate(cid: str) -> str:
    return subprocess.run([*VIRSH, "domstate", f"avr-{cid}"], capture_output=True,
                          text=True).stdout.strip()


def test_two_attachers_see_output_typed_lines_come_back_and_reach_the_log(guest: Guest) -> None:
    a, b = Attacher(guest), Attacher(guest)
    wait_for("one console stream with two attachers",
             lambda: guest.attach.sessions() == {guest.cid: 2}, 10)
    word = secrets.token_hex(4)
    a.type(f"hello-{word}")
    echo = f"MINIMAL-GUEST-ECHO hello-{word}"
    wait_for("the echo on the typing attacher", lambda: echo in a.text(), 20)
    wait_for("the echo on the other attacher", lambda: echo in b.text(), 5)
    b.type(f"from-b-{word}")  # input from any attacher
    wait_for("the second attacher's line on both", lambda: all(
        f"MINIMAL-GUEST-ECHO from-b-{word}" in x.text() for x in (a, b)), 20)
    # The terminal's own echo of the typing comes too, to both.
    assert f"hello-{word}" in a.text().split(echo)[0]
    # virtlogd's log (and the CRI log copied from it) got it as well, independently.
    wait_for("the echo in the CRI log", lambda: echo in log_text(guest.log), 10)
    # One leaves; the other still gets output and can still type.
    assert b.leave() < 1.0
    assert guest.attach.sessions() == {guest.cid: 1}
    word2 = secrets.token_hex(4)
    a.type(f"again-{word2}")
    wait_for("the second echo", lambda: f"MINIMAL-GUEST-ECHO again-{word2}" in a.text(), 20)
    assert f"again-{word2}" not in b.text()
    assert a.leave() < 1.0
    assert a.error is None and b.error is None, (a.error, b.error)
    assert guest.attach.sessions() == {}, "the console stream closed with the last attacher"
    # Detaching left the VM running, and its console is free for the next attach.
    assert domstate(guest.cid) == "running"
    c = Attacher(guest)
    word3 = secrets.token_hex(4)
    wait_for("a new console stream", lambda: guest.attach.sessions() == {guest.cid: 1}, 10)
    c.type(f"third-{word3}")
    wait_for("the echo after re-attaching",
             lambda: f"MINIMAL-GUEST-ECHO third-{word3}" in c.text(), 20)
    c.leave()
    assert guest.attach.sessions() == {}
    assert not [t.name for t in threading.enumerate() if t.name.startswith("attach-in-")], \
        "every attacher's input thread ended"


def test_the_log_does_not_depend_on_attachers(guest: Guest) -> None:
    """The boot was logged before any console stream existed; and while one attacher is
    stuck (its client reads nothing), another one's typing still reaches it and the log:
    the log is virtlogd's copy of the serial port, not fed from the fan-out."""
    assert MARKER in log_text(guest.log)
    release = threading.Event()
    stuck = Attacher(guest, stdin=False, hold=release)
    a = Attacher(guest)
    wait_for("two attachers", lambda: guest.attach.sessions() == {guest.cid: 2}, 10)
    for i in range(3):
        word = secrets.token_hex(4)
        a.type(f"while-stuck-{i}-{word}")
        echo = f"MINIMAL-GUEST-ECHO while-stuck-{i}-{word}"
        wait_for("the echo on the live attacher", lambda echo=echo: echo in a.text(), 20)
        wait_for("the echo in the log", lambda echo=echo: echo in log_text(guest.log), 10)
    a.leave()
    release.set()
    stuck.leave()
    assert guest.attach.sessions() == {}
    assert stuck.error is None and a.error is None, (stuck.error, a.error)


def test_port_connect_fetches_the_guest_page_and_echoes(guest: Guest) -> None:
    with guest.ports.port_connect(guest.sid, 80, 10) as s:
        s.sendall(b"GET /index.html HTTP/1.0\r\nHost: guest\r\n\r\n")
        got = b""
        s.settimeout(20)
        while chunk := s.recv(65536):
            got += chunk
    assert got.startswith(b"HTTP/1.") and b" 200 " in got.split(b"\r\n")[0], got[:200]
    assert got.endswith(b"MINIMAL-GUEST-HTTP index\n"), got[-200:]
    with guest.ports.port_connect(guest.sid, 7, 10) as s:
        assert echo_line(s, b"through the pod namespace\n") == b"through the pod namespace\n"


def test_port_connect_to_a_closed_port_is_refused(guest: Guest) -> None:
    try:
        guest.ports.port_connect(guest.sid, 81, 10).close()
    except Unavailable as e:
        if "connection refused (nothing listens" in e.message:
            return
        raise
    raise AssertionError("port 81 of the guest accepted a connection")


def test_port_connect_errors(guest: Guest) -> None:
    for port in (0, 65536, -1):
        with pytest.raises(InvalidArgument, match="1-65535"):
            guest.ports.port_connect(guest.sid, port, 10)
    with pytest.raises(NotFound):
        guest.ports.port_connect("no-such-sandbox", 80, 10)


def test_exec_in_a_guest_without_agent_is_failed_precondition(guest: Guest) -> None:
    """The minimal guest runs no QEMU guest agent: Exec says so at once, before reading
    any stdin."""
    pipe = InputPipe()
    pipe.feed(b"never read")
    io = StreamIO(pipe, lambda b: None, lambda b: None, tty=False)
    t0 = time.monotonic()
    with pytest.raises(FailedPrecondition, match="has no QEMU guest agent answering") as e:
        guest.exec_.exec(guest.cid, ["uname", "-a"], io)
    assert guest.cid in e.value.message
    assert time.monotonic() - t0 < 5
    assert pipe.read(0) == b"never read"


def test_attach_ends_when_the_vm_stops_and_a_stopped_vm_is_refused(guest: Guest) -> None:
    a = Attacher(guest)
    wait_for("a console stream", lambda: guest.attach.sessions() == {guest.cid: 1}, 10)
    pb, _ = APIS["v1"]
    rt = guest.d.runtime("v1")
    rt.StopContainer(pb.StopContainerRequest(container_id=guest.cid, timeout=0), timeout=60)
    a.thread.join(10)
    assert not a.thread.is_alive(), "attach returned once the VM stopped"
    assert a.error is None, a.error
    assert guest.attach.sessions() == {}
    with pytest.raises(FailedPrecondition, match="not running"):
        guest.attach.attach(guest.cid, StreamIO(None, lambda b: None, None, tty=True))
    # The adapter itself refuses a domain that is not running.
    with pytest.raises(FailedPrecondition, match="not running"):
        guest.consoles.open(guest.cid, guest.sid, lambda b: None, lambda r: None)
    with pytest.raises(FailedPrecondition, match="not running"):
        guest.ports.port_connect(guest.sid, 80, 5)
    with pytest.raises(NotFound):
        guest.attach.attach("0" * 36, StreamIO(None, lambda b: None, None, tty=True))
