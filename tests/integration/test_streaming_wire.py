"""Attach, Exec and PortForward end to end: the CRI RPC over the daemon's socket, the URL it
returns, the daemon's streaming server, the VM behind it. One minimal (busybox) guest for
the module: it says back each line typed on its console as `MINIMAL-GUEST-ECHO <line>`
and has no guest agent; it serves a page on port 80 (busybox httpd) and TCP echo on port 7,
reached by PortForward from inside the pod's network namespace. Clients: the project's SPDY
client (tests/spdy_client.py), a `websockets` client (tests/ws_client.py) and the Go client
on spdystream (tests/go_client.py). Exec through a real agent end to end is in
test_vm_ops_cloud.py (Debian guest).
"""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests.daemon_proc import APIS, Daemon
from tests.go_client import spdyclient
from tests.integration.vm_ops_common import code_of, vm_pod
from tests.integration.vmpods import (
    log_text,
    wait_for,
)
from tests.spdy_client import SpdyClient, exec_streams, http_request
from tests.ws_client import WsClient

pytestmark = pytest.mark.integration
MARKER = "MINIMAL-GUEST-UP"
BOOT_TIMEOUT = 120
V4 = "v4.channel.k8s.io"


@dataclass
class Guest:
    d: Daemon
    sid: str
    cid: str
    log: Path


@pytest.fixture(scope="module")
def guest(served_minimal_image: str) -> Iterator[Guest]:
    # tty and stdin on the VM container, as the Arktos kubelet sets them
    with vm_pod(served_minimal_image, name="wire", api="v1", ready_timeout=BOOT_TIMEOUT) as p:
        yield Guest(p.d, p.sid, p.cid, p.log)


def attach_url(g: Guest, api: str) -> str:
    pb, _ = APIS[api]
    return g.d.runtime(api).Attach(pb.AttachRequest(
        container_id=g.cid, stdin=True, stdout=True, tty=True), timeout=15).url


def running(g: Guest) -> bool:
    pb, _ = APIS["v1"]
    st = g.d.runtime("v1").ContainerStatus(pb.ContainerStatusRequest(container_id=g.cid),
                                           timeout=15).status
    return bool(st.state == pb.CONTAINER_RUNNING)


@pytest.mark.parametrize("api", ["v1alpha2", "v1"])
def test_attach_two_clients_type_and_see_the_echo(guest: Guest, api: str) -> None:
    url = attach_url(guest, api)
    assert url.startswith("http://127.0.0.1:") and "/attach/" in url
    spdy = SpdyClient.connect(url, [V4])
    assert spdy.protocol == V4
    streams = exec_streams(spdy, stdin=True, stdout=True, stderr=True, tty=True)
    assert "stderr" not in streams  # a tty: stderr shares the console
    ws = WsClient(attach_url(guest, api), ["v5.channel.k8s.io"])
    try:
        word = secrets.token_hex(4)
        streams["stdin"].write(f"spdy-{word}\n".encode())
        want = f"MINIMAL-GUEST-ECHO spdy-{word}".encode()
        assert want in streams["stdout"].read_until(want), "the SPDY attacher sees the echo"
        assert want in ws.wait_for(1, want), "so does the WebSocket attacher"
        ws.send(0, f"ws-{word}\n".encode())
        want2 = f"MINIMAL-GUEST-ECHO ws-{word}".encode()
        assert want2 in streams["stdout"].read_until(want2)
        assert want2 in ws.wait_for(1, want2)
        # the log file receives everything, attached or not
        wait_for("both lines in the CRI log", lambda: f"spdy-{word}" in log_text(guest.log)
                 and f"ws-{word}" in log_text(guest.log), 10)
        streams["resize"].write(b'{"Width":100,"Height":40}\n')  # accepted, ignored
    finally:
        spdy.close()
        ws.close()
    assert running(guest), "detaching leaves the VM running"


def test_a_token_is_single_use(guest: Guest) -> None:
    url = attach_url(guest, "v1")
    first = WsClient(url, [V4])
    first.close()
    reply = http_request(url, headers=[("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1"),
                                       ("X-Stream-Protocol-Version", V4)])
    assert reply.status == 404
    bogus = url.rsplit("/", 1)[0] + "/AAAAAAAA"
    assert http_request(bogus).status == 404


