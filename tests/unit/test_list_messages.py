"""The relist's message cache (api/convert.MessageCache): a record's message is built again
when the record changes, per API version, and what is kept for removed records goes."""

from __future__ import annotations

import dataclasses
import types
from typing import Any

from arktos_vm_runtime.api import convert
from arktos_vm_runtime.api.gen.v1 import api_pb2 as v1
from arktos_vm_runtime.api.gen.v1alpha2 import api_pb2 as v1alpha2
from arktos_vm_runtime.service.records import ContainerRecord


def call(pb: Any, version: str) -> Any:
    return types.SimpleNamespace(pb=pb, api_version=version)


def record(cid: str, state: str = "CONTAINER_RUNNING") -> ContainerRecord:
    return ContainerRecord(id=cid, sandbox_id="sb-" + cid, name="vm", attempt=0,
                           state=state, created_at=1, image="img", image_ref="sha256:x",
                           vm_dir="/v", log_path="vm/0.log", labels={"a": cid})


def test_messages_follow_the_records() -> None:
    built: list[str] = []

    def build(c: Any, rec: ContainerRecord) -> Any:
        built.append(f"{c.api_version}/{rec.id}")
        return convert.container(c, rec)

    cache = convert.MessageCache(build)
    a, b = record("a"), record("b")
    alpha, one = call(v1alpha2, "v1alpha2"), call(v1, "v1")
    first = cache.messages(alpha, [a, b], every=True)
    assert [m.id for m in first] == ["a", "b"] and built == ["v1alpha2/a", "v1alpha2/b"]
    again = cache.messages(alpha, [a, b], every=True)
    assert again[0] is first[0] and len(built) == 2  # unchanged records: kept messages

    # The other version has its own messages (its own classes).
    assert type(cache.messages(one, [a], every=False)[0]) is v1.Container
    assert built[-1] == "v1/a"

    # A change replaces the record: its message is built again and says the new state.
    a2 = dataclasses.replace(a, state="CONTAINER_EXITED")
    out = cache.messages(alpha, [a2, b], every=True)
    assert out[0].state == v1alpha2.CONTAINER_EXITED and out[1] is first[1]
    assert built[-1] == "v1alpha2/a"

    # b removed: a full list drops what was kept for it (this version only).
    cache.messages(alpha, [a2], every=True)
    built.clear()
    cache.messages(alpha, [a2, b], every=False)
    assert built == ["v1alpha2/b"]
    cache.messages(one, [a], every=False)
    assert built == ["v1alpha2/b"]  # v1's message of a survived v1alpha2's full lists


def test_a_full_list_is_one_without_any_filter_part() -> None:
    f = v1alpha2.ContainerFilter()
    assert convert.matches_all(f)
    f.label_selector["x"] = "y"
    assert not convert.matches_all(f)
    f = v1alpha2.PodSandboxFilter(state=v1alpha2.PodSandboxStateValue(state=0))
    assert not convert.matches_all(f)
