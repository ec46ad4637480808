"""A VM's vCPUs and memory: read from libvirt, and changed live (or in the config only).

What the VM has now is libvirt's answer: `read` gives the vCPUs present,
the memory the guest holds (the balloon's actual size while it runs; the config's
currentMemory when it does not), the balloon's target (the persistent config, which every
change also writes) and the maxima the domain was defined with. `apply` changes a running
domain with AFFECT_LIVE|AFFECT_CONFIG, a stopped one with AFFECT_CONFIG, so the new size
survives a restart of the VM and of the daemon (the domain XML is the one place it is
kept). vCPUs are hot-plugged and hot-unplugged (ACPI; unplug needs the guest to let the
CPU go, and libvirt waits a few seconds for it; under TCG vCPUs are not unplugged, the
guest only takes them offline); the guest agent, when the guest has one, is then asked to
bring the present CPUs online, or as many as asked for. Memory goes through the virtio balloon:
the target is set at once and the guest gives memory back (or takes it) at its own pace.

`present`, what ContainerStatus reports once per container a second, keeps libvirt's last
answer until libvirt says the domain changed (domain_events: lifecycle, balloon,
device and tunable events; libvirt's own balloon figure follows the same event), until
`apply` changes it, for at most SIZE_MAX_AGE seconds (a change no event reports, as an
operator's `virsh setvcpus --config` on a stopped VM, shows within that), and never across
a reconnection to libvirt (events may have been missed meanwhile).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
import xml.etree.ElementTree as ET

import libvirt

from ..errors import NotFound
from .libvirt_domains import Domains, call

log = logging.getLogger(__name__)

KIB_PER_MIB = 1024
SIZE_MAX_AGE = 10.0  # seconds `present` keeps an answer no event has invalidated
ONLINE_WAIT = 15.0  # seconds the guest agent is given to bring hot-plugged CPUs online


@dataclasses.dataclass(frozen=True)
class VmResources:
    active: bool
    vcpus: int  # present now (live when running, else the config's current)
    max_vcpus: int
    memory_kib: int  # the guest holds now (balloon actual when running)
    target_kib: int  # the balloon's target, as the persistent config says
    max_memory_kib: int


@dataclasses.dataclass(frozen=True)
class VmPresent:
    """The part of VmResources that ContainerStatus reports, from one virDomainGetInfo."""

    vcpus: int
    memory_kib: int


def _current_memory_kib(xml: str) -> int:
    """<currentMemory> of a domain XML libvirt wrote (libvirt always writes KiB)."""
    el = ET.fromstring(xml).find("currentMemory")
    if el is None or not el.text or el.get("unit", "KiB") != "KiB":
        return 0
    return int(el.text)


def _is_tcg(xml: str) -> bool:
    """A domain of type qemu: QEMU's TCG emulation, no KVM."""
    return ET.fromstring(xml).get("type") == "qemu"


