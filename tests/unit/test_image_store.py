"""The image service (ImageStore) against a real HTTP server on 127.0.0.1, real qemu-img
images and a real state store."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import http.server
import json
import os
import re
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from arktos_vm_runtime.adapters.image_translations import ImageTranslator
from arktos_vm_runtime.adapters.pull_guard import DEFAULT_DENIED_NETWORKS
from arktos_vm_runtime.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from arktos_vm_runtime.service import store as store_mod
from arktos_vm_runtime.service.images import ImageStore
from arktos_vm_runtime.service.store import Store

# The test server is on 127.0.0.1: these stores deny every default network but loopback.
# tests/unit/test_image_guard_unit.py pulls with the default list.
LOOPBACK_ALLOWED = [n for n in DEFAULT_DENIED_NETWORKS if n != "127.0.0.0/8"]


def open_store(root: Path, db: Store, **kwargs: Any) -> ImageStore:
    kwargs.setdefault("denied_networks", LOOPBACK_ALLOWED)
    return ImageStore(root, db, **kwargs)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def files_under(root: Path) -> list[str]:
    """Every non-directory under root except the lock file, relative."""
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), root)
            if rel != ".lock":
                out.append(rel)
    return sorted(out)


# ---- images --------------------------------------------------------------------------


def _qemu_img_create(path: Path, fmt: str, *args: str) -> bytes:
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), *args], check=True)
    return path.read_bytes()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("images")
    a = _qemu_img_create(d / "a.qcow2", "qcow2", "1M")
    return {
        "a": a,
        "b": _qemu_img_create(d / "b.qcow2", "qcow2", "2M"),
        "vmdk": _qemu_img_create(d / "c.vmdk", "vmdk", "1M"),
        "backed": _qemu_img_create(d / "o.qcow2", "qcow2", "-b", str(d / "a.qcow2"), "-F", "qcow2"),
        "raw": b"\0" * (1 << 20),
        "text": b"<html><body>Not an image, but 200 OK</body></html>\n",
        "empty": b"",
        "big": b"\1" * (3 << 20),
    }


# ---- the HTTP server -----------------------------------------------------------------


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.files: dict[str, bytes] = {}
        self.hits: collections.Counter[str] = collections.Counter()
        self.hits_lock = threading.Lock()
        self.gate = threading.Event()
        self.stop = threading.Event()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    server: Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, code: int, body: bytes, length: int | None = None, **headers: str) -> None:
        self.send_response(code)
        if length is not None:
            self.send_header("Content-Length", str(length))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        srv = self.server
        path = self.path
        with srv.hits_lock:
            srv.hits[path] += 1
        try:
            if path == "/status/500":
                self._send(500, b"oops", 4)
            elif path == "/hang":
                srv.stop.wait(20)
            elif path == "/redirect-file":
                self._send(302, b"", 0, Location="file:///etc/passwd")
            elif path == "/redirect-ok":
                self._send(302, b"", 0, Location="/images/a.qcow2")
            elif path.startswith("/slow/"):
                self._send(200, b"", 64 << 20)
                while not srv.stop.is_set():
                    self.wfile.write(b"\0" * 4096)
                    time.sleep(0.01)
            elif path == "/lie":
                body = srv.files["/images/a.qcow2"]
                self._send(200, body, len(body) + 1000)
            elif path.startswith("/gated/"):
                body = srv.files["/images/" + path[len("/gated/") :]]
                self._send(200, body[:1000], len(body))
                srv.gate.wait(20)
                self.wfile.write(body[1000:])
            elif path.startswith("/chunkless/"):
                self._send(200, srv.files["/images/" + path[len("/chunkless/") :]])
            elif path in srv.files:
                body = srv.files[path]
                self._send(200, body, len(body))
            else:
                self._send(404, b"no such file", 12)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy, and a loud failure if a test would resolve (and so reach) any other host."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: object, *args: object, **kwargs: object) -> object:
        if host not in ("127.0.0.1", b"127.0.0.1"):
            raise AssertionError(f"test tried to reach {host!r}; only 127.0.0.1 is allowed")
        return real_getaddrinfo(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture
def server(images: dict[str, bytes]) -> Iterator[Server]:
    srv = Server()
    srv.files = {
        "/images/a.qcow2": images["a"],
        "/images/copy-of-a.qcow2": images["a"],
        "/images/b.qcow2": images["b"],
        "/images/u2.qcow2": images["b"],
        "/images/img:v2.qcow2": images["b"],
        "/images/disk.raw": images["raw"],
        "/images/disk.vmdk": images["vmdk"],
        "/images/backed.qcow2": images["backed"],
        "/images/page.html": images["text"],
        "/images/empty.img": images["empty"],
        "/images/big.raw": images["big"],
    }
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.stop.set()
    srv.gate.set()
    srv.shutdown()
    srv.server_close()
    thread.join(5)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state.db")
    yield s
    s.close()


@pytest.fixture
def store(tmp_path: Path, db: Store) -> Iterator[ImageStore]:
    s = open_store(tmp_path / "images", db, download_protocol="http")
    yield s
    s.close()


def digest_column(db: Store, name: str) -> str | None:
    """The digest column of a name's row, read as another process would."""
    with contextlib.closing(sqlite3.connect(db.path)) as conn:
        row = conn.execute("SELECT digest FROM image_names WHERE id=?", (name,)).fetchone()
    return None if row is None else str(row[0])


