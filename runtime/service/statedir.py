"""The state directory: checked, created and locked at start, so one daemon owns it at a
time and nobody else can read or change what it holds.

It holds the store (cloud-init user-data with passwords), the VM disks and the images, so
it must be the daemon user's, not a symlink, and not writable by group or others. QEMU
runs as another user (libvirt-qemu under qemu:///system) and opens the VM disks by path,
so every directory down to it must let others traverse (x); a state directory QEMU cannot
reach is refused here, not at the first StartContainer with libvirt's permission error.

Its store keeps the instance id: a random id made once, written into the metadata of every
domain this runtime defines, so two runtimes on one host (two state directories) can tell
their domains apart. It survives restarts and upgrades with the store.
"""

from __future__ import annotations

import fcntl
import os
import stat
import uuid
from pathlib import Path

from ..adapters.fsutil import make_dirs
from ..errors import StartupError
from .store import Store, StoreError

# state.db and the WAL and shared-memory files SQLite keeps beside it.
STORE_FILES = ("state.db", "state.db-wal", "state.db-shm")


def check_state_dir(root: Path, qemu_must_reach: bool) -> None:
    """Raises StartupError naming what is wrong with the state directory `root`."""
    try:
        st = os.lstat(root)
    except OSError as e:
        raise StartupError(f"state dir {root}: {e.strerror}") from e
    if stat.S_ISLNK(st.st_mode):
        raise StartupError(f"state dir {root} is a symlink; give the real directory "
                           f"({os.path.realpath(root)}) as --state-dir")
    if not stat.S_ISDIR(st.st_mode):
        raise StartupError(f"state dir {root} is not a directory")
    if st.st_uid != os.geteuid():
        raise StartupError(f"state dir {root} is owned by uid {st.st_uid}, not by uid "
                           f"{os.geteuid()} that runs the daemon; chown it")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise StartupError(f"state dir {root} is writable by group or others (mode "
                           f"{mode:04o}); chmod go-w {root}")
    if qemu_must_reach:
        real = Path(os.path.realpath(root))
        for d in (real, *real.parents):
            dmode = stat.S_IMODE(os.stat(d).st_mode)
            if not dmode & stat.S_IXOTH:
                raise StartupError(
                    f"state dir {root}: QEMU (another user) cannot reach the VM disks in it: "
                    f"{d} has mode {dmode:04o}, without x for others; chmod o+x {d}")

INSTANCE_KEY = "instance_id"


class StateDir:
    def __init__(self, root: str, *, qemu_must_reach: bool = False) -> None:
        self.root = Path(root)
        try:
            if not os.path.lexists(self.root):
                make_dirs(self.root, 0o711)  # x for others: QEMU reaches its disks by path
        except OSError as e:
            raise StartupError(f"state dir {root} cannot be written: {e.strerror}") from e
        check_state_dir(self.root, qemu_must_reach)
        try:
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
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
            # Made by a daemon that ran with a looser umask: the store holds secrets.
            for name in STORE_FILES:
                if (self.root / name).exists():
                    os.chmod(self.root / name, 0o600)
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
