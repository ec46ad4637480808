"""The density plot from bench/results/density.json (bench/density.py): per-pod start time
(RunPodSandbox..StartContainer, and to the guest's marker) against the pod count, with raw
libvirt's per-domain times beside, and the daemon's RSS at each checkpoint. Uses matplotlib
(Debian's python3-matplotlib, which the venv sees; tools/setup installs it), so it is a
command of its own and the benches need none of it.

    .venv/bin/python -m bench.plot_density [bench/results/density.json] [-o FILE.png]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after the backend choice

RESULTS = Path(os.environ.get("AVR_BENCH_RESULTS", Path(__file__).parent / "results"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="?", default=str(RESULTS / "density.json"))
    ap.add_argument("-o", "--out", default=None)
    args = ap.parse_args(argv)
    data = json.loads(Path(args.json).read_text())
    out = Path(args.out) if args.out else Path(args.json).with_suffix(".png")
    rt = data["runtime"]
    base = data.get("baseline") or {}
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    pods = [p["pod"] for p in rt["per_pod"]]
    ax1.plot(pods, [p["api_s"] for p in rt["per_pod"]], ".-", label="runtime: Run..Start (API)")
    up = [(p["pod"], p["up_s"]) for p in rt["per_pod"] if p["up_s"]]
    if up:
        ax1.plot(*zip(*up, strict=True), "x", label="runtime: to guest marker")
    if base.get("per_domain"):
        doms = base["per_domain"]
        ax1.plot([d["domain"] for d in doms], [d["prep_s"] + d["create_s"] for d in doms],
                 ".-", label="raw libvirt: overlay+seed+createXML")
        bup = [(d["domain"], d["up_s"]) for d in doms if d["up_s"]]
        if bup:
            ax1.plot(*zip(*bup, strict=True), "+", label="raw libvirt: to guest marker")
    ax1.set_yscale("log")
    ax1.set_ylabel("start time of the Nth VM, s (log)")
    ax1.legend(fontsize=8)
    ax1.grid(True, which="both", alpha=0.3)
    cps = rt["checkpoints"]
    counts = [0] + [c["pods"] for c in cps] + [0]
    rss = [rt["daemon_start"]["rss_mib"]] + [c["daemon_rss_mib"] for c in cps]
    rss.append(rt["after_removal"]["rss_mib"])
    ax2.plot(counts[:-1], rss[:-1], "o-", label="daemon RSS")
    ax2.plot([counts[-2]], [rss[-1]], "s", label="daemon RSS after all removed")
    ax2.axhline(80, color="grey", linestyle="--", linewidth=0.8, label="target 80 MiB")
    ax2.set_ylabel("daemon RSS, MiB")
    ax2.set_xlabel("running VM pods")
    ax2.legend(fontsize=8)
    ax2.grid(True, alpha=0.3)
    mem = data["config"]["memory"]
    fig.suptitle(f"arktos-vm-runtime density: minimal guest, 1 vCPU, {mem} MiB, TCG, 2 cores")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
