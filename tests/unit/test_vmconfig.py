"""parse_vm_config: every annotation of the contract, good and bad, and the limits."""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil
import struct
import subprocess
from decimal import Decimal
from pathlib import Path

import pytest

from arktos_vm_runtime.errors import InvalidArgument
from arktos_vm_runtime.service import vmconfig as vc
from arktos_vm_runtime.service.nic_spec import NicInfo, nics_to_json
from arktos_vm_runtime.service.quantity import parse_quantity_bytes
from arktos_vm_runtime.service.ssh_keys import check_ssh_public_key, parse_ssh_keys
from arktos_vm_runtime.service.user_data import MAX_YAML_DEPTH, parse_yaml_mapping
from arktos_vm_runtime.service.vm_size import (
    MAX_VCPUS,
    parse_root_volume,
    parse_vcpu_count,
)
from arktos_vm_runtime.service.vmconfig import (
    VMConfig,
    parse_vm_config,
)

GiB = 1 << 30


def ssh_key(key_type: str = "ssh-ed25519", comment: str = "user@host", seed: int = 1) -> str:
    """A syntactically real OpenSSH public key line (length-prefixed type + key material)."""
    t = key_type.encode()
    material = bytes((seed + i) % 256 for i in range(32))
    blob = struct.pack(">I", len(t)) + t + struct.pack(">I", len(material)) + material
    line = f"{key_type} {base64.b64encode(blob).decode()}"
    return f"{line} {comment}" if comment else line


def bad(annotations: dict[str, str], annotation: str, **kw: int) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        parse_vm_config(annotations, **kw)
    assert f"annotation {annotation}:" in str(info.value), str(info.value)
    return info.value


# --- defaults and generalities ------------------------------------------------------------


def test_defaults() -> None:
    cfg = parse_vm_config({})
    assert cfg == VMConfig()
    assert cfg.vcpus == 1
    assert cfg.memory_mib == 1024
    assert cfg.root_volume_bytes == 0
    assert cfg.disk_driver == "virtio"
    assert cfg.cpu_model == ""
    assert cfg.system_uuid is None
    assert cfg.ssh_keys == ()
    assert cfg.user_data is None and cfg.user_data_script is None and cfg.meta_data is None
    assert cfg.user_data_overwrite is False
    assert cfg.cloud_init_type == "nocloud"
    assert cfg.force_dhcp is False
    assert cfg.vpc == ""
    assert cfg.nics == ()
    assert cfg.cni_args == ()


def test_frozen() -> None:
    cfg = parse_vm_config({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.vcpus = 4  # type: ignore[misc]


def test_unknown_annotations_ignored() -> None:
    cfg = parse_vm_config(
        {"kubernetes.io/config.seen": "x", "VirtletSomethingNew": "garbage", "vpc": "lower"}
    )
    assert cfg == VMConfig()


@pytest.mark.parametrize("name", vc.ALL_ANNOTATIONS)
@pytest.mark.parametrize("value", ["", "   ", "\n"])
def test_empty_value_means_not_set(name: str, value: str) -> None:
    assert parse_vm_config({name: value}) == VMConfig()


def test_non_string_value_rejected() -> None:
    bad({"VirtletVCPUCount": 4}, "VirtletVCPUCount")  # type: ignore[dict-item]


def test_the_kubelet_annotations() -> None:
    """What an Arktos kubelet sends for a typical VM pod."""
    key = ssh_key()
    cfg = parse_vm_config(
        {
            "VirtletRootVolumeSize": "4Gi",
            "VirtletSSHKeys": key,
            "VirtletVCPUCount": "2",
            "VPC": "vpc-demo",
            "NICs": '[{"name":"eth0","subnetName":"subnet1","portId":"p-1",'
            '"ipAddress":"10.0.0.5","tag":"t","ipv6Enabled":false}]',
            "arktos.futurewei.com/cni-args": "A=1;B=two",
        },
        memory_limit_bytes=512 << 20,
    )
    assert cfg.root_volume_bytes == 4 * GiB
    assert cfg.ssh_keys == (key,)
    assert cfg.vcpus == 2
    assert cfg.memory_mib == 512
    assert cfg.vpc == "vpc-demo"
    assert cfg.nics == (NicInfo("eth0", "subnet1", "p-1", "10.0.0.5", "t", False),)
    assert cfg.cni_args == (("A", "1"), ("B", "two"))


# --- booleans -----------------------------------------------------------------------------

BOOLS = {
    "VirtletCloudInitUserDataOverwrite": "user_data_overwrite",
    "VirtletForceDHCPNetworkConfig": "force_dhcp",
}


@pytest.mark.parametrize(("name", "attr"), BOOLS.items())
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("true", True),
        ("True", False),
        ("TRUE", False),
        ("yes", False),
        ("1", False),
        (" true", False),
        ("true\n", False),
        ("false", False),
        ("garbage", False),
    ],
)
def test_booleans_exact_true(name: str, attr: str, value: str, expected: bool) -> None:
    assert getattr(parse_vm_config({name: value}), attr) is expected


