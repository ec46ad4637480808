"""The operator's view (issue 14) on a real busybox VM pod booted by the real daemon on the
real libvirtd and the test CNI network: the Prometheus endpoint scraped and read with
prometheus_client's own parser (its series move), the node CLI run as a program against the
daemon's socket (`pods` and `images` match the CRI answers; `console` under a pty shows the
guest and sends a line; a second writer is refused), and `diagnose`'s tarball (every part
there, no secret of the pod's user-data, SSH keys or env in it)."""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon_proc import APIS, Daemon
from tests.integration.console_pty import CLI, PtyConsole
from tests.integration.test_network_common import CniTestNet
from tests.integration.vm_ops_common import vm_pod
from tests.integration.vmpods import (
    log_text,
    wait_for,
)

pytestmark = pytest.mark.integration
MARKER = "MINIMAL-GUEST-UP"
BOOT_TIMEOUT = 120
SECRET = "s3cr3t-" + secrets.token_hex(8)
# A well-formed ed25519 public key blob (the runtime checks the key's form)
SSH_SECRET = base64.b64encode(b"\0\0\0\x0bssh-ed25519\0\0\0\x20"
                              + secrets.token_bytes(32)).decode()
ENV_SECRET = "envpw-" + secrets.token_hex(8)


@dataclass
class Pod:
    d: Daemon
    sid: str
    cid: str
    log: Path
    metrics_url: str
    image: str
    tmp: Path
    net: CniTestNet


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def pod(served_minimal_image: str) -> Iterator[Pod]:
    port = free_port()
    with vm_pod(served_minimal_image, name="opsview", ready_timeout=BOOT_TIMEOUT,
                daemon_args=("--metrics-port", str(port)), annotations={
                    "VirtletCloudInitUserData": f"users:\n- name: ops\n  passwd: {SECRET}\n",
                    "VirtletSSHKeys": f"ssh-ed25519 {SSH_SECRET} ops@node"},
                envs={"DB_PASSWORD": ENV_SECRET}) as p:
        yield Pod(p.d, p.sid, p.cid, p.log, f"http://127.0.0.1:{port}/metrics", p.image,
                  p.tmp, p.net)


def cli(p: Pod, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args, "--listen", p.d.socket], capture_output=True,
                          text=True, timeout=timeout)


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(url, timeout=30) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def find(page: dict[Any, float], name: str, **labels: str) -> float | None:
    want = set(labels.items())
    got = [v for (n, ls), v in page.items() if n == name and want <= ls]
    return got[0] if got else None


def test_metrics_series_move_while_the_vm_runs(pod: Pod) -> None:
    vm = {"container_id": pod.cid, "pod": "opsview", "namespace": "default",
          "tenant": "tenant-a"}
    first = scrape(pod.metrics_url)
    cpu1 = find(first, "arktos_vm_cpu_seconds_total", **vm)
    assert cpu1 is not None and cpu1 > 0, sorted(n for n, _ in first)[:40]
    assert find(first, "arktos_vm_up", **vm) == 1
    assert (find(first, "arktos_vm_memory_rss_bytes", **vm) or 0) > 0
    assert find(first, "arktos_vm_runtime_pods", state="SANDBOX_READY") == 1
    assert find(first, "arktos_vm_runtime_vms", state="CONTAINER_RUNNING") == 1
    for method in ("RunPodSandbox", "CreateContainer", "StartContainer", "PullImage"):
        assert find(first, "arktos_vm_runtime_rpc_duration_seconds_count", method=method,
                    code="OK") == 1, method
    assert (find(first, "arktos_vm_runtime_image_pull_bytes_total") or 0) > 0
    assert find(first, "arktos_vm_runtime_image_pulls_in_flight") == 0
    assert (find(first, "arktos_vm_runtime_reconcile_runs_total", outcome="ok") or 0) >= 1
    rx1 = find(first, "arktos_vm_network_receive_bytes_total", interface="eth0", **vm)
    assert rx1 is not None
    # The network sees traffic (5 pings of the guest from the test network's probe
    # namespace); CPU time grows; the calls made since are counted.
    rt = pod.d.runtime("v1alpha2")
    pb, _ = APIS["v1alpha2"]
    status = rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod.sid),
                                 timeout=10).status
    assert " 0% packet loss" in pod.net.ping(status.network.ip, count=5)
    second = scrape(pod.metrics_url)
    assert find(second, "arktos_vm_cpu_seconds_total", **vm) > cpu1  # type: ignore[operator]
    assert find(second, "arktos_vm_network_receive_bytes_total", interface="eth0",
                **vm) >= rx1 + 5 * 84  # type: ignore[operator]
    assert find(second, "arktos_vm_runtime_rpc_duration_seconds_count",
                method="PodSandboxStatus", code="OK") >= 1  # type: ignore[operator]
    assert find(second, "arktos_vm_runtime_metrics_dropped_series_total") == 0


