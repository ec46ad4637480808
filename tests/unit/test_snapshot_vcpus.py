"""A memory snapshot of a VM whose vCPUs are hot-pluggable is loaded by a QEMU that has
them on its command line: libvirt 9.0 adds hot-pluggable vCPUs only after -loadvm, and the
state would not load ("Unknown savevm section or instance 'cpu_common' 1")."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from arktos_vm_runtime.adapters.libvirt_snapshots import cold_plugged_xml


def _snapshot(state: str, vcpus: list[tuple[str, str]]) -> str:
    cpus = "".join(f"<vcpu id='{i}' enabled='{e}' hotpluggable='{h}'/>"
                   for i, (e, h) in enumerate(vcpus))
    return (f"<domainsnapshot><name>s1</name><state>{state}</state><domain type='qemu'>"
            f"<name>avr-x</name><vcpu current='2'>3</vcpu><vcpus>{cpus}</vcpus></domain>"
            "</domainsnapshot>")


def _flags(text: str) -> list[tuple[str | None, str | None]]:
    return [(v.get("enabled"), v.get("hotpluggable"))
            for v in ET.fromstring(text).findall("./domain/vcpus/vcpu")]


def test_enabled_vcpus_become_cold_plugged() -> None:
    text = cold_plugged_xml(_snapshot("running", [("yes", "no"), ("yes", "yes"),
                                                  ("no", "yes")]))
    assert text is not None
    assert _flags(text) == [("yes", "no"), ("yes", "no"), ("no", "yes")]
    assert ET.fromstring(text).findtext("name") == "s1"


def test_paused_snapshots_too() -> None:
    assert cold_plugged_xml(_snapshot("paused", [("yes", "no"), ("yes", "yes")])) is not None


def test_nothing_to_change() -> None:
    assert cold_plugged_xml(_snapshot("running", [("yes", "no"), ("no", "yes")])) is None
    # a disk-only snapshot: the VM boots from it, no state is loaded
    assert cold_plugged_xml(_snapshot("shutoff", [("yes", "no"), ("yes", "yes")])) is None
