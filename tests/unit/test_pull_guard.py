"""The image guard: denied networks (IPv4, IPv6, IPv4-mapped) checked on the address a
download connects to and on every redirect hop, bounded redirects, the size cap and plain
error texts. Real HTTP servers on loopback addresses; a name's resolution is faked only to
make a host name resolve to a loopback address (no other host is ever reached)."""

from __future__ import annotations

import contextlib
import http.server
import io
import re
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from arktos_vm_runtime.adapters.image_fetch import Fetcher, SizeCap
from arktos_vm_runtime.adapters.pull_guard import (
    DEFAULT_DENIED_NETWORKS,
    MAX_REDIRECTS,
    NetworkGuard,
)
from arktos_vm_runtime.config import DEFAULT_DENIED_NETWORKS as CONFIG_DEFAULT
from arktos_vm_runtime.config import Settings, build, denied_networks
from arktos_vm_runtime.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)

SECRET = "internal-secret-7f3a"

# ---- the address checks ---------------------------------------------------------------


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.255.255.254", "::1", "0.0.0.0", "0.1.2.3", "::",
    "169.254.169.254", "169.254.0.1", "fe80::1", "fe80::1%2", "febf::1", "fd00:ec2::254",
    "::ffff:127.0.0.1", "::ffff:7f00:1", "::ffff:169.254.169.254", "::ffff:0.0.0.0",
])
def test_the_default_list_denies(address: str) -> None:
    assert NetworkGuard().denied_by(address) is not None


@pytest.mark.parametrize("address", [
    "192.0.2.1", "198.51.100.7", "10.0.0.1", "2001:db8::1", "::ffff:192.0.2.1",
    "fd00:ec2::253", "fec0::1", "169.253.255.255", "1.0.0.0", "::2",
])
def test_the_default_list_allows(address: str) -> None:
    assert NetworkGuard().denied_by(address) is None


def test_a_mapped_entry_covers_the_ipv4_address_and_the_other_way_round() -> None:
    guard = NetworkGuard(["::ffff:10.0.0.0/104", "192.0.2.0/24"])
    assert str(guard.denied_by("10.1.2.3")) == "::ffff:a00:0/104"
    assert str(guard.denied_by("::ffff:192.0.2.9")) == "192.0.2.0/24"
    assert guard.denied_by("10.0.0.1%1") is None  # not an address: not ours to judge
    assert guard.denied_by("11.0.0.1") is None


def test_the_settings_default_is_the_guards_default() -> None:
    assert CONFIG_DEFAULT.split(",") == list(DEFAULT_DENIED_NETWORKS)


@pytest.mark.parametrize("entry", ["nonsense", "127.0.0.1/33", "fe80::/129", "1.2.3"])
def test_a_malformed_network_is_refused(entry: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape("is not an IP network")):
        NetworkGuard(["127.0.0.0/8", entry])


# ---- servers ----------------------------------------------------------------------------


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: str = "127.0.0.1", family: int = socket.AF_INET) -> None:
        self.address_family = family
        super().__init__((address, 0), Handler)
        self.hits: list[str] = []
        self.hosts: list[str] = []
        self.routes: dict[str, tuple[int, dict[str, str], bytes | None]] = {}

    @property
    def base(self) -> str:
        host = self.server_address[0]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    server: Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.hits.append(self.path)
        self.server.hosts.append(self.headers.get("Host", ""))
        code, headers, body = self.server.routes.get(self.path, (404, {}, b"no"))
        self.send_response(code, f"{SECRET} reason")
        for k, v in headers.items():
            self.send_header(k, v)
        if body is None:  # no Content-Length: a 256 MiB stream, closed at the end
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                for _ in range(256):
                    self.wfile.write(b"\1" * (1 << 20))
            except (BrokenPipeError, ConnectionResetError):
                pass
            return
        self.send_header("Content-Length", headers.get("X-Length", str(len(body))))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)


