"""Shared pieces of the VM pod tests: a loopback image server, libvirtd, pod configs."""

from __future__ import annotations

import functools
import http.server
import os
import re
import socket
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from arktos_vm_runtime.adapters import vmnet
from tests.daemon_proc import Daemon
from tests.integration.test_network_common import (
    PLUGINS,
    CniTestNet,
    ipj,
    link_names,
    note_made,
)

CRI_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z stdout [FP] .*$")


def require_libvirtd() -> None:
    r = subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True,
                       text=True)
    assert r.returncode == 0, (
        "these tests need a running libvirtd with QEMU (tools/setup starts one): "
        + r.stderr.strip())


@contextmanager
def image_server(files: dict[str, Path]) -> Iterator[str]:
    """Serves the given files on 127.0.0.1; yields 'host:port'."""
    root = Path(next(iter(files.values()))).parent
    for name, path in files.items():
        assert path.parent == root, "serve files from one directory"
        assert path.name == name

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                          functools.partial(Quiet, directory=str(root)))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def log_text(path: Path) -> str:
    """The file's text as written: bytes decoded without newline translation (read_text
    turns a lone '\r', which a console line may hold, into '\n' and so cuts a record)."""
    return path.read_bytes().decode(errors="replace") if path.exists() else ""


def cri_records(text: str) -> list[str]:
    """A CRI log's complete records: split on '\n' only, as the kubelet reads them. A record
    may hold a lone '\r' (a boot spinner redrawing its line), which str.splitlines() would
    cut. Text after the last '\n' is a record still being written while the VM prints (a
    reader can see part of a write in progress); like the kubelet, leave it for later."""
    return text.split("\n")[:-1]


def bad_cri_records(text: str) -> list[str]:
    """The complete records not in the CRI format, for an assertion's message."""
    return [r for r in cri_records(text) if not CRI_LINE.match(r)]


def domain_names() -> list[str]:
    r = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
                       capture_output=True, text=True, check=True)
    return [n for n in r.stdout.split() if n]


#: Every pod UID (= sandbox id) this test process handed out: the leak checks count the
#: namespaces and taps named after these only, so another runtime instance on the same host
#: never fails them, while every object of our own pods is still counted.
ISSUED_UIDS: set[str] = set()


def own_netns_names() -> set[str]:
    """The pod namespaces on the host that belong to pods of this test process."""
    try:
        names = os.listdir("/run/netns")
    except FileNotFoundError:
        return set()
    return {n for n in names if n.startswith("avr-") and n[4:] in ISSUED_UIDS}


def own_taps(links: set[str]) -> set[str]:
    """The taps among `links` derived from a sandbox id of this test process."""
    prefixes = tuple(vmnet.tap_name(uid, 0)[:-1] for uid in ISSUED_UIDS)
    return {n for n in links if prefixes and n.startswith(prefixes)}


def sandbox_config(pb: Any, log_dir: Path, annotations: dict[str, str] | None = None,
                   name: str = "vm-pod") -> Any:
    uid = str(uuid.uuid4())
    ISSUED_UIDS.add(uid)
    note_made("uid", uid)
    md = pb.PodSandboxMetadata(name=name, uid=uid, namespace="default", attempt=0)
    if "tenant" in pb.PodSandboxMetadata.DESCRIPTOR.fields_by_name:
        md.tenant = "tenant-a"
    return pb.PodSandboxConfig(metadata=md, hostname=name, log_directory=str(log_dir),
                               labels={"app": "vm"}, annotations=annotations or {})


def container_config(pb: Any, image: str, memory_mib: int = 256,
                     envs: dict[str, str] | None = None) -> Any:
    return pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name="vm", attempt=0),
        image=pb.ImageSpec(image=image), log_path="vm/0.log", tty=True, stdin=True,
        labels={"role": "guest"},
        envs=[pb.KeyValue(key=k, value=v) for k, v in (envs or {}).items()],
        linux=pb.LinuxContainerConfig(resources=pb.LinuxContainerResources(
            cpu_period=100000, cpu_quota=100000,
            memory_limit_in_bytes=memory_mib * 2**20)))


def vm_runtime(tmp: Path, net: CniTestNet, *args: str) -> Daemon:
    """The daemon as the VM tests run it: real libvirtd, TCG, images over loopback http,
    the test CNI network (with the recording test plugin on the plugin path); `args` are
    more flags."""
    return Daemon(tmp, libvirt_uri="qemu:///system", cni_dir=net.conf_dir,
                  args=["--disable-kvm", "--image-download-protocol", "http",
                        "--cni-bin-dir", str(PLUGINS), *args])


def dnsmasq_of(state_dir: str) -> list[int]:
    """The dnsmasq processes serving pods of the daemon with this state directory."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "dnsmasq" in cmd and state_dir in cmd:
            pids.append(int(pid))
    return pids


def instance_leftovers(d: Daemon, net: CniTestNet, cids: list[str]) -> list[str]:
    """What this daemon instance made and has not removed, one 'kind what' each: domains
    (of these container ids), VM files (overlays, seed ISOs), network artefacts, pod
    namespaces and taps (of this test process's pods), veths on the test CNI bridge,
    dnsmasq processes, host-local addresses, and records in the store."""
    found: list[str] = []
    names = set(domain_names())
    found += [f"domain avr-{cid}" for cid in cids if f"avr-{cid}" in names]
    state = Path(d.state_dir)
    found += [f"vm file {f}" for f in (state / "vms").rglob("*")]
    found += [f"network artefact {f}" for f in (state / "networks").rglob("*")]
    found += [f"netns {n}" for n in own_netns_names()]
    found += [f"tap {n}" for n in own_taps(link_names())]
    probe_peer = f"avrpv{net.tag}"
    found += [f"veth {link['ifname']}" for link in ipj("link", "show", "master", net.bridge)
              if link["ifname"] != probe_peer]
    found += [f"dnsmasq pid {p}" for p in dnsmasq_of(d.state_dir)]
    found += [f"host-local lease {f}" for f in net.ip_files()]
    db = sqlite3.connect(f"file:{state}/state.db?mode=ro", uri=True)
    try:
        for table in ("sandboxes", "containers", "networks"):
            found += [f"{table} record {r[0]}"
                      for r in db.execute(f"SELECT id FROM {table}").fetchall()]
    finally:
        db.close()
    return found


def echo_line(sock: socket.socket, line: bytes) -> bytes:
    """Sends one line through an echo service (the minimal guest's port 7); what came back
    up to its newline."""
    sock.settimeout(20)
    sock.sendall(line)
    got = b""
    while not got.endswith(b"\n"):
        chunk = sock.recv(100)
        assert chunk, got
        got += chunk
    return got