# ---- names ---------------------------------------------------------------------------

H = "a" * 64


BAD_NAMES = [
    ("", "empty"),
    ("h/a b.qcow2", "' '"),
    ("h/a\tb.qcow2", "'\\t'"),
    ("h/a\x00b.qcow2", "'\\x00'"),
    ("h/a\nb.qcow2", "'\\n'"),
    ("h/\u00e9.qcow2", "non-ASCII"),
    ("h/" + "x" * 2047, "at most 2048"),
    ("user:pw@h/x.qcow2", "user info"),
    ("user@h/x.qcow2@sha256:" + H, "user info"),
    ("h/x.qcow2@sha256:abc", "sha256:<64 hex"),
    ("h/x.qcow2@md5:" + "a" * 32, "sha256:<64 hex"),
    ("h/x.qcow2?token=1", "query"),
    ("h/x.qcow2#frag", "fragment"),
    ("h/x%zz.qcow2", "'%'"),
    ("1http://h/x.qcow2", "malformed scheme"),
    ("ho_st/x.qcow2", "not a valid host"),
    ("-host/x.qcow2", "not a valid host"),
    ("host./x.qcow2", "not a valid host"),
    ("h:99999/x.qcow2", "invalid port"),
    ("h:0/x.qcow2", "invalid port"),
    ("h:/x.qcow2", "invalid port"),
    ("h:80:80/x.qcow2", "invalid port"),
    ("999.1.1.1/x.qcow2", "IPv4"),
    ("1.2.3/x.qcow2", "IPv4"),
    ("[::1/x.qcow2", "IPv6"),
    ("[fe80::1%25eth0]/x.qcow2", "IPv6"),
    ("[::1]x/y.qcow2", "junk"),
    ("h", "no path"),
    ("h/", "no path"),
    ("/x.qcow2", "no host"),
    ("h/a//b.qcow2", "path segments"),
    ("h/../etc/passwd", "path segments"),
    ("h/./x.qcow2", "path segments"),
]


