"""Upgrading in place: the previous release of the runtime (state store schema 1, network state
and image names in files) runs a VM pod; this version then starts on the same state directory
while the VM runs. The VM keeps running (same QEMU process), every record is carried into the
store, and the pod is then stopped and removed as if it had never been migrated: CNI DEL with
the arguments and result stored by the old version, nothing left behind."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.daemon_proc import APIS, Daemon
from tests.integration.test_network_common import PLUGINS, CniTestNet
from tests.integration.vmpods import (
    container_config,
    log_text,
    sandbox_config,
    vm_runtime,
    wait_for,
)

pytestmark = pytest.mark.integration

# The last commit whose runtime kept schema version 1 with network.json and image-name files.
PREVIOUS_RELEASE = "ad85818"
REPO = Path(__file__).resolve().parents[2]


def previous_release(dest: Path) -> Path:
    """The previous release's package, importable from the returned directory."""
    r = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", PREVIOUS_RELEASE,
                        "runtime", "templates"], capture_output=True, timeout=60)
    assert r.returncode == 0, (
        f"this test runs the runtime as of commit {PREVIOUS_RELEASE} from the git history; "
        f"git archive failed (a shallow clone?): {r.stderr.decode().strip()}")
    src = dest / "src"
    src.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(src)], input=r.stdout, check=True, timeout=60)
    path = dest / "path"
    path.mkdir()
    # Named 'runtime' underneath, as in a source tree, so it finds its own templates/.
    (path / "arktos_vm_runtime").symlink_to(src / "runtime")
    return path


def old_runtime(tmp: Path, net: CniTestNet, pythonpath: Path) -> Daemon:
    return Daemon(tmp, libvirt_uri="qemu:///system", cni_dir=net.conf_dir,
                  env={"PYTHONPATH": str(pythonpath)}, pod_logs=False, loopback_pulls=False,
                  args=["--disable-kvm", "--image-download-protocol", "http",
                        "--cni-bin-dir", str(PLUGINS)])


def qemu_pid(cid: str) -> int:
    pidfile = Path(f"/run/libvirt/qemu/avr-{cid}.pid")
    return int(pidfile.read_text().strip()) if pidfile.exists() else 0


def test_upgrade_from_the_previous_release_with_a_running_vm(
        short_tmp: Path, cni_net: CniTestNet, served_minimal_image: str) -> None:
    net, image = cni_net, served_minimal_image
    pb, _ = APIS["v1alpha2"]
    pythonpath = previous_release(short_tmp / "old")
    d = old_runtime(short_tmp, net, pythonpath)
    probe = subprocess.run([d.argv[0], "-c", "import arktos_vm_runtime.service.store as s; "
                            "print(s.SCHEMA_VERSION, s.__file__)"], env=d.env,
                           capture_output=True, text=True, timeout=30)
    assert probe.stdout.startswith(f"1 {pythonpath}"), probe
    d.start()
    log_dir = short_tmp / "pods"
    cfg = sandbox_config(pb, log_dir, name="upgraded-pod",
                         annotations={"arktos.futurewei.com/cni-args": "ZONE=az-1"})
    state = Path(d.state_dir)
    sid = ""
    try:
        rt = d.runtime("v1alpha2")
        image_id = d.images("v1alpha2").PullImage(pb.PullImageRequest(
            image=pb.ImageSpec(image=image)), timeout=60).image_ref
        sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=60).pod_sandbox_id
        cid = rt.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=sid, sandbox_config=cfg, config=container_config(pb, image)),
            timeout=60).container_id
        rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=60)
        ip = rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid),
                                 timeout=10).status.network.ip
        log_file = log_dir / "vm" / "0.log"
        wait_for("the guest to take its CNI address",
                 lambda: f"MINIMAL-GUEST-NET eth0 {ip}/24" in log_text(log_file), 180)
        old_files = [state / "networks" / sid / "network.json",
                     *(state / "images" / "names").glob("*.json")]
        assert all(p.is_file() for p in old_files) and len(old_files) == 2, old_files
        old_network = json.loads(old_files[0].read_text())
        pid = qemu_pid(cid)
        assert pid > 0
        assert d.stop() == 0

        # This version, on the same state directory, while the VM runs.
        d = vm_runtime(short_tmp, net).start()
        rt = d.runtime("v1alpha2")
        db = sqlite3.connect(state / "state.db")
        try:
            assert db.execute("PRAGMA user_version").fetchone()[0] >= 2
            (data,) = db.execute("SELECT data FROM networks WHERE id=?", (sid,)).fetchone()
            assert json.loads(data) == old_network
            names = db.execute("SELECT id, digest FROM image_names").fetchall()
            assert names == [(image, image_id.removeprefix("sha256:"))]
        finally:
            db.close()
        assert not any(p.exists() for p in old_files), "carried files are removed"
        assert qemu_pid(cid) == pid, "the VM kept running through the upgrade"

        status = rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid),
                                     timeout=10).status
        assert status.state == pb.SANDBOX_READY and status.network.ip == ip
        c = rt.ContainerStatus(pb.ContainerStatusRequest(container_id=cid), timeout=10).status
        assert c.state == pb.CONTAINER_RUNNING and c.image_ref == image_id
        listed = d.images("v1alpha2").ListImages(pb.ListImagesRequest(), timeout=10).images
        assert [(i.id, list(i.repo_tags)) for i in listed] == [(image_id, [image])]
        out = net.ping(ip)
        assert " 0% packet loss" in out, out

        adds = [c for c in net.calls() if c["CNI_COMMAND"] == "ADD"]
        rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
        dels = [c for c in net.calls() if c["CNI_COMMAND"] == "DEL"]
        assert dels and dels[-1]["CNI_ARGS"] == adds[0]["CNI_ARGS"]
        assert dels[-1]["stdin"]["prevResult"] == adds[0]["stdin"]["prevResult"]
        rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60)
        removed, sid = sid, ""
        assert not net.ip_files()
        assert f"avr-{cid}" not in subprocess.run(
            ["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
            capture_output=True, text=True).stdout.split()
        assert f"avr-{removed}" not in os.listdir("/run/netns")
    finally:
        if sid:
            d.runtime("v1alpha2").RemovePodSandbox(
                pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60)
        d.stop()
