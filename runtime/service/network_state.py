"""Pod network state: the records, what callers are shown of them, and their persistence.

One record per sandbox (`PodState`) in the store's `networks` table, written *before*
each side effect it records: the CNI configuration and CNI_ARGS used for ADD, each ADD's
result (the prevResult of its DEL), the slots whose taps were made, the NICs. So DEL
always runs with the Arktos arguments and the stored result, after a daemon restart and
after a host reboot alike, and an ADD cut short by a crash is still followed by its DEL.

Records are immutable values. `NetworkRecords` keeps the current one of each sandbox in
memory (status answers from there) and swaps it under a lock that covers only the swap,
never the store write, CNI, ip or libvirt. Changes to one sandbox are serialised by that
sandbox's own lock (`locked`), which its operations hold across their I/O.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..adapters import cni, dhcp, vmnet
from ..adapters.domain_xml import InterfaceSpec
from ..checks import shown
from ..errors import NotFound, RuntimeError_
from .guest_network import NetworkInfo
from .keyed_locks import KeyedLocks
from .nic_spec import NicInfo
from .store import Store

log = logging.getLogger(__name__)

TABLE = "networks"
STATE_VERSION = 1
NETNS_PREFIX = "avr-"
PRIMARY_IFNAME = "eth0"

# NIC states, named as the Arktos NICState enum
NIC_UNKNOWN, NIC_INPROGRESS, NIC_READY, NIC_FAILED = (
    "NIC_UNKNOWN", "NIC_INPROGRESS", "NIC_READY", "NIC_FAILED")

# attachment states
ADDING, READY, DETACHING = "adding", "ready", "detaching"


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


# --- the records ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Attachment:
    """One CNI ADD (CNI_IFNAME) and the VM NICs it gave."""

    ifname: str
    args: tuple[tuple[str, str], ...]
    state: str = ADDING
    hotplug: bool = False
    vpc: str = ""
    nics: tuple[NicInfo, ...] = ()
    #: the ADD's result as the plugin gave it (never changed once recorded)
    result: dict[str, Any] | None = None
    ports: tuple[vmnet.Port, ...] = ()
    #: the domain the NIC was plugged into (recorded before plugging)
    domain: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"ifname": self.ifname, "args": [list(a) for a in self.args],
                "state": self.state, "hotplug": self.hotplug, "vpc": self.vpc,
                "nics": [n.to_contract_dict() for n in self.nics], "result": self.result,
                "ports": [p.to_dict() for p in self.ports], "domain": self.domain}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Attachment:
        return cls(ifname=d["ifname"], args=tuple((str(k), str(v)) for k, v in d["args"]),
                   state=d.get("state", ADDING), hotplug=bool(d.get("hotplug")),
                   vpc=d.get("vpc", ""),
                   nics=tuple(NicInfo.from_contract_dict(n) for n in d.get("nics", [])),
                   result=d.get("result"),
                   ports=tuple(vmnet.Port.from_dict(p) for p in d.get("ports", [])),
                   domain=d.get("domain", ""))


@dataclasses.dataclass(frozen=True)
class PodState:
    sandbox_id: str
    netns: str
    config: cni.NetworkConfig
    tenant: str
    namespace: str
    name: str
    vpc: str
    extra_args: tuple[tuple[str, str], ...]
    server_address: str
    ready: bool = False
    next_slot: int = 0
    attachments: tuple[Attachment, ...] = ()

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
                   extra_args=tuple((str(k), str(v)) for k, v in d.get("extra_args", [])),
                   server_address=d.get("server_address", dhcp.SERVER_ADDRESS),
                   ready=bool(d.get("ready")), next_slot=int(d.get("next_slot", 0)),
                   attachments=tuple(Attachment.from_dict(a)
                                     for a in d.get("attachments", [])))

    def ports(self) -> list[vmnet.Port]:
        return [p for a in self.attachments for p in a.ports]

    def attachment(self, ifname: str) -> Attachment:
        for att in self.attachments:
            if att.ifname == ifname:
                return att
        raise NotFound(f"pod sandbox {self.sandbox_id} has no attachment {shown(ifname)}")

    def with_attachment(self, att: Attachment) -> PodState:
        """This state with `att` in place of the attachment of its ifname, else appended."""
        atts = list(self.attachments)
        for i, old in enumerate(atts):
            if old.ifname == att.ifname:
                atts[i] = att
                break
        else:
            atts.append(att)
        return dataclasses.replace(self, attachments=tuple(atts))

    def without_attachment(self, ifname: str) -> PodState:
        return dataclasses.replace(
            self, attachments=tuple(a for a in self.attachments if a.ifname != ifname))


# --- derived views --------------------------------------------------------------------------


def pod_ips(st: PodState) -> tuple[str, tuple[str, ...]]:
    """(the pod IP, every address with the pod IP first)."""
    addrs = [a.split("/")[0] for p in st.ports() for a in p.addresses]
    primary = [a.split("/")[0] for a in (st.ports()[0].addresses if st.ports() else ())]
    v4 = [a for a in primary if ipaddress.ip_address(a).version == 4]
    ip = (v4 or primary or [""])[0]
    ordered = ([ip] if ip else []) + [a for a in addrs if a != ip]
    return ip, tuple(ordered)


def nic_statuses(st: PodState, macs: list[str] | None) -> list[NicStatus]:
    """Every NIC of the pod; checked against the VM's MACs when `macs` is given."""
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


# --- persistence ----------------------------------------------------------------------------


class NetworkRecords:
    """The current record of each sandbox: in memory, and in the store before that."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._states: dict[str, PodState] = {}
        self._lock = threading.Lock()  # the memory swap only
        self._locks = KeyedLocks()  # per sandbox, only while held or awaited
        for data in store.all(TABLE):
            try:
                st = PodState.from_dict(data)
            except (ValueError, KeyError, TypeError, RuntimeError_) as e:
                log.error("network record %r cannot be read (%s); leaving it for an operator",
                          data.get("sandbox_id"), e)
                continue
            self._states[st.sandbox_id] = st

    @contextmanager
    def locked(self, sandbox_id: str) -> Iterator[None]:
        """Serialises the changes to one sandbox's network (held across their I/O). The lock
        lasts while it is held or awaited: an id without a record keeps nothing."""
        with self._locks.hold(sandbox_id):
            yield

    def get(self, sandbox_id: str) -> PodState | None:
        with self._lock:
            return self._states.get(sandbox_id)

    def current(self, sandbox_id: str) -> PodState:
        st = self.get(sandbox_id)
        if st is None:
            raise NotFound(f"pod sandbox {shown(sandbox_id)} has no network")
        return st

    def ids(self) -> list[str]:
        with self._lock:
            return sorted(self._states)

    def save(self, st: PodState) -> PodState:
        """Writes `st` to the store, then makes it the current record; returns it."""
        self._store.put(TABLE, st.sandbox_id, st.to_dict())
        with self._lock:
            self._states[st.sandbox_id] = st
        return st

    def forget(self, sandbox_id: str) -> None:
        self._store.delete(TABLE, sandbox_id)
        with self._lock:
            self._states.pop(sandbox_id, None)
