"""py-spy (constraints.txt pins it) on a running daemon: sample while some work runs, then
the top frames by own time and by inclusive time, from py-spy's collapsed-stack output.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Leaf frames that are a thread waiting (in epoll, poll, a lock), not working.
WAITING = {"epoll_wait", "poll", "select", "EpollSelector.select", "_PollLikeSelector.select",
           "Condition.wait", "Event.wait", "pthread_cond_wait", "pthread_cond_timedwait",
           "sem_wait", "sem_timedwait", "futex_wait", "syscall", "0x0", "nanosleep",
           "clock_nanosleep", "accept", "recvmsg", "read", "_worker"}
#: Frames of the runtime's own request handling (its API, service and adapter layers).
RUNTIME_CODE = ("api/", "service/", "adapters/")
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def _short(frame: str) -> str:
    m = FRAME.match(frame)
    if not m:
        return frame
    path = m["file"]
    for cut in ("site-packages/", "arktos_vm_runtime/", "/runtime/", "lib/python3.11/"):
        if cut in path:
            path = path.split(cut, 1)[1]
            break
    return f"{m['func']} ({path})"


def top_frames(collapsed: str, n: int = 12) -> dict[str, Any]:
    """Own (leaf) and inclusive sample shares per function, from 'f1;f2;f3 COUNT' lines."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = waiting = ours = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        frames = [_short(f) for f in stack.split(";") if f]
        frames = [f for f in frames if not f.startswith("process ") and
                  not f.startswith("thread ")] or frames
        total += c
        idle = bool(frames) and frames[-1].split(" ", 1)[0] in WAITING
        if frames:
            own[frames[-1]] += c
        if idle:
            waiting += c
        elif any(any(r in f.rpartition(" (")[2] for r in RUNTIME_CODE) for f in frames):
            ours += c
        for f in set(frames):
            incl[f] += c
    def share(cnt: Counter[str]) -> list[dict[str, Any]]:
        return [{"frame": f, "pct": round(100 * v / total, 1)} for f, v in cnt.most_common(n)]
    busy = max(1, total - waiting)
    return {"samples": total, "own": share(own), "inclusive": share(incl),
            "waiting_pct": round(100 * waiting / max(1, total), 1),
            "runtime_code_pct_of_busy": round(100 * ours / busy, 1)}


def profile(pid: int, work: Callable[[], Any], rate: int = 250,
            idle: bool = False, native: bool = False) -> dict[str, Any] | None:
    """Samples `pid` with py-spy while `work()` runs; None when py-spy is not installed or
    cannot attach (no ptrace)."""
    exe = py_spy()
    if exe is None:
        print("  (py-spy not installed: no profile; pip install -c constraints.txt py-spy)")
        work()
        return None
    with tempfile.TemporaryDirectory(prefix="avr-prof-") as t:
        out = Path(t) / "stacks.txt"
        cmd = [exe, "record", "-p", str(pid), "-r", str(rate), "-f", "raw", "-o", str(out),
               *([] if native else ["--nonblocking"]), *(["--idle"] if idle else []),
               *(["--native"] if native else [])]
        spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
        try:
            work()
        finally:
            spy.send_signal(2)  # SIGINT: py-spy writes what it sampled and exits
            try:
                _, err = spy.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                spy.kill()
                _, err = spy.communicate()
        if not out.exists():
            print(f"  (py-spy wrote nothing: {err.decode(errors='replace')[-300:]})")
            return None
        return top_frames(out.read_text())


def print_top(prof: dict[str, Any] | None, n: int = 10) -> None:
    if not prof:
        return
    print(f"  profile: {prof['samples']} samples, {prof['waiting_pct']} % waiting; the "
          f"runtime's own api/service/adapters code in {prof['runtime_code_pct_of_busy']} % "
          "of the rest; top frames by own time:")
    for r in prof["own"][:n]:
        print(f"    {r['pct']:5.1f} %  {r['frame']}")
    print("  by inclusive time:")
    for r in prof["inclusive"][:n]:
        print(f"    {r['pct']:5.1f} %  {r['frame']}")