# --- vCPUs and memory ---------------------------------------------------------------------


@pytest.mark.parametrize(("value", "vcpus"), [("1", 1), ("2", 2), (" 4 ", 4), ("64", 64)])
def test_vcpu_annotation(value: str, vcpus: int) -> None:
    assert parse_vm_config({"VirtletVCPUCount": value}).vcpus == vcpus


def test_vcpu_annotation_wins_over_quota() -> None:
    cfg = parse_vm_config({"VirtletVCPUCount": "3"}, cpu_quota=800000, cpu_period=100000)
    assert cfg.vcpus == 3


@pytest.mark.parametrize(
    "value",
    ["abc", "0", "65", "-1", "+2", "1.5", "2 cpus", "\uff11", "1_0", "0x2", "9" * 5000, "2\x00"],
)
def test_vcpu_annotation_bad(value: str) -> None:
    err = bad({"VirtletVCPUCount": value}, "VirtletVCPUCount")
    assert len(str(err)) < 300


def test_vcpu_message_format() -> None:
    err = bad({"VirtletVCPUCount": "abc"}, "VirtletVCPUCount")
    assert str(err) == "annotation VirtletVCPUCount: 'abc' is not an integer"


@pytest.mark.parametrize(
    ("quota", "period", "vcpus"),
    [
        (100000, 100000, 1),
        (150000, 100000, 2),
        (200000, 100000, 2),
        (50000, 100000, 1),
        (1, 100000, 1),
        (6400000, 100000, 64),
        (100000, 0, 1),  # zero period: guarded, default
        (0, 100000, 1),
        (-1, 100000, 1),
        (100000, -5, 1),
    ],
)
def test_vcpus_from_quota(quota: int, period: int, vcpus: int) -> None:
    assert parse_vm_config({}, cpu_quota=quota, cpu_period=period).vcpus == vcpus


def test_vcpus_from_quota_too_many() -> None:
    with pytest.raises(InvalidArgument, match="cpu limit"):
        parse_vm_config({}, cpu_quota=6500000, cpu_period=100000)


@pytest.mark.parametrize(
    ("limit", "mib"),
    [(0, 1024), (64 << 20, 64), ((64 << 20) + 1, 65), (2 * GiB, 2048), (1 << 40, 1 << 20)],
)
def test_memory(limit: int, mib: int) -> None:
    assert parse_vm_config({}, memory_limit_bytes=limit).memory_mib == mib


def test_memory_default_setting() -> None:
    assert parse_vm_config({}, default_memory_mib=512).memory_mib == 512


@pytest.mark.parametrize("limit", [1, 63 << 20, (1 << 40) + 1])
def test_memory_out_of_bounds(limit: int) -> None:
    with pytest.raises(InvalidArgument, match="memory limit"):
        parse_vm_config({}, memory_limit_bytes=limit)


def test_default_memory_out_of_bounds() -> None:
    with pytest.raises(InvalidArgument, match="default memory"):
        parse_vm_config({}, default_memory_mib=32)


# --- root volume size ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4Gi", 4 * GiB),
        ("1.5Gi", 3 * GiB // 2),
        ("512Mi", 512 << 20),
        ("1Ki", 1024),
        ("1Ti", 1 << 40),
        ("1Pi", 1 << 50),
        ("1k", 1000),
        ("10M", 10**7),
        ("4G", 4 * 10**9),
        ("2T", 2 * 10**12),
        ("1073741824", GiB),
        ("0", 0),
        ("0.5", 1),  # fractions of a byte round up
        (".5Ki", 512),
        ("1.", 1),
        ("1e9", 10**9),
        ("1E3", 1000),
        ("1.5e3", 1500),
        ("+1Gi", GiB),
        (" 4Gi ", 4 * GiB),
    ],
)
def test_quantity(text: str, value: int) -> None:
    assert parse_quantity_bytes(text) == value
    assert parse_vm_config({"VirtletRootVolumeSize": text}).root_volume_bytes == value


