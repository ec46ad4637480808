"""A download's deadline and minimum speed: the window logic on a fake clock, then the
real Fetcher against trickling servers on 127.0.0.1."""

from __future__ import annotations

import http.server
import io
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from arktos_vm_runtime.adapters.image_fetch import Fetcher
from arktos_vm_runtime.adapters.pull_guard import NetworkGuard
from arktos_vm_runtime.adapters.pull_watch import PullLimits, SpeedWindow
from arktos_vm_runtime.errors import Cancelled, DeadlineExceeded

# ---- the window, on a fake clock ------------------------------------------------------


def test_the_first_window_is_never_judged() -> None:
    w = SpeedWindow(min_speed=100, window=10.0, now=0.0)
    for t in range(10):
        assert not w.too_slow(float(t)), "the first window may fill slowly"
    assert w.too_slow(10.0), "a whole window with nothing received"


def test_a_trickle_is_too_slow_and_a_steady_stream_is_not() -> None:
    trickle = SpeedWindow(min_speed=100, window=10.0, now=0.0)
    steady = SpeedWindow(min_speed=100, window=10.0, now=0.0)
    for t in range(0, 60, 2):  # one byte every 2 s; 150 bytes/s
        trickle.add(float(t), t // 2 + 1)
        steady.add(float(t), 300 * t)
    assert trickle.too_slow(60.0)
    assert trickle.recent(60.0) <= 6
    assert not steady.too_slow(60.0)


def test_exactly_the_minimum_passes_and_a_little_less_fails() -> None:
    ok = SpeedWindow(min_speed=100, window=10.0, now=0.0)
    slow = SpeedWindow(min_speed=100, window=10.0, now=0.0)
    for tenth in range(1, 301):  # every 0.1 s for 30 s
        t = tenth / 10
        ok.add(t, 10 * tenth)  # 100 bytes/s
        slow.add(t, 9 * tenth)  # 90 bytes/s
    assert not ok.too_slow(30.0)
    assert slow.too_slow(30.0)


def test_a_stall_after_a_fast_start_is_caught_one_window_later() -> None:
    w = SpeedWindow(min_speed=100, window=10.0, now=0.0)
    for tenth in range(1, 201):  # 20 s at 1 MB/s, with the last total between samples
        w.add(tenth / 10, 100_000 * tenth)
    assert not w.too_slow(20.0)
    assert not w.too_slow(29.0), "the last window still holds the fast part"
    assert w.too_slow(30.1), "nothing for a whole window"
    assert w.recent(30.1) == 0


def test_no_minimum_never_fails_and_the_samples_stay_few() -> None:
    off = SpeedWindow(min_speed=0, window=5.0, now=0.0)
    w = SpeedWindow(min_speed=1, window=5.0, now=0.0)
    for ms in range(100_000):  # 100 s of a sample every millisecond
        off.add(ms / 1000, ms)
        w.add(ms / 1000, ms)
    assert not off.too_slow(1000.0)
    assert len(w._samples) <= 25


# ---- the Fetcher against real servers ---------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            try:
                if self.path == "/trickle":  # headers at once, then a byte every 0.2 s
                    self.send_response(200)
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    for _ in range(1000):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(0.2)
                elif self.path == "/trickled-headers":  # the status line itself trickles
                    for b in b"HTTP/1.0 200 OK\r\nX-Slow: " + b"y" * 1000:
                        self.wfile.write(bytes([b]))
                        self.wfile.flush()
                        time.sleep(0.05)
                elif self.path == "/steady":  # 20 KB/s for 3 s
                    self.send_response(200)
                    self.send_header("Content-Length", str(60 * 1000))
                    self.end_headers()
                    for _ in range(60):
                        self.wfile.write(b"z" * 1000)
                        self.wfile.flush()
                        time.sleep(0.05)
            except (BrokenPipeError, ConnectionResetError):
                pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _fetch(url: str, limits: PullLimits, cancel: threading.Event | None = None) -> float:
    fetcher = Fetcher(frozenset({"http"}), timeout=60.0, limits=limits,
                      guard=NetworkGuard([]))  # the servers are on 127.0.0.1
    t0 = time.monotonic()
    fetcher.fetch(url, io.BytesIO(), name="img/test", cancel=cancel)
    return time.monotonic() - t0


def test_a_trickle_fails_at_the_minimum_speed_naming_the_image(server: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded) as e:
        _fetch(f"{server}/trickle", PullLimits(deadline=60, min_speed=100, window=1.0))
    took = time.monotonic() - t0
    assert "img/test" in e.value.message and "minimum speed of 100 bytes/s" in e.value.message
    assert 1.0 <= took < 3.0, took


def test_the_deadline_stops_a_download_fast_enough_for_the_minimum(server: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded) as e:
        _fetch(f"{server}/trickle", PullLimits(deadline=1.5, min_speed=1, window=1.0))
    took = time.monotonic() - t0
    assert "pull deadline of 1.5 s" in e.value.message and "img/test" in e.value.message
    assert 1.5 <= took < 3.0, took


def test_trickled_headers_are_cut_at_the_deadline(server: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        _fetch(f"{server}/trickled-headers", PullLimits(deadline=1.0, min_speed=0, window=1.0))
    assert time.monotonic() - t0 < 3.0


def test_cancel_cuts_a_blocked_read_at_once() -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts (in the backlog) and never answers
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    t0 = time.monotonic()
    try:
        with pytest.raises(Cancelled):
            _fetch(f"http://127.0.0.1:{silent.getsockname()[1]}/x", PullLimits(), cancel)
    finally:
        silent.close()
    assert time.monotonic() - t0 < 2.0, "not the 60 s read timeout"


def test_a_steady_download_within_the_limits_succeeds(server: str) -> None:
    took = _fetch(f"{server}/steady", PullLimits(deadline=30, min_speed=1000, window=1.0))
    assert took < 10
