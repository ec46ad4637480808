"""The libvirt domain XML of one pod VM: a frozen spec in, XML text out. No policy here.

`DomainSpec` holds every decision already taken (by service/designer.py); this module
checks that the spec is well formed (what libvirt's schema and our template can carry).
`render_domain` only turns it into XML through the Jinja2 template `domain.xml.j2`, which
includes `interface.xml.j2` for each NIC; `render_interface` renders that one alone for NIC
hot-plug, so an operator's override applies to both. The environment
autoescapes, so no value from a pod spec reaches the XML unescaped, and `DomainSpec`
refuses characters XML 1.0 cannot carry at all (NUL and other control characters).

Templates are looked up in an operator override directory first (default
/etc/arktos-vm-runtime/templates), then in the project's own templates/ directory, so an
operator can replace a template by dropping a file of the same name.

The `<metadata>` element in our own namespace records the sandbox and pod the domain
belongs to and the runtime instance that defined it, so a restarted daemon can rebuild its
memory from libvirt (`parse_metadata`) and tell its domains from another instance's on the
same host (`not_owned`).
"""

from __future__ import annotations

import re
import uuid as uuid_mod
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..checks import has_control, ifname_problem, is_mac, is_uuid
from ..errors import InvalidArgument
from . import templates
from .templates import default_template_dirs

if TYPE_CHECKING:
    import jinja2

METADATA_NS = "https://arktos-vm-runtime/xmlns/domain/1"
DOMAIN_TEMPLATE = "domain.xml.j2"
INTERFACE_TEMPLATE = "interface.xml.j2"
GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"

DomainType = Literal["kvm", "qemu"]
DiskBus = Literal["virtio", "scsi"]
DiskCache = Literal["none", "writeback"]


def template_environment(
    template_dirs: Sequence[Path | str], *, autoescape: bool = True
) -> jinja2.Environment:
    """The XML templates' environment: strict and autoescaping (see adapters/templates)."""
    return templates.environment(template_dirs, autoescape=autoescape)


# --- the spec -----------------------------------------------------------------------------

# What XML 1.0 cannot carry at all, beyond the C0 controls checks.CONTROL already refuses.
_XML_UNSAFE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffe\uffff]")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidArgument(message)


def _check_text(what: str, value: str, *, allow_empty: bool = True) -> None:
    _require(isinstance(value, str), f"{what} must be a string")
    _require(allow_empty or bool(value), f"{what} must not be empty")
    _require(not has_control(value), f"{what} {value!r} contains control characters")
    _require(not _XML_UNSAFE.search(value), f"{what} {value!r} cannot be carried in XML")


def _check_path(what: str, value: Path) -> None:
    _check_text(what, str(value), allow_empty=False)
    _require(value.is_absolute(), f"{what} {str(value)!r} must be an absolute path")
    _require(".." not in value.parts, f"{what} {str(value)!r} must not contain '..'")


@dataclass(frozen=True)
class DomainMetadata:
    """Who the domain belongs to; stored in the domain's `<metadata>`."""

    sandbox_id: str
    pod_name: str
    pod_namespace: str
    pod_tenant: str = ""
    attempt: int = 0
    #: the runtime instance (its state store's random id) that defined the domain; ""
    #: in domains defined before instances were recorded
    instance: str = ""

    def __post_init__(self) -> None:
        _check_text("sandbox id", self.sandbox_id, allow_empty=False)
        _check_text("instance id", self.instance)
        _check_text("pod name", self.pod_name)
        _check_text("pod namespace", self.pod_namespace)
        _check_text("pod tenant", self.pod_tenant)
        _require(isinstance(self.attempt, int) and self.attempt >= 0, "attempt must be an int >= 0")


@dataclass(frozen=True)
class InterfaceSpec:
    """One `<interface type='ethernet'>`: a tap the runtime made, opened by QEMU by name."""

    target_dev: str
    mac: str
    model: str = "virtio"

    def __post_init__(self) -> None:
        _require(ifname_problem(self.target_dev) is None, f"bad tap name {self.target_dev!r}")
        _require(is_mac(self.mac), f"bad MAC address {self.mac!r} (use lower case)")
        _require(self.model == "virtio", f"interface model {self.model!r}: only virtio")


_SERIAL = re.compile(r"[A-Za-z0-9_-]{1,20}")  # virtio-blk serials: 20 bytes at most
_TARGET = re.compile(r"(vd|sd)[a-z]{1,2}")
_TAG = re.compile(r"[A-Za-z0-9_-]{1,36}")  # a virtiofs tag (the guest's mount source)


