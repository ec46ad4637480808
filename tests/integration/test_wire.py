"""Both CRI versions over a real unix socket, through the project's generated clients."""

from __future__ import annotations

import json
import time

import grpc
import pytest

from tests.daemon_proc import APIS, Daemon

API_VERSIONS = ["v1alpha2", "v1"]


@pytest.mark.parametrize("api", API_VERSIONS)
def test_version_names_the_api_the_caller_used(daemon: Daemon, api: str) -> None:
    pb, _ = APIS[api]
    r = daemon.runtime(api).Version(pb.VersionRequest(version="0.1.0"), timeout=5)
    assert r.version == "0.1.0"
    assert r.runtime_name == "arktos-vm-runtime"
    assert r.runtime_version
    assert r.runtime_api_version == api


@pytest.mark.parametrize("api", API_VERSIONS)
def test_status_reports_network_not_ready_until_cni_config_appears(
        daemon: Daemon, api: str) -> None:
    pb, _ = APIS[api]
    rt = daemon.runtime(api)

    def conditions() -> dict[str, object]:
        r = rt.Status(pb.StatusRequest(verbose=True), timeout=5)
        return {c.type: c for c in r.status.conditions}, r.info

    # test:///default answers like a libvirtd: runtime ready once probed.
    deadline = time.monotonic() + 10
    while not conditions()[0]["RuntimeReady"].status and time.monotonic() < deadline:
        time.sleep(0.1)
    conds, info = conditions()
    assert conds["RuntimeReady"].status, conds["RuntimeReady"]
    net = conds["NetworkReady"]
    assert not net.status and net.reason == "NoCNIConfig" and str(daemon.cni_dir) in net.message
    config = json.loads(info["config"])
    assert config["listen"] == daemon.socket and config["libvirt_uri"] == "test:///default"

    (daemon.cni_dir / "10-test.conflist").write_text('{"cniVersion": "1.0.0"}')
    conds, _ = conditions()
    assert conds["NetworkReady"].status and conds["NetworkReady"].reason == ""


def test_status_reports_runtime_not_ready_while_libvirt_is_unreachable(short_tmp) -> None:
    d = Daemon(short_tmp, libvirt_uri=f"qemu+unix:///system?socket={short_tmp}/none.sock")
    d.start()
    try:
        pb, _ = APIS["v1alpha2"]
        time.sleep(0.5)
        r = d.runtime("v1alpha2").Status(pb.StatusRequest(), timeout=5)
        cond = {c.type: c for c in r.status.conditions}["RuntimeReady"]
        assert not cond.status
        assert cond.reason == "LibvirtUnreachable"
        assert "none.sock" in cond.message
        assert not r.info, "info is only for verbose requests"
    finally:
        assert d.stop() == 0


def _raw(daemon: Daemon, path: str, payload: bytes) -> grpc.RpcError:
    call = daemon.channel.unary_unary(path, request_serializer=None,
                                      response_deserializer=None)
    with pytest.raises(grpc.RpcError) as e:
        call(payload, timeout=10)
    return e.value


@pytest.mark.parametrize("api", API_VERSIONS)
def test_every_method_answers_with_a_meaningful_status(daemon: Daemon, api: str) -> None:
    """No method of either service answers UNKNOWN or INTERNAL to a default request;
    a missing one says UNIMPLEMENTED and names itself."""
    pb, _ = APIS[api]
    for service in ("RuntimeService", "ImageService"):
        for method in pb.DESCRIPTOR.services_by_name[service].methods:
            path = f"/runtime.{api}.{service}/{method.name}"
            req = getattr(pb, method.input_type.name)()
            if method.server_streaming:
                call = daemon.channel.unary_stream(
                    path, request_serializer=type(req).SerializeToString,
                    response_deserializer=None)
                with pytest.raises(grpc.RpcError) as e:
                    list(call(req, timeout=5))
                if method.name == "GetContainerEvents":  # open until the client leaves
                    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, path
                else:
                    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED, path
                continue
            call = daemon.channel.unary_unary(path,
                                              request_serializer=type(req).SerializeToString,
                                              response_deserializer=None)
            try:
                call(req, timeout=10)
                continue
            except grpc.RpcError as e:
                code, details = e.code(), e.details()
            assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (path, details)
            if code == grpc.StatusCode.UNIMPLEMENTED:
                assert path in details, details
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                assert "field" in details, (path, details)


