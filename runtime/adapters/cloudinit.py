"""The cloud-init seed of one pod VM: user-data, meta-data, network-config, and its ISO.

`render_seed` builds Python data and renders it through the Jinja2 templates in
templates/cloud-init/, which only ever emit that data through the `to_yaml` filter
(yaml.safe_dump): no value from a pod spec is spliced into YAML as raw text, so quotes,
newlines, document markers or `!!python/...` tags in a value arrive in the guest as data.
The ConfigDrive JSON files are made with json.dumps.

`write_seed_iso` lays the files out for NoCloud (label `cidata`) or ConfigDrive (label
`config-2`, openstack/latest/) and builds the ISO with genisoimage into a temporary file
beside the destination, fsyncs it and renames it into place; nothing is left on failure.
"""

from __future__ import annotations

import copy
import functools
import ipaddress
import json
import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import jinja2
import yaml

from ..errors import Internal, InvalidArgument
from .domain_xml import default_template_dirs
from .fsutil import fsync_dir

if TYPE_CHECKING:
    from ..service.vmconfig import VMConfig

log = logging.getLogger(__name__)

ENVIRONMENT_FILE = "/etc/cloud/environment"
NOCLOUD_LABEL = "cidata"
CONFIGDRIVE_LABEL = "config-2"
GENISOIMAGE = "genisoimage"
GENISOIMAGE_TIMEOUT = 60.0

SeedKind = Literal["nocloud", "configdrive"]


# --- network description ------------------------------------------------------------------

_MAC = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")


@dataclass(frozen=True)
class NetInterface:
    """One guest NIC, matched by MAC; static addresses unless the pod forces DHCP."""

    mac: str
    #: name the guest gives the NIC (set-name); empty: ethN by position
    name: str = ""
    #: CIDR addresses, "10.1.2.3/24" or "fd00::3/64"
    addresses: tuple[str, ...] = ()
    #: default gateways (IPv4 and/or IPv6)
    gateways: tuple[str, ...] = ()
    #: extra routes as (destination CIDR, via)
    routes: tuple[tuple[str, str], ...] = ()
    mtu: int | None = None

    def __post_init__(self) -> None:
        if not _MAC.fullmatch(self.mac):
            raise InvalidArgument(f"network: MAC {self.mac!r} is not a lower-case MAC address")
        if self.name and not _IFNAME.fullmatch(self.name):
            raise InvalidArgument(f"network: {self.name!r} is not an interface name")
        try:
            for addr in self.addresses:
                if "/" not in addr:
                    raise ValueError(f"{addr!r} has no prefix length")
                ipaddress.ip_interface(addr)
            for gw in self.gateways:
                ipaddress.ip_address(gw)
            for dest, via in self.routes:
                ipaddress.ip_network(dest, strict=False)
                ipaddress.ip_address(via)
        except ValueError as exc:
            raise InvalidArgument(f"network: interface {self.mac}: {exc}") from None
        if self.mtu is not None and not 68 <= self.mtu <= 65535:
            raise InvalidArgument(f"network: MTU {self.mtu} out of range")


@dataclass(frozen=True)
class NetworkInfo:
    """The guest's network, as the runtime learned it from CNI."""

    interfaces: tuple[NetInterface, ...] = ()
    dns_servers: tuple[str, ...] = ()
    dns_search: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        try:
            for server in self.dns_servers:
                ipaddress.ip_address(server)
        except ValueError as exc:
            raise InvalidArgument(f"network: DNS server: {exc}") from None
        for domain in self.dns_search:
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,253}", domain):
                raise InvalidArgument(f"network: {domain!r} is not a search domain")
        macs = [i.mac for i in self.interfaces]
        if len(macs) != len(set(macs)):
            raise InvalidArgument("network: two interfaces share a MAC address")


# --- the seed -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedFiles:
    """The texts of one seed; `write_seed_iso` picks those its kind needs."""

    #: user-data (NoCloud `user-data`, ConfigDrive `openstack/latest/user_data`)
    user_data: str
    #: NoCloud `meta-data` (YAML)
    meta_data: str
    #: NoCloud `network-config` (YAML, version 2), None: let the guest use its default (DHCP)
    network_config: str | None
    #: ConfigDrive `openstack/latest/meta_data.json`
    meta_data_json: str
    #: ConfigDrive `openstack/latest/network_data.json`, None when there is no network info
    network_data_json: str | None


