"""Hypothesis strategies that build CRI request messages from their descriptors, for the
fuzz campaign (tests/integration/test_fuzz.py) and its unit tests.

`requests(cls)` draws any message of a generated class: every field type (strings empty,
at and beyond their limits.py limit, unicode, control characters, NUL, '/', '..', XML
metacharacters; bytes; integers at their type's extremes; unknown enum values; maps and
lists with many entries; nested messages). `mutated(valid, ...)` takes a valid request and
replaces one field, at any depth, with such a value, so the fuzz gets past the first
check into the service layer. `methods()` enumerates every RPC of both API versions from
the service descriptors, so a new RPC is fuzzed without a change here.
Helpers only: nothing here for pytest to collect.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from arktos_vm_runtime.api import limits
from arktos_vm_runtime.api.dispatch import api_modules

__test__ = False

MAX_DEPTH = 4
# Strings a parser, a path join, an XML template or a shell might treat specially.
NASTY = [
    "", " ", ".", "..", "/", "../..", "../../etc/passwd", "/etc/passwd", "a/../../b", "./",
    "\x00", "a\x00b", "\n", "a\nb", "\r\n", "\t", "\x1b[31m", "\x7f", "\u202e", "\ufeff",
    "<", ">", "&", "'", '"', "<a>", "]]>", "<![CDATA[x]]>", "&amp;", "&#0;", "</name>",
    "${HOME}", "$(id)", "`id`", "; rm -rf /", "|", "%s%n", "%00", "%2e%2e%2f", "\\",
    "-", "--help", "-rf", "=", "a=b", "a;b=c", "K=V;K2=V2", ":", "::", "@", "#", "?",
    "\u00e9", "\u4e2d\u6587", "\U0001f600", "\u0130", "A" * 63, "a" * 64, "a" * 253,
    "a" * 254, "0", "-1", "18446744073709551616", "1e308", "NaN", "null", "{}", "[]",
    "{\"a\": 1}", "true", "yes", "sha256:" + "0" * 64, "sha256:", "http://", "file:///etc",
    "http://127.0.0.1:1/x", "http://[::1]:1/x", "http://x.invalid/img.qcow2",
    "127.0.0.1:1/img", "x.invalid/a/b:tag@sha256:" + "1" * 64, "virtlet.cloud/img",
    "00000000-0000-0000-0000-000000000000", "ffffffff-ffff-ffff-ffff-ffffffffffff",
]
# Annotation keys the runtime reads (vmconfig, nic_spec, cni args): fuzzed values here reach
# the VM designer and the network code.
ANNOTATION_KEYS = [
    "VirtletVCPUCount", "VirtletCPUModel", "VirtletCloudInitImageType",
    "VirtletCloudInitMetaData", "VirtletCloudInitUserData", "VirtletCloudInitUserDataOverwrite",
    "VirtletCloudInitUserDataScript", "VirtletDiskDriver", "VirtletForceDHCPNetworkConfig",
    "VirtletRootVolumeSize", "VirtletSSHKeys", "VirtletSystemUUID", "VirtletLibvirtCPUSetting",
    "NICs", "VPC", "arktos.futurewei.com/cni-args",
]
ANNOTATION_VALUES = [
    "1", "0", "-1", "65536", "2147483648", "99999999999999999999", "1Gi", "1Pi", "1Ei",
    "-5Gi", "0.5", "1e3", "host-model", "virtio", "scsi", "nocloud", "configdrive", "bogus",
    "true", "false", "ssh-rsa AAAA x@y\nssh-ed25519 AAAA", "#cloud-config\nusers: [1, 2]",
    "#cloud-config\n{{ 7*7 }}\n<xml/>", "- a: b\n  c: [", "!!python/object:os.system x",
    "&a [*a, *a, *a, *a]", "[]", "[{}]", '[{"name": "eth1"}]',
    '[{"name": "../x", "subnet": "s", "portId": "p", "ip": "10.0.0.300"}]',
    '{"name": "x"}', "K=V", "A=1;B=2", "A=;=B;;", "IgnoreUnknown=1",
    "00000000-0000-0000-0000-000000000000", "11111111-1111-1111-1111-111111111111",
]

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_TEXT = st.characters(exclude_categories=("Cs",))  # protobuf strings are UTF-8


def is_repeated(fd: FieldDescriptor) -> bool:
    flag = getattr(fd, "is_repeated", None)
    if flag is not None:
        return bool(flag)
    return fd.label == FieldDescriptor.LABEL_REPEATED


def is_map(fd: FieldDescriptor) -> bool:
    return fd.message_type is not None and fd.message_type.GetOptions().map_entry


def _limit_of(owner: Descriptor, fd: FieldDescriptor) -> limits.Limit:
    default = (limits.DEFAULT_MAP if is_map(fd) else
               limits.DEFAULT_LIST if is_repeated(fd) else limits.DEFAULT_STRING)
    return (limits.LIMITS.get(f"{owner.name}.{fd.name}") or limits.LIMITS.get(fd.name)
            or default)


def _sized(n: int) -> str:
    return ("x" * n) if n < 64 else (f"{n:08d}" + "y" * (n - 8))


def strings(length_limit: int = limits.PATH_MAX) -> st.SearchStrategy[str]:
    """Any string: the nasty ones, random unicode, and lengths at and beyond the limit."""
    edges = sorted({0, 1, max(length_limit - 1, 0), length_limit, length_limit + 1,
                    limits.PATH_MAX + 1, 1 << 20})
    return st.one_of(
        st.sampled_from(NASTY),
        st.text(_TEXT, max_size=24),
        st.text(st.sampled_from("a-._/:@0Z \x00<&"), max_size=12),
        st.sampled_from(edges).map(_sized),
    )


def ints(fd: FieldDescriptor) -> st.SearchStrategy[int]:
    lo, hi = _INT_RANGES[fd.type]
    edges = sorted({v for v in (lo, hi, 0, 1, -1, lo + 1, hi - 1, 2**31 - 1, 2**31,
                                2**32 - 1, 2**53 + 1, 10**9, 10**18) if lo <= v <= hi})
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi))


def scalar(owner: Descriptor, fd: FieldDescriptor) -> st.SearchStrategy[Any]:
    t = fd.type
    if t == FieldDescriptor.TYPE_STRING:
        return strings(_limit_of(owner, fd).length or limits.PATH_MAX)
    if t == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"\x00" * 4097]))
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(width=32 if t == FieldDescriptor.TYPE_FLOAT else 64)
    if t == FieldDescriptor.TYPE_ENUM:
        assert fd.enum_type is not None
        known = [v.number for v in fd.enum_type.values]
        return st.one_of(st.sampled_from(known), st.sampled_from([-1, max(known) + 1, 2**31 - 1,
                                                                  -(2**31)]))
    return ints(fd)


def _many_keys(n: int) -> dict[str, str]:
    return {f"k{i:05d}": f"v{i}" for i in range(n)}


def map_values(owner: Descriptor, fd: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    assert fd.message_type is not None
    kfd = fd.message_type.fields_by_name["key"]
    vfd = fd.message_type.fields_by_name["value"]
    limit = _limit_of(owner, fd)
    if vfd.message_type is not None:
        values: st.SearchStrategy[Any] = messages(vfd.message_type, depth + 1)
    else:
        values = scalar(fd.message_type, vfd)
    keys = scalar(fd.message_type, kfd)
    if kfd.type == FieldDescriptor.TYPE_STRING:
        keys = st.one_of(st.sampled_from(ANNOTATION_KEYS), keys)
    if vfd.type == FieldDescriptor.TYPE_STRING:
        values = st.one_of(st.sampled_from(ANNOTATION_VALUES), values)
    small = st.dictionaries(keys, values, max_size=4)
    if vfd.message_type is not None or kfd.type != FieldDescriptor.TYPE_STRING:
        return small
    count = limit.count or limits.MAP_COUNT
    return st.one_of(small, st.sampled_from([count, count + 1]).map(_many_keys))


def repeated_values(owner: Descriptor, fd: FieldDescriptor,
                    depth: int) -> st.SearchStrategy[list[Any]]:
    if fd.message_type is not None:
        elem: st.SearchStrategy[Any] = messages(fd.message_type, depth + 1)
    else:
        elem = scalar(owner, fd)
    small = st.lists(elem, max_size=4)
    count = _limit_of(owner, fd).count or limits.LIST_COUNT
    if fd.type == FieldDescriptor.TYPE_STRING:
        return st.one_of(small, st.sampled_from([count, count + 1]).map(
            lambda n: [f"s{i}" for i in range(n)]))
    if fd.message_type is not None:
        return st.one_of(small, st.sampled_from([count + 1]).map(
            lambda n: [_class_of(fd.message_type)() for _ in range(n)]))
    return small


def _class_of(desc: Descriptor) -> type[Message]:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(desc)


def field_values(owner: Descriptor, fd: FieldDescriptor,
                 depth: int) -> st.SearchStrategy[Any]:
    """What one field of `owner` may be set to (a dict for a map, a list for a list)."""
    if is_map(fd):
        return map_values(owner, fd, depth)
    if is_repeated(fd):
        return repeated_values(owner, fd, depth)
    if fd.message_type is not None:
        return messages(fd.message_type, depth + 1)
    return scalar(owner, fd)


def assign(msg: Message, fd: FieldDescriptor, value: Any) -> None:
    msg.ClearField(fd.name)
    if is_map(fd):
        target = getattr(msg, fd.name)
        for k, v in value.items():
            if fd.message_type.fields_by_name["value"].message_type is not None:
                target[k].CopyFrom(v)
            else:
                target[k] = v
    elif is_repeated(fd):
        getattr(msg, fd.name).extend(value)
    elif fd.message_type is not None:
        getattr(msg, fd.name).CopyFrom(value)
    else:
        setattr(msg, fd.name, value)


@st.composite
def _message(draw: Any, desc: Descriptor, depth: int) -> Message:
    msg = _class_of(desc)()
    if depth > MAX_DEPTH:
        return msg
    for fd in desc.fields:
        if draw(st.integers(0, 2)) == 0:  # each field set one time in three
            assign(msg, fd, draw(field_values(desc, fd, depth)))
    return msg


def messages(desc: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    return _message(desc, depth)


def leaf_paths(desc: Descriptor, depth: int = 0,
               prefix: tuple[FieldDescriptor, ...] = ()) -> Iterator[tuple[FieldDescriptor, ...]]:
    """Every field path of `desc`, to MAX_DEPTH: the places `mutated` may replace."""
    for fd in desc.fields:
        path = (*prefix, fd)
        yield path
        if (fd.message_type is not None and not is_repeated(fd) and not is_map(fd)
                and depth < MAX_DEPTH):
            yield from leaf_paths(fd.message_type, depth + 1, path)


@dataclasses.dataclass(frozen=True)
class Mutation:
    """One change to a request: `path` names a field at any depth; `action` is "set"
    (replace it with `value`), "clear", "extend" (add map entries to the valid ones), or
    "keep" (the valid request as it is: a StartContainer of a real VM, say)."""

    path: tuple[str, ...]
    action: str
    value: Any = None

    def apply(self, msg: Message) -> Message:
        if self.action == "keep":
            return msg
        node = msg
        for name in self.path[:-1]:
            node = getattr(node, name)
        fd = node.DESCRIPTOR.fields_by_name[self.path[-1]]
        if self.action == "clear":
            node.ClearField(fd.name)
        elif self.action == "extend":
            assign(node, fd, {**dict(getattr(node, fd.name)), **self.value})
        else:
            assign(node, fd, self.value)
        return msg


@st.composite
def _mutation(draw: Any, desc: Descriptor,
              paths: Sequence[tuple[FieldDescriptor, ...]]) -> Mutation:
    if draw(st.integers(0, 7)) == 0:
        return Mutation((), "keep")
    path = draw(st.sampled_from(paths))
    fd = path[-1]
    owner = path[-2].message_type if len(path) > 1 else desc
    names = tuple(f.name for f in path)
    if (is_map(fd) and fd.message_type.fields_by_name["value"].message_type is None
            and draw(st.booleans())):
        # one more entry next to the valid ones (an annotation the designer reads)
        return Mutation(names, "extend", draw(map_values(owner, fd, len(path))))
    if draw(st.integers(0, 5)) == 0:
        return Mutation(names, "clear")  # a valid request with one field missing
    return Mutation(names, "set", draw(field_values(owner, fd, len(path))))


def mutations(desc: Descriptor) -> st.SearchStrategy[Mutation]:
    """Changes of one field (any depth) of a request of type `desc`. Drawn without looking
    at the request they will change (hypothesis needs generation free of outside state);
    `Mutation.apply` makes them on a valid request."""
    return _mutation(desc, list(leaf_paths(desc)))


@dataclasses.dataclass(frozen=True)
class Method:
    api: str
    service: str  # RuntimeService or ImageService
    name: str
    descriptor: MethodDescriptor
    pb: ModuleType

    @property
    def path(self) -> str:
        return f"/{self.descriptor.containing_service.full_name}/{self.name}"

    @property
    def streaming(self) -> bool:
        return self.descriptor.client_streaming or self.descriptor.server_streaming

    @property
    def request_class(self) -> type[Message]:
        return getattr(self.pb, self.descriptor.input_type.name)  # type: ignore[no-any-return]

    @property
    def response_class(self) -> type[Message]:
        return getattr(self.pb, self.descriptor.output_type.name)  # type: ignore[no-any-return]

    def __str__(self) -> str:
        return f"{self.api} {self.name}"


def methods() -> list[Method]:
    """Every RPC of both services of both API versions, from the service descriptors."""
    out = []
    for api, pb in api_modules().items():
        for service in ("RuntimeService", "ImageService"):
            sd = pb.DESCRIPTOR.services_by_name[service]
            out += [Method(api, service, m.name, m, pb) for m in sd.methods]
    return out
