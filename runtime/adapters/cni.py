"""CNI: the network configuration, CNI_ARGS, and running plugins as the spec says.

- The configuration is the first `.conflist`, `.conf` or `.json` file by name in the conf
  dir; a single-plugin `.conf` is run as a list of one. Callers keep the configuration used
  for ADD and pass it again to DEL, as the spec requires.
- Plugins are found by their `type` in a list of bin dirs (default /opt/cni/bin, then
  Debian's /usr/lib/cni). Each runs with CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS,
  CNI_IFNAME, CNI_ARGS and CNI_PATH in a clean environment, its network configuration on
  stdin (with the list's name and cniVersion, and prevResult chained for ADD).
- DEL runs the list in reverse, each plugin with the stored ADD result as prevResult.
- A plugin that outlives the timeout is killed with its whole process group (DeadlineExceeded);
  an error result, a failure without one, or output that is not a JSON object is Unavailable,
  naming the plugin, its code and message, and its stderr.

CNI_ARGS are `K=V` pairs joined by ';' with no escaping defined; so a value containing ';'
or '=' (or a control character) is rejected with InvalidArgument, never encoded.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checks import check_ifname, cni_key_problem, cni_value_problem, has_control
from ..errors import DeadlineExceeded, InvalidArgument, Unavailable
from . import proc

log = logging.getLogger(__name__)

CONF_EXTENSIONS = (".conflist", ".conf", ".json")
DEFAULT_BIN_DIRS = ("/opt/cni/bin", "/usr/lib/cni")
DEFAULT_TIMEOUT = 60.0
MAX_OUTPUT = 1 << 20  # a result larger than 1 MiB is garbage
# CNI_ARGS in UTF-8 bytes. One environment string may hold at most MAX_ARG_STRLEN (128 KiB)
# and all of them with argv at most ARG_MAX (a quarter of the stack limit, 2 MiB by
# default), beyond which execve fails with E2BIG ("Argument list too long", issue 9 item
# 2). The worst case of what the API admits (api/limits: names, the NICs, VPC and cni-args
# annotations) is about 43 KiB (tested); this refuses anything larger, before any side
# effect (the arguments are formatted before the namespace is made).
MAX_CNI_ARGS = 64 * 1024
# The whole environment of a plugin (CNI_PATH and the rest are the runtime's own).
MAX_ENVIRONMENT = 96 * 1024
# What a plugin reads on stdin: the network configuration and prevResult (an ADD result,
# at most MAX_OUTPUT, grown by JSON escapes); a pipe has no E2BIG, but no plugin needs more.
MAX_STDIN = 8 << 20
PLUGIN_PATH_ENV = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_PLUGIN_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


# --- CNI_ARGS -----------------------------------------------------------------------------


def pod_cni_args(
    *,
    tenant: str,
    namespace: str,
    name: str,
    sandbox_id: str,
    vpc: str = "",
    nics_json: str = "",
    extra: Sequence[tuple[str, str]] = (),
) -> list[tuple[str, str]]:
    """The pairs of the contract, in its order: IgnoreUnknown, K8S_POD_TENANT,
    K8S_POD_NAMESPACE, K8S_POD_NAME, K8S_POD_INFRA_CONTAINER_ID, VPC, NICs, then `extra`.

    VPC and NICs are left out when empty ("not given", as the kubelet leaves the
    annotations out), so a plugin never sees `NICs=` it cannot decode. An `extra` key that
    repeats one of these is rejected. Every value is checked as `format_cni_args` does.
    """
    pairs = [
        ("IgnoreUnknown", "1"),
        ("K8S_POD_TENANT", tenant),
        ("K8S_POD_NAMESPACE", namespace),
        ("K8S_POD_NAME", name),
        ("K8S_POD_INFRA_CONTAINER_ID", sandbox_id),
    ]
    if vpc:
        pairs.append(("VPC", vpc))
    if nics_json:
        pairs.append(("NICs", nics_json))
    taken = {k for k, _ in pairs} | {"VPC", "NICs"}
    for key, value in extra:
        if key in taken:
            raise InvalidArgument(f"CNI argument {key} is set by the runtime; it cannot be given")
        taken.add(key)
        pairs.append((key, value))
    format_cni_args(pairs)  # validates
    return pairs


def format_cni_args(pairs: Sequence[tuple[str, str]]) -> str:
    """`K1=V1;K2=V2`; InvalidArgument naming the key if a key or value cannot travel."""
    parts = []
    for key, value in pairs:
        problem = cni_key_problem(key)
        if problem is not None:
            raise InvalidArgument(f"CNI argument name {problem}")
        problem = cni_value_problem(value, max_len=None)
        if problem is not None:
            raise InvalidArgument(f"CNI argument {key}: value {problem}, which CNI_ARGS "
                                  "cannot carry")
        parts.append(f"{key}={value}")
    text = ";".join(parts)
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_CNI_ARGS:
        raise InvalidArgument(f"CNI_ARGS would be {size} bytes; at most {MAX_CNI_ARGS} "
                              "can be passed to a CNI plugin")
    return text


# --- the network configuration ------------------------------------------------------------


@dataclass(frozen=True)
class NetworkConfig:
    """One CNI network: a list of plugin configurations under one name and version."""

    name: str
    cni_version: str
    plugins: tuple[dict[str, Any], ...]
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "cniVersion": self.cni_version,
                "plugins": [dict(p) for p in self.plugins], "source": self.source}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NetworkConfig:
        return parse_network_config(dict(data), str(data.get("source", "")), conflist=True)


def parse_network_config(data: Any, source: str, *, conflist: bool) -> NetworkConfig:
    where = source or "CNI network configuration"
    if not isinstance(data, dict):
        raise Unavailable(f"{where}: not a JSON object")
    if conflist:
        plugins = data.get("plugins")
        if not isinstance(plugins, list) or not plugins:
            raise Unavailable(f"{where}: 'plugins' must be a non-empty list")
    else:
        plugins = [data]
    name = data.get("name")
    version = data.get("cniVersion", "0.2.0")
    if not isinstance(name, str) or not name:
        raise Unavailable(f"{where}: no network 'name'")
    if not isinstance(version, str):
        raise Unavailable(f"{where}: 'cniVersion' must be a string")
    out = []
    for i, p in enumerate(plugins):
        if not isinstance(p, dict):
            raise Unavailable(f"{where}: plugin #{i} is not a JSON object")
        kind = p.get("type")
        if not isinstance(kind, str) or not _PLUGIN_TYPE.fullmatch(kind):
            raise Unavailable(f"{where}: plugin #{i} has no valid 'type'")
        out.append(dict(p))
    return NetworkConfig(name=name, cni_version=version, plugins=tuple(out), source=source)


def config_files(conf_dir: str | Path) -> list[Path]:
    try:
        entries = list(Path(conf_dir).iterdir())
    except OSError as e:
        raise Unavailable(f"cannot read CNI config dir {conf_dir}: {e.strerror}") from None
    return sorted((e for e in entries if e.name.endswith(CONF_EXTENSIONS) and e.is_file()),
                  key=lambda e: e.name)


def load_network_config(conf_dir: str | Path) -> NetworkConfig:
    """The first configuration by file name; Unavailable when there is none or it is bad."""
    files = config_files(conf_dir)
    if not files:
        raise Unavailable(f"no CNI network configuration in {conf_dir}")
    first = files[0]
    try:
        data = json.loads(first.read_text())
    except OSError as e:
        raise Unavailable(f"cannot read {first}: {e.strerror}") from None
    except ValueError as e:
        raise Unavailable(f"{first}: not valid JSON: {e}") from None
    return parse_network_config(data, str(first), conflist=first.name.endswith(".conflist"))


# --- running plugins ----------------------------------------------------------------------


@dataclass(frozen=True)
class RuntimeConf:
    """Who the plugins act for: the same on ADD and DEL."""

    container_id: str
    netns: str
    ifname: str
    args: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        check_ifname("CNI interface name", self.ifname)
        if not self.container_id or has_control(self.container_id):
            raise InvalidArgument("CNI container id must be non-empty text")


class CNI:
    def __init__(self, bin_dirs: Sequence[str] = DEFAULT_BIN_DIRS,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.bin_dirs = [d for d in dict.fromkeys(bin_dirs) if d]
        self.timeout = timeout

    def find_plugin(self, kind: str) -> Path:
        if not _PLUGIN_TYPE.fullmatch(kind):
            raise Unavailable(f"CNI plugin type {kind[:60]!r} is not valid")
        for d in self.bin_dirs:
            p = Path(d) / kind
            if p.is_file() and os.access(p, os.X_OK):
                return p
        raise Unavailable(f"CNI plugin {kind!r} not found in {':'.join(self.bin_dirs)}")

    def add(self, config: NetworkConfig, rt: RuntimeConf) -> dict[str, Any]:
        """Runs ADD through the list; returns the last plugin's result."""
        prev: dict[str, Any] | None = None
        for plugin in config.plugins:
            prev = self._exec("ADD", config, plugin, rt, prev, want_result=True)
        assert prev is not None
        return prev

    def delete(self, config: NetworkConfig, rt: RuntimeConf,
               prev_result: Mapping[str, Any] | None) -> None:
        """Runs DEL through the list in reverse, each with the ADD result as prevResult.

        Every plugin is run even if one fails; then the first failure is raised.
        """
        first: Exception | None = None
        prev = dict(prev_result) if prev_result else None
        for plugin in reversed(config.plugins):
            try:
                self._exec("DEL", config, plugin, rt, prev, want_result=False)
            except (Unavailable, DeadlineExceeded) as e:
                first = first or e
        if first is not None:
            raise first

    def _exec(self, command: str, config: NetworkConfig, plugin: Mapping[str, Any],
              rt: RuntimeConf, prev: dict[str, Any] | None,
              *, want_result: bool) -> dict[str, Any] | None:
        kind = str(plugin["type"])
        path = self.find_plugin(kind)
        conf = dict(plugin)
        conf["name"] = config.name
        conf["cniVersion"] = config.cni_version
        if prev is not None:
            conf["prevResult"] = prev
        else:
            conf.pop("prevResult", None)
        env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": rt.container_id,
            "CNI_NETNS": rt.netns,
            "CNI_IFNAME": rt.ifname,
            "CNI_ARGS": format_cni_args(rt.args),
            "CNI_PATH": ":".join(self.bin_dirs),
            "PATH": PLUGIN_PATH_ENV,
        }
        what = f"CNI plugin {kind} {command} ({rt.ifname})"
        stdin = json.dumps(conf).encode()
        env_size = sum(len(k) + len(v.encode("utf-8", "surrogatepass")) + 2
                       for k, v in env.items())
        if env_size > MAX_ENVIRONMENT or len(stdin) > MAX_STDIN:
            raise Unavailable(f"{what}: its environment ({env_size} bytes, at most "
                              f"{MAX_ENVIRONMENT}) or its input ({len(stdin)} bytes, at most "
                              f"{MAX_STDIN}) is too large", plugin=kind)
        # A plugin reports failure as JSON on stdout with a non-zero exit: read it here.
        r = proc.run([str(path)], timeout=self.timeout, what=what, env=env, check=False,
                     input=stdin)
        out, stderr = r.stdout, r.err[-2000:]
        if r.returncode != 0:
            raise Unavailable(_failure(what, r.returncode, out, stderr), plugin=kind,
                              stderr=stderr)
        if not want_result:
            return None
        if len(out) > MAX_OUTPUT:
            raise Unavailable(f"{what} printed more than {MAX_OUTPUT} bytes")
        try:
            result = json.loads(out)
        except ValueError:
            result = None
        if not isinstance(result, dict):
            raise Unavailable(f"{what} printed no JSON result: {_shown(out)}; stderr: "
                              f"{stderr or '(empty)'}", plugin=kind, stderr=stderr)
        if "code" in result and "msg" in result and "ips" not in result:
            raise Unavailable(_failure(what, 0, out, stderr), plugin=kind, stderr=stderr)
        return result


