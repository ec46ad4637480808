"""Checks every request gets before a servicer sees it: sizes (limits.py), enum values and
required fields.

proto3 enums are open, so an unknown number arrives as a plain int; it is refused here
for every enum field at any depth, naming the field. Required fields are the ids and
sub-messages without which a method cannot mean anything.
"""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from ..errors import InvalidArgument
from . import limits

# method name -> dotted paths of fields that must be set (non-empty / present).
REQUIRED: dict[str, tuple[str, ...]] = {
    "RunPodSandbox": ("config", "config.metadata", "config.metadata.name", "config.metadata.uid"),
    "StopPodSandbox": ("pod_sandbox_id",),
    "RemovePodSandbox": ("pod_sandbox_id",),
    "PodSandboxStatus": ("pod_sandbox_id",),
    "CreateContainer": ("pod_sandbox_id", "config", "config.metadata", "config.metadata.name",
                        "config.image", "config.image.image"),
    "StartContainer": ("container_id",),
    "StopContainer": ("container_id",),
    "RemoveContainer": ("container_id",),
    "ContainerStatus": ("container_id",),
    "UpdateContainerResources": ("container_id",),
    "ReopenContainerLog": ("container_id",),
    "ExecSync": ("container_id",),
    "Exec": ("container_id",),
    "Attach": ("container_id",),
    "PortForward": ("pod_sandbox_id",),
    "ContainerStats": ("container_id",),
    "PodSandboxStats": ("pod_sandbox_id",),
    "RebootVM": ("vm_id",),
    "CreateSnapshot": ("vmID", "snapshotID"),
    "RestoreToSnapshot": ("vmID", "snapshotID"),
    "AttachNetworkInterface": ("PodSandboxID", "Nic", "Nic.Name"),
    "DetachNetworkInterface": ("PodSandboxID", "Nic", "Nic.Name"),
    "ListNetworkInterfaces": ("PodSandboxId",),
    "PullImage": ("image", "image.image"),
    "RemoveImage": ("image", "image.image"),
    "ImageStatus": ("image", "image.image"),
}


def _repeated(fd: FieldDescriptor) -> bool:
    flag = getattr(fd, "is_repeated", None)  # protobuf >= 5 spells it this way
    if flag is not None:
        return bool(flag)
    return fd.label == FieldDescriptor.LABEL_REPEATED


def check_enums(msg: Message, prefix: str = "") -> None:
    for fd, value in msg.ListFields():
        path = f"{prefix}{fd.name}"
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            vfd = fd.message_type.fields_by_name["value"]
            for key, item in value.items():
                if vfd.enum_type is not None:
                    _check_enum_value(vfd, item, f"{path}[{key}]")
                elif vfd.message_type is not None:
                    check_enums(item, f"{path}[{key}].")
            continue
        items = list(value) if _repeated(fd) else [value]
        for i, item in enumerate(items):
            where = f"{path}[{i}]" if _repeated(fd) else path
            if fd.enum_type is not None:
                _check_enum_value(fd, item, where)
            elif fd.message_type is not None:
                check_enums(item, where + ".")


def _check_enum_value(fd: FieldDescriptor, value: int, path: str) -> None:
    assert fd.enum_type is not None
    if value not in fd.enum_type.values_by_number:
        known = ", ".join(v.name for v in fd.enum_type.values)
        raise InvalidArgument(
            f"field {path}: {value} is not a valid {fd.enum_type.name} (one of {known})"
        )


def check_required(method: str, msg: Message) -> None:
    for path in REQUIRED.get(method, ()):
        node: object = msg
        parts = path.split(".")
        for i, part in enumerate(parts):
            assert isinstance(node, Message)
            fd = node.DESCRIPTOR.fields_by_name.get(part)
            if fd is None:  # this API version has no such field
                break
            if fd.message_type is not None:
                if not node.HasField(part):
                    raise InvalidArgument(f"{method}: field {'.'.join(parts[: i + 1])} is required")
                node = getattr(node, part)
            elif not getattr(node, part):
                raise InvalidArgument(f"{method}: field {path} must not be empty")


def check(method: str, msg: Message) -> None:
    limits.check_sizes(msg)  # first: nothing below may log or echo a huge value
    check_required(method, msg)
    check_enums(msg)
