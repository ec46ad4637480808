"""The designer: every choice about a pod's VM, from the pod, its VMConfig, the image and the
settings (domain_xml renders and holds no defaults)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from arktos_vm_runtime.config import Settings
from arktos_vm_runtime.errors import InvalidArgument
from arktos_vm_runtime.service import designer
from arktos_vm_runtime.service.records import SandboxRecord
from arktos_vm_runtime.service.vmconfig import VMConfig

POD = SandboxRecord(id="sb-1", name="p", namespace="n", uid="sb-1", tenant="t", attempt=2,
                    state="SANDBOX_READY", created_at=1)
UUID = "7b5a4c8e-1f8e-4b8a-9d8e-2f4b1a9c0d11"


class Image:
    virtual_size = 2 << 30


def test_tcg_or_kvm_and_the_cpu_model() -> None:
    vm = VMConfig(vcpus=2, memory_mib=256, cpu_model="host-model", disk_driver="scsi")
    tcg = designer.design(POD, UUID, vm, Image(), Settings(disable_kvm=True), Path("/v"), ())
    kvm = designer.design(POD, UUID, vm, Image(), Settings(), Path("/v"), ())
    assert (tcg.domain.domain_type, tcg.domain.cpu_model) == ("qemu", "")
    assert (kvm.domain.domain_type, kvm.domain.cpu_model) == ("kvm", "host-model")
    d = kvm.domain
    assert (d.vcpus, d.memory_mib, d.disk_bus, d.machine, d.disk_cache) == (
        2, 256, "scsi", "pc", "writeback")
    assert d.name == "avr-" + UUID and d.metadata.attempt == 2 and d.metadata.pod_tenant == "t"


def test_files_live_in_the_vm_dir_and_the_disk_is_never_smaller_than_the_image() -> None:
    plan = designer.design(POD, UUID, VMConfig(), Image(), Settings(), Path("/vms/x"), ())
    assert plan.domain.root_disk == Path("/vms/x/root.qcow2") == plan.files.root_disk
    assert plan.domain.seed_iso == Path("/vms/x/seed.iso")
    assert plan.domain.console_log == Path("/vms/x/console.log")
    assert plan.domain.guest_agent_socket == Path("/vms/x/agent.sock")
    assert plan.root_disk_bytes == 2 << 30
    big = VMConfig(root_volume_bytes=5 << 30)
    assert designer.design(POD, UUID, big, Image(), Settings(), Path("/v"),
                           ()).root_disk_bytes == 5 << 30


def test_container_id() -> None:
    assert designer.container_id("sb-1", VMConfig(system_uuid=UUID)) == UUID
    derived = designer.container_id("sb-1", VMConfig())
    assert derived == designer.container_id("sb-1", VMConfig()) != UUID
    assert uuid.UUID(derived).version == 5


def test_a_requested_uuid_cannot_squat_a_derived_one() -> None:
    """A pod knowing another pod's UID can compute the id it derives to; a requested
    name-based (version 5) UUID is refused, so the two id spaces never meet."""
    other = designer.container_id("uid-of-another-pod", VMConfig())
    with pytest.raises(InvalidArgument, match=r"VirtletSystemUUID.*version 5"):
        designer.container_id("sb-1", VMConfig(system_uuid=other))
    v4 = str(uuid.uuid4())
    assert designer.container_id("sb-1", VMConfig(system_uuid=v4)) == v4


def test_the_domain_names_this_instance() -> None:
    plan = designer.design(POD, UUID, VMConfig(), Image(), Settings(), Path("/v"), (),
                           "inst-7")
    assert plan.domain.metadata.instance == "inst-7"
