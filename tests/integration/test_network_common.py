"""A throwaway CNI network for the network tests: the real bridge + host-local plugins on a
bridge with no host address (isGateway false) and a subnet of 10.88.0.0/16 that lives only in
namespaces the tests create, plus a probe namespace attached to that bridge.
Needs root, iproute2, containernetworking-plugins and dnsmasq-base. Helpers only: no tests."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

PLUGINS = Path(__file__).resolve().parent / "cni_plugins"
CNI_BIN = "/usr/lib/cni"
__test__ = False  # helpers for test_network*.py; nothing here for pytest to collect


def sh(*argv: str, check: bool = True, netns: str | None = None) -> str:
    if netns is not None:
        argv = ("ip", "netns", "exec", netns, *argv)
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed: {r.stderr.strip()}")
    return r.stdout


def ipj(*args: str, netns: str | None = None) -> Any:
    pre = ["ip", "-n", netns] if netns else ["ip"]
    out = subprocess.run([*pre, "-j", *args], capture_output=True, text=True).stdout.strip()
    return json.loads(out) if out else []


def link_names(netns: str | None = None) -> set[str]:
    return {link["ifname"] for link in ipj("link", "show", netns=netns)}


def netns_names() -> set[str]:
    try:
        return set(os.listdir("/run/netns"))
    except FileNotFoundError:
        return set()


def require_root_tools() -> None:
    if os.geteuid() != 0:
        pytest.fail("the network tests need root (network namespaces, bridges, taps)")
    for tool in ("ip", "dnsmasq", f"{CNI_BIN}/bridge", f"{CNI_BIN}/host-local"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: install iproute2, dnsmasq-base and "
                        "containernetworking-plugins")


@dataclass
class CniTestNet:
    tag: str
    bridge: str  # the CNI bridge in the root namespace (no address)
    subnet: str  # 10.88.N.0/24
    prefix: str  # "10.88.N."
    conf_dir: Path
    ipam_dir: Path
    record_dir: Path
    probe: str  # probe namespace, 10.88.N.250 on the bridge
    root: Path  # scratch dir

    def conflist(self, *extra: dict[str, Any], gateway_route: bool = True,
                 record: bool = True) -> None:
        """bridge + host-local, then (with `record`) the recording test plugin and `extra`.
        The benches leave the recording plugin out: a Python start per ADD and DEL (about
        30 ms of CPU) is the tests' instrument, not a node's network."""
        ipam: dict[str, Any] = {
            "type": "host-local",
            "ranges": [[{"subnet": self.subnet, "rangeStart": f"{self.prefix}10",
                         "rangeEnd": f"{self.prefix}200", "gateway": f"{self.prefix}1"}]],
            "dataDir": str(self.ipam_dir),
        }
        if gateway_route:
            ipam["routes"] = [{"dst": "0.0.0.0/0"}]
        plugins = [
            {"type": "bridge", "bridge": self.bridge, "isGateway": False, "ipMasq": False,
             "hairpinMode": False, "ipam": ipam},
            *([{"type": "record", "recordDir": str(self.record_dir)}] if record else []),
            *extra,
        ]
        (self.conf_dir / "10-avrtest.conflist").write_text(json.dumps(
            {"cniVersion": "1.0.0", "name": f"avrtest-{self.tag}", "plugins": plugins}))

    def ip_files(self) -> list[str]:
        """host-local's files naming allocated addresses (not its lock or last_reserved)."""
        d = self.ipam_dir / f"avrtest-{self.tag}"
        if not d.exists():
            return []
        return sorted(p.name for p in d.iterdir() if p.name[0].isdigit())

    def calls(self) -> list[dict[str, Any]]:
        f = self.record_dir / "calls.jsonl"
        return [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []

    def ping(self, address: str, count: int = 3) -> str:
        return sh("busybox", "ping", "-c", str(count), "-W", "2", address, netns=self.probe)


#: When set (the bench smoke tests set it for the benches they run), a file to which the test
#: helpers append "KIND NAME" for each host object they make (netns, link, uid of a pod),
#: so a leak check in another process counts that process's objects only.
MADE_LOG = "AVR_TEST_MADE"


def note_made(kind: str, name: str) -> None:
    path = os.environ.get(MADE_LOG)
    if path:
        with open(path, "a") as f:
            f.write(f"{kind} {name}\n")


@contextmanager
def cni_test_network() -> Iterator[CniTestNet]:
    require_root_tools()
    tag = secrets.token_hex(3)
    n = 100 + secrets.randbelow(150)
    root = Path(tempfile.mkdtemp(prefix="avr-net-", dir="/tmp"))
    root.chmod(0o755)
    net = CniTestNet(tag=tag, bridge=f"avrtb{tag}", subnet=f"10.88.{n}.0/24",
                  prefix=f"10.88.{n}.", conf_dir=root / "conf", ipam_dir=root / "ipam",
                  record_dir=root / "record", probe=f"avrprobe-{tag}", root=root)
    for d in (net.conf_dir, net.ipam_dir, net.record_dir):
        d.mkdir()
    net.conflist()
    peer = f"avrpv{tag}"
    note_made("link", net.bridge)
    note_made("link", peer)
    note_made("netns", net.probe)
    sh("ip", "link", "add", net.bridge, "type", "bridge")
    sh("ip", "link", "set", net.bridge, "up")
    sh("ip", "netns", "add", net.probe)
    sh("ip", "link", "add", peer, "type", "veth", "peer", "name", "probe0", "netns", net.probe)
    sh("ip", "link", "set", peer, "master", net.bridge, "up")
    sh("ip", "-n", net.probe, "addr", "add", f"{net.prefix}250/24", "dev", "probe0")
    sh("ip", "-n", net.probe, "link", "set", "probe0", "up")
    sh("ip", "-n", net.probe, "link", "set", "lo", "up")
    try:
        yield net
    finally:
        sh("ip", "netns", "delete", net.probe, check=False)
        sh("ip", "link", "delete", peer, check=False)
        sh("ip", "link", "delete", net.bridge, check=False)
        shutil.rmtree(root, ignore_errors=True)
