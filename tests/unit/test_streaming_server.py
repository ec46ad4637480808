"""The streaming server (runtime/streaming/server.py) on loopback, with a fake StreamBackends
(the project's own interface, service/stream_io.py) and real clients: tests/spdy_client.py
(SPDY), tests/ws_client.py (WebSocket) and, where noted, tests/go/spdyclient
(docker/spdystream, the library client-go uses).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from arktos_vm_runtime.errors import FailedPrecondition, ResourceExhausted
from arktos_vm_runtime.service.stream_io import StreamIO
from arktos_vm_runtime.streaming import spdy_frames as sf
from arktos_vm_runtime.streaming.server import StreamingServer
from tests.go_client import spdyclient
from tests.spdy_client import SpdyClient, exec_streams, http_request, spdy_headers
from tests.ws_client import WsClient, tunnel_client

V4 = "v4.channel.k8s.io"
RC_OFFER = [V4, "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io"]


def wait(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


class FakeBackends:
    """exec: cmd[0] picks the behaviour; attach: a console that echoes stdin to every
    attacher; port_connect: loopback ports from `ports` (guest port -> real port)."""

    def __init__(self) -> None:
        self.ports: dict[int, int] = {}
        self.gone_seen: list[str] = []
        self.attached: list[StreamIO] = []
        self.lock = threading.Lock()
        self.calls: list[tuple[str, ...]] = []
        self.running = 0

    def exec(self, container_id: str, cmd: list[str], io: StreamIO) -> int:
        self.calls.append(("exec", container_id, *cmd))
        with self.lock:
            self.running += 1
        try:
            return self._exec(cmd, io)
        finally:
            with self.lock:
                self.running -= 1

    def _exec(self, cmd: list[str], io: StreamIO) -> int:
        what = cmd[0]
        if what == "echo":       # echo OUT ERR CODE
            if io.stdout:
                io.stdout(cmd[1].encode())
            if io.stderr:
                io.stderr(cmd[2].encode())
            return int(cmd[3])
        if what == "cat":
            assert io.stdin is not None
            while (data := io.stdin.read(10)) is not None and data:
                assert io.stdout
                io.stdout(data)
            return 0 if data == b"" else 99
        if what == "fail":
            raise FailedPrecondition("the guest has no agent")
        if what == "big":
            assert io.stdout
            for _ in range(int(cmd[1])):
                io.stdout(b"x" * 65536)
            return 0
        if what == "resize":
            assert io.stdout
            got: list[tuple[int, int]] = []
            io.on_resize(lambda w, h: got.append((w, h)))
            wait(lambda: len(got) >= int(cmd[1]) or io.gone.is_set())
            io.stdout(json.dumps(got).encode())
            return 0
        if what == "sleep":
            io.gone.wait(30)
            self.gone_seen.append("exec")
            return 0
        raise AssertionError(cmd)

    def attach(self, container_id: str, io: StreamIO) -> None:
        self.calls.append(("attach", container_id))
        with self.lock:
            self.attached.append(io)
        try:
            while not io.gone.is_set():
                data = io.stdin.read(0.05) if io.stdin else None
                if data == b"":
                    io.gone.wait(0.05)   # stdin ended: the console keeps running
                if data:
                    with self.lock:
                        others = list(self.attached)
                    for other in others:
                        if other.stdout:
                            other.stdout(data)
                if io.stdin is None:
                    io.gone.wait(0.05)
            self.gone_seen.append("attach")
        finally:
            with self.lock:
                self.attached.remove(io)

    def port_connect(self, sandbox_id: str, port: int, timeout: float) -> socket.socket:
        self.calls.append(("port", sandbox_id, str(port)))
        return socket.create_connection(("127.0.0.1", self.ports.get(port, 1)), timeout)


class EchoServer:
    """A loopback TCP echo server that counts its open connections."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open = 0
        self.accepted = 0
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.stopping = False
        self.t = threading.Thread(target=self._accept, daemon=True)
        self.t.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.open += 1
                self.accepted += 1
            th = threading.Thread(target=self._echo, args=(conn,), daemon=True)
            self.threads.append(th)
            th.start()

    def _echo(self, conn: socket.socket) -> None:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass
        finally:
            conn.close()
            with self.lock:
                self.open -= 1

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)   # wakes accept(); close() alone does not
        self.listener.close()
        self.t.join(5)
        for th in self.threads:
            th.join(5)


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def fake() -> FakeBackends:
    return FakeBackends()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    e = EchoServer()
    yield e
    e.close()


