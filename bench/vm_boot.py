"""Time from RunPodSandbox to the guest's first console line and to its marker line,
through the runtime's socket (pod network by the real bridge + host-local CNI plugins),
next to raw libvirt booting the same guest (bench/baseline_raw_libvirt.py: same TCG domain
shape, 2 vCPUs, 512 MiB).

    .venv/bin/python -m bench.vm_boot {minimal,cloud} [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics

from bench import baseline_raw_libvirt
from bench.pods import bench_daemon, marker_annotations, timed_pod


def stats(name: str, values: list[float]) -> str:
    return (f"  {name:<28} min {min(values):6.1f}  median {statistics.median(values):6.1f}  "
            f"max {max(values):6.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["minimal", "cloud"])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with bench_daemon(args.kind) as b:
        runs = [timed_pod(b.d, b.image, args.kind, f"bench-{i}", marker_annotations(args.kind))
                for i in range(args.runs)]
        size_mib = b.disk.stat().st_size / 2**20
    print(f"arktos-vm-runtime, {args.kind} guest, {args.runs} runs "
          f"(PullImage of {size_mib:.0f} MiB over loopback: {b.pull_s:.1f} s)")
    print(stats("RunPodSandbox..Start done", [r.started for r in runs]))
    print(stats("..first console line", [r.first_line for r in runs]))
    print(stats("..marker line", [r.marker for r in runs]))
    print(f"baseline: raw libvirt, same guest, {args.runs} runs")
    baseline_raw_libvirt.main([args.kind, "--runs", str(args.runs)])


if __name__ == "__main__":
    main()
