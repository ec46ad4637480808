"""NIC setup and teardown through the network adapters the pod network calls, next to the
same steps as plain `ip` commands (the baseline), in namespaces this bench makes and removes.

    .venv/bin/python -m bench.nic_setup [--runs 30] [--json bench/results/nic_setup.json]

One run is one pod NIC's life, the calls runtime/service/network.py makes:
  create       netns.create(ns)                      RunPodSandbox, before CNI ADD
  (untimed)    a veth `eth0` in ns with an address and routes: what the CNI bridge plugin leaves
  wire         vmnet.wire(ns, "eth0", ...)           bridge, MAC and addresses moved, make_tap
  (untimed)    the tap opened with TUNSETIFF, as QEMU does
  move         vmnet.move_opened_taps(ns, [port])    StartContainer, after the domain starts
  (untimed)    the tap closed, as when the VM stops
  ensure_taps  vmnet.ensure_taps(ns, [port])         StartContainer of a restarted VM: the
                                                     closed tap deleted in ns, make_tap again
  unwire       vmnet.unwire(ns, port)                taps and bridge deleted (NIC hot-unplug)
  (untimed)    the veth deleted, as CNI DEL does
  delete       netns.delete(ns)                      RemovePodSandbox, after CNI DEL
Prints min/median/p99 ms per phase and the processes forked and threads started per run
(counted in this process); writes the raw figures as JSON. Needs root.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import platform
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from arktos_vm_runtime.adapters import netns, vmnet

PHASES = ("create", "wire", "move", "ensure_taps", "unwire", "delete")
SERVER = "169.254.253.1"
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000


# --- counting forks and threads in this process ------------------------------------------

class Counter:
    def __init__(self) -> None:
        self.forks = 0
        self.threads = 0

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        popen = subprocess.Popen._execute_child  # type: ignore[attr-defined]
        fork = os.fork
        start = threading.Thread.start
        counter = self

        def counted_popen(*a: Any, **k: Any) -> Any:
            counter.forks += 1
            return popen(*a, **k)

        def counted_fork() -> int:
            counter.forks += 1
            return fork()

        def counted_start(thread: threading.Thread) -> None:
            counter.threads += 1
            start(thread)

        subprocess.Popen._execute_child = counted_popen  # type: ignore[attr-defined]
        os.fork = counted_fork
        threading.Thread.start = counted_start  # type: ignore[method-assign, assignment]
        try:
            yield
        finally:
            subprocess.Popen._execute_child = popen  # type: ignore[attr-defined]
            os.fork = fork
            threading.Thread.start = start  # type: ignore[method-assign]


COUNT = Counter()


def sh(*argv: str, check: bool = True) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if check and r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {r.stderr.strip()}")


def shj(*argv: str) -> Any:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    return json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else None


# --- the untimed parts: what CNI and QEMU do ------------------------------------------------

def cni_like(ns: str, host_end: str) -> None:
    """What the bridge plugin leaves in the pod namespace: eth0 with an address and routes."""
    sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
    sh("ip", "link", "set", host_end, "up")
    sh("ip", "-n", ns, "addr", "add", "10.89.0.2/24", "dev", "eth0")
    sh("ip", "-n", ns, "link", "set", "eth0", "up")
    sh("ip", "-n", ns, "route", "add", "default", "via", "10.89.0.1", "dev", "eth0")
    sh("ip", "-n", ns, "route", "add", "10.90.0.0/16", "via", "10.89.0.1", "dev", "eth0")


def cni_del(ns: str) -> None:
    """CNI DEL before the namespace goes: the veth, both ends at once."""
    sh("ip", "-n", ns, "link", "delete", "dev", "eth0")


def open_tap(tap: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", tap.encode(), IFF_TAP | IFF_NO_PI))
    wait_carrier(tap)
    return fd


def wait_carrier(tap: str, ns: str | None = None) -> None:
    """The kernel marks a tap running as soon as it is opened; check anyway."""
    pre = ["ip", "-n", ns] if ns else ["ip"]
    for _ in range(100):
        info = shj(*pre, "-j", "link", "show", "dev", tap)
        if info and "NO-CARRIER" not in info[0].get("flags", []):
            return
        time.sleep(0.01)
    raise SystemExit(f"tap {tap} has no carrier after being opened")


# --- one NIC's life, two ways -------------------------------------------------------------

Step = Callable[[], None]


def adapter_steps(ns: str, sid: str, host_end: str) -> list[tuple[str, Step]]:
    port: list[vmnet.Port] = []
    fd: list[int] = []
    tap = vmnet.tap_name(sid, 0)
    return [
        ("create", lambda: netns.create(ns)),
        ("", lambda: cni_like(ns, host_end)),
        ("wire", lambda: port.append(vmnet.wire(ns, "eth0", sid, 0, SERVER))),
        ("", lambda: fd.append(open_tap(tap))),
        ("move", lambda: _expect(vmnet.move_opened_taps(ns, port), [tap])),
        ("", lambda: os.close(fd.pop())),
        ("ensure_taps", lambda: vmnet.ensure_taps(ns, port)),
        ("unwire", lambda: vmnet.unwire(ns, port[0])),
        ("", lambda: cni_del(ns)),
        ("delete", lambda: netns.delete(ns)),
    ]


def _expect(got: object, want: object) -> None:
    if got != want:
        raise SystemExit(f"expected {want}, got {got}")


def ip_steps(ns: str, sid: str, host_end: str) -> list[tuple[str, Step]]:
    """The same steps as iproute2 commands, as the `ip`-based adapters ran them."""
    tap = vmnet.tap_name(sid, 0)
    br = vmnet.bridge_name(0)
    fd: list[int] = []

    def ipn(*a: str, check: bool = True) -> None:
        sh("ip", "-n", ns, *a, check=check)

    def create() -> None:
        sh("ip", "netns", "add", ns)
        ipn("link", "set", "lo", "up")

    def make_tap() -> None:
        sh("ip", "-j", "-d", "link", "show", "dev", tap, check=False)
        sh("ip", "tuntap", "add", "dev", tap, "mode", "tap")
        sh("ip", "link", "set", "dev", tap, "addrgenmode", "none")
        sh("ip", "link", "set", "dev", tap, "mtu", "1500", "up")

    def wire() -> None:
        shj("ip", "-n", ns, "-j", "-d", "link", "show", "dev", "eth0")
        shj("ip", "-n", ns, "-j", "addr", "show", "dev", "eth0")
        shj("ip", "-n", ns, "-j", "-4", "route", "show", "dev", "eth0")
        shj("ip", "-n", ns, "-j", "-6", "route", "show", "dev", "eth0")
        ipn("-j", "-d", "link", "show", "dev", br, check=False)
        ipn("link", "add", br, "type", "bridge")
        ipn("link", "set", "dev", br, "addrgenmode", "none")
        ipn("link", "set", "dev", "eth0", "addrgenmode", "none")
        ipn("link", "set", "dev", br, "address", vmnet.random_mac(), "mtu", "1500")
        ipn("addr", "flush", "dev", "eth0")
        ipn("link", "set", "dev", "eth0", "down")
        ipn("link", "set", "dev", "eth0", "address", vmnet.random_mac())
        ipn("link", "set", "dev", "eth0", "master", br, "up")
        ipn("addr", "add", f"{SERVER}/32", "dev", br)
        ipn("link", "set", "dev", br, "up")
        make_tap()

    def move() -> None:
        sh("ip", "-j", "-d", "link", "show", "dev", tap)
        sh("ip", "link", "set", "dev", tap, "netns", ns)
        ipn("link", "set", "dev", tap, "addrgenmode", "none")
        ipn("link", "set", "dev", tap, "master", br, "mtu", "1500", "up")

    def ensure_taps() -> None:
        ipn("-j", "-d", "link", "show", "dev", tap)
        ipn("link", "delete", "dev", tap)
        make_tap()

    def unwire() -> None:
        sh("ip", "link", "delete", "dev", tap)
        ipn("link", "delete", "dev", tap, check=False)
        ipn("link", "delete", "dev", br)

    return [
        ("create", create),
        ("", lambda: cni_like(ns, host_end)),
        ("wire", wire),
        ("", lambda: fd.append(open_tap(tap))),
        ("move", move),
        ("", lambda: os.close(fd.pop())),
        ("ensure_taps", ensure_taps),
        ("unwire", unwire),
        ("", lambda: cni_del(ns)),
        ("delete", lambda: sh("ip", "netns", "delete", ns)),
    ]


def one_run(steps: list[tuple[str, Step]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for phase, step in steps:
        forks, threads = COUNT.forks, COUNT.threads
        t0 = time.perf_counter()
        step()
        ms = (time.perf_counter() - t0) * 1000
        if phase:
            out[phase] = {"ms": ms, "forks": COUNT.forks - forks,
                          "threads": COUNT.threads - threads}
    return out


# --- names, cleanup, figures --------------------------------------------------------------

class Names:
    """Every name this bench makes, so that it removes exactly those and nothing else."""

    def __init__(self) -> None:
        self.tag = f"{os.getpid():x}"[-5:]
        self.made: list[tuple[str, str, str]] = []  # (ns, sandbox id, host veth end)

    def new(self, mode: str, i: int) -> tuple[str, str, str]:
        names = (f"nicbench-{self.tag}-{mode}{i}", f"nicbench{self.tag}{mode}{i}",
                 f"nb{self.tag}{mode[0]}{i:x}"[:15])
        self.made.append(names)
        return names

    def cleanup(self) -> list[str]:
        """Removes whatever is left; returns what was left (nothing after a clean run)."""
        left = []
        for ns, sid, host_end in self.made:
            tap = vmnet.tap_name(sid, 0)
            for kind, name, argv in (
                    ("netns", ns, ["ip", "netns", "delete", ns]),
                    ("link", tap, ["ip", "link", "delete", "dev", tap]),
                    ("link", host_end, ["ip", "link", "delete", "dev", host_end])):
                present = (Path("/run/netns", name).exists() if kind == "netns"
                           else Path("/sys/class/net", name).exists())
                if present:
                    left.append(name)
                    sh(*argv, check=False)
        return left


def pctl(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def summarize(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for phase in (*PHASES, "total"):
        if phase == "total":
            ms = [sum(r[p]["ms"] for p in PHASES) for r in runs]
            forks = [sum(r[p]["forks"] for p in PHASES) for r in runs]
            threads = [sum(r[p]["threads"] for p in PHASES) for r in runs]
        else:
            ms = [r[phase]["ms"] for r in runs]
            forks = [r[phase]["forks"] for r in runs]
            threads = [r[phase]["threads"] for r in runs]
        table[phase] = {"min": min(ms), "median": statistics.median(ms), "p99": pctl(ms, 0.99),
                        "forks": statistics.median(forks), "threads": statistics.median(threads)}
    return table


def render(title: str, table: dict[str, dict[str, float]]) -> str:
    lines = [title,
             f"  {'phase':<12} {'min ms':>8} {'median ms':>10} {'p99 ms':>8} {'forks':>6} "
             f"{'threads':>8}"]
    for phase, row in table.items():
        lines.append(f"  {phase:<12} {row['min']:8.2f} {row['median']:10.2f} {row['p99']:8.2f} "
                     f"{row['forks']:6.0f} {row['threads']:8.0f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--json", type=Path, default=Path("bench/results/nic_setup.json"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root: network namespaces, bridges, taps")
    names = Names()
    results: dict[str, list[dict[str, dict[str, float]]]] = {"adapters": [], "ip": []}
    makers = {"adapters": adapter_steps, "ip": ip_steps}
    try:
        with COUNT.installed():
            # one unrecorded run each warms imports and caches; then the modes alternate
            for i in range(args.runs + 1):
                for mode, make in makers.items():
                    run = one_run(make(*names.new(mode[0], i)))
                    if i:
                        results[mode].append(run)
    finally:
        left = names.cleanup()
    if left:
        raise SystemExit(f"the bench left {left} behind (removed now)")
    tables = {mode: summarize(runs) for mode, runs in results.items()}
    head = (f"NIC setup and teardown, {args.runs} runs per mode, one NIC each "
            f"({platform.node()}, kernel {platform.release()}, {os.cpu_count()} CPUs)")
    print(head)
    print(render("arktos-vm-runtime adapters (runtime/adapters/netns.py, vmnet.py)",
                 tables["adapters"]))
    print(render("baseline: the same steps as plain `ip` commands", tables["ip"]))
    print("forks/threads: started in this process per run (median); left behind: nothing")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"runs": args.runs, "python": sys.version.split()[0],
                                     "tables": tables, "raw": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
