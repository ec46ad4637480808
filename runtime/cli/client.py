"""The node CLI's CRI client: the daemon's own socket, the Arktos API (v1alpha2: tenants,
NICs) and v1 where it says more (a pod's additional IPs). Every failure is a CliError
naming the socket and what the daemon said."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from typing import Any

import grpc

from ..api.gen.v1 import api_pb2 as v1
from ..api.gen.v1alpha2 import api_pb2 as pb


class CliError(Exception):
    """What went wrong, said to the operator; the command exits non-zero."""


class Client:
    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise CliError(f"{path}: no such socket; is the daemon running "
                           "(systemctl status arktos-vm-runtime.socket)?") from None
        except PermissionError:
            raise CliError(f"{path}: permission denied (run as root or as a member of "
                           "the socket's group)") from None
        if not stat.S_ISSOCK(mode):
            raise CliError(f"{path}: not a unix socket")
        self.channel = grpc.insecure_channel(f"unix:{path}")

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, request: Any, api: str = "v1alpha2") -> Any:
        mod = v1 if api == "v1" else pb
        service = "ImageService" if method in ("ListImages", "ImageStatus") \
            else "RuntimeService"
        response_cls = getattr(mod, f"{method}Response")
        stub: Callable[..., Any] = self.channel.unary_unary(
            f"/runtime.{api}.{service}/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_cls.FromString)
        try:
            return stub(request, timeout=self.timeout)
        except grpc.RpcError as e:
            code = e.code()  # type: ignore[attr-defined]
            detail = e.details()  # type: ignore[attr-defined]
            raise CliError(f"{self.path}: {method}: {code.name}: {detail}") from None

    # -- what the commands read ----------------------------------------------------------

    def sandboxes(self) -> list[Any]:
        return list(self.call("ListPodSandbox", pb.ListPodSandboxRequest()).items)

    def sandbox_status(self, sid: str) -> Any:
        return self.call("PodSandboxStatus", pb.PodSandboxStatusRequest(pod_sandbox_id=sid))

    def additional_ips(self, sid: str) -> list[str]:
        r = self.call("PodSandboxStatus", v1.PodSandboxStatusRequest(pod_sandbox_id=sid),
                      api="v1")
        return [ip.ip for ip in r.status.network.additional_ips]

    def containers(self, sid: str = "") -> list[Any]:
        f = pb.ContainerFilter(pod_sandbox_id=sid)
        return list(self.call("ListContainers", pb.ListContainersRequest(filter=f)).containers)

    def container_status(self, cid: str) -> tuple[Any, dict[str, Any]]:
        """The status and the runtime's verbose info (QEMU pid, vCPUs, console writers)."""
        r = self.call("ContainerStatus", pb.ContainerStatusRequest(container_id=cid,
                                                                   verbose=True))
        try:
            info = json.loads(r.info.get("info", "{}"))
        except ValueError:
            info = {}
        return r.status, info if isinstance(info, dict) else {}

    def images(self) -> list[Any]:
        return list(self.call("ListImages", pb.ListImagesRequest()).images)

    def status_info(self) -> dict[str, str]:
        return dict(self.call("Status", pb.StatusRequest(verbose=True)).info)

    def attach_url(self, cid: str) -> str:
        r = self.call("Attach", pb.AttachRequest(container_id=cid, stdin=True, tty=True,
                                                 stdout=True, stderr=False))
        return str(r.url)