@pytest.fixture
def serve() -> Iterator[Any]:
    servers: list[Server] = []

    def start(address: str = "127.0.0.1", family: int = socket.AF_INET) -> Server:
        srv = Server(address, family)
        threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy in the environment is ignored: it would connect past the checks."""
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")


@pytest.fixture
def resolve(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Host names of the test resolve to the given addresses; every lookup is counted in
    the list under '#lookups'."""
    table: dict[str, list[str]] = {"#lookups": []}
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host.endswith(".test"):
            table["#lookups"].append(host)
            out = []
            for addr in table[host]:
                out.extend(real(addr, port, *args, **kwargs))
            return out
        if host not in ("127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1"):
            raise AssertionError(f"the test tried to resolve {host!r}")
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return table


def fetch(url: str, guard: NetworkGuard | None = None, cap: int = 0) -> tuple[Any, bytes]:
    out = io.BytesIO()
    got = Fetcher(frozenset({"http", "https"}), 10.0, guard=guard).fetch(
        url, out, name="img", cap=SizeCap(cap))
    return got, out.getvalue()


# ---- connections --------------------------------------------------------------------------


def test_loopback_is_refused_before_connecting(serve: Any, resolve: Any) -> None:
    srv = serve()
    srv.routes["/a"] = (200, {}, b"x" * 4096)
    with pytest.raises(PermissionDenied) as exc:
        fetch(srv.base + "/a")
    assert "127.0.0.1 is in the denied network 127.0.0.0/8" in exc.value.message
    assert "image-pull-denied-networks" in exc.value.message
    assert srv.hits == []
    got, _body = fetch(srv.base + "/a", NetworkGuard([]))  # allowed explicitly
    assert got.size == 4096 and srv.hits == ["/a"]


def test_https_connections_are_checked_too(serve: Any, resolve: Any) -> None:
    srv = serve()
    with pytest.raises(PermissionDenied, match=re.escape("127.0.0.1 is in the denied")):
        fetch(f"https://127.0.0.1:{srv.server_address[1]}/a")
    assert srv.hits == []
    # Allowed, the TLS handshake happens on the checked connection (and fails: plain HTTP).
    with pytest.raises(Unavailable, match=re.escape("TLS with 'https://127.0.0.1")):
        fetch(f"https://127.0.0.1:{srv.server_address[1]}/a", NetworkGuard([]))


def test_tls_still_names_the_host_when_the_address_is_pinned(
        tmp_path: Path, resolve: dict[str, list[str]]) -> None:
    """The connection goes to the checked address; the TLS handshake names the host (SNI)
    and checks the certificate against it, as without the guard."""
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=images.test", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    names: list[str | None] = []
    ctx.sni_callback = lambda sock, name, c: names.append(name)  # type: ignore[assignment]
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def accept() -> None:
        conn, _ = listener.accept()
        with contextlib.suppress(OSError), ctx.wrap_socket(conn, server_side=True):
            pass
        conn.close()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    resolve["images.test"] = ["127.0.0.1"]
    with pytest.raises(Unavailable, match="CERTIFICATE_VERIFY_FAILED"):
        fetch(f"https://images.test:{port}/a", NetworkGuard([]))
    t.join(10)
    listener.close()
    assert names == ["images.test"]
    assert resolve["#lookups"] == ["images.test"]


def test_ipv6_loopback_and_the_mapped_ipv4_loopback(serve: Any, resolve: Any) -> None:
    srv6 = serve("::1", socket.AF_INET6)
    srv6.routes["/a"] = (200, {}, b"x")
    with pytest.raises(PermissionDenied, match=r"::1 is in the denied network ::1/128"):
        fetch(srv6.base + "/a")
    srv = serve()
    with pytest.raises(PermissionDenied, match=re.escape("in the denied network 127.0.0.0/8")):
        fetch(f"http://[::ffff:127.0.0.1]:{srv.server_address[1]}/a")
    assert srv6.hits == [] and srv.hits == []


