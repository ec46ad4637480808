"""End to end: a real guest (the minimal busybox guest under TCG) on a pod network made by
the real bridge + host-local plugins answers ping and TCP on its CNI address from a probe
namespace: with a static address from the cloud-init seed, across a daemon restart, and
after a stop and start with DHCP from the pod's dnsmasq. A NIC is hot-plugged into the
running VM and unplugged again; afterwards nothing is left.
"""

from __future__ import annotations

import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from arktos_vm_runtime.adapters import dhcp, libvirt_nics, pod_socket, vmnet
from arktos_vm_runtime.adapters.domain_xml import render_interface
from arktos_vm_runtime.adapters.seed_iso import write_seed_iso
from arktos_vm_runtime.adapters.templates import default_template_dirs
from arktos_vm_runtime.service.network_state import NIC_READY
from arktos_vm_runtime.service.nic_spec import NicInfo
from arktos_vm_runtime.service.pod_network import PodNetworks
from arktos_vm_runtime.service.seed import render_seed
from arktos_vm_runtime.service.store import Store
from arktos_vm_runtime.service.vmconfig import parse_vm_config
from tests.guest.images import minimal_guest
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
from tests.integration.vmpods import echo_line, require_libvirtd, wait_for

pytestmark = pytest.mark.integration
URI = "qemu:///system"
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised; no stderr noise
BOOT_TIMEOUT = 120
TEMPLATES = default_template_dirs(None)


@pytest.fixture
def net() -> Iterator[CniTestNet]:
    require_libvirtd()
    with cni_test_network() as n:
        yield n


def domain_xml(name: str, uid: str, kernel: Path, initrd: Path, cmdline: str, seed: Path,
               console: Path, nic_xml: str) -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uid}</uuid>
  <memory unit='MiB'>256</memory>
  <vcpu>2</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel><initrd>{initrd}</initrd><cmdline>{cmdline}</cmdline></os>
  <features><acpi/><apic/></features>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/><source file='{seed}'/>
      <target dev='hdc' bus='ide'/><readonly/>
    </disk>
    {nic_xml}
    <serial type='file'><source path='{console}' append='on'/><target port='0'/></serial>
  </devices>
</domain>"""


def tcp_answers(netns: str, address: str, port: int) -> str:
    """Connects from the probe namespace; the guest's kernel answers (accept or RST)."""
    r = subprocess.run(["ip", "netns", "exec", netns, "busybox", "nc", "-w", "5", address,
                        str(port)], input="", capture_output=True, text=True, timeout=30)
    if r.returncode == 0:
        return "open"
    if "refused" in r.stderr:
        return "refused"  # an RST from the guest: it answered
    return r.stderr.strip()


def rtt_ms(ping_output: str) -> float:
    m = re.search(r"min/avg/max = [\d.]+/([\d.]+)/", ping_output)
    assert m, ping_output
    return float(m.group(1))


def echo_from_pod_namespace(sid: str, ip: str) -> bytes:
    """A line through the guest's TCP echo (port 7), connected as PortForward does."""
    with pod_socket.connect(f"avr-{sid}", ip, 7, 10) as s:
        return echo_line(s, b"port-forward path\n")


