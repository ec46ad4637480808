"""The VM's serial console, turned into the CRI log file that `kubectl logs` reads.

virtlogd writes the raw console to a file of the VM's (it survives our restarts and
rotates it); one thread here follows every running VM's raw file and appends each line
in the CRI format `RFC3339Nano stdout F|P line` to the container's log path. The offset
reached is saved right after each write, so a restarted daemon resumes where it stopped:
none is lost, and only a kill -9 in the instant between a write and its save repeats it.
The raw file is kept open, so a rotation by virtlogd is noticed by its inode changing,
after the old file has been read to the end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

POLL = 0.2
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


class _Follower:
    def __init__(self, raw: Path, out: Path, offset: int) -> None:
        self.raw, self.out, self.offset = raw, out, offset
        self.src: int | None = None
        self.dst: int | None = None
        self.pending = b""
        self.saved_offset = offset
        self.reopen_wanted = False

    def _open_src(self) -> None:
        try:
            self.src = os.open(self.raw, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # QEMU has not started yet
        size = os.fstat(self.src).st_size
        if size < self.offset:  # rotated or truncated while we were away
            self.offset = 0
        os.lseek(self.src, self.offset, os.SEEK_SET)

    def _open_dst(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.dst = os.open(self.out, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                           0o640)

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
            self.offset += len(data)
            records, self.pending = cri_lines(data, self.pending)
            if records:
                if self.dst is None:
                    self._open_dst()
                assert self.dst is not None
                os.write(self.dst, records)
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
    def __init__(self, save_offset: Callable[[str, int], None]) -> None:
        self._save = save_offset
        self._followers: dict[str, _Follower] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="console-logs", daemon=True)
        self._thread.start()

    def follow(self, cid: str, raw: Path, out: Path, offset: int = 0) -> None:
        with self._lock:
            if cid not in self._followers:
                self._followers[cid] = _Follower(raw, out, offset)

    def reopen(self, cid: str) -> None:
        """After the kubelet rotated the log file: write to a new file at the same path."""
        with self._lock:
            f = self._followers.get(cid)
            if f is not None:
                f.reopen_wanted = True

    def flush(self, cid: str) -> None:
        """Copies what the raw console holds now (called once a VM has stopped)."""
        with self._lock:
            f = self._followers.get(cid)
            if f is not None:
                self._poll_one(cid, f)

    def forget(self, cid: str) -> None:
        with self._lock:
            f = self._followers.pop(cid, None)
            if f is not None:
                self._poll_one(cid, f)
                f.close()

    def _poll_one(self, cid: str, f: _Follower) -> None:
        try:
            f.poll()
        except OSError as e:
            log.warning("console log of %s: %s", cid, e, extra={"CONTAINER_ID": cid})
        if f.offset != f.saved_offset:
            f.saved_offset = f.offset
            try:
                self._save(cid, f.offset)
            except Exception:
                log.exception("saving the console offset of %s failed", cid)

    def _run(self) -> None:
        while True:
            with self._lock:
                for cid, f in list(self._followers.items()):
                    self._poll_one(cid, f)
            time.sleep(POLL)