def deep_merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """`overlay` over `base`: mappings merge recursively, lists and scalars are replaced.

    Neither argument is modified; the result shares no mutable value with `overlay`.
    """
    out: dict[str, Any] = dict(base)
    for key, value in overlay.items():
        current = out.get(key)
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            out[key] = deep_merge(current, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _shell_double_quote(value: str) -> str:
    """`value` in double quotes, inert for POSIX sh and systemd EnvironmentFile= alike."""
    escaped = (
        value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`")
    )
    return f'"{escaped}"'


def environment_file(env: Sequence[tuple[str, str]]) -> str:
    """The container environment as KEY="value" lines.

    Names that are not shell identifiers cannot be assigned by `. file` (sh would run them
    as a command), so they are left out with a warning. A NUL cannot be in an environment.
    """
    lines: list[str] = []
    for key, value in env:
        if not _ENV_NAME.fullmatch(key):
            log.warning(
                "environment variable %r is not a shell identifier; left out of %s",
                key,
                ENVIRONMENT_FILE,
            )
            continue
        if "\x00" in value:
            raise InvalidArgument(f"environment variable {key}: value contains a NUL byte")
        lines.append(f"{key}={_shell_double_quote(value)}\n")
    return "".join(lines)


def _to_yaml(data: Any) -> str:
    return yaml.safe_dump(
        data, default_flow_style=False, sort_keys=False, allow_unicode=True, width=1 << 16
    )


@functools.lru_cache(maxsize=16)
def _environment(dirs: tuple[str, ...]) -> jinja2.Environment:
    # Not HTML/XML: autoescaping would corrupt YAML. Safety comes from the templates
    # emitting nothing but `| to_yaml` of data built here.
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(list(dirs)),
        autoescape=False,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["to_yaml"] = _to_yaml
    return env


def _render(template_dirs: Sequence[Path | str], name: str, **context: Any) -> str:
    env = _environment(tuple(str(d) for d in template_dirs))
    return env.get_template(f"cloud-init/{name}.j2").render(**context)


def _user_data(vm: VMConfig, env: Sequence[tuple[str, str]]) -> dict[str, Any]:
    generated: dict[str, Any] = {
        "write_files": [
            {
                "path": ENVIRONMENT_FILE,
                "content": environment_file(env),
                "owner": "root:root",
                "permissions": "0600",
            }
        ]
    }
    if vm.ssh_keys:
        generated["ssh_authorized_keys"] = list(vm.ssh_keys)
    if vm.user_data is None:
        return generated
    if vm.user_data_overwrite:
        return copy.deepcopy(vm.user_data)
    return deep_merge(generated, vm.user_data)


def _iface_name(iface: NetInterface, index: int) -> str:
    return iface.name or f"eth{index}"


def _netplan(network: NetworkInfo, force_dhcp: bool) -> dict[str, Any]:
    ethernets: dict[str, Any] = {}
    for index, iface in enumerate(network.interfaces):
        name = _iface_name(iface, index)
        entry: dict[str, Any] = {"match": {"macaddress": iface.mac}, "set-name": name}
        if iface.mtu is not None:
            entry["mtu"] = iface.mtu
        if force_dhcp:
            entry["dhcp4"] = True
        else:
            entry["addresses"] = list(iface.addresses)
            routes = [
                {"to": "0.0.0.0/0" if ipaddress.ip_address(gw).version == 4 else "::/0", "via": gw}
                for gw in iface.gateways
            ]
            routes += [{"to": dest, "via": via} for dest, via in iface.routes]
            if routes:
                entry["routes"] = routes
            if network.dns_servers or network.dns_search:
                ns: dict[str, Any] = {}
                if network.dns_servers:
                    ns["addresses"] = list(network.dns_servers)
                if network.dns_search:
                    ns["search"] = list(network.dns_search)
                entry["nameservers"] = ns
        ethernets[name] = entry
    return {"version": 2, "ethernets": ethernets}


def _openstack_network(network: NetworkInfo, force_dhcp: bool) -> dict[str, Any]:
    links: list[dict[str, Any]] = []
    networks: list[dict[str, Any]] = []
    for index, iface in enumerate(network.interfaces):
        name = _iface_name(iface, index)
        link: dict[str, Any] = {
            "id": name,
            "name": name,
            "type": "phy",
            "ethernet_mac_address": iface.mac,
        }
        if iface.mtu is not None:
            link["mtu"] = iface.mtu
        links.append(link)
        if force_dhcp:
            networks.append({"id": f"network{len(networks)}", "link": name, "type": "ipv4_dhcp"})
            continue
        for addr in iface.addresses:
            ip = ipaddress.ip_interface(addr)
            version = ip.version
            default = "0.0.0.0" if version == 4 else "::"
            routes = [
                {"network": default, "netmask": default, "gateway": gw}
                for gw in iface.gateways
                if ipaddress.ip_address(gw).version == version
            ]
            for dest, via in iface.routes:
                net = ipaddress.ip_network(dest, strict=False)
                if net.version == version:
                    routes.append(
                        {
                            "network": str(net.network_address),
                            "netmask": str(net.netmask),
                            "gateway": via,
                        }
                    )
            networks.append(
                {
                    "id": f"network{len(networks)}",
                    "link": name,
                    "type": "ipv4" if version == 4 else "ipv6",
                    "ip_address": str(ip.ip),
                    "netmask": str(ip.netmask),
                    "routes": routes,
                }
            )
    services = [{"type": "dns", "address": server} for server in network.dns_servers]
    return {"links": links, "networks": networks, "services": services}


def _json(data: Any) -> str:
    # default=str: YAML annotations may hold dates, which JSON has no type for.
    return json.dumps(data, indent=2, sort_keys=True, default=str, ensure_ascii=True) + "\n"


def render_seed(
    vm: VMConfig,
    *,
    instance_id: str,
    hostname: str,
    env: Sequence[tuple[str, str]],
    network: NetworkInfo | None,
    template_dirs: Sequence[Path | str] | None = None,
) -> SeedFiles:
    """All files of the pod's seed.

    user-data: `#cloud-config` writing the container env to /etc/cloud/environment plus the
    SSH keys, deep-merged with the pod's user-data (replaced by it when user_data_overwrite),
    or the pod's user-data script verbatim. meta-data: instance-id, local-hostname and
    public-keys merged with the pod's meta-data. network-config: static from `network`, or
    DHCP on the matched MACs when force_dhcp; none without `network`.
    """
    dirs = default_template_dirs() if template_dirs is None else template_dirs

    if vm.user_data_script is not None:
        user_data = vm.user_data_script
    else:
        user_data = _render(dirs, "user-data", user_data=_user_data(vm, env))

    meta: dict[str, Any] = {"instance-id": instance_id, "local-hostname": hostname}
    if vm.ssh_keys:
        meta["public-keys"] = list(vm.ssh_keys)
    if vm.meta_data:
        meta = deep_merge(meta, vm.meta_data)
    meta_data = _render(dirs, "meta-data", meta_data=meta)

    os_meta: dict[str, Any] = {"uuid": instance_id, "hostname": hostname, "name": hostname}
    if vm.ssh_keys:
        os_meta["public_keys"] = {f"key-{i}": key for i, key in enumerate(vm.ssh_keys)}
    if vm.meta_data:
        os_meta = deep_merge(os_meta, vm.meta_data)

    network_config: str | None = None
    network_data_json: str | None = None
    if network is not None and network.interfaces:
        network_config = _render(
            dirs, "network-config", network_config=_netplan(network, vm.force_dhcp)
        )
        network_data_json = _json(_openstack_network(network, vm.force_dhcp))

    return SeedFiles(
        user_data=user_data,
        meta_data=meta_data,
        network_config=network_config,
        meta_data_json=_json(os_meta),
        network_data_json=network_data_json,
    )


# --- the ISO ------------------------------------------------------------------------------


def _layout(files: SeedFiles, kind: SeedKind) -> tuple[str, dict[str, str]]:
    if kind == "nocloud":
        layout = {"user-data": files.user_data, "meta-data": files.meta_data}
        if files.network_config is not None:
            layout["network-config"] = files.network_config
        return NOCLOUD_LABEL, layout
    if kind == "configdrive":
        base = "openstack/latest"
        layout = {
            f"{base}/meta_data.json": files.meta_data_json,
            f"{base}/user_data": files.user_data,
        }
        if files.network_data_json is not None:
            layout[f"{base}/network_data.json"] = files.network_data_json
        return CONFIGDRIVE_LABEL, layout
    raise InvalidArgument(f"cloud-init image type {kind!r}: nocloud or configdrive")


def write_seed_iso(files: SeedFiles, kind: SeedKind, dest: Path) -> None:
    """Build the seed ISO of `kind` at `dest`, atomically (temp file, fsync, rename).

    The ISO is mode 0600 (user-data may hold secrets); libvirt's DAC driver hands it to
    QEMU. Raises Internal when genisoimage is missing or fails; leaves nothing behind then.
    """
    label, layout = _layout(files, kind)
    dest = Path(dest)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.d.") as staging:
            root = Path(staging)
            for rel, text in layout.items():
                path = root / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(text.encode("utf-8"))
            argv = [
                GENISOIMAGE,
                "-output", str(tmp),
                "-volid", label,
                "-joliet",
                "-rock",
                "-input-charset", "utf-8",
                "-quiet",
                str(root),
            ]  # fmt: skip
            try:
                result = subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=GENISOIMAGE_TIMEOUT,
                    check=False,
                )
            except FileNotFoundError:
                raise Internal(
                    f"{GENISOIMAGE} not found; install the genisoimage package"
                ) from None
            except subprocess.TimeoutExpired:
                raise Internal(f"{GENISOIMAGE} took longer than {GENISOIMAGE_TIMEOUT}s") from None
            if result.returncode != 0:
                stderr = result.stderr.decode("utf-8", "replace").strip()
                raise Internal(
                    f"{GENISOIMAGE} failed with exit code {result.returncode}: {stderr[-2000:]}",
                    dest=str(dest),
                )
        with open(tmp, "rb+") as f:
            os.fchmod(f.fileno(), 0o600)
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