@pytest.mark.parametrize(("raw", "why"), BAD_NAMES)
def test_bad_names_are_invalid_argument(store: ImageStore, raw: str, why: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        store.pull(raw)
    assert why in exc.value.message
    assert files_under(store.root) == []


@pytest.mark.parametrize(
    "raw",
    [
        "ftp://127.0.0.1/x.qcow2",
        "file:///etc/passwd",
        "FILE:///etc/passwd",
        "gopher://h/x.img",
        "data://h/x",
    ],
)
def test_schemes_not_allowed(store: ImageStore, raw: str) -> None:
    with pytest.raises(InvalidArgument, match="not allowed"):
        store.pull(raw)


def test_https_only_store_refuses_http(tmp_path: Path, db: Store, server: Server) -> None:
    with (
        open_store(tmp_path / "s", db, allowed_schemes=frozenset({"https"})) as s,
        pytest.raises(InvalidArgument, match="scheme 'http' is not allowed"),
    ):
        s.pull(f"http://{server.host}/images/a.qcow2")
    assert server.hits == {}
    with pytest.raises(InvalidArgument, match="download protocol"):
        open_store(tmp_path / "t", db, download_protocol="http",
                   allowed_schemes=frozenset({"https"}))


def test_file_scheme_when_allowed(tmp_path: Path, db: Store, images: dict[str, bytes]) -> None:
    local = tmp_path / "local.qcow2"
    local.write_bytes(images["a"])
    with open_store(tmp_path / "s", db, allowed_schemes=frozenset({"https", "file"})) as s:
        rec = s.pull(f"file://{local}")
        assert rec.digest == sha(images["a"])
        assert rec.names == [f"file://{local}"]
        with pytest.raises(InvalidArgument, match="names no host"):
            s.pull("file://otherhost/etc/x.img")


def test_redirect_to_file_refused_and_to_http_followed(store: ImageStore, server: Server) -> None:
    with pytest.raises(Unavailable, match="file:"):
        store.pull(f"{server.host}/redirect-file")
    assert files_under(store.root) == []
    rec = store.pull(f"{server.host}/redirect-ok")
    assert server.hits["/images/a.qcow2"] == 1
    assert rec.names == [f"{server.host}/redirect-ok"]


# ---- pull and status -----------------------------------------------------------------


def test_pull_and_status(
    store: ImageStore, db: Store, server: Server, images: dict[str, bytes]
) -> None:
    seen: list[tuple[int, int | None]] = []
    name = f"{server.host}/images/a.qcow2"
    rec = store.pull(name + ":latest", progress=lambda d, t: seen.append((d, t)))
    digest = sha(images["a"])
    assert rec.id == f"sha256:{digest}" and rec.digest == digest
    assert rec.names == [name]
    assert rec.size == len(images["a"]) and rec.virtual_size == 1 << 20
    assert rec.format == "qcow2"
    assert rec.path == store.root / "blobs" / "sha256" / digest
    assert rec.path.read_bytes() == images["a"]
    assert stat.S_IMODE(rec.path.stat().st_mode) == 0o644
    assert seen[-1] == (len(images["a"]), len(images["a"]))

    # The name is a record of the state store (id = name, digest column), not a file.
    data = db.get("image_names", name)
    assert data is not None
    assert data["name"] == name and data["digest"] == digest
    assert data["url"] == f"http://{name}" and data["virtual_size"] == 1 << 20
    assert data["format"] == "qcow2" and data["pulled_at"]
    assert digest_column(db, name) == digest

    assert store.status(name) == rec
    assert store.status(name + ":v9") == rec
    assert store.status(f"sha256:{digest}") == rec
    assert store.status(f"sha256:{digest.upper()}") == rec
    assert store.status(f"{name}@sha256:{digest}") == rec
    assert store.status(f"{name}@sha256:{H}") is None
    assert store.status(f"{server.host}/images/other.qcow2") is None
    assert store.status(f"sha256:{H}") is None
    with pytest.raises(InvalidArgument):
        store.status("bad name")
    assert store.blob_path(digest) == rec.path == store.blob_path(rec.id)
    with pytest.raises(NotFound):
        store.blob_path(H)
    assert store.list() == [rec]
    assert sorted(files_under(store.root)) == [f"blobs/sha256/{digest}"]


def test_state_survives_reopen(tmp_path: Path, db: Store, server: Server) -> None:
    with open_store(tmp_path / "s", db, download_protocol="http") as s:
        rec = s.pull(f"{server.host}/images/a.qcow2")
    with open_store(tmp_path / "s", db, download_protocol="http") as s:
        assert s.list() == [rec]


def test_one_process_owns_the_root(tmp_path: Path, db: Store) -> None:
    with open_store(tmp_path / "s", db) as s, pytest.raises(FailedPrecondition, match="in use"):
        open_store(s.root, db)
    open_store(tmp_path / "s", db).close()


def test_raw_image_and_colon_in_file_name(store: ImageStore, server: Server) -> None:
    rec = store.pull(f"{server.host}/images/disk.raw")
    assert (rec.format, rec.virtual_size) == ("raw", 1 << 20)
    rec = store.pull(f"{server.host}/images/img:v2.qcow2")
    assert rec.names == [f"{server.host}/images/img:v2.qcow2"]
    assert server.hits["/images/img:v2.qcow2"] == 1


def test_progress_without_content_length(
    store: ImageStore, server: Server, images: dict[str, bytes]
) -> None:
    seen: list[tuple[int, int | None]] = []
    rec = store.pull(f"{server.host}/chunkless/big.raw", progress=lambda d, t: seen.append((d, t)))
    assert rec.size == len(images["big"])
    assert seen[-1] == (len(images["big"]), None)


def test_two_names_same_bytes_share_one_blob(
    store: ImageStore, server: Server, images: dict[str, bytes]
) -> None:
    one = store.pull(f"{server.host}/images/a.qcow2")
    two = store.pull(f"{server.host}/images/copy-of-a.qcow2")
    assert one.id == two.id
    both = sorted([f"{server.host}/images/a.qcow2", f"{server.host}/images/copy-of-a.qcow2"])
    assert two.names == both
    [listed] = store.list()
    assert listed.names == both
    assert len(os.listdir(store.root / "blobs" / "sha256")) == 1
    assert os.listdir(store.root / "tmp") == []


def test_digest_verified(store: ImageStore, server: Server, images: dict[str, bytes]) -> None:
    a, b = sha(images["a"]), sha(images["b"])
    name = f"{server.host}/images/a.qcow2"
    with pytest.raises(InvalidArgument) as exc:
        store.pull(f"{name}@sha256:{b}")
    assert a in exc.value.message and b in exc.value.message
    assert files_under(store.root) == []

    rec = store.pull(f"{name}@sha256:{a}")
    assert rec.digest == a and rec.names == [name]
    assert server.hits["/images/a.qcow2"] == 2
    # Content already stored under its digest: no download for another name.
    rec2 = store.pull(f"{server.host}/images/elsewhere.qcow2@sha256:{a}")
    assert server.hits["/images/elsewhere.qcow2"] == 0
    assert rec2.names == sorted([name, f"{server.host}/images/elsewhere.qcow2"])


def test_repull_moves_name_and_keeps_old_content_listed(
    store: ImageStore, server: Server, images: dict[str, bytes]
) -> None:
    name = f"{server.host}/images/a.qcow2"
    store.pull(name)
    server.files["/images/a.qcow2"] = images["b"]
    rec = store.pull(name)
    assert rec.digest == sha(images["b"])
    by_id = {r.digest: r.names for r in store.list()}
    assert by_id == {sha(images["a"]): [], sha(images["b"]): [name]}


# ---- failures leave nothing ----------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "error", "text"),
    [
        ("/images/missing.qcow2", NotFound, "not found at 'http://"),
        ("/status/500", Unavailable, "answered HTTP 500 Internal Server Error"),
        ("/lie", Unavailable, "announced"),
        ("/images/page.html", InvalidArgument, "not a disk image"),
        ("/images/empty.img", InvalidArgument, "not a disk image"),
        ("/images/disk.vmdk", InvalidArgument, "format 'vmdk'"),
        ("/images/backed.qcow2", InvalidArgument, "backing file"),
    ],
)
def test_failures_leave_store_unchanged(
    store: ImageStore, db: Store, server: Server, path: str, error: type[Exception], text: str
) -> None:
    store.pull(f"{server.host}/images/b.qcow2")
    before = files_under(store.root)
    with pytest.raises(error) as exc:
        store.pull(server.host + path)
    assert text in str(exc.value)
    assert files_under(store.root) == before
    assert len(store.list()) == 1
    assert [r["name"] for r in db.all("image_names")] == [f"{server.host}/images/b.qcow2"]
    assert store.status(server.host + path) is None


