"""`arktos-vm-runtime console` on a pseudo-terminal, as an operator runs it on a node."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

CLI = [sys.executable, "-m", "arktos_vm_runtime"]


class PtyConsole:
    def __init__(self, socket_path: str, *args: str) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([*CLI, "console", *args, "--listen", socket_path],
                                     stdin=slave, stdout=slave, stderr=slave,
                                     start_new_session=True)
        os.close(slave)
        self.out = bytearray()

    def read_until(self, what: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while what not in self.out.decode(errors="replace"):
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what!r} within {timeout} s: {bytes(self.out)!r}")
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if ready:
                try:
                    self.out += os.read(self.master, 65536)
                except OSError:  # the child closed the pty
                    time.sleep(0.1)
        return self.out.decode(errors="replace")

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        os.close(self.master)
