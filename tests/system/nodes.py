"""Booted Debian 12 nodes for the system tier: systemd-nspawn containers reached by ssh.

Each node is a copy of the cached root filesystem (tests/system/build-rootfs.sh) booted with
a real systemd as PID 1 (`systemd-nspawn --boot --register=no --keep-unit`). nspawn shares
the host's network namespace, so each node's sshd listens on its own loopback port; nothing
listens on any other address.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SSH_OPTIONS = [
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR",
    "-o", "BatchMode=yes",
    "-o", "ConnectTimeout=5",
]

# libvirt inside nspawn: the container's cgroup v1 hierarchies are read-only, so the test
# nodes' libvirt runs guests without cgroup controllers of its own (a bare-metal node's does
# not need this).
LIBVIRT_QEMU_CONF = (
    "\n# system test: cgroup v1 is read-only inside systemd-nspawn\ncgroup_controllers = [ ]\n"
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Node:
    def __init__(self, name: str, workdir: Path, key: Path) -> None:
        self.name = name
        self.dir = workdir / name
        self.root = self.dir / "root"
        self.key = key
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    # --- lifecycle ---------------------------------------------------------------------

    def prepare(self, rootfs: Path) -> None:
        self.dir.mkdir(parents=True)
        subprocess.run(["cp", "-a", "--reflink=auto", str(rootfs), str(self.root)], check=True)
        subprocess.run(["ssh-keygen", "-q", "-A", "-f", str(self.root)], check=True)
        ssh_dir = self.root / "root/.ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        shutil.copy(self.key.with_suffix(".pub"), ssh_dir / "authorized_keys")
        (self.root / "etc/ssh/sshd_config.d/10-system-test.conf").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\n"
        )
        (self.root / "etc/hostname").write_text(f"{self.name}\n")
        with (self.root / "etc/libvirt/qemu.conf").open("a") as f:
            f.write(LIBVIRT_QEMU_CONF)

    def boot(self) -> None:
        log = (self.dir / "console.log").open("wb")
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "--quiet", "--boot", "--register=no", "--keep-unit",
             "--console=read-only", "-M", self.name, "-D", str(self.root)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def wait_ssh(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: systemd-nspawn exited:\n{self.console()}")
            if self.ssh("true", check=False, timeout=10).returncode == 0:
                # sshd answers early; wait until boot has settled (degraded is fine for us).
                self.ssh("systemctl is-system-running --wait || true", timeout=120)
                return
            time.sleep(0.5)
        raise RuntimeError(f"{self.name}: no ssh on port {self.port}:\n{self.console()}")

    def request_poweroff(self) -> None:
        """Asks the node's systemd to power off at once, not waiting: forced, so its units
        are not stopped one by one (the node is thrown away; a clean stop of both nodes took
        a minute of every run). `shutdown` then waits for it."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                subprocess.run(self.ssh_argv("systemctl poweroff --force --no-block"),
                               capture_output=True, timeout=10, check=False)

    def shutdown(self, timeout: float = 60.0) -> None:
        """Powers the node off (SIGTERM makes nspawn ask systemd to), then removes it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        mounts = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True,
                                text=True, check=False).stdout.split()
        for m in sorted((m for m in mounts if m.startswith(str(self.root))), reverse=True):
            subprocess.run(["umount", "-l", m], check=False)
        shutil.rmtree(self.dir, ignore_errors=True)

    def console(self) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / "console.log").read_text(errors="replace")[-4000:]
        return ""

    # --- commands ----------------------------------------------------------------------

    def ssh_argv(self, command: str) -> list[str]:
        return ["ssh", *SSH_OPTIONS, "-i", str(self.key), "-p", str(self.port),
                "root@127.0.0.1", command]

    def ssh(self, command: str, check: bool = True,
            timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(self.ssh_argv(command), capture_output=True, text=True,
                           timeout=timeout, check=False)
        if check and r.returncode != 0:
            raise AssertionError(
                f"{self.name}: `{command}` exited {r.returncode}\n"
                f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
            )
        return r

    def out(self, command: str, timeout: float = 120.0) -> str:
        return self.ssh(command, timeout=timeout).stdout.strip()

    def prop(self, unit: str, name: str) -> str:
        return self.out(f"systemctl show -P {shlex.quote(name)} {shlex.quote(unit)}")

    def put(self, path: str, content: str) -> None:
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)

    def wait_for(self, command: str, timeout: float = 30.0, interval: float = 0.5) -> str:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.ssh(command, check=False)
            if last.returncode == 0:
                return last.stdout.strip()
            time.sleep(interval)
        raise AssertionError(f"{self.name}: `{command}` did not succeed in {timeout} s: {last}")
