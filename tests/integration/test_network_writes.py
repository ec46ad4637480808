"""RunPodSandbox's network writes (issue 13): each record is in the store before the side
effect it records, in as few commits as that allows. Real bridge + host-local plugins in a
throwaway namespace; the hooks only look at the store when each step starts.
"""

from __future__ import annotations

from typing import Any

import pytest

from arktos_vm_runtime.adapters import netns, vmnet
from arktos_vm_runtime.service.vmconfig import parse_vm_config
from tests.integration.test_network import (
    ANNOTATIONS,
    assert_nothing_left,
    net,  # noqa: F401 - the fixture
    networks,
    sandbox_id,
    stored,
)
from tests.integration.test_network_common import CniTestNet

pytestmark = pytest.mark.integration


def test_setup_records_before_each_step_in_four_writes(
        net: CniTestNet, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    pn = networks(net)
    sid = sandbox_id()
    records = pn._records
    saves: list[Any] = []
    seen: dict[str, Any] = {}

    real_save, real_create, real_wire = records.save, netns.create, vmnet.wire
    real_add = pn._wiring.cni.add

    def save(st: Any) -> Any:
        saves.append(st)
        return real_save(st)

    def create(name: str, **kw: Any) -> None:
        seen["netns"] = stored(net, sid)  # what a kill -9 here would leave
        real_create(name, **kw)

    def add(*args: Any) -> Any:
        seen["add"] = stored(net, sid)
        return real_add(*args)

    def wire(ns: str, ifname: str, sandbox: str, slot: int, server: str) -> Any:
        seen["wire"] = (slot, stored(net, sid))
        return real_wire(ns, ifname, sandbox, slot, server)

    monkeypatch.setattr(records, "save", save)
    monkeypatch.setattr(netns, "create", create)
    monkeypatch.setattr(pn._wiring.cni, "add", add)
    monkeypatch.setattr(vmnet, "wire", wire)

    pod = pn.setup(sid, "tenant-a", "default", "vm-pod", parse_vm_config(ANNOTATIONS))
    try:
        # the attachment before the namespace and the ADD: teardown finds both
        for step in ("netns", "add"):
            (att,) = seen[step]["attachments"]
            assert att["ifname"] == "eth0" and att["result"] is None, step
            assert seen[step]["next_slot"] == 0, step
        # the ADD's result (DEL's prevResult) and the tap's slot, both before the tap
        slot, before_wire = seen["wire"]
        assert slot == 0 and before_wire["next_slot"] == 1
        (att,) = before_wire["attachments"]
        assert att["result"] is not None and att["ports"] == []
        # attachment; result + slot; the port; ready: four commits (five before issue 13)
        assert len(saves) == 4, [(s.next_slot, s.ready) for s in saves]
        final = stored(net, sid)
        assert final is not None and final["ready"] and final["next_slot"] == 1
        assert final["attachments"][0]["ports"][0]["tap"] == pod.interfaces[0].target_dev
    finally:
        pn.teardown(sid)
    assert_nothing_left(net, sid, pn)
