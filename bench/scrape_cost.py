"""The cost of one Prometheus scrape of the runtime at N running VM pods (the minimal
busybox guest, 64 MiB each): wall time of GET /metrics over loopback, the daemon's CPU
time per scrape (from /proc, all its threads), the page's size and series, next to the
one libvirt call it makes (getAllDomainStats, in-process) as the baseline.

    .venv/bin/python -m bench.scrape_cost [--pods 10] [--scrapes 50] [--memory-mib 128]
    .venv/bin/python -m bench.scrape_cost --synthetic [--pods 100]

--synthetic measures the runtime's own share only, in-process and without VMs: the
collectors over the real Stats with a bulk-stats reader returning N running domains (2
disks each) and N one-NIC pods, and prometheus_client's exposition of the page; add
libvirt's getAllDomainStats and one netlink dump per pod for a whole scrape.

Hold the integration lock (flock /tmp/avr-integration.lock ...) when others share the
machine. Prints min/median/p90 in milliseconds and writes
bench/results/scrape_cost-N.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import tempfile
import urllib.request
from pathlib import Path

import libvirt
from prometheus_client.parser import text_string_to_metric_families

from arktos_vm_runtime.adapters.domain_stats import FLAGS, STATS
from bench.fleet import cpu_s
from bench.stats_cost import cleanup, row, start_pods, timed
from tests.daemon_proc import APIS, Daemon
from tests.guest.images import minimal_guest
from tests.integration.test_network_common import PLUGINS, cni_test_network
from tests.integration.vmpods import image_server

RESULTS = Path(__file__).parent / "results"


def synthetic(pods: int, scrapes: int) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from arktos_vm_runtime.adapters.domain_stats import BlockStats, DomainStats
    from arktos_vm_runtime.service.records import RUNNING, SANDBOX_READY, ContainerRecord
    from arktos_vm_runtime.service.records import SandboxRecord as Sb
    from arktos_vm_runtime.service.stats import InterfaceUsage, Stats
    from arktos_vm_runtime.service.vm_metrics import StateCollector, VmCollector

    sbs = [Sb(id=f"sb{i:04}", name=f"pod-{i}", namespace="default", uid=f"sb{i:04}",
              tenant="tenant-a", attempt=0, state=SANDBOX_READY, created_at=1)
           for i in range(pods)]
    cs = [ContainerRecord(id=f"c{i:04}", sandbox_id=f"sb{i:04}", name="vm", attempt=0,
                          state=RUNNING, created_at=1, image="img", image_ref="sha256:x",
                          vm_dir=f"/state/vms/c{i:04}", vcpus=1, memory_mib=64)
          for i in range(pods)]
    disks = tuple(BlockStats(n, f"/d/{n}", 1, 2, 3, 4, 5) for n in ("vda", "hdc"))
    domains = {c.id: DomainStats(c.id, True, 10**9, 2**26, 2**25, blocks=disks) for c in cs}
    stats = Stats(lambda: cs, lambda: sbs, lambda: domains,
                  lambda sid: [InterfaceUsage("eth0", 1, 0, 2, 0)], "/state/vms")
    reg = CollectorRegistry(auto_describe=True)
    reg.register(StateCollector(lambda: sbs, lambda: cs))
    reg.register(VmCollector(stats.list_sandboxes, 500))
    page = generate_latest(reg)
    print(f"synthetic scrape, {pods} pods (runtime's share: collectors + exposition, no "
          f"libvirt or netlink): page {len(page)} bytes", flush=True)
    rows = [row(f"collect + expose, {pods} pods", timed(lambda: generate_latest(reg),
                                                        scrapes))]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"scrape_cost-synthetic-{pods}.json").write_text(json.dumps(
        {"pods": pods, "scrapes": scrapes, "page_bytes": len(page), "rows": rows},
        indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", type=int, default=10)
    ap.add_argument("--scrapes", type=int, default=50)
    ap.add_argument("--memory-mib", type=int, default=128,
                    help="each guest's memory (64 did not boot the minimal guest here)")
    ap.add_argument("--synthetic", action="store_true")
    args = ap.parse_args()
    if args.synthetic:
        synthetic(args.pods, args.scrapes)
        return
    tmp = Path(tempfile.mkdtemp(prefix="avr-bench-", dir="/tmp"))
    tmp.chmod(0o711)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/metrics"
    rows: list[dict[str, float | str]] = []
    extra: dict[str, float] = {}
    problems: list[str] = ["the daemon did not start"]
    try:
        (tmp / "img").mkdir()
        (tmp / "img" / "guest.qcow2").symlink_to(minimal_guest().disk)
        with image_server({"guest.qcow2": tmp / "img" / "guest.qcow2"}) as host, \
                cni_test_network() as net:
            d = Daemon(tmp, libvirt_uri="qemu:///system", cni_dir=net.conf_dir, notify=False,
                       args=["--disable-kvm", "--image-download-protocol", "http",
                             "--cni-bin-dir", str(PLUGINS), "--metrics-port", str(port),
                             "--max-pods", str(max(args.pods, 110))]).start()
            problems = []
            sids: list[str] = []
            try:
                image = f"{host}/guest.qcow2"
                a2, _ = APIS["v1alpha2"]
                d.images("v1alpha2").PullImage(a2.PullImageRequest(
                    image=a2.ImageSpec(image=image)), timeout=600)
                start_pods(d, image, args.pods, sids, args.memory_mib, name="scrape")

                def scrape() -> bytes:
                    with urllib.request.urlopen(url, timeout=60) as r:
                        return bytes(r.read())

                page = scrape().decode()
                series = sum(len(f.samples) for f in text_string_to_metric_families(page))
                vms = {s.labels["container_id"] for f in text_string_to_metric_families(page)
                       if f.name == "arktos_vm_up" for s in f.samples}
                assert len(vms) == args.pods, (len(vms), args.pods)
                print(f"scrape cost, {args.pods} running minimal-guest VM pods "
                      f"({args.memory_mib} MiB), {args.scrapes} scrapes (TCG, 2 cores shared): "
                      f"page {len(page)} bytes, {series} series", flush=True)
                pid = d.proc.pid
                cpu0 = cpu_s(pid)
                rows.append(row(f"GET /metrics, {args.pods} pods", timed(scrape, args.scrapes)))
                cpu = (cpu_s(pid) - cpu0) / (args.scrapes + 3) * 1000
                print(f"  daemon CPU per scrape (all threads, /proc)            {cpu:7.2f} ms",
                      flush=True)
                conn = libvirt.open("qemu:///system")
                try:
                    rows.append(row("baseline: libvirt getAllDomainStats (one call)", timed(
                        lambda: conn.getAllDomainStats(STATS, FLAGS), args.scrapes)))
                finally:
                    conn.close()
                extra = {"page_bytes": len(page), "series": series,
                         "daemon_cpu_ms_per_scrape": round(cpu, 3)}
            finally:
                problems = cleanup(d, sids)
    finally:
        if problems:
            print(f"cleanup problems (kept {tmp}): {problems}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"scrape_cost-{args.pods}.json").write_text(json.dumps(
        {"pods": args.pods, "scrapes": args.scrapes, "memory_mib": args.memory_mib,
         "rows": rows, **extra}, indent=2) + "\n")


if __name__ == "__main__":
    main()
