"""Issue 9 item 2: a 2 MiB pod name made the CNI plugin fail with "Argument list too long"
(E2BIG), its rollback DEL too. The API limits (api/limits.py) now bound every input; here
the worst case of what they admit is built, field by field at its limit and in 4-byte
UTF-8 characters where characters are counted, and shown to fit in CNI_ARGS
(cni.MAX_CNI_ARGS, far below the kernel's MAX_ARG_STRLEN) and to reach a real plugin
process through execve; anything larger is refused before any side effect."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from arktos_vm_runtime.adapters import cni
from arktos_vm_runtime.api import limits
from arktos_vm_runtime.api.gen.v1alpha2 import api_pb2 as pb
from arktos_vm_runtime.errors import InvalidArgument
from arktos_vm_runtime.service.nic_spec import (
    ANN_CNI_ARGS,
    ANN_NICS,
    ANN_VPC,
    NicInfo,
    nics_to_json,
)
from arktos_vm_runtime.service.vmconfig import parse_vm_config

WIDE = "\U0001f600"  # one character, 4 bytes of UTF-8 (12 as a JSON \\u escape pair)


def _nbytes(text: str) -> int:
    return len(text.encode())


def _worst_nics() -> str:
    """A NICs annotation of at most limits' bytes, as many wide characters as fit."""
    limit = limits.ANNOTATION_LIMITS[ANN_NICS]
    nics: list[dict[str, object]] = []
    while True:
        i = len(nics)
        nic = {"name": f"eth{i}", "subnetName": WIDE * 253, "portId": WIDE * 253,
               "tag": WIDE * 253, "ipAddress": "fd00::1", "ipv6Enabled": True}
        if _nbytes(json.dumps([*nics, nic], ensure_ascii=False)) > limit:
            break
        nics.append(nic)
    # fill the rest with a last NIC whose tag is as long as still fits
    for n in range(253, 0, -1):
        last = {"name": f"eth{len(nics)}", "tag": WIDE * n}
        if _nbytes(json.dumps([*nics, last], ensure_ascii=False)) <= limit:
            nics.append(last)
            break
    return json.dumps(nics, ensure_ascii=False)


def _worst_cni_args() -> str:
    limit = limits.ANNOTATION_LIMITS[ANN_CNI_ARGS]
    pairs: list[str] = []
    while True:
        pair = f"K{len(pairs)}={WIDE * 200}"
        if _nbytes(";".join([*pairs, pair])) > limit:
            return ";".join(pairs)
        pairs.append(pair)


def _worst_request() -> pb.RunPodSandboxRequest:
    md = pb.PodSandboxMetadata(
        name=WIDE * limits.DNS1123_SUBDOMAIN, namespace=WIDE * limits.DNS1123_LABEL,
        tenant=WIDE * limits.DNS1123_LABEL, uid="u" * limits.ID, attempt=0)
    annotations = {ANN_VPC: "v" * limits.ANNOTATION_LIMITS[ANN_VPC], ANN_NICS: _worst_nics(),
                   ANN_CNI_ARGS: _worst_cni_args()}
    return pb.RunPodSandboxRequest(config=pb.PodSandboxConfig(
        metadata=md, hostname="vm", annotations=annotations))


def _pairs(req: pb.RunPodSandboxRequest) -> list[tuple[str, str]]:
    cfg = req.config
    vm = parse_vm_config(dict(cfg.annotations))
    return cni.pod_cni_args(tenant=cfg.metadata.tenant, namespace=cfg.metadata.namespace,
                            name=cfg.metadata.name, sandbox_id=cfg.metadata.uid, vpc=vm.vpc,
                            nics_json=nics_to_json(vm.nics), extra=vm.cni_args)


