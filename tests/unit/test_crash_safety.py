"""Crash safety without root: the fault-injection points, and reconcile isolating each
sandbox's failure (the real Pods, store and libvirt adapter on test:///default, the pod
network a fake at PodNetworks' interface, as in test_pods)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from arktos_vm_runtime.errors import FailedPrecondition, InvalidArgument, Unavailable
from arktos_vm_runtime.service import faults
from arktos_vm_runtime.service.records import SANDBOX_NOTREADY
from tests.unit import test_pods
from tests.unit.test_pods import Env, FakeNetworks, container_input, libvirt_state, sandbox

# The fixtures of test_pods, shared.
env = test_pods.env
base_image = test_pods.base_image

RUNTIME = Path(__file__).resolve().parents[2] / "runtime"


@pytest.fixture(autouse=True)
def disarmed() -> Iterator[None]:
    yield
    faults.install([])


def test_every_listed_point_is_in_the_code_once_and_no_other() -> None:
    used: list[str] = []
    for path in RUNTIME.rglob("*.py"):
        used += re.findall(r'faults\.point\("([a-z_]+\.[a-z_]+)"', path.read_text())
    assert sorted(used) == sorted(faults.ALL_POINTS)


def test_a_spec_is_refused_unless_explicitly_enabled() -> None:
    assert faults.from_environment({}) == []
    spec = {faults.SPEC_ENV: "run_sandbox.netns=crash@sb-1"}
    with pytest.raises(InvalidArgument, match="testing aid"):
        faults.from_environment(spec)
    with pytest.raises(InvalidArgument, match="testing aid"):
        faults.from_environment({**spec, faults.ENABLE_ENV: "1"})
    assert faults.from_environment({**spec, faults.ENABLE_ENV: faults.ENABLE_VALUE}) == [
        faults.Fault("run_sandbox.netns", "crash", "sb-1")]
    for bad in ("nowhere=raise", "run_sandbox.netns=explode", "run_sandbox.netns"):
        with pytest.raises(InvalidArgument):
            faults.parse(bad)


def test_a_fault_fires_once_and_only_for_its_sandbox() -> None:
    faults.install(faults.parse("stop_sandbox.recorded=raise@a,remove_sandbox.recorded=raise"))
    faults.point("stop_sandbox.recorded", "b")  # another sandbox: nothing
    with pytest.raises(Unavailable, match=r"injected fault at stop_sandbox\.recorded"):
        faults.point("stop_sandbox.recorded", "a")
    faults.point("stop_sandbox.recorded", "a")  # once
    with pytest.raises(faults.InjectedFault):
        faults.point("remove_sandbox.recorded", "any")
    faults.point("remove_sandbox.recorded", "any")


class FlakyNetworks(FakeNetworks):
    """A pod network whose teardown (CNI DEL) fails for the sandboxes in `broken`."""

    def __init__(self) -> None:
        super().__init__()
        self.broken: set[str] = set()

    def teardown(self, sid: str) -> None:
        self.calls.append(("teardown", sid))
        if sid in self.broken:
            raise Unavailable(f"CNI DEL of {sid} failed (fake)")
        self.up.discard(sid)


def test_one_failing_sandbox_never_blocks_reconcile_nor_the_others(env: Env) -> None:
    """Issue 9 item 2: an orphan network whose DEL fails made reconcile fail every 5 s and
    every pod's container RPCs answer UNAVAILABLE."""
    env.networks = FlakyNetworks()
    pods = env.pods()
    good = sandbox()
    pods.run_sandbox(good)
    pods.close()
    env.networks.up.add("orphan")  # a network record with no sandbox record
    env.networks.broken.add("orphan")

    again = env.pods()  # the first phase: containers only
    again.reconcile()  # the second: the orphan's DEL fails, the pass goes on
    assert set(again.reconcile_pending()) == {"orphan"}
    assert ("restore", good.id) in env.networks.calls, "the other sandbox was restored"
    cid = again.create_container(good.id, container_input())
    again.start_container(cid)
    again.stop_container(cid, 0)
    again.remove_container(cid)

    rec = again._reconciler
    rec.retry()  # not due yet: nothing
    assert env.networks.calls.count(("teardown", "orphan")) == 1
    rec._retry_at = 0
    rec.retry()  # due, still failing: kept, the delay doubles
    assert set(again.reconcile_pending()) == {"orphan"} and rec._retry_delay == 10
    env.networks.broken.clear()
    rec._retry_at = 0
    rec.retry()
    assert again.reconcile_pending() == {} and "orphan" not in env.networks.up
    again.remove_sandbox(good.id)