def _shown(out: bytes) -> str:
    text = out.decode("utf-8", "replace").strip()
    return repr(text[:300] + ("..." if len(text) > 300 else "")) if text else "(nothing)"


def _failure(what: str, code: int, out: bytes, stderr: str) -> str:
    try:
        err = json.loads(out)
    except ValueError:
        err = None
    if isinstance(err, dict) and ("msg" in err or "code" in err):
        msg = f"{what} failed: code {err.get('code')}: {err.get('msg', '')}"
        if err.get("details"):
            msg += f" ({err['details']})"
    else:
        msg = f"{what} failed with exit code {code}; output {_shown(out)}"
    if stderr:
        msg += f"; stderr: {stderr}"
    return msg


# --- results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class IPConfig:
    address: str  # CIDR
    gateway: str = ""
    interface: int | None = None  # index into Result.interfaces


@dataclass(frozen=True)
class Result:
    """The parts of an ADD result the runtime uses (any version from 0.1.0 on)."""

    interfaces: tuple[dict[str, Any], ...]
    ips: tuple[IPConfig, ...]
    routes: tuple[tuple[str, str], ...]  # (dst CIDR, gw or "")
    dns_servers: tuple[str, ...]
    dns_search: tuple[str, ...]

    def sandbox_interfaces(self) -> list[str]:
        """Names of the interfaces the result puts inside the pod's namespace, in order."""
        names = []
        for iface in self.interfaces:
            name = iface.get("name")
            if iface.get("sandbox") and isinstance(name, str) and name not in names:
                names.append(name)
        return names

    def ips_of(self, ifname: str, default: bool) -> list[IPConfig]:
        """The IPs of interface `ifname`; `default`: also those naming no interface."""
        out = []
        for ipc in self.ips:
            idx = ipc.interface
            if idx is None or not 0 <= idx < len(self.interfaces):
                if default:
                    out.append(ipc)
            elif self.interfaces[idx].get("name") == ifname:
                out.append(ipc)
        return out