def test_cli_pods_and_images_match_the_cri(pod: Pod) -> None:
    pb, _ = APIS["v1alpha2"]
    rt = pod.d.runtime("v1alpha2")
    sb = rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod.sid),
                             timeout=10).status
    ctr = rt.ContainerStatus(pb.ContainerStatusRequest(container_id=pod.cid),
                             timeout=10).status
    r = cli(pod, "pods", "-o", "json")
    assert r.returncode == 0, r.stderr
    rows = [x for x in json.loads(r.stdout) if x["id"] == pod.sid]
    assert len(rows) == 1
    row = rows[0]
    assert (row["pod"], row["namespace"], row["tenant"]) == (
        sb.metadata.name, sb.metadata.namespace, sb.metadata.tenant)
    assert row["state"] == pb.PodSandboxState.Name(sb.state) == "SANDBOX_READY"
    assert row["ips"][0] == sb.network.ip
    assert [n["name"] for n in row["nics"]] == [n.name for n in sb.network.nics]
    assert row["container_id"] == ctr.id
    assert row["vm_state"] == pb.ContainerState.Name(ctr.state) == "CONTAINER_RUNNING"
    assert row["image"] == ctr.image.image == pod.image
    assert row["started_at"] == ctr.started_at
    assert row["memory_mib"] == ctr.resources.memory_limit_in_bytes >> 20 == 256
    assert row["vcpus"] >= 1
    pid = row["qemu_pid"]
    assert pid and "qemu" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    assert f"avr-{pod.cid}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert row["uptime_s"] is not None and 0 <= row["uptime_s"] < 3600
    table = cli(pod, "pods")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["POD", "TENANT", "NAMESPACE", "STATE"]
    assert any(line.split()[:5] == ["opsview", "tenant-a", "default", "READY", "RUNNING"]
               and sb.network.ip in line and str(pid) in line for line in lines[1:])

    img = cli(pod, "images", "-o", "json")
    assert img.returncode == 0, img.stderr
    images = {x["id"]: x for x in json.loads(img.stdout)}
    assert ctr.image_ref in images
    mine = images[ctr.image_ref]
    assert pod.image in mine["names"] and mine["size_bytes"] > 0
    assert mine["users"] == ["default/opsview"]
    assert "default/opsview" in cli(pod, "images").stdout


