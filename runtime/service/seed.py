"""What a pod's cloud-init seed says: user-data, meta-data and the guest's network.

The policy of the seed, apart from its shape and its medium: the templates in
templates/cloud-init/ hold the shape of each file (adapters/seed_templates.py renders and
parses them) and adapters/seed_iso.py writes the ISO. Here:
  user-data     the container environment written to /etc/cloud/environment and the
                pod's SSH keys, with the pod's user-data deep-merged over them (replacing
                them when user_data_overwrite), or the pod's user-data script verbatim;
  meta-data     instance-id, local-hostname, public-keys, with the pod's meta-data merged
                (NoCloud YAML, and ConfigDrive's meta_data.json);
  network       the CNI addresses, routes and DNS by MAC, or DHCP on the same NICs when
                the pod forces it (NoCloud netplan v2, ConfigDrive network_data.json); no
                network files without CNI interfaces (the guest's default, DHCP).
No I/O here but the templates' rendering. Values from the pod reach the files as data:
the templates quote every value, what they render is parsed, and the pod's mappings are
merged as parsed YAML, then written back by yaml.safe_dump / json.dumps.
"""

from __future__ import annotations

import copy
import ipaddress
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..adapters import seed_templates
from ..adapters.seed_iso import SeedFiles
from ..adapters.templates import default_template_dirs
from ..errors import Internal, InvalidArgument
from .guest_network import NetInterface, NetworkInfo
from .vmconfig import ANN_USER_DATA_SCRIPT, VMConfig
from .volumes import VolumePlan

log = logging.getLogger(__name__)

ENVIRONMENT_FILE = "/etc/cloud/environment"
CLOUD_CONFIG = "#cloud-config\n"


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


# --- the environment file -----------------------------------------------------------------

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


# --- the network, as the templates take it ------------------------------------------------


def _iface_name(iface: NetInterface, index: int) -> str:
    return iface.name or f"eth{index}"


def _default_route(gateway: str) -> str:
    return "0.0.0.0/0" if ipaddress.ip_address(gateway).version == 4 else "::/0"


def _on_link(dest: str) -> str:
    return "0.0.0.0" if ipaddress.ip_network(dest, strict=False).version == 4 else "::"


def netplan_context(network: NetworkInfo, force_dhcp: bool) -> dict[str, Any]:
    """The context of network-config.j2: each NIC with its routes, default routes first."""
    interfaces = [
        {
            "name": _iface_name(iface, index),
            "mac": iface.mac,
            "mtu": iface.mtu,
            "addresses": list(iface.addresses),
            "routes": [{"to": _default_route(gw), "via": gw} for gw in iface.gateways]
            + [{"to": dest, "via": via} for dest, via in iface.routes]
            # on-link as "via 0.0.0.0": cloud-init's ENI renderer fails on a route
            # without a gateway; networkd and net-tools take 0.0.0.0 as on-link
            + [{"to": dest, "via": _on_link(dest)} for dest in iface.link_routes],
        }
        for index, iface in enumerate(network.interfaces)
    ]
    return {
        "interfaces": interfaces,
        "force_dhcp": force_dhcp,
        "dns_servers": list(network.dns_servers),
        "dns_search": list(network.dns_search),
    }


def _openstack_routes(iface: NetInterface, version: int) -> list[dict[str, str]]:
    """The NIC's routes of one IP version in OpenStack's network/netmask form."""
    default = "0.0.0.0" if version == 4 else "::"
    routes = [
        {"network": default, "netmask": default, "gateway": gw}
        for gw in iface.gateways
        if ipaddress.ip_address(gw).version == version
    ]
    for dest, via in [*iface.routes, *((d, _on_link(d)) for d in iface.link_routes)]:
        net = ipaddress.ip_network(dest, strict=False)
        if net.version == version:
            routes.append(
                {"network": str(net.network_address), "netmask": str(net.netmask), "gateway": via}
            )
    return routes