def parse_result(data: Mapping[str, Any]) -> Result:
    """Reads a result of any CNI version; odd entries are skipped, not fatal."""
    ifaces = tuple(i for i in data.get("interfaces") or [] if isinstance(i, dict))
    ips: list[IPConfig] = []
    routes: list[tuple[str, str]] = []
    for entry in data.get("ips") or []:
        if isinstance(entry, dict) and isinstance(entry.get("address"), str):
            idx = entry.get("interface")
            ips.append(IPConfig(entry["address"], str(entry.get("gateway") or ""),
                                idx if isinstance(idx, int) else None))
    for legacy in ("ip4", "ip6"):  # 0.1.0 / 0.2.0
        block = data.get(legacy)
        if isinstance(block, dict) and isinstance(block.get("ip"), str):
            ips.append(IPConfig(block["ip"], str(block.get("gateway") or "")))
            for r in block.get("routes") or []:
                if isinstance(r, dict) and isinstance(r.get("dst"), str):
                    routes.append((r["dst"], str(r.get("gw") or "")))
    for r in data.get("routes") or []:
        if isinstance(r, dict) and isinstance(r.get("dst"), str):
            routes.append((r["dst"], str(r.get("gw") or "")))
    dns = data.get("dns") if isinstance(data.get("dns"), dict) else {}
    assert isinstance(dns, dict)
    servers = tuple(s for s in dns.get("nameservers") or [] if isinstance(s, str))
    search = tuple(s for s in dns.get("search") or [] if isinstance(s, str))
    return Result(ifaces, tuple(ips), tuple(routes), servers, search)