@dataclass(frozen=True)
class DiskSpec:
    """A disk beyond the root disk: an extra qcow2 in the VM's directory (`file`) or a
    host block device (`block`), with a serial the guest finds it by."""

    source: Path
    kind: Literal["file", "block"]
    target: str
    bus: DiskBus
    serial: str
    cache: DiskCache
    readonly: bool = False

    @property
    def format(self) -> str:
        return "qcow2" if self.kind == "file" else "raw"

    def __post_init__(self) -> None:
        _check_path("disk source", self.source)
        _require(self.kind in ("file", "block"), f"disk kind {self.kind!r}")
        _require(bool(_TARGET.fullmatch(self.target)), f"disk target {self.target!r}")
        _require(self.target.startswith("vd" if self.bus == "virtio" else "sd"),
                 f"disk target {self.target!r} on bus {self.bus!r}")
        _require(self.bus in ("virtio", "scsi"), f"disk bus {self.bus!r}")
        _require(bool(_SERIAL.fullmatch(self.serial)), f"disk serial {self.serial!r}")
        _require(self.cache in ("none", "writeback"), f"disk cache {self.cache!r}")


@dataclass(frozen=True)
class FilesystemSpec:
    """A host directory shared into the guest with virtiofs, mounted there by its tag."""

    source: Path
    tag: str
    readonly: bool = False

    def __post_init__(self) -> None:
        _check_path("filesystem source", self.source)
        _require(bool(_TAG.fullmatch(self.tag)), f"filesystem tag {self.tag!r}")


@dataclass(frozen=True)
class DomainSpec:
    """Everything the domain XML says. Every field is given: the choices (and their
    defaults) are taken by the service layer's designer, none here."""

    name: str
    uuid: str
    vcpus: int
    memory_mib: int
    root_disk: Path
    console_log: Path
    guest_agent_socket: Path
    metadata: DomainMetadata
    seed_iso: Path | None
    domain_type: DomainType
    cpu_model: Literal["", "host-model"]
    machine: str
    disk_bus: DiskBus
    disk_cache: DiskCache
    #: when set, equals `uuid` and is also exported as the SMBIOS system UUID
    system_uuid: str | None
    interfaces: tuple[InterfaceSpec, ...]
    #: QEMU binary; None lets libvirt pick its default for the arch
    emulator: Path | None
    #: live resize headroom: the most vCPUs and memory the VM can be given while it runs
    #: (0: its current size, no headroom); the designer decides them
    max_vcpus: int = 0
    max_memory_mib: int = 0
    #: disks beyond the root disk and the seed (extra qcow2s, host block devices)
    disks: tuple[DiskSpec, ...] = ()
    #: host directories shared with virtiofs (they need shared memory backing)
    filesystems: tuple[FilesystemSpec, ...] = ()

    def __post_init__(self) -> None:
        _check_text("domain name", self.name, allow_empty=False)
        _require(
            bool(re.fullmatch(r"[A-Za-z0-9_.+-]{1,200}", self.name)),
            f"domain name {self.name!r} must match [A-Za-z0-9_.+-]{{1,200}}",
        )
        _require(is_uuid(self.uuid), f"uuid {self.uuid!r}: canonical lower case")
        _require(uuid_mod.UUID(self.uuid).int != 0, "the nil UUID is not a domain uuid")
        _require(isinstance(self.vcpus, int) and 1 <= self.vcpus <= 512, f"vcpus {self.vcpus!r}")
        _require(
            isinstance(self.memory_mib, int) and self.memory_mib >= 1,
            f"memory_mib {self.memory_mib!r}",
        )
        _require(isinstance(self.max_vcpus, int) and (
            self.max_vcpus == 0 or self.vcpus <= self.max_vcpus <= 512),
            f"max_vcpus {self.max_vcpus!r} (0, or vcpus..512)")
        _require(isinstance(self.max_memory_mib, int) and (
            self.max_memory_mib == 0 or self.memory_mib <= self.max_memory_mib),
            f"max_memory_mib {self.max_memory_mib!r} (0, or at least memory_mib)")
        _check_path("root disk", self.root_disk)
        _check_path("console log", self.console_log)
        _check_path("guest agent socket", self.guest_agent_socket)
        if self.seed_iso is not None:
            _check_path("seed ISO", self.seed_iso)
        if self.emulator is not None:
            _check_path("emulator", self.emulator)
        _require(self.domain_type in ("kvm", "qemu"), f"domain type {self.domain_type!r}")
        _require(self.cpu_model in ("", "host-model"), f"cpu model {self.cpu_model!r}")
        _require(self.machine == "pc", f"machine {self.machine!r}: only 'pc' is supported")
        _require(self.disk_bus in ("virtio", "scsi"), f"disk bus {self.disk_bus!r}")
        _require(self.disk_cache in ("none", "writeback"), f"disk cache {self.disk_cache!r}")
        if self.system_uuid is not None:
            _require(
                self.system_uuid == self.uuid,
                f"system uuid {self.system_uuid!r} must equal the domain uuid {self.uuid!r}",
            )
        taps = [i.target_dev for i in self.interfaces]
        _require(len(taps) == len(set(taps)), "two interfaces share a tap")
        macs = [i.mac for i in self.interfaces]
        _require(len(macs) == len(set(macs)), "two interfaces share a MAC address")
        targets = [self.root_disk_target, *(d.target for d in self.disks)]
        _require(len(targets) == len(set(targets)), "two disks share a target")
        serials = [d.serial for d in self.disks]
        _require(len(serials) == len(set(serials)), "two disks share a serial")
        tags = [f.tag for f in self.filesystems]
        _require(len(tags) == len(set(tags)), "two filesystems share a tag")

    # Two facts of libvirt/QEMU the template needs, not choices: the guest device name a
    # bus gives the first disk, and host-model CPUs existing only under KVM.
    @property
    def root_disk_target(self) -> str:
        return "vda" if self.disk_bus == "virtio" else "sda"

    @property
    def scsi_controller(self) -> bool:
        return self.disk_bus == "scsi" or any(d.bus == "scsi" for d in self.disks)

    @property
    def vcpus_max(self) -> int:
        return self.max_vcpus or self.vcpus

    @property
    def hotplug_vcpus(self) -> bool:
        """vCPUs listed one by one, all but vCPU 0 hot-pluggable (see the template)."""
        return self.vcpus_max > self.vcpus or self.vcpus > 1

    @property
    def memory_max_mib(self) -> int:
        return self.max_memory_mib or self.memory_mib

    @property
    def host_model_cpu(self) -> bool:
        """host-model only means something under KVM; under TCG QEMU's default CPU is used."""
        return self.cpu_model == "host-model" and self.domain_type == "kvm"


