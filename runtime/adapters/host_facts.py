"""What the node CLI (`pods`, `diagnose`) and ContainerStatus' verbose info read from the
host: a VM's QEMU pid, the daemon's journal, a namespace's links and addresses, program
versions, a domain's XML. Read-only; every program through proc.run (argv, a timeout).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import libvirt

from ..errors import RuntimeError_
from . import netns, proc
from .libvirt_domains import domain_name

QEMU_RUN_DIR = "/run/libvirt/qemu"  # qemu:///system's pid files
UNIT = "arktos-vm-runtime.service"


def qemu_pid(libvirt_uri: str, uuid: str) -> int | None:
    """The pid of a running VM's QEMU, from libvirt's pid file (qemu:///system only; None
    for other URIs or when it is not running)."""
    u = urlsplit(libvirt_uri)
    if u.scheme.split("+")[0] != "qemu" or u.path != "/system":
        return None
    try:
        pid = int(Path(QEMU_RUN_DIR, f"{domain_name(uuid)}.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


def journal(lines: int = 20000, unit: str = UNIT) -> tuple[str, str] | None:
    """(source, text) of the unit's journal, or None when journalctl is missing or has
    no entry for it (no systemd here: the caller falls back to a log file)."""
    if shutil.which("journalctl") is None:
        return None
    argv = ["journalctl", "-u", unit, "--no-pager", "-o", "short-iso-precise", "-n",
            str(lines)]
    try:
        r = proc.run(argv, timeout=60, check=False, what="journalctl")
    except RuntimeError_:
        return None
    text = r.out
    if r.returncode != 0 or not text.strip() or text.strip() == "-- No entries --":
        return None
    return " ".join(argv), text


def log_file(path: str, max_bytes: int = 32 * 2**20) -> str | None:
    """The last max_bytes of a log file (None when unreadable)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - max_bytes))
            return f.read().decode(errors="replace")
    except OSError:
        return None


def netns_addresses(name: str) -> Any:
    """`ip -j addr` inside a namespace (links and their addresses), parsed; a dict with
    "error" when it cannot be read."""
    if not netns.exists(name):
        return {"error": f"network namespace {name} does not exist"}
    try:
        r = proc.run(["ip", "-n", netns.check_name(name), "-j", "-d", "addr", "show"],
                     timeout=30, check=True)
        return json.loads(r.out or "[]")
    except (RuntimeError_, ValueError) as e:
        return {"error": str(e)}


def program_version(argv: list[str]) -> str:
    try:
        r = proc.run(argv, timeout=30, check=False)
    except RuntimeError_ as e:
        return f"unavailable: {e}"
    return (r.out or r.err).strip().splitlines()[0] if (r.out or r.err).strip() else ""


def _dotted(v: int) -> str:
    return f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}"


def libvirt_versions(uri: str) -> dict[str, str]:
    """libvirt's library, daemon and hypervisor versions through one connection."""
    out = {"libvirt-python": _dotted(libvirt.getVersion())}
    try:
        conn = libvirt.openReadOnly(uri)
    except libvirt.libvirtError as e:
        return {**out, "error": f"connecting to {uri}: {e.get_error_message()}"}
    try:
        out["libvirtd"] = _dotted(conn.getLibVersion())
        out["hypervisor"] = f"{conn.getType()} {_dotted(conn.getVersion())}"
    except libvirt.libvirtError as e:
        out["error"] = e.get_error_message()
    finally:
        conn.close()
    return out


def domain_xmls(uri: str, uuids: list[str]) -> dict[str, str]:
    """Each named domain's live XML (or an error line), by container id."""
    out: dict[str, str] = {}
    try:
        conn = libvirt.openReadOnly(uri)
    except libvirt.libvirtError as e:
        return {u: f"<!-- connecting to {uri}: {e.get_error_message()} -->" for u in uuids}
    try:
        for uuid in uuids:
            try:
                out[uuid] = conn.lookupByName(domain_name(uuid)).XMLDesc(0)
            except libvirt.libvirtError as e:
                out[uuid] = f"<!-- {domain_name(uuid)}: {e.get_error_message()} -->"
    finally:
        conn.close()
    return out