class DomainResizer:
    def __init__(self, domains: Domains) -> None:
        self._domains = domains
        # uuid -> (the sandbox it was found ours for, when read, answer), all read on
        # `_sizes_conn`; `_epoch` counts invalidations, so an answer read while one
        # happened is not kept.
        self._sizes: dict[str, tuple[str, float, VmPresent]] = {}
        self._sizes_conn: libvirt.virConnect | None = None
        self._epoch = 0
        self._sizes_lock = threading.Lock()
        domains.events.watch_changes(self._forget_size)

    def _forget_size(self, uuid: str) -> None:
        with self._sizes_lock:
            self._sizes.pop(uuid, None)
            self._epoch += 1

    def read(self, uuid: str, sandbox_id: str) -> VmResources | None:
        """None when the domain is gone or not ours."""
        dom = self._domains.owned(uuid, sandbox_id, "reading the size of")
        if dom is None:
            return None
        try:
            with call("reading the VM's vCPUs and memory", uuid):
                _state, max_kib, mem_kib, vcpus, _cpu = dom.info()
                active = bool(dom.isActive())
                which = libvirt.VIR_DOMAIN_AFFECT_LIVE if active \
                    else libvirt.VIR_DOMAIN_AFFECT_CONFIG
                max_vcpus = dom.vcpusFlags(which | libvirt.VIR_DOMAIN_VCPU_MAXIMUM)
                target = _current_memory_kib(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        except NotFound:
            return None
        return VmResources(active, vcpus, max_vcpus, mem_kib, target or mem_kib, max_kib)

    def present(self, uuid: str, sandbox_id: str) -> VmPresent | None:
        """The vCPUs present and the memory the guest holds now, as `read` gives them (the
        same virDomainGetInfo), without the maxima and the balloon target: ContainerStatus
        calls this once per container a second, and `read`'s three more libvirt calls and
        inactive-XML parse were most of its cost (bench/density.py); the ownership check is
        made once per domain (`Domains.owned_for_reads`), so a read is one libvirt call,
        and its answer is kept until the domain changes (module docstring). None when the
        domain is gone or not ours."""
        conn = self._domains.events.watched_connection()
        now = time.monotonic()
        with self._sizes_lock:
            kept = self._kept(conn, uuid, sandbox_id, now)
            epoch = self._epoch
        if kept is not None:
            return kept
        dom = self._domains.owned_for_reads(uuid, sandbox_id, "reading the size of")
        if dom is None:
            return None
        try:
            with call("reading the VM's vCPUs and memory", uuid):
                _state, _max_kib, mem_kib, vcpus, _cpu = dom.info()
        except NotFound:
            self._domains.forget(uuid)
            self._forget_size(uuid)
            return None
        vm = VmPresent(vcpus, mem_kib)
        with self._sizes_lock:
            if conn is not None and self._epoch == epoch:
                if conn is not self._sizes_conn:  # a new connection: nothing before counts
                    self._sizes.clear()
                    self._sizes_conn = conn
                self._sizes[uuid] = (sandbox_id, now, vm)
        return vm

    def kept(self, uuid: str, sandbox_id: str) -> VmPresent | None:
        """`present`'s kept answer, if it holds; None otherwise (then call `present`).
        Never calls or waits on libvirt: the serving loop answers from it."""
        conn = self._domains.events.watched_now()
        with self._sizes_lock:
            return self._kept(conn, uuid, sandbox_id, time.monotonic())

    def _kept(self, conn: libvirt.virConnect | None, uuid: str, sandbox_id: str,
              now: float) -> VmPresent | None:
        hit = self._sizes.get(uuid) if conn is not None and conn is self._sizes_conn else None
        if hit is not None and hit[0] == sandbox_id and now - hit[1] < SIZE_MAX_AGE:
            return hit[2]
        return None

    def apply(self, uuid: str, sandbox_id: str, vcpus: int | None,
              memory_mib: int | None) -> None:
        """Sets the vCPUs and the memory (None: unchanged); live and in the config when
        the domain runs, in the config only when not."""
        try:
            self._apply(uuid, sandbox_id, vcpus, memory_mib)
        finally:
            self._forget_size(uuid)  # whatever libvirt took, the next status reads it

    def _apply(self, uuid: str, sandbox_id: str, vcpus: int | None,
               memory_mib: int | None) -> None:
        dom = self._domains.owned(uuid, sandbox_id, "resizing")
        if dom is None:
            raise NotFound(f"the domain of container {uuid} does not exist or is not ours")
        with call("reading the VM's state", uuid):
            active = bool(dom.isActive())
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | (
            libvirt.VIR_DOMAIN_AFFECT_LIVE if active else 0)
        if vcpus is not None:
            if active:
                self._set_live_vcpus(dom, uuid, vcpus)
                self._online_in_guest(dom, uuid, vcpus)
            else:
                with call(f"setting the VM's vCPUs to {vcpus}", uuid):
                    dom.setVcpusFlags(vcpus, flags)
        if memory_mib is not None:
            with call(f"setting the VM's memory to {memory_mib} MiB", uuid):
                dom.setMemoryFlags(memory_mib * KIB_PER_MIB, flags)

    @staticmethod
    def _set_live_vcpus(dom: libvirt.virDomain, uuid: str, vcpus: int) -> None:
        """Hot-plug or unplug to `vcpus`, live and in the config (a shrink under TCG: in
        the config, the guest taking the CPUs offline). For an unplug the guest
        is first asked (through its agent, if any) to take the CPUs offline, so it only
        has to let them go; when it has not done so within libvirt's wait, the request
        stands (the guest may still complete it), the config is set, and the call
        succeeds: ContainerStatus reports the vCPUs present until the guest lets go."""
        what = f"setting the VM's vCPUs to {vcpus}"
        with call(what, uuid):
            present = dom.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_LIVE)
            tcg = vcpus < present and _is_tcg(dom.XMLDesc(0))
        if tcg:
            # No unplug under TCG: QEMU (7.2 at least) drops the vCPU the guest ejects but
            # never sends libvirt DEVICE_DELETED, so libvirt keeps counting it, and a later
            # hot-plug into another slot crashes QEMU (README, Live resize). The guest is
            # asked (by _online_in_guest) to take the CPUs offline; the config has the count.
            log.info("%s runs under TCG: its vCPUs above %d are taken offline in the guest, "
                     "not unplugged; the VM starts with %d next time", uuid, vcpus, vcpus,
                     extra={"CONTAINER_ID": uuid})
            with call(what, uuid):
                dom.setVcpusFlags(vcpus, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
            return
        if vcpus < present:
            with contextlib.suppress(libvirt.libvirtError):
                dom.setVcpusFlags(vcpus, libvirt.VIR_DOMAIN_VCPU_GUEST)
        with call(what, uuid):
            try:
                dom.setVcpusFlags(vcpus, libvirt.VIR_DOMAIN_AFFECT_LIVE
                                  | libvirt.VIR_DOMAIN_AFFECT_CONFIG)
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_OPERATION_TIMEOUT:
                    raise
                log.info("the guest of %s has not released its vCPUs yet (%s); the "
                         "unplug request stands", uuid, e.get_error_message(),
                         extra={"CONTAINER_ID": uuid})
                dom.setVcpusFlags(vcpus, libvirt.VIR_DOMAIN_AFFECT_CONFIG)

    @staticmethod
    def _online_in_guest(dom: libvirt.virDomain, uuid: str, vcpus: int) -> None:
        """A Linux guest leaves a hot-plugged CPU offline unless something onlines it (no
        udev rule in Debian does): the guest agent, when one answers, is asked to bring
        the present CPUs online, for a few seconds while the guest takes in the ACPI
        event. Best effort: without an agent the guest decides."""
        deadline = time.monotonic() + ONLINE_WAIT
        while True:
            try:
                online = dom.vcpusFlags(libvirt.VIR_DOMAIN_VCPU_GUEST)
            except libvirt.libvirtError:
                return  # no agent: the guest decides
            if online == vcpus or time.monotonic() > deadline:
                if online != vcpus:
                    log.info("the guest of %s has %d of %d vCPUs online", uuid, online, vcpus,
                             extra={"CONTAINER_ID": uuid})
                return
            with contextlib.suppress(libvirt.libvirtError):
                dom.setVcpusFlags(vcpus, libvirt.VIR_DOMAIN_VCPU_GUEST)
            time.sleep(0.5)
