"""Boots one VM pod through a running arktos-vm-runtime, as a kubelet would, and prints
its console until cloud-init's runcmd line appears.

    python tools/demo_pod.py --socket /run/virtlet.sock --image 127.0.0.1:8099/guest.qcow2
    python tools/demo_pod.py --socket /run/virtlet.sock --remove   # remove the demo pod
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import grpc

from arktos_vm_runtime.api.gen.v1alpha2 import api_pb2 as pb
from arktos_vm_runtime.api.gen.v1alpha2 import api_pb2_grpc as pb_grpc

POD_UID = "4d1f0b3e-0c6a-4c1e-9a55-6d656d6f0001"
LOG_DIR = Path("/var/log/pods/default_demo-vm_" + POD_UID)
MARKER = "hello from demo-vm, configured by cloud-init"


def main() -> int:
    try:
        return run()
    except grpc.RpcError as e:
        print(f"demo: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1


def run() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", default="/run/virtlet.sock")
    ap.add_argument("--image", help="image name (URL without scheme)")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--remove", action="store_true")
    args = ap.parse_args()
    ch = grpc.insecure_channel(f"unix:{args.socket}")
    rt, img = pb_grpc.RuntimeServiceStub(ch), pb_grpc.ImageServiceStub(ch)
    v = rt.Version(pb.VersionRequest(), timeout=10)
    print(f"runtime: {v.runtime_name} {v.runtime_version} (CRI {v.runtime_api_version})")
    if args.remove:
        rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=POD_UID), timeout=120)
        rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=POD_UID), timeout=120)
        print("demo pod removed")
        return 0
    t0 = time.monotonic()
    ref = img.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=args.image)),
                        timeout=600).image_ref
    print(f"pulled {args.image} as {ref} in {time.monotonic() - t0:.1f} s")
    annotations = {
        "VirtletVCPUCount": "2",
        "VirtletCloudInitUserData": f"runcmd:\n  - echo '{MARKER}' > /dev/ttyS0\n",
    }
    cfg = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name="demo-vm", uid=POD_UID, namespace="default",
                                       tenant="system"),
        hostname="demo-vm", log_directory=str(LOG_DIR), annotations=annotations)
    t_run = time.monotonic()
    sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=120).pod_sandbox_id
    cid = rt.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=sid, sandbox_config=cfg,
        config=pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name="vm"), image=pb.ImageSpec(image=args.image),
            log_path="vm/0.log", tty=True, stdin=True,
            linux=pb.LinuxContainerConfig(resources=pb.LinuxContainerResources(
                memory_limit_in_bytes=512 * 2**20)))), timeout=120).container_id
    rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=120)
    log = LOG_DIR / "vm" / "0.log"
    print(f"pod {sid}: VM {cid} started; console -> {log}")
    shown = 0
    first = None
    while time.monotonic() - t_run < args.timeout:
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        for line in lines[shown:]:
            print("  | " + line)
            if first is None:
                first = time.monotonic() - t_run
            if MARKER in line and "echo" not in line:
                print(f"first console line {first:.1f} s, cloud-init runcmd line "
                      f"{time.monotonic() - t_run:.1f} s after RunPodSandbox")
                return 0
        shown = len(lines)
        time.sleep(0.5)
    print("the cloud-init line did not appear in time", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