def test_guest_answers_on_its_cni_address(net: CniTestNet, tmp_path: Path) -> None:
    guest = minimal_guest()
    vmdir = Path(f"/tmp/avr-netvm-{net.tag}")
    vmdir.mkdir(mode=0o755)
    def networks() -> PodNetworks:  # a second call is the daemon restarted
        return PodNetworks(net.root / "state" / "networks", Store(net.root / "state.db"),
                           conf_dir=str(net.conf_dir), bin_dirs=[CNI_BIN, str(PLUGINS)],
                           libvirt_conn=lambda: conn, template_dirs=TEMPLATES)

    pn = networks()
    conn = libvirt.open(URI)
    sid = f"sb-{net.tag}"
    uid = str(uuid.uuid4())
    name = f"avr-{uid}"
    console = vmdir / "console.log"
    seed = vmdir / "seed.iso"
    dom = None
    figures: dict[str, float] = {}
    try:
        t = time.monotonic()
        pod = pn.setup(sid, "tenant-a", "default", "vm-pod", parse_vm_config({"VPC": "v1"}))
        figures["setup ms"] = (time.monotonic() - t) * 1000
        vm_static = parse_vm_config({})
        files = render_seed(vm_static, instance_id=uid, hostname="vm-pod", env=[],
                            network=pod.network_info)
        write_seed_iso(files, "nocloud", seed)
        nic_xml = "".join(render_interface(s, TEMPLATES) for s in pod.interfaces)
        dom = conn.defineXML(domain_xml(name, uid, guest.kernel, guest.initrd, guest.cmdline,
                                        seed, console, nic_xml))

        def boot(n: int) -> None:
            pn.before_vm_start(sid)
            assert vmnet.tap_location(f"avr-{sid}", vmnet.Port.from_dict(
                {"ifname": "eth0", "slot": 0, "bridge": "avbr0", "tap": pod.interfaces[0]
                 .target_dev, "guest_mac": pod.interfaces[0].mac, "mtu": 1500})) == "root"
            dom.create()
            t = time.monotonic()
            pn.after_vm_started(sid)
            figures[f"tap move #{n} ms"] = (time.monotonic() - t) * 1000
            wait_for(f"boot #{n}", lambda: console.exists()
                     and console.read_text(errors="replace").count(guest.marker) >= n,
                     BOOT_TIMEOUT)

        # 1. static address from the seed's network-config
        boot(1)
        text = console.read_text(errors="replace")
        assert f"MINIMAL-GUEST-NET eth0 {pod.ip}/24" in text
        out = net.ping(pod.ip)
        assert " 0% packet loss" in out, out
        figures["ping avg ms (static)"] = rtt_ms(out)
        assert tcp_answers(net.probe, pod.ip, 9) in ("refused", "open")
        # from inside the pod namespace (PortForward's way in): the guest's kernel answers
        with pytest.raises(ConnectionRefusedError):
            vmnet.connect_guest(f"avr-{sid}", vmnet.Port(
                ifname="eth0", slot=0, bridge="avbr0", tap=pod.interfaces[0].target_dev,
                guest_mac=pod.interfaces[0].mac, mtu=1500), 9, timeout=10)

        # PortForward's way in: the pod IP from the namespace (a /32 route on the bridge; the
        # guest answers through its on-link route back to the bridge's address)
        assert echo_from_pod_namespace(sid, pod.ip) == b"port-forward path\n"

        # 2. the daemon restarts (dnsmasq ended with it): the VM keeps answering
        dhcp.stop(pn.root / sid)
        pn2 = networks()
        pn2.restore()
        assert dhcp.running(pn.root / sid)
        assert " 0% packet loss" in net.ping(pod.ip)
        pn = pn2

        # 3. hot-plug a NIC into the running VM, list it, unplug it
        nic = NicInfo(name="eth1", port_id="port-2", ip_address=f"{net.prefix}77")
        t = time.monotonic()
        pn.attach_nic(sid, uid, nic)
        figures["attach ms"] = (time.monotonic() - t) * 1000
        tap1 = vmnet.tap_name(sid, 1)
        link = ipj("-d", "link", "show", "dev", tap1, netns=f"avr-{sid}")[0]
        assert link["master"] == "avbr1" and "NO-CARRIER" not in link["flags"]
        live, config = libvirt_nics.domain_macs(lambda: conn, uid)
        assert live is not None and len(live) == 2 and len(config) == 2
        assert [(n.name, n.state) for n in pn.list_nics(sid, uid)] == \
            [("eth0", NIC_READY), ("eth1", NIC_READY)]
        wait_for("the guest to configure eth1", lambda: f"MINIMAL-GUEST-NET eth1 "
                 f"{net.prefix}77/24" in console.read_text(errors="replace"), 60)
        out = net.ping(f"{net.prefix}77")
        assert " 0% packet loss" in out, out
        figures["hot-plugged NIC ping avg ms"] = rtt_ms(out)
        t = time.monotonic()
        pn.detach_nic(sid, uid, "eth1")
        figures["detach ms"] = (time.monotonic() - t) * 1000
        live, config = libvirt_nics.domain_macs(lambda: conn, uid)
        assert live == config == [pod.interfaces[0].mac]
        assert tap1 not in link_names(f"avr-{sid}") and tap1 not in link_names()
        assert f"{net.prefix}77" not in net.ip_files()

        # 4. stop and start (StopContainer, StartContainer), now with DHCP from dnsmasq
        dom.destroy()
        assert vmnet.tap_location(f"avr-{sid}", vmnet.Port.from_dict(
            {"ifname": "eth0", "slot": 0, "bridge": "avbr0", "tap": pod.interfaces[0]
             .target_dev, "guest_mac": "", "mtu": 1500})) == "netns"  # persistent, unopened
        files = render_seed(parse_vm_config({"VirtletForceDHCPNetworkConfig": "true"}),
                            instance_id=uid, hostname="vm-pod", env=[], network=pod.network_info)
        write_seed_iso(files, "nocloud", seed)
        # a NIC attached while the VM is stopped goes into its definition only
        pn.attach_nic(sid, uid, NicInfo(name="eth2", ip_address=f"{net.prefix}78"))
        live, config = libvirt_nics.domain_macs(lambda: conn, uid)
        assert live is None and len(config) == 2
        boot(2)
        for slot in (0, 2):  # both taps opened by QEMU and bridged in the pod namespace
            link = ipj("-d", "link", "show", "dev", vmnet.tap_name(sid, slot),
                       netns=f"avr-{sid}")[0]
            assert link["master"] == f"avbr{slot}" and "NO-CARRIER" not in link["flags"]
        text = console.read_text(errors="replace")
        assert text.count(f"MINIMAL-GUEST-NET eth0 {pod.ip}/24") == 2, text[-2000:]
        out = net.ping(pod.ip)
        assert " 0% packet loss" in out, out
        figures["ping avg ms (dhcp)"] = rtt_ms(out)
        assert tcp_answers(net.probe, pod.ip, 9) in ("refused", "open")
        # the route back came by DHCP option 121 this time
        assert echo_from_pod_namespace(sid, pod.ip) == b"port-forward path\n"
        assert [(n.name, n.state) for n in pn.list_nics(sid, uid)] == \
            [("eth0", NIC_READY), ("eth2", NIC_READY)]
        dom.destroy()
        pn.detach_nic(sid, uid, "eth2")  # from the stopped VM's definition
        assert libvirt_nics.domain_macs(lambda: conn, uid) == (None, [pod.interfaces[0].mac])
        assert [(n.name, n.state) for n in pn.list_nics(sid, uid)] == [("eth0", NIC_READY)]
        dom.undefine()
        dom = None
        # No domain any more: nothing to check the NIC against, and its CNI side is whole.
        assert [n.state for n in pn.list_nics(sid, uid)] == [NIC_READY]
    finally:
        if dom is not None:
            try:
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
            except libvirt.libvirtError:
                pass
        t = time.monotonic()
        pn.teardown(sid)
        figures["teardown ms"] = (time.monotonic() - t) * 1000
        conn.close()
        sh("rm", "-rf", str(vmdir))
    print("\n" + ", ".join(f"{k} {v:.1f}" for k, v in figures.items()))
    assert f"avr-{sid}" not in netns_names()
    assert not [n for n in link_names() if n.startswith(vmnet.tap_name(sid, 0)[:-1])]
    assert net.ip_files() == []
