"""Exec (the streaming one) through the QEMU guest agent.

The agent's guest-exec is not interactive, which shapes what Exec can do:
- stdin: guest-exec takes a program's input only at spawn (input-data), so stdin is read
  until the client closes it (EOF), at most MAX_STDIN (64 KiB), and only then does the
  command start. `kubectl exec -i` with piped input works; an interactive shell (-it)
  does not: nothing runs until stdin ends.
- stdout/stderr: the agent hands output back once the process has exited, so it arrives
  all at once at the end (at most MAX_OUTPUT bytes per stream, the agent's own cap). With
  a tty there is no stderr stream: the process's stderr follows its stdout.
- the exit code is returned (128 + N when killed by signal N); a program the guest cannot
  start is 127 with timeout's (or the agent's) message on stderr, as for ExecSync.
If the client goes away (`io.gone`) the guest process and its process group are killed
through the agent (the ExecSync path) and its status read, so the agent keeps no record
of it. The command runs as `timeout 0 argv...` (GNU timeout with no limit), which puts it
in a process group of its own: qemu-ga's children share the agent's group otherwise, and
a kill would miss what the command started (measured: a `sh -c 'sleep & sleep'` survived).
A guest without `timeout` runs argv bare. A guest without an agent is FailedPrecondition
before any stdin is read.
"""

from __future__ import annotations

import logging

from ..adapters.guest_agent import GuestAgent, SpawnFailed
from ..errors import Cancelled, InvalidArgument
from .guest_exec import check_argv, reap, running_container
from .podstate import PodState
from .stream_io import StreamIO

log = logging.getLogger(__name__)

# Bytes of stdin handed to the program. The whole input travels in the one guest-exec
# command (base64 in JSON over the agent's virtio-serial channel, which libvirt waits
# COMMAND_TIMEOUT s for): a 750 KiB input failed under TCG and left libvirt counting the
# agent unavailable ("not available for now") for the next commands. 64 KiB is measured
# by tests/integration/test_vm_ops_cloud.py.
MAX_STDIN = 64 * 1024
MAX_OUTPUT = 16 * 1024 * 1024  # bytes of stdout and of stderr each (the agent keeps 16 MiB)
WAIT = 0.1  # seconds between checks of io.gone while reading stdin
CHUNK = 64 * 1024  # output is written in pieces of this size


class GuestExecStream:
    def __init__(self, state: PodState, agent: GuestAgent, *, max_stdin: int = MAX_STDIN,
                 poll_max: float = 0.5) -> None:
        self._state = state
        self._agent = agent
        self._max_stdin = max_stdin
        self._poll_max = poll_max

    def check(self, cid: str, cmd: list[str]) -> None:
        """The RPC's checks: the command, and a running container."""
        check_argv("Exec", cmd)
        running_container(self._state, cid)

    def exec(self, cid: str, cmd: list[str], io: StreamIO) -> int:
        check_argv("Exec", cmd)
        sid = running_container(self._state, cid).sandbox_id
        self._agent.ping(cid, sid, timeout=1)  # no agent: FailedPrecondition, stdin unread
        data = self._stdin(cid, io) if io.stdin is not None else None
        try:
            try:  # `timeout 0` (no time limit) makes the command a process group of its own
                pid = self._agent.exec_start(cid, sid, ["timeout", "0", *cmd], data)
            except SpawnFailed:  # no `timeout` in the guest: a kill reaches argv[0] only
                pid = self._agent.exec_start(cid, sid, cmd, data)
        except SpawnFailed as e:
            self._write(io, b"", f"arktos-vm-runtime: {e}\n".encode())
            return 127
        every = 0.05
        while True:
            if io.gone.is_set():
                self._agent.kill_group(cid, sid, pid)
                reap(self._agent, cid, sid, pid)
                log.info("exec in %s: the client went away; guest process %d killed", cid,
                         pid, extra={"CONTAINER_ID": cid})
                raise Cancelled(f"Exec in {cid}: the client went away; the command was "
                                "killed in the guest")
            st = self._agent.exec_status(cid, sid, pid, MAX_OUTPUT)
            if st.exited:
                if st.truncated:
                    log.info("exec output in VM %s cut to %d bytes per stream", cid,
                             MAX_OUTPUT, extra={"CONTAINER_ID": cid})
                self._write(io, st.stdout, st.stderr)
                return st.exit_code
            io.gone.wait(every)
            every = min(every * 1.5, self._poll_max)

    def _stdin(self, cid: str, io: StreamIO) -> bytes:
        assert io.stdin is not None
        parts: list[bytes] = []
        size = 0
        while True:
            if io.gone.is_set():
                raise Cancelled(f"Exec in {cid}: the client went away before its stdin "
                                "ended; nothing was run")
            chunk = io.stdin.read(WAIT)
            if chunk is None:
                continue
            if not chunk:
                return b"".join(parts)
            size += len(chunk)
            if size > self._max_stdin:
                raise InvalidArgument(
                    f"Exec: stdin is over {self._max_stdin} bytes; the QEMU guest agent "
                    "takes a command's whole input at its start, so it is bounded")
            parts.append(chunk)

    @staticmethod
    def _write(io: StreamIO, out: bytes, err: bytes) -> None:
        for data, writer in ((out, io.stdout), (err, io.stdout if io.tty else io.stderr)):
            if writer is None:
                continue
            for i in range(0, len(data), CHUNK):
                writer(data[i:i + CHUNK])
