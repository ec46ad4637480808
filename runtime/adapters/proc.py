"""The one way the runtime runs a program: argv only, a timeout, the process group killed.

Every child leads its own session, so a timeout or a cancelled caller kills it *and*
whatever it started (a CNI plugin's IPAM helper, `ip netns exec`'s child). Errors map in
one place:
  the program is missing           -> Unavailable, naming the Debian package
  it ran past its timeout          -> DeadlineExceeded (killed)
  it exited non-zero (check=True)  -> ProcessFailed (an Internal) carrying its stderr, or
                                      the caller's `failure` class; "No space left on
                                      device" -> ResourceExhausted whatever the class
Nothing goes through a shell; the environment is the caller's or a minimal one. A caller
may give resource limits (CPU seconds, address space): the program then runs under
util-linux's prlimit, which sets them and execs it, as OpenStack runs qemu-img on untrusted
images (setting limits in the child from Python would need preexec_fn, which is not safe in
a threaded daemon). A program killed by a signal, as one past its CPU limit is, says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import NoReturn

from ..errors import DeadlineExceeded, Internal, ResourceExhausted, RuntimeError_, Unavailable

log = logging.getLogger(__name__)

# What a child gets when the caller gives no environment: no proxies, no locale surprises.
MINIMAL_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "LC_ALL": "C.UTF-8"}
STDERR_KEPT = 2000  # characters of stderr carried in an error message

# The Debian package that ships each program the runtime runs, for "not installed" errors.
PACKAGES = {
    "qemu-img": "qemu-utils",
    "genisoimage": "genisoimage",
    "ip": "iproute2",
    "dnsmasq": "dnsmasq-base",
    "prlimit": "util-linux",
}


@dataclasses.dataclass(frozen=True)
class Limits:
    """Resource limits for one program run (prlimit --cpu / --as)."""

    cpu_seconds: int
    address_space: int  # bytes

    def argv(self) -> list[str]:
        return ["prlimit", f"--cpu={self.cpu_seconds}", f"--as={self.address_space}", "--"]


@dataclasses.dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes
    seconds: float

    @property
    def out(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    @property
    def err(self) -> str:
        return self.stderr.decode("utf-8", "replace").strip()


class ProcessFailed(Internal):
    """A program exited non-zero; `stderr` holds the end of what it said."""

    def __init__(self, message: str, *, returncode: int = -1, stderr: str = "",
                 **context: object) -> None:
        super().__init__(message, **context)
        self.returncode = returncode
        self.stderr = stderr


def _missing(label: str, program: str) -> NoReturn:
    package = PACKAGES.get(os.path.basename(program))
    hint = f" (install the {package} package)" if package else ""
    raise Unavailable(f"{label}: {program} is not installed{hint}")


def exit_text(returncode: int) -> str:
    """'exit 3', or 'killed by SIGXCPU (past its CPU time limit)' for a signal."""
    if returncode >= 0:
        return f"exit {returncode}"
    try:
        sig = signal.Signals(-returncode).name
    except ValueError:
        sig = f"signal {-returncode}"
    why = {"SIGXCPU": " (past its CPU time limit)", "SIGABRT": " (aborted)"}
    return f"killed by {sig}{why.get(sig, '')}"


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    with contextlib.suppress(Exception):
        proc.communicate(timeout=5)


def run(argv: Sequence[str], *, timeout: float, what: str | None = None,
        input: bytes | None = None, env: Mapping[str, str] | None = None, cwd: str = "/",
        check: bool = True, failure: type[RuntimeError_] = ProcessFailed,
        capture: bool = True, limits: Limits | None = None) -> Result:
    """Runs argv to completion; see the module doc for the errors.

    `what` names the work in messages (default: the program's name); `failure` is the
    error class for a non-zero exit when check is set (ProcessFailed unless the caller
    means something else by it, e.g. Unavailable for a CNI plugin); `limits` runs it
    under prlimit.
    """
    args = tuple(str(a) for a in argv)
    program = os.path.basename(args[0])
    label = what or program
    child_env = dict(env if env is not None else MINIMAL_ENV)
    command = args
    if limits is not None:
        if shutil.which(args[0], path=child_env.get("PATH")) is None:
            _missing(label, args[0])
        command = (*limits.argv(), *args)
    started = time.monotonic()
    out = subprocess.PIPE if capture else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(
            command, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=out, stderr=subprocess.PIPE, env=child_env,
            cwd=cwd, start_new_session=True, close_fds=True)
    except FileNotFoundError:
        _missing(label, command[0])
    except OSError as e:
        raise Unavailable(f"{label}: cannot run {command[0]}: {e.strerror}") from None
    try:
        stdout, stderr = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise DeadlineExceeded(f"{label} did not finish in {timeout:g} s; killed it") from None
    except BaseException:
        _kill_group(proc)
        raise
    result = Result(args, proc.returncode, stdout or b"", stderr or b"",
                    time.monotonic() - started)
    log.debug("%s exited %d in %.3f s", label, result.returncode, result.seconds)
    if check and result.returncode != 0:
        err = result.err[-STDERR_KEPT:] or result.out.strip()[-STDERR_KEPT:]
        message = f"{label} failed ({exit_text(result.returncode)}): {err or '(no message)'}"
        if "No space left on device" in err:
            raise ResourceExhausted(message, stderr=err)
        raise failure(message, returncode=result.returncode, stderr=err)
    return result
