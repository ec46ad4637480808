"""Pod networks with the real bridge + host-local CNI plugins, in throwaway namespaces:
setup and teardown leave nothing, DHCP hands out the CNI address, CNI_ARGS arrive intact on
ADD and DEL (after a daemon restart too), NICs are attached and detached, and failing,
hanging or babbling plugins leave nothing behind. No VM here: test_network_vm.py boots one.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from arktos_vm_runtime.adapters import dhcp, netns, vmnet
from arktos_vm_runtime.adapters.templates import default_template_dirs
from arktos_vm_runtime.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from arktos_vm_runtime.service.network_state import NIC_READY
from arktos_vm_runtime.service.nic_spec import NicInfo
from arktos_vm_runtime.service.pod_network import PodNetworks
from arktos_vm_runtime.service.store import Store
from arktos_vm_runtime.service.vmconfig import parse_vm_config
from tests.integration.test_network_common import (
    CNI_BIN,
    PLUGINS,
    CniTestNet,
    cni_test_network,
    ipj,
    link_names,
    netns_names,
    sh,
)

pytestmark = pytest.mark.integration

ANNOTATIONS = {
    "VPC": "vpc-blue",
    "NICs": '[{"name":"eth0","subnetName":"subnet-a","portId":"port-0001","tag":"t0"}]',
    "arktos.futurewei.com/cni-args": "K8S_POD_EXTRA=1;color=blue",
}


@pytest.fixture
def net() -> Iterator[CniTestNet]:
    with cni_test_network() as n:
        yield n


def networks(net: CniTestNet, **kw: object) -> PodNetworks:
    """A PodNetworks as the daemon makes it; a second call is the daemon restarted."""
    return PodNetworks(net.root / "state" / "networks", Store(net.root / "state.db"),
                       conf_dir=str(net.conf_dir), bin_dirs=[CNI_BIN, str(PLUGINS)],
                       template_dirs=default_template_dirs(None), **kw)  # type: ignore[arg-type]


def stored(net: CniTestNet, sid: str) -> dict[str, Any] | None:
    """The sandbox's network record in the state store, as a restarted daemon reads it."""
    store = Store(net.root / "state.db")
    try:
        return store.get("networks", sid)
    finally:
        store.close()


def sandbox_id() -> str:
    return f"sb-{os.urandom(4).hex()}"


def assert_nothing_left(net: CniTestNet, sid: str, pn: PodNetworks) -> None:
    assert f"avr-{sid}" not in netns_names()
    tap_prefix = vmnet.tap_name(sid, 0)[:-1]
    assert not [name for name in link_names() if name.startswith(tap_prefix)]
    # the bridge keeps only the probe's port: the pod's veth is gone. The kernel destroys a
    # deleted namespace's veth pairs asynchronously, so give it a few seconds.
    def ports() -> set[str]:
        return {link["ifname"] for link in ipj("link", "show", "master", net.bridge)}
    deadline = time.monotonic() + 10
    while ports() != {f"avrpv{net.tag}"} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ports() == {f"avrpv{net.tag}"}
    assert net.ip_files() == []
    assert not (pn.root / sid).exists()
    assert sid not in pn.sandbox_ids()
    assert stored(net, sid) is None
    assert not [p for p in Path("/proc").glob("[0-9]*")
                if _is_our_dnsmasq(p, pn.root / sid)]


def _is_our_dnsmasq(proc: Path, netdir: Path) -> bool:
    try:
        return f"--conf-file={netdir}/".encode() in (proc / "cmdline").read_bytes()
    except OSError:
        return False


