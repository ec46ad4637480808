"""Exec (streaming) through the guest agent, with a fake at GuestAgent's interface (a real
agent cannot be made to hang, vanish or spawn-fail on cue; test_console_attach runs the
real adapter against a guest without an agent): stdin collected until EOF and bounded,
output through the StreamIO writers, the exit code, the guest process killed when the
client goes, and no agent session left behind (every started process's exit read)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from arktos_vm_runtime.adapters.guest_agent import ExecStatus, SpawnFailed
from arktos_vm_runtime.errors import Cancelled, FailedPrecondition, InvalidArgument, NotFound
from arktos_vm_runtime.service.guest_exec_stream import GuestExecStream
from arktos_vm_runtime.service.podstate import PodState
from arktos_vm_runtime.service.records import CREATED, RUNNING, ContainerRecord
from arktos_vm_runtime.service.store import Store
from arktos_vm_runtime.service.stream_io import InputPipe, StreamIO


class FakeAgent:
    """GuestAgent's exec methods. A process runs `runs` s (None: until killed); the agent
    remembers it until a status saying it exited has been read (as qemu-ga does)."""

    def __init__(self, runs: float | None = 0.1, code: int = 0, out: bytes = b"",
                 err: bytes = b"", agent: bool = True, spawn_fails: bool = False,
                 no_timeout: bool = False) -> None:
        self.runs, self.code, self.out, self.err = runs, code, out, err
        self.no_timeout = no_timeout
        self.agent, self.spawn_fails = agent, spawn_fails
        self.started: list[tuple[list[str], bytes | None]] = []
        self.killed: list[int] = []
        self.sessions: dict[int, float] = {}  # pid -> start time: what the agent holds
        self.next_pid = 100

    def ping(self, uuid: str, sid: str, timeout: int = 1) -> None:
        if not self.agent:
            raise FailedPrecondition(f"guest agent command guest-ping: VM {uuid} has no QEMU "
                                     "guest agent answering (is qemu-guest-agent installed "
                                     "and running in the guest?)")

    def exec_start(self, uuid: str, sid: str, argv: list[str],
                   input_data: bytes | None = None) -> int:
        if self.spawn_fails or (self.no_timeout and argv[0] == "timeout"):
            raise SpawnFailed("Failed to execute child process “nope” (fake)")
        self.started.append((argv, input_data))
        self.next_pid += 1
        self.sessions[self.next_pid] = time.monotonic()
        return self.next_pid

    def exec_status(self, uuid: str, sid: str, pid: int, limit: int) -> ExecStatus:
        t0 = self.sessions[pid]
        if pid in self.killed:
            del self.sessions[pid]
            return ExecStatus(True, 137)
        if self.runs is not None and time.monotonic() - t0 >= self.runs:
            del self.sessions[pid]
            return ExecStatus(True, self.code, self.out[:limit], self.err[:limit])
        return ExecStatus(False)

    def kill_group(self, uuid: str, sid: str, pid: int) -> None:
        self.killed.append(pid)


def make(tmp_path: Path, agent: FakeAgent, state: str = RUNNING,
         max_stdin: int = 1000) -> GuestExecStream:
    ps = PodState(Store(tmp_path / "s.db"))
    ps.put_container(ContainerRecord(id="c1", sandbox_id="s1", name="vm", attempt=0,
                                     state=state, created_at=1, image="i",
                                     image_ref="sha256:x", vm_dir="/nonexistent"))
    return GuestExecStream(ps, agent, max_stdin=max_stdin, poll_max=0.05)  # type: ignore[arg-type]


class Out:
    def __init__(self, tty: bool = False, stdin: bool = False, stderr: bool = True) -> None:
        self.stdout, self.stderr = bytearray(), bytearray()
        self.io = StreamIO(InputPipe() if stdin else None, self.stdout.extend,
                           None if tty or not stderr else self.stderr.extend, tty=tty)


def test_output_exit_code_and_stdin_until_eof(tmp_path: Path) -> None:
    agent = FakeAgent(code=3, out=b"Linux minimal\n", err=b"warn\n")
    ex = make(tmp_path, agent)
    o = Out(stdin=True)
    assert o.io.stdin is not None
    o.io.stdin.feed(b"line 1\n")
    o.io.stdin.feed(b"line 2\n")
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(ex.exec("c1", ["cat"], o.io)))
    t.start()
    time.sleep(0.3)
    assert agent.started == [], "nothing runs before stdin ends"
    o.io.stdin.close()
    t.join(5)
    assert result == [3]
    assert agent.started == [(["timeout", "0", "cat"], b"line 1\nline 2\n")]
    assert (bytes(o.stdout), bytes(o.stderr)) == (b"Linux minimal\n", b"warn\n")
    assert agent.sessions == {}, "the agent holds no finished process"
    # Without stdin: no input-data at all; with a tty, stderr follows stdout.
    o = Out(tty=True)
    assert ex.exec("c1", ["uname", "-a"], o.io) == 3
    assert agent.started[-1] == (["timeout", "0", "uname", "-a"], None)
    assert bytes(o.stdout) == b"Linux minimal\nwarn\n"
    # stderr not asked for (and no tty): dropped.
    o = Out(stderr=False)
    ex.exec("c1", ["uname"], o.io)
    assert bytes(o.stdout) == b"Linux minimal\n"
    assert agent.sessions == {}


def test_a_guest_without_timeout_runs_the_command_bare(tmp_path: Path) -> None:
    agent = FakeAgent(code=0, no_timeout=True)
    ex = make(tmp_path, agent)
    assert ex.exec("c1", ["uname"], Out().io) == 0
    assert agent.started == [(["uname"], None)] and agent.sessions == {}


def test_stdin_is_bounded(tmp_path: Path) -> None:
    agent = FakeAgent()
    ex = make(tmp_path, agent, max_stdin=1000)
    o = Out(stdin=True)
    assert o.io.stdin is not None
    o.io.stdin.feed(b"x" * 600)
    o.io.stdin.feed(b"x" * 600)
    o.io.stdin.close()
    with pytest.raises(InvalidArgument, match="stdin is over 1000 bytes"):
        ex.exec("c1", ["cat"], o.io)
    assert agent.started == []


def test_client_gone_kills_the_guest_process_and_leaves_no_session(tmp_path: Path) -> None:
    agent = FakeAgent(runs=None)  # runs until killed
    ex = make(tmp_path, agent)
    o = Out()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            ex.exec("c1", ["sleep", "1000"], o.io)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.3)
    assert len(agent.sessions) == 1
    t0 = time.monotonic()
    o.io.gone.set()
    t.join(5)
    assert time.monotonic() - t0 < 1.0
    assert agent.killed == [101]
    assert agent.sessions == {}, "the killed process's status was read"
    assert len(errors) == 1 and isinstance(errors[0], Cancelled)
    # Gone while stdin is still open: nothing was started.
    o = Out(stdin=True)
    o.io.gone.set()
    with pytest.raises(Cancelled):
        ex.exec("c1", ["cat"], o.io)
    assert len(agent.started) == 1


def test_no_agent_is_failed_precondition_before_reading_stdin(tmp_path: Path) -> None:
    agent = FakeAgent(agent=False)
    ex = make(tmp_path, agent)
    o = Out(stdin=True)
    assert o.io.stdin is not None
    o.io.stdin.feed(b"unread")
    with pytest.raises(FailedPrecondition, match="has no QEMU guest agent answering"):
        ex.exec("c1", ["cat"], o.io)
    assert o.io.stdin.read(0) == b"unread" and agent.started == []


def test_spawn_failure_is_127_and_bad_requests(tmp_path: Path) -> None:
    ex = make(tmp_path, FakeAgent(spawn_fails=True))
    o = Out()
    assert ex.exec("c1", ["nope"], o.io) == 127
    assert b"Failed to execute" in o.stderr
    with pytest.raises(InvalidArgument):
        ex.exec("c1", [], o.io)
    with pytest.raises(NotFound):
        ex.exec("c2", ["true"], o.io)
    (tmp_path / "b").mkdir()
    ex = make(tmp_path / "b", FakeAgent(), state=CREATED)
    with pytest.raises(FailedPrecondition, match="not running"):
        ex.exec("c1", ["true"], o.io)
