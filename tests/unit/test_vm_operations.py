"""RebootVM's checks and delay on libvirt's test:///default driver with the real Pods, store
and libvirt adapter; ExecSync's and StopContainer's timing with a fake at GuestAgent's and
Domains' interfaces (a real guest agent cannot be made to hang or ignore ACPI on cue; the
integration tests run the real ones)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from arktos_vm_runtime.adapters.guest_agent import ExecStatus, GuestAgent, SpawnFailed
from arktos_vm_runtime.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from arktos_vm_runtime.service import vm_stop
from arktos_vm_runtime.service.guest_exec import MAX_OUTPUT, GuestExec
from arktos_vm_runtime.service.podstate import PodState
from arktos_vm_runtime.service.reboot import Reboots
from arktos_vm_runtime.service.records import RUNNING, ContainerRecord
from arktos_vm_runtime.service.store import Store
from tests.unit.test_pods import Env, base_image, container_input, env, sandbox  # noqa: F401

# -- RebootVM on test:///default ---------------------------------------------------------


def _running_vm(e: Env) -> tuple[Any, str]:
    pods = e.pods()
    sb = sandbox()
    pods.run_sandbox(sb)
    cid = pods.create_container(sb.id, container_input())
    return pods, cid


def test_reboot_checks_flags_delay_state_and_a_pending_reboot(env: Env) -> None:  # noqa: F811
    pods, cid = _running_vm(env)
    reboots = Reboots(pods.state, env.domains, GuestAgent(env.domains))
    for flags in (4, 8, 16, 64, -1, 1 << 40):
        with pytest.raises(InvalidArgument, match="domainRebootFlag"):
            reboots.reboot(cid, 0, flags)
    for delay in (-1, 24 * 3600 + 1):
        with pytest.raises(InvalidArgument, match="delayInSeconds"):
            reboots.reboot(cid, delay, 0)
    with pytest.raises(NotFound):
        reboots.reboot("nope", 0, 0)
    with pytest.raises(FailedPrecondition, match="not running"):
        reboots.reboot(cid, 0, 0)  # created, never started
    pods.start_container(cid)
    started = pods.container(cid).started_at
    reboots.reboot(cid, 0, 0)  # the test driver restarts it (on_reboot=restart), no events
    t0 = time.monotonic()
    reboots.reboot(cid, 1, 1)
    assert time.monotonic() - t0 < 0.5, "a delayed reboot returns at once"
    with pytest.raises(FailedPrecondition, match="already scheduled"):
        reboots.reboot(cid, 0, 0)
    deadline = time.monotonic() + 5
    while True:  # once it ran, another is accepted
        try:
            reboots.reboot(cid, 0, 1)
            break
        except FailedPrecondition:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    rec = pods.container(cid)
    assert (rec.state, rec.started_at) == (RUNNING, started)
    # A delayed reboot of a VM stopped meanwhile is dropped: a start within the delay
    # does not get it.
    scheduled = time.monotonic()
    reboots.reboot(cid, 3, 0)
    pods.stop_container(cid, 0)
    pods.start_container(cid)
    deadline = scheduled + 2.5  # the event reaches Reboots right after Pods
    while True:  # accepted before the earlier one's time: it was dropped
        try:
            reboots.reboot(cid, 600, 0)
            break
        except FailedPrecondition:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    with pytest.raises(FailedPrecondition):
        reboots.reboot(cid, 0, 0)
    reboots.close()
    reboots.reboot(cid, 0, 0)


# -- ExecSync's timing with a fake agent --------------------------------------------------


class FakeAgent:
    """GuestAgent's exec methods: a process that exits after `runs` s (None: never)."""

    def __init__(self, runs: float | None, code: int = 0, out: bytes = b"",
                 spawn_fails: bool = False) -> None:
        self.runs, self.code, self.out, self.spawn_fails = runs, code, out, spawn_fails
        self.started: list[list[str]] = []
        self.killed: list[int] = []
        self.t0 = 0.0

    def exec_start(self, uuid: str, sid: str, argv: list[str]) -> int:
        if self.spawn_fails:
            raise SpawnFailed("Failed to execute child process (fake)")
        self.started.append(argv)
        self.t0 = time.monotonic()
        return 42

    def exec_status(self, uuid: str, sid: str, pid: int, limit: int) -> ExecStatus:
        if self.killed or (self.runs is not None
                           and time.monotonic() - self.t0 >= self.runs):
            return ExecStatus(True, 137 if self.killed else self.code, self.out[:limit], b"",
                              len(self.out) > limit)
        return ExecStatus(False)

    def kill_group(self, uuid: str, sid: str, pid: int) -> None:
        self.killed.append(pid)


