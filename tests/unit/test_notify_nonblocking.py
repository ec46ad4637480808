"""sd_notify never blocks the daemon: a receiver that never reads fills its queue, and
further messages are dropped at once instead of stalling the serving loop."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from arktos_vm_runtime.daemon.notify import Notifier


def test_a_receiver_that_never_reads_does_not_block(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    try:
        n = Notifier({"NOTIFY_SOCKET": str(path)})

        def flood() -> None:
            for i in range(5000):  # far beyond the queue of a unix datagram socket
                n.status(f"status line {i} " + "x" * 100)

        t = threading.Thread(target=flood, daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive(), "sd_notify blocked on a full receiver"
        assert receiver.recv(4096).startswith(b"STATUS=status line 0 ")
        n.close()
    finally:
        receiver.close()
