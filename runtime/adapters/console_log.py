"""The VM's serial console, turned into the CRI log file that `kubectl logs` reads.

virtlogd writes the raw console to a file of the VM's (it survives our restarts and
rotates it); one thread here follows every running VM's raw file and appends each line
in the CRI format `RFC3339Nano stdout F|P line` to the container's log path.

Offsets are saved in batches, not one fsync'd commit per line burst: the offsets reached
are remembered here and handed to `save_offsets` (one store transaction) at most every
FLUSH_EVERY seconds, and at once on flush, forget and close. The offset saved is always
that of the first byte not yet written to the log as a whole record, so a restarted daemon
resumes from it and no console output is ever lost; after a kill -9, what was written in
the last FLUSH_EVERY + POLL seconds (under a second) may be copied into the log twice.
The raw file is kept open, so a rotation by virtlogd is noticed by its inode changing,
after the old file has been read to the end.

Log files are written only below one root (the kubelet's pod logs directory), opened by
a walk from the root with O_NOFOLLOW at every component, so a symlink or a directory
swapped for one (before or after the path was checked) is never followed: the console
is then held back in the raw file, not written elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .fsutil import make_dirs

log = logging.getLogger(__name__)

POLL = 0.2
# At most this long between offset saves: bounds what a kill -9 may copy twice.
FLUSH_EVERY = 0.5
MAX_LINE = 16 * 1024  # longer lines are split into P(artial) records, as CRI-O does


def cri_timestamp(ns: int | None = None) -> str:
    ns = time.time_ns() if ns is None else ns
    secs, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:09d}Z"


def cri_lines(data: bytes, pending: bytes) -> tuple[bytes, bytes]:
    """CRI records for the complete lines in pending+data, and what is left over."""
    buf = pending + data
    out = []
    while True:
        nl = buf.find(b"\n")
        if nl < 0:
            break
        line, buf = buf[:nl].rstrip(b"\r"), buf[nl + 1:]
        while len(line) > MAX_LINE:
            out.append(b"%s stdout P %s\n" % (cri_timestamp().encode(), line[:MAX_LINE]))
            line = line[MAX_LINE:]
        out.append(b"%s stdout F %s\n" % (cri_timestamp().encode(), line))
    while len(buf) > MAX_LINE:
        out.append(b"%s stdout P %s\n" % (cri_timestamp().encode(), buf[:MAX_LINE]))
        buf = buf[MAX_LINE:]
    return b"".join(out), buf


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_LOG_FLAGS = (os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
              | os.O_NOCTTY | os.O_CLOEXEC)


def parts_below(root: Path, path: Path) -> tuple[str, ...] | None:
    """`path`'s components below `root` (both absolute), or None when it is not a file
    path strictly below root."""
    try:
        rel = Path(os.path.normpath(path)).relative_to(os.path.normpath(root))
    except ValueError:
        return None
    parts = rel.parts
    if not parts or not os.path.isabs(path) or any(p in (".", "..") for p in parts):
        return None
    return parts


def open_below(root: Path, parts: Sequence[str]) -> int:
    """Opens root/parts... for appending, making missing directories (0755, as the kubelet
    does), without following a symlink at any component below root; only a regular file
    with one link is accepted. The root itself is the operator's and is trusted."""
    if not root.is_dir():
        make_dirs(root, 0o755)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in parts[:-1]:
            try:
                sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o755, dir_fd=fd)
                sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
                os.fchmod(sub, 0o755)  # whatever the umask: log readers list it
            os.close(fd)
            fd = sub
        out = os.open(parts[-1], _LOG_FLAGS, 0o640, dir_fd=fd)
    finally:
        os.close(fd)
    st = os.fstat(out)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(out)
        raise OSError(f"{parts[-1]} is not a regular file with one link; not written")
    return out