def test_the_worst_case_the_api_admits_fits_in_cni_args() -> None:
    req = _worst_request()
    limits.check_sizes(req)  # within every limit of the API
    for name in (ANN_NICS, ANN_CNI_ARGS):
        assert _nbytes(req.config.annotations[name]) > 0.95 * limits.ANNOTATION_LIMITS[name]
    size = _nbytes(cni.format_cni_args(_pairs(req)))
    print(f"worst-case CNI_ARGS: {size} bytes (bound {cni.MAX_CNI_ARGS}, kernel "
          f"{limits.MAX_ARG_STRLEN} per string)")
    assert 40_000 < size <= cni.MAX_CNI_ARGS
    assert cni.MAX_CNI_ARGS + len("CNI_ARGS=") + 1 < limits.MAX_ARG_STRLEN
    # A NIC hot-plugged later: the pod's names and cni-args with one NIC of the RPC's
    # NicSpec, each field at its limit.
    cfg = req.config
    nic = NicInfo(name="eth9", subnet_name=WIDE * 253, port_id=WIDE * 253,
                  ip_address="f" * 253, tag=WIDE * 253, ipv6_enabled=True)
    hot = cni.pod_cni_args(tenant=cfg.metadata.tenant, namespace=cfg.metadata.namespace,
                           name=cfg.metadata.name, sandbox_id=cfg.metadata.uid,
                           vpc="v" * 253, nics_json=nics_to_json([nic]),
                           extra=parse_vm_config(dict(cfg.annotations)).cni_args)
    assert _nbytes(cni.format_cni_args(hot)) <= cni.MAX_CNI_ARGS


def test_the_nics_json_is_never_longer_than_its_annotation() -> None:
    raw = _worst_nics()
    out = nics_to_json(parse_vm_config({ANN_NICS: raw}).nics)
    assert _nbytes(out) <= _nbytes(raw)
    # What \\u escapes made of it before: nearly 3 times the annotation, over the bound.
    escaped = json.dumps(json.loads(raw), separators=(",", ":"))
    assert _nbytes(escaped) > 2.5 * _nbytes(raw) and _nbytes(escaped) > cni.MAX_CNI_ARGS


def test_the_cni_annotations_are_limited_in_bytes() -> None:
    """32 Ki wide characters are 128 KiB: counted in characters (as before) they passed."""
    for name, limit in limits.ANNOTATION_LIMITS.items():
        chars = limit // 4 + 1
        req = pb.RunPodSandboxRequest(config=pb.PodSandboxConfig(
            annotations={name: WIDE * chars}))
        assert chars <= limit
        with pytest.raises(InvalidArgument, match="bytes in UTF-8"):
            limits.check_sizes(req)


def test_the_worst_case_reaches_a_real_plugin(tmp_path: Path) -> None:
    """execve with the worst-case environment: the plugin runs and sees all of CNI_ARGS."""
    plugin = tmp_path / "avrtest-size"
    plugin.write_text("#!/bin/sh\ncat >/dev/null\n"
                      "printf '{\"cniVersion\":\"1.0.0\",\"ips\":[],\"argsBytes\":%d}' "
                      "\"$(printf %s \"$CNI_ARGS\" | wc -c)\"\n")
    plugin.chmod(0o755)
    pairs = _pairs(_worst_request())
    config = cni.NetworkConfig(name="n", cni_version="1.0.0",
                               plugins=({"type": "avrtest-size"},))
    sid = str(uuid.uuid4())
    rt = cni.RuntimeConf(container_id=sid, netns=f"/run/netns/avr-{sid}", ifname="eth0",
                         args=tuple(pairs))
    result = cni.CNI([str(tmp_path)]).add(config, rt)
    assert result["argsBytes"] == _nbytes(cni.format_cni_args(pairs))


def test_more_than_the_bound_is_refused_and_the_kernel_limit_is_real() -> None:
    big = [("IgnoreUnknown", "1"), ("K", "a" * cni.MAX_CNI_ARGS)]
    with pytest.raises(InvalidArgument, match="CNI_ARGS would be"):
        cni.format_cni_args(big)
    # The premise: one environment string over MAX_ARG_STRLEN cannot be passed at all.
    with pytest.raises(OSError) as e:
        subprocess.run(["/bin/true"], env={"CNI_ARGS": "a" * limits.MAX_ARG_STRLEN},
                       check=False)
    assert e.value.errno == errno.E2BIG
    assert os.path.exists("/bin/true")