@pytest.mark.parametrize("api", API_VERSIONS)
def test_bad_input_gets_invalid_argument_and_the_daemon_keeps_serving(
        daemon: Daemon, api: str) -> None:
    pb, _ = APIS[api]
    rt = f"/runtime.{api}.RuntimeService"

    e = _raw(daemon, f"{rt}/PodSandboxStatus", b"\xff\xff\xff\xff\x0f garbage")
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed PodSandboxStatusRequest" in e.details()

    e = _raw(daemon, f"{rt}/Version", b"\x0a" + b"\xff" * 3 + b"\x01")
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT

    big = pb.VersionRequest(version="x" * (16 * 1024 * 1024 + 100)).SerializeToString()
    e = _raw(daemon, f"{rt}/Version", big)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "message limit" in e.details()

    stub = daemon.runtime(api)
    with pytest.raises(grpc.RpcError) as ei:
        stub.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=""), timeout=5)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "pod_sandbox_id" in ei.value.details()

    bad_filter = pb.ContainerFilter(state=pb.ContainerStateValue(state=99))
    with pytest.raises(grpc.RpcError) as ei:
        stub.ListContainers(pb.ListContainersRequest(filter=bad_filter), timeout=5)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "filter.state.state" in ei.value.details() and "99" in ei.value.details()

    r = stub.Version(pb.VersionRequest(), timeout=5)
    assert r.runtime_api_version == api
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_arktos_required_fields_are_checked_by_name(daemon: Daemon) -> None:
    pb, _ = APIS["v1alpha2"]
    stub = daemon.runtime("v1alpha2")
    cases = [
        (stub.RebootVM, pb.RebootVMRequest(), "vm_id"),
        (stub.CreateSnapshot, pb.CreateSnapshotRequest(vmID="x"), "snapshotID"),
        (stub.RestoreToSnapshot, pb.RestoreToSnapshotRequest(snapshotID="s"), "vmID"),
        (stub.AttachNetworkInterface, pb.DeviceAttachDetachRequest(PodSandboxID="p"), "Nic"),
        (stub.DetachNetworkInterface,
         pb.DeviceAttachDetachRequest(PodSandboxID="p", Nic=pb.NicSpec(SubnetName="s")),
         "Nic.Name"),
        (stub.ListNetworkInterfaces, pb.ListDeviceRequest(VmName="vm"), "PodSandboxId"),
    ]
    for method, req, field in cases:
        with pytest.raises(grpc.RpcError) as ei:
            method(req, timeout=5)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in ei.value.details()


def test_daemon_serves_on_debian_12_python_packages(short_tmp) -> None:
    """The .deb runs on Debian's python3-grpcio 1.51 and python3-protobuf 4.21, not PyPI's."""
    import os
    import subprocess

    shim = short_tmp / "pypath"
    shim.mkdir()
    import arktos_vm_runtime
    (shim / "arktos_vm_runtime").symlink_to(os.path.dirname(arktos_vm_runtime.__file__))
    probe = subprocess.run(
        ["/usr/bin/python3", "-c", "import grpc, google.protobuf as p; "
         "print(grpc.__file__, p.__file__, grpc.__version__, p.__version__)"],
        capture_output=True, text=True, env={"PYTHONPATH": str(shim)}, check=True)
    grpc_file, pb_file, grpc_version, pb_version = probe.stdout.split()
    assert grpc_file.startswith("/usr/lib/python3/dist-packages/"), probe.stdout
    assert pb_file.startswith("/usr/lib/python3/dist-packages/"), probe.stdout
    assert grpc_version.startswith("1.51.") and pb_version.startswith("4.21."), probe.stdout
    d = Daemon(short_tmp, env={"PYTHONPATH": str(shim)})
    d.argv[0] = "/usr/bin/python3"
    d.start()
    try:
        for api in API_VERSIONS:
            pb, _ = APIS[api]
            assert d.runtime(api).Version(pb.VersionRequest(), timeout=5) \
                .runtime_api_version == api
    finally:
        assert d.stop() == 0


def test_a_hostname_that_is_not_one_is_refused_before_anything_is_made(daemon: Daemon) -> None:
    pb, _ = APIS["v1alpha2"]
    cfg = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name="p", uid="u-1", namespace="n"),
        hostname="x</name>\nruncmd: [reboot]")
    with pytest.raises(grpc.RpcError) as e:
        daemon.runtime("v1alpha2").RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "hostname" in e.value.details()
    assert not daemon.runtime("v1alpha2").ListPodSandbox(pb.ListPodSandboxRequest(),
                                                         timeout=10).items
