"""`diagnose`: one tarball to attach to a bug report, made on the node (as root).

    MANIFEST.txt     every part, and where each came from (which journal source)
    journal.log      `journalctl -u arktos-vm-runtime.service` when the journal has it, else
                     the daemon's log file (--log-file), else a line saying neither was there
    config.json      the running daemon's settings (Status verbose), else the config file
    status.json      Status conditions and verbose info; pods.json: the `pods` view
    state.json       the state store, read-only, secrets removed (service/state_dump.py)
    domains/ID.xml   each VM's live domain XML
    netns/NAME.json  each pod namespace's links and addresses (`ip -j -d addr`)
    cni/SANDBOX.json the stored CNI results of each pod network
    versions.json    runtime, Python, kernel, libvirt (library, daemon, hypervisor), QEMU
Every text part is scrubbed of the secrets found in the store (user-data, SSH keys, env
values) before it is written; the tarball is made mode 0600.
"""

from __future__ import annotations

import io
import json
import os
import platform
import tarfile
import time
from pathlib import Path
from typing import Any

from .. import __version__
from ..adapters import host_facts
from ..service.network_state import NETNS_PREFIX
from ..service.state_dump import Redactor, dump
from .client import Client, CliError
from .views import pod_rows


def _config(status: dict[str, str] | None,
            config_file: str | None) -> tuple[dict[str, Any], str]:
    if status is not None:
        try:
            return json.loads(status.get("config", "{}")), "Status verbose info of the daemon"
        except ValueError:
            pass
    if config_file:
        from ..config import build
        try:
            return build(config_file, {}).as_dict(), f"the config file {config_file}"
        except Exception as e:  # a broken file is itself worth reporting
            return {"error": str(e)}, f"the config file {config_file}"
    from ..config import Settings
    return Settings().as_dict(), "the defaults (no daemon answered, no --config)"


def collect(c: Client | None, config_file: str | None,
            log_file: str | None) -> tuple[dict[str, str | bytes], list[str]]:
    """The bundle's files (name -> content) and the manifest's lines."""
    files: dict[str, str | bytes] = {}
    manifest: list[str] = [f"arktos-vm-runtime {__version__} diagnose, "
                           f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, "
                           f"host {platform.node()}"]
    status: dict[str, str] | None = None
    status_error = "the daemon did not answer"
    if c is not None:
        try:
            status = c.status_info()
        except CliError as e:
            status_error = str(e)
    settings, source = _config(status, config_file)
    files["config.json"] = json.dumps(settings, indent=2, sort_keys=True)
    manifest.append(f"config.json: from {source}")

    red = Redactor()
    state_dir = Path(str(settings.get("state_dir", "/var/lib/arktos-vm-runtime")))
    state = dump(state_dir / "state.db", red)
    files["state.json"] = json.dumps(state, indent=2, sort_keys=True)
    manifest.append(f"state.json: {state_dir / 'state.db'} read-only, secrets redacted")

    if c is not None and status is not None:
        try:
            files["status.json"] = json.dumps(
                {k: v for k, v in status.items() if k != "config"}, indent=2, sort_keys=True)
            files["pods.json"] = json.dumps(pod_rows(c), indent=2, sort_keys=True)
            manifest.append("status.json, pods.json: from the daemon over its socket")
        except CliError as e:
            manifest.append(f"status.json, pods.json: not read: {e}")
    else:
        manifest.append(f"status.json, pods.json: not read: {status_error}")

    got = host_facts.journal()
    if got is not None:
        files["journal.log"] = got[1]
        manifest.append(f"journal.log: from `{got[0]}`")
    elif log_file and (text := host_facts.log_file(log_file)) is not None:
        files["journal.log"] = text
        manifest.append(f"journal.log: from the daemon's log file {log_file} (no journal "
                        "entries for arktos-vm-runtime.service)")
    else:
        files["journal.log"] = "neither the journal nor a log file had the daemon's log\n"
        manifest.append("journal.log: NOT AVAILABLE: no journal entries for "
                        "arktos-vm-runtime.service" + (f" and {log_file} unreadable"
                                                       if log_file else
                                                       "; give --log-file"))

    uri = str(settings.get("libvirt_uri", "qemu:///system"))
    cids = [r["id"] for r in state.get("containers", []) if isinstance(r, dict)]
    for cid, xml in host_facts.domain_xmls(uri, cids).items():
        files[f"domains/{cid}.xml"] = xml
    manifest.append(f"domains/: live domain XML of {len(cids)} VMs from {uri}")

    sids = sorted({str(r["id"]) for r in state.get("sandboxes", []) if isinstance(r, dict)}
                  | {str(r["id"]) for r in state.get("networks", []) if isinstance(r, dict)})
    for sid in sids:
        files[f"netns/{NETNS_PREFIX}{sid}.json"] = json.dumps(
            host_facts.netns_addresses(NETNS_PREFIX + sid), indent=2)
    manifest.append(f"netns/: links and addresses of {len(sids)} pod namespaces")
    for row in state.get("networks", []):
        if isinstance(row, dict):
            files[f"cni/{row['id']}.json"] = json.dumps(row.get("data"), indent=2,
                                                         sort_keys=True)
    manifest.append("cni/: the stored CNI results of each pod network (from the store)")

    versions = {"arktos-vm-runtime": __version__, "python": platform.python_version(),
                "kernel": platform.release(), "libvirt": host_facts.libvirt_versions(uri),
                "qemu": host_facts.program_version(["qemu-system-x86_64", "--version"])}
    files["versions.json"] = json.dumps(versions, indent=2, sort_keys=True)
    manifest.append("versions.json: runtime, Python, kernel, libvirt, QEMU")

    for name, content in files.items():
        if name != "state.json" and isinstance(content, str):
            files[name] = red.scrub(content)
    manifest.append(f"secrets: {len(red.secrets)} values redacted in state.json and "
                    "scrubbed from every other part")
    return files, manifest


def write(path: str, files: dict[str, str | bytes], manifest: list[str]) -> None:
    top = Path(path).name.removesuffix(".tar.gz").removesuffix(".tgz")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w:gz") as tar:
        for name, content in {"MANIFEST.txt": "\n".join(manifest) + "\n", **files}.items():
            data = content.encode() if isinstance(content, str) else content
            ti = tarfile.TarInfo(f"{top}/{name}")
            ti.size, ti.mode, ti.mtime = len(data), 0o600, int(time.time())
            tar.addfile(ti, io.BytesIO(data))


def run(listen: str, output: str | None, config_file: str | None, log_file: str | None,
        timeout: float) -> int:
    path = output or time.strftime("arktos-vm-runtime-diagnose-%Y%m%dT%H%M%SZ.tar.gz",
                                   time.gmtime())
    try:
        c: Client | None = Client(listen, timeout)
    except CliError:
        c = None  # a bundle of a node whose daemon is down is still worth having
    try:
        files, manifest = collect(c, config_file, log_file)
    finally:
        if c is not None:
            c.close()
    try:
        write(path, files, manifest)
    except OSError as e:
        raise CliError(f"{path}: cannot write the bundle: {e.strerror or e}") from None
    print(path)
    return 0