def test_a_failed_run_whose_undo_leaves_a_network_is_retried_without_a_restart(
        env: Env) -> None:
    env.networks = FlakyNetworks()
    pods = env.pods()
    sb = sandbox()

    def fail_setup(sid: str, *args: object) -> None:
        env.networks.up.add(sid)  # made in part; its undo (CNI DEL) fails
        raise Unavailable("CNI ADD failed (fake)")

    env.networks.setup = fail_setup  # type: ignore[method-assign]
    env.networks.broken.add(sb.id)
    with pytest.raises(Unavailable):
        pods.run_sandbox(sb)
    assert pods.state.sandbox(sb.id) is None
    assert set(pods.reconcile_pending()) == {sb.id}
    env.networks.broken.clear()
    pods._reconciler._retry_at = 0
    pods._reconciler.retry()
    assert pods.reconcile_pending() == {} and sb.id not in env.networks.up


def test_remove_is_marked_first_and_finished_by_the_next_call(env: Env) -> None:
    pods = env.pods()
    sb = sandbox()
    pods.run_sandbox(sb)
    cid = pods.create_container(sb.id, container_input())
    faults.install(faults.parse(f"remove_sandbox.containers_removed=raise@{sb.id}"))
    with pytest.raises(faults.InjectedFault):
        pods.remove_sandbox(sb.id)
    marked = pods.sandbox(sb.id)
    assert marked.removing and marked.state == SANDBOX_NOTREADY
    with pytest.raises(FailedPrecondition):  # no container is made in it any more
        pods.create_container(sb.id, container_input())
    assert libvirt_state(cid) is None
    pods.remove_sandbox(sb.id)
    assert pods.sandboxes() == [] and pods.containers() == []
    assert env.store.all("sandboxes") == [] and env.store.all("containers") == []


def test_removals_cut_short_are_finished_by_reconcile(env: Env) -> None:
    pods = env.pods()
    sb1, sb2 = sandbox(), sandbox()
    for sb in (sb1, sb2):
        pods.run_sandbox(sb)
    cid1 = pods.create_container(sb1.id, container_input())
    cid2 = pods.create_container(sb2.id, container_input())
    pods.start_container(cid2)
    # As a crash leaves them: RemoveContainer and RemovePodSandbox marked, nothing done.
    pods.state.set_container(cid2, removing=True)
    pods.state.change_sandbox(sb1.id, lambda r: dataclasses.replace(r, removing=True))
    pods.close()

    again = env.pods()
    again.reconcile()
    assert [s.id for s in again.sandboxes()] == [sb2.id]
    assert again.containers() == []
    assert libvirt_state(cid1) is None and libvirt_state(cid2) is None
    assert ("teardown", sb1.id) in env.networks.calls
    again.remove_sandbox(sb2.id)


def test_run_after_a_remove_cut_short_finishes_it_then_runs_afresh(env: Env) -> None:
    pods = env.pods()
    sb = sandbox()
    pods.run_sandbox(sb)
    cid = pods.create_container(sb.id, container_input())
    faults.install(faults.parse(f"remove_container.undefined=raise@{sb.id}"))
    with pytest.raises(faults.InjectedFault):
        pods.remove_sandbox(sb.id)
    assert libvirt_state(cid) is None and pods.state.container(cid) is not None
    assert pods.run_sandbox(sb) == sb.id  # the kubelet's retry for the same pod
    assert pods.state.container(cid) is None
    assert not pods.sandbox(sb.id).removing
    assert env.networks.calls[-2:] == [("teardown", sb.id), ("setup", sb.id)]
    pods.remove_sandbox(sb.id)
