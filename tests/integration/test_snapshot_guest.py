"""Snapshots of the Debian cloud-init guest (2 GiB root disk), proven from inside the guest
through its QEMU guest agent: a file written before CreateSnapshot is there after
RestoreToSnapshot and one written after is gone; the guest answers ping on its CNI
address after the restore; the snapshot survives a daemon restart (restored again, the
file written meanwhile is gone again) and goes with the VM. One boot for the module.
Minutes under TCG: marked slow. The bad inputs are in test_snapshots.py (minimal guest).
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import libvirt
import libvirt_qemu
import pytest

from tests.daemon_proc import APIS
from tests.guest.images import cloud_guest_image
from tests.integration.test_network_common import CniTestNet, cni_test_network
from tests.integration.test_snapshots import snapshot_rows
from tests.integration.vmpods import (
    container_config,
    cri_records,
    domain_names,
    image_server,
    log_text,
    require_libvirtd,
    sandbox_config,
    vm_runtime,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
API = "v1alpha2"
pb = APIS[API][0]
MARKER = "SNAPSHOT-GUEST-READY"


def guest_exec(cid: str, *argv: str, timeout: float = 60) -> tuple[int, str]:
    """Runs argv in the guest through qemu-guest-agent; (exit code, stdout)."""
    conn = libvirt.open("qemu:///system")
    try:
        dom = conn.lookupByName(f"avr-{cid}")

        def agent(cmd: str, **args: Any) -> Any:
            out = libvirt_qemu.qemuAgentCommand(
                dom, json.dumps({"execute": cmd, "arguments": args}), 30, 0)
            return json.loads(out)["return"]

        pid = agent("guest-exec", path=argv[0], arg=list(argv[1:]),
                    **{"capture-output": True})["pid"]
        deadline = time.monotonic() + timeout
        while True:
            st = agent("guest-exec-status", pid=pid)
            if st["exited"]:
                return int(st.get("exitcode", -1)), base64.b64decode(
                    st.get("out-data", "")).decode(errors="replace")
            assert time.monotonic() < deadline, f"{argv} did not finish in the guest"
            time.sleep(0.5)
    finally:
        conn.close()


def agent_up(cid: str) -> bool:
    try:
        return guest_exec(cid, "/bin/true")[0] == 0
    except libvirt.libvirtError:
        return False


def _ping(net: CniTestNet, ip: str) -> str:
    try:
        return net.ping(ip, count=2)
    except AssertionError as e:
        return str(e)


class Guest:
    def __init__(self, short_tmp: Path, net: CniTestNet, image: str) -> None:
        self.tmp, self.net, self.image = short_tmp, net, image
        self.d = vm_runtime(short_tmp, net).start()
        self.sid = self.cid = self.ip = ""

    @property
    def rt(self) -> Any:
        return self.d.runtime(API)

    def boot(self) -> None:
        self.d.images(API).PullImage(pb.PullImageRequest(image=pb.ImageSpec(
            image=self.image)), timeout=300)
        log_dir = self.tmp / "pods"
        cfg = sandbox_config(pb, log_dir, name="snap-guest", annotations={
            "VirtletVCPUCount": "2", "VirtletRootVolumeSize": "2Gi",
            "VirtletCloudInitUserData":
                f"runcmd:\n  - [sh, -c, 'echo {MARKER} > /dev/ttyS0']\n"})
        self.sid = self.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg),
                                         timeout=30).pod_sandbox_id
        self.cid = self.rt.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=self.sid, sandbox_config=cfg,
            config=container_config(pb, self.image, memory_mib=512)),
            timeout=120).container_id
        self.rt.StartContainer(pb.StartContainerRequest(container_id=self.cid), timeout=60)
        log_file = log_dir / "vm" / "0.log"
        wait_for("cloud-init's runcmd line", lambda: any(
            r.endswith(f"stdout F {MARKER}") for r in cri_records(log_text(log_file))),
            400, every=1)
        self.ip = self.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(
            pod_sandbox_id=self.sid), timeout=10).status.network.ip
        wait_for("the guest agent", lambda: agent_up(self.cid), 120, every=2)

    def restart_daemon(self) -> None:
        self.d.stop()
        self.d = vm_runtime(self.tmp, self.net).start()

    def close(self) -> None:
        if self.sid:
            with contextlib.suppress(grpc.RpcError):
                self.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=self.sid),
                                         timeout=120)
        self.d.stop()


@pytest.fixture(scope="module")
def guest() -> Iterator[Guest]:
    """ONE Debian guest for the module, booted once."""
    require_libvirtd()
    tmp = Path(tempfile.mkdtemp(prefix="avr-", dir="/tmp"))
    tmp.chmod(0o711)
    (tmp / "img").mkdir()
    (tmp / "img" / "guest.qcow2").symlink_to(cloud_guest_image())
    with cni_test_network() as net, \
            image_server({"guest.qcow2": tmp / "img" / "guest.qcow2"}) as host:
        g = Guest(tmp, net, f"{host}/guest.qcow2")
        try:
            g.boot()
            yield g
        finally:
            g.close()
            shutil.rmtree(tmp, ignore_errors=True)


def _sh(g: Guest, script: str) -> tuple[int, str]:
    return guest_exec(g.cid, "/bin/sh", "-c", script)


def _restore_and_check(g: Guest, snap: str) -> None:
    g.rt.RestoreToSnapshot(pb.RestoreToSnapshotRequest(vmID=g.cid, snapshotID=snap),
                           timeout=600)
    st = g.rt.ContainerStatus(pb.ContainerStatusRequest(container_id=g.cid),
                              timeout=10).status
    assert st.state == pb.CONTAINER_RUNNING
    wait_for("the guest agent after the restore", lambda: agent_up(g.cid), 120, every=2)
    assert _sh(g, "cat /root/file-a") == (0, "A\n"), "written before the snapshot: there"
    assert _sh(g, "test -e /root/file-b")[0] == 1, "written after the snapshot: gone"
    out = wait_for("the guest to answer ping on its CNI address after the restore",
                   lambda: " 0% packet loss" in (o := _ping(g.net, g.ip)) and o, 60, every=2)
    assert "bytes from" in out


def test_files_and_network_after_a_restore(guest: Guest) -> None:
    g = guest
    assert " 0% packet loss" in wait_for("ping before", lambda: _ping(g.net, g.ip)
                                         if " 0% packet loss" in _ping(g.net, g.ip) else "",
                                         60, every=2)
    assert _sh(g, "echo A > /root/file-a && sync")[0] == 0
    g.rt.CreateSnapshot(pb.CreateSnapshotRequest(vmID=g.cid, snapshotID="with-a"),
                        timeout=600)
    assert _sh(g, "echo B > /root/file-b && sync && cat /root/file-b") == (0, "B\n")
    _restore_and_check(g, "with-a")


def test_snapshot_survives_a_daemon_restart(guest: Guest) -> None:
    g = guest
    assert [r["snapshot_id"] for r in snapshot_rows(g.d.state_dir, g.cid)] == ["with-a"]
    g.restart_daemon()
    assert [r["snapshot_id"] for r in snapshot_rows(g.d.state_dir, g.cid)] == ["with-a"]
    with pytest.raises(grpc.RpcError) as e:
        g.rt.CreateSnapshot(pb.CreateSnapshotRequest(vmID=g.cid, snapshotID="with-a"),
                            timeout=60)
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert _sh(g, "echo B > /root/file-b && sync")[0] == 0
    _restore_and_check(g, "with-a")


def test_snapshots_go_with_the_vm(guest: Guest) -> None:
    g = guest
    disk_dir = Path(g.d.state_dir) / "vms" / g.cid
    assert disk_dir.exists()
    g.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=g.sid), timeout=120)
    g.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=g.sid), timeout=120)
    g.sid = ""
    assert snapshot_rows(g.d.state_dir, g.cid) == []
    assert not [n for n in domain_names() if g.cid in n]
    assert not disk_dir.exists()
