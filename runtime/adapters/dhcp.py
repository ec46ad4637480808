"""A DHCP server inside a pod's network namespace: one dnsmasq per pod, static leases only.

The guest's address comes from CNI; dnsmasq only repeats it: each VM NIC gets a
`dhcp-host` (its MAC to its CNI address, infinite lease, so no renewal ever has to reach
the server), with the router, classless routes, DNS and MTU the CNI interface had, and
for the primary NIC an on-link route back to the bridge's address (PortForward connects
from it). The
bridge of each NIC carries one link-local /32 (`SERVER_ADDRESS`), the only address in the
namespace: dnsmasq needs an address to answer from, and `shared-network` lets it hand out
the pod's subnet on a bridge that has no address in it. DNS is off (port=0), nothing is
written (leasefile-ro), and dnsmasq drops to nobody after binding port 67.

The configuration file is rewritten whole and dnsmasq restarted on every change (a NIC
hot-plugged or removed): a restart takes ~30 ms and leases are static, so no guest notices.
dnsmasq is a child of the daemon's cgroup: a daemon restart under systemd ends it, and
`PodNetworks.restore` starts it again.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import select
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import Internal
from . import netns, proc

log = logging.getLogger(__name__)

DNSMASQ = "dnsmasq"
SERVER_ADDRESS = "169.254.253.1"
ALT_SERVER_ADDRESS = "169.254.253.2"
CONF_NAME = "dnsmasq.conf"
PID_NAME = "dnsmasq.pid"
LOG_NAME = "dnsmasq.log"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 3.0


@dataclass(frozen=True)
class DhcpHost:
    """One VM NIC as DHCP describes it."""

    tag: str  # a word naming the NIC in the config (p0, p1, ...)
    bridge: str
    mac: str
    address: str  # IPv4 CIDR
    gateway: str = ""
    routes: tuple[tuple[str, str], ...] = ()  # IPv4 (dst CIDR, via)
    link_routes: tuple[str, ...] = ()  # IPv4 CIDRs on-link (router 0.0.0.0 in option 121)
    dns_servers: tuple[str, ...] = ()
    dns_search: tuple[str, ...] = ()
    mtu: int | None = None


def server_address(taken: Sequence[str]) -> str:
    """The link-local address for the bridges, one the pod itself does not use."""
    used = {a.split("/")[0] for a in taken}
    return SERVER_ADDRESS if SERVER_ADDRESS not in used else ALT_SERVER_ADDRESS


def render_conf(hosts: Sequence[DhcpHost], netdir: Path) -> str:
    lines = [
        "# written by arktos-vm-runtime; rewritten on every change",
        "port=0",
        "no-resolv",
        "no-hosts",
        "leasefile-ro",
        "except-interface=lo",
        f"pid-file={netdir / PID_NAME}",
        f"log-facility={netdir / LOG_NAME}",
        "user=nobody",
        "group=nogroup",
    ]
    for h in hosts:
        iface = ipaddress.ip_interface(h.address)
        net = iface.network
        lines += [
            f"dhcp-range=set:{h.tag},{net.network_address},static,{net.netmask},infinite",
            f"shared-network={h.bridge},{net.network_address}",
            f"dhcp-host={h.mac},set:{h.tag},{iface.ip},infinite",
        ]
        classless = [(d, "0.0.0.0") for d in h.link_routes]
        classless += [(d, v) for d, v in h.routes if v]
        if classless:
            # RFC 3442: a client given option 121 ignores option 3, so the default goes in too
            if h.gateway:
                classless.insert(0, ("0.0.0.0/0", h.gateway))
            flat = ",".join(f"{d},{v}" for d, v in classless)
            lines.append(f"dhcp-option=tag:{h.tag},option:classless-static-route,{flat}")
        if h.gateway:
            lines.append(f"dhcp-option=tag:{h.tag},option:router,{h.gateway}")
        else:
            lines.append(f"dhcp-option=tag:{h.tag},option:router")  # none, not dnsmasq's own
        if h.dns_servers:
            lines.append(f"dhcp-option=tag:{h.tag},option:dns-server,{','.join(h.dns_servers)}")
        else:
            lines.append(f"dhcp-option=tag:{h.tag},option:dns-server")
        if h.dns_search:
            lines.append(f"dhcp-option=tag:{h.tag},option:domain-search,{','.join(h.dns_search)}")
        if h.mtu and h.mtu != 1500:
            lines.append(f"dhcp-option=tag:{h.tag},option:mtu,{h.mtu}")
    return "\n".join(lines) + "\n"


def _pid(netdir: Path) -> int | None:
    """dnsmasq's pid if it runs with this directory's config, else None."""
    try:
        pid = int((netdir / PID_NAME).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    conf = f"--conf-file={netdir / CONF_NAME}".encode()
    if not cmdline or not cmdline[0].endswith(DNSMASQ.encode()) or conf not in cmdline:
        return None  # the pid was reused by someone else
    return pid


def running(netdir: Path) -> bool:
    return _pid(netdir) is not None


def stop(netdir: Path) -> None:
    """Stops this pod's dnsmasq, if it runs, and returns once it has closed its sockets (a
    new one binds port 67 right after); safe to repeat."""
    pid = _pid(netdir)
    if pid is not None:
        # A pidfd names this process, never a later one with its pid; and it is readable
        # only once the process has closed its files. /proc/PID/cmdline is empty already
        # earlier in its exit, while port 67 may still be bound.
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            fd = -1
        if fd >= 0:
            try:
                _end(fd, pid, netdir)
            finally:
                os.close(fd)
    (netdir / PID_NAME).unlink(missing_ok=True)


def _end(fd: int, pid: int, netdir: Path) -> None:
    try:
        exiting = Path(f"/proc/{pid}/cmdline").read_bytes() == b""
    except OSError:
        return  # gone between the two looks
    if not exiting and _pid(netdir) != pid:
        return  # the pid now belongs to another process
    if not exiting:
        signal.pidfd_send_signal(fd, signal.SIGTERM)
    if _exited(fd, STOP_TIMEOUT):
        return
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(fd, signal.SIGKILL)
    if not _exited(fd, STOP_TIMEOUT):
        log.warning("dnsmasq %d did not exit after SIGKILL within %.0f s", pid, STOP_TIMEOUT)


def _exited(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(int(timeout * 1000)))


def start(ns: str, netdir: Path, hosts: Sequence[DhcpHost]) -> None:
    """(Re)starts the pod's dnsmasq with a config for `hosts`; with no hosts, stops it."""
    stop(netdir)
    if not hosts:
        (netdir / CONF_NAME).unlink(missing_ok=True)
        return
    conf = netdir / CONF_NAME
    tmp = conf.with_suffix(".tmp")
    tmp.write_text(render_conf(hosts, netdir))
    tmp.chmod(0o644)
    os.replace(tmp, conf)
    argv = netns.exec_argv(ns, [DNSMASQ, f"--conf-file={conf}"])
    r = proc.run(argv, timeout=START_TIMEOUT, what=f"dnsmasq in {ns}", check=False,
                 capture=False)
    if r.returncode != 0:
        err = r.err
        if "No such file" in err or "not found" in err:
            err += " (install the dnsmasq-base package)"
        raise Internal(f"dnsmasq failed to start in {ns}: {err[-1000:]}")
    log.debug("dnsmasq serves %d NICs in %s", len(hosts), ns)
