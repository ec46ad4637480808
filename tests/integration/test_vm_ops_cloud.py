"""ExecSync, Exec (its backend on the real agent, and end to end over the streaming server),
Attach, PortForward, stats, RebootVM and StopContainer on the Debian cloud guest
(qemu-guest-agent inside): one guest booted for the module, every check on it (the VM is
rebooted and stopped last). Minutes under TCG: marked slow.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from arktos_vm_runtime.adapters.guest_agent import GuestAgent
from arktos_vm_runtime.adapters.libvirt_conn import LibvirtConnection
from arktos_vm_runtime.adapters.libvirt_domains import Domains
from arktos_vm_runtime.errors import Cancelled
from arktos_vm_runtime.service.guest_exec_stream import GuestExecStream
from arktos_vm_runtime.service.stream_io import InputPipe, StreamIO
from tests.daemon_proc import APIS, Daemon
from tests.go_client import spdyclient
from tests.guest.images import cloud_guest_image
from tests.integration.console_pty import PtyConsole
from tests.integration.daemon_records import DaemonRecords
from tests.integration.vm_ops_common import StateWatch, VmPod, code_of, vm_pod
from tests.integration.vmpods import (
    log_text,
    require_libvirtd,
    wait_for,
)
from tests.ws_client import WsClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BOOT_TIMEOUT = 400
KERNEL_LINE = "Linux version"  # the kernel's first console line (console=ttyS0)


@dataclass
class Guest:
    d: Daemon
    sid: str
    cid: str
    log: Path


def _exec(g: Guest, argv: list[str], timeout: int = 10, api: str = "v1alpha2") -> object:
    pb, _ = APIS[api]
    return g.d.runtime(api).ExecSync(pb.ExecSyncRequest(container_id=g.cid, cmd=argv,
                                                        timeout=timeout), timeout=timeout + 30)


def _uptime(g: Guest) -> float | None:
    try:
        r = _exec(g, ["cat", "/proc/uptime"], 10)
    except grpc.RpcError:
        return None  # no agent answering (yet)
    return float(r.stdout.split()[0])  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def guest() -> Iterator[Guest]:
    require_libvirtd()

    def agent_up(p: VmPod) -> bool:
        return _uptime(Guest(p.d, p.sid, p.cid, p.log)) is not None

    with vm_pod(cloud_guest_image(), name="ops-cloud", memory_mib=512, ready=agent_up,
                ready_timeout=BOOT_TIMEOUT) as p:
        yield Guest(p.d, p.sid, p.cid, p.log)


@pytest.mark.parametrize("api", ["v1alpha2", "v1"])
def test_exec_output_exit_code_timeout_and_bound(guest: Guest, api: str) -> None:
    r = _exec(guest, ["uname", "-a"], api=api)
    assert r.exit_code == 0 and r.stdout.startswith(b"Linux ") and r.stderr == b""  # type: ignore[attr-defined]
    r = _exec(guest, ["sh", "-c", "echo out; echo err >&2; exit 3"], api=api)
    assert (r.exit_code, r.stdout, r.stderr) == (3, b"out\n", b"err\n")  # type: ignore[attr-defined]
    r = _exec(guest, ["true"], timeout=0, api=api)  # 0: no timeout
    assert r.exit_code == 0  # type: ignore[attr-defined]
    r = _exec(guest, ["no-such-program-here"], api=api)
    assert r.exit_code == 127, r  # type: ignore[attr-defined]
    # Output kept: 1 MiB per stream, the command still succeeds.
    r = _exec(guest, ["head", "-c", "3000000", "/dev/zero"], timeout=60, api=api)
    assert r.exit_code == 0 and len(r.stdout) == 1024 * 1024  # type: ignore[attr-defined]
    # The timeout: DEADLINE_EXCEEDED at about T, and the process group is gone in the guest.
    pb, _ = APIS[api]
    t0 = time.monotonic()
    code, details = code_of(lambda: guest.d.runtime(api).ExecSync(pb.ExecSyncRequest(
        container_id=guest.cid, cmd=["sh", "-c", "sleep 61 & sleep 62"], timeout=2),
        timeout=30))
    took = time.monotonic() - t0
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED, details
    assert 2 <= took < 6, took
    r = _exec(guest, ["sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"], api=api)
    assert b"sleep 61" not in r.stdout and b"sleep 62" not in r.stdout  # type: ignore[attr-defined]


@pytest.mark.parametrize("api", ["v1alpha2", "v1"])
def test_exec_over_the_streaming_server(guest: Guest, api: str) -> None:
    """Exec end to end: the RPC's URL, the daemon's streaming server, the guest agent; the
    Go client on spdystream (v4 status with the exit code) and a WebSocket client."""
    pb, _ = APIS[api]

    def url(cmd: list[str], stdin: bool = False) -> str:
        return str(guest.d.runtime(api).Exec(pb.ExecRequest(
            container_id=guest.cid, cmd=cmd, stdin=stdin, stdout=True, stderr=True),
            timeout=15).url)

    go = str(spdyclient())
    r = subprocess.run([go, "exec", url(["uname", "-a"]), "v4.channel.k8s.io", "0", "0"],
                       capture_output=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith(b"Linux "), r
    assert b'ERROR: {"metadata":{},"status":"Success"}' in r.stderr, r.stderr
    r = subprocess.run([go, "exec", url(["sh", "-c", "echo out; echo err >&2; exit 3"]),
                        "v4.channel.k8s.io", "0", "0"], capture_output=True, timeout=60)
    assert r.stdout == b"out\n" and r.stderr.startswith(b"err\n"), r
    status = json.loads(r.stderr.split(b"ERROR: ", 1)[1])
    assert status["reason"] == "NonZeroExitCode"
    assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]
    r = subprocess.run([go, "exec", url(["cat"], stdin=True), "v4.channel.k8s.io", "1", "0"],
                       input=b"through the agent\n", capture_output=True, timeout=60)
    assert r.stdout == b"through the agent\n", r
    ws = WsClient(url(["sh", "-c", "echo ws; exit 4"]), ["v4.channel.k8s.io"])
    try:
        assert ws.wait_closed(60)
        assert ws.channel(1) == b"ws\n"
        assert json.loads(ws.channel(3))["details"]["causes"][0]["message"] == "4"
    finally:
        ws.close()


# -- Exec's backend on the real guest agent, run in this process as the streaming server runs
# it (GuestExecStream over the GuestAgent adapter): output, exit codes, stdin handed over at
# spawn (guest-exec input-data), a tty's merged stderr, a client that goes away.

@dataclass
class AgentExec:
    cid: str
    ex: GuestExecStream


@pytest.fixture(scope="module")
def agent_exec(guest: Guest) -> AgentExec:
    records = DaemonRecords(guest.d.state_dir)
    agent = GuestAgent(Domains(LibvirtConnection("qemu:///system"),
                               records.setting("instance_id")))
    return AgentExec(guest.cid, GuestExecStream(records, agent))  # type: ignore[arg-type]


class Run:
    """One exec session: its writers, its result."""

    def __init__(self, g: AgentExec, argv: list[str], stdin: bytes | None = None,
                 tty: bool = False) -> None:
        self.out, self.err = bytearray(), bytearray()
        pipe = InputPipe() if stdin is not None else None
        self.io = StreamIO(pipe, self.out.extend, None if tty else self.err.extend, tty=tty)
        if pipe is not None and stdin is not None:
            pipe.feed(stdin)
            pipe.close()
        self.code: int | None = None
        self.error: BaseException | None = None
        self.t = threading.Thread(target=self._run, args=(g, argv), daemon=True)
        self.t.start()

    def _run(self, g: AgentExec, argv: list[str]) -> None:
        try:
            self.code = g.ex.exec(g.cid, argv, self.io)
        except BaseException as e:
            self.error = e

    def wait(self, timeout: float = 60) -> Run:
        self.t.join(timeout)
        assert not self.t.is_alive(), "exec did not return"
        return self


def test_output_and_exit_codes(agent_exec: AgentExec) -> None:
    r = Run(agent_exec, ["uname", "-a"]).wait()
    assert (r.error, r.code) == (None, 0) and r.out.startswith(b"Linux "), (r.error, r.out)
    r = Run(agent_exec, ["sh", "-c", "echo out; echo err >&2; exit 3"]).wait()
    assert (r.code, bytes(r.out), bytes(r.err)) == (3, b"out\n", b"err\n")
    r = Run(agent_exec, ["sh", "-c", "echo out; echo err >&2"], tty=True).wait()
    assert r.code == 0 and bytes(r.out) == b"out\nerr\n", "a tty's stderr follows stdout"
    r = Run(agent_exec, ["no-such-program-here"]).wait()
    assert r.code == 127 and b"no-such-program-here" in r.err, (r.code, r.err)


def test_stdin_is_handed_to_the_command(agent_exec: AgentExec) -> None:
    r = Run(agent_exec, ["cat"], stdin=b"hello\nworld\n").wait()
    assert (r.code, bytes(r.out)) == (0, b"hello\nworld\n"), r.error
    big = bytes(range(256)) * 256  # 64 KiB (the bound), every byte value
    t0 = time.monotonic()
    r = Run(agent_exec, ["sha256sum"], stdin=big).wait()
    took = time.monotonic() - t0
    assert r.code == 0, r.error
    assert r.out.split()[0].decode() == hashlib.sha256(big).hexdigest()
    print(f"64 KiB of stdin through the agent: {took:.2f} s")
    assert took < 8, "well inside the agent command's 10 s"


def test_a_client_that_goes_away_gets_its_command_killed(agent_exec: AgentExec) -> None:
    r = Run(agent_exec, ["sh", "-c", "sleep 987 & sleep 986"])
    time.sleep(3)
    assert r.t.is_alive()
    r.io.gone.set()
    r.wait(30)
    assert isinstance(r.error, Cancelled), r.error
    probe = Run(agent_exec, ["sh", "-c", "ps -eo args | grep -c '^sleep 98[67]$' || true"]).wait()
    assert probe.code == 0 and probe.out.strip() == b"0", probe.out


def test_attach_sees_the_login_prompt_and_types_a_line(guest: Guest) -> None:
    """kubectl attach to the Debian guest's serial console (a getty on ttyS0) by WebSocket:
    an Enter brings the login prompt, a typed user name is echoed by the guest's tty and
    the password prompt follows; the CRI log gets all of it; detaching leaves the VM up."""
    pb, _ = APIS["v1"]
    url = guest.d.runtime("v1").Attach(pb.AttachRequest(
        container_id=guest.cid, stdin=True, stdout=True, tty=True), timeout=15).url
    ws = WsClient(url, ["v4.channel.k8s.io"])
    try:
        for _ in range(20):  # a getty may be restarting; each Enter asks again
            ws.send(0, b"\r")
            if b"login: " in ws.wait_for(1, b"login: ", 3):
                break
        assert b"login: " in ws.channel(1), ws.channel(1)[-500:]
        seen = len(ws.channel(1))
        ws.send(0, b"avr-attach-user\r")
        out = ws.wait_for(1, b"Password: ", 30)
        assert b"avr-attach-user" in out[seen:] and b"Password: " in out[seen:], out[-500:]
        ws.send(0, b"\r")  # an empty password: "Login incorrect", the getty goes on
    finally:
        ws.close()
    wait_for("the typed name in the CRI log", lambda: "avr-attach-user" in log_text(guest.log),
             20)
    assert _uptime(guest) is not None, "the VM runs on after the attacher left"


def test_node_console_shows_the_login_prompt_and_sends_a_line(guest: Guest) -> None:
    """`arktos-vm-runtime console POD` on a node, under a pty: the Debian guest's getty
    answers an Enter with its login prompt, a typed name is echoed and the password prompt
    follows; Ctrl-] detaches and the VM runs on."""
    con = PtyConsole(guest.d.socket, "ops-cloud")
    try:
        con.read_until("escape character is ^]", 30)
        for _ in range(20):  # each Enter asks again (a getty may be restarting)
            con.type(b"\r")
            try:
                con.read_until("login: ", 3)
                break
            except AssertionError:
                pass
        seen = len(con.read_until("login: ", 1))
        con.type(b"avr-node-console\r")
        con.read_until("Password: ", 30)
        assert "avr-node-console" in con.out.decode(errors="replace")[seen:]
        con.type(b"\r")
        con.type(b"\x1d")
        assert con.proc.wait(15) == 0
    finally:
        con.close()
    wait_for("the typed name in the CRI log", lambda: "avr-node-console" in log_text(guest.log),
             20)
    assert _uptime(guest) is not None


def test_port_forward_to_a_server_in_the_debian_guest(guest: Guest) -> None:
    """PortForward into a cloud-init guest: its route back to the pod namespace came from
    the seed's network-config (rendered by cloud-init for systemd-networkd, "via 0.0.0.0")
    and python3's http.server, started through the agent, answers the Go client."""
    r = _exec(guest, ["ip", "-4", "route", "show", "169.254.253.1"])
    assert b"169.254.253.1 dev " in r.stdout, r  # type: ignore[attr-defined]
    r = _exec(guest, ["sh", "-c", "mkdir -p /run/pf && echo CLOUD-GUEST-PAGE >/run/pf/index.html"
                      " && cd /run/pf && (setsid python3 -m http.server 8080 >/dev/null 2>&1 &)"])
    assert r.exit_code == 0, r  # type: ignore[attr-defined]
    pb, _ = APIS["v1"]
    url = guest.d.runtime("v1").PortForward(pb.PortForwardRequest(
        pod_sandbox_id=guest.sid, port=[8080]), timeout=15).url
    got = b""
    for _ in range(30):  # the server takes a moment to listen
        out = subprocess.run([str(spdyclient()), "portforward", url, "8080"],
                             input=b"GET /index.html HTTP/1.0\r\n\r\n", capture_output=True,
                             timeout=60)
        got = out.stdout
        if got:
            break
        assert b"refused" in out.stderr, out.stderr
        time.sleep(1)
        url = guest.d.runtime("v1").PortForward(pb.PortForwardRequest(
            pod_sandbox_id=guest.sid, port=[8080]), timeout=15).url
    assert got.startswith(b"HTTP/1.0 200") and got.endswith(b"CLOUD-GUEST-PAGE\n"), got[-300:]
    _exec(guest, ["pkill", "-f", "http.server 8080"])