@pytest.fixture
def server(fake: FakeBackends) -> Iterator[StreamingServer]:
    s = StreamingServer(fake, stream_timeout=2.0)
    s.start()
    yield s
    s.stop()
    assert s.session_count() == 0


def exec_url(server: StreamingServer, *cmd: str, tty: bool = False, stdin: bool = False,
             stdout: bool = True, stderr: bool = True) -> str:
    return server.exec_url("c1", list(cmd), tty=tty, stdin=stdin, stdout=stdout,
                           stderr=stderr)


def run_spdy_exec(url: str, protocols: list[str] | None, *, stdin: bytes | None = None,
                  tty: bool = False, stderr: bool = True) -> dict[str, bytes | str]:
    c = SpdyClient.connect(url, protocols)
    try:
        st = exec_streams(c, stdin=stdin is not None, stdout=True, stderr=stderr, tty=tty)
        if stdin is not None:
            st["stdin"].write(stdin)
            st["stdin"].close()
        out: dict[str, bytes | str] = {k: st[k].read_all() for k in ("stdout", "error")}
        if "stderr" in st:
            out["stderr"] = st["stderr"].read_all()
        out["protocol"] = c.protocol
        assert wait(lambda: c.goaway is not None), "no GOAWAY from the server"
        assert c.goaway is not None and c.goaway.status == 0
        # all output, then the status, then FINs with the error stream's last, then GOAWAY
        fins = [f.stream_id for f in c.frames_in if isinstance(f, sf.DataFrame) and f.fin]
        assert sorted(fins) == sorted(s.id for s in st.values())
        assert fins[-1] == st["error"].id
        assert isinstance(c.frames_in[-1], sf.GoAway)
        return out
    finally:
        c.close()


# -- URLs and tokens ---------------------------------------------------------------------------
def test_urls(server: StreamingServer) -> None:
    base = f"http://127.0.0.1:{server.port}/"
    assert server.base_url == base
    assert exec_url(server, "ls").startswith(base + "exec/")
    assert len(server.attach_url("c", tty=True, stdin=True, stdout=True,
                                 stderr=False).rsplit("/", 1)[1]) == 8
    assert server.port_forward_url("s", [80]).startswith(base + "portforward/")
    other = StreamingServer(FakeBackends(), base_url="https://node:1234")
    assert other.exec_url("c", ["ls"], tty=False, stdin=False, stdout=True,
                          stderr=False).startswith("https://node:1234/exec/")


def test_token_limit(server: StreamingServer) -> None:
    for _ in range(1000):
        server.port_forward_url("s", [80])
    with pytest.raises(ResourceExhausted):
        server.exec_url("c", ["ls"], tty=False, stdin=False, stdout=True, stderr=False)


def test_wrong_reused_expired_and_misrouted_tokens_404(fake: FakeBackends) -> None:
    srv = StreamingServer(fake, token_ttl=0.3)
    srv.start()
    try:
        url = exec_url(srv, "echo", "a", "b", "0")
        assert run_spdy_exec(url, [V4])["stdout"] == b"a"
        reused = http_request(url, "POST", spdy_headers([V4]))
        assert reused.status == 404 and b"404 page not found" in reused.body
        assert http_request(srv.base_url + "exec/AAAAAAAA", "POST",
                            spdy_headers([V4])).status == 404
        assert http_request(srv.base_url + "exec/", "GET").status == 404
        assert http_request(srv.base_url + "nope", "GET").status == 404
        misrouted = exec_url(srv, "echo", "a", "b", "0").replace("/exec/", "/attach/")
        assert http_request(misrouted, "POST", spdy_headers([V4])).status == 404
        expired = exec_url(srv, "echo", "a", "b", "0")
        time.sleep(0.5)
        assert http_request(expired, "POST", spdy_headers([V4])).status == 404
        assert [c for c in fake.calls if c[0] == "exec"] == [("exec", "c1", "echo", "a", "b",
                                                              "0")]
    finally:
        srv.stop()


