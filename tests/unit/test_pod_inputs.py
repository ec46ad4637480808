"""Hostile pod inputs on the real Pods (test:///default, as in test_pods): console logs
confined to the pod logs directory, the guest's hostname checked, a StopContainer timeout
beyond what a thread can wait."""

from __future__ import annotations

import os
import time
from pathlib import Path

import libvirt
import pytest

from arktos_vm_runtime.errors import InvalidArgument
from arktos_vm_runtime.service.container_create import log_file
from arktos_vm_runtime.service.records import EXITED, RUNNING
from tests.unit import test_pods
from tests.unit.test_pods import URI, Env, container_input, libvirt_state, sandbox, wait_for

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


@pytest.mark.parametrize("name", ["../../etc", "x</name>", "a b", "-x", "x" * 254])
def test_a_pod_name_that_would_be_a_bad_hostname_is_refused(env: Env, name: str) -> None:
    pods = env.pods()
    with pytest.raises(InvalidArgument, match="pod name"):
        pods.run_sandbox(sandbox(name=name, hostname=""))
    assert pods.sandboxes() == [] and ("setup", "") not in {
        (c, "") for c, _ in env.networks.calls}
    # with a good hostname, the name is not what the guest is called
    assert pods.run_sandbox(sandbox(name="vm-pod", hostname="")) != ""


def test_a_stop_timeout_beyond_timeout_max_is_capped(env: Env,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # The test driver has no ACPI (shutdown flags): its plain shutdown powers off at once.
    monkeypatch.setattr(
        env.domains, "shutdown",
        lambda cid, _sandbox_id: libvirt.open(URI).lookupByUUIDString(cid).shutdown())
    pods = env.pods()
    sb = sandbox()
    pods.run_sandbox(sb)
    cid = pods.create_container(sb.id, container_input())
    pods.start_container(cid)
    pods.stop_container(cid, 2**63 - 1)  # CRI's int64 maximum: waits, never OverflowError
    c = pods.container(cid)
    assert (c.state, c.exit_code) == (EXITED, 0)
    assert libvirt_state(cid) == libvirt.VIR_DOMAIN_SHUTOFF
    pods.remove_sandbox(sb.id)


def test_log_file_paths_must_lie_below_the_pod_logs_dir() -> None:
    root = "/var/log/pods"
    assert log_file(root, root, "vm/0.log") == "/var/log/pods/vm/0.log"
    assert log_file(root, f"{root}/ns_p_u/", "./vm/0.log") == "/var/log/pods/ns_p_u/vm/0.log"
    assert log_file(root, "", "vm/0.log") == "" and log_file(root, root, "") == ""
    for directory, relative in (("/etc", "passwd"), ("/var/log/podsx", "0.log"),
                                ("/var/log", "pods"), ("/", "etc/passwd")):
        with pytest.raises(InvalidArgument, match=r"log_directory .* is not below"):
            log_file(root, directory, relative)
    for directory, relative in ((root, "../x"), (f"{root}/..", "x"), (root, "/etc/x")):
        with pytest.raises(InvalidArgument):
            log_file(root, directory, relative)
