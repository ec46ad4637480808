"""The size limits of api/limits.py over every request type of both CRI versions, built
from the descriptors: every string, map and list at any depth is bounded; one over its
limit is InvalidArgument naming the field and echoing only a short prefix."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from arktos_vm_runtime.api import limits, validation
from arktos_vm_runtime.api.dispatch import api_modules
from arktos_vm_runtime.errors import InvalidArgument

SHORT = 400  # an error message never echoes more than this


def _request_types() -> Iterator[tuple[str, str, type[Message]]]:
    for version, pb in api_modules().items():
        for service in pb.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                yield version, method.name, getattr(pb, method.input_type.name)


def _is_map(fd: FieldDescriptor) -> bool:
    return fd.message_type is not None and fd.message_type.GetOptions().map_entry


def _paths(desc: Descriptor, prefix: tuple[FieldDescriptor, ...] = (),
           seen: frozenset[str] = frozenset()) -> Iterator[tuple[FieldDescriptor, ...]]:
    """Every field reachable from `desc` (sub-messages once per path, no cycles)."""
    for fd in desc.fields:
        path = (*prefix, fd)
        yield path
        if fd.message_type is not None and not _is_map(fd) \
                and fd.message_type.full_name not in seen:
            yield from _paths(fd.message_type, path, seen | {fd.message_type.full_name})


def _target(msg: Message, path: tuple[FieldDescriptor, ...]) -> Message:
    """The message holding the last field of `path`, made on the way (a repeated message
    field gets one element)."""
    node = msg
    for fd in path[:-1]:
        node = getattr(node, fd.name).add() if fd.is_repeated else getattr(node, fd.name)
    return node


def _dotted(path: tuple[FieldDescriptor, ...]) -> str:
    return ".".join(f"{fd.name}[0]" if fd.is_repeated and i < len(path) - 1 else fd.name
                    for i, fd in enumerate(path))


def _string_paths() -> Iterator[tuple[str, type[Message], tuple[FieldDescriptor, ...]]]:
    for version, method, cls in _request_types():
        for path in _paths(cls.DESCRIPTOR):
            fd = path[-1]
            if fd.type == FieldDescriptor.TYPE_STRING and not fd.is_repeated:
                yield f"{version}.{method}.{_dotted(path)}", cls, path


STRING_CASES = list(_string_paths())


def test_the_walk_reaches_every_kind_of_field_of_both_versions() -> None:
    names = {case[0] for case in STRING_CASES}
    assert len(names) > 200
    for needle in ("v1.CreateContainer.pod_sandbox_id", "v1.CreateContainer.config.log_path",
                   "v1alpha2.RunPodSandbox.config.metadata.tenant",
                   "v1alpha2.AttachNetworkInterface.Nic.VPC",
                   "v1.CreateContainer.config.mounts[0].host_path",
                   "v1.PullImage.auth.password"):
        assert needle in names, needle


@pytest.mark.parametrize("name, cls, path", STRING_CASES, ids=[c[0] for c in STRING_CASES])
def test_every_string_is_bounded_and_named(name: str, cls: type[Message],
                                           path: tuple[FieldDescriptor, ...]) -> None:
    fd = path[-1]
    probe = cls()
    limit = limits._limit(_target(probe, path), fd, limits.DEFAULT_STRING).length
    assert 0 < limit <= limits.MAX_ARG_STRLEN, name
    ok = cls()
    setattr(_target(ok, path), fd.name, "a" * limit)
    limits.check_sizes(ok)
    bad = cls()
    setattr(_target(bad, path), fd.name, "a" * (limit + 1))
    with pytest.raises(InvalidArgument) as e:
        limits.check_sizes(bad)
    assert _dotted(path) in e.value.message and str(limit) in e.value.message
    assert len(e.value.message) < SHORT


@pytest.mark.parametrize("api", ["v1alpha2", "v1"])
def test_the_numbers_of_the_table(api: str) -> None:
    pb = api_modules()[api]

    def refused(req: Message, field: str) -> bool:
        try:
            validation.check("X", req)
        except InvalidArgument as e:
            assert field in e.message and len(e.message) < SHORT, e.message
            return True
        return False

    for n, ok in ((128, True), (129, False), (1 << 20, False)):
        assert refused(pb.CreateContainerRequest(pod_sandbox_id="a" * n), "pod_sandbox_id") \
            is not ok
        assert refused(pb.ContainerStatusRequest(container_id="a" * n), "container_id") \
            is not ok
    md = pb.PodSandboxMetadata
    for kw, n, field in (("name", 253, "config.metadata.name"),
                         ("namespace", 63, "config.metadata.namespace"),
                         ("uid", 128, "config.metadata.uid")):
        assert not refused(pb.RunPodSandboxRequest(
            config=pb.PodSandboxConfig(metadata=md(**{kw: "a" * n}))), field)
        assert refused(pb.RunPodSandboxRequest(
            config=pb.PodSandboxConfig(metadata=md(**{kw: "a" * (n + 1)}))), field)
    if api == "v1alpha2":
        assert refused(pb.RunPodSandboxRequest(
            config=pb.PodSandboxConfig(metadata=md(tenant="t" * 64))), "tenant")
    assert refused(pb.CreateContainerRequest(config=pb.ContainerConfig(
        log_path="l" * 4097)), "config.log_path")
    assert refused(pb.PullImageRequest(image=pb.ImageSpec(image="i" * 2049)), "image.image")


def _sandbox(pb: Any, **config: Any) -> Message:
    return pb.RunPodSandboxRequest(config=pb.PodSandboxConfig(**config))


@pytest.mark.parametrize("api", ["v1alpha2", "v1"])
def test_labels_and_annotations_as_kubernetes_limits_them(api: str) -> None:
    pb = api_modules()[api]
    kib = 1024
    # a pod at Kubernetes' own 256 KiB of annotations, plus what the kubelet adds
    big = {f"example.com/a{i}": "v" * (kib - 20) for i in range(256)}
    big["kubernetes.io/config.seen"] = "2026-12-01T06:00:00Z"
    limits.check_sizes(_sandbox(pb, annotations=big, labels={"app": "x" * 63}))
    cases = [
        (dict(annotations={f"k{i}": "v" * 100 * kib for i in range(4)}),
         "annotations: keys and values total"),
        (dict(annotations={"a" * 318: ""}), "annotations key"),
        (dict(labels={"app": "x" * 254}), "labels["),
        (dict(labels={f"l{i}": "" for i in range(1025)}), "labels has 1025 entries"),
        (dict(annotations={"arktos.futurewei.com/cni-args": "A=" + "b" * 9000}),
         "annotations['arktos.futurewei.com/cni-args']"),
        (dict(annotations={"NICs": "[" + " " * 40000 + "]"}), "annotations['NICs']"),
    ]
    for config, needle in cases:
        with pytest.raises(InvalidArgument) as e:
            limits.check_sizes(_sandbox(pb, **config))
        assert needle in e.value.message and len(e.value.message) < SHORT, e.value.message
    f = pb.PodSandboxFilter(label_selector={"k": "v" * 300})
    with pytest.raises(InvalidArgument, match=r"filter\.label_selector"):
        limits.check_sizes(pb.ListPodSandboxRequest(filter=f))


@pytest.mark.parametrize("api", ["v1alpha2", "v1"])
def test_lists_envs_and_mounts(api: str) -> None:
    pb = api_modules()[api]

    def create(**config: Any) -> Message:
        return pb.CreateContainerRequest(pod_sandbox_id="p", config=pb.ContainerConfig(
            **config))

    kv = pb.KeyValue
    limits.check_sizes(create(envs=[kv(key=f"K{i}", value="v" * 200) for i in range(4096)]))
    cases = [
        (dict(envs=[kv(key="K", value="")] * 4097), "config.envs has 4097"),
        (dict(envs=[kv(key=f"K{i}", value="v" * 100_000) for i in range(11)]),
         "config.envs: its strings total"),
        (dict(envs=[kv(key="K", value="v" * (128 * 1024 + 1))]), "config.envs[0].value"),
        (dict(mounts=[pb.Mount(host_path="/h" * 2049)]), "config.mounts[0].host_path"),
        (dict(mounts=[pb.Mount(host_path="/h")] * 1025), "config.mounts has 1025"),
        (dict(command=["x" * 1000] * 1100), "config.command: its strings total"),
        (dict(command=["x"] * 4097), "config.command has 4097"),
    ]
    for config, needle in cases:
        with pytest.raises(InvalidArgument) as e:
            limits.check_sizes(create(**config))
        assert needle in e.value.message and len(e.value.message) < SHORT, e.value.message


def test_every_map_and_list_of_both_versions_has_a_count_limit() -> None:
    for version, method, cls in _request_types():
        for path in _paths(cls.DESCRIPTOR):
            fd = path[-1]
            if not fd.is_repeated:
                continue
            msg = cls()
            holder = _target(msg, path)
            field = getattr(holder, fd.name)
            name = f"{version}.{method}.{_dotted(path)}"
            for i in range(5000):
                if _is_map(fd):
                    vfd = fd.message_type.fields_by_name["value"]
                    if vfd.message_type is None:
                        field[str(i)] = "" if vfd.type == FieldDescriptor.TYPE_STRING else 0
                    else:
                        field[str(i)].SetInParent()
                elif fd.message_type is not None:
                    field.add()
                elif fd.type == FieldDescriptor.TYPE_STRING:
                    field.append("")
                else:
                    field.append(0)
            with pytest.raises(InvalidArgument, match="entries") as e:
                limits.check_sizes(msg)
            assert fd.name in e.value.message, name