def test_bad_requests(server: StreamingServer) -> None:
    url = exec_url(server, "echo", "a", "b", "0")
    assert http_request(url, "PUT", spdy_headers([V4])).status == 405
    garbage = http_request(server.base_url, raw=b"HELLO\r\n\r\n")
    assert garbage.status == 400
    no_key = http_request(exec_url(server, "echo", "a", "b", "0"), "GET",
                          [("Connection", "Upgrade"), ("Upgrade", "websocket"),
                           ("Sec-WebSocket-Version", "13")])
    assert no_key.status == 400 and b"Sec-WebSocket-Key" in no_key.body
    huge = http_request(server.base_url, raw=b"GET /exec/x HTTP/1.1\r\nX: " + b"a" * 20000
                        + b"\r\n\r\n")
    assert huge.status == 431


# -- negotiation ---------------------------------------------------------------------------------
def test_no_protocol_match_403(server: StreamingServer) -> None:
    r = http_request(exec_url(server, "echo", "a", "b", "0"), "POST",
                     spdy_headers(["v9.channel.k8s.io"]))
    assert r.status == 403
    assert r.get_all("X-Accepted-Stream-Protocol-Versions") == RC_OFFER
    assert b"unable to negotiate protocol" in r.body
    pf = http_request(server.port_forward_url("s1", [80]), "POST", spdy_headers([V4]))
    assert pf.status == 403
    assert pf.get_all("X-Accepted-Stream-Protocol-Versions") == ["portforward.k8s.io"]
    ws = WsClient(exec_url(server, "echo", "a", "b", "0"), ["v9.channel.k8s.io"])
    assert ws.status == 403


def test_missing_upgrade_headers_400(server: StreamingServer, fake: FakeBackends) -> None:
    r = http_request(exec_url(server, "echo", "a", "b", "0"), "POST",
                     [("X-Stream-Protocol-Version", V4)])
    assert r.status == 400 and b"missing upgrade headers" in r.body
    r = http_request(exec_url(server, "echo", "a", "b", "0"), "POST",
                     [("Connection", "Upgrade"), ("Upgrade", "h2c")])
    assert r.status == 400
    assert fake.calls == []


def test_websocket_first_supported_client_offer_wins(server: StreamingServer) -> None:
    ws = WsClient(exec_url(server, "echo", "o", "e", "0"),
                  ["v9.channel.k8s.io", "base64.channel.k8s.io", "v4.channel.k8s.io"])
    assert ws.subprotocol == "base64.channel.k8s.io"
    assert ws.wait_closed() and ws.channel(1) == b"o" and ws.text_frames > 0
    ws.close()
    # portforward.k8s.io is SPDY's; and v5 is not offered for WebSocket port forward
    for offer in (["portforward.k8s.io"], ["v5.channel.k8s.io"]):
        pf = WsClient(server.port_forward_url("sb1", [80]), offer)
        assert pf.status == 403
        pf.close()


def test_spdy_picks_first_supported_offer(server: StreamingServer) -> None:
    out = run_spdy_exec(exec_url(server, "echo", "o", "e", "0"),
                        ["v5.channel.k8s.io", "v3.channel.k8s.io", V4])
    assert out["protocol"] == "v3.channel.k8s.io"
    out = run_spdy_exec(exec_url(server, "echo", "o", "e", "0"), None)
    assert out["protocol"] == ""            # v1, no header back
    assert out["stdout"] == b"o" and out["stderr"] == b"e"


# -- remote command over SPDY ---------------------------------------------------------------------
@pytest.mark.parametrize("proto", RC_OFFER)
def test_spdy_exec_versions(server: StreamingServer, proto: str) -> None:
    ok = run_spdy_exec(exec_url(server, "echo", "hello", "oops", "0"), [proto])
    assert ok["protocol"] == proto
    assert ok["stdout"] == b"hello" and ok["stderr"] == b"oops"
    bad = run_spdy_exec(exec_url(server, "echo", "", "", "3"), [proto])
    if proto == V4:
        assert json.loads(ok["error"]) == {"metadata": {}, "status": "Success"}
        status = json.loads(bad["error"])
        assert status["status"] == "Failure" and status["reason"] == "NonZeroExitCode"
        assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]
        assert status["message"].startswith("command terminated with non-zero exit code: ")
    else:
        assert ok["error"] == b""
        assert isinstance(bad["error"], bytes)
        assert bad["error"].startswith(b"command terminated with non-zero exit code: ")
        assert b"exit code 3" in bad["error"]


