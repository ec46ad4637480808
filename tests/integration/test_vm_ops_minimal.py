"""RebootVM, ExecSync and StopContainer's timeout on the minimal (busybox) guest: one daemon
and one booted guest for the module. The guest has no QEMU guest agent and powers off on
the ACPI power button once booted (acpid), which libvirt's ACPI reboot turns into a reset.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests.daemon_proc import APIS, Daemon
from tests.integration.vm_ops_common import StateWatch, code_of, vm_pod
from tests.integration.vmpods import (
    container_config,
    log_text,
    sandbox_config,
    wait_for,
)

pytestmark = pytest.mark.integration
MARKER = "MINIMAL-GUEST-UP"
BOOT_TIMEOUT = 120


@dataclass
class Pod:
    d: Daemon
    sid: str
    cid: str
    log: Path


def _pod(d: Daemon, image: str, log_dir: Path, api: str, name: str) -> tuple[str, str]:
    pb, _ = APIS[api]
    rt = d.runtime(api)
    cfg = sandbox_config(pb, log_dir, name=name)
    sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=30).pod_sandbox_id
    cid = rt.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=sid, config=container_config(pb, image), sandbox_config=cfg),
        timeout=60).container_id
    rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=60)
    return sid, cid


@pytest.fixture(scope="module")
def booted(served_minimal_image: str) -> Iterator[Pod]:
    with vm_pod(served_minimal_image, name="ops-min", ready_timeout=BOOT_TIMEOUT) as p:
        yield Pod(p.d, p.sid, p.cid, p.log)


@pytest.mark.parametrize("api", ["v1alpha2", "v1"])
def test_exec_in_a_guest_without_agent_is_failed_precondition(booted: Pod, api: str) -> None:
    pb, _ = APIS[api]
    rt = booted.d.runtime(api)
    t0 = time.monotonic()
    code, details = code_of(lambda: rt.ExecSync(pb.ExecSyncRequest(
        container_id=booted.cid, cmd=["uname", "-a"], timeout=5), timeout=30))
    assert code == grpc.StatusCode.FAILED_PRECONDITION, details
    assert "guest agent" in details and booted.cid in details, details
    assert time.monotonic() - t0 < 5, "no agent is seen at once, not after the timeout"
    # Bad input never reaches the guest.
    code, details = code_of(lambda: rt.ExecSync(pb.ExecSyncRequest(
        container_id=booted.cid, cmd=[], timeout=5), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    code, details = code_of(lambda: rt.ExecSync(pb.ExecSyncRequest(
        container_id=booted.cid, cmd=["true"], timeout=-1), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    code, details = code_of(lambda: rt.ExecSync(pb.ExecSyncRequest(
        container_id="0" * 36, cmd=["true"]), timeout=30))
    assert code == grpc.StatusCode.NOT_FOUND, details


@pytest.mark.parametrize("flag", [4, 8, 16, 64, -1, 1 << 40])
def test_reboot_with_unknown_flags_is_invalid_argument(booted: Pod, flag: int) -> None:
    pb, _ = APIS["v1alpha2"]
    rt = booted.d.runtime("v1alpha2")
    code, details = code_of(lambda: rt.RebootVM(pb.RebootVMRequest(
        vm_id=booted.cid, rebootSpec=pb.VmRebootSpec(domainRebootFlag=flag)), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "domainRebootFlag" in details


def test_reboot_bad_delay_unknown_vm_and_missing_agent(booted: Pod) -> None:
    pb, _ = APIS["v1alpha2"]
    rt = booted.d.runtime("v1alpha2")
    for delay in (-1, 10**12):
        code, details = code_of(lambda delay=delay: rt.RebootVM(pb.RebootVMRequest(
            vm_id=booted.cid, rebootSpec=pb.VmRebootSpec(delayInSeconds=delay)), timeout=30))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "delayInSeconds" in details
    code, details = code_of(lambda: rt.RebootVM(pb.RebootVMRequest(vm_id="0" * 36),
                                                timeout=30))
    assert code == grpc.StatusCode.NOT_FOUND, details
    # Guest agent only (2): libvirt's error comes back, now or (delayed) before scheduling.
    for delay in (0, 30):
        code, details = code_of(lambda delay=delay: rt.RebootVM(pb.RebootVMRequest(
            vm_id=booted.cid, rebootSpec=pb.VmRebootSpec(delayInSeconds=delay,
                                                         domainRebootFlag=2)), timeout=30))
        assert code == grpc.StatusCode.FAILED_PRECONDITION, details
        assert "agent" in details, details
    time.sleep(1)
    assert log_text(booted.log).count(MARKER) == 1, "nothing rebooted"


def test_acpi_reboot_now_and_delayed_keeps_the_container_running(booted: Pod) -> None:
    pb, _ = APIS["v1alpha2"]
    rt = booted.d.runtime("v1alpha2")
    before = rt.ContainerStatus(pb.ContainerStatusRequest(container_id=booted.cid),
                                timeout=10).status
    with StateWatch(booted.d, booted.cid) as watch:
        rt.RebootVM(pb.RebootVMRequest(vm_id=booted.cid, rebootSpec=pb.VmRebootSpec(
            domainRebootFlag=1)), timeout=30)
        wait_for("the guest to boot again", lambda: log_text(booted.log).count(MARKER) == 2,
                 BOOT_TIMEOUT)
        # Delayed: returns at once; a second call during the delay is refused.
        t0 = time.monotonic()
        rt.RebootVM(pb.RebootVMRequest(vm_id=booted.cid, rebootSpec=pb.VmRebootSpec(
            delayInSeconds=4, domainRebootFlag=1)), timeout=30)
        assert time.monotonic() - t0 < 2
        code, details = code_of(lambda: rt.RebootVM(pb.RebootVMRequest(
            vm_id=booted.cid), timeout=30))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "scheduled" in details, details
        time.sleep(2)
        assert log_text(booted.log).count(MARKER) == 2, "not before the delay"
        assert "MINIMAL-GUEST-POWEROFF" in log_text(booted.log)
        wait_for("the delayed reboot", lambda: log_text(booted.log).count(MARKER) == 3,
                 BOOT_TIMEOUT)
        time.sleep(1)
    assert watch.polls > 10
    assert watch.seen == ["CONTAINER_RUNNING"], watch.seen
    after = rt.ContainerStatus(pb.ContainerStatusRequest(container_id=booted.cid),
                               timeout=10).status
    assert after.started_at == before.started_at and after.finished_at == 0
    # After the delay has passed, a new reboot is accepted again.
    rt.RebootVM(pb.RebootVMRequest(vm_id=booted.cid, rebootSpec=pb.VmRebootSpec(
        delayInSeconds=600)), timeout=30)
    code, _ = code_of(lambda: rt.RebootVM(pb.RebootVMRequest(vm_id=booted.cid), timeout=30))
    assert code == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize("api", ["v1alpha2", "v1"])
def test_stop_of_a_booting_guest_returns_within_its_timeout(
        booted: Pod, served_minimal_image: str, api: str) -> None:
    """Right after StartContainer the guest is in its firmware or kernel and ignores the
    power button; Stop(T) must still return within T (a conformance client waits T)."""
    pb, _ = APIS[api]
    rt = booted.d.runtime(api)
    log_dir = booted.log.parent.parent / f"stop-{api}"
    sid, cid = _pod(booted.d, served_minimal_image, log_dir, api, f"ops-stop-{api}")
    try:
        timeout = 3
        t0 = time.monotonic()
        rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=timeout),
                         timeout=timeout)  # the client's deadline is T itself
        took = time.monotonic() - t0
        st = rt.ContainerStatus(pb.ContainerStatusRequest(container_id=cid), timeout=10).status
        print(f"Stop({timeout}) of a booting guest took {took:.2f} s: {st.reason} "
              f"exit {st.exit_code}")
        assert st.state == pb.CONTAINER_EXITED
        assert (st.exit_code, st.reason) == (137, "Killed"), "forced off: ACPI was ignored"
        assert MARKER not in log_text(log_dir / "vm" / "0.log")
        # Repeated stop and remove-after-stop answer at once.
        t0 = time.monotonic()
        rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=timeout),
                         timeout=timeout)
        rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=timeout)
        assert time.monotonic() - t0 < timeout
    finally:
        rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60)
