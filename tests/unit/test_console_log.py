"""The console follower: CRI records, offsets saved in batches, and after a kill -9 no
console output lost and at most the last second copied twice (a real process killed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from arktos_vm_runtime.adapters import console_log
from arktos_vm_runtime.adapters.console_log import MAX_LINE, ConsoleLogs, cri_lines
from arktos_vm_runtime.service.podstate import PodState
from arktos_vm_runtime.service.records import RUNNING, ContainerRecord
from arktos_vm_runtime.service.store import Store


def _lines(path: Path) -> list[str]:
    """The text of each CRI record (timestamp and stream dropped)."""
    out = []
    for rec in path.read_text().splitlines():
        ts, stream, tag, text = rec.split(" ", 3)
        assert ts.endswith("Z") and stream == "stdout" and tag in "FP"
        out.append(text)
    return out


def test_cri_lines_split_long_lines_and_keep_partial() -> None:
    records, rest = cri_lines(b"a\r\nb" + b"x" * MAX_LINE + b"\npart", b"")
    texts = [r.split(b" ", 3) for r in records.splitlines()]
    assert [(t[2], len(t[3])) for t in texts] == [(b"F", 1), (b"P", MAX_LINE), (b"F", 1)]
    assert rest == b"part"


def test_offsets_are_saved_in_batches(tmp_path: Path) -> None:
    saves: list[dict[str, int]] = []
    logs = ConsoleLogs(saves.append, tmp_path, flush_every=3600, thread=False)
    raw, out = tmp_path / "raw", tmp_path / "out" / "0.log"
    logs.follow("c1", raw, out)
    logs.follow("c2", tmp_path / "raw2", tmp_path / "out2.log")
    with raw.open("ab") as f:
        for i in range(50):  # fifty bursts, each one polled
            f.write(b"line %d\n" % i)
            f.flush()
            logs.tick()
    assert saves == [], "no save per burst"
    assert len(_lines(out)) == 50
    logs.flush("c1")
    assert saves == [{"c1": raw.stat().st_size}], "one batch on flush"
    logs.tick()
    assert len(saves) == 1, "nothing new: nothing saved"


def test_saved_offset_excludes_a_partial_line(tmp_path: Path) -> None:
    saves: list[dict[str, int]] = []
    raw, out = tmp_path / "raw", tmp_path / "out.log"
    raw.write_bytes(b"whole\nhalf a li")
    logs = ConsoleLogs(saves.append, tmp_path, thread=False)
    logs.follow("c1", raw, out)
    logs.forget("c1")  # forget copies, saves and closes
    assert saves == [{"c1": 6}]
    assert _lines(out) == ["whole"]
    with raw.open("ab") as f:
        f.write(b"ne\n")
    again = ConsoleLogs(saves.append, tmp_path, thread=False)  # a restart from the saved offset
    again.follow("c1", raw, out, saves[-1]["c1"])
    again.close()
    assert _lines(out) == ["whole", "half a line"], "the partial line is not lost"
    assert saves[-1] == {"c1": raw.stat().st_size}


def test_interval_saves_while_running(tmp_path: Path) -> None:
    saves: list[dict[str, int]] = []
    raw = tmp_path / "raw"
    raw.write_bytes(b"x\n")
    logs = ConsoleLogs(saves.append, tmp_path, flush_every=0.0, thread=False)
    logs.follow("c1", raw, tmp_path / "out.log")
    logs.tick()
    assert saves == [{"c1": 2}]


def test_failed_save_is_retried(tmp_path: Path) -> None:
    calls: list[dict[str, int]] = []

    def save(batch: dict[str, int]) -> None:
        calls.append(batch)
        if len(calls) == 1:
            raise OSError("disk full")

    raw = tmp_path / "raw"
    raw.write_bytes(b"x\n")
    logs = ConsoleLogs(save, tmp_path, thread=False)
    logs.follow("c1", raw, tmp_path / "out.log")
    logs.flush("c1")
    logs.flush("c1")
    assert calls == [{"c1": 2}, {"c1": 2}]


CHILD = """
import sys, time
from pathlib import Path

