"""Fault injection, a testing aid: named points between the steps of every multi-step
operation, where a test makes the daemon raise an error or die (`os._exit`) on cue, to show
that the records written before each step let reconcile and a kubelet-like retry converge.

Off unless armed at startup (`daemon.main` reads the environment once): the spec names
points, a kind and optionally the sandbox they apply to, e.g.

    ARKTOS_VM_RUNTIME_FAULTS="run_sandbox.netns=crash@<sandbox id>,create_container.seed=raise"

and the daemon refuses to start with a spec unless ARKTOS_VM_RUNTIME_FAULTS_ENABLE is
`testing-only`. Each armed fault fires once: a retry after a raised fault goes through.
Unarmed, `point` is one dict lookup.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
from collections.abc import Mapping

from ..errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)

SPEC_ENV = "ARKTOS_VM_RUNTIME_FAULTS"
ENABLE_ENV = "ARKTOS_VM_RUNTIME_FAULTS_ENABLE"
ENABLE_VALUE = "testing-only"
CRASH_EXIT_CODE = 86
KINDS = ("raise", "crash")

# Every point, in the order its operation reaches it. A point sits after the step it names
# and before the next one.
POINTS: dict[str, tuple[str, ...]] = {
    "run_sandbox": ("recorded", "network_recorded", "netns", "cni_added", "cni_recorded",
                    "wired", "dhcp", "network_ready"),
    "create_container": ("recorded", "dir", "overlay", "seed", "defined"),
    "start_container": ("recorded", "taps", "started", "bridged"),
    "stop_container": ("recorded", "signalled"),
    "stop_sandbox": ("containers_stopped", "recorded"),
    "network_teardown": ("recorded", "dhcp_stopped", "taps_deleted", "cni_deleted",
                         "netns_deleted"),
    "remove_container": ("recorded", "undefined", "files_removed"),
    "remove_sandbox": ("recorded", "containers_removed", "network_removed"),
    "attach_nic": ("recorded", "cni_added", "wired", "dhcp", "plugged"),
    "detach_nic": ("recorded", "unplugged", "unwired", "dhcp", "cni_deleted"),
}
ALL_POINTS = frozenset(f"{op}.{step}" for op, steps in POINTS.items() for step in steps)


class InjectedFault(Unavailable):
    """The error a `raise` fault raises (UNAVAILABLE: the kubelet retries)."""


@dataclasses.dataclass(frozen=True)
class Fault:
    point: str
    kind: str
    sandbox_id: str = ""  # "" = whichever sandbox reaches the point first


def parse(spec: str) -> list[Fault]:
    """`point=kind[@sandbox id]`, comma separated."""
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, sep, rest = item.partition("=")
        kind, _, sandbox_id = rest.partition("@")
        if not sep or point not in ALL_POINTS or kind not in KINDS:
            raise InvalidArgument(f"fault {item[:120]!r}: expected point=raise|crash[@sandbox]"
                                  f" with a point among {sorted(ALL_POINTS)}")
        faults.append(Fault(point, kind, sandbox_id))
    return faults


_armed: dict[tuple[str, str], str] = {}
_lock = threading.Lock()


def install(faults: list[Fault]) -> None:
    with _lock:
        _armed.clear()
        _armed.update({(f.point, f.sandbox_id): f.kind for f in faults})


def from_environment(env: Mapping[str, str]) -> list[Fault]:
    """The faults the environment arms (none without a spec); InvalidArgument when a spec
    is given without the explicit opt-in, or names an unknown point or kind."""
    spec = env.get(SPEC_ENV, "")
    if not spec:
        return []
    if env.get(ENABLE_ENV) != ENABLE_VALUE:
        raise InvalidArgument(f"{SPEC_ENV} is a testing aid; refusing it without "
                              f"{ENABLE_ENV}={ENABLE_VALUE}")
    return parse(spec)


def point(name: str, sandbox_id: str) -> None:
    """Marks a point between two steps; fires a fault armed there (once)."""
    if not _armed:
        return
    with _lock:
        kind = _armed.pop((name, sandbox_id), None) or _armed.pop((name, ""), None)
    if kind is None:
        return
    log.warning("injected fault: %s at %s (sandbox %s)", kind, name, sandbox_id,
                extra={"POD_SANDBOX_ID": sandbox_id})
    if kind == "crash":
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        os._exit(CRASH_EXIT_CODE)
    raise InjectedFault(f"injected fault at {name}")
