"""Pod networking: a namespace per sandbox, CNI ADD/DEL, the VM's NICs bridged to CNI's
interfaces, DHCP, and the Arktos NIC hot-plug RPCs.

State lives in one JSON file per sandbox (`<root>/<sandbox id>/network.json`), written
atomically (temp file, fsync, rename, fsync dir) *before* each side effect it records:
the CNI configuration and CNI_ARGS used for ADD, each ADD's result (the prevResult of its
DEL), the slots whose taps were made, the NICs. So DEL always runs with the Arktos
arguments and the stored result, after a daemon restart and after a host reboot alike, and
an ADD cut short by a crash is still followed by its DEL.

One lock per sandbox serialises its changes; status answers from memory.

Where the pod lifecycle calls it:
  daemon start            restore()  (again on libvirt reconnects: it is idempotent)
  RunPodSandbox           setup(sandbox_id, tenant, namespace, name, vm) -> PodNetwork
  CreateContainer         network(sandbox_id): .network_info for render_seed,
                          .interfaces for DomainSpec (every (re)definition of the domain)
  StartContainer          before_vm_start(id); domain start; after_vm_started(id)
                          (and around anything else that starts a new QEMU process)
  PodSandboxStatus        status(sandbox_id): .ip, .ips, .nics
  Stop/RemovePodSandbox   teardown(sandbox_id), after the VM is stopped
  Attach/Detach/ListNetworkInterfaces  attach_nic / detach_nic / list_nics
  stats, PortForward      usage(sandbox_id), connect_guest(sandbox_id, port)
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import libvirt

from ..adapters import cni, dhcp, netns, vmnet
from ..adapters.domain_xml import InterfaceSpec
from ..adapters.fsutil import fsync_dir
from ..errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RuntimeError_,
    Unavailable,
)
from .guest_network import NetInterface, NetworkInfo
from .vmconfig import NicInfo, VMConfig, ifname_problem, nics_to_json

log = logging.getLogger(__name__)

STATE_FILE = "network.json"
NETNS_PREFIX = "avr-"
PRIMARY_IFNAME = "eth0"
STATE_VERSION = 1

# NIC states, named as the Arktos NICState enum
NIC_UNKNOWN, NIC_INPROGRESS, NIC_READY, NIC_FAILED = (
    "NIC_UNKNOWN", "NIC_INPROGRESS", "NIC_READY", "NIC_FAILED")

# attachment states
ADDING, READY, DETACHING = "adding", "ready", "detaching"

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SANDBOX_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


# --- what callers get -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NicStatus:
    """One Arktos NIC: its spec as given, and its state (NICState names)."""

    nic: NicInfo
    vpc: str
    state: str
    reason: str = ""

    @property
    def name(self) -> str:
        return self.nic.name

    @property
    def port_id(self) -> str:
        return self.nic.port_id


@dataclasses.dataclass(frozen=True)
class PodNetwork:
    """What the VM needs from the pod network."""

    sandbox_id: str
    netns_path: str
    #: the pod IP (PodSandboxStatus.network.ip): first IPv4 of the primary NIC, else IPv6
    ip: str
    #: every address of the pod's NICs, primary first (for v1 additional_ips)
    ips: tuple[str, ...]
    #: render_seed(network=...): static addresses by MAC, or DHCP when force_dhcp
    network_info: NetworkInfo
    #: DomainSpec(interfaces=...): primary first, then hot-plugged NICs in attach order
    interfaces: tuple[InterfaceSpec, ...]


@dataclasses.dataclass(frozen=True)
class NetworkStatus:
    ip: str
    ips: tuple[str, ...]
    nics: tuple[NicStatus, ...]
    #: False when the namespace is gone (the host rebooted): the pod needs a new sandbox
    netns_present: bool = True


# --- stored state ---------------------------------------------------------------------------


def _nic_from_dict(d: dict[str, Any]) -> NicInfo:
    return NicInfo(name=d.get("name", ""), subnet_name=d.get("subnetName", ""),
                   port_id=d.get("portId", ""), ip_address=d.get("ipAddress", ""),
                   tag=d.get("tag", ""), ipv6_enabled=bool(d.get("ipv6Enabled", False)))


@dataclasses.dataclass
class Attachment:
    """One CNI ADD (CNI_IFNAME) and the VM NICs it gave."""

    ifname: str
    args: list[tuple[str, str]]
    state: str = ADDING
    hotplug: bool = False
    vpc: str = ""
    nics: list[NicInfo] = dataclasses.field(default_factory=list)
    result: dict[str, Any] | None = None
    ports: list[vmnet.Port] = dataclasses.field(default_factory=list)
    #: the domain the NIC was plugged into (recorded before plugging)
    domain: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"ifname": self.ifname, "args": [list(a) for a in self.args],
                "state": self.state, "hotplug": self.hotplug, "vpc": self.vpc,
                "nics": [n.to_contract_dict() for n in self.nics], "result": self.result,
                "ports": [p.to_dict() for p in self.ports], "domain": self.domain}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Attachment:
        return cls(ifname=d["ifname"], args=[(str(k), str(v)) for k, v in d["args"]],
                   state=d.get("state", ADDING), hotplug=bool(d.get("hotplug")),
                   vpc=d.get("vpc", ""), nics=[_nic_from_dict(n) for n in d.get("nics", [])],
                   result=d.get("result"),
                   ports=[vmnet.Port.from_dict(p) for p in d.get("ports", [])],
                   domain=d.get("domain", ""))


@dataclasses.dataclass
class PodState:
    sandbox_id: str
    netns: str
    config: cni.NetworkConfig
    tenant: str
    namespace: str
    name: str
    vpc: str
    extra_args: list[tuple[str, str]]
    server_address: str
    ready: bool = False
    next_slot: int = 0
    attachments: list[Attachment] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "sandbox_id": self.sandbox_id, "netns": self.netns,
                "config": self.config.to_dict(), "tenant": self.tenant,
                "namespace": self.namespace, "name": self.name, "vpc": self.vpc,
                "extra_args": [list(a) for a in self.extra_args],
                "server_address": self.server_address, "ready": self.ready,
                "next_slot": self.next_slot,
                "attachments": [a.to_dict() for a in self.attachments]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PodState:
        return cls(sandbox_id=d["sandbox_id"], netns=d["netns"],
                   config=cni.NetworkConfig.from_dict(d["config"]), tenant=d["tenant"],
                   namespace=d["namespace"], name=d["name"], vpc=d.get("vpc", ""),
                   extra_args=[(str(k), str(v)) for k, v in d.get("extra_args", [])],
                   server_address=d.get("server_address", dhcp.SERVER_ADDRESS),
                   ready=bool(d.get("ready")), next_slot=int(d.get("next_slot", 0)),
                   attachments=[Attachment.from_dict(a) for a in d.get("attachments", [])])

    def ports(self) -> list[vmnet.Port]:
        return [p for a in self.attachments for p in a.ports]


# --- validation -----------------------------------------------------------------------------


def validate_nic(nic: NicInfo, vpc: str = "") -> None:
    """A NicSpec from AttachNetworkInterface; InvalidArgument naming the bad field."""
    if not nic.name:
        raise InvalidArgument("NicSpec.Name is required")
    problem = ifname_problem(nic.name)
    if problem:
        raise InvalidArgument(f"NicSpec.Name {problem}")
    for field, value in (("SubnetName", nic.subnet_name), ("PortId", nic.port_id),
                         ("IpAddress", nic.ip_address), ("tag", nic.tag), ("VPC", vpc)):
        if len(value) > 253:
            raise InvalidArgument(f"NicSpec.{field} is longer than 253 characters")
        if ";" in value or "=" in value or _CONTROL.search(value):
            raise InvalidArgument(f"NicSpec.{field} {value[:60]!r} contains ';', '=' or "
                                  "control characters, which CNI_ARGS cannot carry")
    if nic.ip_address:
        try:
            ipaddress.ip_address(nic.ip_address)
        except ValueError:
            raise InvalidArgument(
                f"NicSpec.IpAddress {nic.ip_address[:60]!r} is not an IP address") from None


def _check_sandbox_id(sandbox_id: str) -> None:
    if not _SANDBOX_ID.fullmatch(sandbox_id):
        raise InvalidArgument(f"pod sandbox id {sandbox_id[:80]!r} is not valid")


# --- the service ----------------------------------------------------------------------------


class PodNetworks:
    def __init__(
        self,
        root: Path,
        *,
        conf_dir: str,
        bin_dirs: Sequence[str] = cni.DEFAULT_BIN_DIRS,
        libvirt_conn: Callable[[], libvirt.virConnect] | None = None,
        cni_timeout: float = cni.DEFAULT_TIMEOUT,
        detach_timeout: float = vmnet.DETACH_TIMEOUT,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.conf_dir = conf_dir
        self.cni = cni.CNI(bin_dirs, cni_timeout)
        self._conn = libvirt_conn
        self._detach_timeout = detach_timeout
        self._states: dict[str, PodState] = {}
        self._lock = threading.Lock()
        self._locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        for d in sorted(self.root.iterdir()):
            st = self._read(d / STATE_FILE)
            if st is not None:
                self._states[st.sandbox_id] = st

    # -- persistence ------------------------------------------------------------------------

    def _dir(self, sandbox_id: str) -> Path:
        return self.root / sandbox_id

    def _read(self, path: Path) -> PodState | None:
        try:
            return PodState.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, RuntimeError_) as e:
            log.error("network state %s cannot be read (%s); leaving it for an operator", path, e)
            return None

    def _save(self, st: PodState) -> None:
        d = self._dir(st.sandbox_id)
        d.mkdir(mode=0o755, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{STATE_FILE}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(st.to_dict(), f, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, d / STATE_FILE)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_dir(d)
        with self._lock:
            self._states[st.sandbox_id] = st

    def _forget(self, sandbox_id: str) -> None:
        shutil.rmtree(self._dir(sandbox_id), ignore_errors=True)
        with self._lock:
            self._states.pop(sandbox_id, None)

    @contextmanager
    def _locked(self, sandbox_id: str) -> Iterator[None]:
        with self._lock:
            lock = self._locks[sandbox_id]
        with lock:
            yield

    def _state(self, sandbox_id: str) -> PodState:
        with self._lock:
            st = self._states.get(sandbox_id)
        if st is None:
            raise NotFound(f"pod sandbox {sandbox_id} has no network")
        return st

    def sandbox_ids(self) -> list[str]:
        """Sandboxes with network state here (for reconciling with the sandbox store)."""
        with self._lock:
            return sorted(self._states)

    # -- building blocks --------------------------------------------------------------------

    def _rt(self, st: PodState, att: Attachment) -> cni.RuntimeConf:
        return cni.RuntimeConf(container_id=st.sandbox_id, netns=str(netns.path(st.netns)),
                               ifname=att.ifname, args=tuple(att.args))

    def _dhcp_hosts(self, st: PodState) -> list[dhcp.DhcpHost]:
        hosts = []
        gateway_given = False
        dns_servers, dns_search = self._dns(st)
        for port in st.ports():
            v4 = port.ipv4
            if not v4:
                continue
            gw = next((g for g in port.gateways if ipaddress.ip_address(g).version == 4), "")
            if gateway_given:
                gw = ""  # one default route: the first NIC's
            gateway_given = gateway_given or bool(gw)
            routes = tuple((d, v) for d, v in port.routes
                           if ipaddress.ip_network(d, strict=False).version == 4)
            hosts.append(dhcp.DhcpHost(
                tag=f"p{port.slot}", bridge=port.bridge, mac=port.guest_mac, address=v4[0],
                gateway=gw, routes=routes,
                dns_servers=tuple(s for s in dns_servers if ipaddress.ip_address(s).version == 4),
                dns_search=dns_search, mtu=port.mtu))
        return hosts

    def _dns(self, st: PodState) -> tuple[tuple[str, ...], tuple[str, ...]]:
        for att in st.attachments:
            if att.result:
                r = cni.parse_result(att.result)
                servers = []
                for s in r.dns_servers:
                    try:
                        servers.append(str(ipaddress.ip_address(s)))
                    except ValueError:
                        log.warning("CNI result names DNS server %r; not an address", s)
                search = tuple(s for s in r.dns_search if re.fullmatch(r"[A-Za-z0-9_.-]{1,253}", s))
                return tuple(servers), search
        return (), ()

    def _restart_dhcp(self, st: PodState) -> None:
        dhcp.start(st.netns, self._dir(st.sandbox_id), self._dhcp_hosts(st))

    def _wire(self, st: PodState, att: Attachment, wanted: Sequence[str]) -> None:
        """Bridges each CNI interface of the attachment's result for a VM NIC."""
        result = cni.parse_result(att.result or {})
        # "lo": a conflist may run the loopback plugin, which reports it as a sandbox interface
        names = [n for n in result.sandbox_interfaces()
                 if n != "lo" and (n in wanted or not wanted)]
        if not names:
            names = [att.ifname]
        for ifname in names:
            slot = st.next_slot
            st.next_slot += 1
            self._save(st)  # the slot (so its tap name) is recorded before the tap is made
            port = vmnet.wire(st.netns, ifname, st.sandbox_id, slot, st.server_address)
            att.ports.append(port)
            self._save(st)

    def _pod_network(self, st: PodState) -> PodNetwork:
        ifaces: list[NetInterface] = []
        gateway_given = False
        for port in st.ports():
            gateways = port.gateways
            if gateway_given:
                gateways = ()
            gateway_given = gateway_given or bool(gateways)
            ifaces.append(NetInterface(mac=port.guest_mac, name=port.ifname,
                                       addresses=port.addresses, gateways=gateways,
                                       routes=port.routes,
                                       mtu=port.mtu if port.mtu != 1500 else None))
        servers, search = self._dns(st)
        ip, ips = self._ips(st)
        return PodNetwork(sandbox_id=st.sandbox_id, netns_path=str(netns.path(st.netns)),
                          ip=ip, ips=ips,
                          network_info=NetworkInfo(interfaces=tuple(ifaces),
                                                   dns_servers=servers, dns_search=search),
                          interfaces=tuple(p.interface_spec for p in st.ports()))

    @staticmethod
    def _ips(st: PodState) -> tuple[str, tuple[str, ...]]:
        addrs = [a.split("/")[0] for p in st.ports() for a in p.addresses]
        primary = [a.split("/")[0] for a in (st.ports()[0].addresses if st.ports() else ())]
        v4 = [a for a in primary if ipaddress.ip_address(a).version == 4]
        ip = (v4 or primary or [""])[0]
        ordered = ([ip] if ip else []) + [a for a in addrs if a != ip]
        return ip, tuple(ordered)

    def _base_args(self, st: PodState, vpc: str, nics_json: str,
                   extra: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        return cni.pod_cni_args(tenant=st.tenant, namespace=st.namespace, name=st.name,
                                sandbox_id=st.sandbox_id, vpc=vpc, nics_json=nics_json,
                                extra=extra)

    # -- the pod's network --------------------------------------------------------------------

    def setup(self, sandbox_id: str, tenant: str, namespace: str, name: str,
              vm: VMConfig) -> PodNetwork:
        """RunPodSandbox: namespace, CNI ADD (eth0), bridge, tap, DHCP. Idempotent.

        On failure everything made is undone (CNI DEL included) and the error raised:
        Unavailable (plugin failed / garbage / no config), DeadlineExceeded (plugin hung),
        InvalidArgument (a value CNI_ARGS cannot carry).
        """
        _check_sandbox_id(sandbox_id)
        with self._locked(sandbox_id):
            with self._lock:
                old = self._states.get(sandbox_id)
            if old is not None and old.ready:
                return self._pod_network(old)
            if old is not None:
                log.info("redoing the half-made network of %s", sandbox_id,
                         extra={"POD_SANDBOX_ID": sandbox_id})
                self._teardown_locked(old)
            st = PodState(sandbox_id=sandbox_id, netns=NETNS_PREFIX + sandbox_id,
                          config=cni.load_network_config(self.conf_dir), tenant=tenant,
                          namespace=namespace, name=name, vpc=vm.vpc,
                          extra_args=list(vm.cni_args), server_address=dhcp.SERVER_ADDRESS)
            args = self._base_args(st, vm.vpc, nics_to_json(vm.nics) if vm.nics else "",
                                   vm.cni_args)
            att = Attachment(ifname=PRIMARY_IFNAME, args=args, vpc=vm.vpc, nics=list(vm.nics))
            st.attachments.append(att)
            self._save(st)  # before the first side effect: teardown finds whatever follows
            try:
                netns.create(st.netns)
                att.result = self.cni.add(st.config, self._rt(st, att))
                self._save(st)
                st.server_address = dhcp.server_address(
                    [ipc.address for ipc in cni.parse_result(att.result).ips])
                self._wire(st, att, ())
                self._restart_dhcp(st)
                att.state = READY
                st.ready = True
                self._save(st)
            except BaseException:
                try:
                    self._teardown_locked(st)
                except Exception:
                    log.exception("undoing the network of %s failed", sandbox_id,
                                  extra={"POD_SANDBOX_ID": sandbox_id})
                raise
        log.info("network of %s ready: %s", sandbox_id, self._ips(st)[0] or "(no address)",
                 extra={"POD_SANDBOX_ID": sandbox_id})
        return self._pod_network(st)

    def network(self, sandbox_id: str) -> PodNetwork:
        """CreateContainer: the NICs, seed network and pod IP (hot-plugged NICs included)."""
        return self._pod_network(self._state(sandbox_id))

    def teardown(self, sandbox_id: str) -> None:
        """StopPodSandbox / RemovePodSandbox: dnsmasq, taps, CNI DEL, namespace. Idempotent.

        Works from the stored state alone (after a daemon restart or a host reboot). A DEL
        that fails keeps the state and raises (Unavailable/DeadlineExceeded); call again.
        """
        with self._locked(sandbox_id):
            with self._lock:
                st = self._states.get(sandbox_id)
            if st is None:
                if _SANDBOX_ID.fullmatch(sandbox_id):
                    netns.delete(NETNS_PREFIX + sandbox_id)
                return
            self._teardown_locked(st)
        log.info("network of %s removed", sandbox_id, extra={"POD_SANDBOX_ID": sandbox_id})

    def _teardown_locked(self, st: PodState) -> None:
        # Not ready from here on, even if a CNI DEL fails below: restore() must not bring
        # DHCP back for a pod half torn down; the next teardown retries the DEL.
        if st.ready:
            st.ready = False
            self._save(st)
        dhcp.stop(self._dir(st.sandbox_id))
        for slot in range(st.next_slot):
            tap = vmnet.tap_name(st.sandbox_id, slot)
            netns.delete_link(tap)
            netns.delete_link(tap, st.netns)
        first: Exception | None = None
        for att in reversed(list(st.attachments)):
            try:
                self.cni.delete(st.config, self._rt(st, att), att.result)
            except RuntimeError_ as e:
                log.error("CNI DEL of %s/%s failed: %s", st.sandbox_id, att.ifname, e,
                          extra={"POD_SANDBOX_ID": st.sandbox_id})
                first = first or e
                continue
            st.attachments.remove(att)
            self._save(st)
        if first is not None:
            raise first
        netns.delete(st.netns)
        self._forget(st.sandbox_id)

    # -- the VM's lifecycle ---------------------------------------------------------------------

    def before_vm_start(self, sandbox_id: str) -> None:
        """StartContainer, before the domain starts: every NIC's tap unopened in the root
        namespace, where libvirt looks for it (a previous run left it in the pod's)."""
        with self._locked(sandbox_id):
            st = self._state(sandbox_id)
            if not netns.exists(st.netns):
                raise FailedPrecondition(
                    f"the network namespace of pod sandbox {sandbox_id} is gone (was the host "
                    "rebooted?); the pod needs a new sandbox")
            vmnet.ensure_taps(st.netns, st.ports())

    def after_vm_started(self, sandbox_id: str) -> None:
        """StartContainer, once the domain runs: QEMU opened the taps; bridge them."""
        with self._locked(sandbox_id):
            st = self._state(sandbox_id)
            moved = vmnet.move_opened_taps(st.netns, st.ports())
            log.debug("moved taps %s into %s", moved, st.netns,
                      extra={"POD_SANDBOX_ID": sandbox_id})

    def restore(self) -> None:
        """Daemon start: bring each pod network back to its steady state.

        dnsmasq is restarted where it is not running (systemd ends it with the daemon);
        taps QEMU opened while the daemon was down are bridged; a hot-plug cut short by a
        crash is rolled back (its DEL run). A network whose namespace vanished (host
        reboot) is left for teardown, which still runs its DEL.
        """
        for sandbox_id in self.sandbox_ids():
            try:
                with self._locked(sandbox_id):
                    with self._lock:
                        st = self._states.get(sandbox_id)
                    if st is None or not st.ready:
                        continue
                    if not netns.exists(st.netns):
                        log.warning("network namespace %s of %s is gone; teardown will run "
                                    "its CNI DEL", st.netns, sandbox_id,
                                    extra={"POD_SANDBOX_ID": sandbox_id})
                        continue
                    for att in [a for a in st.attachments if a.hotplug and a.state == ADDING]:
                        log.info("rolling back NIC %s of %s: its attach was cut short",
                                 att.ifname, sandbox_id, extra={"POD_SANDBOX_ID": sandbox_id})
                        try:
                            self._remove_attachment(st, att, att.domain or None)
                        except Exception:  # the pod's other NICs still need their taps/DHCP
                            log.exception("rolling back NIC %s of %s failed", att.ifname,
                                          sandbox_id, extra={"POD_SANDBOX_ID": sandbox_id})
                    vmnet.move_opened_taps(st.netns, st.ports())
                    if not dhcp.running(self._dir(sandbox_id)):
                        self._restart_dhcp(st)
            except Exception:
                log.exception("restoring the network of %s failed", sandbox_id,
                              extra={"POD_SANDBOX_ID": sandbox_id})

    # -- NICs -----------------------------------------------------------------------------------

    def attach_nic(self, sandbox_id: str, domain_uuid: str | None, nic: NicInfo,
                   vpc: str = "") -> NicStatus:
        """AttachNetworkInterface: CNI ADD on CNI_IFNAME = nic.name, with CNI_ARGS the pod's
        plus VPC (the NIC's, else the pod's), NICs=[this NIC] and IP=nic.ip_address (when
        given); a bridge and tap; a static DHCP lease; the NIC plugged into the domain
        (definition, and the running VM) when `domain_uuid` is given. All undone on failure.
        """
        validate_nic(nic, vpc)
        with self._locked(sandbox_id):
            st = self._state(sandbox_id)
            if not st.ready:
                raise FailedPrecondition(f"the network of pod sandbox {sandbox_id} is not ready")
            for att in st.attachments:
                if att.ifname == nic.name or any(n.name == nic.name for n in att.nics):
                    raise AlreadyExists(f"NIC {nic.name} is already attached to pod sandbox "
                                        f"{sandbox_id}")
            if not netns.exists(st.netns):
                raise FailedPrecondition(f"the network namespace of {sandbox_id} is gone")
            if netns.link(nic.name, st.netns) is not None:
                raise AlreadyExists(f"pod sandbox {sandbox_id} already has an interface "
                                    f"{nic.name}")
            the_vpc = vpc or st.vpc
            # The pod's cni-args may carry IP= for eth0; a new NIC never inherits it.
            extra = [(k, v) for k, v in st.extra_args if k != "IP"]
            if nic.ip_address:
                extra.append(("IP", nic.ip_address))
            args = self._base_args(st, the_vpc, nics_to_json([nic]), extra)
            att = Attachment(ifname=nic.name, args=args, hotplug=True, vpc=the_vpc, nics=[nic])
            st.attachments.append(att)
            self._save(st)
            plugged = False
            try:
                att.result = self.cni.add(st.config, self._rt(st, att))
                self._save(st)
                self._wire(st, att, (nic.name,))
                self._restart_dhcp(st)
                if domain_uuid is not None:
                    att.domain = domain_uuid
                    self._save(st)
                    for port in att.ports:
                        plugged = vmnet.attach(self._libvirt, domain_uuid,
                                               port.interface_spec) or plugged
                    vmnet.move_opened_taps(st.netns, att.ports)
                att.state = READY
                self._save(st)
            except BaseException:
                try:
                    self._remove_attachment(st, att, att.domain or None)
                except Exception:
                    log.exception("undoing NIC %s of %s failed", nic.name, sandbox_id,
                                  extra={"POD_SANDBOX_ID": sandbox_id})
                raise
        log.info("NIC %s attached to %s%s", nic.name, sandbox_id,
                 " (live)" if plugged else "", extra={"POD_SANDBOX_ID": sandbox_id})
        return NicStatus(nic=nic, vpc=the_vpc, state=NIC_READY)

    def detach_nic(self, sandbox_id: str, domain_uuid: str | None, nic_name: str) -> None:
        """DetachNetworkInterface: unplug from the VM and the definition, tap, bridge, lease,
        CNI DEL. NotFound if no such NIC; the pod's own NICs (from RunPodSandbox) cannot
        be detached (FailedPrecondition)."""
        with self._locked(sandbox_id):
            st = self._state(sandbox_id)
            att = next((a for a in st.attachments
                        if a.hotplug and (a.ifname == nic_name
                                          or any(n.name == nic_name for n in a.nics))), None)
            if att is None:
                if any(n.name == nic_name or a.ifname == nic_name
                       for a in st.attachments for n in [*a.nics, NicInfo(name=a.ifname)]):
                    raise FailedPrecondition(
                        f"NIC {nic_name} came with pod sandbox {sandbox_id}; it cannot be "
                        "detached")
                raise NotFound(f"pod sandbox {sandbox_id} has no NIC {nic_name}")
            att.state = DETACHING
            att.domain = domain_uuid or att.domain
            self._save(st)
            self._remove_attachment(st, att, att.domain or None)
        log.info("NIC %s detached from %s", nic_name, sandbox_id,
                 extra={"POD_SANDBOX_ID": sandbox_id})

    def _remove_attachment(self, st: PodState, att: Attachment, domain_uuid: str | None) -> None:
        """Reverses attach_nic in order; safe to repeat from any point."""
        if domain_uuid is not None:
            for port in att.ports:
                vmnet.detach(self._libvirt, domain_uuid, port.interface_spec,
                             self._detach_timeout)
        wired = {p.slot for p in att.ports}
        for port in att.ports:
            vmnet.unwire(st.netns, port)
        # a slot reserved but not yet recorded in att.ports (wire cut short)
        others = {p.slot for p in st.ports()}
        for slot in range(st.next_slot):
            if slot not in others and slot not in wired:
                vmnet.unwire(st.netns, vmnet.Port(
                    ifname="", slot=slot, bridge=vmnet.bridge_name(slot),
                    tap=vmnet.tap_name(st.sandbox_id, slot), guest_mac="", mtu=1500))
        att.ports = []
        self._save(st)
        self._restart_dhcp(st)
        self.cni.delete(st.config, self._rt(st, att), att.result)
        st.attachments.remove(att)
        self._save(st)

    def list_nics(self, sandbox_id: str, domain_uuid: str | None = None) -> list[NicStatus]:
        """ListNetworkInterfaces: every NIC of the pod, checked against the domain when given
        (live devices if it runs, else its definition): a NIC the VM lacks is NIC_FAILED."""
        st = self._state(sandbox_id)
        macs: list[str] | None = None
        if domain_uuid is not None:
            try:
                live, config = vmnet.domain_macs(self._libvirt, domain_uuid)
                macs = live if live is not None else config
            except NotFound:
                macs = None
        return self._nic_statuses(st, macs)

    def _nic_statuses(self, st: PodState, macs: list[str] | None) -> list[NicStatus]:
        out: list[NicStatus] = []
        for att in st.attachments:
            ports = {p.ifname: p for p in att.ports}
            nics = list(att.nics)
            if not nics:  # no NICs annotation: the CNI interfaces themselves
                nics = [NicInfo(name=p.ifname, ip_address=(p.addresses or ("",))[0]
                                .split("/")[0]) for p in att.ports]
            for i, nic in enumerate(nics):
                port = ports.get(nic.name) or (att.ports[i] if not nic.name
                                               and i < len(att.ports) else None)
                if att.state == ADDING:
                    state, reason = NIC_INPROGRESS, "Attaching"
                elif att.state == DETACHING:
                    state, reason = NIC_INPROGRESS, "Detaching"
                elif port is None:
                    state, reason = NIC_FAILED, "NoCNIInterface"
                elif macs is not None and port.guest_mac not in macs:
                    state, reason = NIC_FAILED, "NotInVM"
                else:
                    state, reason = NIC_READY, ""
                out.append(NicStatus(nic=nic, vpc=att.vpc, state=state, reason=reason))
        return out

    def status(self, sandbox_id: str) -> NetworkStatus:
        """PodSandboxStatus: the pod IP and NIC states, from memory (no libvirt call)."""
        st = self._state(sandbox_id)
        ip, ips = self._ips(st)
        return NetworkStatus(ip=ip, ips=ips, nics=tuple(self._nic_statuses(st, None)),
                             netns_present=netns.exists(st.netns))

    def connect_guest(self, sandbox_id: str, port: int, timeout: float = 10.0) -> socket.socket:
        """PortForward's building block: a TCP connection from inside the pod's namespace
        to `port` of the guest, on its primary NIC (IPv6 link-local, see vmnet).

        Unavailable when the guest does not answer or refuses; FailedPrecondition when the
        pod has no NIC or its namespace is gone.
        """
        if not 0 < port < 65536:
            raise InvalidArgument(f"port {port} is not a TCP port")
        st = self._state(sandbox_id)
        if not st.ports() or not netns.exists(st.netns):
            raise FailedPrecondition(f"pod sandbox {sandbox_id} has no network to reach")
        try:
            return vmnet.connect_guest(st.netns, st.ports()[0], port, timeout)
        except OSError as e:
            raise Unavailable(f"port {port} of the VM of pod sandbox {sandbox_id}: "
                              f"{e.strerror or e}") from e

    def usage(self, sandbox_id: str) -> list[vmnet.InterfaceUsage]:
        """ContainerStats / PodSandboxStats: byte and error counters of the pod's CNI
        interfaces (primary first)."""
        st = self._state(sandbox_id)
        return vmnet.usage(st.netns, [p.ifname for p in st.ports()])

    def _libvirt(self) -> libvirt.virConnect:
        if self._conn is None:
            raise FailedPrecondition("no libvirt connection was given to PodNetworks")
        return self._conn()