def test_spdy_runtime_error_is_internal_error(server: StreamingServer) -> None:
    v4 = run_spdy_exec(exec_url(server, "fail"), [V4])
    status = json.loads(v4["error"])
    assert status["reason"] == "InternalError" and status["code"] == 500
    assert "the guest has no agent" in status["message"]
    v2 = run_spdy_exec(exec_url(server, "fail"), ["v2.channel.k8s.io"])
    assert v2["error"] == b"Internal error occurred: the guest has no agent"


def test_spdy_stdin_echo_and_big_output(server: StreamingServer) -> None:
    data = bytes(range(256)) * 1000
    out = run_spdy_exec(exec_url(server, "cat", stdin=True, stderr=False), [V4], stdin=data,
                        stderr=False)
    assert out["stdout"] == data
    assert json.loads(out["error"])["status"] == "Success"
    big = run_spdy_exec(exec_url(server, "big", "40", stderr=False), [V4], stderr=False)
    assert big["stdout"] == b"x" * 65536 * 40


def test_spdy_tty_resize(server: StreamingServer) -> None:
    c = SpdyClient.connect(exec_url(server, "resize", "2", tty=True, stderr=False), [V4])
    st = exec_streams(c, stdin=False, stdout=True, stderr=False, tty=True)
    assert set(st) == {"error", "stdout", "resize"}
    st["resize"].write(b'{"Width":80,"Height":24}\n{"Width":1')   # split anywhere
    st["resize"].write(b'20,"Height":50}\n')
    assert json.loads(st["stdout"].read_all()) == [[80, 24], [120, 50]]
    assert json.loads(st["error"].read_all())["status"] == "Success"
    c.close()


def test_spdy_stream_creation_timeout(server: StreamingServer, fake: FakeBackends) -> None:
    c = SpdyClient.connect(exec_url(server, "echo", "a", "b", "0"), [V4])
    err = c.open({"streamtype": "error"})
    c.open({"streamtype": "bogus"})                  # unknown: replied, ignored
    assert b"timed out waiting for client to create streams" in err.read_all(timeout=5)
    assert c.wait_closed(5)
    assert fake.calls == []
    c.close()


def test_ping_answered_and_goaway_ends_session(server: StreamingServer,
                                               fake: FakeBackends) -> None:
    c = SpdyClient.connect(exec_url(server, "sleep", stderr=False), [V4])
    exec_streams(c, stdin=False, stdout=True, stderr=False, tty=False)
    c.send(sf.Ping(1))
    c.send(sf.Ping(2))                                # even: the server's own; not echoed
    c.send(sf.Ping(3))
    assert wait(lambda: c.pings == [1, 3])
    c.send(sf.GoAway(5, 0))
    assert wait(lambda: fake.gone_seen == ["exec"])
    assert c.wait_closed()
    c.close()


def test_spdy_framing_error_ends_session(server: StreamingServer, fake: FakeBackends) -> None:
    c = SpdyClient.connect(exec_url(server, "sleep", stderr=False), [V4])
    exec_streams(c, stdin=False, stdout=True, stderr=False, tty=False)
    assert wait(lambda: fake.running == 1)
    c.sock.sendall(struct.pack(">HHI", 0x8003, 5, 0))       # no such control frame type
    assert c.wait_closed()
    assert c.goaway is not None and c.goaway.status == 1    # PROTOCOL_ERROR
    assert wait(lambda: fake.gone_seen == ["exec"] and server.session_count() == 0)
    c.close()


def test_spdy_streams_per_connection_are_bounded(server: StreamingServer) -> None:
    c = SpdyClient.connect(exec_url(server, "sleep", stderr=False), [V4])
    for _ in range(256):
        c.open({"streamtype": "bogus"}, wait=False)
    last = c.open({"streamtype": "bogus"})
    assert last.refused
    assert all(s.replied.is_set() and not s.refused for s in list(c.streams.values())[:256])
    c.close()


