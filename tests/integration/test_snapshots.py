"""CreateSnapshot / RestoreToSnapshot (Arktos, runtime.v1alpha2 only; v1 has no such RPC)
on the minimal guest, where the guest's insides are not the point: every bad input with
its status code, a duplicate id, restore of a running and of a stopped VM, the snapshots
surviving a daemon restart, and going with the VM. The guest's files before and after a
restore are checked on the Debian guest (test_snapshot_guest.py, slow).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.daemon_proc import APIS
from tests.integration.test_network_common import CniTestNet
from tests.integration.vmpods import (
    container_config,
    domain_names,
    log_text,
    own_netns_names,
    sandbox_config,
    vm_runtime,
    wait_for,
)

pytestmark = pytest.mark.integration
API = "v1alpha2"
MARKER = "MINIMAL-GUEST-UP"
pb = APIS[API][0]


@pytest.fixture(autouse=True)
def no_leaked_namespaces() -> Iterator[None]:
    before = own_netns_names()
    yield
    assert not own_netns_names() - before, "a pod netns leaked"


def snapshot_rows(state_dir: str, cid: str) -> list[dict[str, Any]]:
    """The snapshot rows of VM `cid` in the daemon's state store (read-only)."""
    db = sqlite3.connect(f"file:{state_dir}/state.db?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT data FROM snapshots WHERE container_id=? ORDER BY id",
                          (cid,)).fetchall()
    finally:
        db.close()
    return [json.loads(r[0]) for r in rows]


def libvirt_snapshots(cid: str) -> list[str]:
    r = subprocess.run(["virsh", "-c", "qemu:///system", "snapshot-list", "--name",
                        f"avr-{cid}"], capture_output=True, text=True)
    return [n for n in r.stdout.split() if n] if r.returncode == 0 else []


def disk_snapshots(disk: Path) -> dict[str, int]:
    """name -> vm-state-size of the internal snapshots in a qcow2 (memory state > 0)."""
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(disk)],
                                     capture_output=True, text=True, check=True).stdout)
    return {s["name"]: int(s["vm-state-size"]) for s in info.get("snapshots", [])}