def test_exec_without_a_guest_agent_is_a_clean_failure(guest: Guest) -> None:
    """The RPC hands out the URL (the VM runs); the session finds no agent and says so in
    the v4 status, to the Go client on spdystream, before reading any stdin."""
    pb, _ = APIS["v1"]
    url = guest.d.runtime("v1").Exec(pb.ExecRequest(
        container_id=guest.cid, cmd=["uname", "-a"], stdin=True, stdout=True, stderr=True),
        timeout=15).url
    r = subprocess.run([str(spdyclient()), "exec", url, V4, "1", "0"], input=b"unread\n",
                       capture_output=True, timeout=60)
    assert b"ERROR: " in r.stderr, r.stderr
    status = json.loads(r.stderr.split(b"ERROR: ", 1)[1])
    assert status["status"] == "Failure" and "guest agent" in status["message"], status
    assert running(guest)


PAGE = b"MINIMAL-GUEST-HTTP index\n"
GET = b"GET /index.html HTTP/1.0\r\nHost: guest\r\n\r\n"


def check_page(reply: bytes) -> None:
    assert reply.startswith(b"HTTP/1.") and b" 200 " in reply.split(b"\r\n")[0], reply[:200]
    assert reply.endswith(PAGE), reply[-200:]


def pf_url(g: Guest, api: str, ports: list[int]) -> str:
    pb, _ = APIS[api]
    return g.d.runtime(api).PortForward(pb.PortForwardRequest(
        pod_sandbox_id=g.sid, port=ports), timeout=15).url


@pytest.mark.parametrize("api", ["v1alpha2", "v1"])
def test_port_forward_fetches_the_guest_page_over_spdy(guest: Guest, api: str) -> None:
    """The guest's httpd (port 80) and TCP echo (port 7) through one SPDY connection:
    two ports, two streams on port 80 at once, and a closed port (81) reported on its
    error stream in the kubelet's words, naming the pod."""
    c = SpdyClient.connect(pf_url(guest, api, []), ["portforward.k8s.io"])
    try:
        pages = []
        for rid in ("0", "1"):
            c.open({"streamtype": "error", "port": "80", "requestid": rid}).close()
            pages.append(c.open({"streamtype": "data", "port": "80", "requestid": rid}))
        for data in pages:
            data.write(GET)
        for data in pages:
            check_page(data.read_all())
        c.open({"streamtype": "error", "port": "7", "requestid": "2"}).close()
        echo = c.open({"streamtype": "data", "port": "7", "requestid": "2"})
        payload = secrets.token_hex(4096).encode() + b"\n"
        echo.write(payload)
        assert echo.read_until(payload) == payload
        err = c.open({"streamtype": "error", "port": "81", "requestid": "3"})
        err.close()
        closed = c.open({"streamtype": "data", "port": "81", "requestid": "3"})
        text = err.read_all()
        assert text.startswith(f"error forwarding port 81 to pod {guest.sid}".encode()), text
        assert b"refused" in text, text
        assert closed.read_all() == b""
    finally:
        c.close()


def test_port_forward_by_websocket_and_the_go_client(guest: Guest) -> None:
    """The same page through WebSocket (v4.channel.k8s.io: channel 0 data, 1 error, each
    opened by the port number) and through client-go's SPDY library (spdystream)."""
    ws = WsClient(pf_url(guest, "v1", [80]), [V4])
    try:
        prefix = (80).to_bytes(2, "little")
        ws.wait_for(1, prefix)
        ws.send(0, GET)
        got = ws.wait_for(0, PAGE, 30)
        assert got.startswith(prefix)
        check_page(got[len(prefix):])
        assert ws.channel(1) == prefix, ws.channel(1)
    finally:
        ws.close()
    r = subprocess.run([str(spdyclient()), "portforward", pf_url(guest, "v1", [80]), "80"],
                       input=GET, capture_output=True, timeout=60)
    check_page(r.stdout)
    assert r.stderr.strip() == b"ERROR:", r.stderr


def test_attach_to_a_stopped_vm_is_refused(guest: Guest) -> None:
    """Last: stops the VM."""
    pb, _ = APIS["v1"]
    rt = guest.d.runtime("v1")
    ws = WsClient(attach_url(guest, "v1"), [V4])
    rt.StopContainer(pb.StopContainerRequest(container_id=guest.cid, timeout=0), timeout=60)
    assert ws.wait_closed(30), "the attach session ends when the VM stops"
    ws.close()
    for api in APIS:
        pbx, _ = APIS[api]
        code, details = code_of(lambda pbx=pbx, api=api: guest.d.runtime(api).Attach(  # type: ignore[misc]
            pbx.AttachRequest(container_id=guest.cid, stdin=True, stdout=True, tty=True),
            timeout=15))
        assert code == grpc.StatusCode.FAILED_PRECONDITION, (api, code, details)
    code, _ = code_of(lambda: rt.Attach(pb.AttachRequest(container_id="no-such", stdout=True),
                                        timeout=15))
    assert code == grpc.StatusCode.NOT_FOUND
