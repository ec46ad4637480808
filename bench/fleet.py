"""Shared pieces of the scale benches (density, parallel_start, pull_speed): VM pods through
the runtime's socket, the same guest as raw libvirt-python domains, process figures, the
tables and the JSON, and a cleanup that runs even on Ctrl-C or SIGTERM.

Everything a bench makes is registered on an ExitStack as soon as it exists; SIGTERM is
turned into KeyboardInterrupt, and SIGINT/SIGTERM are ignored while the stack unwinds, so a
second Ctrl-C cannot cut the cleanup short. The daemon runs in its own session, so a Ctrl-C
at the terminal reaches the bench only (the bench stops the daemon after removing the pods).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt

from bench.baseline_raw_libvirt import domain_xml, ensure_libvirtd, make_seed
from tests.daemon_proc import APIS, Daemon
from tests.guest.images import minimal_guest
from tests.integration.test_network_common import PLUGINS, CniTestNet, cni_test_network
from tests.integration.vmpods import container_config, image_server, log_text, sandbox_config

MARKER = "MINIMAL-GUEST-UP"
#: Where the JSON goes, and the scratch parent (reachable by QEMU's user): the smoke test
#: points both elsewhere.
RESULTS = Path(os.environ.get("AVR_BENCH_RESULTS", Path(__file__).parent / "results"))
SCRATCH = os.environ.get("AVR_BENCH_TMP")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- signals, lock, cleanup ---------------------------------------------------------------

def _term(_sig: int, _frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def cleanup_stack() -> Iterator[contextlib.ExitStack]:
    """An ExitStack whose unwinding (normal, error, Ctrl-C, SIGTERM) is not interrupted."""
    old = signal.signal(signal.SIGTERM, _term)
    stack = contextlib.ExitStack()
    try:
        with stack:
            try:
                yield stack
            finally:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def maybe_lock(path: str | None) -> Iterator[None]:
    """Holds the integration lock (flock) for one phase, when a path is given."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def scratch(stack: contextlib.ExitStack, prefix: str = "avr-bench-") -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=SCRATCH or "/tmp"))
    tmp.chmod(0o711)  # QEMU (libvirt-qemu) reaches the disks below
    stack.callback(shutil.rmtree, tmp, ignore_errors=True)
    return tmp


# --- figures -------------------------------------------------------------------------------

