"""Size limits for every string, map and list a CRI request carries, both API versions.

Checked first, before any lock, lookup or log line: a tenant's 1 MiB id must not become
a dict key, a log line or a gRPC trailer. The walk follows the request's descriptor, so a
field added to either proto is covered by the defaults without a change here. A value
over its limit is INVALID_ARGUMENT naming the field, echoing a short prefix of the value.

Lengths are counted in characters; Kubernetes counts bytes, which for the ASCII its own
rules allow (names, label keys and values) is the same.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from ..checks import shown
from ..errors import InvalidArgument
from ..service.image_names import MAX_NAME_LENGTH as IMAGE_NAME_MAX

KIB = 1024


@dataclasses.dataclass(frozen=True)
class Limit:
    """`length`: a string's characters (each string of a list, each value of a map).
    `count`: a list's or a map's entries. `key`: a map key's characters. `total`: the
    characters of all of a map's keys and values (of a list's strings) together."""

    length: int = 0
    count: int = 0
    key: int = 0
    total: int = 0


PATH_MAX = 4096  # linux/limits.h: a path the kernel accepts, NUL included
DNS1123_SUBDOMAIN = 253  # Kubernetes: object names (validation.DNS1123SubdomainMaxLength)
DNS1123_LABEL = 63  # Kubernetes: namespace names (validation.DNS1123LabelMaxLength)
# A label or annotation key is a Kubernetes qualified name: an optional DNS subdomain
# prefix (253), '/', and a name of at most 63 (validation.IsQualifiedName).
QUALIFIED_NAME = DNS1123_SUBDOMAIN + 1 + 63
# Kubernetes: TotalAnnotationSizeLimitB (256 KiB of keys and values per object); plus
# 64 KiB (ours) for what the kubelet adds to a pod's own (config.seen and .source, the
# container's hash, ports and preStop handler as JSON), so a pod at Kubernetes' edge passes.
ANNOTATIONS_TOTAL = 256 * KIB + 64 * KIB
ID = 128  # checks.check_id: every id this runtime makes is a UUID (36); 128 admits crictl's
MAP_COUNT = 1024  # ours: no CRI map of a real pod comes near it
LIST_COUNT = 1024  # ours: the same for lists (mounts, devices, ports, capabilities)
MAX_ARG_STRLEN = 128 * KIB  # the kernel's limit on one argv/environment string

# Label values: Kubernetes' own are at most 63 (LabelValueMaxLength), but the kubelet adds
# labels holding the pod's name (io.kubernetes.pod.name), up to 253. Kubernetes limits no
# count or total of labels; ours borrow the annotations' figures.
_LABELS = Limit(key=QUALIFIED_NAME, length=DNS1123_SUBDOMAIN, count=MAP_COUNT,
                total=ANNOTATIONS_TOTAL)
_ANNOTATIONS = Limit(key=QUALIFIED_NAME, length=ANNOTATIONS_TOTAL, count=MAP_COUNT,
                     total=ANNOTATIONS_TOTAL)

# Keyed by "Message.field" (the message's short name, the same in both versions) or by the
# field name alone (in any message); the first found applies.
LIMITS: dict[str, Limit] = {
    # ids: sandbox, container (VM), snapshot and exec ids, filters' ids
    "pod_sandbox_id": Limit(ID), "container_id": Limit(ID), "id": Limit(ID),
    "vm_id": Limit(ID), "vmID": Limit(ID), "snapshotID": Limit(ID),
    "PodSandboxID": Limit(ID), "PodSandboxId": Limit(ID), "uid": Limit(ID),
    "target_id": Limit(ID), "audit_request_id": Limit(ID),
    # names: pods and containers (Kubernetes makes container names DNS labels, 63; the
    # CRI does not, so names get the object-name limit), namespaces, tenants (Arktos
    # validates them as it does namespaces), the RuntimeClass handler (a DNS label)
    "PodSandboxMetadata.name": Limit(DNS1123_SUBDOMAIN),
    "ContainerMetadata.name": Limit(DNS1123_SUBDOMAIN),
    "namespace": Limit(DNS1123_LABEL), "tenant": Limit(DNS1123_LABEL),
    "runtime_handler": Limit(DNS1123_LABEL),
    "hostname": Limit(DNS1123_SUBDOMAIN),  # RFC 1123 (checks.check_hostname)
    "VmName": Limit(DNS1123_SUBDOMAIN),
    # Arktos NICs: each value travels in CNI_ARGS (checks.cni_value_problem's 253)
    "NicSpec.Name": Limit(253), "NicSpec.SubnetName": Limit(253),
    "NicSpec.PortId": Limit(253), "NicSpec.IpAddress": Limit(253), "NicSpec.tag": Limit(253),
    "NicSpec.VPC": Limit(253), "NicName": Limit(253),
    # labels and annotations, as Kubernetes limits them; the label selectors of filters
    # are labels. User-data (VirtletCloudInitUserData, ...Script) and SSH keys are
    # annotations, bounded by their total: cloud-init sets no smaller limit of its own
    # (EC2's 16 KiB is one cloud's, too small for Virtlet's scripts). The Arktos cni-args,
    # NICs and VPC annotations become CNI_ARGS: ANNOTATION_LIMITS below narrows them.
    "labels": _LABELS, "label_selector": _LABELS, "annotations": _ANNOTATIONS,
    # images: image_names.MAX_NAME_LENGTH (a registry reference is at most 255 + tag and
    # digest; Virtlet names may be URLs)
    "ImageSpec.image": Limit(IMAGE_NAME_MAX), "ImageSpec.image_ref": Limit(IMAGE_NAME_MAX),
    "ImageSpec.user_specified_image": Limit(IMAGE_NAME_MAX),
    # registry credentials: tokens (JWTs) are the only big strings here; ours
    "AuthConfig.auth": Limit(64 * KIB), "AuthConfig.identity_token": Limit(64 * KIB),
    "AuthConfig.registry_token": Limit(64 * KIB), "AuthConfig.password": Limit(64 * KIB),
    # log paths, mounts and devices: paths
    "log_directory": Limit(PATH_MAX), "log_path": Limit(PATH_MAX),
    "mounts": Limit(count=LIST_COUNT), "devices": Limit(count=LIST_COUNT),
    # environment: each NAME=value must fit one execve string; ours: at most 4096 of them
    # and 1 MiB together (half of the usual ARG_MAX, 2 MiB, which argv shares)
    "envs": Limit(count=4096, total=1024 * KIB),
    "KeyValue.key": Limit(4096), "KeyValue.value": Limit(MAX_ARG_STRLEN),
    "command": Limit(MAX_ARG_STRLEN, count=4096, total=1024 * KIB),
    "args": Limit(MAX_ARG_STRLEN, count=4096, total=1024 * KIB),
    "cmd": Limit(MAX_ARG_STRLEN, count=4096, total=1024 * KIB),
    # DNS: Kubernetes' MaxDNSSearchPaths (32), names of 253; resolv.conf's 3 servers
    # (Kubernetes allows MaxDNSNameservers = 3) with room for a runtime's own
    "DNSConfig.searches": Limit(DNS1123_SUBDOMAIN, count=32),
    "DNSConfig.servers": Limit(64, count=16), "DNSConfig.options": Limit(256, count=32),
    "sysctls": Limit(key=PATH_MAX, length=PATH_MAX, count=MAP_COUNT),
    "unified": Limit(key=PATH_MAX, length=PATH_MAX, count=MAP_COUNT),
}
# Any other string (paths, profiles, SELinux labels, CIDRs): PATH_MAX. Any other map or
# list: MAP_COUNT / LIST_COUNT entries.
DEFAULT_STRING = Limit(PATH_MAX)
DEFAULT_MAP = Limit(key=PATH_MAX, length=PATH_MAX, count=MAP_COUNT)
DEFAULT_LIST = Limit(PATH_MAX, count=LIST_COUNT)

# Annotations whose values go into CNI_ARGS, one environment string of the CNI plugin
# together with the pod's names: ours, far below MAX_ARG_STRLEN (a value above it made
# the plugin fail with "Argument list too long", issue 9 item 2). Counted in UTF-8 bytes,
# as the kernel counts them: 32 Ki characters of 4 bytes each would be 128 KiB. With the
# names above, the worst case is below adapters/cni.MAX_CNI_ARGS (tested).
ANNOTATION_LIMITS: dict[str, int] = {
    "arktos.futurewei.com/cni-args": 8 * KIB,
    "NICs": 32 * KIB,
    "VPC": 253,
}


def _limit(msg: Message, fd: FieldDescriptor, default: Limit) -> Limit:
    return (LIMITS.get(f"{msg.DESCRIPTOR.name}.{fd.name}") or LIMITS.get(fd.name)
            or default)


def _repeated(fd: FieldDescriptor) -> bool:
    flag = getattr(fd, "is_repeated", None)  # protobuf >= 5 spells it this way
    if flag is not None:
        return bool(flag)
    return fd.label == FieldDescriptor.LABEL_REPEATED


def _string(path: str, value: str | bytes, limit: int) -> None:
    if len(value) > limit:
        raise InvalidArgument(f"field {path}: {shown(value)} is longer than {limit} "
                              "characters")


def _bytes(path: str, value: str | bytes, limit: int) -> None:
    size = len(value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value)
    if size > limit:
        raise InvalidArgument(f"field {path}: {shown(value)} is {size} bytes in UTF-8; at "
                              f"most {limit} are allowed")


def _count(path: str, n: int, limit: int) -> None:
    if n > limit:
        raise InvalidArgument(f"field {path} has {n} entries; at most {limit} are allowed")


def _map(path: str, fd: FieldDescriptor, value: Any, limit: Limit) -> None:
    _count(path, len(value), limit.count or MAP_COUNT)
    vfd = fd.message_type.fields_by_name["value"]
    total = 0
    for key, item in value.items():
        key_text = str(key)
        _string(f"{path} key", key_text, limit.key or PATH_MAX)
        where = f"{path}[{shown(key_text, 40)}]"
        if vfd.message_type is not None:
            check_sizes(item, where + ".")
            continue
        if isinstance(item, (str, bytes)):
            own = ANNOTATION_LIMITS.get(key_text) if fd.name == "annotations" else None
            if own is not None:
                _bytes(where, item, own)
            _string(where, item, own or limit.length or PATH_MAX)
            total += len(key_text) + len(item)
    if limit.total and total > limit.total:
        raise InvalidArgument(f"field {path}: keys and values total {total} characters; at "
                              f"most {limit.total} are allowed")


def check_sizes(msg: Message, prefix: str = "") -> None:
    """Every set string, map and list of `msg`, at any depth, within LIMITS."""
    for fd, value in msg.ListFields():
        path = f"{prefix}{fd.name}"
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            _map(path, fd, value, _limit(msg, fd, DEFAULT_MAP))
            continue
        is_string = fd.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES)
        if not _repeated(fd):
            if is_string:
                _string(path, value, _limit(msg, fd, DEFAULT_STRING).length or PATH_MAX)
            elif fd.message_type is not None:
                check_sizes(value, path + ".")
            continue
        limit = _limit(msg, fd, DEFAULT_LIST)
        _count(path, len(value), limit.count or LIST_COUNT)
        if is_string:
            for i, item in enumerate(value):
                _string(f"{path}[{i}]", item, limit.length or PATH_MAX)
            total = sum(map(len, value))
        elif fd.message_type is not None:
            for i, item in enumerate(value):
                check_sizes(item, f"{path}[{i}].")
            total = sum(len(v) for item in value for f, v in item.ListFields()
                        if isinstance(v, (str, bytes)))
        else:
            continue
        if limit.total and total > limit.total:
            raise InvalidArgument(f"field {path}: its strings total {total} characters; "
                                  f"at most {limit.total} are allowed")
