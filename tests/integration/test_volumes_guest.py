"""Volumes reaching a real guest (the Debian cloud-init guest; every check from inside it
through ExecSync): a ConfigMap file with its content and mode, a Secret readable by root
alone, an emptyDir shared both ways with virtiofs, a readonly hostPath that refuses
writes, a block device (a loop device this test makes) at its devicePath, an extra disk
formatted and mounted, the root filesystem grown to VirtletRootVolumeSize; all still
there after a daemon restart, and gone with the pod. One guest for the module; minutes
under TCG: marked slow.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests.daemon_proc import APIS, Daemon
from tests.guest.images import cloud_guest_image
from tests.integration.test_network_common import cni_test_network
from tests.integration.vm_ops_common import module_tmp
from tests.integration.vmpods import (
    container_config,
    domain_names,
    image_server,
    require_libvirtd,
    sandbox_config,
    vm_runtime,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BOOT_TIMEOUT = 400
GIB = 1 << 30
BLOCK_MAGIC = b"AVR-BLOCK-MAGIC\n"
CONFIG = b"color = blue\n"
SECRET = b"hunter2-not-logged"


@dataclass
class Guest:
    d: Daemon
    sid: str
    cid: str
    tmp: Path
    empty_dir: Path
    host_dir: Path
    loop: str
    #: a new daemon on the same state directory (test_volumes_survive_a_daemon_restart)
    new_daemon: Callable[[], Daemon]


def _exec(g: Guest, argv: list[str], timeout: int = 30) -> object:
    pb, _ = APIS["v1alpha2"]
    return g.d.runtime("v1alpha2").ExecSync(pb.ExecSyncRequest(container_id=g.cid, cmd=argv,
                                                               timeout=timeout),
                                            timeout=timeout + 30)


def _sh(g: Guest, script: str, timeout: int = 30) -> tuple[int, str]:
    r = _exec(g, ["sh", "-c", script], timeout)
    return r.exit_code, (r.stdout + r.stderr).decode()  # type: ignore[attr-defined]


def _kubelet_volume(root: Path, kind: str, name: str, files: dict[str, tuple[bytes, int]]
                    ) -> Path:
    vol = root / "volumes" / f"kubernetes.io~{kind}" / name
    stamp = vol / "..2026_12_01_10_00_00.1"
    stamp.mkdir(parents=True)
    for key, (data, mode) in files.items():
        (stamp / key).write_bytes(data)
        os.chmod(stamp / key, mode)
        os.symlink(f"..data/{key}", vol / key)
    os.symlink(stamp.name, vol / "..data")
    return vol


def _cloud_init_done(g: Guest) -> bool:
    try:
        code, _ = _sh(g, "test -f /var/lib/cloud/instance/boot-finished")
    except grpc.RpcError:
        return False  # no agent answering (yet)
    return code == 0


@pytest.fixture(scope="module")
def guest() -> Iterator[Guest]:
    require_libvirtd()
    with module_tmp() as tmp, cni_test_network() as net:
        pod_dir = tmp / "kubelet" / "pod-uid"
        pod_dir.mkdir(parents=True)
        cm = _kubelet_volume(pod_dir, "configmap", "cfg", {"app.conf": (CONFIG, 0o640)})
        secret = _kubelet_volume(pod_dir, "secret", "creds", {"password": (SECRET, 0o644)})
        empty_dir = pod_dir / "volumes" / "kubernetes.io~empty-dir" / "scratch"
        empty_dir.mkdir(parents=True)
        os.chmod(empty_dir, 0o777)  # as the kubelet makes them
        (empty_dir / "from-host").write_text("written on the host\n")
        host_dir = tmp / "kubelet" / "hostdata"
        host_dir.mkdir()
        (host_dir / "ro-file").write_text("read only\n")
        blk = tmp / "block.img"
        with open(blk, "wb") as f:
            f.write(BLOCK_MAGIC)
            f.truncate(64 << 20)
        loop = subprocess.run(["losetup", "--find", "--show", str(blk)], capture_output=True,
                              text=True, check=True).stdout.strip()
        try:
            (tmp / "img").mkdir()
            (tmp / "img" / "guest.qcow2").symlink_to(cloud_guest_image())
            with image_server({"guest.qcow2": tmp / "img" / "guest.qcow2"}) as host:
                image = f"{host}/guest.qcow2"
                def new_daemon() -> Daemon:
                    return vm_runtime(tmp, net, "--volume-allowed-roots", str(tmp / "kubelet"))

                d = new_daemon().start()
                g: Guest | None = None
                pb, _ = APIS["v1alpha2"]
                rt = d.runtime("v1alpha2")
                try:
                    d.images("v1alpha2").PullImage(
                        pb.PullImageRequest(image=pb.ImageSpec(image=image)), timeout=300)
                    cfg = sandbox_config(pb, tmp / "pods", name="volumes", annotations={
                        "VirtletRootVolumeSize": "3Gi",
                        "VirtletExtraDisks": json.dumps([{
                            "name": "data", "size": "256Mi", "format": "ext4",
                            "mountPath": "/data"}])})
                    sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg),
                                           timeout=30).pod_sandbox_id
                    remove = pb.RemovePodSandboxRequest(pod_sandbox_id=sid)
                    cc = container_config(pb, image, memory_mib=512)
                    cc.mounts.extend([
                        pb.Mount(container_path="/etc/app", host_path=str(cm), readonly=True),
                        pb.Mount(container_path="/etc/creds", host_path=str(secret),
                                 readonly=True),
                        pb.Mount(container_path="/scratch", host_path=str(empty_dir)),
                        pb.Mount(container_path="/hostdata", host_path=str(host_dir),
                                 readonly=True),
                        # the kubelet's own file: left out, the guest keeps its /etc/hosts
                        pb.Mount(container_path="/etc/hosts",
                                 host_path=str(pod_dir / "etc-hosts"))])
                    cc.devices.append(pb.Device(container_path="/dev/xvdb", host_path=loop,
                                                permissions="rw"))
                    cid = rt.CreateContainer(pb.CreateContainerRequest(
                        pod_sandbox_id=sid, sandbox_config=cfg, config=cc),
                        timeout=120).container_id
                    try:
                        rt.StartContainer(pb.StartContainerRequest(container_id=cid),
                                          timeout=60)
                        g = Guest(d, sid, cid, tmp, empty_dir, host_dir, loop, new_daemon)
                        wait_for("cloud-init to finish in the guest",
                                 lambda: _cloud_init_done(g), BOOT_TIMEOUT, every=3)
                        yield g
                    finally:
                        (g.d if g else d).runtime("v1alpha2").RemovePodSandbox(
                            remove, timeout=120)
                finally:
                    (g.d if g else d).stop()
        finally:
            subprocess.run(["losetup", "-d", loop], check=False)


def test_configmap_file_content_and_mode(guest: Guest) -> None:
    code, out = _sh(guest, "stat -c '%a %U:%G' /etc/app/app.conf && cat /etc/app/app.conf")
    assert code == 0, out
    assert out == "640 root:root\n" + CONFIG.decode()


def test_secret_readable_by_root_alone(guest: Guest) -> None:
    code, out = _sh(guest, "stat -c '%a %U:%G' /etc/creds/password && cat /etc/creds/password")
    assert code == 0, out
    assert out == "600 root:root\n" + SECRET.decode()
    # as another user it cannot be read
    code, out = _sh(guest, "su -s /bin/sh nobody -c 'cat /etc/creds/password'")
    assert code != 0 and SECRET.decode() not in out


def test_secret_never_world_readable_on_the_host(guest: Guest) -> None:
    vm_dir = Path(guest.d.state_dir) / "vms" / guest.cid
    seed = vm_dir / "seed.iso"
    assert stat.S_IMODE(seed.stat().st_mode) & 0o077 == 0
    assert not [p for p in vm_dir.iterdir() if p.name.startswith(".seed")]  # no staging left
    assert guest.d.log.is_file()
    assert SECRET not in guest.d.log.read_bytes()


def test_empty_dir_shared_both_ways_with_virtiofs(guest: Guest) -> None:
    code, out = _sh(guest, "findmnt -n -o FSTYPE /scratch && cat /scratch/from-host && "
                           "echo written in the guest > /scratch/from-guest && sync")
    assert code == 0, out
    assert out == "virtiofs\nwritten on the host\n"
    assert (guest.empty_dir / "from-guest").read_text() == "written in the guest\n"


def test_readonly_host_path_refuses_writes(guest: Guest) -> None:
    code, out = _sh(guest, "cat /hostdata/ro-file")
    assert (code, out) == (0, "read only\n")
    code, out = _sh(guest, "touch /hostdata/new")
    assert code != 0 and "Read-only file system" in out, out
    assert not (guest.host_dir / "new").exists()


def test_block_device_at_its_device_path(guest: Guest) -> None:
    code, out = _sh(guest, "readlink -f /dev/xvdb && head -c 16 /dev/xvdb")
    assert code == 0, out
    dev, magic = out.split("\n", 1)
    assert dev.startswith("/dev/vd") and dev != "/dev/vda", dev
    assert magic == BLOCK_MAGIC.decode()


def test_extra_disk_formatted_and_mounted(guest: Guest) -> None:
    code, out = _sh(guest, "findmnt -n -o FSTYPE,SOURCE /data && "
                           "echo kept > /data/f && sync && cat /data/f && "
                           "blockdev --getsize64 /dev/disk/by-id/virtio-x-data")
    assert code == 0, out
    fstype, _source, kept, size = out.split()
    assert (fstype, kept, int(size)) == ("ext4", "kept", 256 << 20)
    assert (Path(guest.d.state_dir) / "vms" / guest.cid / "disk-data.qcow2").is_file()


def test_root_filesystem_at_the_requested_size(guest: Guest) -> None:
    code, out = _sh(guest, "df -B1 --output=size / | tail -1")
    assert code == 0, out
    size = int(out)
    assert size > 2.7 * GIB, f"root filesystem {size / GIB:.2f} GiB, asked for 3 GiB"


def test_volumes_survive_a_daemon_restart(guest: Guest) -> None:
    guest.d.stop()
    guest.d = guest.new_daemon().start()
    xml = subprocess.run(["virsh", "-c", "qemu:///system", "dumpxml", f"avr-{guest.cid}"],
                         capture_output=True, text=True, check=True).stdout
    for part in ("<serial>x-data</serial>", "<serial>d-0</serial>", "type='virtiofs'",
                 f"dev='{guest.loop}'"):
        assert part in xml, part
    (guest.empty_dir / "after-restart").write_text("still shared\n")
    code, out = _sh(guest, "cat /scratch/after-restart /data/f")
    assert (code, out) == (0, "still shared\nkept\n")


def test_zz_removed_with_the_pod(guest: Guest) -> None:
    """Runs last: removes the pod and checks what went with it."""
    pb, _ = APIS["v1alpha2"]
    rt = guest.d.runtime("v1alpha2")
    vm_dir = Path(guest.d.state_dir) / "vms" / guest.cid
    rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=guest.sid), timeout=120)
    rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=guest.sid), timeout=120)
    assert f"avr-{guest.cid}" not in domain_names()
    assert not vm_dir.exists()
    time.sleep(1)
    virtiofsd = subprocess.run(["pgrep", "-f", f"source={guest.empty_dir}"],
                               capture_output=True, text=True).stdout.split()
    assert not virtiofsd, "virtiofsd still serves the emptyDir"
    # the loop device is free again (QEMU closed it): losetup -d in teardown detaches it
    assert guest.empty_dir.is_dir()  # the kubelet's directories are the kubelet's