def test_spdy_port_forward_without_requestid(server: StreamingServer, fake: FakeBackends,
                                             echo: EchoServer) -> None:
    """Old clients send no requestid: error stream id N pairs with data stream id N+2."""
    fake.ports = {8080: echo.port}
    c = SpdyClient.connect(server.port_forward_url("sb1", []), ["portforward.k8s.io"])
    err = c.open({"streamtype": "error", "port": "8080"})
    data = c.open({"streamtype": "data", "port": "8080"})
    assert (err.id, data.id) == (1, 3)
    data.write(b"paired")
    assert data.read_until(b"paired") == b"paired"
    c.close()


# -- attach ------------------------------------------------------------------------------------
def test_attach_two_clients(server: StreamingServer, fake: FakeBackends) -> None:
    def attach_url() -> str:
        return server.attach_url("vm1", tty=True, stdin=True, stdout=True, stderr=False)

    a = SpdyClient.connect(attach_url(), [V4])
    sa = exec_streams(a, stdin=True, stdout=True, stderr=False, tty=True)
    b = WsClient(attach_url(), ["v5.channel.k8s.io"])
    assert b.subprotocol == "v5.channel.k8s.io"
    assert wait(lambda: len(fake.attached) == 2)
    sa["stdin"].write(b"hello from a\n")
    assert b"hello from a\n" in sa["stdout"].read_until(b"hello from a\n")
    assert b"hello from a\n" in b.wait_for(1, b"hello from a\n")
    b.send(0, b"and from b\n")
    assert b"and from b\n" in sa["stdout"].read_until(b"and from b\n")
    a.close()                                          # a detaches; b keeps its console
    assert wait(lambda: len(fake.attached) == 1)
    b.send(0, b"still here\n")
    assert b"still here\n" in b.wait_for(1, b"still here\n")
    b.close()
    assert wait(lambda: len(fake.attached) == 0 and server.session_count() == 0)
    assert sorted(fake.gone_seen) == ["attach", "attach"]


# -- remote command over WebSocket -----------------------------------------------------------------
@pytest.mark.parametrize("proto", ["v4.channel.k8s.io", "v5.channel.k8s.io",
                                   "v4.base64.channel.k8s.io", "channel.k8s.io",
                                   "base64.channel.k8s.io", None])
def test_ws_exec(server: StreamingServer, proto: str | None) -> None:
    ws = WsClient(exec_url(server, "echo", "out", "err", "3"), [proto] if proto else None)
    assert ws.status == 101
    assert ws.subprotocol == proto
    assert ws.wait_closed()
    assert ws.close_code == 1000
    assert ws.messages[0] == (1, b"")                 # empty first message on stdout
    assert ws.channel(1) == b"out" and ws.channel(2) == b"err"
    if proto and "base64" in proto:
        assert ws.text_frames > 0 and ws.binary_frames == 0
    else:
        assert ws.binary_frames > 0 and ws.text_frames == 0
    status = ws.channel(3)
    if proto and proto.startswith(("v4", "v5")):
        assert json.loads(status)["details"]["causes"][0] == {"reason": "ExitCode",
                                                             "message": "3"}
    else:
        assert status.startswith(b"command terminated with non-zero exit code")
    ws.close()


def test_ws_v5_stdin_close(server: StreamingServer) -> None:
    ws = WsClient(exec_url(server, "cat", stdin=True, stderr=False), ["v5.channel.k8s.io"])
    ws.send(0, b"line one\n")
    assert ws.wait_for(1, b"line one\n") == b"line one\n"
    ws.send_raw(bytes([0xFF, 0]))                      # v5 CLOSE stdin: cat ends
    assert ws.wait_closed()
    assert json.loads(ws.channel(3)) == {"metadata": {}, "status": "Success"}
    assert ws.close_code == 1000
    ws.close()


def test_ws_resize(server: StreamingServer) -> None:
    ws = WsClient(exec_url(server, "resize", "1", tty=True, stderr=False),
                  ["v4.channel.k8s.io"])
    ws.send(4, b'{"Width":200,"Height":60}')
    assert ws.wait_closed()
    assert json.loads(ws.channel(1)) == [[200, 60]]
    ws.close()


