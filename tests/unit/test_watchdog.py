"""The watchdog's decisions (fake clock), its thread feeding a real datagram socket, and
reconcile kept out of the libvirt health probe (the real Core on test:///default)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

from arktos_vm_runtime.adapters.libvirt_conn import LibvirtConnection
from arktos_vm_runtime.config import Settings
from arktos_vm_runtime.daemon.notify import Notifier
from arktos_vm_runtime.daemon.watchdog import (
    LOOP_STALL_LIMIT,
    Heartbeat,
    Watchdog,
    ping_interval,
    withhold_reason,
)
from arktos_vm_runtime.service.core import Core
from arktos_vm_runtime.service.statedir import StateDir


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeHealth:
    def __init__(self) -> None:
        self.hung = False
        self.probes = 0

    def wedged(self) -> bool:
        return self.hung

    def start_probe(self) -> None:
        self.probes += 1


def test_ping_interval_is_a_quarter_of_watchdog_sec_at_most_a_second() -> None:
    assert ping_interval(0) is None
    assert ping_interval(400_000) == 0.1
    assert ping_interval(2_000_000) == 0.5
    assert ping_interval(30_000_000) == 1.0


def test_only_a_wedged_loop_or_a_hung_libvirt_probe_withholds_the_ping() -> None:
    clock, health = Clock(), FakeHealth()
    beat = Heartbeat(clock)
    assert withhold_reason(beat, health) is None
    clock.now += LOOP_STALL_LIMIT - 1  # a slow moment of the loop: still fed
    assert withhold_reason(beat, health) is None
    clock.now += 2
    assert "serving loop" in (withhold_reason(beat, health) or "")
    beat.beat()
    assert withhold_reason(beat, health) is None
    health.hung = True
    assert "libvirt" in (withhold_reason(beat, health) or "")


def test_the_thread_pings_while_the_loop_beats_and_stops_when_it_does_not(
        tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(0.05)
    clock, health = Clock(), FakeHealth()
    beat = Heartbeat(clock)
    notifier = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"})
    dog = Watchdog(notifier, beat, health)

    def pings(seconds: float) -> int:
        n, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            with contextlib.suppress(TimeoutError):
                n += listener.recv(100) == b"WATCHDOG=1"
        return n

    dog.start()
    try:
        assert pings(1.0) >= 5
        assert health.probes >= 1, "the watchdog thread starts the libvirt probes"
        clock.now += LOOP_STALL_LIMIT + 1
        pings(0.2)  # one may have been in flight
        assert pings(1.0) == 0
    finally:
        dog.stop()
        notifier.close()
        listener.close()


def test_reconcile_runs_outside_the_probe_and_mutations_wait_for_it(tmp_path: Path) -> None:
    """A slow reconcile (a CNI DEL of up to 60 s) must not look like a hung libvirt."""
    settings = Settings(libvirt_uri="test:///default", state_dir=str(tmp_path / "state"),
                        cni_conf_dir=str(tmp_path / "cni"),
                        template_dir=str(tmp_path / "templates"), libvirt_probe_timeout=0.5)
    state = StateDir(settings.state_dir)
    core = Core(settings, state, LibvirtConnection(settings.libvirt_uri))
    reconciler = core.pods._reconciler
    real = reconciler.reconcile
    finished = threading.Event()

    def slow_reconcile() -> None:
        time.sleep(2.0)
        real()
        finished.set()

    reconciler.reconcile = slow_reconcile  # type: ignore[method-assign]
    try:
        core.health.start_probe()
        time.sleep(1.2)  # the probe itself took milliseconds; reconcile is still going
        assert core.runtime_condition().ok, core.runtime_condition()
        assert not core.health.wedged(), "reconcile was counted as a hung libvirt probe"
        assert not finished.is_set()
        core.pods.ensure_reconciled()  # a mutation: waits until reconciled
        assert finished.is_set()
    finally:
        finished.wait(5)
        core.close()
        state.close()