def test_connection_refused(store: ImageStore) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(Unavailable, match="refused"):
        store.pull(f"127.0.0.1:{port}/x.qcow2")
    assert files_under(store.root) == []


def test_timeout(tmp_path: Path, db: Store, server: Server) -> None:
    with open_store(tmp_path / "s", db, download_protocol="http", timeout=0.3) as s:
        with pytest.raises(DeadlineExceeded, match="did not answer in time"):
            s.pull(f"{server.host}/hang")
        assert files_under(s.root) == []


def test_cancel_mid_download_leaves_nothing(store: ImageStore, server: Server) -> None:
    cancel = threading.Event()
    seen: list[int] = []

    def progress(done: int, total: int | None) -> None:
        seen.append(done)
        assert total == 64 << 20
        cancel.set()

    with pytest.raises(Cancelled):
        store.pull(f"{server.host}/slow/x.qcow2", cancel=cancel, progress=progress)
    assert seen and 0 < seen[0] < 64 << 20
    assert files_under(store.root) == []
    assert store.list() == []


def test_cancel_before_start(store: ImageStore, server: Server) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        store.pull(f"{server.host}/images/a.qcow2", cancel=cancel)
    assert server.hits == {}


# ---- concurrency ---------------------------------------------------------------------


class Puller(threading.Thread):
    def __init__(self, store: ImageStore, name: str, cancel: threading.Event | None = None):
        super().__init__(daemon=True)
        self.store, self.name_, self.cancel = store, name, cancel
        self.result: object = None

    def run(self) -> None:
        try:
            self.result = self.store.pull(self.name_, cancel=self.cancel)
        except Exception as exc:
            self.result = exc