# -- port forward ------------------------------------------------------------------------------
def test_spdy_port_forward(server: StreamingServer, fake: FakeBackends,
                           echo: EchoServer) -> None:
    fake.ports = {8080: echo.port, 81: closed_port()}
    c = SpdyClient.connect(server.port_forward_url("sb1", []), ["portforward.k8s.io"])
    assert c.protocol == "portforward.k8s.io"
    pairs = []
    for rid in range(3):
        err = c.open({"streamtype": "error", "port": "8080", "requestid": str(rid)})
        err.close()
        data = c.open({"streamtype": "data", "port": "8080", "requestid": str(rid)})
        pairs.append((err, data))
    for rid, (_, data) in enumerate(pairs):
        data.write(f"ping {rid}\n".encode())
    for rid, (_, data) in enumerate(pairs):
        assert data.read_until(f"ping {rid}\n".encode()) == f"ping {rid}\n".encode()
    assert wait(lambda: echo.open == 3)
    for err, data in pairs:
        data.close()                               # local EOF: the echo server closes
        assert data.read_all() == data.read_until(b"")
        assert err.read_all() == b""
    assert wait(lambda: echo.open == 0)
    # a closed port: the text on the error stream, then FIN on both
    err = c.open({"streamtype": "error", "port": "81", "requestid": "7"})
    err.close()
    data = c.open({"streamtype": "data", "port": "81", "requestid": "7"})
    text = err.read_all()
    assert text.startswith(b"error forwarding port 81 to pod sb1, uid : ")
    assert b"refused" in text.lower()
    assert data.read_all() == b""
    # bad streams are refused
    assert c.open({"streamtype": "data", "port": "0", "requestid": "9"}).refused
    assert c.open({"streamtype": "stdin", "port": "80", "requestid": "9"}).refused
    assert c.open({"streamtype": "data", "port": "x", "requestid": "9"}).refused
    c.close()
    assert wait(lambda: server.session_count() == 0)


def test_spdy_port_forward_unpaired_times_out(server: StreamingServer) -> None:
    c = SpdyClient.connect(server.port_forward_url("sb1", [80]), ["portforward.k8s.io"])
    err = c.open({"streamtype": "error", "port": "80", "requestid": "0"})
    assert err.read_all(timeout=6).endswith(b"timed out waiting for streams")
    c.close()


def test_ws_port_forward(server: StreamingServer, fake: FakeBackends, echo: EchoServer) -> None:
    fake.ports = {8080: echo.port, 81: closed_port()}
    for proto in ["v4.channel.k8s.io", "v4.base64.channel.k8s.io", None]:
        ws = WsClient(server.port_forward_url("sb1", [8080, 81]), [proto] if proto else None)
        assert ws.status == 101
        prefix80, prefix81 = (8080).to_bytes(2, "little"), (81).to_bytes(2, "little")
        assert ws.wait_for(3, b"error forwarding port 81 to pod sb1, uid : ")
        assert ws.messages[:4] == [(0, prefix80), (1, prefix80), (2, prefix81), (3, prefix81)]
        ws.send(0, b"over websocket")
        assert ws.wait_for(0, b"over websocket") == prefix80 + b"over websocket"
        assert echo.open == 1
        ws.close()
        assert wait(lambda: echo.open == 0 and server.session_count() == 0)


def test_spdy_port_forward_tunnelled_in_websocket(server: StreamingServer, fake: FakeBackends,
                                                  echo: EchoServer) -> None:
    """crictl v1.36 --transport websocket: SPDY frames inside binary messages."""
    fake.ports = {8080: echo.port, 81: closed_port()}
    ws, c = tunnel_client(server.port_forward_url("sb1", []))
    assert ws.subprotocol == "SPDY/3.1+portforward.k8s.io"
    c.open({"streamtype": "error", "port": "8080", "requestid": "0"}).close()
    data = c.open({"streamtype": "data", "port": "8080", "requestid": "0"})
    payload = os.urandom(200_000)
    data.write(payload)
    assert wait(lambda: len(data.read_until(b"\0" * 64, 0.1)) >= len(payload))
    assert data.read_until(b"") == payload
    err = c.open({"streamtype": "error", "port": "81", "requestid": "1"})
    err.close()
    c.open({"streamtype": "data", "port": "81", "requestid": "1"})
    assert err.read_all().startswith(b"error forwarding port 81 to pod sb1, uid : ")
    ws.close()
    assert wait(lambda: echo.open == 0 and server.session_count() == 0)
    c.close()


