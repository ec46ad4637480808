"""dhcp.stop returns only once the pod's dnsmasq has closed its sockets, so the next start
can bind port 67 at once (the fuzz campaign once restarted dnsmasq while the old one, its
/proc cmdline already empty, still held the port: "Address already in use"); and it never
signals a process that merely has the pid the file names."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from arktos_vm_runtime.adapters import dhcp

# Holds a UDP port and 768 MiB of touched memory; on SIGTERM waits 0.3 s, then exits. The
# kernel frees the memory after /proc/PID/cmdline has gone empty and before it closes the
# socket: the window in which the old stop() returned too early.
SLOW_EXIT = """
import os, signal, socket, sys, time
ballast = b"\\x01" * (768 << 20)
def term(*_):
    time.sleep(0.3)
    os._exit(0)
signal.signal(signal.SIGTERM, term)  # before the port is printed: the test then signals
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
sys.stdout.write(str(s.getsockname()[1]) + "\\n"); sys.stdout.flush()
while True:
    time.sleep(1)
"""


def _fake_dnsmasq(netdir: Path) -> tuple[subprocess.Popen[str], int]:
    """A process whose argv reads as this pod's dnsmasq, holding a UDP port."""
    conf = f"--conf-file={netdir / dhcp.CONF_NAME}"
    p = subprocess.Popen(["bash", "-c", f'exec -a {dhcp.DNSMASQ} "$0" -c "$1" "$2"',
                          sys.executable, SLOW_EXIT, conf], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    port = int(p.stdout.readline())
    (netdir / dhcp.PID_NAME).write_text(f"{p.pid}\n")
    return p, port


def test_stop_waits_until_the_port_is_free(tmp_path: Path) -> None:
    p, port = _fake_dnsmasq(tmp_path)
    assert dhcp.running(tmp_path)
    started = time.monotonic()
    dhcp.stop(tmp_path)
    took = time.monotonic() - started
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind(("127.0.0.1", port))  # no SO_REUSEADDR: fails while the old one holds it
    finally:
        s.close()
    assert took >= 0.3, took  # it did wait for the slow exit
    assert p.wait(timeout=5) == 0
    assert not (tmp_path / dhcp.PID_NAME).exists()
    dhcp.stop(tmp_path)  # again: nothing to do


def test_stop_leaves_a_process_that_reused_the_pid_alone(tmp_path: Path) -> None:
    other = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / dhcp.PID_NAME).write_text(f"{other.pid}\n")
        dhcp.stop(tmp_path)
        time.sleep(0.1)
        assert other.poll() is None, "a process that is not this pod's dnsmasq was signalled"
        assert not (tmp_path / dhcp.PID_NAME).exists()
    finally:
        other.kill()
        other.wait()


def test_stop_of_an_unknown_pid(tmp_path: Path) -> None:
    (tmp_path / dhcp.PID_NAME).write_text("4194303\n")  # above any pid in use here
    dhcp.stop(tmp_path)
    assert not os.path.exists(tmp_path / dhcp.PID_NAME)