def test_setup_makes_netns_bridge_tap_and_dhcp_then_teardown_leaves_nothing(
        net: CniTestNet) -> None:
    pn = networks(net)
    sid = sandbox_id()
    vm = parse_vm_config(ANNOTATIONS)
    started = time.monotonic()
    pod = pn.setup(sid, "tenant-a", "default", "vm-pod", vm)
    setup_s = time.monotonic() - started
    ns = f"avr-{sid}"
    try:
        assert ns in netns_names()
        assert pod.netns_path == f"/run/netns/{ns}"
        assert pod.ip.startswith(net.prefix) and pod.ips == (pod.ip,)
        assert net.ip_files() == [pod.ip]
        add = net.calls()[0]
        result_mac = add["stdin"]["prevResult"]["interfaces"][2]["mac"]
        # the guest gets the CNI interface's MAC and address; eth0 a new MAC and no address
        (iface,) = pod.network_info.interfaces
        assert iface.mac == result_mac and iface.name == "eth0"
        assert iface.addresses == (f"{pod.ip}/24",)
        assert iface.gateways == (f"{net.prefix}1",)
        (spec,) = pod.interfaces
        assert spec.mac == result_mac and spec.target_dev == vmnet.tap_name(sid, 0)
        eth0 = ipj("-d", "addr", "show", "dev", "eth0", netns=ns)[0]
        assert eth0["address"] != result_mac
        assert eth0["master"] == "avbr0"
        assert [a for a in eth0["addr_info"] if a["family"] == "inet"] == []
        br = ipj("addr", "show", "dev", "avbr0", netns=ns)[0]
        assert [(a["local"], a["prefixlen"]) for a in br["addr_info"]] == \
            [(dhcp.SERVER_ADDRESS, 32)]
        # no route to the pod network in the namespace (it is not a host on it), only the
        # guest's own address on the link, from the bridge's: PortForward's way in
        assert [(r["dst"], r["dev"], r["scope"], r.get("prefsrc"))
                for r in ipj("-4", "route", "show", netns=ns)] == \
            [(pod.ip, "avbr0", "link", dhcp.SERVER_ADDRESS)]
        tap = ipj("-d", "link", "show", "dev", spec.target_dev)[0]
        assert tap["linkinfo"]["info_kind"] == "tun"
        assert "NO-CARRIER" in tap["flags"]  # nobody opened it yet
        assert dhcp.running(pn.root / sid)
        record = stored(net, sid)
        assert record is not None and record["ready"] and record["next_slot"] == 1
        (att,) = record["attachments"]
        assert att["ifname"] == "eth0" and att["state"] == "ready"
        assert att["result"] == add["stdin"]["prevResult"]
        assert att["ports"][0]["tap"] == spec.target_dev
        assert not list(pn.root.glob("*/network.json"))  # one state store: no files
        st = pn.status(sid)
        assert st.ip == pod.ip and st.netns_present
        (nic,) = st.nics
        assert (nic.name, nic.port_id, nic.state, nic.vpc) == \
            ("eth0", "port-0001", NIC_READY, "vpc-blue")
        # repeated setup (a retried RunPodSandbox) returns the same network
        assert pn.setup(sid, "tenant-a", "default", "vm-pod", vm) == pod
        assert len([c for c in net.calls() if c["CNI_COMMAND"] == "ADD"]) == 1
    finally:
        started = time.monotonic()
        pn.teardown(sid)
        teardown_s = time.monotonic() - started
    print(f"\nsetup {setup_s * 1000:.0f} ms, teardown {teardown_s * 1000:.0f} ms")
    assert_nothing_left(net, sid, pn)
    pn.teardown(sid)  # again: success
    calls = net.calls()
    assert [c["CNI_COMMAND"] for c in calls] == ["ADD", "DEL"]
    assert calls[1]["CNI_ARGS"] == calls[0]["CNI_ARGS"]
    assert calls[1]["stdin"]["prevResult"] == calls[0]["stdin"]["prevResult"]


