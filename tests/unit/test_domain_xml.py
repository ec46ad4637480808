"""Domain XML: every rendered domain validates against libvirt's RNG schema and is defined on
libvirt's test:///default driver; golden files pin the text (AVR_REGEN_GOLDEN=1 rewrites them);
pod-controlled values either are refused or arrive intact as data."""

from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jinja2
import libvirt
import pytest

from arktos_vm_runtime.adapters import domain_xml as dx
from arktos_vm_runtime.adapters.domain_xml import (
    METADATA_NS,
    DiskSpec,
    DomainMetadata,
    DomainSpec,
    FilesystemSpec,
    InterfaceSpec,
    parse_metadata,
    render_domain,
    render_interface,
)
from arktos_vm_runtime.adapters.seed_iso import write_seed_iso
from arktos_vm_runtime.adapters.templates import default_template_dirs, project_template_dir
from arktos_vm_runtime.errors import InvalidArgument
from arktos_vm_runtime.service.seed import render_seed
from arktos_vm_runtime.service.vmconfig import parse_vm_config

GOLDEN = Path(__file__).parent / "golden"
TEMPLATES = [Path(__file__).resolve().parents[2] / "templates"]
UUID = "7b5a4c8e-1f8e-4b8a-9d8e-2f4b1a9c0d11"
NS = {"avr": METADATA_NS}


def make_spec(**overrides: Any) -> DomainSpec:
    base = "/var/lib/arktos-vm-runtime/sandboxes/0f6c2e4a-0000-4000-8000-000000000001"
    values: dict[str, Any] = {
        "name": "avr-" + UUID,
        "uuid": UUID,
        "vcpus": 2,
        "memory_mib": 512,
        "root_disk": Path(f"{base}/root.qcow2"),
        "console_log": Path("/var/log/arktos-vm-runtime/0f6c2e4a/raw.log"),
        "guest_agent_socket": Path(f"/run/arktos-vm-runtime/{UUID}/qga.sock"),
        "metadata": DomainMetadata(
            sandbox_id="0f6c2e4a-0000-4000-8000-000000000001",
            pod_name="vm-pod",
            pod_namespace="default",
            pod_tenant="system",
            attempt=0,
        ),
        "seed_iso": Path(f"{base}/seed.iso"),
        # DomainSpec holds no defaults (the designer chooses): these are the test's own.
        "domain_type": "qemu",
        "cpu_model": "",
        "machine": "pc",
        "disk_bus": "virtio",
        "disk_cache": "writeback",
        "system_uuid": None,
        "interfaces": (),
        "emulator": None,
    }
    values.update(overrides)
    return DomainSpec(**values)


# --- the two real checks ------------------------------------------------------------------


