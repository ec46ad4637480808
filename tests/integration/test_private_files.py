"""A VM pod made by a daemon started with umask 022 (as from a shell, or tools/demo):
nothing that holds tenant secrets is readable by others, QEMU still reaches its disks
(the guest boots), and the console log stays below the pod logs directory: a log path
outside it is refused, and a symlink planted after create is never written through."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import grpc
import pytest

from tests.daemon_proc import APIS
from tests.integration.test_network_common import CniTestNet
from tests.integration.vmpods import (
    container_config,
    domain_names,
    log_text,
    sandbox_config,
    vm_runtime,
    wait_for,
)

pytestmark = pytest.mark.integration
MARKER = "MINIMAL-GUEST-UP"
BOOT_TIMEOUT = 180


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_a_vm_pod_under_umask_022_keeps_secrets_private_and_its_log_confined(
        short_tmp: Path, cni_net: CniTestNet, served_minimal_image: str) -> None:
    pb, _ = APIS["v1alpha2"]
    old = os.umask(0o022)
    try:
        d = vm_runtime(short_tmp, cni_net).start()
    finally:
        os.umask(old)
    rt = d.runtime("v1alpha2")
    state = Path(d.state_dir)
    sids: list[str] = []
    try:
        d.images("v1alpha2").PullImage(pb.PullImageRequest(
            image=pb.ImageSpec(image=served_minimal_image)), timeout=60)
        # log_directory=/etc, log_path=passwd: refused, naming the field.
        passwd = os.stat("/etc/passwd")
        etc = sandbox_config(pb, Path("/etc"), name="etc-pod")
        sids.append(rt.RunPodSandbox(pb.RunPodSandboxRequest(config=etc),
                                     timeout=30).pod_sandbox_id)
        bad = container_config(pb, served_minimal_image)
        bad.log_path = "passwd"
        with pytest.raises(grpc.RpcError) as e:
            rt.CreateContainer(pb.CreateContainerRequest(
                pod_sandbox_id=sids[0], config=bad, sandbox_config=etc), timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "log_directory '/etc' is not below" in e.value.details()
        assert (os.stat("/etc/passwd").st_mtime_ns, os.stat("/etc/passwd").st_size) == (
            passwd.st_mtime_ns, passwd.st_size)

        # A symlink planted in the log directory after create is not followed.
        log_dir = d.pod_logs / "default_vm-pod"
        cfg = sandbox_config(pb, log_dir)
        sids.append(rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg),
                                     timeout=30).pod_sandbox_id)
        cid = rt.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=sids[1], config=container_config(pb, served_minimal_image),
            sandbox_config=cfg), timeout=60).container_id
        outside = short_tmp / "outside"
        outside.mkdir()
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / "vm").symlink_to(outside, target_is_directory=True)
        rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=60)
        vm_dir = state / "vms" / cid
        wait_for("the guest's marker on its raw console (QEMU reached its disks)",
                 lambda: MARKER in log_text(vm_dir / "console.log"), BOOT_TIMEOUT)
        time.sleep(1.0)  # five rounds of the console follower
        assert list(outside.iterdir()) == [], "the console went through the symlink"
        (log_dir / "vm").unlink()
        log_file = log_dir / "vm" / "0.log"
        wait_for("the held-back console in the log once the symlink is gone",
                 lambda: MARKER in log_text(log_file), 10)
        assert list(outside.iterdir()) == []

        # Nothing with secrets is readable by others; QEMU's disks are reachable.
        db_files = sorted(state.glob("state.db*"))
        assert any(p.name == "state.db-wal" for p in db_files), db_files
        modes = {str(p.relative_to(state)): _mode(p)
                 for p in [*db_files, vm_dir / "root.qcow2", vm_dir / "seed.iso"]}
        assert not [n for n, m in modes.items() if m & 0o004], {
            n: oct(m) for n, m in modes.items()}
        assert not [n for n in modes if n.startswith("state.db") and modes[n] & 0o077]
        assert _mode(state) == 0o711 and _mode(state / "vms") == 0o711
        assert _mode(vm_dir) == 0o711
        assert _mode(state / "private") == 0o700
    finally:
        for sid in sids:
            rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60)
        d.stop()
    assert not [n for n in domain_names() if n.startswith("avr-") and cid in n]
    assert not any((state / "vms").iterdir())
    assert not {f"avr-{sid}" for sid in sids} & set(os.listdir("/run/netns"))
