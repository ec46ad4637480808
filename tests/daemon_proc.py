"""Runs the real daemon as a child process on a real unix socket, for tests and benches.

The daemon is started with its own NOTIFY_SOCKET so that tests can wait for READY=1 and
read every sd_notify message it sends.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc

from arktos_vm_runtime.api.gen.v1 import api_pb2 as v1
from arktos_vm_runtime.api.gen.v1 import api_pb2_grpc as v1_grpc
from arktos_vm_runtime.api.gen.v1alpha2 import api_pb2 as v1alpha2
from arktos_vm_runtime.api.gen.v1alpha2 import api_pb2_grpc as v1alpha2_grpc
from arktos_vm_runtime.config import DEFAULT_DENIED_NETWORKS

APIS: dict[str, tuple[ModuleType, ModuleType]] = {
    "v1alpha2": (v1alpha2, v1alpha2_grpc),
    "v1": (v1, v1_grpc),
}
PYTHON = sys.executable
#: The state directories of every daemon this test process started: the leak checks and
#: the cleanup after a failed test count only domains whose disks lie under one of them,
#: so another runtime instance on the same host (another test run, a real node) is never
#: counted or touched.
STATE_DIRS: set[str] = set()
#: The default denied networks less loopback: tests and benches serve their images on
#: 127.0.0.1, so their daemons allow loopback explicitly (tests/integration/
#: test_image_guard.py runs the daemon with the default list instead).
LOOPBACK_ALLOWED = ",".join(n for n in DEFAULT_DENIED_NETWORKS.split(",") if n != "127.0.0.0/8")


def rss_kb(pid: int) -> int:
    """A process's resident memory (VmRSS), in kB: the leak checks' measure."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    """How many file descriptors a process has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


class NotifyListener:
    """A real NOTIFY_SOCKET: a datagram socket collecting sd_notify messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[tuple[float, str]] = []

    def drain(self, timeout: float = 0.0) -> list[str]:
        """Reads what arrived; waits up to timeout for the first message."""
        got = []
        self.sock.settimeout(timeout if timeout > 0 else 0.001)
        while True:
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, BlockingIOError):
                break
            msg = data.decode()
            self.messages.append((time.monotonic(), msg))
            got.append(msg)
            self.sock.settimeout(0.001)
        return got

    def wait_for(self, needle: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        for _, m in self.messages:
            if needle in m:
                return m
        while time.monotonic() < deadline:
            for m in self.drain(min(0.5, deadline - time.monotonic())):
                if needle in m:
                    return m
        raise AssertionError(f"no sd_notify message with {needle!r} within {timeout} s; "
                             f"got {[m for _, m in self.messages]}")

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


class Daemon:
    def __init__(self, tmp: Path, args: Sequence[str] = (), env: dict[str, str] | None = None,
                 libvirt_uri: str = "test:///default", notify: bool = True,
                 cni_dir: Path | None = None, pod_logs: bool = True,
                 loopback_pulls: bool = True) -> None:
        self.tmp = tmp
        self.socket = str(tmp / "run" / "virtlet.sock")
        self.state_dir = str(tmp / "state")
        STATE_DIRS.add(self.state_dir)
        self.cni_dir = cni_dir or tmp / "cni"
        self.cni_dir.mkdir(exist_ok=True)
        self.log = tmp / "daemon.log"
        # Console logs go only below this directory (the kubelet's /var/log/pods);
        # pod_logs=False, loopback_pulls=False for a runtime without these settings (the
        # previous release); loopback_pulls=False also for the default denied networks.
        self.pod_logs = tmp / "pods"
        self.notify = NotifyListener(tmp / "notify.sock") if notify else None
        self.argv = [PYTHON, "-m", "arktos_vm_runtime", "serve", "--listen", self.socket,
                     "--state-dir", self.state_dir, "--libvirt-uri", libvirt_uri,
                     "--cni-conf-dir", str(self.cni_dir),
                     *(["--pod-logs-dir", str(self.pod_logs)] if pod_logs else []),
                     *(["--image-pull-denied-networks", LOOPBACK_ALLOWED]
                       if loopback_pulls else []), *args]
        self.env = dict(os.environ, **(env or {}))
        if self.notify:
            self.env["NOTIFY_SOCKET"] = str(self.notify.path)
        self.proc: subprocess.Popen[bytes] | None = None
        self._channel: grpc.Channel | None = None

    def start(self, wait: bool = True, timeout: float = 20.0) -> Daemon:
        self._logf = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self._logf,
                                     stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        if self.notify:
            try:
                self.notify.wait_for("READY=1", timeout)
                return
            except AssertionError:
                raise AssertionError(f"daemon not ready: {self.output()}") from None
        while time.monotonic() < deadline:
            if os.path.exists(self.socket):
                return
            assert self.proc and self.proc.poll() is None, self.output()
            time.sleep(0.05)
        raise AssertionError(f"daemon socket never appeared: {self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(f"unix:{self.socket}")
        return self._channel

    def runtime(self, api: str) -> Any:
        return APIS[api][1].RuntimeServiceStub(self.channel)

    def images(self, api: str) -> Any:
        return APIS[api][1].ImageServiceStub(self.channel)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        rc = 0
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = self.proc.wait()
        elif self.proc is not None:
            rc = self.proc.returncode
        if self.notify:
            self.notify.close()
        if hasattr(self, "_logf"):
            self._logf.close()
        return rc


def run_cli(*args: str, timeout: float = 30.0,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "arktos_vm_runtime", *args], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, **(env or {})))