def test_ws_port_forward_ends_when_ports_end(server: StreamingServer,
                                            fake: FakeBackends) -> None:
    fake.ports = {81: closed_port()}
    ws = WsClient(server.port_forward_url("sb1", [81]), ["v4.channel.k8s.io"])
    assert ws.wait_closed()
    assert ws.close_code == 1000
    assert b"refused" in ws.channel(1).lower()
    ws.close()


# -- bounds and leaks ------------------------------------------------------------------------
def test_max_connections(fake: FakeBackends) -> None:
    srv = StreamingServer(fake, max_connections=1)
    srv.start()
    try:
        c = SpdyClient.connect(exec_url(srv, "sleep", stderr=False), [V4])
        exec_streams(c, stdin=False, stdout=True, stderr=False, tty=False)
        url = exec_url(srv, "echo", "a", "b", "0")
        r = http_request(url, "POST", spdy_headers([V4]))
        assert r.status == 503
        c.close()
        assert wait(lambda: srv.session_count() == 0)
        assert run_spdy_exec(url, [V4])["stdout"] == b"a"     # token was not spent
    finally:
        srv.stop()


def test_idle_timeout(fake: FakeBackends) -> None:
    srv = StreamingServer(fake, idle_timeout=1.0)
    srv.start()
    try:
        c = SpdyClient.connect(srv.attach_url("vm1", tty=False, stdin=False, stdout=True,
                                              stderr=False), [V4])
        exec_streams(c, stdin=False, stdout=True, stderr=False, tty=False)
        assert wait(lambda: fake.gone_seen == ["attach"], 5)
        assert c.wait_closed(5)
        c.close()
    finally:
        srv.stop()


def test_client_that_stops_reading_is_cut_off_by_idle_timeout(fake: FakeBackends) -> None:
    """A client alive but not reading: the writer blocks in send, nothing moves, the idle
    timeout ends the session and the blocked writer returns."""
    srv = StreamingServer(fake, idle_timeout=1.0)
    srv.start()
    try:
        c = SpdyClient.connect(exec_url(srv, "big", "2000", stderr=False), [V4])
        st = exec_streams(c, stdin=False, stdout=True, stderr=False, tty=False)
        assert wait(lambda: fake.running == 1)
        assert st["stdout"].read_until(b"x") != b""      # output flows...
        c.reading.clear()                                 # ...then the client stops reading
        t0 = time.monotonic()
        assert wait(lambda: fake.running == 0 and srv.session_count() == 0, 15)
        assert time.monotonic() - t0 < 8
        c.close()
        assert len(st["stdout"].read_all()) < 2000 * 65536
    finally:
        srv.stop()


def test_stop_ends_sessions(fake: FakeBackends) -> None:
    """Even one whose reader waits on a full stdin pipe (the backend never reads stdin)."""
    srv = StreamingServer(fake)
    srv.start()
    c = SpdyClient.connect(srv.exec_url("c1", ["sleep"], tty=False, stdin=True, stdout=True,
                                        stderr=False), [V4])
    st = exec_streams(c, stdin=True, stdout=True, stderr=False, tty=False)
    assert wait(lambda: fake.running == 1)

    def flood() -> None:
        with contextlib.suppress(OSError):
            for _ in range(48):
                st["stdin"].write(b"y" * 65536)
    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    time.sleep(1)
    t0 = time.monotonic()
    srv.stop()
    assert time.monotonic() - t0 < 5
    assert fake.gone_seen == ["exec"] and srv.session_count() == 0
    assert c.wait_closed()
    c.close()


