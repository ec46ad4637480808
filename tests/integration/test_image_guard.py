"""Issue 9 item 6 over the socket: pulls reach internal services and have no size cap.

The daemon runs with the default denied networks, inside a network namespace this test
makes (``ip netns exec``), where a dummy link carries an "outside" address 192.0.2.1
(TEST-NET-1) and the cloud metadata address 169.254.169.254, and the namespace's own
loopback serves "internal" data. HTTP servers listen on those addresses (their sockets are
made in the namespace); nothing outside the namespace is reached. Reproduced and shown
fixed: a loopback URL, directly and through redirects, is refused before any byte is
asked of the internal server; a 512-byte answer is not a root disk; a 256 MiB body without
Content-Length stops at the size cap; error texts are plain and short; the image cache
evicts unused images, least recently used first, and never one a VM container uses.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from arktos_vm_runtime.adapters import netns
from tests.daemon_proc import APIS, Daemon
from tests.guest.images import minimal_guest
from tests.integration.test_network_common import CniTestNet
from tests.integration.vmpods import (
    container_config,
    image_server,
    require_libvirtd,
    sandbox_config,
    vm_runtime,
)

pytestmark = pytest.mark.integration

SECRET = "internal-secret-5e1d"
OUTSIDE = "192.0.2.1"
METADATA = "169.254.169.254"
MIB = 1 << 20


@dataclass
class Route:
    code: int = 200
    body: bytes | None = b""  # None: 256 MiB without Content-Length
    headers: dict[str, str] = field(default_factory=dict)


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, ns: str, address: str) -> None:
        super().__init__((address, 0), Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = netns.socket_in(ns, socket.AF_INET)
        self.server_bind()
        self.server_activate()
        self.routes: dict[str, Route] = {}
        self.hits: list[str] = []
        self.streamed = 0

    @property
    def host(self) -> str:
        return f"{self.server_address[0]}:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    server: Server

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        srv.hits.append(self.path)
        route = srv.routes.get(self.path, Route(404, f"no such file {SECRET}".encode()))
        self.send_response(route.code, f"{SECRET} reason")
        self.send_header("X-Internal", SECRET)
        for k, v in route.headers.items():
            self.send_header(k, v)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            if route.body is None:
                self.send_header("Connection", "close")
                self.end_headers()
                for _ in range(256):
                    self.wfile.write(b"\1" * MIB)
                    srv.streamed += MIB
                return
            if "Content-Length" not in route.headers:
                self.send_header("Content-Length", str(len(route.body)))
            self.end_headers()
            self.wfile.write(route.body)


@dataclass
class Net:
    ns: str
    outside: Server
    loopback: Server
    metadata: Server


@pytest.fixture
def net() -> Iterator[Net]:
    if os.geteuid() != 0:
        pytest.fail("this test needs root (a network namespace)")
    ns = f"igtest-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=30)
    servers: list[Server] = []
    try:
        for cmd in (["link", "set", "lo", "up"],
                    ["addr", "add", f"{OUTSIDE}/32", "dev", "lo"],
                    ["addr", "add", f"{METADATA}/32", "dev", "lo"]):
            subprocess.run(["ip", "-n", ns, *cmd], check=True, timeout=30)
        for address in (OUTSIDE, "127.0.0.1", METADATA):
            srv = Server(ns, address)
            threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
            servers.append(srv)
        yield Net(ns, *servers)
    finally:
        for srv in servers:
            srv.shutdown()
            srv.server_close()
        subprocess.run(["ip", "netns", "delete", ns], timeout=30)


def start_daemon(tmp: Path, ns: str, *args: str) -> Daemon:
    """The daemon with the default denied networks, run inside the namespace."""
    d = Daemon(tmp, args=["--image-download-protocol", "http", *args], loopback_pulls=False)
    d.argv = ["ip", "netns", "exec", ns, *d.argv]
    return d.start()


@pytest.fixture(scope="module")
def qcow2(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    p = tmp_path_factory.mktemp("img") / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(p), "64M"], check=True)
    return p.read_bytes()


def pull(d: Daemon, name: str) -> Any:
    pb, _ = APIS["v1alpha2"]
    return d.images("v1alpha2").PullImage(
        pb.PullImageRequest(image=pb.ImageSpec(image=name)), timeout=60)


def pull_error(d: Daemon, name: str) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        pull(d, name)
    return e.value.code(), e.value.details() or ""


def stored(d: Daemon) -> list[str]:
    root = Path(d.state_dir) / "images"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and p.name != ".lock")


def image_present(d: Daemon, name: str) -> bool:
    pb, _ = APIS["v1alpha2"]
    r = d.images("v1alpha2").ImageStatus(
        pb.ImageStatusRequest(image=pb.ImageSpec(image=name)), timeout=10)
    return r.HasField("image")


def test_internal_addresses_are_refused_directly_and_through_redirects(
        short_tmp: Path, net: Net, qcow2: bytes) -> None:
    internal = raw_disk(2, 7)  # a well-formed disk: without the guard it would be stored
    net.loopback.routes["/secret.raw"] = Route(body=internal)
    net.metadata.routes["/latest/meta-data.raw"] = Route(body=internal)
    out = net.outside
    out.routes["/disk.qcow2"] = Route(body=qcow2)
    lo, md = net.loopback.host, net.metadata.host
    out.routes["/to-loopback"] = Route(302, headers={"Location": f"http://{lo}/secret.raw"})
    out.routes["/hop1"] = Route(301, headers={"Location": "/hop2"})
    out.routes["/hop2"] = Route(307, headers={"Location": f"http://{md}/latest/meta-data.raw"})
    lo_port = net.loopback.server_address[1]
    out.routes["/to-mapped"] = Route(302, headers={
        "Location": f"http://[::ffff:127.0.0.1]:{lo_port}/secret.raw"})
    out.routes["/loop"] = Route(302, headers={"Location": "/loop"})
    d = start_daemon(short_tmp, net.ns)
    try:
        assert pull(d, f"{out.host}/disk.qcow2").image_ref.startswith("sha256:")
        before = stored(d)
        cases = [
            (f"{lo}/secret.raw", "127.0.0.1 is in the denied network 127.0.0.0/8"),
            (f"{md}/latest/meta-data.raw",
             f"{METADATA} is in the denied network 169.254.0.0/16"),
            (f"[::ffff:127.0.0.1]:{lo_port}/secret.raw",
             "::ffff:127.0.0.1 is in the denied network 127.0.0.0/8"),
            (f"{out.host}/to-loopback", "127.0.0.1 is in the denied network 127.0.0.0/8"),
            (f"{out.host}/hop1", f"{METADATA} is in the denied network 169.254.0.0/16"),
            (f"{out.host}/to-mapped", "::ffff:127.0.0.1 is in the denied network"),
        ]
        for name, why in cases:
            code, details = pull_error(d, name)
            assert code == grpc.StatusCode.PERMISSION_DENIED, (name, code, details)
            assert why in details and "image-pull-denied-networks" in details, details
            assert SECRET not in details
        assert net.loopback.hits == [] and net.metadata.hits == [], \
            "the internal servers were never asked"
        code, details = pull_error(d, f"{out.host}/loop")
        assert code == grpc.StatusCode.UNAVAILABLE and "redirects more than 5 times" in details
        assert stored(d) == before
    finally:
        d.stop()


def raw_disk(mib: int, fill: int) -> bytes:
    return bytes([fill]) * (mib * MIB)


def test_a_short_answer_and_an_endless_body_are_refused(short_tmp: Path, net: Net) -> None:
    out = net.outside
    out.routes["/short.img"] = Route(body=b"\0" * 512)
    out.routes["/stream.raw"] = Route(body=None)  # 256 MiB, no Content-Length
    out.routes["/announced.raw"] = Route(body=b"\1" * MIB,
                                         headers={"Content-Length": str(256 * MIB)})
    d = start_daemon(short_tmp, net.ns, "--image-max-size-mib", "16")
    try:
        code, details = pull_error(d, f"{out.host}/short.img")
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "512 bytes of raw data (a raw disk image is at least 1 MiB" in details

        t = time.monotonic()
        code, details = pull_error(d, f"{out.host}/stream.raw")
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert "sent more than 16777216 bytes, more than the limit of 16 MiB (setting " \
            "image-max-size-mib); refused" in details
        assert out.streamed < 256 * MIB, "the daemon stopped reading"

        code, details = pull_error(d, f"{out.host}/announced.raw")
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "announces 268435456 bytes, more than the limit of 16 MiB" in details
        assert time.monotonic() - t < 30
        assert stored(d) == [], "nothing left in the blob store or the temp dir"
    finally:
        d.stop()


def test_error_texts_are_plain_and_short(short_tmp: Path, net: Net) -> None:
    out = net.outside
    out.routes["/broken.qcow2"] = Route(500, f"Traceback ... {SECRET}".encode())
    out.routes["/" + "p" * 1500 + ".qcow2"] = Route(503, SECRET.encode())
    out.routes["/page.html"] = Route(body=f"<html>{SECRET}</html>".encode() * 40)
    d = start_daemon(short_tmp, net.ns)
    try:
        cases = [
            ("/broken.qcow2", grpc.StatusCode.UNAVAILABLE,
             "answered HTTP 500 Internal Server Error"),
            ("/missing.qcow2", grpc.StatusCode.NOT_FOUND, "(HTTP 404 Not Found)"),
            ("/" + "p" * 1500 + ".qcow2", grpc.StatusCode.UNAVAILABLE,
             "characters) answered HTTP 503 Service Unavailable"),
            ("/page.html", grpc.StatusCode.INVALID_ARGUMENT, "not a disk image"),
        ]
        for path, want, words in cases:
            code, details = pull_error(d, out.host + path)
            assert code == want, (path, code, details)
            assert words in details, details
            assert SECRET not in details and "reason" not in details, details
            assert len(details) < 400, details  # the name and the URL are cut
        assert stored(d) == []
    finally:
        d.stop()


def test_the_image_cache_evicts_unused_images_least_recently_used_first(
        short_tmp: Path, net: Net) -> None:
    out = net.outside
    for i, n in enumerate("abc"):
        out.routes[f"/{n}.raw"] = Route(body=raw_disk(2, i + 1))
    out.routes["/huge.raw"] = Route(body=raw_disk(6, 9))
    d = start_daemon(short_tmp, net.ns, "--image-cache-size-mib", "5")
    try:
        a, b, c = (f"{out.host}/{n}.raw" for n in "abc")
        pull(d, a)
        pull(d, b)
        pull(d, c)  # 6 MiB > 5: a, the least recently used, goes with its name
        assert [image_present(d, n) for n in (a, b, c)] == [False, True, True]
        pull(d, a)  # the kubelet pulls it again; now b is the oldest
        assert [image_present(d, n) for n in (a, b, c)] == [True, False, True]
        assert len(stored(d)) == 2
        code, details = pull_error(d, f"{out.host}/huge.raw")
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "more than the limit of 5 MiB (setting image-cache-size-mib, the size of the " \
            "whole image cache)" in details
        assert [image_present(d, n) for n in (a, b, c)] == [True, False, True]
        assert "image cache: evicted sha256:" in d.output()
    finally:
        d.stop()


def test_an_image_a_container_uses_is_never_evicted(short_tmp: Path, cni_net: CniTestNet,
                                                    tmp_path: Path) -> None:
    """A real VM container (real libvirtd, CNI, overlay) made from the minimal guest pins
    it: pulls past the cache size evict the unused images around it, and once the pod is
    gone the guest's image is evictable again. This daemon serves from 127.0.0.1, so it
    allows loopback explicitly, as the other VM tests do."""
    require_libvirtd()
    serve_dir = tmp_path / "serve"
    serve_dir.mkdir()
    shutil.copy(minimal_guest().disk, serve_dir / "guest.qcow2")
    guest_mib = (serve_dir / "guest.qcow2").stat().st_size / MIB
    for i, n in enumerate("abc"):
        (serve_dir / f"{n}.raw").write_bytes(raw_disk(2, i + 1))
    pb, _ = APIS["v1alpha2"]
    files = {p.name: p for p in serve_dir.iterdir()}
    with image_server(files) as host:
        d = vm_runtime(short_tmp, cni_net)
        cap = int(guest_mib) + 5  # the guest and two 2 MiB images fit, three do not
        d.argv += ["--image-cache-size-mib", str(cap)]
        d.start()
        try:
            guest, a, b, c = (f"{host}/{n}" for n in ("guest.qcow2", "a.raw", "b.raw", "c.raw"))
            pull(d, guest)
            rt = d.runtime("v1alpha2")
            cfg = sandbox_config(pb, short_tmp / "pods", name="cache-pod")
            sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg),
                                   timeout=60).pod_sandbox_id
            rt.CreateContainer(pb.CreateContainerRequest(
                pod_sandbox_id=sid, sandbox_config=cfg, config=container_config(pb, guest)),
                timeout=60)
            pull(d, a)
            pull(d, b)
            pull(d, c)  # over: the guest is the oldest but in use; a goes
            assert [image_present(d, n) for n in (guest, a, b, c)] == [True, False, True, True]
            rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
            rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)
            pull(d, a)  # now the guest is unused and the least recently used
            assert [image_present(d, n) for n in (guest, a, b, c)] == [False, True, True, True]
        finally:
            d.stop()
