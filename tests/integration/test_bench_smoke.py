"""The scale benches (issue 13) at tiny sizes, so they keep working: each runs as its
documented command (`python -m bench.NAME`), with its baseline, and writes its JSON. The
figures are not judged (benches, never timed assertions), only that every part ran: pods up
and answering ping, both API versions relisted, the baselines' domains up, no error; and
that nothing a bench made is left behind, also after a Ctrl-C in the middle of a run.
About 3 minutes on the 2-core TCG machine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from arktos_vm_runtime.adapters import vmnet
from tests.integration.test_network_common import (
    MADE_LOG,
    link_names,
    netns_names,
    require_root_tools,
)
from tests.integration.vmpods import domain_names, require_libvirtd

TOP = Path(__file__).resolve().parents[2]


class Bench:
    def __init__(self, root: Path) -> None:
        # short: libvirt refuses a unix socket path (the VM's agent.sock) past 107 bytes
        self.scratch = root / "s"
        self.results = root / "r"
        self.made_log = root / "made"
        self.scratch.mkdir()
        self.scratch.chmod(0o755)  # QEMU's user reaches the disks below
        self.env = dict(os.environ, AVR_BENCH_TMP=str(self.scratch),
                        AVR_BENCH_RESULTS=str(self.results), **{MADE_LOG: str(self.made_log)})

    def popen(self, name: str, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", f"bench.{name}", *args], cwd=TOP,
                                env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    def run(self, name: str, *args: str, timeout: float = 240) -> str:
        p = self.popen(name, *args)
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out
        return out

    def json(self, name: str) -> Any:
        return json.loads((self.results / f"{name}.json").read_text())


def left_behind(root: Path, made_log: Path) -> list[str]:
    """What the benches run by this test made and did not remove: the namespaces, links
    and pod namespaces and taps their helpers noted in `made_log` (MADE_LOG), and the
    domains whose disks are under `root`. Another runtime instance on the host is not
    counted."""
    made = [line.split(" ", 1) for line in made_log.read_text().splitlines()] \
        if made_log.exists() else []
    uids = {n for k, n in made if k == "uid"}
    netns = {n for k, n in made if k == "netns"} | {f"avr-{u}" for u in uids}
    links = {n for k, n in made if k == "link"}
    taps = tuple(vmnet.tap_name(u, 0)[:-1] for u in uids)
    left = [f"netns {n}" for n in sorted(netns_names() & netns)]
    left += [f"link {n}" for n in sorted(link_names())
             if n in links or (taps and n.startswith(taps))]
    for name in domain_names():
        xml = subprocess.run(["virsh", "-c", "qemu:///system", "dumpxml", name],
                             capture_output=True, text=True).stdout  # gone meanwhile: ""
        if str(root) in xml:
            left.append(f"domain {name}")
    return left


@pytest.fixture
def bench() -> Iterator[Bench]:
    require_libvirtd()
    require_root_tools()
    root = Path(tempfile.mkdtemp(prefix="avs-", dir="/tmp"))
    root.chmod(0o755)
    b = Bench(root)
    try:
        yield b
        left = left_behind(root, b.made_log)
        assert not left, f"left behind: {left}"
        assert not list(b.scratch.iterdir()), f"scratch left: {list(b.scratch.iterdir())}"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_density_relist_and_the_plot(bench: Bench) -> None:
    out = bench.run("density", "--pods", "2", "--checkpoints", "1", "--relist-rounds", "10",
                    "--status-rounds", "1", "--cpu-seconds", "1", "--boot-timeout", "300")
    assert "summary, 2 pods" in out, out
    d = bench.json("density")
    rt, base = d["runtime"], d["baseline"]
    assert rt["stopped"] is None, rt["stopped"]
    assert [p["pod"] for p in rt["per_pod"]] == [1, 2]
    assert all(p["up_s"] > p["api_s"] > 0 for p in rt["per_pod"]), rt["per_pod"]
    assert [c["pods"] for c in rt["checkpoints"]] == [1, 2]
    for c in rt["checkpoints"]:
        assert c["not_up"] == [] and c["ping_failed"] == [], c
        assert c["qemu_rss_mib"]["n"] == c["pods"] and c["daemon_fds"] > 0, c
    assert rt["after_removal"]["problems"] == []
    # no fd growth: every pod's descriptors are closed with it
    assert rt["after_removal"]["fds"] <= rt["daemon_start"]["fds"] + 1, rt
    assert [x["domain"] for x in base["per_domain"]] == [1, 2]
    assert all(x["up_s"] > 0 for x in base["per_domain"]), base
    rel = bench.json("relist")
    for cp, n in zip(rel["checkpoints"], (1, 2), strict=True):
        assert cp["pods"] == n
        for api in ("v1alpha2", "v1"):
            assert cp[api]["pair_ms"]["n"] == 10 and cp[api]["container_status_ms"]["n"] == n
            assert cp[api]["pod_sandbox_status_ms"]["n"] == n
        assert cp["listAllDomains_ms"]["n"] == 10
    assert_cpu_figures(rel["cpu"], 2)
    png = bench.results / "density.png"
    bench.run("plot_density", str(bench.results / "density.json"), "-o", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def assert_cpu_figures(cpu: dict[str, Any], pods: int) -> None:
    """The daemon and the bare replay server were each measured under every load."""
    assert cpu["pods"] == pods, cpu
    for side in ("", "bare_"):
        for load in ("idle", "pair", "arktos", "statuses"):
            assert cpu[f"{side}{load}_cpu_pct"] >= 0, cpu


def test_relist_alone_on_defined_vms(bench: Bench) -> None:
    out = bench.run("relist", "--pods", "2", "--relist-rounds", "5", "--status-rounds", "1",
                    "--cpu-seconds", "1")
    assert "VMs defined, not started" in out, out
    d = bench.json("relist-defined")
    assert d["measure"]["pods"] == 2 and d["measure"]["v1"]["container_status_ms"]["n"] == 2
    assert_cpu_figures(d["cpu"], 2)
    assert d["daemon_rss_mib"] > 0


def test_parallel_start(bench: Bench) -> None:
    out = bench.run("parallel_start", "--pods", "2", "--boot-timeout", "300")
    assert "ratio runtime/raw" in out, out
    d = bench.json("parallel_start")
    for side in ("runtime", "baseline"):
        r = d[side]
        assert r["errors"] == [] and r["not_up"] == 0, r
        assert r["per_pod_s"]["n"] == 2 and r["per_pod_up_s"]["n"] == 2, r
        assert r["wall_up_s"] >= r["wall_running_s"] > 0, r


def test_pull_speed(bench: Bench) -> None:
    bench.run("pull_speed", "--size-mib", "64", "--runs", "1")
    d = bench.json("pull_speed")
    assert d["size_bytes"] > 64 * 2**20  # random content: nothing sparse
    assert all(v > 0 for v in d["median_mb_s"].values()), d


def test_cold_start(bench: Bench) -> None:
    bench.run("cold_start", "--runs", "1", "--warm-calls", "10")
    d = bench.json("cold_start")
    assert d["cold"]["n"] == 1 and d["warm"]["n"] == 10
    assert d["cold"]["p50"] > d["warm"]["p50"] > 0, d
    assert any(r["module"].startswith("arktos_vm_runtime") for r in d["imports"]), d


def test_call_cost(bench: Bench) -> None:
    out = bench.run("call_cost", "--calls", "250", "--load", "1", "--profile-calls", "500")
    d = bench.json("call_cost")
    for mode in ("quiet", "loaded"):
        assert d[mode]["daemon: Version"]["n"] == 250 and d[mode]["ratio_vs_aio"] > 0, d
    # py-spy (constraints.txt) sampled the daemon: its serving loop is in the stacks
    assert d["profile"] and d["profile"]["samples"] > 0, out
    assert any("serve" in r["frame"] for r in d["profile"]["inclusive"]), d["profile"]


def test_density_interrupted_removes_what_it_made(bench: Bench) -> None:
    """Ctrl-C while pods start: the bench removes the pods, the daemon, the network and
    its files (the fixture checks the host), and exits."""
    p = bench.popen("density", "--pods", "4", "--skip-baseline", "--boot-timeout", "300")
    assert p.stdout is not None
    deadline = time.monotonic() + 120
    seen = ""
    while "api s" not in seen:  # the table's head: the daemon runs, pods start
        assert time.monotonic() < deadline and p.poll() is None, seen
        seen += p.stdout.readline()
    time.sleep(3)
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=180)
    assert p.returncode != 0 and "KeyboardInterrupt" in out, seen + out
    assert not (bench.results / "density.json").exists()
