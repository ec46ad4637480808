"""Pod network records: immutable values, kept in the store's `networks` table (carried
over from version 1's network.json files), swapped in memory under a lock that never
covers the store write."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from arktos_vm_runtime.adapters import cni, vmnet
from arktos_vm_runtime.errors import NotFound
from arktos_vm_runtime.service.network_state import (
    NIC_FAILED,
    NIC_INPROGRESS,
    NIC_READY,
    Attachment,
    NetworkRecords,
    PodState,
    nic_statuses,
    pod_ips,
)
from arktos_vm_runtime.service.nic_spec import NicInfo
from arktos_vm_runtime.service.store import Store

CONFIG = cni.parse_network_config({"name": "n", "cniVersion": "1.0.0",
                                   "plugins": [{"type": "bridge"}]}, "/x", conflist=True)


def port(slot: int, *addresses: str) -> vmnet.Port:
    return vmnet.Port(ifname=f"eth{slot}", slot=slot, bridge=f"avbr{slot}",
                      tap=f"avt0123abcd{slot}", guest_mac=f"02:00:00:00:00:0{slot + 1}",
                      mtu=1500, addresses=addresses)


def state(sandbox_id: str = "sb1", **kw: Any) -> PodState:
    values: dict[str, Any] = {
        "sandbox_id": sandbox_id, "netns": f"avr-{sandbox_id}", "config": CONFIG,
        "tenant": "t", "namespace": "n", "name": "p", "vpc": "", "extra_args": (),
        "server_address": "169.254.253.1", "ready": True, "next_slot": 1,
        "attachments": (Attachment(ifname="eth0", args=(("IgnoreUnknown", "1"),),
                                   state="ready", nics=(NicInfo(name="eth0", port_id="p0"),),
                                   result={"ips": []}, ports=(port(0, "10.0.0.2/24"),)),),
    }
    values.update(kw)
    return PodState(**values)


def test_records_are_frozen() -> None:
    st = state()
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.ready = False  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.attachments[0].state = "adding"  # type: ignore[misc]


def test_attachments_replaced_appended_removed() -> None:
    st = state()
    eth1 = Attachment(ifname="eth1", args=(), hotplug=True)
    two = st.with_attachment(eth1)
    assert [a.ifname for a in two.attachments] == ["eth0", "eth1"]
    assert [a.ifname for a in st.attachments] == ["eth0"]  # the old value is untouched
    ready = two.with_attachment(dataclasses.replace(eth1, state="ready"))
    assert [a.state for a in ready.attachments] == ["ready", "ready"]
    assert ready.attachment("eth1").state == "ready"
    assert [a.ifname for a in ready.without_attachment("eth0").attachments] == ["eth1"]
    with pytest.raises(NotFound):
        st.attachment("eth9")


def test_ips_and_nic_states() -> None:
    st = state().with_attachment(Attachment(
        ifname="eth1", args=(), state="adding", hotplug=True,
        nics=(NicInfo(name="eth1"),), ports=(port(1, "fd00::5/64", "10.1.0.5/16"),)))
    assert pod_ips(st) == ("10.0.0.2", ("10.0.0.2", "fd00::5", "10.1.0.5"))
    assert [(s.name, s.state) for s in nic_statuses(st, None)] == \
        [("eth0", NIC_READY), ("eth1", NIC_INPROGRESS)]
    assert nic_statuses(st, ["02:00:00:00:00:09"])[0].state == NIC_FAILED


def test_saved_records_come_back_from_the_store(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    records = NetworkRecords(store)
    st = records.save(state())
    assert records.get("sb1") is st and records.current("sb1") is st
    records.save(state("sb2"))
    store.close()
    store = Store(tmp_path / "state.db")  # a restarted daemon
    again = NetworkRecords(store)
    assert again.ids() == ["sb1", "sb2"]
    assert again.get("sb1") == st
    again.forget("sb1")
    assert again.get("sb1") is None and store.get("networks", "sb1") is None
    with pytest.raises(NotFound, match="has no network"):
        again.current("sb1")
    assert NetworkRecords(store).ids() == ["sb2"]


def test_an_unreadable_record_is_left_alone(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    store.put("networks", "bad", {"sandbox_id": "bad", "netns": "avr-bad"})
    store.put("networks", "sb1", state().to_dict())
    assert NetworkRecords(store).ids() == ["sb1"]
    assert store.get("networks", "bad") is not None


def test_version_1_network_files_are_carried_over(tmp_path: Path) -> None:
    st = state()
    old = tmp_path / "networks" / "sb1"
    old.mkdir(parents=True)
    (old / "network.json").write_text(json.dumps(st.to_dict()))
    (old / "dnsmasq.conf").write_text("port=0\n")  # an artefact: it stays
    records = NetworkRecords(Store(tmp_path / "state.db"))
    assert records.get("sb1") == st
    assert not (old / "network.json").exists() and (old / "dnsmasq.conf").exists()


class SlowStore(Store):
    """A store whose writes wait for a signal: the memory lock must not wait with them."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.writing = threading.Event()
        self.go = threading.Event()

    def put(self, table: str, id_: str, data: dict[str, Any], **columns: str) -> None:
        self.writing.set()
        assert self.go.wait(10)
        super().put(table, id_, data, **columns)


def test_the_memory_lock_never_covers_the_store_write(tmp_path: Path) -> None:
    store = SlowStore(tmp_path / "state.db")
    records = NetworkRecords(store)
    store.go.set()
    first = records.save(state())
    store.go.clear()
    writer = threading.Thread(target=records.save, args=(dataclasses.replace(first,
                                                                            ready=False),))
    writer.start()
    assert store.writing.wait(10)
    started = time.monotonic()
    # readers are answered from memory while the write is under way, with the old value
    assert records.get("sb1") is first and records.ids() == ["sb1"]
    with records.locked("sb2"):  # another sandbox's changes do not wait either
        pass
    assert time.monotonic() - started < 1
    store.go.set()
    writer.join(10)
    current = records.get("sb1")
    assert current is not None and not current.ready
