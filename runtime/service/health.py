"""What Status reports and what decides whether the systemd watchdog is fed.

libvirt is probed in a thread of its own, one probe at a time. A probe that fails says
libvirt is unreachable (RuntimeReady false; restarting the daemon would not help, so the
watchdog is still fed). A probe that does not come back within the timeout says the
connection is wedged: then the watchdog stops, and systemd restarts the daemon.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..adapters.libvirt_conn import LibvirtConnection

log = logging.getLogger(__name__)

CNI_EXTENSIONS = (".conflist", ".conf", ".json")


@dataclasses.dataclass(frozen=True)
class Condition:
    ok: bool
    reason: str = ""
    message: str = ""


def cni_condition(conf_dir: str) -> Condition:
    try:
        names = sorted(
            e.name for e in Path(conf_dir).iterdir()
            if e.is_file() and e.name.endswith(CNI_EXTENSIONS)
        )
    except OSError as e:
        return Condition(False, "NoCNIConfig",
                         f"cannot read CNI config dir {conf_dir}: {e.strerror}")
    if not names:
        return Condition(False, "NoCNIConfig", f"no CNI network configuration in {conf_dir}")
    return Condition(True, "", f"CNI network from {conf_dir}/{names[0]}")


class LibvirtHealth:
    def __init__(self, conn: LibvirtConnection, probe_timeout: float) -> None:
        self._conn = conn
        self._timeout = probe_timeout
        self._state = Condition(False, "LibvirtNotChecked", "libvirt has not been probed yet")
        self._probe_started: float | None = None
        self._on_healthy: list[Callable[[], None]] = []
        self.version = ""

    def on_healthy(self, callback: Callable[[], None]) -> None:
        """Runs callback in the probe thread after each successful probe. It must return at
        once and start any long work in a thread of its own (reconcile does)."""
        self._on_healthy.append(callback)

    @property
    def condition(self) -> Condition:
        if self.wedged():
            return Condition(False, "LibvirtNotResponding",
                             f"libvirt at {self._conn.uri} has not answered for "
                             f"{time.monotonic() - (self._probe_started or 0):.0f} s")
        return self._state

    def wedged(self) -> bool:
        started = self._probe_started
        return started is not None and time.monotonic() - started > self._timeout

    def start_probe(self) -> None:
        if self._probe_started is not None:
            return  # one in flight (perhaps hung): never pile up threads
        self._probe_started = time.monotonic()
        threading.Thread(target=self._probe, name="libvirt-probe", daemon=True).start()

    def _probe(self) -> None:
        try:
            self.version = self._conn.probe()
            new = Condition(True, "", f"libvirt {self.version} at {self._conn.uri}")
        except Exception as e:
            new = Condition(False, "LibvirtUnreachable", str(e))
        if new.ok != self._state.ok:
            log.log(logging.INFO if new.ok else logging.WARNING, "libvirt: %s", new.message)
        self._state = new
        # The probe is over: what the hooks do is not libvirt hanging.
        self._probe_started = None
        try:
            if new.ok:
                for callback in self._on_healthy:
                    callback()
        except Exception:
            log.exception("a libvirt reconnect hook failed")