def _waiters(store: ImageStore) -> int:
    return store._downloads.waiters()


def test_concurrent_pulls_download_once(store: ImageStore, server: Server) -> None:
    name = f"{server.host}/gated/a.qcow2"
    first = Puller(store, name)
    first.start()
    wait_for(lambda: server.hits["/gated/a.qcow2"] == 1)
    second = Puller(store, name + ":latest")
    second.start()
    wait_for(lambda: _waiters(store) == 1)
    server.gate.set()
    first.join(10)
    second.join(10)
    assert server.hits["/gated/a.qcow2"] == 1
    assert first.result == second.result
    assert first.result.names == [name]  # type: ignore[attr-defined]


def test_waiter_retries_when_the_first_pull_is_cancelled(store: ImageStore, server: Server) -> None:
    name = f"{server.host}/gated/a.qcow2"
    cancel = threading.Event()
    first = Puller(store, name, cancel)
    first.start()
    wait_for(lambda: server.hits["/gated/a.qcow2"] == 1)
    second = Puller(store, name)
    second.start()
    wait_for(lambda: _waiters(store) == 1)
    cancel.set()
    server.gate.set()
    first.join(10)
    second.join(10)
    assert isinstance(first.result, Cancelled)
    assert second.result == store.status(name) is not None
    assert server.hits["/gated/a.qcow2"] == 2


def test_cancelled_waiter_leaves_the_first_pull_alone(store: ImageStore, server: Server) -> None:
    name = f"{server.host}/gated/a.qcow2"
    first = Puller(store, name)
    first.start()
    wait_for(lambda: server.hits["/gated/a.qcow2"] == 1)
    cancel = threading.Event()
    second = Puller(store, name, cancel)
    second.start()
    wait_for(lambda: _waiters(store) == 1)
    cancel.set()
    second.join(10)
    assert isinstance(second.result, Cancelled)
    server.gate.set()
    first.join(10)
    assert first.result == store.status(name) is not None


# ---- remove --------------------------------------------------------------------------


def test_remove_in_use_keeps_blob(store: ImageStore, server: Server) -> None:
    name = f"{server.host}/images/a.qcow2"
    rec = store.pull(name)
    asked: list[str] = []

    def in_use(digest: str) -> bool:
        asked.append(digest)
        return True

    store.remove(name, in_use)
    assert asked == [rec.digest]
    assert store.status(name) is None
    kept = store.status(rec.id)
    assert kept is not None and kept.names == [] and rec.path.exists()
    assert [r.id for r in store.list()] == [rec.id]
    store.remove(rec.id, lambda d: False)
    assert store.status(rec.id) is None and not rec.path.exists()
    assert files_under(store.root) == []


