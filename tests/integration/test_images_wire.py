"""ImageService over the socket: pulls from a loopback server, errors, cancellation."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from arktos_vm_runtime.service import store as store_mod
from tests.daemon_proc import APIS, Daemon


@pytest.fixture(scope="module")
def qcow2(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    p = tmp_path_factory.mktemp("img") / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(p), "64M"], check=True)
    return p.read_bytes()


@pytest.fixture
def server(qcow2: bytes) -> Iterator[tuple[str, dict[str, int]]]:
    hits: dict[str, int] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            hits[self.path] = hits.get(self.path, 0) + 1
            if self.path == "/disk.qcow2":
                self.send_response(200)
                self.send_header("Content-Length", str(len(qcow2)))
                self.end_headers()
                self.wfile.write(qcow2)
            elif self.path == "/slowish.qcow2":  # a whole image, over about 2 s
                self.send_response(200)
                self.send_header("Content-Length", str(len(qcow2)))
                self.end_headers()
                step = len(qcow2) // 20 + 1
                for i in range(0, len(qcow2), step):
                    self.wfile.write(qcow2[i:i + step])
                    self.wfile.flush()
                    time.sleep(0.1)
            elif self.path == "/page.html":
                body = b"<html>not a disk</html>" * 100
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif self.path == "/slow.qcow2":
                self.send_response(200)
                self.send_header("Content-Length", str(100 * 2**20))
                self.end_headers()
                try:
                    for _ in range(600):
                        self.wfile.write(b"\0" * 65536)
                        time.sleep(0.05)
                except (BrokenPipeError, ConnectionResetError):
                    pass
            else:
                self.send_error(404)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{srv.server_address[1]}", hits
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def http_daemon(short_tmp: Path) -> Iterator[Daemon]:
    d = Daemon(short_tmp, args=["--image-download-protocol", "http"]).start()
    yield d
    d.stop()


def _files(d: Daemon) -> list[str]:
    root = Path(d.state_dir) / "images"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and p.name != ".lock")


def _name_rows(d: Daemon) -> dict[str, str]:
    """The image names in the daemon's state store: name -> digest column."""
    with contextlib.closing(sqlite3.connect(Path(d.state_dir) / "state.db")) as db:
        return dict(db.execute("SELECT id, digest FROM image_names").fetchall())


@pytest.mark.parametrize("api", ["v1alpha2", "v1"])
def test_pull_status_list_remove(http_daemon: Daemon, server: tuple[str, dict[str, int]],
                                 api: str) -> None:
    host, _ = server
    pb, _ = APIS[api]
    img = http_daemon.images(api)
    name = f"{host}/disk.qcow2"
    absent = img.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=name)), timeout=5)
    assert not absent.HasField("image"), "an absent image is no image, not an error"
    ref = img.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=name)),
                        timeout=30).image_ref
    st = img.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=name)), timeout=5)
    assert st.image.id == ref and st.image.size > 0
    digest = ref.removeprefix("sha256:")
    assert _files(http_daemon) == [f"blobs/sha256/{digest}"], "a name is a store row, no file"
    assert _name_rows(http_daemon) == {name: digest}
    by_id = img.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=ref)), timeout=5)
    assert by_id.image.id == ref
    assert [i.id for i in img.ListImages(pb.ListImagesRequest(), timeout=5).images] == [ref]
    fs = img.ImageFsInfo(pb.ImageFsInfoRequest(), timeout=5).image_filesystems
    assert fs[0].used_bytes.value > 0
    img.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=name)), timeout=5)
    img.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=name)), timeout=5)
    assert not img.ListImages(pb.ListImagesRequest(), timeout=5).images
    assert _files(http_daemon) == [] and _name_rows(http_daemon) == {}