@pytest.mark.parametrize(
    "text",
    [
        "-1Gi",
        "-0",
        "abc",
        "4GB",
        "4gi",
        "4 Gi",
        "Gi",
        "4Gi4",
        "1.2.3",
        "1m",  # milli-bytes
        "4Gi; rm -rf /",
        "\x004Gi",
        "1e999999999",
        "1e99",
        "9" * 100,
        "2Ei",  # beyond the sanity cap
        "NaN",
        "Infinity",
    ],
)
def test_quantity_bad(text: str) -> None:
    with pytest.raises(ValueError):
        parse_quantity_bytes(text)
    bad({"VirtletRootVolumeSize": text}, "VirtletRootVolumeSize")


def test_quantity_exact_decimal() -> None:
    # 0.1 * 2**30 = 107374182.4 exactly (no float rounding), rounded up
    assert parse_quantity_bytes("0.1Gi") == 107374183
    assert Decimal("0.1") * GiB == Decimal("107374182.4")


# --- enumerations -------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "driver"), [("virtio", "virtio"), ("scsi", "scsi")])
def test_disk_driver(value: str, driver: str) -> None:
    assert parse_vm_config({"VirtletDiskDriver": value}).disk_driver == driver


@pytest.mark.parametrize("value", ["ide", "VIRTIO", "sata", "virtio'/>", "scsi\x00"])
def test_disk_driver_bad(value: str) -> None:
    bad({"VirtletDiskDriver": value}, "VirtletDiskDriver")


def test_cpu_model() -> None:
    assert parse_vm_config({"VirtletCPUModel": "host-model"}).cpu_model == "host-model"
    assert parse_vm_config({"VirtletCPUModel": ""}).cpu_model == ""


@pytest.mark.parametrize("value", ["host-passthrough", "Haswell", "HOST-MODEL", "custom"])
def test_cpu_model_bad(value: str) -> None:
    bad({"VirtletCPUModel": value}, "VirtletCPUModel")


@pytest.mark.parametrize("value", ["nocloud", "configdrive"])
def test_cloud_init_type(value: str) -> None:
    assert parse_vm_config({"VirtletCloudInitImageType": value}).cloud_init_type == value


@pytest.mark.parametrize("value", ["ConfigDrive", "config-2", "cidata", "iso"])
def test_cloud_init_type_bad(value: str) -> None:
    bad({"VirtletCloudInitImageType": value}, "VirtletCloudInitImageType")


# --- system UUID --------------------------------------------------------------------------


def test_system_uuid_canonical() -> None:
    cfg = parse_vm_config({"VirtletSystemUUID": " 7B5A4C8E-1F8E-4B8A-9D8E-2F4B1A9C0D11 "})
    assert cfg.system_uuid == "7b5a4c8e-1f8e-4b8a-9d8e-2f4b1a9c0d11"


@pytest.mark.parametrize(
    "value",
    [
        "not-a-uuid",
        "7b5a4c8e1f8e4b8a9d8e2f4b1a9c0d11",
        "{7b5a4c8e-1f8e-4b8a-9d8e-2f4b1a9c0d11}",
        "urn:uuid:7b5a4c8e-1f8e-4b8a-9d8e-2f4b1a9c0d11",
        "7b5a4c8e-1f8e-4b8a-9d8e-2f4b1a9c0d11</uuid>",
        "00000000-0000-0000-0000-000000000000",
        "7b5a4c8e-1f8e-4b8a-9d8e-2f4b1a9c0d1g",
    ],
)
def test_system_uuid_bad(value: str) -> None:
    bad({"VirtletSystemUUID": value}, "VirtletSystemUUID")


# --- SSH keys -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key_type",
    ["ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "sk-ssh-ed25519@openssh.com"],
)
def test_ssh_key_types(key_type: str) -> None:
    key = ssh_key(key_type)
    assert parse_vm_config({"VirtletSSHKeys": key}).ssh_keys == (key,)