def render_domain(
    spec: DomainSpec,
    template_dirs: Sequence[Path | str] | None = None,
    *,
    template_name: str = DOMAIN_TEMPLATE,
) -> str:
    """The domain XML of `spec`, from the first `template_name` found in `template_dirs`."""
    dirs = default_template_dirs() if template_dirs is None else template_dirs
    env = template_environment(dirs, autoescape=True)
    return env.get_template(template_name).render(
        spec=spec,
        metadata_ns=METADATA_NS,
        guest_agent_channel=GUEST_AGENT_CHANNEL,
    )


def render_interface(
    spec: InterfaceSpec, template_dirs: Sequence[Path | str] | None = None
) -> str:
    """The `<interface>` of one NIC alone, for hot-plug: the template `domain.xml.j2`
    includes for each of its NICs, so both follow an operator's override."""
    dirs = default_template_dirs() if template_dirs is None else template_dirs
    env = template_environment(dirs, autoescape=True)
    return env.get_template(INTERFACE_TEMPLATE).render(nic=spec)


def parse_metadata(domain_xml: str) -> DomainMetadata | None:
    """Our `<metadata>` element from a domain's XML, or None if the domain is not ours."""
    root = ET.fromstring(domain_xml)
    pod = root.find(f"./metadata/{{{METADATA_NS}}}pod")
    return None if pod is None else _read_pod(pod)


def parse_metadata_element(element_xml: str) -> DomainMetadata:
    """Our `<pod>` element as virDomainGetMetadata returns it (libvirt gives it back
    without its namespace; with one, it is read the same)."""
    return _read_pod(ET.fromstring(element_xml))


def _read_pod(pod: ET.Element) -> DomainMetadata:
    ns = pod.tag[:pod.tag.index("}") + 1] if pod.tag.startswith("{") else ""

    def text(tag: str) -> str:
        el = pod.find(f"{ns}{tag}")
        return "" if el is None or el.text is None else el.text

    attempt = text("attempt")
    return DomainMetadata(
        sandbox_id=text("sandbox-id"),
        pod_name=text("name"),
        pod_namespace=text("namespace"),
        pod_tenant=text("tenant"),
        attempt=int(attempt) if attempt.isdigit() else 0,
        instance=text("instance"),
    )


def not_owned(meta: DomainMetadata | None, instance: str, sandbox_id: str) -> str | None:
    """Why a domain with this metadata is not the one runtime instance `instance` made
    for its sandbox `sandbox_id`, or None when it is. A domain without an instance id was
    defined by a version that did not record one: it is ours when it names the sandbox
    (the caller holds that sandbox's record)."""
    if meta is None:
        return "it carries no metadata of ours"
    if meta.instance and meta.instance != instance:
        return f"it belongs to another runtime instance ({meta.instance[:40]})"
    if meta.sandbox_id != sandbox_id:
        return f"it belongs to pod sandbox {meta.sandbox_id[:80]}, not {sandbox_id[:80]}"
    return None
