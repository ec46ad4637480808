"""sd_notify never blocks the daemon (found by the fuzz campaign: STATUS= lines, sent from
the serving loop while the notify reader lagged, filled the datagram queue and the next
send stopped the daemon answering any RPC)."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from pathlib import Path

import pytest

from arktos_vm_runtime.daemon.notify import Notifier

# More than any host's net.unix.max_dgram_qlen (10 here, 512 under systemd)
MESSAGES = 2000


def test_a_reader_that_does_not_read_costs_dropped_messages_not_a_hang(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "notify.sock"
    reader = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    reader.bind(str(path))
    notifier = Notifier({"NOTIFY_SOCKET": str(path)})
    caplog.set_level(logging.INFO, logger="arktos_vm_runtime.daemon.notify")

    def flood() -> None:
        for i in range(MESSAGES):
            notifier.status(f"status {i}")

    t = threading.Thread(target=flood, daemon=True)
    started = time.monotonic()
    t.start()
    t.join(5.0)
    try:
        assert not t.is_alive(), "sd_notify blocked on a full queue"
        assert time.monotonic() - started < 5.0
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, "said once, not once per message"
        assert "dropping messages" in warnings[0].getMessage()

        reader.settimeout(0.2)
        got = []
        try:
            while True:
                got.append(reader.recv(4096).decode())
        except TimeoutError:
            pass
        assert got and got[0] == "STATUS=status 0", "the first ones arrived"
        assert len(got) < MESSAGES, "the queue was full: later ones were dropped"

        notifier.status("back")  # the reader caught up: messages flow again
        assert reader.recv(4096) == b"STATUS=back"
        assert "works again" in caplog.records[-1].getMessage()
    finally:
        reader.close()
        path.unlink(missing_ok=True)  # unblocks a blocked sender (old code) with ECONNREFUSED
        t.join(5.0)
        notifier.close()


def test_the_latest_status_that_did_not_fit_is_sent_once_the_reader_has_room(
        tmp_path: Path) -> None:
    """STATUS= is state: a watchdog test (and systemctl status) must see the last one even
    when it came while the reader's queue was full."""
    path = tmp_path / "notify.sock"
    reader = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    reader.bind(str(path))
    reader.settimeout(0.2)
    notifier = Notifier({"NOTIFY_SOCKET": str(path)})
    try:
        for _ in range(MESSAGES):  # fill the queue
            notifier.watchdog()
        notifier.status("libvirt: LibvirtNotResponding")  # no room: kept
        notifier.retry()  # still no room
        queued = []
        with contextlib.suppress(TimeoutError):
            while True:
                queued.append(reader.recv(4096).decode())
        assert "STATUS=libvirt: LibvirtNotResponding" not in queued
        notifier.retry()  # the watchdog thread's next tick, now with room
        assert reader.recv(4096) == b"STATUS=libvirt: LibvirtNotResponding"
        notifier.retry()  # sent once
        with pytest.raises(TimeoutError):
            reader.recv(4096)
    finally:
        reader.close()