def _stats(g: Guest) -> object:
    pb, _ = APIS["v1"]
    return g.d.runtime("v1").ContainerStats(pb.ContainerStatsRequest(container_id=g.cid),
                                            timeout=15).stats


def test_stats_move_when_the_guest_burns_cpu_and_fills_memory(guest: Guest) -> None:
    """CPU time grows by about what a busy loop in the guest burned; the working set (the
    guest's own figure through the balloon driver, refreshed every 10 s) grows by what a
    tmpfs file pins and falls back when it is removed."""
    s0 = _stats(guest)
    _exec(guest, ["sh", "-c", "end=$(($(date +%s) + 4)); "
                  "while [ $(date +%s) -lt $end ]; do :; done"], timeout=30)
    s1 = _stats(guest)
    burned = s1.cpu.usage_core_nano_seconds.value - s0.cpu.usage_core_nano_seconds.value  # type: ignore[attr-defined]
    assert burned >= 2 * 10**9, f"{burned} ns of CPU over a 4 s busy loop"
    ws0 = s1.memory.working_set_bytes.value  # type: ignore[attr-defined]
    avail0 = s1.memory.available_bytes.value  # type: ignore[attr-defined]
    fill = 200 * 2**20
    r = _exec(guest, ["sh", "-c", "head -c 200M /dev/zero > /dev/shm/avr-fill"], timeout=60)
    assert r.exit_code == 0, r  # type: ignore[attr-defined]
    try:
        grown = wait_for("the working set to grow by the 200 MiB file",
                         lambda: (s := _stats(guest)).memory.working_set_bytes.value  # type: ignore[attr-defined]
                         >= ws0 + fill * 3 // 4 and s, 60, every=2)
        assert grown.memory.available_bytes.value <= avail0 - fill * 3 // 4  # type: ignore[attr-defined]
    finally:
        _exec(guest, ["rm", "-f", "/dev/shm/avr-fill"])
    wait_for("the working set to fall back", lambda: _stats(guest).memory.working_set_bytes  # type: ignore[attr-defined]
             .value <= ws0 + fill // 4, 60, every=2)


def _reboot_and_check(guest: Guest, spec: dict[str, int]) -> float:
    """Reboots with `spec`; checks uptime, console and RUNNING all along; returns the
    seconds from the call to the new kernel's first console line."""
    pb, _ = APIS["v1alpha2"]
    rt = guest.d.runtime("v1alpha2")
    before = rt.ContainerStatus(pb.ContainerStatusRequest(container_id=guest.cid),
                                timeout=10).status
    boots = log_text(guest.log).count(KERNEL_LINE)
    assert boots >= 1
    with StateWatch(guest.d, guest.cid, every=0.2) as watch:
        t0 = time.monotonic()
        rt.RebootVM(pb.RebootVMRequest(vm_id=guest.cid, rebootSpec=pb.VmRebootSpec(**spec)),
                    timeout=30)
        called = time.monotonic()
        if spec.get("delayInSeconds"):
            assert called - t0 < 2, "a delayed reboot returns at once"
            code, details = code_of(lambda: rt.RebootVM(pb.RebootVMRequest(
                vm_id=guest.cid), timeout=30))
            assert code == grpc.StatusCode.FAILED_PRECONDITION, details
        wait_for("the new kernel on the console",
                 lambda: log_text(guest.log).count(KERNEL_LINE) == boots + 1, BOOT_TIMEOUT)
        to_console = time.monotonic() - t0
        up = wait_for("the agent after the reboot",
                      lambda: (u := _uptime(guest)) is not None and u < time.monotonic() - t0
                      and u, BOOT_TIMEOUT, every=2)
    print(f"reboot {spec}: console after {to_console:.1f} s, uptime {up:.1f} s")
    assert watch.seen == ["CONTAINER_RUNNING"], watch.seen
    after = rt.ContainerStatus(pb.ContainerStatusRequest(container_id=guest.cid),
                               timeout=10).status
    assert after.started_at == before.started_at
    return to_console


def test_reboot_resets_uptime_and_the_console_goes_on(guest: Guest) -> None:
    old = log_text(guest.log)
    _reboot_and_check(guest, {})  # default: libvirt picks the agent
    new = log_text(guest.log)
    assert len(new) > len(old) and new.startswith(old), "the log goes on in the same file"


def test_delayed_guest_agent_reboot(guest: Guest) -> None:
    _reboot_and_check(guest, {"delayInSeconds": 3, "domainRebootFlag": 2})


def test_stop_with_an_agent_returns_within_its_timeout(guest: Guest) -> None:
    pb, _ = APIS["v1"]
    rt = guest.d.runtime("v1")
    timeout = 20
    t0 = time.monotonic()
    rt.StopContainer(pb.StopContainerRequest(container_id=guest.cid, timeout=timeout),
                     timeout=timeout)
    took = time.monotonic() - t0
    st = rt.ContainerStatus(pb.ContainerStatusRequest(container_id=guest.cid),
                            timeout=10).status
    print(f"Stop({timeout}) of the Debian guest took {took:.1f} s: {st.reason} "
          f"exit {st.exit_code}")
    assert st.state == pb.CONTAINER_EXITED
    code, details = code_of(lambda: _exec(guest, ["true"], api="v1"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "not running" in details