def test_a_name_is_resolved_once_and_the_checked_address_is_connected(
        serve: Any, resolve: dict[str, list[str]]) -> None:
    srv = serve()
    srv.routes["/a"] = (200, {}, b"x" * 100)
    port = srv.server_address[1]
    resolve["images.test"] = ["127.0.0.1"]
    with pytest.raises(PermissionDenied,
                       match=re.escape("'images.test', which resolves to 127.0.0.1,")):
        fetch(f"http://images.test:{port}/a")
    assert srv.hits == []
    # Allowed: one lookup per connection, the Host header still names the host.
    resolve["#lookups"].clear()
    fetch(f"http://images.test:{port}/a", NetworkGuard(["169.254.0.0/16"]))
    assert resolve["#lookups"] == ["images.test"] and srv.hosts == [f"images.test:{port}"]


def test_one_denied_address_among_several_refuses_the_name(
        serve: Any, resolve: dict[str, list[str]]) -> None:
    srv = serve()
    resolve["mixed.test"] = ["127.0.0.2", "127.0.0.1"]
    with pytest.raises(PermissionDenied, match=re.escape("resolves to 127.0.0.1")):
        fetch(f"http://mixed.test:{srv.server_address[1]}/a", NetworkGuard(["127.0.0.1/32"]))
    assert srv.hits == []


# ---- redirects ------------------------------------------------------------------------------


def test_every_redirect_hop_is_checked(serve: Any, resolve: dict[str, list[str]]) -> None:
    """The first server is allowed (127.0.0.1), the internal one (127.0.0.2) is not: a
    redirect to it, by address or through a name that resolves to it, is refused."""
    guard = NetworkGuard(["127.0.0.2/32"])
    public, internal = serve("127.0.0.1"), serve("127.0.0.2")
    internal.routes["/meta"] = (200, {}, SECRET.encode() * 1000)
    resolve["internal.test"] = ["127.0.0.2"]
    iport = internal.server_address[1]
    public.routes["/by-address"] = (302, {"Location": f"{internal.base}/meta"}, b"")
    public.routes["/by-name"] = (301, {"Location": f"http://internal.test:{iport}/meta"}, b"")
    public.routes["/hop1"] = (307, {"Location": "/hop2"}, b"")
    public.routes["/hop2"] = (302, {"Location": "/by-name"}, b"")
    for path in ("/by-address", "/by-name", "/hop1"):
        with pytest.raises(PermissionDenied) as exc:
            fetch(public.base + path, guard)
        assert "127.0.0.2 is in the denied network 127.0.0.2/32" in exc.value.message \
            or "which resolves to 127.0.0.2" in exc.value.message
        assert SECRET not in exc.value.message
    assert internal.hits == []
    public.routes["/ok"] = (302, {"Location": "/data"}, b"")
    public.routes["/data"] = (200, {}, b"d" * 10)
    assert fetch(public.base + "/ok", guard)[1] == b"d" * 10


def test_redirects_are_bounded(serve: Any, resolve: Any) -> None:
    srv = serve()
    for i in range(20):
        srv.routes[f"/r{i}"] = (302, {"Location": f"/r{i + 1}"}, b"")
    srv.routes["/loop"] = (302, {"Location": "/loop"}, b"")
    with pytest.raises(Unavailable, match=f"redirects more than {MAX_REDIRECTS} times"):
        fetch(srv.base + "/r0", NetworkGuard([]))
    assert len(srv.hits) == MAX_REDIRECTS + 1
    with pytest.raises(Unavailable, match=f"redirects more than {MAX_REDIRECTS} times"):
        fetch(srv.base + "/loop", NetworkGuard([]))
    srv.routes["/r15"] = (200, {}, b"end")
    assert fetch(srv.base + "/r10", NetworkGuard([]))[1] == b"end"  # five hops are fine


# ---- size cap and texts -------------------------------------------------------------------


def test_a_content_length_over_the_cap_is_refused_before_reading(serve: Any,
                                                                 resolve: Any) -> None:
    srv = serve()
    srv.routes["/big"] = (200, {"X-Length": str(256 << 20)}, b"x" * 1000)
    out = io.BytesIO()
    with pytest.raises(ResourceExhausted) as exc:
        Fetcher(frozenset({"http"}), 10.0, guard=NetworkGuard([])).fetch(
            srv.base + "/big", out, name="img", cap=SizeCap(1 << 20))
    assert out.getvalue() == b""
    assert "announces 268435456 bytes, more than the limit of 1 MiB" in exc.value.message
    assert "image-max-size-mib" in exc.value.message


