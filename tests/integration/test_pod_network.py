"""Pod networking through the runtime's socket, with the real bridge + host-local plugins:
the VM answers on its CNI address from a probe namespace, the Arktos tenant, VPC, NICs and
cni-args reach the CNI plugin intact on ADD and on DEL after a daemon restart, NICs are hot-
plugged through the Arktos RPCs, and nothing is left afterwards."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import grpc
import pytest

from tests.daemon_proc import APIS
from tests.integration.test_network_common import (
    CniTestNet,
    link_names,
)
from tests.integration.vmpods import (
    container_config,
    log_text,
    own_netns_names,
    own_taps,
    sandbox_config,
    vm_runtime,
    wait_for,
)

pytestmark = pytest.mark.integration
NICS = [{"name": "eth0", "subnetName": "subnet-a", "portId": "port-1", "ipAddress": "",
         "tag": "blue", "ipv6Enabled": False}]


def cni_args(call: dict[str, object]) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in str(call["CNI_ARGS"]).split(";"))


def test_vm_pod_on_the_cni_network(short_tmp: Path, cni_net: CniTestNet,
                                   served_minimal_image: str) -> None:
    net, served_image = cni_net, served_minimal_image
    pb, _ = APIS["v1alpha2"]
    d = vm_runtime(short_tmp, net).start()
    log_dir = short_tmp / "pods"
    annotations = {"VPC": "vpc-7", "NICs": json.dumps(NICS),
                   "arktos.futurewei.com/cni-args": "ZONE=az-1;QOS=gold"}
    cfg = sandbox_config(pb, log_dir, annotations=annotations, name="net-pod")
    sid = ""
    try:
        rt = d.runtime("v1alpha2")
        d.images("v1alpha2").PullImage(pb.PullImageRequest(
            image=pb.ImageSpec(image=served_image)), timeout=60)
        sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=60).pod_sandbox_id
        assert f"avr-{sid}" in os.listdir("/run/netns")
        status = rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid),
                                     timeout=10).status
        ip = status.network.ip
        assert ip.startswith(net.prefix)
        assert [(n.name, n.port_id, n.state) for n in status.network.nics] == \
            [("eth0", "port-1", pb.NIC_READY)]

        adds = [c for c in net.calls() if c["CNI_COMMAND"] == "ADD"]
        assert len(adds) == 1
        args = cni_args(adds[0])
        assert args["IgnoreUnknown"] == "1" and args["K8S_POD_TENANT"] == "tenant-a"
        assert args["K8S_POD_NAMESPACE"] == "default" and args["K8S_POD_NAME"] == "net-pod"
        assert args["K8S_POD_INFRA_CONTAINER_ID"] == sid and args["VPC"] == "vpc-7"
        assert json.loads(args["NICs"])[0]["portId"] == "port-1"
        assert args["ZONE"] == "az-1" and args["QOS"] == "gold"

        cid = rt.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=sid, sandbox_config=cfg, config=container_config(pb, served_image)),
            timeout=60).container_id
        rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=60)
        log_file = log_dir / "vm" / "0.log"
        wait_for("the guest to take its CNI address",
                 lambda: f"MINIMAL-GUEST-NET eth0 {ip}/24" in log_text(log_file), 180)
        out = net.ping(ip)
        assert " 0% packet loss" in out, out
        echoed = subprocess.run(
            ["ip", "netns", "exec", net.probe, "busybox", "nc", "-w", "5", ip, "7"],
            input="tcp reaches the guest\n", capture_output=True, text=True, timeout=30)
        assert echoed.stdout == "tcp reaches the guest\n", echoed

        # Hot-plug a NIC by the pod's NAME, as the Arktos kubelet sends it.
        nic = pb.NicSpec(Name="eth1", SubnetName="subnet-b", PortId="port-2",
                         IpAddress=f"{net.prefix}77", tag="green", VPC="vpc-7")
        rt.AttachNetworkInterface(pb.DeviceAttachDetachRequest(
            PodSandboxID="net-pod", VmName="vm", Nic=nic), timeout=60)
        listed = rt.ListNetworkInterfaces(pb.ListDeviceRequest(PodSandboxId="net-pod"),
                                          timeout=10).Nics
        assert [(n.Name, n.PortId, n.IpAddress, n.SubnetName, n.tag, n.VPC) for n in listed] \
            == [("eth0", "port-1", "", "subnet-a", "blue", "vpc-7"),
                ("eth1", "port-2", f"{net.prefix}77", "subnet-b", "green", "vpc-7")]
        with pytest.raises(grpc.RpcError) as e:
            rt.AttachNetworkInterface(pb.DeviceAttachDetachRequest(
                PodSandboxID=sid, Nic=nic), timeout=60)
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
        wait_for("the guest to configure the hot-plugged NIC",
                 lambda: f"MINIMAL-GUEST-NET eth1 {net.prefix}77/24" in log_text(log_file), 90)
        out = net.ping(f"{net.prefix}77")
        assert " 0% packet loss" in out, out
        rt.DetachNetworkInterface(pb.DeviceAttachDetachRequest(
            PodSandboxID=sid, Nic=pb.NicSpec(Name="eth1")), timeout=60)
        with pytest.raises(grpc.RpcError) as e:
            rt.DetachNetworkInterface(pb.DeviceAttachDetachRequest(
                PodSandboxID=sid, Nic=pb.NicSpec(Name="eth1")), timeout=60)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert [n.Name for n in rt.ListNetworkInterfaces(
            pb.ListDeviceRequest(PodSandboxId=sid), timeout=10).Nics] == ["eth0"]
        assert f"{net.prefix}77" not in net.ip_files()

        # A daemon restart keeps everything; DEL then gets the same arguments as ADD.
        assert d.stop() == 0
        d = vm_runtime(short_tmp, net).start()
        rt = d.runtime("v1alpha2")
        out = net.ping(ip)
        assert " 0% packet loss" in out, out
        rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=60)
        dels = [c for c in net.calls() if c["CNI_COMMAND"] == "DEL"
                and c["CNI_IFNAME"] == "eth0"]
        assert dels and dels[-1]["CNI_ARGS"] == adds[0]["CNI_ARGS"]
        # DEL carries the stored ADD result: what the plugin chain returned to the runtime.
        assert dels[-1]["stdin"]["prevResult"] == adds[0]["stdin"]["prevResult"]
        rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60)
        sid = ""
        assert not net.ip_files()
        assert not own_taps(link_names())  # this test's own pods only: another
        assert not own_netns_names()         # runtime may run on this host meanwhile
    finally:
        if sid:
            d.runtime("v1alpha2").RemovePodSandbox(
                pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60)
        d.stop()