def test_another_runtimes_namespace_is_never_touched(net: CniTestNet) -> None:
    """Two runtimes on one host (two state directories) given one sandbox id: the second
    refuses (ALREADY_EXISTS) without a CNI call, and neither its failed setup nor its
    teardown touches the first one's namespace, links, tap or dnsmasq."""
    first = networks(net)
    second = PodNetworks(net.root / "state2" / "networks", Store(net.root / "state2.db"),
                         conf_dir=str(net.conf_dir), bin_dirs=[CNI_BIN, str(PLUGINS)],
                         template_dirs=default_template_dirs(None))
    sid = sandbox_id()
    ns = f"avr-{sid}"
    pod = first.setup(sid, "tenant-a", "default", "vm-pod", parse_vm_config(ANNOTATIONS))
    try:
        links, tap = link_names(ns), pod.interfaces[0].target_dev
        dnsmasq = int((first.root / sid / dhcp.PID_NAME).read_text())
        with pytest.raises(AlreadyExists, match=f"network namespace {ns} already exists"):
            second.setup(sid, "tenant-b", "default", "squatter", parse_vm_config({}))
        second.teardown(sid)
        assert second.sandbox_ids() == []
        assert [c["CNI_COMMAND"] for c in net.calls()] == ["ADD"]
        assert ns in netns_names() and link_names(ns) == links and "eth0" in links
        assert tap in link_names()
        assert dhcp.running(first.root / sid)
        assert int((first.root / sid / dhcp.PID_NAME).read_text()) == dnsmasq
        assert first.status(sid).ip == pod.ip
    finally:
        first.teardown(sid)
    assert_nothing_left(net, sid, first)


