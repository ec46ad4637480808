"""The QEMU guest agent of our domains, through libvirt (libvirt_qemu.qemuAgentCommand).

Every domain has the agent's virtio channel (domain_xml.GUEST_AGENT_CHANNEL); whether an
agent answers on it depends on the guest. Commands go only to domains this instance owns
(Domains.owned). A guest with no agent answering is FailedPrecondition with a message
that says so; the agent's own errors are Unavailable (as every other libvirt error).
libvirt marks a domain "custom-ga-command" (a taint in its log) on the first raw command.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterator
from typing import Any

import libvirt
import libvirt_qemu

from ..errors import FailedPrecondition, NotFound, Unavailable
from .libvirt_domains import NO_AGENT, Domains, translate

log = logging.getLogger(__name__)

COMMAND_TIMEOUT = 10  # seconds libvirt waits for one agent reply


class SpawnFailed(Exception):
    """The agent could not start the program (not found, not executable)."""


@dataclasses.dataclass(frozen=True)
class ExecStatus:
    exited: bool
    exit_code: int = 0  # 128 + N when killed by signal N
    stdout: bytes = b""
    stderr: bytes = b""
    truncated: bool = False  # the agent or we dropped output beyond the bound


@contextlib.contextmanager
def _agent_call(what: str, uuid: str) -> Iterator[None]:
    try:
        yield
    except libvirt.libvirtError as e:
        code = e.get_error_code()
        if code in NO_AGENT:
            raise FailedPrecondition(
                f"{what}: VM {uuid} has no QEMU guest agent answering (is qemu-guest-agent "
                f"installed and running in the guest?): {e.get_error_message() or e}",
                uuid=uuid, libvirt_code=code) from e
        raise translate(e, what, uuid) from e


class GuestAgent:
    def __init__(self, domains: Domains) -> None:
        self._domains = domains

    def command(self, uuid: str, sandbox_id: str, execute: str,
                arguments: dict[str, Any] | None = None,
                timeout: int = COMMAND_TIMEOUT) -> Any:
        """Runs one agent command; its "return" value. `timeout` >= 1 second."""
        dom = self._domains.owned(uuid, sandbox_id, f"sending {execute} to")
        if dom is None:
            raise NotFound(f"the domain of container {uuid} does not exist or is not ours")
        msg: dict[str, Any] = {"execute": execute}
        if arguments is not None:
            msg["arguments"] = arguments
        with _agent_call(f"guest agent command {execute}", uuid):
            reply = libvirt_qemu.qemuAgentCommand(dom, json.dumps(msg), max(1, timeout), 0)
        try:
            return json.loads(reply)["return"]
        except (ValueError, KeyError, TypeError) as e:
            raise Unavailable(f"guest agent command {execute}: unreadable reply "
                              f"{reply[:200]!r}") from e

    def ping(self, uuid: str, sandbox_id: str, timeout: int = 1) -> None:
        """Returns when the agent answers; FailedPrecondition when none does."""
        self.command(uuid, sandbox_id, "guest-ping", timeout=timeout)

    def exec_start(self, uuid: str, sandbox_id: str, argv: list[str],
                   input_data: bytes | None = None) -> int:
        """Starts argv[0] (looked up on the guest's PATH) with output captured; its pid.
        `input_data` is the program's whole stdin (the agent writes it, then closes it):
        guest-exec takes input only at spawn."""
        args: dict[str, Any] = {"path": argv[0], "arg": argv[1:], "capture-output": True}
        if input_data is not None:
            args["input-data"] = base64.b64encode(input_data).decode()
        try:
            ret = self.command(uuid, sandbox_id, "guest-exec", args)
        except Unavailable as e:
            # The agent's error for a program it could not spawn (glib's message).
            if "Failed to execute child process" in e.message:
                raise SpawnFailed(e.message) from e
            raise
        return int(ret["pid"])

    def exec_status(self, uuid: str, sandbox_id: str, pid: int, limit: int) -> ExecStatus:
        """The state of a guest-exec'd process; output cut to `limit` bytes per stream.
        The agent forgets a process once a status reporting it exited was read."""
        ret = self.command(uuid, sandbox_id, "guest-exec-status", {"pid": pid})
        if not ret.get("exited"):
            return ExecStatus(exited=False)
        code = int(ret.get("exitcode", 0))
        if "signal" in ret:
            code = 128 + int(ret["signal"])
        out = base64.b64decode(ret.get("out-data", ""))
        err = base64.b64decode(ret.get("err-data", ""))
        truncated = bool(ret.get("out-truncated") or ret.get("err-truncated")
                         or len(out) > limit or len(err) > limit)
        return ExecStatus(True, code, out[:limit], err[:limit], truncated)

    def kill_group(self, uuid: str, sandbox_id: str, pid: int) -> None:
        """SIGKILL to the process `pid` and its process group, from inside the guest (the
        agent has no kill command); best effort. Spelled `kill -9 -PID`: dash (Debian's
        /bin/sh) takes no `--` after a signal ("kill -KILL -- -PID" killed nothing)."""
        try:
            helper = self.exec_start(uuid, sandbox_id, [
                "/bin/sh", "-c", 'kill -9 -"$1" 2>/dev/null; kill -9 "$1" 2>/dev/null; true',
                "sh", str(pid)])
            self.exec_status(uuid, sandbox_id, helper, 0)  # reaped later if not yet done
        except (SpawnFailed, FailedPrecondition, Unavailable, NotFound) as e:
            log.warning("killing guest process %d in VM %s failed: %s", pid, uuid, e,
                        extra={"CONTAINER_ID": uuid})

    def request_shutdown(self, uuid: str, sandbox_id: str) -> bool:
        """Asks the agent to power the guest off; returns within about a second. True when
        an agent took the request (guest-shutdown never replies: the wait for a reply
        times out), False when no agent answers."""
        try:
            self.ping(uuid, sandbox_id, timeout=1)
        except (FailedPrecondition, Unavailable, NotFound):
            return False
        with contextlib.suppress(FailedPrecondition, Unavailable, NotFound):
            self.command(uuid, sandbox_id, "guest-shutdown", {"mode": "powerdown"}, timeout=1)
        return True
