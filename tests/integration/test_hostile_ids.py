"""Issue 9 item 3 over the real daemon socket: ids a tenant makes up cost the daemon nothing.

On main, 300 CreateContainer calls with new 1 MiB pod_sandbox_ids grew the daemon by
334 MB for good (a lock keyed by each id), the client got RESOURCE_EXHAUSTED (the whole id
echoed into the status trailer) and each call logged 1 MiB. Now every such call answers
INVALID_ARGUMENT or NOT_FOUND with a short message, before any lock, lookup or log line.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc

from tests.daemon_proc import APIS, Daemon, open_fds, rss_kb

MIB = 1 << 20
CALLS = 300
WARMUP = 20
SHORT = 400  # characters of an error message
# What the daemon may grow by over 300 rounds (3000 requests, 3 GB received) after 20 of
# warm-up. Measured here: +2 to +4 MB (the allocator's reuse of freed request buffers;
# over 800 rounds RSS stays within 2 MB of 85 MB). Keeping the ids alone cost 334 MB on
# main; a handler frame that kept each request until the garbage collector ran, 38 MB.
# 16 MB fails both and leaves four times the measured noise.
RSS_BOUND_KB = 16 * 1024
LONGEST_LOG_LINE = 4096


def _calls(daemon: Daemon) -> list[tuple[str, Callable[[str], Any]]]:
    """One call of each kind the issue names, for an id; both API versions."""
    out: list[tuple[str, Callable[[str], Any]]] = []
    for api in ("v1alpha2", "v1"):
        pb, _ = APIS[api]
        rt = daemon.runtime(api)
        config = pb.ContainerConfig(metadata=pb.ContainerMetadata(name="vm"),
                                    image=pb.ImageSpec(image="img"))
        out += [
            (f"{api} CreateContainer", lambda i, rt=rt, pb=pb, config=config:
             rt.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=i, config=config),
                                timeout=30)),
            (f"{api} StopPodSandbox", lambda i, rt=rt, pb=pb:
             rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=i), timeout=30)),
            (f"{api} ContainerStatus", lambda i, rt=rt, pb=pb:
             rt.ContainerStatus(pb.ContainerStatusRequest(container_id=i), timeout=30)),
            (f"{api} RemoveContainer", lambda i, rt=rt, pb=pb:
             rt.RemoveContainer(pb.RemoveContainerRequest(container_id=i), timeout=30)),
        ]
    pb, _ = APIS["v1alpha2"]
    rt = daemon.runtime("v1alpha2")
    nic = pb.NicSpec(Name="eth1")
    out += [
        ("AttachNetworkInterface", lambda i: rt.AttachNetworkInterface(
            pb.DeviceAttachDetachRequest(PodSandboxID=i, Nic=nic), timeout=30)),
        ("DetachNetworkInterface", lambda i: rt.DetachNetworkInterface(
            pb.DeviceAttachDetachRequest(PodSandboxID=i, Nic=nic), timeout=30)),
    ]
    return out


def _round(calls: list[tuple[str, Callable[[str], Any]]], n: int, start: int, size: int,
           answers: dict[str, set[str]]) -> None:
    for i in range(start, start + n):
        ident = f"{i:08d}" + "x" * (size - 8)
        for name, call in calls:
            try:
                call(ident)
                answers.setdefault(name, set()).add("OK")
            except grpc.RpcError as e:
                assert len(e.details() or "") < SHORT, (name, e.code(), len(e.details()))
                answers.setdefault(name, set()).add(e.code().name)


def test_made_up_ids_cost_no_memory_no_fds_and_no_long_log_lines(daemon: Daemon) -> None:
    assert daemon.proc is not None
    pid = daemon.proc.pid
    calls = _calls(daemon)
    answers: dict[str, set[str]] = {}
    _round(calls, WARMUP, 0, MIB, answers)  # the server's threads and buffers exist
    time.sleep(0.5)
    rss, fds = rss_kb(pid), open_fds(pid)
    started = time.monotonic()
    _round(calls, CALLS, WARMUP, MIB, answers)
    took = time.monotonic() - started
    time.sleep(0.5)
    grown, fds_after = rss_kb(pid) - rss, open_fds(pid)
    print(f"{CALLS} rounds of {len(calls)} calls with 1 MiB ids in {took:.1f} s: "
          f"RSS {rss} kB -> +{grown} kB, fds {fds} -> {fds_after}")
    assert all(a == {"INVALID_ARGUMENT"} for a in answers.values()), answers
    assert grown < RSS_BOUND_KB, f"the daemon grew by {grown} kB"
    assert fds_after <= fds, f"open fds {fds} -> {fds_after}"

    # ids of an allowed size reach the service layer: NOT_FOUND (or OK for Stop and
    # Remove, which the CRI makes succeed for what is gone), short, and nothing kept
    answers = {}
    rss = rss_kb(pid)
    _round(calls, CALLS, 0, 128, answers)
    assert answers["v1 CreateContainer"] == {"NOT_FOUND"}, answers
    assert answers["v1alpha2 ContainerStatus"] == {"NOT_FOUND"}, answers
    assert answers["AttachNetworkInterface"] == {"NOT_FOUND"}, answers
    assert answers["v1 StopPodSandbox"] == {"OK"} and answers["v1 RemoveContainer"] == {"OK"}
    assert rss_kb(pid) - rss < RSS_BOUND_KB
    assert open_fds(pid) <= fds

    r = daemon.runtime("v1").Version(APIS["v1"][0].VersionRequest(), timeout=5)
    assert r.runtime_api_version == "v1", "still serving"
    longest = max(map(len, daemon.output().splitlines()), default=0)
    assert longest <= LONGEST_LOG_LINE, f"a log line of {longest} characters"
