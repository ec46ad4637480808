"""Snapshots through the real Pods, store and libvirt adapter on libvirt's test:///default
driver (which keeps snapshot metadata and reverts domains without QEMU): the checks and
their errors, the store rows, restore of a running VM re-wiring its taps without an EXITED
flicker, reconcile after a restart, rows going with the VM. The pod network is the fake of
test_pods (at PodNetworks' interface). The guest's files: tests/integration."""

from __future__ import annotations

import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from arktos_vm_runtime.adapters.libvirt_snapshots import snapshot_disks, snapshot_xml
from arktos_vm_runtime.errors import AlreadyExists, InvalidArgument, NotFound
from arktos_vm_runtime.service.records import EXITED, RUNNING
from arktos_vm_runtime.service.snapshots import SNAP_CREATING, SnapshotRecord
from tests.unit import test_pods
from tests.unit.test_pods import URI, Env, container_input, sandbox

# The fixtures of test_pods, shared.
env = test_pods.env
base_image = test_pods.base_image

GOLDEN = Path(__file__).parent / "golden"


def test_snapshot_xml_escapes_and_covers_only_qcow2_disks() -> None:
    xml = snapshot_xml("a<b>&'\"", [("vda", True), ("hdc", False)], "d&<")
    assert "<b>" not in xml and "&amp;" in xml
    root = ET.fromstring(xml)
    assert root.findtext("name") == "a<b>&'\"" and root.findtext("description") == "d&<"
    assert [(d.get("name"), d.get("snapshot")) for d in root.iter("disk")] == \
        [("vda", "internal"), ("hdc", "no")]
    domain = (GOLDEN / "domain-virtio-tcg.xml").read_text()
    assert snapshot_disks(domain) == [("vda", True), ("hdc", False)], \
        "the root qcow2 internal, the read-only raw seed ISO not"


def _running_vm(env: Env) -> tuple[object, str]:
    pods = env.pods()
    sb = sandbox()
    pods.run_sandbox(sb)
    cid = pods.create_container(sb.id, container_input())
    pods.start_container(cid)
    return pods, cid


def test_create_restore_and_their_errors(env: Env) -> None:
    pods, cid = _running_vm(env)
    snaps = pods.snapshots  # type: ignore[attr-defined]
    for bad in ("../x", "a/b", "<x>", "", "x" * 129, "-f", "a b"):
        with pytest.raises(InvalidArgument):
            snaps.create(cid, bad, 0)
        with pytest.raises(InvalidArgument):
            snaps.restore(cid, bad, 0)
    with pytest.raises(InvalidArgument, match="flags"):
        snaps.create(cid, "s1", 4)
    with pytest.raises(InvalidArgument, match="flags"):
        snaps.restore(cid, "s1", -1)
    with pytest.raises(NotFound):
        snaps.create("0" * 8 + "-0000-4000-8000-" + "0" * 12, "s1", 0)
    with pytest.raises(NotFound):
        snaps.restore(cid, "s1", 0)
    assert snaps.of(cid) == []

    rec = snaps.create(cid, "s1", 0)
    assert (rec.snapshot_id, rec.state, rec.vm_state) == ("s1", "READY", "running")
    with pytest.raises(AlreadyExists):
        snaps.create(cid, "s1", 0)
    dom = libvirt.open(URI).lookupByUUIDString(cid)
    assert dom.snapshotListNames() == ["s1"]

    seen: list[str] = []
    stop = threading.Event()

    def watch() -> None:  # the container's state as List shows it, during the restore
        while not stop.is_set():
            seen.append(pods.container(cid).state)  # type: ignore[attr-defined]

    t = threading.Thread(target=watch)
    t.start()
    env.networks.calls.clear()
    try:
        snaps.restore(cid, "s1", 0)
    finally:
        stop.set()
        t.join()
    assert EXITED not in seen and seen, "RUNNING throughout the restore"
    assert pods.container(cid).state == RUNNING  # type: ignore[attr-defined]
    sid = pods.container(cid).sandbox_id  # type: ignore[attr-defined]
    assert env.networks.calls == [("before_vm_start", sid), ("after_vm_started", sid)]
    assert dom.isActive()
    pods.remove_sandbox(sid)  # type: ignore[attr-defined]
    assert snaps.of(cid) == []


def test_rows_survive_a_restart_reconcile_and_go_with_the_vm(env: Env) -> None:
    pods, cid = _running_vm(env)
    pods.snapshots.create(cid, "kept", 0)  # type: ignore[attr-defined]
    sid = pods.container(cid).sandbox_id  # type: ignore[attr-defined]
    dom = libvirt.open(URI).lookupByUUIDString(cid)
    # A crash between the row and libvirt's answer, both ways; and a row of a removed VM.
    dom.snapshotCreateXML(snapshot_xml("taken", []), 0)
    for name, c in (("taken", cid), ("never", cid), ("orphan", "gone-vm")):
        r = SnapshotRecord(c, name, sid, SNAP_CREATING, "", 1)
        env.store.put("snapshots", r.key, r.to_dict(), container_id=c)

    again = env.pods()  # a new daemon on the same store: reconciles
    rows = {r.snapshot_id: (r.state, r.vm_state) for r in again.snapshots.of(cid)}
    assert rows == {"kept": ("READY", "running"), "taken": ("READY", "running")}
    assert again.snapshots.of("gone-vm") == []
    with pytest.raises(AlreadyExists):
        again.snapshots.create(cid, "kept", 0)

    again.stop_sandbox(sid)
    again.remove_sandbox(sid)
    assert again.snapshots.of(cid) == [] and env.store.all("snapshots") == []