def test_cni_args_arrive_intact_on_add_and_on_del_after_a_restart(net: CniTestNet) -> None:
    pn = networks(net)
    sid = sandbox_id()
    pn.setup(sid, "tenant-a", "ns-1", "vm-pod", parse_vm_config(ANNOTATIONS))
    add = net.calls()[0]
    pairs = [kv.split("=", 1) for kv in add["CNI_ARGS"].split(";")]
    assert pairs == [
        ["IgnoreUnknown", "1"], ["K8S_POD_TENANT", "tenant-a"], ["K8S_POD_NAMESPACE", "ns-1"],
        ["K8S_POD_NAME", "vm-pod"], ["K8S_POD_INFRA_CONTAINER_ID", sid], ["VPC", "vpc-blue"],
        ["NICs", '[{"name":"eth0","subnetName":"subnet-a","portId":"port-0001","tag":"t0"}]'],
        ["K8S_POD_EXTRA", "1"], ["color", "blue"]]
    assert add["CNI_CONTAINERID"] == sid and add["CNI_IFNAME"] == "eth0"
    assert add["CNI_NETNS"] == f"/run/netns/avr-{sid}"
    # the daemon dies (systemd ends dnsmasq with it) and a new one starts from the state
    netdir = pn.root / sid
    pid = int((netdir / dhcp.PID_NAME).read_text())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while dhcp.running(netdir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not dhcp.running(netdir), "dnsmasq outlived SIGTERM: restore() would prove nothing"
    # the conf dir changes meanwhile: DEL must still use the configuration of the ADD
    (net.conf_dir / "10-avrtest.conflist").unlink()
    pn2 = networks(net)
    assert pn2.sandbox_ids() == [sid]
    pn2.restore()
    assert dhcp.running(netdir)
    assert pn2.status(sid).ip == pn.status(sid).ip
    pn2.teardown(sid)
    dels = [c for c in net.calls() if c["CNI_COMMAND"] == "DEL"]
    assert len(dels) == 1
    assert dels[0]["CNI_ARGS"] == add["CNI_ARGS"]
    assert dels[0]["stdin"]["prevResult"] == add["stdin"]["prevResult"]
    assert dels[0]["stdin"]["name"] == add["stdin"]["name"]
    assert_nothing_left(net, sid, pn2)


def _fake_guest(net: CniTestNet, ns: str, mac: str, bridge: str, tag: str) -> str:
    """A namespace standing in for the guest: a veth whose peer joins `bridge` in the pod
    namespace where the tap would. Returns the fake guest's namespace."""
    guest = f"avrfg-{tag}"
    sh("ip", "netns", "add", guest)
    sh("ip", "link", "add", "fg0", "netns", guest, "address", mac, "type", "veth",
       "peer", "name", f"fgp{tag}", "netns", ns)
    sh("ip", "-n", ns, "link", "set", f"fgp{tag}", "master", bridge, "up")
    sh("ip", "-n", guest, "link", "set", "fg0", "up")
    sh("ip", "-n", guest, "link", "set", "lo", "up")
    return guest


UDHCPC_SCRIPT = """#!/bin/sh
case "$1" in
bound|renew)
    busybox ip addr add "$ip/$mask" dev "$interface"
    [ -n "$router" ] && busybox ip route add default via "$router"
    echo "ip=$ip mask=$mask router=$router mtu=$mtu" >"$(dirname "$0")/lease.$interface"
    ;;
esac
"""


def test_dhcp_gives_the_guest_its_cni_address(net: CniTestNet) -> None:
    pn = networks(net)
    sid = sandbox_id()
    pod = pn.setup(sid, "t", "default", "vm", parse_vm_config({}))
    ns = f"avr-{sid}"
    guest = _fake_guest(net, ns, pod.interfaces[0].mac, "avbr0", net.tag)
    script = net.root / "udhcpc.sh"
    script.write_text(UDHCPC_SCRIPT)
    script.chmod(0o755)
    try:
        sh("busybox", "udhcpc", "-i", "fg0", "-q", "-n", "-t", "5", "-T", "1", "-s", str(script),
           netns=guest)
        lease = (net.root / "lease.fg0").read_text().split()
        assert lease[:3] == [f"ip={pod.ip}", "mask=24", f"router={net.prefix}1"]
        # the probe on the CNI network reaches the "guest" through eth0 and the pod's bridge
        assert " 0% packet loss" in net.ping(pod.ip)
        (use,) = vmnet.usage(ns, ["eth0"])
        assert use.name == "eth0" and use.rx_bytes > 3 * 84 and use.tx_bytes > 3 * 84
        # PortForward's way in: from inside the pod namespace to a port of the "guest"
        listener = netns.socket_in(guest)
        listener.bind(("::", 8080))
        listener.listen(1)

        def echo() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(conn.recv(100).upper())

        t = threading.Thread(target=echo, daemon=True)
        t.start()
        port = vmnet.Port(ifname="eth0", slot=0, bridge="avbr0", tap=vmnet.tap_name(sid, 0),
                          guest_mac=pod.interfaces[0].mac, mtu=1500)
        with vmnet.connect_guest(ns, port, 8080, timeout=10) as s:
            s.sendall(b"hello guest")
            assert s.recv(100) == b"HELLO GUEST"
        t.join(5)
        listener.close()
        with pytest.raises(ConnectionRefusedError):
            vmnet.connect_guest(ns, port, 8081, timeout=10)
    finally:
        sh("ip", "netns", "delete", guest, check=False)
        pn.teardown(sid)
    assert_nothing_left(net, sid, pn)


def test_nics_attach_list_detach(net: CniTestNet) -> None:
    pn = networks(net)
    sid = sandbox_id()
    pn.setup(sid, "tenant-a", "default", "vm-pod", parse_vm_config(ANNOTATIONS))
    ns = f"avr-{sid}"
    nic = NicInfo(name="eth1", subnet_name="subnet-b", port_id="port-0002",
                  ip_address=f"{net.prefix}77")
    try:
        st = pn.attach_nic(sid, None, nic, vpc="vpc-green")
        assert st.state == NIC_READY
        add = [c for c in net.calls() if c["CNI_COMMAND"] == "ADD"][-1]
        assert add["CNI_IFNAME"] == "eth1"
        args = dict(kv.split("=", 1) for kv in add["CNI_ARGS"].split(";"))
        assert args["VPC"] == "vpc-green" and args["IP"] == f"{net.prefix}77"
        assert json.loads(args["NICs"]) == [{"name": "eth1", "subnetName": "subnet-b",
                                             "portId": "port-0002",
                                             "ipAddress": f"{net.prefix}77"}]
        assert args["K8S_POD_NAME"] == "vm-pod" and args["color"] == "blue"
        assert sorted(net.ip_files())[-1] == f"{net.prefix}77"
        eth1 = ipj("-d", "link", "show", "dev", "eth1", netns=ns)[0]
        assert eth1["master"] == "avbr1"
        pod = pn.network(sid)
        assert [i.name for i in pod.network_info.interfaces] == ["eth0", "eth1"]
        assert pod.network_info.interfaces[1].addresses == (f"{net.prefix}77/24",)
        assert pod.network_info.interfaces[1].gateways == ()  # one default route: eth0's
        assert [s.target_dev for s in pod.interfaces] == \
            [vmnet.tap_name(sid, 0), vmnet.tap_name(sid, 1)]
        assert f"{net.prefix}77" in (pn.root / sid / dhcp.CONF_NAME).read_text()
        assert [(n.name, n.port_id, n.state) for n in pn.list_nics(sid)] == \
            [("eth0", "port-0001", NIC_READY), ("eth1", "port-0002", NIC_READY)]
        record = stored(net, sid)
        assert record is not None
        assert [(a["ifname"], a["hotplug"], a["state"], a["vpc"])
                for a in record["attachments"]] == \
            [("eth0", False, "ready", "vpc-blue"), ("eth1", True, "ready", "vpc-green")]
        assert record["attachments"][1]["args"] == [kv.split("=", 1)
                                                    for kv in add["CNI_ARGS"].split(";")]
        # bad input: each a clear error, nothing changed
        with pytest.raises(AlreadyExists):
            pn.attach_nic(sid, None, nic)
        with pytest.raises(AlreadyExists):
            pn.attach_nic(sid, None, NicInfo(name="eth0"))
        for bad in (NicInfo(name=""), NicInfo(name="a" * 16), NicInfo(name="x;y"),
                    NicInfo(name="eth2", ip_address="10.88.1.300"),
                    NicInfo(name="eth2", port_id="a=b"), NicInfo(name="avbr9")):
            with pytest.raises(InvalidArgument):
                pn.attach_nic(sid, None, bad)
        with pytest.raises(NotFound):
            pn.detach_nic(sid, None, "eth7")
        with pytest.raises(FailedPrecondition):
            pn.detach_nic(sid, None, "eth0")
        with pytest.raises(NotFound):
            pn.attach_nic("no-such-sandbox", None, NicInfo(name="eth2"))
        # a NIC the plugin refuses (address outside the range): nothing left of it
        links_before = link_names(ns)
        files_before = net.ip_files()
        with pytest.raises(Unavailable, match=r"host-local|10\.99\.0\.5"):
            pn.attach_nic(sid, None, NicInfo(name="eth2", ip_address="10.99.0.5"))
        assert link_names(ns) == links_before and net.ip_files() == files_before
        assert [n.name for n in pn.list_nics(sid)] == ["eth0", "eth1"]
        assert vmnet.tap_name(sid, 2) not in link_names()
        # detach reverses all of it
        pn.detach_nic(sid, None, "eth1")
        assert "eth1" not in link_names(ns) and "avbr1" not in link_names(ns)
        assert vmnet.tap_name(sid, 1) not in link_names()
        assert f"{net.prefix}77" not in net.ip_files()
        assert f"{net.prefix}77" not in (pn.root / sid / dhcp.CONF_NAME).read_text()
        assert [n.name for n in pn.list_nics(sid)] == ["eth0"]
        assert [a["ifname"] for a in (stored(net, sid) or {})["attachments"]] == ["eth0"]
        dels = [c for c in net.calls() if c["CNI_COMMAND"] == "DEL"]
        assert dels[-1]["CNI_ARGS"] == add["CNI_ARGS"] and dels[-1]["CNI_IFNAME"] == "eth1"
        # attached NICs survive a daemon restart, and teardown DELs them too
        pn.attach_nic(sid, None, nic, vpc="vpc-green")
        pn = networks(net)
        assert [n.name for n in pn.list_nics(sid)] == ["eth0", "eth1"]
    finally:
        pn.teardown(sid)
    ifnames = [c["CNI_IFNAME"] for c in net.calls() if c["CNI_COMMAND"] == "DEL"]
    assert ifnames[-2:] == ["eth1", "eth0"]
    assert_nothing_left(net, sid, pn)


@pytest.mark.parametrize("plugin, error", [
    ({"type": "fail"}, Unavailable),
    ({"type": "garbage"}, Unavailable),
    ({"type": "hang"}, DeadlineExceeded),
])
def test_a_bad_plugin_leaves_nothing(net: CniTestNet, plugin: dict[str, str],
                                     error: type[Exception]) -> None:
    net.conflist(plugin)
    pn = networks(net, cni_timeout=2.0)
    sid = sandbox_id()
    with pytest.raises(error):
        pn.setup(sid, "t", "default", "vm", parse_vm_config(ANNOTATIONS))
    assert_nothing_left(net, sid, pn)
    calls = net.calls()
    # the ADD that failed was followed by a DEL with the same arguments
    assert [c["CNI_COMMAND"] for c in calls] == ["ADD", "DEL"]
    assert calls[0]["CNI_ARGS"] == calls[1]["CNI_ARGS"]
    assert "prevResult" not in calls[1]["stdin"]  # the ADD gave no result


def test_no_config_is_unavailable_and_leaves_nothing(net: CniTestNet) -> None:
    (net.conf_dir / "10-avrtest.conflist").unlink()
    pn = networks(net)
    sid = sandbox_id()
    with pytest.raises(Unavailable, match="no CNI network configuration"):
        pn.setup(sid, "t", "default", "vm", parse_vm_config({}))
    assert_nothing_left(net, sid, pn)


def test_bad_pod_name_is_invalid_and_leaves_nothing(net: CniTestNet) -> None:
    pn = networks(net)
    sid = sandbox_id()
    with pytest.raises(InvalidArgument, match="K8S_POD_NAME"):
        pn.setup(sid, "t", "default", "vm;evil=1", parse_vm_config({}))
    assert_nothing_left(net, sid, pn)
    assert net.calls() == []


def test_nic_rolled_back_when_the_vm_cannot_take_it(net: CniTestNet) -> None:
    conn = libvirt.open("test:///default")  # libvirt's test driver: no such domain there
    pn = networks(net, libvirt_conn=lambda: conn)
    sid = sandbox_id()
    pn.setup(sid, "t", "default", "vm", parse_vm_config({}))
    ns = f"avr-{sid}"
    links_before, files_before = link_names(ns), net.ip_files()
    try:
        with pytest.raises(NotFound, match="does not exist"):
            pn.attach_nic(sid, "6f1d3c1e-7a43-5b0e-9d2f-8a5c4e3b2a99",
                          NicInfo(name="eth1", ip_address=f"{net.prefix}99"))
        assert link_names(ns) == links_before and net.ip_files() == files_before
        assert vmnet.tap_name(sid, 1) not in link_names()
        assert [n.name for n in pn.list_nics(sid)] == ["eth0"]
        dels = [c for c in net.calls() if c["CNI_COMMAND"] == "DEL"]
        assert [c["CNI_IFNAME"] for c in dels] == ["eth1"]
    finally:
        pn.teardown(sid)
        conn.close()
    assert_nothing_left(net, sid, pn)


def test_teardown_after_a_host_reboot_still_releases_the_address(net: CniTestNet) -> None:
    pn = networks(net)
    sid = sandbox_id()
    pod = pn.setup(sid, "tenant-a", "default", "vm-pod", parse_vm_config(ANNOTATIONS))
    # a reboot: /run is empty (no namespace, no dnsmasq, no tap); /var/lib keeps the state
    dhcp.stop(pn.root / sid)
    sh("ip", "netns", "delete", f"avr-{sid}")
    sh("ip", "link", "delete", vmnet.tap_name(sid, 0))
    assert net.ip_files() == [pod.ip]
    pn = networks(net)
    pn.restore()
    assert not pn.status(sid).netns_present
    assert not dhcp.running(pn.root / sid)
    with pytest.raises(FailedPrecondition, match="gone"):
        pn.before_vm_start(sid)
    pn.teardown(sid)
    dels = [c for c in net.calls() if c["CNI_COMMAND"] == "DEL"]
    assert len(dels) == 1 and dels[0]["CNI_ARGS"] == net.calls()[0]["CNI_ARGS"]
    assert_nothing_left(net, sid, pn)


def test_a_conflist_with_the_loopback_plugin(net: CniTestNet) -> None:
    path = net.conf_dir / "10-avrtest.conflist"
    conf = json.loads(path.read_text())
    conf["plugins"].insert(0, {"type": "loopback"})
    path.write_text(json.dumps(conf))
    pn = networks(net)
    sid = sandbox_id()
    try:
        pod = pn.setup(sid, "t", "default", "vm", parse_vm_config({}))
        assert [i.name for i in pod.network_info.interfaces] == ["eth0"]
        assert pod.ip.startswith(net.prefix)
    finally:
        pn.teardown(sid)
    assert_nothing_left(net, sid, pn)
