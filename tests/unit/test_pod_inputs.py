"""Hostile pod inputs on the real Pods (test:///default, as in test_pods): console logs
confined to the pod logs directory."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from arktos_vm_runtime.errors import InvalidArgument
from arktos_vm_runtime.service.records import RUNNING
from tests.unit import test_pods
from tests.unit.test_pods import Env, container_input, sandbox, wait_for

# The fixtures of test_pods, shared.
env = test_pods.env
base_image = test_pods.base_image


def test_a_log_path_outside_the_pod_logs_dir_is_refused(env: Env) -> None:
    """log_directory=/etc, log_path=passwd: refused at CreateContainer, nothing made."""
    passwd = os.stat("/etc/passwd")
    pods = env.pods()
    sb = sandbox(log_directory="/etc")
    pods.run_sandbox(sb)
    with pytest.raises(InvalidArgument, match="log_directory '/etc' is not below"):
        pods.create_container(sb.id, container_input(log_path="passwd"))
    sb2 = sandbox(log_directory=str(env.root / "pods" / "p"))
    pods.run_sandbox(sb2)
    with pytest.raises(InvalidArgument, match="log_path"):
        pods.create_container(sb2.id, container_input(log_path="../../../etc/passwd"))
    assert pods.containers() == [] and env.store.all("containers") == []
    assert not any((env.root / "vms").iterdir())
    after = os.stat("/etc/passwd")
    assert (after.st_size, after.st_mtime_ns) == (passwd.st_size, passwd.st_mtime_ns)


def test_a_symlink_planted_after_create_is_not_followed(env: Env, tmp_path: Path) -> None:
    pods = env.pods()
    log_dir = env.root / "pods" / "default_vm-pod"
    sb = sandbox(log_directory=str(log_dir))
    pods.run_sandbox(sb)
    cid = pods.create_container(sb.id, container_input())
    outside = tmp_path / "outside"
    outside.mkdir()
    (log_dir / "vm").parent.mkdir(parents=True, exist_ok=True)
    (log_dir / "vm").symlink_to(outside, target_is_directory=True)  # after the check
    (Path(pods.container(cid).vm_dir) / "console.log").write_bytes(b"GUEST-UP\n")
    pods.start_container(cid)
    assert pods.container(cid).state == RUNNING
    time.sleep(1.0)  # five rounds of the console thread
    assert list(outside.iterdir()) == [], "written through the planted symlink"
    (log_dir / "vm").unlink()  # the operator removes it: the console arrives, whole
    log = log_dir / "vm" / "0.log"
    wait_for(lambda: log.exists() and b"GUEST-UP" in log.read_bytes())
    assert not log.is_symlink() and list(outside.iterdir()) == []
    pods.remove_sandbox(sb.id)