def test_remove_one_of_two_names_keeps_blob(store: ImageStore, server: Server) -> None:
    a = store.pull(f"{server.host}/images/a.qcow2")
    store.pull(f"{server.host}/images/copy-of-a.qcow2")
    store.remove(f"{server.host}/images/a.qcow2", lambda d: pytest.fail("not asked"))
    left = store.status(a.id)
    assert left is not None and left.names == [f"{server.host}/images/copy-of-a.qcow2"]
    store.remove(f"{server.host}/images/copy-of-a.qcow2:latest", lambda d: False)
    assert store.list() == [] and files_under(store.root) == []


def test_remove_by_id_drops_all_names(store: ImageStore, server: Server) -> None:
    a = store.pull(f"{server.host}/images/a.qcow2")
    store.pull(f"{server.host}/images/copy-of-a.qcow2")
    store.remove(a.id, lambda d: False)
    assert store.list() == [] and files_under(store.root) == []


def test_remove_absent_succeeds(store: ImageStore, server: Server) -> None:
    store.remove(f"{server.host}/images/nothing.qcow2", lambda d: False)
    store.remove(f"sha256:{H}", lambda d: False)
    rec = store.pull(f"{server.host}/images/a.qcow2")
    store.remove(f"{server.host}/images/a.qcow2@sha256:{H}", lambda d: False)
    assert store.status(rec.id) == rec
    with pytest.raises(InvalidArgument):
        store.remove("bad name", lambda d: False)


# ---- crash recovery ------------------------------------------------------------------


def test_leftover_temp_files_removed_on_open(tmp_path: Path, db: Store, server: Server) -> None:
    root = tmp_path / "s"
    with open_store(root, db, download_protocol="http") as s:
        rec = s.pull(f"{server.host}/images/a.qcow2")
        before = files_under(root)
    (root / "tmp" / "pull-123.part").write_bytes(b"half a download")
    (root / "tmp" / "somedir").mkdir()
    (root / "tmp" / "somedir" / "f").write_bytes(b"x")
    # names/ is where the previous version wrote name records, via temp files like this.
    (root / "names").mkdir()
    (root / "names" / ".tmp-abc").write_bytes(b'{"name": "half')
    (root / "blobs" / "sha256" / ".tmp-def").write_bytes(b"x")
    with open_store(root, db, download_protocol="http") as s:
        assert files_under(root) == before
        assert not (root / "names").exists()
        assert os.listdir(root / "tmp") == []
        assert s.list() == [rec]


def test_unusable_records_dropped_and_orphan_blob_listed(
    tmp_path: Path, db: Store, server: Server, images: dict[str, bytes]
) -> None:
    root = tmp_path / "s"
    with open_store(root, db, download_protocol="http") as s:
        a = s.pull(f"{server.host}/images/a.qcow2")
        b = s.pull(f"{server.host}/images/b.qcow2")
    # A crash between placing a blob and writing its name; a record whose blob is gone;
    # records that lack what a name needs (one for a stored blob, one with no name).
    db.delete("image_names", f"{server.host}/images/a.qcow2")
    b.path.unlink()
    db.put("image_names", "h/x.img", {"name": "h/x.img", "digest": a.digest}, digest=a.digest)
    db.put("image_names", "h/y.img", {"digest": a.digest}, digest=a.digest)
    with open_store(root, db, download_protocol="http") as s:
        [orphan] = s.list()
        assert orphan.id == a.id and orphan.names == []
        assert (orphan.virtual_size, orphan.format) == (1 << 20, "qcow2")
        assert s.status(f"{server.host}/images/b.qcow2") is None
        assert s.status("h/x.img") is None and s.status("h/y.img") is None
        assert files_under(root) == [f"blobs/sha256/{a.digest}"]
    # Dropped from the store, but for the one without a name to delete it by.
    assert db.all("image_names") == [{"digest": a.digest}]


