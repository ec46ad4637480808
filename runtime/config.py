"""Daemon settings: defaults, a YAML config file, and command-line flags (flags win).

One dataclass holds every setting so that `serve`, Status' verbose info and the tests all
see the same names. A new setting is one field here plus one flag in cli.py.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from pathlib import Path
from typing import Any

import yaml

from .errors import InvalidArgument

DEFAULT_SOCKET = "/run/virtlet.sock"
# sun_path is 108 bytes on Linux including the terminating NUL.
MAX_SOCKET_PATH = 107
# Loopback, "this host", link-local (with the cloud metadata 169.254.169.254) and the IPv6
# cloud metadata address: the same list as adapters/pull_guard.DEFAULT_DENIED_NETWORKS.
DEFAULT_DENIED_NETWORKS = ("127.0.0.0/8,::1/128,0.0.0.0/8,::/128,169.254.0.0/16,fe80::/10,"
                           "fd00:ec2::254/128")


@dataclasses.dataclass(frozen=True)
class Settings:
    listen: str = DEFAULT_SOCKET
    state_dir: str = "/var/lib/arktos-vm-runtime"
    libvirt_uri: str = "qemu:///system"
    socket_group: str = ""  # empty: root's group, as containerd does by default
    cni_conf_dir: str = "/etc/cni/net.d"
    cni_bin_dir: str = "/opt/cni/bin"
    disable_kvm: bool = False
    image_download_protocol: str = "https"
    image_translations_dir: str = "/etc/arktos-vm-runtime/images"
    allow_local_images: bool = False
    template_dir: str = "/etc/arktos-vm-runtime/templates"
    # Console logs are written only below this directory (the kubelet's podLogsDir).
    pod_logs_dir: str = "/var/log/pods"
    default_memory_mib: int = 1024
    log_level: str = "info"
    # Seconds one libvirt health probe may take before the daemon counts libvirt as
    # wedged and stops feeding the systemd watchdog.
    libvirt_probe_timeout: float = 10.0
    # An image download fails with DEADLINE_EXCEEDED when it is not done within
    # image_pull_deadline seconds, or when the last image_pull_speed_window seconds
    # brought fewer than image_pull_min_speed bytes per second (0: no minimum).
    image_pull_deadline: float = 3600.0
    image_pull_min_speed: int = 10240
    image_pull_speed_window: float = 60.0
    # Quotas (service/quotas.py): pod sandboxes held at once (the kubelet's default
    # maxPods; 0: no limit); per pod, vCPUs (0: the host's CPUs), memory in MiB (0: the
    # host's memory) and the root disk in GiB (0: no limit).
    max_pods: int = 110
    max_pod_vcpus: int = 0
    max_pod_memory_mib: int = 0
    max_pod_root_volume_gib: int = 256
    # Image downloads never connect to these networks, on any redirect hop (CIDRs,
    # comma-separated; an IPv4-mapped IPv6 address counts as its IPv4 address). A narrower
    # list allows one, e.g. loopback for a test server; empty: no network is denied.
    image_pull_denied_networks: str = DEFAULT_DENIED_NETWORKS
    # The largest image a pull may bring (MiB; 0: no cap): a larger Content-Length is
    # refused before reading, a body without one is stopped once past it.
    image_max_size_mib: int = 32768
    # The total size of the stored images (MiB; 0: no cap). After each pull, unused images
    # are evicted, least recently used first, until the store fits.
    image_cache_size_mib: int = 0
    # Live resize headroom (service/resize.py): every VM is defined with this many vCPUs
    # at most (0: the per-pod vCPU quota above) and this much memory at most (0: no
    # memory headroom, the VM's memory at creation is its maximum); each capped by the
    # quotas, never below the VM's own size at creation.
    vm_max_vcpus: int = 0
    vm_max_memory_mib: int = 0
    # The streaming server (Exec, Attach, PortForward): the address and TCP port its URLs
    # point at and it listens on. Loopback by default (the kubelet on this node proxies to
    # it); port 0 picks a free port at every start (the URLs carry it).
    streaming_address: str = "127.0.0.1"
    streaming_port: int = 0
    # Volumes (service/volumes.py): host directories a pod may share into its VM lie below
    # one of these roots (comma-separated absolute paths; never /); the files of its
    # ConfigMap/Secret/projected volumes, carried by the seed, are at most this many KiB
    # in all; block devices plus extra disks per VM are at most max_vm_disks.
    volume_allowed_roots: str = "/var/lib/kubelet/pods"
    volume_files_max_kib: int = 4096
    max_vm_disks: int = 8
    # Prometheus metrics (GET /metrics, daemon/metrics_http.py): off while the port is 0,
    # the default; loopback unless an address is set. At most metrics_max_vms VMs get
    # per-VM series in a scrape (the rest are counted as dropped series).
    metrics_address: str = "127.0.0.1"
    metrics_port: int = 0
    metrics_max_vms: int = 500

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def _coerce(name: str, value: Any) -> Any:
    kind = FIELDS[name].type
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, str):
        return value
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value)  # a YAML list of strings, e.g. networks
    raise InvalidArgument(f"setting {name}: {value!r} is not a {kind}")


def load_file(path: str) -> dict[str, Any]:
    """Reads a YAML config file; keys use the flag names with '-' or '_'."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise InvalidArgument(f"config file {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise InvalidArgument(f"config file {path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise InvalidArgument(f"config file {path}: must be a mapping of settings")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            raise InvalidArgument(f"config file {path}: unknown setting {key!r}")
        out[name] = _coerce(name, value)
    return out


def build(config_file: str | None, overrides: dict[str, Any]) -> Settings:
    """Defaults, then the config file, then the flags that were given."""
    values: dict[str, Any] = {}
    if config_file:
        values.update(load_file(config_file))
    values.update({k: _coerce(k, v) for k, v in overrides.items() if v is not None})
    settings = Settings(**values)
    validate(settings)
    return settings


def validate(s: Settings) -> None:
    if len(os.fsencode(s.listen)) > MAX_SOCKET_PATH:
        raise InvalidArgument(
            f"socket path {s.listen} is {len(os.fsencode(s.listen))} bytes; "
            f"a unix socket path can hold at most {MAX_SOCKET_PATH}"
        )
    if not all(os.path.isabs(p) for p in (s.listen, s.state_dir, s.pod_logs_dir)):
        raise InvalidArgument("--listen, --state-dir and --pod-logs-dir must be absolute paths")
    if s.image_download_protocol not in ("https", "http"):
        raise InvalidArgument(
            f"image-download-protocol {s.image_download_protocol!r}: must be https or http"
        )
    if s.image_pull_deadline <= 0 or s.image_pull_speed_window <= 0:
        raise InvalidArgument("image-pull-deadline and image-pull-speed-window must be positive")
    if s.image_pull_min_speed < 0:
        raise InvalidArgument("image-pull-min-speed must not be negative")
    for name in ("max_pods", "max_pod_vcpus", "max_pod_memory_mib", "max_pod_root_volume_gib",
                 "vm_max_vcpus", "vm_max_memory_mib"):
        if getattr(s, name) < 0:
            raise InvalidArgument(f"{name.replace('_', '-')} must not be negative (0: see --help)")
    if s.image_max_size_mib < 0 or s.image_cache_size_mib < 0:
        raise InvalidArgument("image-max-size-mib and image-cache-size-mib must not be negative")
    for entry in denied_networks(s):
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise InvalidArgument(f"image-pull-denied-networks: {entry[:80]!r} is not an IP "
                                  "network (e.g. 127.0.0.0/8 or fe80::/10)") from None
    try:
        ipaddress.ip_address(s.streaming_address)
    except ValueError:
        raise InvalidArgument(f"streaming-address {s.streaming_address[:80]!r} is not an IP "
                              "address (e.g. 127.0.0.1 or ::1)") from None
    try:
        ipaddress.ip_address(s.metrics_address)
    except ValueError:
        raise InvalidArgument(f"metrics-address {s.metrics_address[:80]!r} is not an IP "
                              "address (e.g. 127.0.0.1 or ::1)") from None
    if not 0 <= s.metrics_port <= 65535:
        raise InvalidArgument(f"metrics-port {s.metrics_port}: 0 (off) to 65535")
    if s.metrics_max_vms < 0:
        raise InvalidArgument("metrics-max-vms must not be negative")
    if not 0 <= s.streaming_port <= 65535:
        raise InvalidArgument(f"streaming-port {s.streaming_port}: 0 (any free port) to 65535")
    for root in volume_allowed_roots(s):
        if not os.path.isabs(root) or os.path.normpath(root) == "/":
            raise InvalidArgument(f"volume-allowed-roots: {root[:80]!r} must be an absolute "
                                  "path other than /")
    if s.volume_files_max_kib < 0 or s.max_vm_disks < 0:
        raise InvalidArgument("volume-files-max-kib and max-vm-disks must not be negative")
    if s.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise InvalidArgument(f"log-level {s.log_level!r}: debug, info, warning or error")


def denied_networks(s: Settings) -> list[str]:
    """The entries of image-pull-denied-networks."""
    return [e.strip() for e in s.image_pull_denied_networks.split(",") if e.strip()]


def volume_allowed_roots(s: Settings) -> list[str]:
    """The entries of volume-allowed-roots."""
    return [e.strip() for e in s.volume_allowed_roots.split(",") if e.strip()]
