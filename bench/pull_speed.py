"""Pull speed: PullImage of a --size-mib qcow2 image (random content, so nothing is sparse)
from a loopback HTTP server, beside `curl -o` of the same URL followed by `sha256sum` of the
file (what the runtime does besides: it hashes while it writes, then checks the file with
qemu-img). Runs alternate; before each PullImage the image is removed, so every pull
downloads. The downloads land on the same filesystem either way.

    .venv/bin/python -m bench.pull_speed [--size-mib 1024] [--runs 3]

Prints MB/s (10^6 bytes/s) per run and the median; writes bench/results/pull_speed.json.
Starts no VM. The scratch image, the daemon and its state are removed at the end.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from typing import Any

from bench.fleet import BenchDaemon, cleanup_stack, scratch, write_json
from tests.daemon_proc import APIS
from tests.integration.vmpods import image_server


def make_image(path: Any, size_mib: int) -> None:
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as f:
        subprocess.run(["head", "-c", f"{size_mib}M", "/dev/urandom"], stdout=f, check=True)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)],
                   check=True)
    raw.unlink()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--name", default="pull_speed")
    args = ap.parse_args(argv)
    pb, _ = APIS["v1alpha2"]
    rows: dict[str, list[float]] = {"runtime": [], "curl": [], "curl_only": []}
    with cleanup_stack() as stack:
        tmp = scratch(stack)
        (tmp / "img").mkdir()
        img = tmp / "img" / "big.qcow2"
        make_image(img, args.size_mib)
        size = img.stat().st_size
        host = stack.enter_context(image_server({"big.qcow2": img}))
        url = f"http://{host}/big.qcow2"
        d = BenchDaemon(tmp, libvirt_uri="qemu:///system", notify=False,
                        args=["--image-download-protocol", "http", "--log-level", "warning"])
        stack.callback(d.stop)
        d.start()
        images = d.images("v1alpha2")
        out = tmp / "curl.qcow2"
        print(f"pull of a {size / 2**20:.0f} MiB qcow2 over loopback http, {args.runs} runs "
              "each, alternating", flush=True)
        print(f"  {'run':>4} {'PullImage s':>12} {'MB/s':>7} {'curl+sha256sum s':>17} {'MB/s':>7}"
              f" {'(curl alone s)':>15}", flush=True)
        for i in range(args.runs):
            t0 = time.monotonic()
            ref = images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(
                image=f"{host}/big.qcow2")), timeout=1800).image_ref
            pull = time.monotonic() - t0
            images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=ref)),
                               timeout=300)
            t0 = time.monotonic()
            subprocess.run(["curl", "-sSf", "-o", str(out), url], check=True)
            t1 = time.monotonic()
            subprocess.run(["sha256sum", str(out)], check=True, stdout=subprocess.DEVNULL)
            curl = time.monotonic() - t0
            out.unlink()
            rows["runtime"].append(pull)
            rows["curl"].append(curl)
            rows["curl_only"].append(t1 - t0)
            print(f"  {i + 1:>4} {pull:12.2f} {size / pull / 1e6:7.1f} {curl:17.2f} "
                  f"{size / curl / 1e6:7.1f} {t1 - t0:15.2f}", flush=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    mbs = {k: size / v / 1e6 for k, v in med.items()}
    ratio = mbs["runtime"] / mbs["curl"]
    print(f"  median: PullImage {mbs['runtime']:.1f} MB/s, curl + sha256sum "
          f"{mbs['curl']:.1f} MB/s (curl alone {mbs['curl_only']:.1f}): "
          f"{100 * ratio:.0f} % (target >= 90 %)")
    write_json(args.name, {"size_bytes": size, "runs": args.runs,
                           "seconds": {k: [round(x, 3) for x in v] for k, v in rows.items()},
                           "median_mb_s": {k: round(v, 1) for k, v in mbs.items()},
                           "ratio": round(ratio, 3)})


if __name__ == "__main__":
    main()
