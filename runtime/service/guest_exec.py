"""ExecSync through the QEMU guest agent: argv run in the guest, output and exit code back.

The command runs as `timeout -s KILL T argv...` in the guest when a timeout is given, so the
guest kills it (and its process group) at the deadline by itself; should the guest lack
`timeout`, argv runs bare and the runtime kills its process group through the agent. Either
way the call answers DEADLINE_EXCEEDED at T (+ about a second), which the kubelet reads as
a probe timeout. Output kept: MAX_OUTPUT bytes per stream, the rest dropped (the agent itself
keeps at most 16 MiB per stream in the guest). A program the guest cannot start answers exit
code 127, as a shell would, with the agent's message on stderr.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from ..adapters.guest_agent import ExecStatus, GuestAgent, SpawnFailed
from ..checks import shown
from ..errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound
from .podstate import PodState
from .records import CREATING, RUNNING, ContainerRecord

log = logging.getLogger(__name__)

MAX_OUTPUT = 1024 * 1024  # bytes kept of stdout and of stderr each
KILL_GRACE = 1.0  # seconds past the deadline before the runtime kills the process itself
REAP_WAIT = 2.0  # seconds to collect a killed process's status (the agent keeps it till then)


@dataclasses.dataclass(frozen=True)
class ExecResult:
    stdout: bytes
    stderr: bytes
    exit_code: int


def check_argv(what: str, argv: list[str]) -> None:
    if not argv or not argv[0]:
        raise InvalidArgument(f"{what}: cmd must name a program")
    if any("\0" in a for a in argv):
        raise InvalidArgument(f"{what}: cmd must not contain NUL characters")


def running_container(state: PodState, cid: str) -> ContainerRecord:
    rec = state.container(cid)
    if rec is None or rec.state == CREATING:
        raise NotFound(f"container {shown(cid)} not found")
    if rec.state != RUNNING:
        raise FailedPrecondition(f"container {cid} is not running ({rec.state})")
    return rec


class GuestExec:
    def __init__(self, state: PodState, agent: GuestAgent) -> None:
        self._state = state
        self._agent = agent

    def exec_sync(self, cid: str, argv: list[str], timeout: int) -> ExecResult:
        check_argv("ExecSync", argv)
        if timeout < 0:
            raise InvalidArgument("ExecSync: timeout must not be negative")
        sid = running_container(self._state, cid).sandbox_id
        start = time.monotonic()
        try:
            if timeout > 0:
                try:
                    pid = self._agent.exec_start(
                        cid, sid, ["timeout", "-s", "KILL", str(timeout), *argv])
                except SpawnFailed:  # no `timeout` in the guest: the runtime kills it
                    pid = self._agent.exec_start(cid, sid, argv)
            else:
                pid = self._agent.exec_start(cid, sid, argv)
        except SpawnFailed as e:
            return ExecResult(b"", f"arktos-vm-runtime: {e}\n".encode(), 127)
        deadline = start + timeout if timeout > 0 else None
        every = 0.05
        while True:
            st = self._agent.exec_status(cid, sid, pid, MAX_OUTPUT)
            now = time.monotonic()
            if st.exited:
                if deadline is not None and now >= deadline - 0.1 and st.exit_code == 137:
                    raise self._timed_out(argv, timeout)  # the guest's `timeout` killed it
                return self._result(cid, st)
            if deadline is not None and now >= deadline + KILL_GRACE:
                self._agent.kill_group(cid, sid, pid)
                self._reap(cid, sid, pid)
                raise self._timed_out(argv, timeout)
            time.sleep(min(every, deadline + KILL_GRACE - now) if deadline else every)
            every = min(every * 1.5, 0.5)

    @staticmethod
    def _timed_out(argv: list[str], timeout: int) -> DeadlineExceeded:
        return DeadlineExceeded(f"ExecSync: command {shown(argv[0])} timed out after "
                                f"{timeout} s and was killed in the guest")

    @staticmethod
    def _result(cid: str, st: ExecStatus) -> ExecResult:
        if st.truncated:
            log.info("exec output in VM %s cut to %d bytes per stream", cid, MAX_OUTPUT,
                     extra={"CONTAINER_ID": cid})
        return ExecResult(st.stdout, st.stderr, st.exit_code)

    def _reap(self, cid: str, sid: str, pid: int) -> None:
        reap(self._agent, cid, sid, pid)


def reap(agent: GuestAgent, cid: str, sid: str, pid: int) -> bool:
    """Reads a killed process's exit status, so the agent forgets it; True once read."""
    end = time.monotonic() + REAP_WAIT
    while time.monotonic() < end:
        try:
            if agent.exec_status(cid, sid, pid, 0).exited:
                return True
        except (FailedPrecondition, NotFound):
            return False
        time.sleep(0.2)
    return False
