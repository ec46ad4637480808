"""Snapshot create and restore time on the Debian cloud guest with a 2 GiB root disk
(VirtletRootVolumeSize 2Gi, 2 vCPUs, 512 MiB, TCG):

1. through the runtime's socket: CreateSnapshot and RestoreToSnapshot (internal qcow2
   snapshots, disk + memory, the VM's taps re-wired on restore), and the time from the
   restore's return to the guest answering ping on its CNI address;
2. baseline, raw libvirt on a domain of the same shape (no NIC): internal snapshots
   (snapshotCreateXML + revertToSnapshot) next to external ones (a disk overlay + a memory
   file; libvirt 9.0 cannot revert those, so the revert is done by hand as an operator
   would: destroy, a new overlay on the snapshot's frozen disk, restore the memory file).

    .venv/bin/python -m bench.snapshots [--runs 3]

Prints a table; writes bench/results/snapshots.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import libvirt

from arktos_vm_runtime.adapters.libvirt_snapshots import snapshot_xml
from bench import baseline_raw_libvirt as raw
from tests.daemon_proc import APIS
from tests.guest.images import cloud_guest_image
from tests.integration.test_network_common import CniTestNet, cni_test_network
from tests.integration.vmpods import (
    container_config,
    cri_records,
    image_server,
    log_text,
    sandbox_config,
    vm_runtime,
    wait_for,
)

MARKER = "BENCH-SNAPSHOT-READY"
RESULTS = Path(__file__).parent / "results" / "snapshots.json"
pb = APIS["v1alpha2"][0]


def timed(fn: Callable[[], object]) -> float:
    t = time.monotonic()
    fn()
    return time.monotonic() - t


def _answers(net: CniTestNet, ip: str) -> bool:
    try:
        return " 0% packet loss" in net.ping(ip, count=1)
    except AssertionError:
        return False


def runtime_figures(runs: int, tmp: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"create": [], "restore": [], "ping_after_restore": []}
    (tmp / "img").mkdir()
    (tmp / "img" / "guest.qcow2").symlink_to(cloud_guest_image())
    with image_server({"guest.qcow2": tmp / "img" / "guest.qcow2"}) as host, \
            cni_test_network() as net:
        d = vm_runtime(tmp, net).start()
        rt = d.runtime("v1alpha2")
        sid = ""
        try:
            image = f"{host}/guest.qcow2"
            d.images("v1alpha2").PullImage(pb.PullImageRequest(image=pb.ImageSpec(
                image=image)), timeout=600)
            cfg = sandbox_config(pb, tmp / "pods", name="bench-snap", annotations={
                "VirtletVCPUCount": "2", "VirtletRootVolumeSize": "2Gi",
                "VirtletCloudInitUserData": f"runcmd:\n  - echo {MARKER} > /dev/ttyS0\n"})
            sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg),
                                   timeout=60).pod_sandbox_id
            cid = rt.CreateContainer(pb.CreateContainerRequest(
                pod_sandbox_id=sid, sandbox_config=cfg,
                config=container_config(pb, image, memory_mib=512)), timeout=120).container_id
            rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=120)
            log = tmp / "pods" / "vm" / "0.log"
            wait_for("the marker", lambda: any(r.endswith(" " + MARKER)
                                               for r in cri_records(log_text(log))), 600, 1)
            ip = rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid),
                                     timeout=10).status.network.ip
            for i in range(runs):
                out["create"].append(timed(lambda i=i: rt.CreateSnapshot(
                    pb.CreateSnapshotRequest(vmID=cid, snapshotID=f"s{i}"), timeout=600)))
                out["restore"].append(timed(lambda i=i: rt.RestoreToSnapshot(
                    pb.RestoreToSnapshotRequest(vmID=cid, snapshotID=f"s{i}"), timeout=600)))
                out["ping_after_restore"].append(timed(lambda: wait_for(
                    "ping", lambda: _answers(net, ip), 120, 0.1)))
        finally:
            if sid:
                with contextlib.suppress(Exception):
                    rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid),
                                        timeout=120)
            d.stop()
    return out


def _external_xml(name: str, mem: Path, overlay: Path) -> str:
    root = ET.Element("domainsnapshot")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "memory", snapshot="external", file=str(mem))
    disks = ET.SubElement(root, "disks")
    vda = ET.SubElement(disks, "disk", name="vda", snapshot="external")
    ET.SubElement(vda, "source", file=str(overlay))
    ET.SubElement(disks, "disk", name="hdc", snapshot="no")
    return ET.tostring(root, encoding="unicode")


def baseline_figures(runs: int, workdir: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in (
        "internal_create", "internal_revert", "external_create", "external_revert",
        "external_memory_file_mib")}
    conn = raw.ensure_libvirtd("qemu:///system")
    name = f"avr-bench-snap-{int(time.time())}"
    d = workdir / "raw"
    d.mkdir()
    d.chmod(0o755)
    disk = d / "root.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                    str(cloud_guest_image()), str(disk), "2G"], check=True)
    seed = raw.make_seed(d, "cloud", name)
    console = d / "console.log"
    xml = raw.domain_xml(name, disk=disk, seed=seed, console=console, vcpus=2, mem_mib=512,
                         kernel=None, agent=False)
    dom = conn.defineXML(xml)
    try:
        t0 = time.monotonic()
        dom.create()
        raw.wait_console(console, raw.CLOUD_MARKER.encode(), t0, 600)
        for i in range(runs):
            t = time.monotonic()
            snap = dom.snapshotCreateXML(
                snapshot_xml(f"i{i}", [("vda", True), ("hdc", False)]), 0)
            out["internal_create"].append(time.monotonic() - t)
            t = time.monotonic()
            dom.revertToSnapshot(snap, libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING)
            out["internal_revert"].append(time.monotonic() - t)
        # External: each snapshot freezes the current disk and adds an overlay on it.
        current = disk
        for i in range(runs):
            mem, overlay, fresh = d / f"mem{i}", d / f"ext{i}.qcow2", d / f"revert{i}.qcow2"
            t = time.monotonic()
            dom.snapshotCreateXML(_external_xml(f"e{i}", mem, overlay),
                                  libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC)
            out["external_create"].append(time.monotonic() - t)
            out["external_memory_file_mib"].append(mem.stat().st_size / 2**20)
            t = time.monotonic()
            dom.destroy()
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2",
                            "-b", str(current), str(fresh)], check=True)
            saved = ET.fromstring(conn.saveImageGetXMLDesc(str(mem), 0))
            for el in saved.iter("disk"):  # the root disk: the new overlay on the frozen one
                target, src = el.find("target"), el.find("source")
                if target is not None and target.get("dev") == "vda" and src is not None:
                    src.set("file", str(fresh))
                    for backing in el.findall("backingStore"):
                        el.remove(backing)
            conn.restoreFlags(str(mem), ET.tostring(saved, encoding="unicode"),
                              libvirt.VIR_DOMAIN_SAVE_RUNNING)
            dom = conn.lookupByName(name)
            out["external_revert"].append(time.monotonic() - t)
            current = fresh
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            dom = conn.lookupByName(name)
            if dom.isActive():
                dom.destroy()
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
        shutil.rmtree(d, ignore_errors=True)
    return out


def row(label: str, values: list[float], unit: str = "s") -> str:
    return (f"  {label:<38} min {min(values):7.2f}  median {statistics.median(values):7.2f}"
            f"  max {max(values):7.2f} {unit}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="avr-bench-", dir="/tmp"))
    tmp.chmod(0o711)
    try:
        ours = runtime_figures(args.runs, tmp)
        base = baseline_figures(args.runs, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"arktos-vm-runtime, Debian cloud guest, 2 GiB root, 512 MiB, 2 vCPUs, TCG, "
          f"{args.runs} runs (internal qcow2 snapshots, disk + memory)")
    print(row("CreateSnapshot", ours["create"]))
    print(row("RestoreToSnapshot", ours["restore"]))
    print(row("..then the guest answers ping", ours["ping_after_restore"]))
    print(f"baseline: raw libvirt, same guest and shape (no NIC), {args.runs} runs")
    print(row("internal: snapshotCreateXML", base["internal_create"]))
    print(row("internal: revertToSnapshot", base["internal_revert"]))
    print(row("external: snapshotCreateXML (disk+mem)", base["external_create"]))
    print(row("external: revert by hand (no libvirt API)", base["external_revert"]))
    print(row("external: memory file", base["external_memory_file_mib"], "MiB"))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"runtime": ours, "baseline": base, "runs": args.runs},
                                  indent=1) + "\n")


if __name__ == "__main__":
    main()
