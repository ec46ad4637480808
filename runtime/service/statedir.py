"""The state directory: created and locked at start, so one daemon owns it at a time.

Its store keeps the instance id: a random id made once, written into the metadata of every
domain this runtime defines, so two runtimes on one host (two state directories) can tell
their domains apart. It survives restarts and upgrades with the store.
"""

from __future__ import annotations

import fcntl
import os
import uuid
from pathlib import Path

from ..errors import StartupError
from .store import Store, StoreError

INSTANCE_KEY = "instance_id"


class StateDir:
    def __init__(self, root: str) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(mode=0o711, parents=True, exist_ok=True)
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
            self._lock_fd = os.open(self.root / "lock", flags, 0o600)
        except OSError as e:
            raise StartupError(f"state dir {root} cannot be written: {e.strerror}") from e
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._lock_fd, 32, 0).decode(errors="replace").strip()
            os.close(self._lock_fd)
            raise StartupError(
                f"state dir {root} is in use by another arktos-vm-runtime (pid {holder or '?'})"
            ) from None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)
        try:
            self.private = self.root / "private"
            self.private.mkdir(mode=0o700, exist_ok=True)
            os.chmod(self.private, 0o700)
            self.store = Store(self.root / "state.db")
            self.instance_id = self.store.setting(INSTANCE_KEY) or ""
            if not self.instance_id:
                self.instance_id = uuid.uuid4().hex
                self.store.set_setting(INSTANCE_KEY, self.instance_id)
        except (OSError, StoreError) as e:
            raise StartupError(f"state dir {root}: {e}") from e

    @property
    def private_socket(self) -> str:
        return str(self.private / "grpc.sock")

    def close(self) -> None:
        self.store.close()
        os.close(self._lock_fd)