import pytest
from arktos_vm_runtime.adapters.console_log import ConsoleLogs
from arktos_vm_runtime.service.podstate import PodState
from arktos_vm_runtime.service.store import Store
root = Path(sys.argv[1])
state = PodState(Store(root / "state.db"))
logs = ConsoleLogs(state.save_console_offsets, root)
logs.follow("c1", root / "raw.log", root / "out.log", state.container("c1").console_offset)
print("ready", flush=True)
time.sleep(3600)
"""


def test_kill_9_loses_nothing_and_repeats_at_most_the_last_second(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    rec = ContainerRecord(id="c1", sandbox_id="s1", name="vm", attempt=0, state=RUNNING,
                          created_at=1, image="img", image_ref="x", vm_dir=str(tmp_path))
    store.put("containers", "c1", rec.to_dict(), sandbox_id="s1")
    store.close()
    raw = tmp_path / "raw.log"
    raw.touch()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        written: list[float] = []
        with raw.open("ab") as f:
            for i in range(250):  # 2.5 s of console output, a line every 10 ms
                f.write(b"line %d\n" % i)
                f.flush()
                written.append(time.monotonic())
                time.sleep(0.01)
        killed = time.monotonic()
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()

    state = PodState(Store(tmp_path / "state.db"))  # the restarted daemon
    c1 = state.container("c1")
    assert c1 is not None and 0 < c1.console_offset <= raw.stat().st_size
    logs = ConsoleLogs(state.save_console_offsets, tmp_path, thread=False)
    logs.follow("c1", raw, tmp_path / "out.log", c1.console_offset)
    logs.close()

    counts = Counter(_lines(tmp_path / "out.log"))
    assert all(counts[f"line {i}"] >= 1 for i in range(250)), "a console line was lost"
    assert set(counts) == {f"line {i}" for i in range(250)}
    twice = [i for i in range(250) if counts[f"line {i}"] > 1]
    assert all(counts[f"line {i}"] == 2 for i in twice)
    assert all(killed - written[i] <= 1.0 for i in twice), (
        f"lines written more than a second before the kill were copied twice: {twice}")
    assert console_log.FLUSH_EVERY + console_log.POLL <= 1.0


def test_only_paths_below_the_root_are_followed(tmp_path: Path) -> None:
    logs = ConsoleLogs(lambda _b: None, tmp_path / "pods", thread=False)
    assert not logs.follow("c1", tmp_path / "raw", Path("/etc/passwd"))
    assert not logs.follow("c2", tmp_path / "raw", tmp_path / "pods")
    assert not logs.follow("c3", tmp_path / "raw", tmp_path / "podsx" / "0.log")
    assert logs.follow("c4", tmp_path / "raw", tmp_path / "pods" / "p" / "vm" / "0.log")


@pytest.mark.parametrize("planted", ["directory", "file", "fifo", "hardlink"])
def test_nothing_is_written_through_a_planted_link(tmp_path: Path, planted: str) -> None:
    """A symlink (or a FIFO, or a hard link to a file elsewhere) planted where the log
    goes is never written through; the console waits in the raw file and nothing is lost
    once the log path is a plain file again."""
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "passwd"
    victim.write_bytes(b"root:x:0:0\n")
    root, raw = tmp_path / "pods", tmp_path / "raw"
    vm_dir = root / "pod" / "vm"
    vm_dir.parent.mkdir(parents=True)
    if planted == "directory":
        vm_dir.symlink_to(outside, target_is_directory=True)
    else:
        vm_dir.mkdir()
        if planted == "file":
            (vm_dir / "0.log").symlink_to(victim)
        elif planted == "fifo":
            os.mkfifo(vm_dir / "0.log")
        else:
            os.link(victim, vm_dir / "0.log")
    saves: list[dict[str, int]] = []
    logs = ConsoleLogs(saves.append, root, thread=False)
    assert logs.follow("c1", raw, vm_dir / "0.log")
    raw.write_bytes(b"guest line one\nguest line two\n")
    for _ in range(3):
        logs.tick()
    logs.flush("c1")
    assert victim.read_bytes() == b"root:x:0:0\n"
    assert sorted(p.name for p in outside.iterdir()) == ["passwd"]
    assert saves == [], "nothing written: no offset moved"

    if vm_dir.is_symlink():
        vm_dir.unlink()
        vm_dir.mkdir()
    else:
        (vm_dir / "0.log").unlink()
    logs.tick()
    logs.close()
    assert _lines(vm_dir / "0.log") == ["guest line one", "guest line two"]
    assert victim.read_bytes() == b"root:x:0:0\n"