def _write_all(fd: int, data: bytes) -> None:
    """os.write may write less than asked (a signal, a nearly full disk): a record is
    never left cut in the middle by a short write."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class _Follower:
    def __init__(self, raw: Path, root: Path, parts: tuple[str, ...], offset: int) -> None:
        self.raw, self.root, self.parts, self.offset = raw, root, parts, offset
        self.src: int | None = None
        self.dst: int | None = None
        self.pending = b""
        self.saved_offset = offset
        self.reopen_wanted = False
        self.error = ""  # the last error logged, so a lasting one is logged once

    @property
    def safe_offset(self) -> int:
        """The raw file's offset up to which everything is in the log as whole records:
        the partial line still pending is read again after a restart, never lost."""
        return max(0, self.offset - len(self.pending))

    def _open_src(self) -> None:
        try:
            self.src = os.open(self.raw, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # QEMU has not started yet
        size = os.fstat(self.src).st_size
        if size < self.offset:  # rotated or truncated while we were away
            self.offset = 0
        os.lseek(self.src, self.offset, os.SEEK_SET)


    def poll(self) -> None:
        if self.reopen_wanted and self.dst is not None:
            os.close(self.dst)
            self.dst = None
            self.reopen_wanted = False
        if self.src is None:
            self._open_src()
            if self.src is None:
                return
        while data := os.read(self.src, 1 << 16):
            records, pending = cri_lines(data, self.pending)
            if records and self.dst is None:
                try:
                    self.dst = open_below(self.root, self.parts)
                except OSError:
                    os.lseek(self.src, self.offset, os.SEEK_SET)  # kept for the next try
                    raise
            if records:
                assert self.dst is not None
                try:
                    _write_all(self.dst, records)
                except OSError:
                    os.lseek(self.src, self.offset, os.SEEK_SET)  # read again next time
                    raise
            self.offset += len(data)
            self.pending = pending
        # A new file at the path: virtlogd rotated it. The old one is read to its end now.
        try:
            if os.stat(self.raw).st_ino != os.fstat(self.src).st_ino:
                os.close(self.src)
                self.src, self.offset = None, 0
        except FileNotFoundError:
            pass

    def close(self) -> None:
        for fd in (self.src, self.dst):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.src = self.dst = None


class ConsoleLogs:
    """Follows the raw consoles; `save_offsets({cid: offset})` persists a batch of offsets.
    Log files are written only below `root`.
    With `thread=False` nothing runs by itself: `tick()` is one round (for tests)."""

    def __init__(self, save_offsets: Callable[[dict[str, int]], None], root: Path, *,
                 flush_every: float = FLUSH_EVERY, thread: bool = True) -> None:
        self._save = save_offsets
        self.root = Path(root)
        self._flush_every = flush_every
        self._followers: dict[str, _Follower] = {}
        self._unsaved: dict[str, int] = {}
        self._last_save = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if thread:
            self._thread = threading.Thread(target=self._run, name="console-logs",
                                            daemon=True)
            self._thread.start()

    def follow(self, cid: str, raw: Path, out: Path, offset: int = 0) -> bool:
        """Copies the raw console into `out` from now on; False (logged) when `out` is not
        below the root (a record from before the root was enforced): nothing is written."""
        parts = parts_below(self.root, out)
        if parts is None:
            log.warning("console log of %s: %s is not below %s; not written", cid, out,
                        self.root, extra={"CONTAINER_ID": cid})
            return False
        with self._lock:
            if cid not in self._followers:
                self._followers[cid] = _Follower(raw, self.root, parts, offset)
        return True

    def reopen(self, cid: str) -> None:
        """After the kubelet rotated the log file: write to a new file at the same path."""
        with self._lock:
            f = self._followers.get(cid)
            if f is not None:
                f.reopen_wanted = True

    def flush(self, cid: str) -> None:
        """Copies what the raw console holds now (called once a VM has stopped) and saves
        the offsets reached."""
        with self._lock:
            f = self._followers.get(cid)
            if f is not None:
                self._poll_one(cid, f)
            self._save_unsaved()

    def forget(self, cid: str) -> None:
        with self._lock:
            f = self._followers.pop(cid, None)
            if f is not None:
                self._poll_one(cid, f)
                f.close()
            self._save_unsaved()

    def tick(self) -> None:
        """One round: copy what every console printed, save offsets if FLUSH_EVERY passed."""
        with self._lock:
            for cid, f in list(self._followers.items()):
                self._poll_one(cid, f)
            if time.monotonic() - self._last_save >= self._flush_every:
                self._save_unsaved()

    def close(self) -> None:
        """At shutdown: a last copy of every console, its offsets saved, files closed."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            for cid, f in list(self._followers.items()):
                self._poll_one(cid, f)
                f.close()
            self._followers.clear()
            self._save_unsaved()

    def _poll_one(self, cid: str, f: _Follower) -> None:
        try:
            f.poll()
            if f.dst is not None:
                f.error = ""
        except OSError as e:
            if str(e) != f.error:  # polled five times a second: a lasting error logs once
                log.warning("console log of %s: %s", cid, e, extra={"CONTAINER_ID": cid})
                f.error = str(e)
        if f.safe_offset != f.saved_offset:
            f.saved_offset = f.safe_offset
            self._unsaved[cid] = f.safe_offset

    def _save_unsaved(self) -> None:
        self._last_save = time.monotonic()
        if not self._unsaved:
            return
        batch, self._unsaved = self._unsaved, {}
        try:
            self._save(batch)
        except Exception:
            log.exception("saving %d console offset(s) failed; retrying later", len(batch))
            for cid, offset in batch.items():
                self._unsaved.setdefault(cid, offset)

    def _run(self) -> None:
        while not self._stop.wait(POLL):
            self.tick()