def virt_xml_validate(xml: str, tmp_path: Path) -> None:
    if shutil.which("xmllint") is None:
        pytest.fail("virt-xml-validate needs xmllint: apt-get install libxml2-utils")
    path = tmp_path / "domain.xml"
    path.write_text(xml)
    result = subprocess.run(
        ["virt-xml-validate", str(path), "domain"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def test_conn() -> Iterator[libvirt.virConnect]:
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open("test:///default")
    yield conn
    conn.close()


def define_on_test_driver(conn: libvirt.virConnect, xml: str) -> str:
    """Define, read back the XML libvirt stored, undefine; returns the stored XML."""
    dom = conn.defineXML(xml)
    try:
        return str(dom.XMLDesc(0))
    finally:
        dom.undefine()


def check_for_real(conn: libvirt.virConnect, spec: DomainSpec, tmp_path: Path) -> ET.Element:
    xml = render_domain(spec, TEMPLATES)
    virt_xml_validate(xml, tmp_path)
    stored = define_on_test_driver(conn, xml)
    stored_root = ET.fromstring(stored)
    assert stored_root.findtext("uuid") == spec.uuid
    assert stored_root.findtext("name") == spec.name
    assert parse_metadata(stored) == spec.metadata  # survives libvirt's round trip
    return ET.fromstring(xml)


# --- the matrix ---------------------------------------------------------------------------

MATRIX = list(
    itertools.product(
        ["virtio", "scsi"],  # disk bus
        [False, True],  # system uuid
        ["qemu", "kvm"],  # domain type
        ["", "host-model"],  # cpu model
        [False, True],  # seed
        [0, 2],  # interfaces
    )
)


@pytest.mark.parametrize(("bus", "sysuuid", "dtype", "cpu", "seed", "nics"), MATRIX)
def test_matrix_validates_and_defines(
    test_conn: libvirt.virConnect,
    tmp_path: Path,
    bus: str,
    sysuuid: bool,
    dtype: str,
    cpu: str,
    seed: bool,
    nics: int,
) -> None:
    spec = make_spec(
        disk_bus=bus,
        system_uuid=UUID if sysuuid else None,
        domain_type=dtype,
        cpu_model=cpu,
        seed_iso=make_spec().seed_iso if seed else None,
        interfaces=tuple(
            InterfaceSpec(target_dev=f"avrtap{i}", mac=f"52:54:00:00:00:0{i + 1}")
            for i in range(nics)
        ),
    )
    root = check_for_real(test_conn, spec, tmp_path)

    assert root.get("type") == dtype
    assert root.findtext("vcpu") == "2"
    assert root.find("memory").get("unit") == "MiB"  # type: ignore[union-attr]
    assert root.findtext("memory") == "512"
    assert root.find("os/type").get("machine") == "pc"  # type: ignore[union-attr]
    assert root.findtext("on_poweroff") == "destroy"
    assert root.findtext("on_reboot") == "restart"
    assert root.findtext("on_crash") == "destroy"

    disks = root.findall("devices/disk")
    disk = disks[0]
    assert disk.get("device") == "disk"
    driver = disk.find("driver")
    assert driver is not None
    assert driver.get("type") == "qcow2"
    assert driver.get("cache") in ("none", "writeback")
    assert driver.get("discard") == "unmap"
    target = disk.find("target")
    assert target is not None
    assert target.get("bus") == bus
    assert target.get("dev") == ("vda" if bus == "virtio" else "sda")
    scsi = root.findall("devices/controller[@type='scsi']")
    assert [c.get("model") for c in scsi] == (["virtio-scsi"] if bus == "scsi" else [])

    if seed:
        assert len(disks) == 2
        cdrom = disks[1]
        assert cdrom.get("device") == "cdrom"
        assert cdrom.find("target").get("bus") == "ide"  # type: ignore[union-attr]
        assert cdrom.find("readonly") is not None
    else:
        assert len(disks) == 1

    cpu_el = root.find("cpu")
    if cpu == "host-model" and dtype == "kvm":
        assert cpu_el is not None and cpu_el.get("mode") == "host-model"
    else:
        assert cpu_el is None  # nothing special under TCG

    if sysuuid:
        assert root.findtext("sysinfo[@type='smbios']/system/entry[@name='uuid']") == UUID
        assert root.find("os/smbios").get("mode") == "sysinfo"  # type: ignore[union-attr]
    else:
        assert root.find("sysinfo") is None and root.find("os/smbios") is None

    ifaces = root.findall("devices/interface")
    assert len(ifaces) == nics
    for i, iface in enumerate(ifaces):
        assert iface.get("type") == "ethernet"
        assert iface.find("target").get("dev") == f"avrtap{i}"  # type: ignore[union-attr]
        assert iface.find("target").get("managed") == "no"  # type: ignore[union-attr]
        assert iface.find("model").get("type") == "virtio"  # type: ignore[union-attr]


def test_common_devices() -> None:
    spec = make_spec()
    root = ET.fromstring(render_domain(spec, TEMPLATES))
    serial = root.find("devices/serial")
    assert serial is not None and serial.get("type") == "pty"
    log = serial.find("log")
    assert log is not None
    assert log.get("file") == str(spec.console_log) and log.get("append") == "on"
    assert root.find("devices/console").get("type") == "pty"  # type: ignore[union-attr]
    channel = root.find("devices/channel")
    assert channel is not None and channel.get("type") == "unix"
    assert channel.find("source").get("path") == str(spec.guest_agent_socket)  # type: ignore[union-attr]
    assert channel.find("target").get("name") == "org.qemu.guest_agent.0"  # type: ignore[union-attr]
    graphics = root.find("devices/graphics")
    assert graphics is not None
    assert graphics.get("type") == "vnc" and graphics.get("autoport") == "yes"
    assert graphics.get("listen") == "127.0.0.1"
    assert [el.get("address") for el in graphics.findall("listen")] == ["127.0.0.1"]
    assert root.find("devices/memballoon").get("model") == "virtio"  # type: ignore[union-attr]
    rng = root.find("devices/rng")
    assert rng is not None and rng.get("model") == "virtio"
    assert rng.findtext("backend") == "/dev/urandom"
    pod = root.find("metadata/avr:pod", NS)
    assert pod is not None
    assert pod.findtext("avr:sandbox-id", namespaces=NS) == spec.metadata.sandbox_id
    assert pod.findtext("avr:name", namespaces=NS) == "vm-pod"
    assert pod.findtext("avr:namespace", namespaces=NS) == "default"
    assert pod.findtext("avr:tenant", namespaces=NS) == "system"


@pytest.mark.parametrize("kind", ["nocloud", "configdrive"])
@pytest.mark.parametrize("bus", ["virtio", "scsi"])
def test_with_real_seed_of_each_kind(
    test_conn: libvirt.virConnect, tmp_path: Path, kind: str, bus: str
) -> None:
    """A domain built from the pod's annotations, with a real seed ISO of each type."""
    vm = parse_vm_config(
        {
            "VirtletCloudInitImageType": kind,
            "VirtletDiskDriver": bus,
            "VirtletSystemUUID": UUID,
            "VirtletVCPUCount": "2",
        },
        memory_limit_bytes=512 << 20,
    )
    seed = tmp_path / f"seed-{kind}.iso"
    files = render_seed(vm, instance_id=UUID, hostname="vm-pod", env=[], network=None)
    write_seed_iso(files, vm.cloud_init_type, seed)
    spec = make_spec(
        vcpus=vm.vcpus,
        memory_mib=vm.memory_mib,
        disk_bus=vm.disk_driver,
        system_uuid=vm.system_uuid,
        uuid=vm.system_uuid,
        seed_iso=seed,
    )
    root = check_for_real(test_conn, spec, tmp_path)
    assert root.find("devices/disk[@device='cdrom']/source").get("file") == str(seed)  # type: ignore[union-attr]


# --- golden files -------------------------------------------------------------------------

GOLDEN_CASES: dict[str, dict[str, Any]] = {
    "domain-virtio-tcg.xml": {},
    "domain-scsi-sysuuid.xml": {"disk_bus": "scsi", "system_uuid": UUID},
    "domain-kvm-host-model-nic.xml": {
        "domain_type": "kvm",
        "cpu_model": "host-model",
        "disk_cache": "none",
        "emulator": Path("/usr/bin/qemu-system-x86_64"),
        "interfaces": (InterfaceSpec("avrtap0", "52:54:00:ab:cd:ef"),),
    },
    "domain-no-seed.xml": {"seed_iso": None, "vcpus": 1, "memory_mib": 1024},
    # live resize headroom: 2 of 4 vCPUs present, 512 MiB of at most 2048 (balloon)
    "domain-resize-headroom.xml": {"vcpus": 2, "max_vcpus": 4, "memory_mib": 512,
                                   "max_memory_mib": 2048},
    # volumes: an extra qcow2 on virtio, one on scsi (which brings the controller), a
    # read-only host block device, two virtiofs shares (shared memory backing)
    "domain-volumes.xml": {
        "disks": (
            DiskSpec(Path("/var/lib/avr/vm/disk-data.qcow2"), "file", "vdb", "virtio",
                     "x-data", "writeback"),
            DiskSpec(Path("/var/lib/avr/vm/disk-logs.qcow2"), "file", "sda", "scsi",
                     "x-logs", "none"),
            DiskSpec(Path("/dev/loop7"), "block", "vdc", "virtio", "d-0", "none",
                     readonly=True),
        ),
        "filesystems": (
            FilesystemSpec(Path("/var/lib/kubelet/pods/u/volumes/kubernetes.io~empty-dir/c"),
                           "fs0"),
            FilesystemSpec(Path("/srv/data"), "fs1", readonly=True),
        ),
    },
}


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_golden(name: str, test_conn: libvirt.virConnect, tmp_path: Path) -> None:
    spec = make_spec(**GOLDEN_CASES[name])
    xml = render_domain(spec, TEMPLATES)
    golden = GOLDEN / name
    if os.environ.get("AVR_REGEN_GOLDEN") == "1":
        GOLDEN.mkdir(exist_ok=True)
        golden.write_text(xml)
    assert golden.is_file(), f"missing {golden}: run with AVR_REGEN_GOLDEN=1"
    assert xml == golden.read_text(), f"{name} differs; AVR_REGEN_GOLDEN=1 rewrites it"
    check_for_real(test_conn, spec, tmp_path)


HOTPLUG_NIC = InterfaceSpec("avt0123456781", "02:00:00:00:00:01")


def test_hotplug_interface_golden(test_conn: libvirt.virConnect, tmp_path: Path) -> None:
    """The `<interface>` NIC hot-plug hands libvirt: pinned, the very text the domain
    carries for the same NIC, and valid inside a domain (schema and test driver)."""
    xml = render_interface(HOTPLUG_NIC, TEMPLATES)
    golden = GOLDEN / "interface-hotplug.xml"
    if os.environ.get("AVR_REGEN_GOLDEN") == "1":
        golden.write_text(xml)
    assert golden.is_file(), f"missing {golden}: run with AVR_REGEN_GOLDEN=1"
    assert xml == golden.read_text(), f"{golden.name} differs; AVR_REGEN_GOLDEN=1 rewrites it"
    el = ET.fromstring(xml)
    assert el.tag == "interface" and el.get("type") == "ethernet"
    assert el.find("mac").get("address") == HOTPLUG_NIC.mac  # type: ignore[union-attr]
    spec = make_spec(interfaces=(HOTPLUG_NIC,))
    domain = render_domain(spec, TEMPLATES)
    assert xml in domain
    check_for_real(test_conn, spec, tmp_path)  # that domain, hence this interface, is valid


def test_interface_override_applies_to_boot_and_hotplug(tmp_path: Path) -> None:
    (tmp_path / "interface.xml.j2").write_text(
        "    <interface type='ethernet'><mac address='{{ nic.mac }}'/>"
        "<target dev='{{ nic.target_dev }}' managed='no'/><model type='virtio'/>"
        "<mtu size='1400'/></interface>\n"
    )
    dirs = default_template_dirs(tmp_path)
    hot = ET.fromstring(render_interface(HOTPLUG_NIC, dirs))
    assert hot.find("mtu").get("size") == "1400"  # type: ignore[union-attr]
    root = ET.fromstring(render_domain(make_spec(interfaces=(HOTPLUG_NIC,)), dirs))
    assert root.find("devices/interface/mtu").get("size") == "1400"  # type: ignore[union-attr]


# --- injection ----------------------------------------------------------------------------

NASTY = [
    "</name><name>evil</name>",
    "]]><!--",
    "<![CDATA[x]]>",
    "'\"'\"",
    "a & b &amp; &lt;",
    "<?xml version='1.0'?>",
    "${x} {{ spec.name }} {% if %}",
    "\u00e9\u4e2d\U0001f600",
    "../../etc/passwd",
]


@pytest.mark.parametrize("value", NASTY)
def test_metadata_values_arrive_intact(
    value: str, test_conn: libvirt.virConnect, tmp_path: Path
) -> None:
    meta = DomainMetadata(
        sandbox_id="sb-" + value, pod_name=value, pod_namespace=value, pod_tenant=value,
        instance="i-" + value,
    )
    spec = make_spec(metadata=meta)
    xml = render_domain(spec, TEMPLATES)
    root = ET.fromstring(xml)
    assert root.findtext("name") == spec.name  # one name, ours
    assert len(root.findall("name")) == 1
    pod = root.find("metadata/avr:pod", NS)
    assert pod is not None
    assert pod.findtext("avr:name", namespaces=NS) == value
    assert pod.findtext("avr:sandbox-id", namespaces=NS) == "sb-" + value
    assert parse_metadata(xml) == meta
    check_for_real(test_conn, spec, tmp_path)


@pytest.mark.parametrize("value", ["a'b", 'a"b', "a<b>", "a&b", "a b", "x]]>y"])
def test_path_values_arrive_intact(
    value: str, test_conn: libvirt.virConnect, tmp_path: Path
) -> None:
    disk = Path(f"/var/lib/avr/{value}/root.qcow2")
    log = Path(f"/var/log/avr/{value}.log")
    spec = make_spec(root_disk=disk, console_log=log, seed_iso=Path(f"/srv/{value}.iso"))
    root = check_for_real(test_conn, spec, tmp_path)
    assert root.find("devices/disk/source").get("file") == str(disk)  # type: ignore[union-attr]
    assert root.find("devices/serial/log").get("file") == str(log)  # type: ignore[union-attr]
    assert root.find("devices/disk[@device='cdrom']/source").get("file") == f"/srv/{value}.iso"  # type: ignore[union-attr]


@pytest.mark.parametrize("bad", ["a\x00b", "a\nb", "a\rb", "a\tb", "a\x1bb", "a\x7fb", "\ufffe"])
def test_control_characters_refused(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        DomainMetadata(sandbox_id="x", pod_name=bad, pod_namespace="n")
    with pytest.raises(InvalidArgument):
        make_spec(root_disk=Path(f"/var/{bad}"))


@pytest.mark.parametrize(
    "overrides",
    [
        {"name": ""},
        {"name": "a/b"},
        {"name": "a</name>"},
        {"name": "a b"},
        {"uuid": "not-a-uuid"},
        {"uuid": UUID.upper()},
        {"uuid": "00000000-0000-0000-0000-000000000000"},
        {"system_uuid": "11111111-1f8e-4b8a-9d8e-2f4b1a9c0d11"},
        {"vcpus": 0},
        {"memory_mib": 0},
        {"root_disk": Path("relative.qcow2")},
        {"root_disk": Path("/var/lib/../../etc/shadow")},
        {"seed_iso": Path("seed.iso")},
        {"console_log": Path("")},
        {"domain_type": "xen"},
        {"cpu_model": "host-passthrough"},
        {"machine": "q35"},
        {"disk_bus": "ide"},
        {"disk_cache": "unsafe"},
        {"interfaces": (InterfaceSpec("t0", "52:54:00:00:00:01"),) * 2},
    ],
)
def test_spec_refuses(overrides: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        make_spec(**overrides)


@pytest.mark.parametrize(
    ("dev", "mac", "model"),
    [
        ("tap0'/><x", "52:54:00:00:00:01", "virtio"),
        ("a-very-long-tap-name", "52:54:00:00:00:01", "virtio"),
        ("tap0", "52:54:00:00:00:0G", "virtio"),
        ("tap0", "52:54:00:AB:00:01", "virtio"),
        ("tap0", "52:54:00:00:00:01", "e1000"),
    ],
)
def test_interface_refuses(dev: str, mac: str, model: str) -> None:
    with pytest.raises(InvalidArgument):
        InterfaceSpec(dev, mac, model)


def test_spec_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        make_spec().name = "x"  # type: ignore[misc]


def test_parse_metadata_of_foreign_domain() -> None:
    assert parse_metadata("<domain type='kvm'><name>other</name></domain>") is None
    assert (
        parse_metadata("<domain><metadata><x:pod xmlns:x='urn:other'/></metadata></domain>") is None
    )


# --- templates: lookup, override, strictness ----------------------------------------------


def test_project_template_dir_is_the_source_tree() -> None:
    assert project_template_dir() == TEMPLATES[0]


def test_default_template_dirs() -> None:
    assert default_template_dirs() == [Path("/etc/arktos-vm-runtime/templates"), TEMPLATES[0]]
    assert default_template_dirs("/srv/t") == [Path("/srv/t"), TEMPLATES[0]]
    assert default_template_dirs(None) == [TEMPLATES[0]]


def test_render_with_default_dirs() -> None:
    # /etc/arktos-vm-runtime/templates normally does not exist: falls through to ours
    if not Path("/etc/arktos-vm-runtime/templates/domain.xml.j2").exists():
        assert render_domain(make_spec()) == render_domain(make_spec(), TEMPLATES)


def test_operator_override(tmp_path: Path) -> None:
    override = tmp_path / "etc"
    override.mkdir()
    (override / "domain.xml.j2").write_text(
        "<domain type='{{ spec.domain_type }}'><name>{{ spec.metadata.pod_name }}</name></domain>\n"
    )
    spec = make_spec(metadata=DomainMetadata("sb", "<pod>&", "ns"))
    xml = render_domain(spec, default_template_dirs(override))
    assert xml == "<domain type='qemu'><name>&lt;pod&gt;&amp;</name></domain>\n"  # autoescaped
    (override / "domain.xml.j2").unlink()
    assert render_domain(spec, default_template_dirs(override)) == render_domain(spec, TEMPLATES)


def test_strict_undefined(tmp_path: Path) -> None:
    (tmp_path / "domain.xml.j2").write_text("<domain>{{ spec.no_such_field }}</domain>")
    with pytest.raises(jinja2.UndefinedError):
        render_domain(make_spec(), [tmp_path, *TEMPLATES])
    (tmp_path / "domain.xml.j2").write_text("<domain>{{ not_passed }}</domain>")
    with pytest.raises(jinja2.UndefinedError):
        render_domain(make_spec(), [tmp_path, *TEMPLATES])


def test_environment_autoescapes() -> None:
    env = dx.template_environment(TEMPLATES)
    assert env.autoescape is True
    assert env.undefined is jinja2.StrictUndefined