def test_ssh_keys_lines() -> None:
    a, b, c = ssh_key(seed=1), ssh_key("ssh-rsa", seed=2), ssh_key(comment="", seed=3)
    text = f"\n{a}\r\n\n   \n{b}\n{c}\n\n"
    assert parse_vm_config({"VirtletSSHKeys": text}).ssh_keys == (a, b, c)


def test_ssh_key_comment_kept_and_spaces_normalised() -> None:
    key = ssh_key(comment="a b  c")
    parsed = parse_vm_config({"VirtletSSHKeys": key.replace(" ", "\t", 1)}).ssh_keys
    assert parsed == (ssh_key(comment="a b c"),)


@pytest.mark.parametrize("kind", ["ed25519", "rsa", "ecdsa"])
def test_ssh_keys_from_ssh_keygen(tmp_path: Path, kind: str) -> None:
    assert shutil.which("ssh-keygen"), "ssh-keygen is needed: apt-get install openssh-client"
    key_file = tmp_path / "id"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "me@example", "-f", str(key_file)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    line = (tmp_path / "id.pub").read_text().strip()
    assert parse_vm_config({"VirtletSSHKeys": line + "\n"}).ssh_keys == (line,)


@pytest.mark.parametrize(
    "line",
    [
        "not a key",
        "ssh-ed25519",
        "ssh-foo AAAAB3NzaC1yc2E= x",
        "ssh-ed25519 !!!notbase64",
        "ssh-ed25519 AAAA",
        # blob says ssh-rsa, line says ssh-ed25519
        "ssh-ed25519 " + ssh_key("ssh-rsa").split()[1],
        # blob with the type only, no key material
        "ssh-ed25519 " + base64.b64encode(struct.pack(">I", 11) + b"ssh-ed25519").decode(),
        'command="/bin/sh" ' + ssh_key(),
        'from="*" ' + ssh_key(),
        ssh_key(comment="x\x00y"),
        ssh_key(comment="x\x1b[2Jy"),
        "-----BEGIN OPENSSH PRIVATE KEY-----",
    ],
)
def test_ssh_keys_bad(line: str) -> None:
    err = bad({"VirtletSSHKeys": f"{ssh_key()}\n{line}"}, "VirtletSSHKeys")
    assert "line 2" in str(err)


def test_check_ssh_public_key_direct() -> None:
    with pytest.raises(ValueError, match="does not match its type"):
        check_ssh_public_key("ssh-ed25519 " + ssh_key("ssh-rsa").split()[1])


def test_parse_ssh_keys_direct() -> None:
    """The parsers the annotations use raise ValueError; vmconfig names the annotation."""
    assert parse_ssh_keys(f"\n{ssh_key()}\r\n") == (ssh_key(),)
    with pytest.raises(ValueError, match=r"^line 3 is not an OpenSSH public key: unknown key"):
        parse_ssh_keys(f"{ssh_key()}\n\nssh-foo AAAA x")
    err = bad({"VirtletSSHKeys": "ssh-foo AAAA x"}, "VirtletSSHKeys")
    assert str(err).startswith("annotation VirtletSSHKeys: line 1 is not an OpenSSH public key")
    assert err.context == {"annotation": "VirtletSSHKeys"}


def test_vm_size_parsers_direct() -> None:
    assert parse_vcpu_count(" 2 ") == 2
    with pytest.raises(ValueError, match=f"65 is outside 1..{MAX_VCPUS}"):
        parse_vcpu_count("65")
    assert parse_root_volume("1Gi") == GiB
    with pytest.raises(ValueError, match="use a Kubernetes quantity like 4Gi"):
        parse_root_volume("4GB")


# --- YAML annotations ---------------------------------------------------------------------

YAMLS = {
    "VirtletCloudInitUserData": "user_data",
    "VirtletCloudInitMetaData": "meta_data",
}


@pytest.mark.parametrize(("name", "attr"), YAMLS.items())
def test_yaml_mapping(name: str, attr: str) -> None:
    text = "runcmd:\n  - [echo, hi]\nusers:\n  - name: x\nnested: {a: {b: 1}}\n"
    assert getattr(parse_vm_config({name: text}), attr) == {
        "runcmd": [["echo", "hi"]],
        "users": [{"name": "x"}],
        "nested": {"a": {"b": 1}},
    }