def _exec_env(tmp_path: Path, agent: FakeAgent) -> tuple[GuestExec, str]:
    state = PodState(Store(tmp_path / "s.db"))
    state.put_container(ContainerRecord(id="c1", sandbox_id="s1", name="vm", attempt=0,
                                        state=RUNNING, created_at=1, image="i",
                                        image_ref="sha256:x", vm_dir="/nonexistent"))
    return GuestExec(state, agent), "c1"  # type: ignore[arg-type]


def test_exec_wraps_in_timeout_and_returns_output(tmp_path: Path) -> None:
    agent = FakeAgent(0.2, code=3, out=b"x" * (MAX_OUTPUT + 10))
    ex, cid = _exec_env(tmp_path, agent)
    r = ex.exec_sync(cid, ["sh", "-c", "exit 3"], 5)
    assert agent.started == [["timeout", "-s", "KILL", "5", "sh", "-c", "exit 3"]]
    assert r.exit_code == 3 and len(r.stdout) == MAX_OUTPUT
    ex.exec_sync(cid, ["true"], 0)
    assert agent.started[-1] == ["true"], "no timeout: run as is"
    with pytest.raises(InvalidArgument):
        ex.exec_sync(cid, [], 1)
    with pytest.raises(InvalidArgument):
        ex.exec_sync(cid, ["a\0b"], 1)
    with pytest.raises(NotFound):
        ex.exec_sync("other", ["true"], 1)


def test_exec_timeout_kills_in_the_guest_and_is_deadline_exceeded(tmp_path: Path) -> None:
    agent = FakeAgent(None)  # a guest whose `timeout` did nothing: the runtime kills
    ex, cid = _exec_env(tmp_path, agent)
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="timed out after 1 s"):
        ex.exec_sync(cid, ["sleep", "100"], 1)
    took = time.monotonic() - t0
    assert agent.killed == [42] and 1.0 <= took < 3.0, took
    # The guest's `timeout` killed it at the deadline (137 at T): also DEADLINE_EXCEEDED.
    agent = FakeAgent(1.0, code=137)
    (tmp_path / "b").mkdir()
    ex, cid = _exec_env(tmp_path / "b", agent)
    with pytest.raises(DeadlineExceeded):
        ex.exec_sync(cid, ["sleep", "100"], 1)
    assert not agent.killed


def test_exec_of_a_program_the_guest_cannot_start_is_127(tmp_path: Path) -> None:
    ex, cid = _exec_env(tmp_path, FakeAgent(0, spawn_fails=True))
    r = ex.exec_sync(cid, ["nope"], 0)
    assert r.exit_code == 127 and b"Failed to execute" in r.stderr


# -- StopContainer's escalation within T ----------------------------------------------------


class Recorder:
    def __init__(self, agent_answers: bool) -> None:
        self.agent_answers = agent_answers
        self.t0 = time.monotonic()
        self.calls: list[tuple[str, float]] = []

    def request_shutdown(self, cid: str, sid: str) -> bool:
        self.calls.append(("agent", time.monotonic() - self.t0))
        return self.agent_answers

    def shutdown(self, cid: str, sid: str) -> None:
        self.calls.append(("acpi", time.monotonic() - self.t0))


def _never_stops(seconds: float) -> bool:
    threading.Event().wait(seconds)
    return False


@pytest.mark.parametrize("agent_answers", [True, False])
def test_escalation_agent_then_acpi_then_gives_up_before_the_reserve(
        monkeypatch: pytest.MonkeyPatch, agent_answers: bool) -> None:
    monkeypatch.setattr(vm_stop, "RESERVE_MIN", 0.3)
    monkeypatch.setattr(vm_stop, "AGENT_MIN", 0.8)
    r = Recorder(agent_answers)
    deadline = r.t0 + 1.2  # reserve 0.3 s, grace 0.9 s
    assert not vm_stop.graceful_stop("c", "s", deadline, r, r, _never_stops)  # type: ignore[arg-type]
    ended = time.monotonic() - r.t0
    assert [c[0] for c in r.calls] == ["agent", "acpi"]
    acpi_at = r.calls[1][1]
    if agent_answers:
        assert 0.4 <= acpi_at < 0.6, "ACPI at half the grace period"
    else:
        assert acpi_at < 0.1, "no agent: ACPI at once"
    assert 0.85 <= ended < 1.0, "gives up at the grace period, the reserve left for destroy"


def test_short_timeouts_skip_the_agent_and_tiny_ones_go_straight_to_destroy() -> None:
    r = Recorder(True)
    assert not vm_stop.graceful_stop("c", "s", r.t0 + 3, r, r, _never_stops)  # type: ignore[arg-type]
    assert [c[0] for c in r.calls] == ["acpi"]
    r = Recorder(True)
    assert not vm_stop.graceful_stop("c", "s", r.t0 + 1, r, r, _never_stops)  # type: ignore[arg-type]
    assert r.calls == []
    assert vm_stop.reserve(3) == 2.5 and vm_stop.reserve(100) == 5.0
