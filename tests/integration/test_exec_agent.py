"""Exec (streaming) through a real QEMU guest agent: the Debian cloud guest booted by the real
daemon, the exec backend (GuestExecStream over the real GuestAgent adapter) run in this test
process against that VM, as the streaming server will run it. Checks output, exit codes,
stdin handed over at spawn (guest-exec input-data), a tty's merged stderr, and a client
that goes away getting its command killed in the guest. Minutes under TCG: marked slow.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from arktos_vm_runtime.adapters.guest_agent import GuestAgent
from arktos_vm_runtime.adapters.libvirt_conn import LibvirtConnection
from arktos_vm_runtime.adapters.libvirt_domains import Domains
from arktos_vm_runtime.errors import Cancelled
from arktos_vm_runtime.service.guest_exec_stream import GuestExecStream
from arktos_vm_runtime.service.stream_io import InputPipe, StreamIO
from tests.daemon_proc import Daemon
from tests.guest.images import cloud_guest_image
from tests.integration.daemon_records import DaemonRecords
from tests.integration.vm_ops_common import VmPod, vm_pod
from tests.integration.vmpods import (
    require_libvirtd,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BOOT_TIMEOUT = 400


@dataclass
class Guest:
    d: Daemon
    cid: str
    ex: GuestExecStream


class Run:
    """One exec session: its writers, its result."""

    def __init__(self, g: Guest, argv: list[str], stdin: bytes | None = None,
                 tty: bool = False) -> None:
        self.out, self.err = bytearray(), bytearray()
        pipe = InputPipe() if stdin is not None else None
        self.io = StreamIO(pipe, self.out.extend, None if tty else self.err.extend, tty=tty)
        if pipe is not None and stdin is not None:
            pipe.feed(stdin)
            pipe.close()
        self.code: int | None = None
        self.error: BaseException | None = None
        self.t = threading.Thread(target=self._run, args=(g, argv), daemon=True)
        self.t.start()

    def _run(self, g: Guest, argv: list[str]) -> None:
        try:
            self.code = g.ex.exec(g.cid, argv, self.io)
        except BaseException as e:
            self.error = e

    def wait(self, timeout: float = 60) -> Run:
        self.t.join(timeout)
        assert not self.t.is_alive(), "exec did not return"
        return self


@pytest.fixture(scope="module")
def guest() -> Iterator[Guest]:
    require_libvirtd()
    agents: dict[str, GuestAgent] = {}

    def answers(p: VmPod) -> bool:
        if p.d.state_dir not in agents:
            records = DaemonRecords(p.d.state_dir)
            agents[p.d.state_dir] = GuestAgent(Domains(LibvirtConnection("qemu:///system"),
                                                       records.setting("instance_id")))
        try:
            agents[p.d.state_dir].ping(p.cid, p.sid, timeout=2)
            return True
        except Exception:
            time.sleep(1.5)
            return False

    with vm_pod(cloud_guest_image(), name="exec-agent", api="v1", memory_mib=512,
                ready=answers, ready_timeout=BOOT_TIMEOUT) as p:
        records = DaemonRecords(p.d.state_dir)
        yield Guest(p.d, p.cid,
                    GuestExecStream(records, agents[p.d.state_dir]))  # type: ignore[arg-type]


def test_output_and_exit_codes(guest: Guest) -> None:
    r = Run(guest, ["uname", "-a"]).wait()
    assert (r.error, r.code) == (None, 0) and r.out.startswith(b"Linux "), (r.error, r.out)
    r = Run(guest, ["sh", "-c", "echo out; echo err >&2; exit 3"]).wait()
    assert (r.code, bytes(r.out), bytes(r.err)) == (3, b"out\n", b"err\n")
    r = Run(guest, ["sh", "-c", "echo out; echo err >&2"], tty=True).wait()
    assert r.code == 0 and bytes(r.out) == b"out\nerr\n", "a tty's stderr follows stdout"
    r = Run(guest, ["no-such-program-here"]).wait()
    assert r.code == 127 and b"no-such-program-here" in r.err, (r.code, r.err)


def test_stdin_is_handed_to_the_command(guest: Guest) -> None:
    r = Run(guest, ["cat"], stdin=b"hello\nworld\n").wait()
    assert (r.code, bytes(r.out)) == (0, b"hello\nworld\n"), r.error
    big = bytes(range(256)) * 256  # 64 KiB (the bound), every byte value
    t0 = time.monotonic()
    r = Run(guest, ["sha256sum"], stdin=big).wait()
    took = time.monotonic() - t0
    assert r.code == 0, r.error
    assert r.out.split()[0].decode() == hashlib.sha256(big).hexdigest()
    print(f"64 KiB of stdin through the agent: {took:.2f} s")
    assert took < 8, "well inside the agent command's 10 s"


def test_a_client_that_goes_away_gets_its_command_killed(guest: Guest) -> None:
    r = Run(guest, ["sh", "-c", "sleep 987 & sleep 986"])
    time.sleep(3)
    assert r.t.is_alive()
    r.io.gone.set()
    r.wait(30)
    assert isinstance(r.error, Cancelled), r.error
    probe = Run(guest, ["sh", "-c", "ps -eo args | grep -c '^sleep 98[67]$' || true"]).wait()
    assert probe.code == 0 and probe.out.strip() == b"0", probe.out
