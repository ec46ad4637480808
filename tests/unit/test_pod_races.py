"""The two races of issue 9 item 8, on the real Pods, store and libvirt adapter
(test:///default), each brought on cue by a delay at the project's own interfaces (the
image store's status, the pod network's teardown; fakes from test_pods):

- a container created while RemovePodSandbox ran outlived the sandbox (record, domain,
  directory): Remove listed the containers before taking the pod lock;
- StopPodSandbox wrote back a record read before RemovePodSandbox deleted it, so the
  removed sandbox came back after a restart.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import libvirt
import pytest

from arktos_vm_runtime.errors import FailedPrecondition, NotFound
from arktos_vm_runtime.service.podstate import PodState
from arktos_vm_runtime.service.records import SANDBOX_NOTREADY, ContainerRecord
from arktos_vm_runtime.service.store import Store
from tests.unit import test_pods
from tests.unit.test_pods import Env, FakeImage, container_input, libvirt_state, sandbox, wait_for

# test_pods' fixtures, shared
base_image = test_pods.base_image
env = test_pods.env


class Gate:
    """Blocks the first call of a wrapped method until opened (or `timeout` passes)."""

    def __init__(self, timeout: float = 10.0) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.timeout = timeout
        self._first = True

    def pass_through(self) -> None:
        if self._first:
            self._first = False
            self.entered.set()
            self.opened.wait(self.timeout)


def _thread(target: Any, *args: Any) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target(*args)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    return t, errors


def test_a_container_created_during_remove_sandbox_does_not_outlive_it(env: Env) -> None:
    """CreateContainer holds the pod lock (stopped in its image lookup) when
    RemovePodSandbox arrives; Remove must wait for it and remove the VM it made. Before,
    Remove listed the sandbox's containers (none yet) before the lock, then deleted the
    sandbox under it after Create had finished: record, domain and directory stayed."""
    pods = env.pods()
    sb = sandbox()
    pods.run_sandbox(sb)
    gate = Gate()
    real_status = env.images.status

    def status(name: str) -> FakeImage | None:
        gate.pass_through()
        return real_status(name)

    env.images.status = status  # type: ignore[method-assign]
    create, create_errors = _thread(pods.create_container, sb.id, container_input())
    assert gate.entered.wait(10), "Create reached the image lookup under the pod lock"
    remove, remove_errors = _thread(pods.remove_sandbox, sb.id)
    # Remove is now waiting for the pod lock Create holds.
    wait_for(lambda: pods.state.pod_locks.users(sb.id) == 2)
    time.sleep(0.1)
    gate.opened.set()
    create.join(20)
    remove.join(20)
    assert not create_errors and not remove_errors, (create_errors, remove_errors)
    with pytest.raises(NotFound):
        pods.sandbox(sb.id)
    assert pods.containers() == [], "the VM created meanwhile was removed with its pod"
    assert env.store.all("containers") == [] and env.store.all("sandboxes") == []
    assert not any((env.root / "vms").iterdir()), "no VM directory left"
    assert not [d for d in libvirt.open("test:///default").listAllDomains()
                if sb.id in d.XMLDesc(0)], "no domain left"


def test_create_after_remove_began_is_refused(env: Env) -> None:
    """A CreateContainer arriving while RemovePodSandbox tears the network down finds the
    sandbox stopped (marked before the teardown) or gone, and makes nothing."""
    pods = env.pods()
    sb = sandbox()
    pods.run_sandbox(sb)
    gate = Gate()
    real_teardown = env.networks.teardown

    def teardown(sid: str) -> None:
        gate.pass_through()
        real_teardown(sid)

    env.networks.teardown = teardown  # type: ignore[method-assign]
    remove, remove_errors = _thread(pods.remove_sandbox, sb.id)
    assert gate.entered.wait(10)
    assert pods.sandbox(sb.id).state == SANDBOX_NOTREADY, "marked before the teardown"
    create, create_errors = _thread(pods.create_container, sb.id, container_input())
    wait_for(lambda: pods.state.pod_locks.users(sb.id) == 2)
    gate.opened.set()
    remove.join(20)
    create.join(20)
    assert not remove_errors
    assert len(create_errors) == 1 and isinstance(create_errors[0], (NotFound,
                                                                     FailedPrecondition))
    assert env.store.all("containers") == [] and env.store.all("sandboxes") == []
    assert not any((env.root / "vms").iterdir())


def test_stop_overlapping_remove_never_brings_the_sandbox_back(env: Env) -> None:
    """RemovePodSandbox is tearing the network down (stopped there) when StopPodSandbox
    arrives and reads the record; Remove deletes it; Stop must not write it back. The old
    StopPodSandbox read the record before the pod lock and wrote it back after: the
    sandbox reappeared in the store and so after a restart."""
    pods = env.pods()
    sb = sandbox()
    pods.run_sandbox(sb)
    cid = pods.create_container(sb.id, container_input())
    pods.start_container(cid)
    gate = Gate()
    real_teardown = env.networks.teardown

    def teardown(sid: str) -> None:
        gate.pass_through()
        real_teardown(sid)

    env.networks.teardown = teardown  # type: ignore[method-assign]
    remove, remove_errors = _thread(pods.remove_sandbox, sb.id)
    assert gate.entered.wait(10)
    stop, stop_errors = _thread(pods.stop_sandbox, sb.id)
    wait_for(lambda: pods.state.pod_locks.users(sb.id) == 2)
    gate.opened.set()
    remove.join(20)
    stop.join(20)
    assert not remove_errors and not stop_errors, (remove_errors, stop_errors)
    assert env.store.all("sandboxes") == [] and env.store.all("containers") == []
    assert libvirt_state(cid) is None
    again = env.pods()  # a restart: memory from the store
    assert again.sandboxes() == [] and again.containers() == []


def test_an_update_never_inserts(tmp_path: Path) -> None:
    """The store's update writes only a row that exists; PodState's changes go through it,
    so a writer holding a record of a removed sandbox or container writes nothing."""
    store = Store(tmp_path / "state.db")
    assert not store.update("sandboxes", "gone", {"id": "gone"})
    assert store.update_many("containers", [("gone", {"id": "gone"}, {"sandbox_id": "x"})]) == 0
    assert store.all("sandboxes") == [] and store.all("containers") == []

    state = PodState(store)
    sb = sandbox()
    state.add_sandbox(sb)
    held = state.sandbox(sb.id)
    assert held is not None
    state.delete_sandbox(sb.id)
    stale = dataclasses.replace(held, state=SANDBOX_NOTREADY)
    assert state.change_sandbox(sb.id, lambda _: stale) is None
    assert state.sandbox(sb.id) is None and store.get("sandboxes", sb.id) is None

    rec = ContainerRecord(id="c1", sandbox_id=sb.id, name="vm", attempt=0, state="CREATED",
                          created_at=1, image="img", image_ref="x", vm_dir="/nowhere")
    state.put_container(rec)
    state.delete_container(rec.id)
    assert state.set_container(rec.id, state="CONTAINER_EXITED") is None
    state.save_console_offsets({rec.id: 99})
    assert store.all("containers") == []
    assert PodState(store).sandboxes() == [] and PodState(store).containers() == []
    store.close()