def _previous_version_layout(state: Path, blob: bytes, names: list[str]) -> str:
    """A state directory as version 1 of the runtime left it: a v1 state.db, and under
    images/ the blob, one names/<sha256(name)>.json per name (written the way it wrote
    them: sorted keys, indent 2, a newline, mode 0644), a temp file and the lock file."""
    root = state / "images"
    digest = sha(blob)
    for d in ("blobs/sha256", "names", "tmp"):
        (root / d).mkdir(mode=0o755, parents=True)
    (root / "blobs" / "sha256" / digest).write_bytes(blob)
    (root / "blobs" / "sha256" / digest).chmod(0o644)
    for name in names:
        data = {"name": name, "digest": digest, "size": len(blob), "virtual_size": 1 << 20,
                "format": "qcow2", "url": f"https://{name}",
                "pulled_at": "2024-05-01T10:00:00+00:00"}
        path = root / "names" / (sha(name.encode()) + ".json")
        path.write_bytes(json.dumps(data, indent=2, sort_keys=True).encode() + b"\n")
        path.chmod(0o644)
    (root / "names" / ".tmp-x1").write_bytes(b'{"name": "half')
    (root / ".lock").touch()
    db = sqlite3.connect(state / "state.db", isolation_level=None)
    store_mod.MIGRATIONS[0](db, state)
    db.execute("PRAGMA user_version=1")
    db.close()
    return digest


def test_previous_version_images_are_served_after_migration(
    tmp_path: Path, images: dict[str, bytes]
) -> None:
    state = tmp_path / "state"
    names = ["example.test/images/a.qcow2", "example.test:8080/copy.qcow2"]
    digest = _previous_version_layout(state, images["a"], names)
    root = state / "images"

    db = Store(state / "state.db")  # the migration carries the name files over
    with open_store(root, db) as s:
        rec = s.status(names[0])
        assert rec is not None and rec == s.status(names[1]) == s.status(f"sha256:{digest}")
        assert rec.names == sorted(names) and rec.size == len(images["a"])
        assert (rec.virtual_size, rec.format) == (1 << 20, "qcow2")
        assert rec.path == root / "blobs" / "sha256" / digest
        assert s.list() == [rec]
        assert {r["name"]: digest_column(db, r["name"]) for r in db.all("image_names")} == {
            n: digest for n in names
        }
        # Served from what was carried over: the loopback-only guard fails any download.
        assert s.pull(f"{names[0]}:latest@sha256:{digest}") == rec
        assert files_under(root) == [f"blobs/sha256/{digest}"]  # names/ is gone
        s.remove(names[0], lambda d: False)
        s.remove(names[1], lambda d: False)
        assert s.list() == [] and files_under(root) == []
    db.close()


def test_a_name_file_the_migration_could_not_read_is_left_for_an_operator(
    tmp_path: Path, images: dict[str, bytes]
) -> None:
    state = tmp_path / "state"
    digest = _previous_version_layout(state, images["a"], ["example.test/a.qcow2"])
    (state / "images" / "names" / ("0" * 64 + ".json")).write_text("not json")
    db = Store(state / "state.db")
    with open_store(state / "images", db) as s:
        assert [r.names for r in s.list()] == [["example.test/a.qcow2"]]
        assert files_under(state / "images") == [
            f"blobs/sha256/{digest}", f"names/{'0' * 64}.json"
        ]
    db.close()


CHILD = """
import sys
from pathlib import Path
from arktos_vm_runtime.service.images import ImageStore
from arktos_vm_runtime.service.store import Store
root = Path(sys.argv[1])
ImageStore(root, Store(root.parent / "state.db"), download_protocol="http",
           denied_networks=[]).pull(sys.argv[2])
"""


def test_kill_9_mid_download(tmp_path: Path, db: Store, server: Server) -> None:
    root = tmp_path / "s"
    with open_store(root, db, download_protocol="http") as s:
        rec = s.pull(f"{server.host}/images/a.qcow2")
        before = files_under(root)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(root), f"{server.host}/slow/x"])
    try:
        wait_for(lambda: any(p.stat().st_size > 0 for p in (root / "tmp").iterdir()), 30)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert files_under(root) != before
    with open_store(root, db, download_protocol="http") as s:
        assert files_under(root) == before
        assert s.list() == [rec]


# ---- translations --------------------------------------------------------------------


