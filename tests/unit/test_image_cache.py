"""The image store's size limits on real files, a real state store and a real HTTP server
on 127.0.0.1: the size cap leaves nothing behind, and the cache size evicts unused images,
least recently used first, never one in use or being taken by a container."""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from arktos_vm_runtime.adapters.pull_guard import DEFAULT_DENIED_NETWORKS
from arktos_vm_runtime.errors import InvalidArgument, PermissionDenied, ResourceExhausted
from arktos_vm_runtime.service.images import ImageStore
from arktos_vm_runtime.service.store import Store

MIB = 1 << 20
LOOPBACK_ALLOWED = [n for n in DEFAULT_DENIED_NETWORKS if n != "127.0.0.0/8"]


def raw(mib: int, fill: int) -> bytes:
    return bytes([fill]) * (mib * MIB)


class Files(http.server.ThreadingHTTPServer):
    daemon_threads = True
    files: dict[str, bytes]
    chunked: bool = False


class Handler(http.server.BaseHTTPRequestHandler):
    server: Files

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        body = self.server.files.get(self.path)
        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        if self.path.startswith("/nolength/"):
            self.send_header("Connection", "close")
        else:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)


@pytest.fixture
def host() -> Iterator[tuple[str, dict[str, bytes]]]:
    srv = Files(("127.0.0.1", 0), Handler)
    srv.files = {}
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    yield f"127.0.0.1:{srv.server_address[1]}", srv.files
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state.db")
    yield s
    s.close()


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and p.name != ".lock")


def test_the_default_store_refuses_loopback(tmp_path: Path, db: Store,
                                            host: tuple[str, dict[str, bytes]]) -> None:
    name, files = host
    files["/a.raw"] = raw(2, 1)
    with ImageStore(tmp_path / "s", db, download_protocol="http") as s:
        with pytest.raises(PermissionDenied, match=re.escape("denied network 127.0.0.0/8")):
            s.pull(f"{name}/a.raw")
        assert s.list() == [] and leftovers(s.root) == []


@pytest.mark.parametrize("path", ["/big.raw", "/nolength/big.raw"])
def test_over_the_maximum_size_leaves_nothing(tmp_path: Path, db: Store, path: str,
                                              host: tuple[str, dict[str, bytes]]) -> None:
    name, files = host
    files[path] = raw(6, 2)
    with ImageStore(tmp_path / "s", db, download_protocol="http", max_size=4 * MIB,
                    denied_networks=LOOPBACK_ALLOWED) as s:
        with pytest.raises(ResourceExhausted, match=re.escape("more than the limit of 4 MiB")):
            s.pull(name + path)
        assert s.list() == [] and leftovers(s.root) == []
        files["/ok.raw"] = raw(4, 3)
        assert s.pull(f"{name}/ok.raw").size == 4 * MIB


def test_a_short_answer_is_not_a_root_disk(tmp_path: Path, db: Store,
                                           host: tuple[str, dict[str, bytes]]) -> None:
    name, files = host
    files["/error.img"] = b"\0" * 512
    with ImageStore(tmp_path / "s", db, download_protocol="http",
                    denied_networks=LOOPBACK_ALLOWED) as s:
        with pytest.raises(InvalidArgument, match=re.escape("512 bytes of raw data")):
            s.pull(f"{name}/error.img")
        assert leftovers(s.root) == []


def cache(tmp_path: Path, db: Store, mib: int) -> ImageStore:
    return ImageStore(tmp_path / "s", db, download_protocol="http", cache_size=mib * MIB,
                      denied_networks=LOOPBACK_ALLOWED)