def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_s(pid: int) -> float:
    """utime + stime of a process, seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def host_cpu_s() -> float:
    """CPU seconds the whole host has spent busy (every CPU, all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


def qemu_pid(domain: str) -> int | None:
    try:
        return int(Path(f"/run/libvirt/qemu/{domain}.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)
    p99 = s[min(len(s) - 1, round(0.99 * (len(s) - 1)))]
    return {"n": len(s), "min": round(s[0], 3), "p50": round(statistics.median(s), 3),
            "p99": round(p99, 3), "max": round(s[-1], 3)}


def fmt(name: str, values: list[float], unit: str, width: int = 46) -> str:
    s = summary(values)
    if not s:
        return f"  {name:<{width}} (none)"
    return (f"  {name:<{width}} n {s['n']:5.0f}  p50 {s['p50']:8.2f}  p99 {s['p99']:8.2f}  "
            f"max {s['max']:8.2f} {unit}")


def write_json(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


# --- the runtime's pods ----------------------------------------------------------------------

class BenchDaemon(Daemon):
    """The test daemon, started in its own session (a terminal's Ctrl-C is the bench's)."""

    def start(self, wait: bool = True, timeout: float = 20.0) -> BenchDaemon:
        self._logf = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self._logf,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        if wait:
            self.wait_ready(timeout)
        return self


@dataclass
class Pod:
    i: int
    sid: str
    cid: str
    log: Path
    t0: float
    api_s: float  # RunPodSandbox + CreateContainer + StartContainer
    up_s: float = 0.0  # to MINIMAL-GUEST-UP in the pod's log (0: not yet)
    #: the three calls' own seconds (their sum is api_s)
    run_s: float = 0.0
    create_s: float = 0.0
    start_s: float = 0.0


@dataclass
class RuntimeFleet:
    """One daemon (real libvirtd, TCG, the test CNI network) and the pods it started."""

    d: BenchDaemon
    net: CniTestNet
    image: str
    memory_mib: int
    pods: list[Pod] = field(default_factory=list)
    sids: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start_pod(self, i: int, api: str = "v1alpha2", start: bool = True) -> Pod:
        """RunPodSandbox, CreateContainer and (unless not `start`) StartContainer."""
        pb, _ = APIS[api]
        rt = self.d.runtime(api)
        log_dir = self.d.pod_logs / f"pod{i}"
        cfg = sandbox_config(pb, log_dir, name=f"bench-{i}")
        t0 = time.monotonic()
        sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=300).pod_sandbox_id
        t1 = time.monotonic()
        with self.lock:
            self.sids.append(sid)
        cid = rt.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=sid, sandbox_config=cfg,
            config=container_config(pb, self.image, memory_mib=self.memory_mib)),
            timeout=300).container_id
        t2 = time.monotonic()
        if start:
            rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=300)
        t3 = time.monotonic()
        pod = Pod(i, sid, cid, log_dir / "vm" / "0.log", t0, t3 - t0, run_s=t1 - t0,
                  create_s=t2 - t1, start_s=t3 - t2)
        with self.lock:
            self.pods.append(pod)
        return pod

    def start_sandbox(self, i: int, api: str = "v1alpha2") -> float:
        """RunPodSandbox alone (namespace, CNI, DHCP server; no VM): its seconds."""
        pb, _ = APIS[api]
        cfg = sandbox_config(pb, self.d.pod_logs / f"sb{i}", name=f"bench-sb-{i}")
        t0 = time.monotonic()
        sid = self.d.runtime(api).RunPodSandbox(pb.RunPodSandboxRequest(config=cfg),
                                                timeout=300).pod_sandbox_id
        with self.lock:
            self.sids.append(sid)
        return time.monotonic() - t0

    def pod_ip(self, sid: str) -> str:
        pb, _ = APIS["v1alpha2"]
        st = self.d.runtime("v1alpha2").PodSandboxStatus(
            pb.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=30).status
        return str(st.network.ip)

    def cleanup(self, stop_daemon: bool = True) -> list[str]:
        """Removes every pod (VMs destroyed at once: StopContainer timeout 0), stops the
        daemon; returns what went wrong instead of raising."""
        pb, _ = APIS["v1alpha2"]
        problems: list[str] = []
        if self.d.proc is None or self.d.proc.poll() is not None:
            return [f"the daemon is not running (pods left: {len(self.sids)})"] \
                if self.sids else []
        rt = self.d.runtime("v1alpha2")
        for sid in self.sids:
            try:
                for c in rt.ListContainers(pb.ListContainersRequest(filter=pb.ContainerFilter(
                        pod_sandbox_id=sid)), timeout=60).containers:
                    rt.StopContainer(pb.StopContainerRequest(container_id=c.id, timeout=0),
                                     timeout=300)
                rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=300)
                rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid),
                                    timeout=300)
            except Exception as e:  # reported; the other pods still go
                problems.append(f"{sid}: {e!r}"[:300])
        self.sids.clear()
        if stop_daemon and self.d.stop(60) != 0:
            problems.append("the daemon exited with an error")
        return problems


def runtime_fleet(stack: contextlib.ExitStack, tmp: Path, memory_mib: int,
                  max_pods: int, cni_record: bool = True) -> RuntimeFleet:
    """Serves the minimal guest over loopback, makes the test CNI network, starts the
    daemon and pulls the image; all of it undone by `stack`. `cni_record`: the network's
    plugins are bridge + host-local followed by the tests' recording plugin (a Python
    script); without it, bridge + host-local alone, as on a node."""
    (tmp / "img").mkdir()
    (tmp / "img" / "guest.qcow2").symlink_to(minimal_guest().disk)
    host = stack.enter_context(image_server({"guest.qcow2": tmp / "img" / "guest.qcow2"}))
    net = stack.enter_context(cni_test_network())
    if not cni_record:
        net.conflist(record=False)
    d = BenchDaemon(tmp, libvirt_uri="qemu:///system", cni_dir=net.conf_dir, notify=False,
                    args=["--disable-kvm", "--image-download-protocol", "http",
                          "--cni-bin-dir", str(PLUGINS), "--max-pods", str(max(max_pods, 110)),
                          "--log-level", "warning"])
    fleet = RuntimeFleet(d, net, f"{host}/guest.qcow2", memory_mib)

    def undo() -> None:
        problems = fleet.cleanup()
        if problems:
            print(f"cleanup problems (daemon log {d.log}): {problems}", flush=True)
            stack.pop_all()  # keep the scratch directory for a look
    stack.callback(undo)
    d.start()
    pb, _ = APIS["v1alpha2"]
    d.images("v1alpha2").PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=fleet.image)),
                                   timeout=600)
    return fleet


