"""Six parallel pulls from a trickling server on 127.0.0.1 (one byte every 2 s) against the
real daemon: Status and ImageStatus keep answering at once, the watchdog keeps pinging,
and every pull ends with DEADLINE_EXCEEDED (minimum speed, or the overall deadline for a
server just fast enough), leaving no temp files."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.daemon_proc import APIS, Daemon

WATCHDOG_SEC = 2.0
OBSERVE = 40.0
TRICKLERS = 5


@pytest.fixture
def trickle_server() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 30))
            self.end_headers()
            # /trickle-N: one byte every 2 s. /endless: 2 KiB/s, above the minimum speed,
            # so only the overall deadline stops it.
            chunk, pause = (b"x", 2.0) if self.path.startswith("/trickle") else (b"y" * 2048, 1.0)
            try:
                while True:
                    self.wfile.write(chunk)
                    self.wfile.flush()
                    time.sleep(pause)
            except (BrokenPipeError, ConnectionResetError):
                pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _files(d: Daemon) -> list[str]:
    root = Path(d.state_dir) / "images"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and p.name != ".lock")


def _collect_notify(d: Daemon, stop: threading.Event) -> None:
    assert d.notify is not None
    while not stop.is_set():
        d.notify.drain(0.1)  # stamps each message as it arrives


def test_trickling_pulls_starve_nothing_and_end_past_their_limits(
        short_tmp: Path, trickle_server: str) -> None:
    d = Daemon(short_tmp, args=[
        "--image-download-protocol", "http", "--image-pull-min-speed", "1024",
        "--image-pull-speed-window", "8", "--image-pull-deadline", "20",
    ], env={"WATCHDOG_USEC": str(int(WATCHDOG_SEC * 1e6))}).start()
    stop = threading.Event()
    collector = threading.Thread(target=_collect_notify, args=(d, stop), daemon=True)
    try:
        assert d.notify is not None
        d.notify.wait_for("WATCHDOG=1", 5)
        collector.start()
        pb, _ = APIS["v1"]
        images = d.images("v1")
        runtime = d.runtime("v1")
        names = [f"{trickle_server}/trickle-{i}.qcow2" for i in range(TRICKLERS)]
        names.append(f"{trickle_server}/endless.qcow2")
        pulls = [images.PullImage.future(pb.PullImageRequest(image=pb.ImageSpec(image=n)),
                                         timeout=90) for n in names]
        t0 = time.monotonic()
        worst = {"Status": 0.0, "ImageStatus": 0.0}
        calls = 0
        while time.monotonic() - t0 < OBSERVE:
            for method, call in (
                ("Status", lambda: runtime.Status(pb.StatusRequest(), timeout=10)),
                ("ImageStatus", lambda: images.ImageStatus(
                    pb.ImageStatusRequest(image=pb.ImageSpec(image=names[0])), timeout=10)),
            ):
                s = time.monotonic()
                call()
                worst[method] = max(worst[method], time.monotonic() - s)
            calls += 1
            time.sleep(0.2)
        print(f"over {OBSERVE:.0f} s with {len(names)} pulls: {calls} rounds, "
              f"Status max {worst['Status'] * 1000:.1f} ms, "
              f"ImageStatus max {worst['ImageStatus'] * 1000:.1f} ms")

        stop.set()
        collector.join(5)
        pings = [t for t, m in d.notify.messages if m == "WATCHDOG=1" and t >= t0 - 1]
        gaps = [b - a for a, b in zip([t0, *pings], [*pings, t0 + OBSERVE], strict=True)]
        print(f"{len(pings)} watchdog pings, longest gap {max(gaps):.2f} s "
              f"(WatchdogSec {WATCHDOG_SEC:g})")
        assert worst["Status"] < 2.0 and worst["ImageStatus"] < 2.0, worst
        assert max(gaps) <= WATCHDOG_SEC / 2, f"the watchdog went quiet: {max(gaps):.2f} s"

        for name, fut in zip(names, pulls, strict=True):
            with pytest.raises(grpc.RpcError) as e:
                fut.result(timeout=30)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, \
                (name, e.value.code(), e.value.details())
            assert name in (e.value.details() or ""), e.value.details()
            why = "pull deadline of 20 s" if "endless" in name else "minimum speed"
            assert why in (e.value.details() or ""), e.value.details()
        assert _files(d) == [], "a failed pull left files behind"
        assert not images.ListImages(pb.ListImagesRequest(), timeout=5).images
    finally:
        stop.set()
        d.stop()