def test_images_the_previous_version_pulled_are_served(
        short_tmp: Path, qcow2: bytes, server: tuple[str, dict[str, int]]) -> None:
    """A state dir as version 1 left it (v1 state.db, images/names/<sha256(name)>.json):
    the daemon carries the names into its store and serves them without a download."""
    host, hits = server
    name, digest = f"{host}/disk.qcow2", hashlib.sha256(qcow2).hexdigest()
    state = short_tmp / "state"
    images = state / "images"
    for sub in ("blobs/sha256", "names", "tmp"):
        (images / sub).mkdir(parents=True)
    (images / "blobs" / "sha256" / digest).write_bytes(qcow2)
    record = {"name": name, "digest": digest, "size": len(qcow2), "virtual_size": 64 << 20,
              "format": "qcow2", "url": f"http://{name}", "pulled_at": "2024-05-01T10:00:00+00:00"}
    (images / "names" / (hashlib.sha256(name.encode()).hexdigest() + ".json")).write_bytes(
        json.dumps(record, indent=2, sort_keys=True).encode() + b"\n")
    with contextlib.closing(sqlite3.connect(state / "state.db", isolation_level=None)) as db:
        store_mod.MIGRATIONS[0](db, state)
        db.execute("PRAGMA user_version=1")
    d = Daemon(short_tmp, args=["--image-download-protocol", "http"]).start()
    try:
        for api in APIS:
            pb, _ = APIS[api]
            img = d.images(api)
            st = img.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=name)), timeout=5)
            assert st.image.id == f"sha256:{digest}" and list(st.image.repo_tags) == [name]
            assert st.image.size == len(qcow2)
            listed = img.ListImages(pb.ListImagesRequest(), timeout=5).images
            assert [i.id for i in listed] == [f"sha256:{digest}"]
        pb, _ = APIS["v1"]
        ref = d.images("v1").PullImage(pb.PullImageRequest(
            image=pb.ImageSpec(image=f"{name}@sha256:{digest}")), timeout=30).image_ref
        assert ref == f"sha256:{digest}" and hits == {}, "served from the store, not downloaded"
        assert _files(d) == [f"blobs/sha256/{digest}"] and _name_rows(d) == {name: digest}
    finally:
        d.stop()


def test_bad_pulls_get_clear_errors_and_leave_nothing(
        http_daemon: Daemon, server: tuple[str, dict[str, int]]) -> None:
    host, _ = server
    pb, _ = APIS["v1alpha2"]
    img = http_daemon.images("v1alpha2")
    cases = [
        (f"{host}/missing.qcow2", grpc.StatusCode.NOT_FOUND, "not found"),
        (f"{host}/page.html", grpc.StatusCode.INVALID_ARGUMENT, "not a disk image"),
        (f"{host}/disk.qcow2@sha256:" + "0" * 64, grpc.StatusCode.INVALID_ARGUMENT, "digest"),
        ("file:///etc/passwd", grpc.StatusCode.INVALID_ARGUMENT, "file"),
        ("host/with space", grpc.StatusCode.INVALID_ARGUMENT, ""),
        ("127.0.0.1:1/refused.qcow2", grpc.StatusCode.UNAVAILABLE, ""),
    ]
    for name, code, words in cases:
        with pytest.raises(grpc.RpcError) as e:
            img.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=name)), timeout=30)
        assert e.value.code() == code, (name, e.value.details())
        assert words.lower() in e.value.details().lower(), (name, e.value.details())
    assert _files(http_daemon) == []


def test_a_cancelled_pull_stops_and_leaves_nothing(
        http_daemon: Daemon, server: tuple[str, dict[str, int]]) -> None:
    host, _ = server
    pb, _ = APIS["v1alpha2"]
    img = http_daemon.images("v1alpha2")
    fut = img.PullImage.future(
        pb.PullImageRequest(image=pb.ImageSpec(image=f"{host}/slow.qcow2")), timeout=60)
    time.sleep(2.0)
    assert http_daemon.notify is not None
    status = "".join(m for _, m in http_daemon.notify.messages) + "".join(
        http_daemon.notify.drain(1.5))
    assert "pulling" in status and "MiB/s" in status, "progress shows in STATUS"
    fut.cancel()
    deadline = time.monotonic() + 5
    while _files(http_daemon) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _files(http_daemon) == []
    assert not img.ListImages(pb.ListImagesRequest(), timeout=5).images


def test_sigterm_finishes_the_call_in_flight_then_exits_0(
        http_daemon: Daemon, server: tuple[str, dict[str, int]]) -> None:
    import signal

    host, _ = server
    pb, _ = APIS["v1"]
    fut = http_daemon.images("v1").PullImage.future(
        pb.PullImageRequest(image=pb.ImageSpec(image=f"{host}/slowish.qcow2")), timeout=60)
    time.sleep(0.5)
    http_daemon.signal(signal.SIGTERM)
    assert fut.result().image_ref.startswith("sha256:"), "the pull in flight completed"
    assert http_daemon.proc is not None and http_daemon.proc.wait(30) == 0
    assert http_daemon.notify is not None
    assert any("STOPPING=1" in m for m in http_daemon.notify.drain(1.0)
               + [m for _, m in http_daemon.notify.messages])
