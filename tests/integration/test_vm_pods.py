"""VM pods on a real libvirtd (QEMU under TCG): pull, run, console log, stop, restart,
crash detection, remove, and nothing left behind. Uses the minimal guest (boots in ~5 s).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.daemon_proc import APIS, Daemon
from tests.integration.test_network_common import CniTestNet
from tests.integration.vmpods import (
    bad_cri_records,
    container_config,
    cri_records,
    domain_names,
    log_text,
    own_netns_names,
    sandbox_config,
    vm_runtime,
    wait_for,
)

pytestmark = pytest.mark.integration
MARKER = "MINIMAL-GUEST-UP"
BOOT_TIMEOUT = 180


@pytest.fixture(autouse=True)
def no_leaked_namespaces() -> Iterator[None]:
    """Counts the namespaces of this test process's pods only (another runtime instance
    may make its own meanwhile)."""
    before = own_netns_names()
    yield
    assert not own_netns_names() - before, "a pod netns leaked"


@pytest.fixture
def vm_daemon(short_tmp: Path, cni_net: CniTestNet) -> Iterator[Daemon]:
    d = vm_runtime(short_tmp, cni_net).start()
    yield d
    d.stop()


def _state(d: Daemon, api: str, cid: str) -> object:
    pb, _ = APIS[api]
    return d.runtime(api).ContainerStatus(pb.ContainerStatusRequest(container_id=cid),
                                          timeout=10).status


def _leftovers(d: Daemon, cid: str) -> list[str]:
    found = [n for n in domain_names() if cid in n]
    vm_dir = Path(d.state_dir) / "vms" / cid
    if vm_dir.exists():
        found.append(str(vm_dir))
    return found


@pytest.mark.parametrize("api", ["v1alpha2", "v1"])
def test_vm_pod_lifecycle(vm_daemon: Daemon, served_minimal_image: str, api: str,
                          short_tmp: Path) -> None:
    d = vm_daemon
    pb, _ = APIS[api]
    rt, img = d.runtime(api), d.images(api)

    ref = img.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=served_minimal_image)),
                        timeout=60).image_ref
    assert ref.startswith("sha256:") and len(ref) == 71
    st = img.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=served_minimal_image)),
                         timeout=10).image
    assert st.id == ref and st.size > 0 and served_minimal_image in st.repo_tags

    log_dir = short_tmp / "pods" / "default_vm-pod"
    sb_cfg = sandbox_config(pb, log_dir)
    sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=sb_cfg, runtime_handler="vm"),
                           timeout=30).pod_sandbox_id
    assert sid == sb_cfg.metadata.uid
    assert rt.RunPodSandbox(pb.RunPodSandboxRequest(config=sb_cfg),
                            timeout=30).pod_sandbox_id == sid, "idempotent"
    sb = rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=10).status
    assert sb.state == pb.SANDBOX_READY and sb.metadata.name == "vm-pod"
    assert sb.runtime_handler == "vm" and sb.network.ip
    listed_pods = rt.ListPodSandbox(pb.ListPodSandboxRequest(filter=pb.PodSandboxFilter(
        label_selector={"app": "vm"})), timeout=10).items
    assert [(p.id, p.runtime_handler) for p in listed_pods] == [(sid, "vm")]
    if api == "v1alpha2":
        assert sb.metadata.tenant == "tenant-a", "the Arktos tenant round-trips"

    req = pb.CreateContainerRequest(pod_sandbox_id=sid, config=container_config(pb,
                                    served_minimal_image), sandbox_config=sb_cfg)
    cid = rt.CreateContainer(req, timeout=60).container_id
    assert rt.CreateContainer(req, timeout=60).container_id == cid, "one VM per sandbox"
    status = _state(d, api, cid)
    assert status.state == pb.CONTAINER_CREATED and status.image_ref == ref
    assert f"avr-{cid}" in domain_names()

    rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=60)
    log_file = log_dir / "vm" / "0.log"
    wait_for("the guest's marker in the pod log",
             lambda: MARKER in log_text(log_file), BOOT_TIMEOUT)
    assert cri_records(log_text(log_file)), "complete records in the log"
    assert not (bad := bad_cri_records(log_text(log_file))), bad[:5]
    status = _state(d, api, cid)
    assert status.state == pb.CONTAINER_RUNNING and status.started_at > status.created_at
    assert status.log_path == str(log_file)
    resources = status.resources if api == "v1alpha2" else status.resources.linux
    assert resources.memory_limit_in_bytes == 256 * 2**20
    listed = rt.ListContainers(pb.ListContainersRequest(filter=pb.ContainerFilter(
        pod_sandbox_id=sid, state=pb.ContainerStateValue(state=pb.CONTAINER_RUNNING),
        label_selector={"role": "guest"})), timeout=10).containers
    assert [c.id for c in listed] == [cid]

    # The kubelet rotates the log: renames it and asks for a new file.
    rotated = log_file.with_name("0.log.1")
    log_file.rename(rotated)
    rt.ReopenContainerLog(pb.ReopenContainerLogRequest(container_id=cid), timeout=10)

    # Stop asks the guest by ACPI; the minimal guest powers itself off.
    rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=60), timeout=90)
    status = _state(d, api, cid)
    assert status.state == pb.CONTAINER_EXITED and status.finished_at >= status.started_at
    assert (status.exit_code, status.reason) == (0, "Completed")
    wait_for("the guest's poweroff line in the reopened log",
             lambda: "MINIMAL-GUEST-POWEROFF" in log_text(log_file), 10)
    assert MARKER in log_text(rotated) and MARKER not in log_text(log_file)
    rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=2), timeout=60)

    # A stopped VM starts again until it is removed.
    rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=60)
    wait_for("the second boot's marker",
             lambda: log_text(log_file).count(MARKER) >= 1, BOOT_TIMEOUT)
    assert _state(d, api, cid).state == pb.CONTAINER_RUNNING

    # StopPodSandbox does not wait for the guest: the VM is destroyed.
    rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=60)
    status = _state(d, api, cid)
    assert status.state == pb.CONTAINER_EXITED
    assert (status.exit_code, status.reason) == (137, "Killed")
    assert log_text(log_file).count("MINIMAL-GUEST-POWEROFF") == 1

    # The kubelet's next attempt for the same pod (sandbox id = pod UID) brings it back.
    sb_cfg.metadata.attempt = 1
    assert rt.RunPodSandbox(pb.RunPodSandboxRequest(config=sb_cfg),
                            timeout=30).pod_sandbox_id == sid
    sb = rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=10).status
    assert sb.state == pb.SANDBOX_READY and sb.metadata.attempt == 1 and sb.network.ip
    rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=60)
    rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=60)
    rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=60)
    rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60)
    rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60)
    with pytest.raises(grpc.RpcError) as e:
        _state(d, api, cid)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert _leftovers(d, cid) == []
    assert not rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=10).items

    img.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=served_minimal_image)),
                    timeout=10)
    assert not img.ListImages(pb.ListImagesRequest(), timeout=10).images
    images_dir = Path(d.state_dir) / "images"
    assert images_dir.is_dir()
    assert not [p for p in images_dir.rglob("*") if p.is_file() and p.name != ".lock"]


def _qemu_pid(cid: str) -> int:
    return int(Path(f"/run/libvirt/qemu/avr-{cid}.pid").read_text().strip())


def _run_pod(d: Daemon, image: str, log_dir: Path, api: str = "v1alpha2") -> tuple[str, str]:
    pb, _ = APIS[api]
    rt = d.runtime(api)
    d.images(api).PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)), timeout=60)
    cfg = sandbox_config(pb, log_dir)
    sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=30).pod_sandbox_id
    cid = rt.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=sid, config=container_config(pb, image), sandbox_config=cfg),
        timeout=60).container_id
    rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=60)
    return sid, cid


def _cleanup(d: Daemon, sid: str) -> None:
    pb, _ = APIS["v1alpha2"]
    d.runtime("v1alpha2").RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid),
                                           timeout=60)


def test_a_vm_whose_qemu_dies_shows_exited_within_seconds(vm_daemon: Daemon,
                                                          served_minimal_image: str,
                                                          short_tmp: Path) -> None:
    d = vm_daemon
    pb, _ = APIS["v1alpha2"]
    sid, cid = _run_pod(d, served_minimal_image, short_tmp / "pods")
    try:
        wait_for("QEMU's pid file", lambda: Path(f"/run/libvirt/qemu/avr-{cid}.pid").exists(),
                 30)
        os.kill(_qemu_pid(cid), signal.SIGKILL)
        t0 = time.monotonic()
        status = wait_for("EXITED after QEMU died",
                          lambda: (s := _state(d, "v1alpha2", cid)).state
                          == pb.CONTAINER_EXITED and s, 10, every=0.05)
        elapsed = time.monotonic() - t0
        assert elapsed < 3, f"took {elapsed:.1f} s"
        assert status.exit_code != 0 and status.reason in ("QemuFailed", "Crashed", "Killed")
        assert status.finished_at > 0
    finally:
        _cleanup(d, sid)
    assert _leftovers(d, cid) == []


def test_vm_survives_kill_9_of_the_daemon_and_is_adopted(
        short_tmp: Path, served_minimal_image: str, cni_net: CniTestNet) -> None:
    d = vm_runtime(short_tmp, cni_net).start()
    pb, _ = APIS["v1alpha2"]
    log_file = short_tmp / "pods" / "vm" / "0.log"
    sid, cid = _run_pod(d, served_minimal_image, short_tmp / "pods")
    try:
        wait_for("marker", lambda: MARKER in log_text(log_file), BOOT_TIMEOUT)
        time.sleep(1)  # past the instant between writing a line and saving its offset
        pid = _qemu_pid(cid)
        assert d.proc is not None
        d.proc.kill()
        d.proc.wait()
        d.stop()
        assert subprocess.run(["virsh", "-c", "qemu:///system", "domstate", f"avr-{cid}"],
                              capture_output=True, text=True).stdout.strip() == "running"
        d = vm_runtime(short_tmp, cni_net).start()
        status = wait_for("RUNNING after restart", lambda: (
            s := _state(d, "v1alpha2", cid)).state == pb.CONTAINER_RUNNING and s, 10)
        assert status.started_at > 0
        assert _qemu_pid(cid) == pid, "the same QEMU: the VM was never restarted"
        # The console keeps flowing into the log after the restart: ask the guest to power
        # off and its goodbye line must arrive.
        assert "MINIMAL-GUEST-POWEROFF" not in log_text(log_file)
        d.runtime("v1alpha2").StopContainer(pb.StopContainerRequest(container_id=cid,
                                                                    timeout=60), timeout=90)
        wait_for("the poweroff line after the restart",
                 lambda: "MINIMAL-GUEST-POWEROFF" in log_text(log_file), 10)
        assert log_text(log_file).count(MARKER) == 1, "no line is copied twice"
    finally:
        _cleanup(d, sid)
        d.stop()
    assert _leftovers(d, cid) == []


def test_bad_container_requests_leave_nothing(vm_daemon: Daemon, served_minimal_image: str,
                                              short_tmp: Path) -> None:
    d = vm_daemon
    pb, _ = APIS["v1alpha2"]
    rt = d.runtime("v1alpha2")
    netns_before = own_netns_names()
    d.images("v1alpha2").PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=served_minimal_image)),
                                   timeout=60)
    cases = {
        "VirtletVCPUCount": "many",
        "VirtletRootVolumeSize": "4 gigs",
        "VirtletDiskDriver": "ide",
        "VirtletCloudInitUserData": "[not, a, mapping]",
        "VirtletSSHKeys": "not a key",
        "NICs": "{broken json",
    }
    for key, value in cases.items():
        cfg = sandbox_config(pb, short_tmp / "pods", annotations={key: value},
                             name=f"bad-{key.lower()}")
        if key == "NICs":  # CNI needs it at RunPodSandbox already: that call fails
            with pytest.raises(grpc.RpcError) as e:
                rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and key in e.value.details()
            continue
        sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=30).pod_sandbox_id
        with pytest.raises(grpc.RpcError) as e:
            rt.CreateContainer(pb.CreateContainerRequest(
                pod_sandbox_id=sid, config=container_config(pb, served_minimal_image),
                sandbox_config=cfg), timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, key
        assert key in e.value.details()
        rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=30)
    hostile = sandbox_config(pb, short_tmp / "pods", name="x</name><evil/>")
    hostile.metadata.uid = "../../etc"
    with pytest.raises(grpc.RpcError) as e:
        rt.RunPodSandbox(pb.RunPodSandboxRequest(config=hostile), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "pod uid" in e.value.details()
    assert not any((Path(d.state_dir) / "vms").iterdir())
    assert not any((Path(d.state_dir) / "networks").iterdir())
    assert not own_netns_names() - netns_before
    assert not rt.ListContainers(pb.ListContainersRequest(), timeout=10).containers
    assert not rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=10).items
