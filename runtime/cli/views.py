"""`pods` and `images`: rows read over the daemon's socket, shown as a table or JSON.

Every figure comes from the CRI answers (PodSandboxStatus, ContainerStatus with its
verbose info, ListImages, ListContainers), so what the CLI shows is what the kubelet sees.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from .client import Client, CliError, pb


def _state(enum: Any, value: int) -> str:
    return str(enum.Name(value))


def _uptime(started_ns: int, running: bool) -> int | None:
    return max(0, int(time.time() - started_ns / 1e9)) if running and started_ns else None


def pod_rows(c: Client) -> list[dict[str, Any]]:
    rows = []
    for sb in sorted(c.sandboxes(), key=lambda s: (s.metadata.tenant, s.metadata.namespace,
                                                   s.metadata.name, s.id)):
        st = c.sandbox_status(sb.id).status
        ips = [st.network.ip] if st.network.ip else []
        if ips:
            ips += c.additional_ips(sb.id)
        row: dict[str, Any] = {
            "id": sb.id, "pod": st.metadata.name, "tenant": st.metadata.tenant,
            "namespace": st.metadata.namespace, "state": _state(pb.PodSandboxState, st.state),
            "ips": ips,
            "nics": [{"name": n.name, "port_id": n.port_id,
                      "state": _state(pb.NICState, n.state)} for n in st.network.nics],
            "created_at": st.created_at,
            "container_id": "", "vm_state": "", "image": "", "vcpus": None,
            "memory_mib": None, "qemu_pid": None, "uptime_s": None,
        }
        vms = sorted(c.containers(sb.id), key=lambda x: x.created_at)
        if vms:
            vm = vms[-1]  # the newest attempt is the pod's VM now
            status, info = c.container_status(vm.id)
            running = status.state == pb.CONTAINER_RUNNING
            row.update(container_id=vm.id, vm_state=_state(pb.ContainerState, status.state),
                       image=status.image.image, vcpus=info.get("vcpus"),
                       memory_mib=info.get("memoryMiB"), qemu_pid=info.get("qemuPid"),
                       started_at=status.started_at,
                       uptime_s=_uptime(status.started_at, running))
        rows.append(row)
    return rows


def image_rows(c: Client) -> list[dict[str, Any]]:
    users: dict[str, list[str]] = {}
    names = {sb.id: f"{sb.metadata.namespace}/{sb.metadata.name}" for sb in c.sandboxes()}
    for ctr in c.containers():
        users.setdefault(ctr.image_ref, []).append(names.get(ctr.pod_sandbox_id,
                                                             ctr.pod_sandbox_id))
    rows = []
    for im in sorted(c.images(), key=lambda i: (list(i.repo_tags), i.id)):
        rows.append({"id": im.id, "names": list(im.repo_tags), "digests": list(im.repo_digests),
                     "size_bytes": im.size, "users": sorted(users.get(im.id, []))})
    return rows


def resolve(c: Client, pod: str) -> Any:
    """A sandbox by id, id prefix, NAMESPACE/NAME, TENANT/NAMESPACE/NAME or a unique NAME."""
    sbs = c.sandboxes()

    def key(s: Any) -> tuple[str, str, str]:
        return s.metadata.tenant, s.metadata.namespace, s.metadata.name

    found = [s for s in sbs if s.id == pod]
    if not found:
        parts = pod.split("/")
        found = [s for s in sbs if (len(parts) == 1 and s.metadata.name == pod)
                 or (len(parts) == 2 and key(s)[1:] == tuple(parts))
                 or (len(parts) == 3 and key(s) == tuple(parts))]
    if not found and len(pod) >= 6:
        found = [s for s in sbs if s.id.startswith(pod)]
    if not found:
        raise CliError(f"no pod {pod!r} on this node (see `arktos-vm-runtime pods`)")
    if len(found) > 1:
        ready = [s for s in found if s.state == pb.SANDBOX_READY]
        if len(ready) == 1:
            return ready[0]
        raise CliError(f"{pod!r} names {len(found)} pods: " + ", ".join(
            f"{s.metadata.namespace}/{s.metadata.name} ({s.id})" for s in found)
            + "; give the namespace or the id")
    return found[0]


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _age(s: int | None) -> str:
    if s is None:
        return "-"
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    return f"{s // 3600}h{s % 3600 // 60}m" if s < 172800 else f"{s // 86400}d"


def table(headers: Sequence[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
              for r in rows]
    return "\n".join(lines)


def show_pods(rows: list[dict[str, Any]], output: str) -> str:
    if output == "json":
        return json.dumps(rows, indent=2, sort_keys=True)
    return table(
        ["POD", "TENANT", "NAMESPACE", "STATE", "VM", "IPS", "NICS", "IMAGE", "VCPUS", "MEMORY",
         "PID", "UPTIME"],
        [[r["pod"], r["tenant"] or "-", r["namespace"], r["state"].removeprefix("SANDBOX_"),
          r["vm_state"].removeprefix("CONTAINER_") or "-", ",".join(r["ips"]) or "-",
          ",".join(n["name"] for n in r["nics"]) or "-", r["image"] or "-",
          str(r["vcpus"] if r["vcpus"] is not None else "-"),
          _size(r["memory_mib"] << 20) if r["memory_mib"] else "-",
          str(r["qemu_pid"] or "-"), _age(r["uptime_s"])] for r in rows])


def show_images(rows: list[dict[str, Any]], output: str) -> str:
    if output == "json":
        return json.dumps(rows, indent=2, sort_keys=True)
    return table(["IMAGE", "DIGEST", "SIZE", "USERS"],
                 [[",".join(r["names"]) or "-", r["id"][:19], _size(r["size_bytes"]),
                   ",".join(r["users"]) or "-"] for r in rows])