def openstack_network_context(network: NetworkInfo, force_dhcp: bool) -> dict[str, Any]:
    """The context of network_data.json.j2: the NICs, and one network per address (one
    DHCP network per NIC when force_dhcp)."""
    interfaces: list[dict[str, Any]] = []
    networks: list[dict[str, Any]] = []
    for index, iface in enumerate(network.interfaces):
        name = _iface_name(iface, index)
        interfaces.append({"name": name, "mac": iface.mac, "mtu": iface.mtu})
        if force_dhcp:
            networks.append({"link": name, "dhcp": True})
            continue
        for addr in iface.addresses:
            ip = ipaddress.ip_interface(addr)
            networks.append(
                {
                    "link": name,
                    "dhcp": False,
                    "version": ip.version,
                    "ip_address": str(ip.ip),
                    "netmask": str(ip.netmask),
                    "routes": _openstack_routes(iface, ip.version),
                }
            )
    return {
        "interfaces": interfaces,
        "networks": networks,
        "dns_servers": list(network.dns_servers),
    }


# --- the seed -----------------------------------------------------------------------------


def merge_pod_data(
    generated: dict[str, Any], pod: Mapping[str, Any] | None, *, overwrite: bool = False
) -> dict[str, Any]:
    """The pod's mapping over the generated one (`deep_merge`), or instead of it."""
    if pod is None:
        return generated
    if overwrite:
        return copy.deepcopy(dict(pod))
    return deep_merge(generated, pod)


def add_volumes(user_data: dict[str, Any], volumes: VolumePlan,
                template_dirs: Sequence[Path | str]) -> dict[str, Any]:
    """`user_data` with the lists the template volumes.j2 renders for the pod's volumes
    appended to its own (a list the pod set is kept, ours follow it)."""
    extra = seed_templates.render_yaml(
        template_dirs, "volumes", files=[f.context for f in volumes.files],
        boot_script=volumes.boot_script)
    out = dict(user_data)
    for key, value in extra.items():
        if not value:
            continue
        if not isinstance(value, list):
            raise Internal(f"template cloud-init/volumes.j2: {key} must be a list")
        current = out.get(key)
        out[key] = [*(current if isinstance(current, list) else []), *value]
    return out


def render_seed(
    vm: VMConfig,
    *,
    instance_id: str,
    hostname: str,
    env: Sequence[tuple[str, str]],
    network: NetworkInfo | None,
    template_dirs: Sequence[Path | str] | None = None,
    volumes: VolumePlan | None = None,
) -> SeedFiles:
    """All files of the pod's seed, for either kind (write_seed_iso picks its own)."""
    dirs = default_template_dirs() if template_dirs is None else template_dirs
    keys = list(vm.ssh_keys)
    carried = volumes is not None and bool(volumes.files or volumes.boot_lines)

    if vm.user_data_script is not None:
        user_data = vm.user_data_script
        if carried:
            log.warning("the pod's user-data is a script (%s): its volumes' files and "
                        "mounts are not carried into the guest", ANN_USER_DATA_SCRIPT)
    else:
        generated = seed_templates.render_yaml(
            dirs, "user-data", environment_path=ENVIRONMENT_FILE,
            environment=environment_file(env), ssh_keys=keys)
        merged = merge_pod_data(generated, vm.user_data, overwrite=vm.user_data_overwrite)
        if carried:
            assert volumes is not None
            merged = add_volumes(merged, volumes, dirs)
        user_data = CLOUD_CONFIG + seed_templates.to_yaml(merged)

    meta = dict(instance_id=instance_id, hostname=hostname, ssh_keys=keys)
    meta_data = merge_pod_data(seed_templates.render_yaml(dirs, "meta-data", **meta),
                               vm.meta_data or None)
    meta_data_json = merge_pod_data(seed_templates.render_json(dirs, "meta_data.json", **meta),
                                    vm.meta_data or None)

    network_config: str | None = None
    network_data_json: str | None = None
    if network is not None and network.interfaces:
        netplan = seed_templates.render_yaml(
            dirs, "network-config", **netplan_context(network, vm.force_dhcp))
        network_config = seed_templates.to_yaml(netplan)
        openstack = seed_templates.render_json(
            dirs, "network_data.json", **openstack_network_context(network, vm.force_dhcp))
        network_data_json = seed_templates.json_text(openstack)

    return SeedFiles(
        user_data=user_data,
        meta_data=seed_templates.to_yaml(meta_data),
        network_config=network_config,
        meta_data_json=seed_templates.json_text(meta_data_json),
        network_data_json=network_data_json,
    )