def test_unused_images_are_evicted_least_recently_used_first(
        tmp_path: Path, db: Store, host: tuple[str, dict[str, bytes]]) -> None:
    name, files = host
    for i, n in enumerate("abcd"):
        files[f"/{n}.raw"] = raw(2, i + 1)
    used: set[str] = set()
    with cache(tmp_path, db, 5) as s:
        a = s.pull(f"{name}/a.raw", in_use=used.__contains__)
        s.pull(f"{name}/b.raw", in_use=used.__contains__)
        s.mark_used(a.digest)  # a container was made from a: b is now the oldest
        c = s.pull(f"{name}/c.raw", in_use=used.__contains__)
        assert [r.digest for r in s.list()] == sorted([a.digest, c.digest])
        assert s.status(f"{name}/b.raw") is None, "the name goes with the blob"
        assert db.get("image_names", f"{name}/b.raw") is None
        used.add(a.digest)  # a is in use: c goes instead, though a is older
        s.mark_used(c.digest)
        d = s.pull(f"{name}/d.raw", in_use=used.__contains__)
        assert {r.digest for r in s.list()} == {a.digest, d.digest}
        assert leftovers(s.root) == sorted(f"blobs/sha256/{x}" for x in (a.digest, d.digest))


def test_the_use_order_survives_a_restart(tmp_path: Path, db: Store,
                                          host: tuple[str, dict[str, bytes]]) -> None:
    name, files = host
    for i, n in enumerate("abc"):
        files[f"/{n}.raw"] = raw(2, i + 1)
    with cache(tmp_path, db, 5) as s:
        a = s.pull(f"{name}/a.raw", in_use=lambda d: False)
        b = s.pull(f"{name}/b.raw", in_use=lambda d: False)
        s.mark_used(a.digest)
        assert os.stat(a.path).st_mtime > os.stat(b.path).st_mtime
    time.sleep(0.01)
    with cache(tmp_path, db, 5) as s:
        c = s.pull(f"{name}/c.raw", in_use=lambda d: False)
        assert {r.digest for r in s.list()} == {a.digest, c.digest}


def test_an_image_larger_than_the_cache_is_refused_plainly(
        tmp_path: Path, db: Store, host: tuple[str, dict[str, bytes]]) -> None:
    name, files = host
    files["/a.raw"] = raw(2, 1)
    files["/huge.raw"] = raw(6, 9)
    with cache(tmp_path, db, 5) as s:
        a = s.pull(f"{name}/a.raw", in_use=lambda d: False)
        with pytest.raises(ResourceExhausted) as exc:
            s.pull(f"{name}/huge.raw", in_use=lambda d: False)
        assert "more than the limit of 5 MiB (setting image-cache-size-mib, the size of the " \
            "whole image cache)" in exc.value.message
        assert s.list() == [s.status(a.id)], "nothing evicted for an image that cannot stay"


def test_in_use_images_stay_and_the_log_says_the_cache_is_over(
        tmp_path: Path, db: Store, host: tuple[str, dict[str, bytes]],
        caplog: pytest.LogCaptureFixture) -> None:
    name, files = host
    for i, n in enumerate("abc"):
        files[f"/{n}.raw"] = raw(2, i + 1)
    with cache(tmp_path, db, 3) as s:
        a = s.pull(f"{name}/a.raw", in_use=lambda d: True)
        b = s.pull(f"{name}/b.raw", in_use=lambda d: True)
        assert {r.digest for r in s.list()} == {a.digest, b.digest}
        assert "above its size of 3.0 MiB" in caplog.text


def test_an_eviction_waits_for_a_container_taking_the_image(
        tmp_path: Path, db: Store, host: tuple[str, dict[str, bytes]]) -> None:
    """CreateContainer records its use of an image under the image's lock; an eviction that
    comes meanwhile waits for it and then sees the image in use."""
    name, files = host
    for i, n in enumerate("abc"):
        files[f"/{n}.raw"] = raw(2, i + 1)
    used: set[str] = set()
    with cache(tmp_path, db, 5) as s:
        a = s.pull(f"{name}/a.raw", in_use=used.__contains__)
        b = s.pull(f"{name}/b.raw", in_use=used.__contains__)
        pulled = threading.Event()
        with s.holding(a.digest):  # a create of a is between its lookup and its record
            t = threading.Thread(target=lambda: (s.pull(f"{name}/c.raw",
                                                        in_use=used.__contains__),
                                                 pulled.set()))
            t.start()
            assert not pulled.wait(1.0), "the eviction must wait for the image's lock"
            assert s.status(a.id) is not None
            used.add(a.digest)  # the record is in: it pins the image
        t.join(10)
        assert pulled.is_set()
        assert s.status(a.id) is not None and s.status(b.id) is None