@pytest.mark.parametrize(("name", "attr"), YAMLS.items())
def test_yaml_single_document_with_markers(name: str, attr: str) -> None:
    assert getattr(parse_vm_config({name: "---\na: 1\n...\n"}), attr) == {"a": 1}


@pytest.mark.parametrize("name", YAMLS)
@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("- a\n- b\n", "mapping"),
        ("just a string", "mapping"),
        ("42", "mapping"),
        ("~", "mapping"),
        ("a: [1, 2\n", "not valid YAML"),
        ("a: 1\n---\nb: 2\n", "not valid YAML"),
        ("!!python/object/apply:os.system ['touch /tmp/pwned']", "not valid YAML"),
        ("a: !!python/object:os.system {}\n", "not valid YAML"),
        ("a: !!python/name:os.system\n", "not valid YAML"),
        ("a: &x [1, 2]\nb: *x\n", "aliases"),
        ("a: " + "[" * 65 + "]" * 65, "nested deeper than 64"),
        ("a: " + "[" * 100000 + "]" * 100000, "YAML"),  # libyaml may refuse first
        ("a: \x00\n", "not valid YAML"),
    ],
)
def test_yaml_bad(name: str, text: str, why: str) -> None:
    err = bad({name: text}, name)
    assert why in str(err)


def test_parse_yaml_mapping_direct() -> None:
    assert parse_yaml_mapping("a: {b: [1]}") == {"a": {"b": [1]}}
    deep = "a: " + "[" * MAX_YAML_DEPTH + "]" * MAX_YAML_DEPTH
    with pytest.raises(ValueError, match=f"nested deeper than {MAX_YAML_DEPTH}"):
        parse_yaml_mapping(deep)
    with pytest.raises(ValueError, match="aliases"):
        parse_yaml_mapping("a: &x 1\nb: *x\n")
    with pytest.raises(ValueError, match="must be a YAML mapping, not list"):
        parse_yaml_mapping("[1]")
    with pytest.raises(ValueError):  # the constructor's own error, as data
        parse_yaml_mapping("when: 2024-13-45\n")


def test_yaml_depth_limit_is_inclusive() -> None:
    text = "a: " + "[" * 63 + "]" * 63  # the mapping is level 1
    assert parse_vm_config({"VirtletCloudInitUserData": text}).user_data is not None


def test_yaml_tags_as_data_are_fine() -> None:
    cfg = parse_vm_config({"VirtletCloudInitUserData": "a: '!!python/object:os.system'\n"})
    assert cfg.user_data == {"a": "!!python/object:os.system"}


def test_user_data_script_verbatim() -> None:
    script = "#!/bin/sh\necho 'hi' \"there\" $HOME\n\x00binary?\n---\n!!python/object\n"
    assert parse_vm_config({"VirtletCloudInitUserDataScript": script}).user_data_script == script


# --- VPC ----------------------------------------------------------------------------------


def test_vpc() -> None:
    assert parse_vm_config({"VPC": " vpc-1 "}).vpc == "vpc-1"


@pytest.mark.parametrize("value", ["a;b", "a=b", "a\nb", "a\x00b", "x" * 300])
def test_vpc_bad(value: str) -> None:
    bad({"VPC": value}, "VPC")


# --- NICs ---------------------------------------------------------------------------------


def test_nics() -> None:
    text = json.dumps(
        [
            {"name": "eth0", "subnetName": "s1", "portId": "p1", "ipAddress": "10.0.0.5"},
            {"name": "eth1", "ipAddress": "fd00::5", "ipv6Enabled": True, "tag": "x", "new": 1},
            {},
        ]
    )
    cfg = parse_vm_config({"NICs": text})
    assert cfg.nics == (
        NicInfo(name="eth0", subnet_name="s1", port_id="p1", ip_address="10.0.0.5"),
        NicInfo(name="eth1", ip_address="fd00::5", tag="x", ipv6_enabled=True),
        NicInfo(),
    )
    assert json.loads(nics_to_json(cfg.nics)) == [
        {"name": "eth0", "subnetName": "s1", "portId": "p1", "ipAddress": "10.0.0.5"},
        {"name": "eth1", "ipAddress": "fd00::5", "tag": "x", "ipv6Enabled": True},
        {},
    ]
    assert ";" not in nics_to_json(cfg.nics) and "=" not in nics_to_json(cfg.nics)