def code_of(fn: Any, req: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn(req, timeout=120)
    return e.value.code()  # type: ignore[no-any-return]


def create(rt: Any, cid: str, snap: str, flags: int = 0) -> Any:
    return rt.CreateSnapshot(pb.CreateSnapshotRequest(vmID=cid, snapshotID=snap, flags=flags),
                             timeout=300)


def restore(rt: Any, cid: str, snap: str, flags: int = 0) -> Any:
    return rt.RestoreToSnapshot(pb.RestoreToSnapshotRequest(vmID=cid, snapshotID=snap,
                                                            flags=flags), timeout=300)


def test_v1_has_no_snapshot_rpcs() -> None:
    v1 = APIS["v1"][0]
    assert not hasattr(v1, "CreateSnapshotRequest")
    assert "CreateSnapshot" not in v1.DESCRIPTOR.services_by_name["RuntimeService"] \
        .methods_by_name


def test_snapshots_of_the_minimal_guest(short_tmp: Path, cni_net: CniTestNet,
                                        served_minimal_image: str) -> None:
    d = vm_runtime(short_tmp, cni_net).start()
    sid = ""
    try:
        rt = d.runtime(API)
        d.images(API).PullImage(pb.PullImageRequest(
            image=pb.ImageSpec(image=served_minimal_image)), timeout=60)
        log_dir = short_tmp / "pods"
        cfg = sandbox_config(pb, log_dir, name="snap-pod")
        sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=30).pod_sandbox_id
        cid = rt.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=sid, sandbox_config=cfg,
            config=container_config(pb, served_minimal_image)), timeout=60).container_id
        rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=60)
        wait_for("the guest's marker", lambda: MARKER in log_text(log_dir / "vm" / "0.log"),
                 180)
        disk = Path(d.state_dir) / "vms" / cid / "root.qcow2"
        ip = rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid),
                                 timeout=10).status.network.ip

        # -- bad inputs, each with its status code, none leaving anything ----------------
        bad = {"../etc": "path", "a/b": "slash", "s<x>&'\"": "XML", "-rf": "option",
               "x" * 129: "too long", "sn\u00e4p": "non-ASCII", "a b": "space",
               ".hidden": "dot"}
        for snap in bad:
            assert code_of(rt.CreateSnapshot, pb.CreateSnapshotRequest(
                vmID=cid, snapshotID=snap)) == grpc.StatusCode.INVALID_ARGUMENT, snap
            assert code_of(rt.RestoreToSnapshot, pb.RestoreToSnapshotRequest(
                vmID=cid, snapshotID=snap)) == grpc.StatusCode.INVALID_ARGUMENT, snap
        huge = pb.CreateSnapshotRequest(vmID=cid, snapshotID="s" * 200_000)
        with pytest.raises(grpc.RpcError) as e:
            rt.CreateSnapshot(huge, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(e.value.details()) < 400, "a huge id is not echoed whole"
        assert code_of(rt.CreateSnapshot, pb.CreateSnapshotRequest(vmID=cid)) \
            == grpc.StatusCode.INVALID_ARGUMENT, "empty snapshotID"
        assert code_of(rt.CreateSnapshot, pb.CreateSnapshotRequest(snapshotID="s1")) \
            == grpc.StatusCode.INVALID_ARGUMENT, "empty vmID"
        for flags in (1, -1, 2**40):
            assert code_of(rt.CreateSnapshot, pb.CreateSnapshotRequest(
                vmID=cid, snapshotID="s1", flags=flags)) == grpc.StatusCode.INVALID_ARGUMENT
            assert code_of(rt.RestoreToSnapshot, pb.RestoreToSnapshotRequest(
                vmID=cid, snapshotID="s1", flags=flags)) == grpc.StatusCode.INVALID_ARGUMENT
        unknown_vm = "0" * 8 + "-0000-4000-8000-" + "0" * 12
        assert code_of(rt.CreateSnapshot, pb.CreateSnapshotRequest(
            vmID=unknown_vm, snapshotID="s1")) == grpc.StatusCode.NOT_FOUND
        assert code_of(rt.RestoreToSnapshot, pb.RestoreToSnapshotRequest(
            vmID=cid, snapshotID="never-taken")) == grpc.StatusCode.NOT_FOUND
        assert snapshot_rows(d.state_dir, cid) == [] and libvirt_snapshots(cid) == []
        assert disk_snapshots(disk) == {}

        # -- a running VM: disk and memory, inside its own root disk ---------------------
        create(rt, cid, "snap-1")
        assert code_of(rt.CreateSnapshot, pb.CreateSnapshotRequest(
            vmID=cid, snapshotID="snap-1")) == grpc.StatusCode.ALREADY_EXISTS
        rows = snapshot_rows(d.state_dir, cid)
        assert [(r["snapshot_id"], r["state"], r["vm_state"]) for r in rows] == \
            [("snap-1", "READY", "running")]
        assert libvirt_snapshots(cid) == ["snap-1"]
        assert disk_snapshots(disk)["snap-1"] > 0, "memory state kept in the root disk"

        restore(rt, cid, "snap-1")
        st = rt.ContainerStatus(pb.ContainerStatusRequest(container_id=cid),
                                timeout=10).status
        assert st.state == pb.CONTAINER_RUNNING, "the VM runs on after a restore"
        out = wait_for("the guest to answer ping after the restore",
                       lambda: " 0% packet loss" in (o := _ping(cni_net, ip)) and o, 60, 2)
        assert "bytes from" in out

        # -- a daemon restart: the snapshot is still listed, restorable, a duplicate -----
        d.stop()
        d = vm_runtime(short_tmp, cni_net).start()
        rt = d.runtime(API)
        assert code_of(rt.CreateSnapshot, pb.CreateSnapshotRequest(
            vmID=cid, snapshotID="snap-1")) == grpc.StatusCode.ALREADY_EXISTS
        restore(rt, cid, "snap-1")
        assert [r["snapshot_id"] for r in snapshot_rows(d.state_dir, cid)] == ["snap-1"]

        # -- a VM paused from outside: snapshotted as it is, running after a restore -----
        virsh = ["virsh", "-c", "qemu:///system"]
        subprocess.run([*virsh, "suspend", f"avr-{cid}"], check=True, capture_output=True)
        create(rt, cid, "paused-1")
        rows = {r["snapshot_id"]: r["vm_state"] for r in snapshot_rows(d.state_dir, cid)}
        assert rows == {"snap-1": "running", "paused-1": "paused"}
        restore(rt, cid, "paused-1")
        assert subprocess.run([*virsh, "domstate", f"avr-{cid}"], capture_output=True,
                              text=True).stdout.strip() == "running"
        st = rt.ContainerStatus(pb.ContainerStatusRequest(container_id=cid),
                                timeout=10).status
        assert st.state == pb.CONTAINER_RUNNING

        # -- a stopped VM: disks only; restore sets the disk back -------------------------
        rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0), timeout=60)
        create(rt, cid, "stopped-1")
        rows = {r["snapshot_id"]: r["vm_state"] for r in snapshot_rows(d.state_dir, cid)}
        assert rows == {"snap-1": "running", "paused-1": "paused", "stopped-1": "shutoff"}
        assert disk_snapshots(disk)["stopped-1"] == 0, "no memory state of a stopped VM"
        restore(rt, cid, "snap-1")  # disk state only: the VM stays stopped
        st = rt.ContainerStatus(pb.ContainerStatusRequest(container_id=cid),
                                timeout=10).status
        assert st.state == pb.CONTAINER_EXITED
        rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=60)
        assert code_of(rt.RestoreToSnapshot, pb.RestoreToSnapshotRequest(
            vmID=cid, snapshotID="stopped-1")) == grpc.StatusCode.FAILED_PRECONDITION
        restore(rt, cid, "snap-1")

        # -- deleted with the VM: rows, libvirt's metadata, the disk holding them --------
        rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=60)
        rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60)
        sid = ""
        assert snapshot_rows(d.state_dir, cid) == []
        assert not [n for n in domain_names() if cid in n]
        assert not disk.parent.exists()
    finally:
        if sid:
            with contextlib.suppress(grpc.RpcError):
                d.runtime(API).RemovePodSandbox(
                    pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)
        d.stop()


def _ping(net: CniTestNet, ip: str) -> str:
    try:
        return net.ping(ip, count=2)
    except AssertionError as e:
        return str(e)
