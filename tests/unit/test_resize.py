"""Live resize without root: the arithmetic of UpdateContainerResources (vCPUs =
ceil(quota / period), memory in MiB), its refusals, what ContainerStatus reports, the
headroom the designer gives a domain, and the real Pods resizing a created VM on libvirt's
test:///default (config only, as for any VM that is not running), read back from libvirt
by a second Pods over the same store (a daemon restart). The live path and the guest's
view are tests/integration/test_live_resize.py."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import grpc
import libvirt
import pytest

from arktos_vm_runtime.adapters.domain_xml import DomainSpec, render_domain
from arktos_vm_runtime.adapters.libvirt_resize import VmPresent, VmResources, _is_tcg
from arktos_vm_runtime.api.dispatch import api_modules
from arktos_vm_runtime.config import Settings
from arktos_vm_runtime.errors import InvalidArgument, NotFound
from arktos_vm_runtime.service.designer import headroom
from arktos_vm_runtime.service.quotas import Quotas
from arktos_vm_runtime.service.records import ContainerRecord
from arktos_vm_runtime.service.resize import (
    Reported,
    ResizeRequest,
    Target,
    check_fits,
    reported,
    target,
)
from arktos_vm_runtime.service.vmconfig import parse_vm_config
from tests.unit import test_pods
from tests.unit.test_dispatch import Client, serve
from tests.unit.test_domain_xml import TEMPLATES, make_spec
from tests.unit.test_pods import URI, Env, container_input, sandbox

base_image = test_pods.base_image
env = test_pods.env

MIB = 1 << 20


# --- the arithmetic ------------------------------------------------------------------------

@pytest.mark.parametrize(("quota", "period", "mem", "want"), [
    (100_000, 100_000, 512 * MIB, Target(1, 512)),
    (150_000, 100_000, 0, Target(2, None)),  # ceil, memory unchanged
    (200_001, 100_000, 0, Target(3, None)),
    (1, 100_000, 0, Target(1, None)),  # never below one vCPU
    (50_000, 50_000, 0, Target(1, None)),
    (0, 100_000, 768 * MIB, Target(None, 768)),  # no CPU limit: vCPUs unchanged
    (-1, 100_000, 0, Target(None, None)),  # -1: unlimited, as in cgroups
    (0, 0, 0, Target(None, None)),  # nothing asked
    (0, 0, 512 * MIB + 1, Target(None, 513)),  # rounded up to MiB
    (0, 0, 64 * MIB, Target(None, 64)),
])
def test_target(quota: int, period: int, mem: int, want: Target) -> None:
    assert target(ResizeRequest(period, quota, mem)) == want


@pytest.mark.parametrize(("quota", "period", "mem", "words"), [
    (100_000, 0, 0, "zero cpu_period"),  # the Go runtime divided by it
    (100_000, -100_000, 0, "cpu_period -100000 is negative"),
    (0, -1, 0, "negative"),
    (-2, 100_000, 0, "cpu_quota -2"),
    (0, 0, -1, "memory_limit_in_bytes -1 is negative"),
    (0, 0, 63 * MIB, "at least 64 MiB"),
    (0, 0, 1, "at least 64 MiB"),
])
def test_target_refuses(quota: int, period: int, mem: int, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        target(ResizeRequest(period, quota, mem))


def vm(vcpus: int = 2, max_vcpus: int = 4, mib: int = 512, max_mib: int = 1024,
       target_mib: int | None = None, active: bool = True) -> VmResources:
    return VmResources(active, vcpus, max_vcpus, mib * 1024, (target_mib or mib) * 1024,
                       max_mib * 1024)


QUOTAS = Quotas(max_pods=0, max_vcpus=8, max_memory_mib=4096, max_root_bytes=0)


def test_check_fits_headroom_and_quotas() -> None:
    check_fits(Target(4, 1024), vm(), QUOTAS)  # the whole headroom
    check_fits(Target(None, None), vm(), QUOTAS)
    with pytest.raises(InvalidArgument, match="5 vCPUs; this VM was defined with at most 4"):
        check_fits(Target(5, None), vm(), QUOTAS)
    with pytest.raises(InvalidArgument, match="1025 MiB; it was defined with at most 1024"):
        check_fits(Target(None, 1025), vm(), QUOTAS)
    small = Quotas(max_pods=0, max_vcpus=2, max_memory_mib=600, max_root_bytes=0)
    with pytest.raises(InvalidArgument, match="max-pod-vcpus"):
        check_fits(Target(3, None), vm(), small)  # within the headroom, over the quota
    with pytest.raises(InvalidArgument, match="max-pod-memory-mib"):
        check_fits(Target(None, 601), vm(), small)


def record(**kw: Any) -> ContainerRecord:
    values: dict[str, Any] = dict(id="c", sandbox_id="s", name="vm", attempt=0,
                                  state="CONTAINER_RUNNING", created_at=1, image="i",
                                  image_ref="sha256:x", vm_dir="/x")
    values.update(kw)
    return ContainerRecord(**values)


def test_reported_in_the_requests_units() -> None:
    asked = record(cpu_period=100_000, cpu_quota=150_000, memory_limit_in_bytes=700 * MIB + 5)
    # the VM has what was asked: the request's own numbers come back (the kubelet compares)
    assert reported(asked, vm(vcpus=2, mib=701)) == Reported(100_000, 150_000, 700 * MIB + 5)
    r = reported(asked, vm(vcpus=3, mib=650))  # not (yet): what the VM has
    assert (r.cpu_period, r.cpu_quota, r.memory_limit_in_bytes) == (100_000, 300_000, 650 * MIB)
    # the balloon's actual size counts, not its target
    r = reported(asked, vm(vcpus=2, mib=900, target_mib=701))
    assert r.memory_limit_in_bytes == 900 * MIB
    # no limits ever asked: the default CFS period, the VM's own size
    r = reported(record(), vm(vcpus=2, mib=512))
    assert (r.cpu_period, r.cpu_quota, r.memory_limit_in_bytes) == (100_000, 200_000, 512 * MIB)


# --- the headroom ---------------------------------------------------------------------------

@pytest.mark.parametrize(("settings", "quota", "size", "want"), [
    ({}, (8, 4096), (2, 512), (8, 512)),  # defaults: vCPUs to the quota, no memory headroom
    ({"vm_max_vcpus": 4, "vm_max_memory_mib": 2048}, (8, 4096), (2, 512), (4, 2048)),
    ({"vm_max_vcpus": 16, "vm_max_memory_mib": 8192}, (8, 4096), (2, 512), (8, 4096)),  # capped
    ({"vm_max_vcpus": 1, "vm_max_memory_mib": 256}, (8, 4096), (2, 512), (2, 512)),  # not below
    ({}, (200, 1 << 20), (1, 128), (64, 128)),  # MAX_VCPUS
])
def test_headroom(settings: dict[str, Any], quota: tuple[int, int], size: tuple[int, int],
                  want: tuple[int, int]) -> None:
    vmc = parse_vm_config({"VirtletVCPUCount": str(size[0])}, memory_limit_bytes=size[1] * MIB)
    q = Quotas(max_pods=0, max_vcpus=quota[0], max_memory_mib=quota[1], max_root_bytes=0)
    assert headroom(vmc, Settings(**settings), q) == want


def test_spec_refuses_a_maximum_below_the_size() -> None:
    with pytest.raises(InvalidArgument, match="max_vcpus"):
        make_spec(vcpus=2, max_vcpus=1)
    with pytest.raises(InvalidArgument, match="max_memory_mib"):
        make_spec(memory_mib=512, max_memory_mib=511)
    spec: DomainSpec = make_spec(vcpus=1, max_vcpus=0, memory_mib=512, max_memory_mib=0)
    assert (spec.vcpus_max, spec.memory_max_mib) == (1, 512)



@pytest.mark.parametrize(("domain_type", "tcg"), [("qemu", True), ("kvm", False)])
def test_a_tcg_domain_is_told_by_its_type(domain_type: str, tcg: bool) -> None:
    """Under TCG a live vCPU shrink only takes the CPUs offline in the guest (README, Live
    resize); the adapter tells TCG from the domain XML the runtime renders."""
    assert _is_tcg(render_domain(make_spec(domain_type=domain_type), TEMPLATES)) is tcg

# --- the real Pods on test:///default --------------------------------------------------------

def _inactive(cid: str) -> ET.Element:
    dom = libvirt.open(URI).lookupByUUIDString(cid)
    return ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))


def test_a_created_vm_is_resized_in_its_config_and_read_back_after_a_restart(env: Env) -> None:
    pods = env.pods(vm_max_vcpus=4, vm_max_memory_mib=1024, max_pod_vcpus=4)
    sb = sandbox()
    pods.run_sandbox(sb)
    cid = pods.create_container(sb.id, container_input(
        cpu_period=100_000, cpu_quota=100_000, memory_limit_in_bytes=256 * MIB))
    root = _inactive(cid)
    assert root.find("vcpu").get("current") == "1" and root.findtext("vcpu") == "4"  # type: ignore[union-attr]
    assert root.findtext("memory") == str(1024 * 1024)
    assert root.findtext("currentMemory") == str(256 * 1024)
    rec = pods.container(cid)
    assert pods.resize.resources(rec) == reported(rec, vm(1, 4, 256, 1024))

    pods.resize.update(cid, ResizeRequest(100_000, 250_000, 768 * MIB))
    root = _inactive(cid)
    assert root.find("vcpu").get("current") == "3"  # type: ignore[union-attr]
    assert root.findtext("currentMemory") == str(768 * 1024)
    r = pods.resize.resources(pods.container(cid))
    assert r is not None and (r.cpu_quota, r.memory_limit_in_bytes) == (250_000, 768 * MIB)

    # bad inputs change nothing
    for req, words in ((ResizeRequest(0, 100_000, 0), "zero cpu_period"),
                       (ResizeRequest(100_000, 500_000, 0), "at most 4"),
                       (ResizeRequest(0, 0, 2048 * MIB), "at most 1024 MiB")):
        with pytest.raises(InvalidArgument, match=words):
            pods.resize.update(cid, req)
    with pytest.raises(NotFound):
        pods.resize.update("0" * 36, ResizeRequest(100_000, 100_000, 0))
    assert pods.resize.resources(pods.container(cid)) == r

    # A daemon restart with lower quotas: the size is libvirt's, the quotas apply again.
    again = env.pods(vm_max_vcpus=4, vm_max_memory_mib=1024, max_pod_vcpus=2,
                     max_pod_memory_mib=512)
    assert again.resize.resources(again.container(cid)) == r
    with pytest.raises(InvalidArgument, match="max-pod-vcpus"):
        again.resize.update(cid, ResizeRequest(100_000, 300_000, 0))
    with pytest.raises(InvalidArgument, match="max-pod-memory-mib"):
        again.resize.update(cid, ResizeRequest(0, 0, 600 * MIB))
    again.resize.update(cid, ResizeRequest(100_000, 100_000, 128 * MIB))  # shrink
    r = again.resize.resources(again.container(cid))
    assert r is not None and (r.cpu_quota, r.memory_limit_in_bytes) == (100_000, 128 * MIB)
    again.remove_sandbox(sb.id)


def test_what_container_status_reads_is_what_the_full_read_says(env: Env) -> None:
    """ContainerStatus reads only virDomainGetInfo (`present`, bench/density.py measured the
    full `read` as most of a status's cost): the same vCPUs and memory as `read`, before
    and after a resize; nothing for a domain of another sandbox, or one that is gone."""
    pods = env.pods(vm_max_vcpus=4, vm_max_memory_mib=1024, max_pod_vcpus=4)
    sb = sandbox()
    pods.run_sandbox(sb)
    cid = pods.create_container(sb.id, container_input(
        cpu_period=100_000, cpu_quota=200_000, memory_limit_in_bytes=300 * MIB))
    vms = pods.resize._vms
    for want in (VmPresent(2, 300 * 1024), VmPresent(3, 700 * 1024)):
        full = vms.read(cid, sb.id)
        assert full is not None
        assert vms.present(cid, sb.id) == VmPresent(full.vcpus, full.memory_kib) == want
        pods.resize.update(cid, ResizeRequest(100_000, 300_000, 700 * MIB))
    rec = pods.container(cid)
    assert pods.resize.resources(rec) == Reported(100_000, 300_000, 700 * MIB)
    assert vms.present(cid, "f" * 64) is None  # not this sandbox's domain: not read
    pods.remove_sandbox(sb.id)
    assert vms.present(cid, sb.id) is None


# --- over the socket, both API versions ------------------------------------------------------

def test_status_codes_over_the_socket(tmp_path: Path) -> None:
    async def test(call: Client) -> None:
        for api, pb in api_modules().items():
            def req(pb: Any = pb, **linux: int) -> bytes:
                return bytes(pb.UpdateContainerResourcesRequest(
                    container_id="0" * 36,
                    linux=pb.LinuxContainerResources(**linux)).SerializeToString())

            # checked before any lookup: a bad request is INVALID_ARGUMENT even for an
            # unknown container
            for bad, words in ((dict(cpu_quota=100_000, cpu_period=0), "zero cpu_period"),
                               (dict(cpu_period=-1), "negative"),
                               (dict(memory_limit_in_bytes=1 << 20), "at least 64 MiB")):
                code, detail = await call(api, "UpdateContainerResources", req(**bad))
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (api, bad)
                assert words in str(detail)
            code, _ = await call(api, "UpdateContainerResources",
                                 req(cpu_quota=100_000, cpu_period=100_000))
            assert code == grpc.StatusCode.NOT_FOUND, api

    serve(tmp_path, test)