def test_nics_null_values() -> None:
    cfg = parse_vm_config({"NICs": '[{"name": null, "ipv6Enabled": null}]'})
    assert cfg.nics == (NicInfo(),)


def test_nics_empty_array() -> None:
    assert parse_vm_config({"NICs": "[]"}).nics == ()


@pytest.mark.parametrize(
    "value",
    [
        "not json",
        '{"name": "eth0"}',
        '"eth0"',
        "[1]",
        '[["eth0"]]',
        '[{"name": 5}]',
        '[{"subnetName": ["a"]}]',
        '[{"ipv6Enabled": "true"}]',
        '[{"ipv6Enabled": 1}]',
        '[{"ipAddress": "10.0.0.300"}]',
        '[{"ipAddress": "10.0.0.5/24"}]',
        '[{"name": "eth0;rm"}]',
        '[{"name": "a-very-long-interface-name"}]',
        '[{"name": "../etc"}]',
        '[{"name": "eth0"}, {"name": "eth0"}]',
        '[{"portId": "a;b"}]',
        '[{"tag": "a=b"}]',
        '[{"subnetName": "a\\nb"}]',
        '[{"subnetName": "a\\u0000b"}]',
        "[" * 100000 + "]" * 100000,
    ],
)
def test_nics_bad(value: str) -> None:
    bad({"NICs": value}, "NICs")


# --- cni-args -----------------------------------------------------------------------------

CNI = "arktos.futurewei.com/cni-args"


@pytest.mark.parametrize(
    ("text", "pairs"),
    [
        ("K1=V1;K2=V2", (("K1", "V1"), ("K2", "V2"))),
        ("K1=V1;", (("K1", "V1"),)),
        ("; K1=V1 ; K2=V2 ;;", (("K1", "V1"), ("K2", "V2"))),
        ("a.b-c_D=", (("a.b-c_D", ""),)),
        ("K=v with space", (("K", "v with space"),)),
    ],
)
def test_cni_args(text: str, pairs: tuple[tuple[str, str], ...]) -> None:
    assert parse_vm_config({CNI: text}).cni_args == pairs


@pytest.mark.parametrize(
    "text",
    [
        "novalue",
        "=V",
        "K K=V",
        "K/1=V",
        "K$=V",
        "K=V=W",
        "K=V;K=W",
        "K8S_POD_NAME=other",
        "K8S_POD_NAMESPACE=kube-system",
        "IgnoreUnknown=0",
        "NICs=[]",
        "VPC=x",
        "K=a\nb",
        "K=a\x00b",
    ],
)
def test_cni_args_bad(text: str) -> None:
    bad({CNI: text}, CNI)


# --- every annotation's errors name it ----------------------------------------------------

EVERY_BAD = {
    "VirtletRootVolumeSize": "big",
    "VirtletSSHKeys": "nope",
    "VirtletCloudInitUserData": "[1]",
    "VirtletCloudInitMetaData": "[1]",
    "VirtletCloudInitImageType": "floppy",
    "VirtletVCPUCount": "many",
    "VirtletDiskDriver": "floppy",
    "VirtletCPUModel": "fast",
    "VirtletSystemUUID": "x",
    "VPC": "a;b",
    "NICs": "{",
    CNI: "x",
    "VirtletExtraDisks": "[{\"name\": \"Data\", \"size\": \"1Gi\"}]",
}


def test_every_bad_annotation_named() -> None:
    # every annotation that can be malformed is covered (the rest are booleans and a script)
    free = {
        "VirtletCloudInitUserDataOverwrite",
        "VirtletForceDHCPNetworkConfig",
        "VirtletCloudInitUserDataScript",
    }
    assert set(EVERY_BAD) | free == set(vc.ALL_ANNOTATIONS)
    for name, value in EVERY_BAD.items():
        err = bad({name: value}, name)
        assert err.context.get("annotation") == name


@pytest.mark.parametrize("name", ["-x", ".x", "..", "lo", "avbr0", "avt1234", "a" * 16])
def test_nic_names_that_ip_or_the_runtime_would_misread_are_refused(name: str) -> None:
    nics = json.dumps([{"name": name, "portId": "p"}])
    with pytest.raises(InvalidArgument, match="NICs"):
        parse_vm_config({"NICs": nics})
