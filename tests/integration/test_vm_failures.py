"""Parts failing under running VM pods: libvirtd restarted under three running VMs, and a
QEMU killed under a pod (minimal busybox guest, TCG).

Restarting libvirtd disturbs every libvirt user on the host: run this module only while
holding /tmp/avr-integration.lock (as every integration run does, through flock); the test
starts libvirtd again whatever happens.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_proc import APIS, Daemon
from tests.integration.test_network_common import CniTestNet
from tests.integration.vmpods import (
    CRI_LINE,
    container_config,
    cri_records,
    instance_leftovers,
    log_text,
    sandbox_config,
    vm_runtime,
    wait_for,
)

pytestmark = pytest.mark.integration
pb, _ = APIS["v1alpha2"]
VIRSH = ["virsh", "-c", "qemu:///system"]
MARKER = "MINIMAL-GUEST-UP"
BOOT_TIMEOUT = 180


def qemu_pid(cid: str) -> int:
    return int(Path(f"/run/libvirt/qemu/avr-{cid}.pid").read_text().strip())


def libvirtd_pids() -> list[int]:
    r = subprocess.run(["pidof", "libvirtd"], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split()]


def libvirtd_answers() -> bool:
    return subprocess.run([*VIRSH, "version"], capture_output=True,
                          timeout=30).returncode == 0


@pytest.fixture
def vm_daemon(short_tmp: Path, cni_net: CniTestNet) -> Iterator[Daemon]:
    d = vm_runtime(short_tmp, cni_net).start()
    yield d
    d.stop()


def run_pod(d: Daemon, image: str, logs: Path, name: str) -> tuple[str, str, Path]:
    rt = d.runtime("v1alpha2")
    cfg = sandbox_config(pb, logs / name, name=name)
    sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=60).pod_sandbox_id
    cid = rt.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=sid, sandbox_config=cfg,
        config=container_config(pb, image, memory_mib=128)), timeout=60).container_id
    rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=60)
    return sid, cid, logs / name / "vm" / "0.log"


def status(d: Daemon, cid: str) -> Any:
    return d.runtime("v1alpha2").ContainerStatus(
        pb.ContainerStatusRequest(container_id=cid), timeout=10).status


def runtime_ready(d: Daemon) -> bool:
    try:
        conds = d.runtime("v1alpha2").Status(pb.StatusRequest(), timeout=5).status.conditions
    except Exception:
        return False
    return any(c.type == "RuntimeReady" and c.status for c in conds)


def remove(d: Daemon, sid: str) -> None:
    rt = d.runtime("v1alpha2")
    rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)


def test_libvirtd_restarted_under_three_running_vms(
        vm_daemon: Daemon, served_minimal_image: str, short_tmp: Path,
        cni_net: CniTestNet, capsys: pytest.CaptureFixture[str]) -> None:
    d = vm_daemon
    d.images("v1alpha2").PullImage(pb.PullImageRequest(
        image=pb.ImageSpec(image=served_minimal_image)), timeout=60)
    pods = [run_pod(d, served_minimal_image, short_tmp / "pods", f"vm-{i}") for i in range(3)]
    try:
        for _, _, log_file in pods:
            wait_for("each guest's marker", lambda f=log_file: MARKER in log_text(f),
                     BOOT_TIMEOUT)
        pids = {cid: qemu_pid(cid) for _, cid, _ in pods}
        old = libvirtd_pids()
        assert len(old) == 1, old
        try:
            os.kill(old[0], signal.SIGTERM)
            wait_for("libvirtd to exit", lambda: not libvirtd_pids(), 30)
            wait_for("RuntimeReady false while libvirtd is down",
                     lambda: not runtime_ready(d), 15)
        finally:
            if not libvirtd_answers():
                subprocess.run(["libvirtd", "-d"], check=True, timeout=60)
        t0 = time.monotonic()
        wait_for("libvirtd to answer again", libvirtd_answers, 30)
        wait_for("RuntimeReady again", lambda: runtime_ready(d), 10, every=0.1)
        ready_after = time.monotonic() - t0

        for _, cid, _ in pods:
            assert qemu_pid(cid) == pids[cid], "the VM kept running: the same QEMU"
            os.kill(pids[cid], 0)
            assert status(d, cid).state == pb.CONTAINER_RUNNING
        listed = d.runtime("v1alpha2").ListContainers(pb.ListContainersRequest(
            filter=pb.ContainerFilter(state=pb.ContainerStateValue(
                state=pb.CONTAINER_RUNNING))), timeout=10).containers
        assert {c.id for c in listed} >= {cid for _, cid, _ in pods}
        assert len(d.runtime("v1alpha2").ListPodSandbox(
            pb.ListPodSandboxRequest(), timeout=10).items) == 3

        # Events resume on the new connection: a VM stopped behind the runtime's back
        # shows EXITED (nothing polls libvirt for it).
        _, cid, _ = pods[0]
        subprocess.run([*VIRSH, "destroy", f"avr-{cid}"], check=True, capture_output=True,
                       timeout=60)
        st = wait_for("EXITED from libvirt's event",
                      lambda: (s := status(d, cid)).state == pb.CONTAINER_EXITED and s, 10,
                      every=0.1)
        assert st.reason == "Killed" and st.exit_code == 137
        assert "reconnecting" in d.output() or "connected to libvirt" in d.output()
        with capsys.disabled():
            print(f"\nlibvirtd restart: RuntimeReady again {ready_after:.1f} s after "
                  "libvirtd was started again")
    finally:
        if not libvirtd_answers():
            subprocess.run(["libvirtd", "-d"], timeout=60)
            wait_for("libvirtd back", libvirtd_answers, 30)
        for sid, _, _ in pods:
            remove(d, sid)
    assert instance_leftovers(d, cni_net, [cid for _, cid, _ in pods]) == []


def test_qemu_killed_under_a_pod(vm_daemon: Daemon, served_minimal_image: str,
                                 short_tmp: Path, cni_net: CniTestNet) -> None:
    d = vm_daemon
    d.images("v1alpha2").PullImage(pb.PullImageRequest(
        image=pb.ImageSpec(image=served_minimal_image)), timeout=60)
    sid, cid, log_file = run_pod(d, served_minimal_image, short_tmp / "pods", "vm-k")
    try:
        wait_for("the guest's marker", lambda: MARKER in log_text(log_file), BOOT_TIMEOUT)
        os.kill(qemu_pid(cid), signal.SIGKILL)
        st = wait_for("EXITED after QEMU died",
                      lambda: (s := status(d, cid)).state == pb.CONTAINER_EXITED and s, 10,
                      every=0.1)
        assert st.exit_code != 0 and st.reason in ("QemuFailed", "Crashed", "Killed")
        assert st.finished_at >= st.started_at > 0 and st.message
        # The console log ends cleanly: whole CRI records, the last one ended.
        time.sleep(1.0)  # the follower's last copy
        text = log_text(log_file)
        assert MARKER in text and text.endswith("\n")
        records = cri_records(text)
        assert records and all(CRI_LINE.match(r) for r in records), records[-3:]
    finally:
        remove(d, sid)
    assert instance_leftovers(d, cni_net, [cid]) == []