def wait_up(pods: list[Pod], timeout: float) -> list[Pod]:
    """Waits until every pod's log has the guest's marker (filling up_s); returns the ones
    that did not come up within timeout."""
    deadline = time.monotonic() + timeout
    left = [p for p in pods if not p.up_s]
    while left and time.monotonic() < deadline:
        for p in left:
            if MARKER in log_text(p.log):
                p.up_s = time.monotonic() - p.t0
        left = [p for p in left if not p.up_s]
        if left:
            time.sleep(0.25)
    return left


def pings(net: CniTestNet, ip: str) -> bool:
    r = subprocess.run(["ip", "netns", "exec", net.probe, "busybox", "ping", "-c", "1", "-W",
                        "3", ip], capture_output=True, text=True)
    return r.returncode == 0


# --- the baseline: raw libvirt-python domains -------------------------------------------------

@dataclass
class RawDomain:
    i: int
    name: str
    console: Path
    t0: float
    prep_s: float  # overlay + seed ISO
    create_s: float  # createXML
    up_s: float = 0.0


@dataclass
class RawFleet:
    conn: libvirt.virConnect
    root: Path
    memory_mib: int
    vcpus: int = 1
    tag: str = field(default_factory=lambda: f"avr-bench-raw-{os.getpid()}")
    doms: list[RawDomain] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, i: int) -> RawDomain:
        d = self.root / f"d{i}"
        d.mkdir(mode=0o755)
        name = f"{self.tag}-{i}"
        t0 = time.monotonic()
        overlay = d / "disk.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                        str(minimal_guest().disk), str(overlay)], check=True)
        seed = make_seed(d, "minimal", name)
        prep = time.monotonic() - t0
        console = d / "console.log"
        xml = domain_xml(name, disk=overlay, seed=seed, console=console, vcpus=self.vcpus,
                         mem_mib=self.memory_mib, kernel=None, agent=False)
        t1 = time.monotonic()
        self.conn.createXML(xml, 0)
        dom = RawDomain(i, name, console, t0, prep, time.monotonic() - t1)
        with self.lock:
            self.doms.append(dom)
        return dom

    def cleanup_one(self, name: str) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self.conn.lookupByName(name).destroy()

    def cleanup(self) -> None:
        """Destroys every domain of this run (by its name prefix: also one whose createXML
        was cut short after libvirt started it)."""
        for dom in self.conn.listAllDomains():
            if dom.name().startswith(self.tag + "-"):
                with contextlib.suppress(libvirt.libvirtError):
                    dom.destroy()
        self.conn.close()


def raw_fleet(stack: contextlib.ExitStack, memory_mib: int, vcpus: int = 1) -> RawFleet:
    root = Path(tempfile.mkdtemp(prefix="avr-bench-raw-", dir=SCRATCH or "/var/tmp"))
    root.chmod(0o755)
    stack.callback(shutil.rmtree, root, ignore_errors=True)
    fleet = RawFleet(ensure_libvirtd("qemu:///system"), root, memory_mib, vcpus)
    stack.callback(fleet.cleanup)
    return fleet


def raw_wait_up(doms: list[RawDomain], timeout: float) -> list[RawDomain]:
    deadline = time.monotonic() + timeout
    left = [d for d in doms if not d.up_s]
    while left and time.monotonic() < deadline:
        for d in left:
            with contextlib.suppress(FileNotFoundError):
                if MARKER.encode() in d.console.read_bytes():
                    d.up_s = time.monotonic() - d.t0
        left = [d for d in left if not d.up_s]
        if left:
            time.sleep(0.25)
    return left


def at_once(n: int, fn: Callable[[int], Any]) -> tuple[float, list[Any], list[str]]:
    """Runs fn(0..n-1) in n threads released together; returns the wall time, the results
    and the errors."""
    barrier = threading.Barrier(n + 1)
    results: list[Any] = [None] * n
    errors: list[str] = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except Exception as e:
            errors.append(f"{i}: {e!r}"[:300])
    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.monotonic()
    for t in threads:
        t.join()
    return time.monotonic() - t0, results, errors