def _write_translations(d: Path, host: str) -> None:
    d.mkdir()
    (d / "10-test.yaml").write_text(
        "prefix: testimages\n"
        "translations:\n"
        f"  - name: cirros\n    url: http://{host}/images/a.qcow2\n"
        f"  - regexp: 'ubuntu/(\\d+)'\n    url: 'http://{host}/images/u\\1.qcow2'\n"
    )
    (d / "20-go.yml").write_text(
        "translations:\n"
        "  - name: go/local\n    url: file:///etc/passwd\n"
        f"  - regexp: 'go/(?P<n>[a-z]+)'\n    url: 'http://{host}/images/${{n}}.qcow2'\n"
    )
    (d / "30-broken.yaml").write_text("translations: [ {name: x\n")
    (d / "40-no-url.yaml").write_text("translations:\n  - name: x\n")
    (d / "50-bad-re.yaml").write_text("translations:\n  - regexp: '('\n    url: u\n")
    (d / "60-bad-group.yaml").write_text("translations:\n  - regexp: 'a'\n    url: '$1'\n")
    (d / "notes.txt").write_text("ignored")


def test_translator_loads_good_files_and_skips_bad(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write_translations(tmp_path / "t", "h:1")
    tr = ImageTranslator(tmp_path / "t")
    assert [s.prefix for s in tr.sets] == ["testimages", ""]
    assert sum("skipping image translation file" in r.message for r in caplog.records) == 4
    assert tr.translate("testimages/cirros") == "http://h:1/images/a.qcow2"
    assert tr.translate("testimages/ubuntu/22") == "http://h:1/images/u22.qcow2"
    assert tr.translate("testimages/ubuntu/22x") is None
    assert tr.translate("go/abc") == "http://h:1/images/abc.qcow2"
    assert tr.translate("cirros") is None
    assert ImageTranslator(tmp_path / "missing").sets == ()


def test_pull_through_translations(
    tmp_path: Path, db: Store, server: Server, images: dict[str, bytes]
) -> None:
    _write_translations(tmp_path / "t", server.host)
    with open_store(
        tmp_path / "s", db, translations=ImageTranslator(tmp_path / "t")
    ) as s:  # https by default: the translated http URLs are still allowed
        cirros = s.pull("testimages/cirros:latest")
        assert cirros.names == ["testimages/cirros"]
        ubuntu = s.pull("testimages/ubuntu/2")
        assert ubuntu.digest == sha(images["b"])
        go = s.pull("go/a")
        assert go.id == cirros.id and go.names == ["go/a", "testimages/cirros"]
        with pytest.raises(InvalidArgument, match="translates to a file URL"):
            s.pull("go/local")
        # No rule matches: the name is taken as a URL, and this one is not a valid one.
        with pytest.raises(InvalidArgument, match="not a valid host"):
            s.pull("test_images/cirros")
    assert server.hits["/images/a.qcow2"] == 2 and server.hits["/images/u2.qcow2"] == 1


# ---- ImageFsInfo ---------------------------------------------------------------------


def test_fs_usage(store: ImageStore, server: Server, images: dict[str, bytes]) -> None:
    empty_bytes, empty_inodes = store.fs_usage()
    assert empty_bytes > 0 and empty_inodes >= 5
    store.pull(f"{server.host}/images/a.qcow2")
    used, inodes = store.fs_usage()
    assert used >= empty_bytes + 4096 and inodes == empty_inodes + 1  # the blob; names are rows


def test_a_translated_name_cannot_climb_out_of_the_rule_path(
    tmp_path: Path, db: Store, server: Server
) -> None:
    d = tmp_path / "t"
    d.mkdir()
    (d / "10-any.yaml").write_text(
        "translations:\n"
        f"  - regexp: 'any/(.+)'\n    url: 'http://{server.host}/images/\\1'\n"
    )
    with open_store(tmp_path / "s", db, translations=ImageTranslator(d)) as s:
        for name in ("any/../../etc/passwd", "any/a/%2e%2e/b.qcow2", "any/./a.qcow2"):
            with pytest.raises(InvalidArgument, match=re.escape("'.' or '..' path segments")):
                s.pull(name)
    assert not any(p.startswith("/etc") for p in server.hits)
