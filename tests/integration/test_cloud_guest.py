"""The main scenario with a real Debian guest and real cloud-init, through both CRI
versions: the pod's user-data runcmd prints a line that must reach the pod's log file, the
guest answers on its CNI address, ACPI stop, remove, and nothing left behind (starting a
stopped VM again is covered with the minimal guest in test_vm_pods). Minutes under TCG:
marked slow.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_proc import APIS
from tests.guest.images import cloud_guest_image
from tests.integration.test_network_common import CniTestNet, cni_test_network
from tests.integration.vmpods import (
    bad_cri_records,
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
CLOUD_INIT_TIMEOUT = 300  # guest-image.md: ~45 s typical under TCG, up to 300 s


@pytest.fixture(scope="module")
def served_cloud_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_libvirtd()
    root = tmp_path_factory.mktemp("cloud")
    (root / "guest.qcow2").symlink_to(cloud_guest_image())
    with image_server({"guest.qcow2": root / "guest.qcow2"}) as host:
        yield f"{host}/guest.qcow2"


def test_cloud_init_runcmd_line_reaches_the_pod_log(short_tmp: Path,
                                                    served_cloud_image: str) -> None:
    """Both versions at once, each with its own daemon, network and guest: a Debian boot
    under TCG keeps about one core busy, so two side by side take little more than one."""
    failed: dict[str, BaseException] = {}

    def run(api: str) -> None:
        try:
            with cni_test_network() as net:
                _scenario(short_tmp / api, served_cloud_image, api, net)
        except BaseException as e:  # reported below, with the other version's outcome
            failed[api] = e

    threads = [threading.Thread(target=run, args=(api,)) for api in ("v1alpha2", "v1")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for api, e in failed.items():
        traceback.print_exception(e)
        print(f"^ the {api} scenario")
    assert not failed, {api: repr(e)[:500] for api, e in failed.items()}


def _scenario(short_tmp: Path, served_cloud_image: str, api: str, net: CniTestNet) -> None:
    pb, _ = APIS[api]
    marker = f"CLOUD-INIT-RUNCMD-{api}-OK"
    short_tmp.mkdir()
    short_tmp.chmod(0o711)  # QEMU (libvirt-qemu) traverses it to the VM disks
    d = vm_runtime(short_tmp, net).start()
    sid = ""
    try:
        rt, img = d.runtime(api), d.images(api)
        img.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=served_cloud_image)),
                      timeout=300)
        log_dir = short_tmp / "pods"
        # The runcmd echoes an env var the runtime wrote to /etc/cloud/environment, so the
        # line proves user-data was merged and the container's envs arrived too.
        annotations = {
            "VirtletVCPUCount": "2",
            "VirtletRootVolumeSize": "2Gi",
            "VirtletCloudInitUserData": (
                "runcmd:\n"
                "  - [sh, -c, '. /etc/cloud/environment; echo \"$GREETING\" > /dev/ttyS0']\n"),
        }
        cfg = sandbox_config(pb, log_dir, annotations=annotations, name=f"cloud-{api}")
        sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=30).pod_sandbox_id
        cid = rt.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=sid, sandbox_config=cfg,
            config=container_config(pb, served_cloud_image, memory_mib=512,
                                    envs={"GREETING": marker})), timeout=120).container_id
        rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=60)
        log_file = log_dir / "vm" / "0.log"
        wait_for("cloud-init's runcmd line in the pod log",
                 lambda: any(line.endswith(f"stdout F {marker}")
                             for line in cri_records(log_text(log_file))),
                 CLOUD_INIT_TIMEOUT, every=1)
        assert not (bad := bad_cri_records(log_text(log_file))), bad[:5]
        # cloud-init applied the static network-config: the guest answers on its CNI address.
        ip = rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid),
                                 timeout=10).status.network.ip
        assert ip.startswith(net.prefix)
        out = wait_for("the guest to answer ping on its CNI address",
                       lambda: " 0% packet loss" in (o := _ping(net, ip)) and o, 60, every=2)
        assert "bytes from" in out
        disk = Path(d.state_dir) / "vms" / cid / "root.qcow2"
        info = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(disk)],
                              capture_output=True, text=True, check=True).stdout
        assert f'"virtual-size": {2 * 2**30}' in info, "root disk grown to VirtletRootVolumeSize"

        rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=120), timeout=180)
        st = rt.ContainerStatus(pb.ContainerStatusRequest(container_id=cid), timeout=10).status
        assert st.state == pb.CONTAINER_EXITED and st.exit_code == 0, (st.reason, st.message)

        rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=60)
        rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60)
        img.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=served_cloud_image)),
                        timeout=30)
        assert not [n for n in domain_names() if cid in n]
        assert not (Path(d.state_dir) / "vms" / cid).exists()
        blobs = Path(d.state_dir) / "images" / "blobs" / "sha256"
        assert not blobs.exists() or not any(blobs.iterdir())
        sid = ""
    finally:
        if sid:  # a failed run leaves no pod (netns, dnsmasq) for the next test to trip on
            with contextlib.suppress(Exception):
                d.runtime(api).RemovePodSandbox(
                    pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)
        d.stop()
        shutil.rmtree(short_tmp / "pods", ignore_errors=True)


def _ping(net: CniTestNet, ip: str) -> str:
    try:
        return net.ping(ip, count=2)
    except AssertionError as e:  # ping exits non-zero while the guest is not up yet
        return str(e)
