"""The fuzz strategies (tests/cri_fuzz.py) and the request checks every RPC runs first
(api/validation.py), in-process: whatever a request holds, the checks either pass it or
raise InvalidArgument with a short message; nothing else escapes. Seeded and bounded."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf.message import Message
from hypothesis import HealthCheck, Phase, given, seed, settings

from arktos_vm_runtime.api import validation
from arktos_vm_runtime.errors import InvalidArgument
from tests import cri_fuzz

pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")
METHODS = cri_fuzz.methods()
SHORT = 400


def test_every_rpc_of_both_versions_is_enumerated() -> None:
    names = {str(m) for m in METHODS}
    assert {"v1alpha2 RunPodSandbox", "v1alpha2 RebootVM", "v1alpha2 AttachNetworkInterface",
            "v1alpha2 PullImage", "v1 RunPodSandbox", "v1 GetContainerEvents",
            "v1 ImageFsInfo", "v1 StreamImages"} <= names
    assert len(names) == len(METHODS) > 70


def test_messages_cover_every_field_kind() -> None:
    """The strategy sets maps, lists, nested messages, unknown enum values and strings
    beyond their limits (drawn from a seeded run over RunPodSandbox and CreateContainer)."""
    seen: set[str] = set()
    pb = METHODS[0].pb

    @seed(1)
    @settings(max_examples=300, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(cri_fuzz.messages(pb.CreateContainerRequest.DESCRIPTOR))
    def run(msg: Message) -> None:
        cfg = msg.config
        if len(cfg.annotations) > 1024:
            seen.add("many keys")
        if cfg.envs:
            seen.add("list of messages")
        if len(msg.pod_sandbox_id) > 128:
            seen.add("over the limit")
        if "\x00" in cfg.image.image:
            seen.add("NUL")
        if cfg.linux.resources.cpu_quota in (2**63 - 1, -(2**63)):
            seen.add("int extreme")
        try:
            validation.check_enums(msg)
        except InvalidArgument:
            seen.add("unknown enum")

    run()
    assert seen == {"many keys", "list of messages", "over the limit", "NUL", "int extreme",
                    "unknown enum"}


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_request_checks_raise_only_invalid_argument(method: cri_fuzz.Method) -> None:
    desc = method.request_class.DESCRIPTOR

    @seed(20261201)
    @settings(max_examples=40, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(cri_fuzz.messages(desc))
    def run(msg: Any) -> None:
        try:
            validation.check(method.name, msg)
        except InvalidArgument as e:
            assert len(e.message) < SHORT, e.message[:SHORT]

    run()


@pytest.mark.parametrize("name", ["RunPodSandbox", "CreateContainer", "PullImage"])
def test_mutations_apply_to_a_valid_request(name: str) -> None:
    m = next(x for x in METHODS if x.api == "v1" and x.name == name)
    cls = m.request_class
    changed = 0

    @seed(7)
    @settings(max_examples=60, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(cri_fuzz.mutations(cls.DESCRIPTOR))
    def run(mut: cri_fuzz.Mutation) -> None:
        nonlocal changed
        valid = cls()
        valid.ParseFromString(b"")
        out = mut.apply(cls())
        out.SerializeToString()
        changed += out != valid

    run()
    assert changed > 20