def test_cli_errors_name_what_went_wrong(pod: Pod) -> None:
    r = cli(pod, "console", "no-such-pod")
    assert r.returncode == 1 and "no pod 'no-such-pod'" in r.stderr
    r = subprocess.run([*CLI, "pods", "--listen", str(pod.tmp / "nothing.sock")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "no such socket" in r.stderr
    for sub in ("pods", "images", "console", "diagnose"):
        h = subprocess.run([*CLI, sub, "--help"], capture_output=True, text=True, timeout=30)
        assert h.returncode == 0 and "--listen" in h.stdout, sub


def type_until_echoed(writer: PtyConsole, reader: PtyConsole, line: str) -> None:
    """Types `line` on `writer` until the guest's echo of it shows on `reader`, as an operator
    would. A second writer's first line once got no echo within 30 s (1 run in 4, cause not
    found: the guest's busybox read loop or the serial line); the first writer's test
    already typed again."""
    deadline = time.monotonic() + 60
    while f"MINIMAL-GUEST-ECHO {line}" not in reader.out.decode(errors="replace"):
        writer.type(f"{line}\r".encode())
        try:
            reader.read_until(f"MINIMAL-GUEST-ECHO {line}", 10)
        except AssertionError:
            if time.monotonic() > deadline:
                raise


def test_console_shows_the_guest_and_sends_a_line(pod: Pod) -> None:
    con = PtyConsole(pod.d.socket, "opsview")
    try:
        con.read_until("escape character is ^]", 30)
        word = secrets.token_hex(4)
        echo = f"MINIMAL-GUEST-ECHO ops-{word}"
        # The guest answers each line typed on its console.
        type_until_echoed(con, con, f"ops-{word}")
        # The log kept receiving the console while we were attached.
        wait_for("the echo in the CRI log", lambda: echo in log_text(pod.log), 20)
        # A second writer is refused without --force...
        r = cli(pod, "console", "default/opsview")
        assert r.returncode == 1 and "already has 1 writer" in r.stderr, r.stderr
        # ... and types alongside with it.
        second = PtyConsole(pod.d.socket, pod.sid[:8], "--force")
        try:
            second.read_until("escape character is ^]", 30)
            word2 = secrets.token_hex(4)
            type_until_echoed(second, con, f"two-{word2}")
            second.type(b"\x1d")
            assert second.proc.wait(15) == 0
        finally:
            second.close()
        con.type(b"\x1d")  # Ctrl-] detaches; the VM keeps running
        assert con.proc.wait(15) == 0
        assert "Disconnected" in con.read_until("Disconnected", 5)
    finally:
        con.close()
    pb, _ = APIS["v1alpha2"]
    st = pod.d.runtime("v1alpha2").ContainerStatus(
        pb.ContainerStatusRequest(container_id=pod.cid), timeout=10).status
    assert st.state == pb.CONTAINER_RUNNING


def test_diagnose_bundle_has_every_part_and_no_secret(pod: Pod) -> None:
    out = pod.tmp / "bundle.tar.gz"
    r = cli(pod, "diagnose", "-o", str(out), "--log-file", str(pod.d.log), timeout=180)
    assert r.returncode == 0, r.stderr
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    with tarfile.open(out) as tar:
        members = {m.name.split("/", 1)[1]: tar.extractfile(m).read()  # type: ignore[union-attr]
                   for m in tar.getmembers() if m.isfile()}
    names = set(members)
    for part in ("MANIFEST.txt", "journal.log", "config.json", "state.json", "status.json",
                 "pods.json", "versions.json", f"domains/{pod.cid}.xml",
                 f"netns/avr-{pod.sid}.json", f"cni/{pod.sid}.json"):
        assert part in names, (part, sorted(names))
    manifest = members["MANIFEST.txt"].decode()
    assert "journal.log: from" in manifest, manifest
    assert f"<name>avr-{pod.cid}</name>" in members[f"domains/{pod.cid}.xml"].decode()
    links = json.loads(members[f"netns/avr-{pod.sid}.json"])
    assert any(a.get("family") == "inet" for link in links for a in link.get("addr_info", []))
    versions = json.loads(members["versions.json"])
    assert versions["libvirt"]["libvirtd"] and "QEMU" in versions["qemu"]
    state = json.loads(members["state.json"])
    assert [s["id"] for s in state["sandboxes"]] == [pod.sid]
    assert json.loads(members["config.json"])["metrics_port"] > 0
    assert "serving" in members["journal.log"].decode() or members["journal.log"]
    # No secret of the pod's user-data, SSH keys or env anywhere in the tarball, packed
    # or unpacked.
    blob = out.read_bytes() + b"".join(members.values())
    for secret in (SECRET, SSH_SECRET, ENV_SECRET):
        assert secret.encode() not in blob, secret
    assert "<redacted" in members["state.json"].decode()


def test_socket_activated_daemon_serves_metrics(short_tmp: Path) -> None:
    """Under systemd-socket-activate (the CRI socket inherited), the endpoint comes up with
    the daemon and counts the call that started it (test:///default: no VM needed)."""
    activate = shutil.which("systemd-socket-activate")
    assert activate, "systemd-socket-activate (package systemd) is needed for this test"
    run = short_tmp / "run"
    run.mkdir(mode=0o755)
    sock = str(run / "virtlet.sock")
    port = free_port()
    log = open(short_tmp / "daemon.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [activate, "-l", sock, "-E", "PYTHONPATH=" + os.environ.get("PYTHONPATH", ""),
         sys.executable, "-m", "arktos_vm_runtime", "serve", "--listen", sock,
         "--state-dir", str(short_tmp / "state"), "--libvirt-uri", "test:///default",
         "--metrics-port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for("systemd-socket-activate's socket", lambda: os.path.exists(sock), 10, 0.05)
        with pytest.raises(OSError):  # nothing runs before the first connection
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
        r = subprocess.run([*CLI, "check", "--listen", sock], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        page = wait_for("the metrics endpoint", lambda: _try_scrape(port), 20)
        assert find(page, "arktos_vm_runtime_rpc_duration_seconds_count", method="Version",
                    code="OK") == 1
        assert find(page, "arktos_vm_runtime_pods", state="SANDBOX_READY") == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
        log.close()
    assert rc == 0, (short_tmp / "daemon.log").read_text()


def _try_scrape(port: int) -> dict[Any, float] | None:
    try:
        return scrape(f"http://127.0.0.1:{port}/metrics")
    except OSError:
        return None
