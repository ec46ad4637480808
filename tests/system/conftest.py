"""Fixtures of the system tier: the .debs, the node image, two booted nodes, Ansible runs.

tools/system-test builds the .debs and the node image and passes them in through
AVR_SYSTEM_DEB, AVR_SYSTEM_DEB_NEW and AVR_SYSTEM_ROOTFS; without them the fixtures build
them themselves, so `pytest -m system tests/system` works on its own too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .nodes import Node

TOP = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = TOP / "ansible"
NODE_NAMES = ("node1", "node2")
RECAP = re.compile(
    r"^(?P<host>\S+)\s+:\s+ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
    r"unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+)",
    re.M,
)
# Debian's tool chain, not a venv's or pyenv's python, for dpkg-buildpackage and Ansible.
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def _require_host() -> None:
    if os.geteuid() != 0:
        pytest.fail("the system tier boots systemd-nspawn containers: run as root")
    for tool in ("systemd-nspawn", "ansible-playbook", "mmdebstrap", "dpkg-buildpackage"):
        if shutil.which(tool, path=SYSTEM_PATH) is None:
            pytest.fail(f"the system tier needs {tool} (tools/setup installs it)")


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    _require_host()
    given = os.environ.get("AVR_SYSTEM_WORKDIR")
    d = Path(given) if given else Path(tempfile.mkdtemp(prefix="avr-system-", dir="/var/tmp"))
    d.mkdir(parents=True, exist_ok=True)
    yield d
    if not given:
        shutil.rmtree(d, ignore_errors=True)


def _build_deb(workdir: Path, *args: str) -> Path:
    r = subprocess.run([str(TOP / "tools/build-deb"), *args], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 0, f"tools/build-deb {args} failed:\n{r.stderr}"
    return Path(r.stdout.strip().splitlines()[-1])


@dataclass(frozen=True)
class Debs:
    current: Path
    newer: Path  # the same code as a higher Debian revision, for the upgrade test


@pytest.fixture(scope="session")
def debs(workdir: Path) -> Debs:
    current = os.environ.get("AVR_SYSTEM_DEB")
    newer = os.environ.get("AVR_SYSTEM_DEB_NEW")
    return Debs(
        Path(current) if current else _build_deb(workdir, "--out", str(workdir / "deb")),
        Path(newer) if newer else _build_deb(workdir, "--out", str(workdir / "deb-new"),
                                             "--revision", "2", "--no-lintian"),
    )


@pytest.fixture(scope="session")
def rootfs() -> Path:
    given = os.environ.get("AVR_SYSTEM_ROOTFS")
    if given:
        return Path(given)
    r = subprocess.run([str(TOP / "tests/system/build-rootfs.sh")], capture_output=True,
                       text=True, check=False)
    assert r.returncode == 0, f"build-rootfs.sh failed:\n{r.stderr}"
    return Path(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def nodes(workdir: Path, rootfs: Path) -> Iterator[dict[str, Node]]:
    key = workdir / "id_ed25519"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                       check=True)
    booted = {name: Node(name, workdir, key) for name in NODE_NAMES}
    try:
        for node in booted.values():
            node.prepare(rootfs)
            node.boot()
        for node in booted.values():
            node.wait_ssh()
        yield booted
    finally:
        for node in booted.values():
            node.request_poweroff()  # both at once
        for node in booted.values():
            node.shutdown()


@dataclass
class Ansible:
    workdir: Path
    nodes: dict[str, Node]

    def inventory(self, deb: Path) -> Path:
        common = {
            "ansible_host": "127.0.0.1",
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(self.workdir / "id_ed25519"),
            "ansible_ssh_common_args": "-o StrictHostKeyChecking=no "
                                       "-o UserKnownHostsFile=/dev/null",
            "ansible_python_interpreter": "/usr/bin/python3",
        }
        hosts = {name: {**common, "ansible_port": n.port} for name, n in self.nodes.items()}
        # node1: the packaged socket, plus an optional CNI network from the role.
        hosts["node1"]["arktos_vm_runtime_cni_config"] = {
            "cniVersion": "0.4.0",
            "name": "vmpods",
            "plugins": [{"type": "bridge", "bridge": "avrbr0", "isGateway": True,
                         "ipam": {"type": "host-local",
                                  "ranges": [[{"subnet": "10.222.0.0/24"}]]}}],
        }
        # node2: another socket group, which takes the role's socket drop-in.
        hosts["node2"]["arktos_vm_runtime_socket_group"] = "libvirt"
        inventory = {
            "all": {"children": {"arktos_vm_nodes": {
                "hosts": hosts,
                "vars": {
                    "arktos_vm_runtime_deb_path": str(deb),
                    # Version calls are logged at DEBUG: the journal test looks for them.
                    "arktos_vm_runtime_log_level": "debug",
                    "arktos_vm_runtime_disable_kvm": True,
                },
            }}}
        }
        path = self.workdir / "inventory.json"
        path.write_text(json.dumps(inventory, indent=2))
        return path

    def run(self, deb: Path) -> tuple[dict[str, dict[str, int]], str]:
        env = {
            "PATH": SYSTEM_PATH,
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": "C.UTF-8",
            "ANSIBLE_ROLES_PATH": str(ANSIBLE_DIR / "roles"),
            "ANSIBLE_HOST_KEY_CHECKING": "False",
            "ANSIBLE_PIPELINING": "True",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_RETRY_FILES_ENABLED": "False",
            "ANSIBLE_LOCAL_TEMP": str(self.workdir / "ansible-tmp"),
        }
        r = subprocess.run(
            ["ansible-playbook", "-i", str(self.inventory(deb)), str(ANSIBLE_DIR / "site.yml")],
            capture_output=True, text=True, env=env, cwd=ANSIBLE_DIR, timeout=900, check=False,
        )
        log = r.stdout + r.stderr
        with (self.workdir / "ansible.log").open("a") as f:
            f.write(log)
        recap = {m["host"]: {k: int(m[k]) for k in ("ok", "changed", "unreachable", "failed")}
                 for m in RECAP.finditer(r.stdout)}
        assert r.returncode == 0 and set(recap) == set(self.nodes), log[-6000:]
        return recap, log


@pytest.fixture(scope="session")
def ansible(workdir: Path, nodes: dict[str, Node]) -> Ansible:
    return Ansible(workdir, nodes)


@pytest.fixture(scope="session")
def provisioned(ansible: Ansible, debs: Debs) -> list[dict[str, dict[str, int]]]:
    """The site playbook run twice against both nodes: the two recaps."""
    first, _ = ansible.run(debs.current)
    second, _ = ansible.run(debs.current)
    return [first, second]


@pytest.fixture(params=NODE_NAMES)
def node(request: pytest.FixtureRequest, nodes: dict[str, Node],
         provisioned: list[dict[str, dict[str, int]]]) -> Node:
    return nodes[request.param]