@pytest.mark.parametrize("transport", ["spdy", "ws", "spdy-pf", "ws-pf", "tunnel-pf"])
def test_client_vanishing_mid_stream_leaks_nothing(fake: FakeBackends, echo: EchoServer,
                                                    transport: str) -> None:
    fake.ports = {8080: echo.port}
    srv = StreamingServer(fake)
    srv.start()
    try:
        # one warm-up round so lazily created objects (logging, codecs) are not counted
        assert run_spdy_exec(exec_url(srv, "echo", "a", "b", "0"), [V4])["stdout"] == b"a"
        assert wait(lambda: srv.session_count() == 0)
        threads, fds = threading.active_count(), open_fds()
        for _ in range(3):
            if transport == "spdy":
                c = SpdyClient.connect(exec_url(srv, "sleep", stdin=True, stderr=False), [V4])
                st = exec_streams(c, stdin=True, stdout=True, stderr=False, tty=False)
                st["stdin"].write(b"typing")
                assert wait(lambda: fake.running == 1)
                c.sock.shutdown(socket.SHUT_RDWR)
                c.close()
            elif transport == "ws":
                ws = WsClient(exec_url(srv, "sleep", stdin=True, stderr=False),
                              ["v5.channel.k8s.io"])
                assert wait(lambda: fake.running == 1)
                ws.drop()
            elif transport == "spdy-pf":
                c = SpdyClient.connect(srv.port_forward_url("sb1", []), ["portforward.k8s.io"])
                c.open({"streamtype": "error", "port": "8080", "requestid": "0"}).close()
                d = c.open({"streamtype": "data", "port": "8080", "requestid": "0"})
                d.write(b"x")
                assert d.read_until(b"x") == b"x"
                c.sock.shutdown(socket.SHUT_RDWR)
                c.close()
            elif transport == "tunnel-pf":
                ws, c = tunnel_client(srv.port_forward_url("sb1", []))
                c.open({"streamtype": "error", "port": "8080", "requestid": "0"}).close()
                d = c.open({"streamtype": "data", "port": "8080", "requestid": "0"})
                d.write(b"x")
                assert d.read_until(b"x") == b"x"
                ws.drop()
                c.close()
            else:
                ws = WsClient(srv.port_forward_url("sb1", [8080]), ["v4.channel.k8s.io"])
                ws.send(0, b"x")
                assert ws.wait_for(0, b"x").endswith(b"x")
                ws.drop()
            assert wait(lambda: srv.session_count() == 0 and fake.running == 0
                        and echo.open == 0)
        assert wait(lambda: threading.active_count() <= threads), \
            f"threads: {threads} before, {threading.active_count()} after"
        assert wait(lambda: open_fds() <= fds), f"fds: {fds} before, {open_fds()} after"
        if transport in ("spdy", "ws"):
            assert fake.gone_seen == ["exec"] * 3
        else:
            assert echo.accepted == 3
    finally:
        srv.stop()


# -- the real client: docker/spdystream, as client-go ---------------------------------------
def go_client(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(spdyclient()), *args], input=stdin, capture_output=True,
                          timeout=60)


def test_go_spdystream_exec(server: StreamingServer) -> None:
    r = go_client("exec", exec_url(server, "echo", "hello go", "to stderr", "3"),
                  ",".join(["v5.channel.k8s.io", *RC_OFFER]), "0", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello go"
    assert r.stderr.startswith(b"to stderr")
    assert b"PROTOCOL: v4.channel.k8s.io\n" in r.stderr
    status = json.loads(r.stderr.split(b"ERROR: ", 1)[1])
    assert status["reason"] == "NonZeroExitCode"
    assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]
    # the Go client opens stderr whenever there is no tty: the request asks for it too
    cat = go_client("exec", exec_url(server, "cat", stdin=True), V4, "1", "0",
                    stdin=b"through spdystream\n" * 1000)
    assert cat.returncode == 0, cat.stderr
    assert cat.stdout == b"through spdystream\n" * 1000
    assert b'ERROR: {"metadata":{},"status":"Success"}' in cat.stderr


def test_go_spdystream_tty_v3(server: StreamingServer) -> None:
    url = exec_url(server, "cat", tty=True, stdin=True, stderr=False)
    r = go_client("exec", url, "v3.channel.k8s.io", "1", "1", stdin=b"typed\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"typed\n"
    assert b"PROTOCOL: v3.channel.k8s.io\nERROR: \n" in r.stderr


def test_go_spdystream_port_forward(server: StreamingServer, fake: FakeBackends,
                                    echo: EchoServer) -> None:
    fake.ports = {8080: echo.port, 81: closed_port()}
    payload = os.urandom(300_000)
    r = go_client("portforward", server.port_forward_url("sb1", []), "8080", stdin=payload)
    assert r.returncode == 0, r.stderr
    assert r.stdout == payload
    assert r.stderr == b"ERROR: \n"
    refused = go_client("portforward", server.port_forward_url("sb1", []), "81")
    assert refused.returncode == 0
    assert refused.stderr.startswith(b"ERROR: error forwarding port 81 to pod sb1, uid : ")