def test_a_body_without_length_is_stopped_past_the_cap(serve: Any, resolve: Any) -> None:
    srv = serve()
    srv.routes["/stream"] = (200, {}, None)  # 256 MiB, no Content-Length
    out = io.BytesIO()
    with pytest.raises(ResourceExhausted, match=r"sent more than 4194304 bytes"):
        Fetcher(frozenset({"http"}), 10.0, guard=NetworkGuard([])).fetch(
            srv.base + "/stream", out, name="img", cap=SizeCap(4 << 20))
    assert len(out.getvalue()) <= 4 << 20
    srv.routes["/small"] = (200, {}, b"s" * 1000)
    assert fetch(srv.base + "/small", NetworkGuard([]), cap=1000)[0].size == 1000


def test_error_texts_are_plain_and_short(serve: Any, resolve: Any) -> None:
    srv = serve()
    srv.routes["/500"] = (500, {"X-Secret": SECRET}, f"stack trace {SECRET}".encode())
    srv.routes["/404"] = (404, {"X-Secret": SECRET}, SECRET.encode())
    srv.routes["/418"] = (599, {}, SECRET.encode())
    long_path = "/" + "p" * 3000
    srv.routes[long_path] = (503, {}, SECRET.encode())
    for path, error, text in [("/500", Unavailable, "answered HTTP 500 Internal Server Error"),
                              ("/404", NotFound, "(HTTP 404 Not Found)"),
                              ("/418", Unavailable, "answered HTTP 599"),
                              (long_path, Unavailable, " characters) answered HTTP 503")]:
        with pytest.raises(error) as exc:
            fetch(srv.base + path, NetworkGuard([]))
        assert text in exc.value.message
        assert SECRET not in exc.value.message and "reason" not in exc.value.message
        assert len(exc.value.message) < 300


def test_connection_failures_say_what_failed(serve: Any, resolve: Any) -> None:
    srv = serve()
    port = srv.server_address[1]
    srv.shutdown()
    srv.server_close()
    with pytest.raises(Unavailable, match=r"connection to 'http://127\.0\.0\.1:.*' refused"):
        fetch(f"http://127.0.0.1:{port}/a", NetworkGuard([]))


# ---- the settings -------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


def test_the_setting_from_flags_and_yaml(tmp_path: Path) -> None:
    assert denied_networks(build(None, {})) == list(DEFAULT_DENIED_NETWORKS)
    assert denied_networks(build(None, {"image_pull_denied_networks": ""})) == []
    cfg = tmp_path / "c.yaml"
    cfg.write_text("image-pull-denied-networks: [169.254.0.0/16, 'fe80::/10']\n"
                   "image-max-size-mib: 100\nimage-cache-size-mib: 50\n")
    s = build(str(cfg), {})
    assert denied_networks(s) == ["169.254.0.0/16", "fe80::/10"]
    assert (s.image_max_size_mib, s.image_cache_size_mib) == (100, 50)
    with pytest.raises(InvalidArgument, match=re.escape("'10.0.0.0/33' is not an IP network")):
        build(None, {"image_pull_denied_networks": "127.0.0.0/8,10.0.0.0/33"})
    with pytest.raises(InvalidArgument, match="must not be negative"):
        build(None, {"image_cache_size_mib": -1})


def test_the_packaged_config_keeps_the_defaults() -> None:
    s = build(str(REPO / "packaging/deb/debian/config.yaml"), {})
    assert s.image_pull_denied_networks == CONFIG_DEFAULT
    assert s.image_max_size_mib == Settings().image_max_size_mib
    assert s.image_cache_size_mib == Settings().image_cache_size_mib


def test_the_demo_and_the_test_daemons_allow_exactly_loopback_more() -> None:
    from tests.daemon_proc import LOOPBACK_ALLOWED
    demo = (REPO / "tools/demo").read_text()
    assert f'--image-pull-denied-networks "{LOOPBACK_ALLOWED}"' in demo
    assert set(LOOPBACK_ALLOWED.split(",")) == set(DEFAULT_DENIED_NETWORKS) - {"127.0.0.0/8"}
