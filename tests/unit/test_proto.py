"""The CRI protos and their generated stubs match the Arktos wire contract.

/work/shared/cri-arktos.md (the contract) lists what Arktos adds to
runtime.v1alpha2; these tests check the generated descriptors field by field,
the RuntimeService/ImageService method order, JSON names, a wire round trip of
every Arktos message, and that the stubs import under Debian 12's own
python3-protobuf (4.21) as well as under the PyPI protobuf of the venv.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor as FD

from arktos_vm_runtime.api.gen.v1 import api_pb2 as v1
from arktos_vm_runtime.api.gen.v1 import api_pb2_grpc as v1_grpc
from arktos_vm_runtime.api.gen.v1alpha2 import api_pb2 as v1a2
from arktos_vm_runtime.api.gen.v1alpha2 import api_pb2_grpc as v1a2_grpc

REPO = Path(__file__).resolve().parents[2]
DEBIAN_PYTHON = "/usr/bin/python3"

STRING, INT64, BOOL, MESSAGE, ENUM = (
    FD.TYPE_STRING,
    FD.TYPE_INT64,
    FD.TYPE_BOOL,
    FD.TYPE_MESSAGE,
    FD.TYPE_ENUM,
)

# ---------------------------------------------------------------------------
# The contract, as data.
# ---------------------------------------------------------------------------

STANDARD_RUNTIME_METHODS = [
    "Version",
    "RunPodSandbox",
    "StopPodSandbox",
    "RemovePodSandbox",
    "PodSandboxStatus",
    "ListPodSandbox",
    "CreateContainer",
    "StartContainer",
    "StopContainer",
    "RemoveContainer",
    "ListContainers",
    "ContainerStatus",
    "UpdateContainerResources",
    "ReopenContainerLog",
    "ExecSync",
    "Exec",
    "Attach",
    "PortForward",
    "ContainerStats",
    "ListContainerStats",
    "UpdateRuntimeConfig",
    "Status",
]
ARKTOS_RUNTIME_METHODS = [
    "RebootVM",
    "CreateSnapshot",
    "RestoreToSnapshot",
    "AttachNetworkInterface",
    "DetachNetworkInterface",
    "ListNetworkInterfaces",
]
IMAGE_METHODS = ["ListImages", "ImageStatus", "PullImage", "RemoveImage", "ImageFsInfo"]

# method -> (request message, response message)
ARKTOS_METHOD_TYPES = {
    "RebootVM": ("RebootVMRequest", "RebootVMResponse"),
    "CreateSnapshot": ("CreateSnapshotRequest", "CreateSnapshotResponse"),
    "RestoreToSnapshot": ("RestoreToSnapshotRequest", "RestoreToSnapshotResponse"),
    "AttachNetworkInterface": ("DeviceAttachDetachRequest", "DeviceAttachDetachResponse"),
    "DetachNetworkInterface": ("DeviceAttachDetachRequest", "DeviceAttachDetachResponse"),
    "ListNetworkInterfaces": ("ListDeviceRequest", "ListDeviceResponse"),
}

# (message, field name) -> (number, type, repeated, message/enum type name or None)
ARKTOS_FIELDS: dict[tuple[str, str], tuple[int, int, bool, str | None]] = {
    ("PodSandboxMetadata", "tenant"): (5, STRING, False, None),
    ("PodSandboxNetworkStatus", "nics"): (2, MESSAGE, True, "runtime.v1alpha2.NICStatus"),
    ("NICStatus", "name"): (1, STRING, False, None),
    ("NICStatus", "port_id"): (2, STRING, False, None),
    ("NICStatus", "state"): (3, ENUM, False, "runtime.v1alpha2.NICState"),
    ("NICStatus", "reason"): (4, STRING, False, None),
    ("ContainerStatus", "resources"): (
        16,
        MESSAGE,
        False,
        "runtime.v1alpha2.LinuxContainerResources",
    ),
    ("VmRebootSpec", "delayInSeconds"): (1, INT64, False, None),
    ("VmRebootSpec", "domainRebootFlag"): (2, INT64, False, None),
    ("RebootVMRequest", "vm_id"): (1, STRING, False, None),
    ("RebootVMRequest", "rebootSpec"): (2, MESSAGE, False, "runtime.v1alpha2.VmRebootSpec"),
    ("CreateSnapshotRequest", "vmID"): (1, STRING, False, None),
    ("CreateSnapshotRequest", "snapshotID"): (2, STRING, False, None),
    ("CreateSnapshotRequest", "flags"): (3, INT64, False, None),
    ("RestoreToSnapshotRequest", "vmID"): (1, STRING, False, None),
    ("RestoreToSnapshotRequest", "snapshotID"): (2, STRING, False, None),
    ("RestoreToSnapshotRequest", "flags"): (3, INT64, False, None),
    ("NicSpec", "Name"): (1, STRING, False, None),
    ("NicSpec", "SubnetName"): (2, STRING, False, None),
    ("NicSpec", "PortId"): (3, STRING, False, None),
    ("NicSpec", "IpAddress"): (4, STRING, False, None),
    ("NicSpec", "IsIpV6Enabled"): (5, BOOL, False, None),
    ("NicSpec", "tag"): (6, STRING, False, None),
    ("NicSpec", "VPC"): (7, STRING, False, None),
    ("DeviceAttachDetachRequest", "PodSandboxID"): (1, STRING, False, None),
    ("DeviceAttachDetachRequest", "VmName"): (2, STRING, False, None),
    ("DeviceAttachDetachRequest", "Nic"): (3, MESSAGE, False, "runtime.v1alpha2.NicSpec"),
    ("ListDeviceRequest", "PodSandboxId"): (1, STRING, False, None),
    ("ListDeviceRequest", "VmName"): (2, STRING, False, None),
    ("ListDeviceRequest", "NicName"): (3, STRING, False, None),
    ("ListDeviceResponse", "Nics"): (1, MESSAGE, True, "runtime.v1alpha2.NicSpec"),
    # Accepted by the Arktos API, absent from older copies of v1alpha2.
    ("RunPodSandboxRequest", "runtime_handler"): (2, STRING, False, None),
    ("PodSandboxStatus", "runtime_handler"): (9, STRING, False, None),
    ("PodSandbox", "runtime_handler"): (7, STRING, False, None),
    ("LinuxContainerSecurityContext", "masked_paths"): (13, STRING, True, None),
    ("LinuxContainerSecurityContext", "readonly_paths"): (14, STRING, True, None),
    ("ContainerConfig", "windows"): (16, MESSAGE, False, "runtime.v1alpha2.WindowsContainerConfig"),
}

# Messages whose complete field list the contract fixes: name -> [(name, number)].
EXACT_MESSAGES: dict[str, list[tuple[str, int]]] = {
    "PodSandboxMetadata": [
        ("name", 1),
        ("uid", 2),
        ("namespace", 3),
        ("attempt", 4),
        ("tenant", 5),
    ],
    "PodSandboxNetworkStatus": [("ip", 1), ("nics", 2)],
    "NICStatus": [("name", 1), ("port_id", 2), ("state", 3), ("reason", 4)],
    "VmRebootSpec": [("delayInSeconds", 1), ("domainRebootFlag", 2)],
    "RebootVMRequest": [("vm_id", 1), ("rebootSpec", 2)],
    "RebootVMResponse": [],
    "CreateSnapshotRequest": [("vmID", 1), ("snapshotID", 2), ("flags", 3)],
    "CreateSnapshotResponse": [],
    "RestoreToSnapshotRequest": [("vmID", 1), ("snapshotID", 2), ("flags", 3)],
    "RestoreToSnapshotResponse": [],
    "NicSpec": [
        ("Name", 1),
        ("SubnetName", 2),
        ("PortId", 3),
        ("IpAddress", 4),
        ("IsIpV6Enabled", 5),
        ("tag", 6),
        ("VPC", 7),
    ],
    "DeviceAttachDetachRequest": [("PodSandboxID", 1), ("VmName", 2), ("Nic", 3)],
    "DeviceAttachDetachResponse": [],
    "ListDeviceRequest": [("PodSandboxId", 1), ("VmName", 2), ("NicName", 3)],
    "ListDeviceResponse": [("Nics", 1)],
    "LinuxContainerResources": [
        ("cpu_period", 1),
        ("cpu_quota", 2),
        ("cpu_shares", 3),
        ("memory_limit_in_bytes", 4),
        ("oom_score_adj", 5),
        ("cpuset_cpus", 6),
        ("cpuset_mems", 7),
    ],
}

# JSON names: the odd capitalisation is kept exactly (protoc lower-cases only
# after an underscore, so a field spelt in camelCase keeps its own spelling).
JSON_NAMES = {
    ("PodSandboxMetadata", "tenant"): "tenant",
    ("PodSandboxNetworkStatus", "nics"): "nics",
    ("NICStatus", "port_id"): "portId",
    ("ContainerStatus", "resources"): "resources",
    ("VmRebootSpec", "delayInSeconds"): "delayInSeconds",
    ("VmRebootSpec", "domainRebootFlag"): "domainRebootFlag",
    ("RebootVMRequest", "vm_id"): "vmId",
    ("RebootVMRequest", "rebootSpec"): "rebootSpec",
    ("CreateSnapshotRequest", "vmID"): "vmID",
    ("CreateSnapshotRequest", "snapshotID"): "snapshotID",
    ("RestoreToSnapshotRequest", "vmID"): "vmID",
    ("RestoreToSnapshotRequest", "snapshotID"): "snapshotID",
    ("NicSpec", "Name"): "Name",
    ("NicSpec", "SubnetName"): "SubnetName",
    ("NicSpec", "PortId"): "PortId",
    ("NicSpec", "IpAddress"): "IpAddress",
    ("NicSpec", "IsIpV6Enabled"): "IsIpV6Enabled",
    ("NicSpec", "tag"): "tag",
    ("NicSpec", "VPC"): "VPC",
    ("DeviceAttachDetachRequest", "PodSandboxID"): "PodSandboxID",
    ("DeviceAttachDetachRequest", "VmName"): "VmName",
    ("DeviceAttachDetachRequest", "Nic"): "Nic",
    ("ListDeviceRequest", "PodSandboxId"): "PodSandboxId",
    ("ListDeviceRequest", "VmName"): "VmName",
    ("ListDeviceRequest", "NicName"): "NicName",
    ("ListDeviceResponse", "Nics"): "Nics",
}


def _msg(name: str):
    return v1a2.DESCRIPTOR.message_types_by_name[name]


def _repeated(fd: FD) -> bool:
    # protobuf >= 7 has is_repeated and no label; 4.21 (Debian 12) only label
    if hasattr(fd, "is_repeated"):
        return bool(fd.is_repeated)
    return bool(fd.label == 3)  # LABEL_REPEATED


# ---------------------------------------------------------------------------
# Descriptors
# ---------------------------------------------------------------------------


def test_file_descriptors_are_distinct_and_packaged() -> None:
    assert v1a2.DESCRIPTOR.name == "v1alpha2/api.proto"
    assert v1a2.DESCRIPTOR.package == "runtime.v1alpha2"
    assert v1.DESCRIPTOR.name == "v1/api.proto"
    assert v1.DESCRIPTOR.package == "runtime.v1"
    # no dependency on gogoproto (or anything else)
    assert list(v1a2.DESCRIPTOR.dependencies) == []
    assert list(v1.DESCRIPTOR.dependencies) == []
    assert v1a2.NicSpec.__module__ == "arktos_vm_runtime.api.gen.v1alpha2.api_pb2"


@pytest.mark.parametrize(("key", "expected"), sorted(ARKTOS_FIELDS.items()), ids=lambda x: str(x))
def test_arktos_field(key: tuple[str, str], expected: tuple[int, int, bool, str | None]) -> None:
    message, field = key
    number, ftype, repeated, type_name = expected
    fd = _msg(message).fields_by_name[field]
    assert fd.name == field
    assert fd.number == number
    assert fd.type == ftype
    assert _repeated(fd) == repeated
    if ftype == MESSAGE:
        assert fd.message_type.full_name == type_name
    elif ftype == ENUM:
        assert fd.enum_type.full_name == type_name


@pytest.mark.parametrize("message", sorted(EXACT_MESSAGES))
def test_arktos_message_has_exactly_the_contract_fields(message: str) -> None:
    got = [(f.name, f.number) for f in _msg(message).fields]
    assert got == EXACT_MESSAGES[message]


def test_nic_state_enum() -> None:
    enum = v1a2.DESCRIPTOR.enum_types_by_name["NICState"]
    assert [(v.name, v.number) for v in enum.values] == [
        ("NIC_UNKNOWN", 0),
        ("NIC_INPROGRESS", 1),
        ("NIC_READY", 2),
        ("NIC_FAILED", 3),
    ]
    assert v1a2.NIC_READY == 2


def test_protocol_has_sctp() -> None:
    enum = v1a2.DESCRIPTOR.enum_types_by_name["Protocol"]
    assert [(v.name, v.number) for v in enum.values] == [("TCP", 0), ("UDP", 1), ("SCTP", 2)]


def test_windows_messages_exist() -> None:
    names = v1a2.DESCRIPTOR.message_types_by_name
    assert [(f.name, f.number) for f in names["WindowsContainerConfig"].fields] == [
        ("resources", 1),
        ("security_context", 2),
    ]
    assert [(f.name, f.number) for f in names["WindowsContainerSecurityContext"].fields] == [
        ("run_as_username", 1),
        ("credential_spec", 2),
    ]
    assert [(f.name, f.number) for f in names["WindowsContainerResources"].fields] == [
        ("cpu_shares", 1),
        ("cpu_count", 2),
        ("cpu_maximum", 3),
        ("memory_limit_in_bytes", 4),
    ]


@pytest.mark.parametrize(("key", "json_name"), sorted(JSON_NAMES.items()), ids=lambda x: str(x))
def test_json_names_keep_odd_capitalisation(key: tuple[str, str], json_name: str) -> None:
    message, field = key
    assert _msg(message).fields_by_name[field].json_name == json_name


def test_json_format_uses_the_odd_names() -> None:
    req = v1a2.DeviceAttachDetachRequest(
        PodSandboxID="pod-a", VmName="vm", Nic=v1a2.NicSpec(Name="eth1", IsIpV6Enabled=True)
    )
    as_json = json.loads(json_format.MessageToJson(req))
    assert as_json == {
        "PodSandboxID": "pod-a",
        "VmName": "vm",
        "Nic": {"Name": "eth1", "IsIpV6Enabled": True},
    }
    snap = json.loads(
        json_format.MessageToJson(v1a2.CreateSnapshotRequest(vmID="v", snapshotID="s"))
    )
    assert snap == {"vmID": "v", "snapshotID": "s"}
    back = json_format.Parse('{"PodSandboxId": "p", "NicName": "n"}', v1a2.ListDeviceRequest())
    assert (back.PodSandboxId, back.NicName) == ("p", "n")


# ---------------------------------------------------------------------------
# Services
# ---------------------------------------------------------------------------


def test_v1alpha2_runtime_service_methods_in_contract_order() -> None:
    svc = v1a2.DESCRIPTOR.services_by_name["RuntimeService"]
    assert svc.full_name == "runtime.v1alpha2.RuntimeService"
    assert [m.name for m in svc.methods] == STANDARD_RUNTIME_METHODS + ARKTOS_RUNTIME_METHODS


def test_v1alpha2_arktos_method_types() -> None:
    svc = v1a2.DESCRIPTOR.services_by_name["RuntimeService"]
    for name, (req, resp) in ARKTOS_METHOD_TYPES.items():
        method = svc.methods_by_name[name]
        assert method.input_type.full_name == f"runtime.v1alpha2.{req}"
        assert method.output_type.full_name == f"runtime.v1alpha2.{resp}"
        assert not method.client_streaming
        assert not method.server_streaming


def test_v1alpha2_image_service_methods() -> None:
    svc = v1a2.DESCRIPTOR.services_by_name["ImageService"]
    assert svc.full_name == "runtime.v1alpha2.ImageService"
    assert [m.name for m in svc.methods] == IMAGE_METHODS


def test_v1_services_cover_the_standard_methods() -> None:
    runtime = v1.DESCRIPTOR.services_by_name["RuntimeService"]
    image = v1.DESCRIPTOR.services_by_name["ImageService"]
    assert runtime.full_name == "runtime.v1.RuntimeService"
    assert image.full_name == "runtime.v1.ImageService"
    runtime_names = [m.name for m in runtime.methods]
    image_names = [m.name for m in image.methods]
    assert set(runtime_names) >= set(STANDARD_RUNTIME_METHODS)
    assert set(image_names) >= set(IMAGE_METHODS)
    # the standard ones keep their relative order
    assert [n for n in runtime_names if n in STANDARD_RUNTIME_METHODS] == STANDARD_RUNTIME_METHODS
    assert [n for n in image_names if n in IMAGE_METHODS] == IMAGE_METHODS
    # v1 is the stock API: none of the Arktos extensions
    assert not set(runtime_names) & set(ARKTOS_RUNTIME_METHODS)
    assert "tenant" not in v1.PodSandboxMetadata.DESCRIPTOR.fields_by_name


def test_grpc_stubs_use_the_wire_method_paths() -> None:
    for mod, pkg in ((v1a2_grpc, "runtime.v1alpha2"), (v1_grpc, "runtime.v1")):
        assert hasattr(mod, "RuntimeServiceServicer")
        assert hasattr(mod, "ImageServiceServicer")
        assert callable(mod.add_RuntimeServiceServicer_to_server)
        assert callable(mod.add_ImageServiceServicer_to_server)
        src = Path(mod.__file__).read_text()
        assert f"'/{pkg}.RuntimeService/Version'" in src
        assert f"'/{pkg}.ImageService/ImageFsInfo'" in src
        assert "from . import api_pb2 as" in src
    src = (REPO / "runtime/api/gen/v1alpha2/api_pb2_grpc.py").read_text()
    for path in (
        "/runtime.v1alpha2.RuntimeService/RunPodSandbox",
        "/runtime.v1alpha2.RuntimeService/RebootVM",
        "/runtime.v1alpha2.RuntimeService/ListNetworkInterfaces",
        "/runtime.v1alpha2.ImageService/PullImage",
    ):
        assert f"'{path}'" in src


# ---------------------------------------------------------------------------
# Wire round trips, every field set
# ---------------------------------------------------------------------------


def _nic(i: int) -> v1a2.NicSpec:
    return v1a2.NicSpec(
        Name=f"eth{i}",
        SubnetName=f"subnet-{i}",
        PortId=f"port-{i}",
        IpAddress=f"10.0.0.{i}",
        IsIpV6Enabled=True,
        tag=f"tag-{i}",
        VPC="vpc-1",
    )


ROUND_TRIP = [
    v1a2.PodSandboxMetadata(name="vm-pod", uid="uid-1", namespace="ns", attempt=3, tenant="t1"),
    v1a2.NICStatus(name="eth0", port_id="p0", state=v1a2.NIC_FAILED, reason="PortMissing"),
    v1a2.PodSandboxNetworkStatus(
        ip="10.0.0.5",
        nics=[
            v1a2.NICStatus(name="eth0", port_id="p0", state=v1a2.NIC_READY, reason="Ready"),
            v1a2.NICStatus(name="eth1", port_id="p1", state=v1a2.NIC_INPROGRESS, reason="Wait"),
        ],
    ),
    v1a2.LinuxContainerResources(
        cpu_period=100000,
        cpu_quota=200000,
        cpu_shares=1024,
        memory_limit_in_bytes=1 << 30,
        oom_score_adj=-999,
        cpuset_cpus="0-1",
        cpuset_mems="0",
    ),
    v1a2.ContainerStatus(
        id="c1",
        log_path="vm/0.log",
        resources=v1a2.LinuxContainerResources(cpu_period=100000, cpu_quota=100000),
    ),
    v1a2.VmRebootSpec(delayInSeconds=30, domainRebootFlag=2),
    v1a2.RebootVMRequest(
        vm_id="c1", rebootSpec=v1a2.VmRebootSpec(delayInSeconds=1, domainRebootFlag=4)
    ),
    v1a2.RebootVMResponse(),
    v1a2.CreateSnapshotRequest(vmID="c1", snapshotID="s1", flags=7),
    v1a2.CreateSnapshotResponse(),
    v1a2.RestoreToSnapshotRequest(vmID="c1", snapshotID="s1", flags=-1),
    v1a2.RestoreToSnapshotResponse(),
    _nic(1),
    v1a2.DeviceAttachDetachRequest(PodSandboxID="pod-name", VmName="vm", Nic=_nic(2)),
    v1a2.DeviceAttachDetachResponse(),
    v1a2.ListDeviceRequest(PodSandboxId="pod-name", VmName="vm", NicName="eth3"),
    v1a2.ListDeviceResponse(Nics=[_nic(1), _nic(2)]),
    v1a2.RunPodSandboxRequest(runtime_handler="vm"),
    v1a2.PodSandboxStatus(id="s", runtime_handler="vm"),
    v1a2.PodSandbox(id="s", runtime_handler="vm"),
    v1a2.LinuxContainerSecurityContext(masked_paths=["/proc/kcore"], readonly_paths=["/sys"]),
    v1a2.PortMapping(protocol=v1a2.SCTP, container_port=1, host_port=2, host_ip="127.0.0.1"),
]


def _all_set(msg) -> None:
    """Every field of an Arktos message in ROUND_TRIP is set (non-default)."""
    if type(msg).__name__ not in EXACT_MESSAGES:
        return
    for fd in msg.DESCRIPTOR.fields:
        if _repeated(fd):
            assert len(getattr(msg, fd.name)) > 0, fd.full_name
        elif fd.type == MESSAGE:
            assert msg.HasField(fd.name), fd.full_name
        else:
            assert getattr(msg, fd.name) != fd.default_value, fd.full_name


@pytest.mark.parametrize("msg", ROUND_TRIP, ids=lambda m: type(m).__name__)
def test_round_trip(msg) -> None:
    _all_set(msg)
    data = msg.SerializeToString()
    again = type(msg).FromString(data)
    assert again == msg
    assert again.SerializeToString() == data
    # and through JSON, with the contract's names
    assert json_format.Parse(json_format.MessageToJson(msg), type(msg)()) == msg


def test_wire_bytes_of_an_arktos_message() -> None:
    # field 1 (vmID), 2 (snapshotID) length-delimited, 3 (flags) varint
    data = v1a2.CreateSnapshotRequest(vmID="a", snapshotID="b", flags=1).SerializeToString()
    assert data == b"\x0a\x01a\x12\x01b\x18\x01"
    # tenant is field 5 of PodSandboxMetadata
    assert v1a2.PodSandboxMetadata(tenant="t").SerializeToString() == b"\x2a\x01t"
    # ContainerStatus.resources is field 16 (tag 0x82 0x01)
    cs = v1a2.ContainerStatus(resources=v1a2.LinuxContainerResources(cpu_period=1))
    assert cs.SerializeToString() == b"\x82\x01\x02\x08\x01"


def test_v1alpha2_and_v1_share_the_common_wire_format() -> None:
    # a v1 kubelet's message reads the same through the v1alpha2 stubs
    req = v1.PodSandboxMetadata(name="n", uid="u", namespace="ns", attempt=2)
    assert v1a2.PodSandboxMetadata.FromString(req.SerializeToString()) == v1a2.PodSandboxMetadata(
        name="n", uid="u", namespace="ns", attempt=2
    )


# ---------------------------------------------------------------------------
# Debian 12's own protobuf/grpcio
# ---------------------------------------------------------------------------

_DEBIAN_CHECK = """
import google.protobuf, grpc
print("versions", google.protobuf.__version__, grpc.__version__, google.protobuf.__file__)
import arktos_vm_runtime.api.gen.v1alpha2.api_pb2_grpc as a
import arktos_vm_runtime.api.gen.v1.api_pb2_grpc as b
from arktos_vm_runtime.api.gen.v1alpha2 import api_pb2 as m
r = m.RebootVMRequest(vm_id="x", rebootSpec=m.VmRebootSpec(delayInSeconds=1))
assert m.RebootVMRequest.FromString(r.SerializeToString()) == r
names = [x.name for x in m.DESCRIPTOR.services_by_name["RuntimeService"].methods]
assert names[-1] == "ListNetworkInterfaces", names
print("ok")
"""


def test_stubs_import_under_debian_protobuf(tmp_path: Path) -> None:
    if not os.access(DEBIAN_PYTHON, os.X_OK):
        pytest.fail(f"{DEBIAN_PYTHON} is not there")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PYTHONNOUSERSITE"] = "1"
    probe = subprocess.run(
        [DEBIAN_PYTHON, "-c", "import google.protobuf, grpc"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.fail(
            "Debian's python3-protobuf/python3-grpcio are not installed: " + probe.stderr.strip()
        )
    (tmp_path / "arktos_vm_runtime").symlink_to(REPO / "runtime")
    env["PYTHONPATH"] = str(tmp_path)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    proc = subprocess.run(
        [DEBIAN_PYTHON, "-c", _DEBIAN_CHECK],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.split()
    assert lines[-1] == "ok"
    at = lines.index("versions")
    protobuf_version, protobuf_file = lines[at + 1], lines[at + 3]
    # Debian 12 ships python3-protobuf 3.21.12, whose module says 4.21.12
    assert protobuf_version.startswith("4.21."), protobuf_version
    # and it really was Debian's package, not a pip-installed one
    assert protobuf_file.startswith("/usr/lib/python3/dist-packages/"), protobuf_file
