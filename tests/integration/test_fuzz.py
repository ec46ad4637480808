"""The fuzz campaign (issue 9): seeded, bounded hypothesis fuzz over every RPC of both CRI
versions against one real daemon (real libvirtd, the test CNI network, a loopback image).

Each method gets descriptor-built requests (tests/cri_fuzz.py), mutations of a valid request
(a RunPodSandbox, CreateContainer or PullImage config, or a request naming a live sandbox
or container, with one field replaced), and raw bytes (garbage, truncated or bit-flipped
encodings). Any status is fine except INTERNAL and UNKNOWN; the daemon must stay up, answer
Version, keep its RSS and open fds bounded, and leave nothing behind once the harness
stops and removes every sandbox. Pulls never leave the host: a PullImage (descriptor-built,
mutated or decoded from raw bytes) whose name would need a DNS lookup or names an address
off loopback is sent with the host "localhost" instead (its path, tag and digest as
fuzzed), so no name is resolved through the network and no outside address is connected
to. A proxy cannot stand in for those hosts: the daemon's image guard ignores proxies and
checks the address it connects to.

AVR_FUZZ_SEED and AVR_FUZZ_ROUNDS change the seed and the size; the counts are printed.
"""

from __future__ import annotations

import collections
import dataclasses
import ipaddress
import os
import random
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from arktos_vm_runtime.service.image_names import parse_image_name, url_for
from tests import cri_fuzz
from tests.daemon_proc import APIS, Daemon, open_fds, rss_kb
from tests.integration.test_network_common import CniTestNet, link_names
from tests.integration.vmpods import (
    ISSUED_UIDS,
    container_config,
    domain_names,
    own_netns_names,
    own_taps,
    sandbox_config,
    vm_runtime,
)

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore:Generating overly large repr")]

SEED = int(os.environ.get("AVR_FUZZ_SEED", "20261201"))
# Examples per method and round: cheap methods get the most, those that make VMs the least.
ROUNDS = int(os.environ.get("AVR_FUZZ_ROUNDS", "2"))
PER_METHOD = 75
EXPENSIVE = {"RunPodSandbox": 120, "CreateContainer": 120, "StartContainer": 40,
             "AttachNetworkInterface": 60, "PullImage": 120}
MIN_REQUESTS = 10_000
WORKERS = 4  # concurrent senders in the shuffled rounds
LIVE_SANDBOXES = 4  # the harness removes the oldest beyond this
CALL_TIMEOUT = 60.0
STREAM_TIMEOUT = 0.5  # server streams are cut here (an event stream never ends)
BAD = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
# RSS the daemon may gain over the campaign after warm-up. Measured: +11 to +21 MB over
# 12,617 requests and +19 MB over 35,557 (allocator and caches settling, not growth per
# call); 64 MB fails a leak of a few kB per request and leaves three times the noise.
RSS_BOUND_KB = 64 * 1024
FD_SLACK = 4  # measured: 23 -> 23


def _outside_host(raw: str) -> str | None:
    """The host a pull of `raw` would look up through DNS or connect to off this machine
    (anything but localhost, which /etc/hosts answers, and loopback addresses), or None;
    None too for a name the daemon refuses before any lookup."""
    try:
        ref = parse_image_name(raw)
        url = url_for(ref, raw, allowed_schemes=frozenset({"http", "https"}),
                      download_protocol="http")
        host = urllib.parse.urlsplit(url).hostname
    except Exception:
        return None
    if not host or host.rstrip(".").lower() == "localhost":
        return None
    try:
        return None if ipaddress.ip_address(host).is_loopback else host
    except ValueError:
        return host  # a name: resolved through DNS


def _loopback_only(m: cri_fuzz.Method, request: Message | bytes) -> tuple[Message | bytes, bool]:
    """`request` with the host of a PullImage's name that would reach beyond loopback
    (a name needing DNS, an outside address) replaced by localhost; and whether it was."""
    if m.name != "PullImage":
        return request, False
    msg = _parsed(m, request)
    if msg is None:
        return request, False  # bytes the daemon cannot decode either
    raw = msg.image.image
    host = _outside_host(raw)
    if host is None:
        return request, False
    at = raw.lower().find(host.lower())
    new = raw[:at] + "localhost" + raw[at + len(host):] if at >= 0 else "localhost/fuzzed"
    if _outside_host(new) is not None:
        new = "localhost/fuzzed"
    msg = type(msg).FromString(msg.SerializeToString())
    msg.image.image = new
    return (msg.SerializeToString() if isinstance(request, bytes) else msg), True


class Harness:
    """Sends requests, counts answers, and keeps the pools of live ids the mutations use."""

    def __init__(self, d: Daemon, image: str, log_root: Path) -> None:
        self.d, self.image, self.log_root = d, image, log_root
        self.counts: collections.Counter[str] = collections.Counter()
        self.codes: collections.Counter[str] = collections.Counter()
        self.by_method: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter)
        self.bad: list[str] = []
        self.sandboxes: dict[str, Any] = {}  # id -> its PodSandboxConfig (either version)
        self.containers: dict[str, str] = {}  # id -> sandbox id
        self.order: list[str] = []  # sandbox ids, oldest first
        self.stopped: set[str] = set()
        self.image_pulled = False
        self.own: set[str] = set()  # sandboxes the harness made (valid, unlike the fuzz's)
        self.samples: dict[tuple[str, str], str] = {}  # (method, code) -> first message
        self.turn = 0
        self.rewritten = 0  # pulls sent with localhost for an outside host (_loopback_only)
        # the concurrent round: state changes and the harness's own calls, one at a time
        self.lock = threading.RLock()

    # -- sending -------------------------------------------------------------------------

    def send(self, m: cri_fuzz.Method, request: Message | bytes) -> Any:
        request, rewritten = _loopback_only(m, request)
        data = request if isinstance(request, bytes) else request.SerializeToString()
        with self.lock:
            self.counts[str(m)] += 1
            self.rewritten += rewritten
            if m.name == "RunPodSandbox":  # its namespace and taps count as this test's
                parsed = _parsed(m, request)
                if parsed is not None:
                    ISSUED_UIDS.add(parsed.config.metadata.uid)
        ch = self.d.channel
        try:
            if m.descriptor.server_streaming:
                call = ch.unary_stream(m.path, request_serializer=None,
                                       response_deserializer=m.response_class.FromString)
                # A stream may stay open for good (GetContainerEvents): a short deadline
                # ends it; what it sent by then, or its error, is the answer checked.
                reply = list(call(data, timeout=STREAM_TIMEOUT))
            elif m.descriptor.client_streaming:
                call = ch.stream_unary(m.path, request_serializer=None,
                                       response_deserializer=m.response_class.FromString)
                reply = call(iter([data]), timeout=CALL_TIMEOUT)
            else:
                call = ch.unary_unary(m.path, request_serializer=None,
                                      response_deserializer=m.response_class.FromString)
                reply = call(data, timeout=CALL_TIMEOUT)
        except grpc.RpcError as e:
            with self.lock:
                self._answer(m, request, e)
            return None
        with self.lock:
            self.codes["OK"] += 1
            self.by_method[str(m)]["OK"] += 1
            self._learn(m, request, reply)
        return reply

    def _answer(self, m: cri_fuzz.Method, request: Message | bytes, e: grpc.RpcError) -> None:
        code = e.code()
        self.codes[code.name] += 1
        self.by_method[str(m)][code.name] += 1
        self.samples.setdefault((str(m), code.name), (e.details() or "")[:160])
        if code in BAD:
            self.bad.append(f"{m}: {code.name}: {(e.details() or '')[:300]} "
                            f"<- {_describe(request)}")

    def _learn(self, m: cri_fuzz.Method, request: Message | bytes, reply: Any) -> None:
        request = _parsed(m, request)
        if request is None:
            return
        if m.name == "RunPodSandbox":
            sid = reply.pod_sandbox_id
            if sid not in self.sandboxes:
                self.order.append(sid)
            self.sandboxes[sid] = request.config
            self.trim()
        elif m.name == "CreateContainer":
            self.containers[reply.container_id] = request.pod_sandbox_id
        elif m.name == "StopPodSandbox":
            self.stopped.add(request.pod_sandbox_id)
        elif m.name == "RemovePodSandbox":
            self.forget(request.pod_sandbox_id)
        elif m.name == "RemoveImage":
            self.image_pulled = False  # maybe; pulled again before it is needed
        elif m.name == "RemoveContainer":
            self.containers.pop(request.container_id, None)

    def forget(self, sid: str) -> None:
        self.sandboxes.pop(sid, None)
        self.stopped.discard(sid)
        self.own.discard(sid)
        if sid in self.order:
            self.order.remove(sid)
        for cid in [c for c, s in self.containers.items() if s == sid]:
            del self.containers[cid]

    # -- the harness's own calls (valid; they must succeed) -------------------------------

    def remove_sandbox(self, sid: str) -> None:
        pb, _ = APIS["v1"]
        rt = self.d.runtime("v1")
        try:
            rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:  # removed by a fuzzed request meanwhile
                raise
        rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)
        self.counts["harness"] += 2
        self.forget(sid)

    def trim(self) -> None:
        while len(self.order) > LIVE_SANDBOXES:
            self.remove_sandbox(self.order[0])

    def new_sandbox(self) -> str:
        api = ("v1alpha2", "v1")[self.turn % 2]
        pb, _ = APIS[api]
        cfg = sandbox_config(pb, self.log_root / f"h{self.turn}")
        sid = self.d.runtime(api).RunPodSandbox(pb.RunPodSandboxRequest(config=cfg),
                                                timeout=120).pod_sandbox_id
        self.counts["harness"] += 1
        self.order.append(sid)
        self.own.add(sid)
        self.sandboxes[sid] = cfg
        self.trim()
        return sid

    def free_sandbox(self, own: bool = False) -> str:
        """A ready sandbox without a VM (a new one if there is none); `own`: one the harness
        made, so that a request built on it must succeed."""
        free = [s for s in self.order if s not in self.containers.values()
                and s not in self.stopped and (s in self.own or not own)]
        return free[0] if free else self.new_sandbox()

    def pull(self) -> None:
        if not self.image_pulled:
            pb, _ = APIS["v1"]
            self.d.images("v1").PullImage(pb.PullImageRequest(image=pb.ImageSpec(
                image=self.image)), timeout=120)
            self.counts["harness"] += 1
            self.image_pulled = True

    def new_container(self) -> str:
        api = ("v1alpha2", "v1")[self.turn % 2]
        pb, _ = APIS[api]
        self.pull()
        # A fuzzed StopPodSandbox or RemovePodSandbox sent by another worker may name the
        # sandbox picked here while this call is on its way (the ids they use come from the
        # same pool): the answer is then a clear NOT_FOUND or FAILED_PRECONDITION, and the
        # harness takes another sandbox.
        for _ in range(3):
            sid = self.free_sandbox(own=True)
            cfg = _convert(self.sandboxes[sid], pb.PodSandboxConfig)
            try:
                cid = self.d.runtime(api).CreateContainer(pb.CreateContainerRequest(
                    pod_sandbox_id=sid, config=container_config(pb, self.image),
                    sandbox_config=cfg), timeout=120).container_id
            except grpc.RpcError as e:
                if e.code() not in (grpc.StatusCode.NOT_FOUND,
                                    grpc.StatusCode.FAILED_PRECONDITION):
                    raise
                self.counts["harness"] += 1
                self.stopped.add(sid)  # no longer free either way
                continue
            self.counts["harness"] += 1
            self.containers[cid] = sid
            return cid
        raise AssertionError("three sandboxes in a row were stopped or removed under "
                             "the harness's CreateContainer")

    def remove_all(self) -> None:
        pb, _ = APIS["v1"]
        items = self.d.runtime("v1").ListPodSandbox(pb.ListPodSandboxRequest(),
                                                    timeout=30).items
        for sb in items:
            self.remove_sandbox(sb.id)

    # -- valid requests the mutations start from ------------------------------------------

    def pick(self, pool: list[str]) -> str:
        self.turn += 1
        return pool[self.turn % len(pool)] if pool else f"no-such-{self.turn}"

    def valid(self, m: cri_fuzz.Method) -> Message:
        with self.lock:
            return self._valid(m)

    def _valid(self, m: cri_fuzz.Method) -> Message:
        pb, cls = m.pb, m.request_class
        self.turn += 1
        if m.name == "RunPodSandbox":
            cfg = sandbox_config(pb, self.log_root / f"f{self.turn}")
            return cls(config=cfg, runtime_handler="vm")
        if m.name == "CreateContainer":
            sid = self.free_sandbox()
            self.pull()
            sb_cfg = _convert(self.sandboxes[sid], pb.PodSandboxConfig)
            return cls(pod_sandbox_id=sid, config=container_config(pb, self.image),
                       sandbox_config=sb_cfg)
        if m.name in ("PullImage", "ImageStatus", "RemoveImage"):
            return cls(image=pb.ImageSpec(image=self.image))
        req = cls()
        fields = cls.DESCRIPTOR.fields_by_name
        for name in ("pod_sandbox_id", "PodSandboxID", "PodSandboxId"):
            if name in fields:
                setattr(req, name, self.pick(self.order or [self.new_sandbox()]))
        for name in ("container_id", "vm_id", "vmID"):
            if name in fields:
                setattr(req, name, self.pick(list(self.containers) or [self.new_container()]))
        if "Nic" in fields:
            req.Nic.Name = "eth1"
        return req


def _parsed(m: cri_fuzz.Method, request: Message | bytes) -> Any:
    if not isinstance(request, bytes):
        return request
    try:
        return m.request_class.FromString(request)
    except Exception:
        return None


def _convert(msg: Message, cls: type[Message]) -> Message:
    """The same message in the other API version (the wire format is shared)."""
    return cls.FromString(msg.SerializeToString())


def _describe(request: Message | bytes) -> str:
    text = repr(request[:120]) if isinstance(request, bytes) else str(request)
    return text[:600].replace("\n", " ")


@dataclasses.dataclass(frozen=True)
class Broken:
    """A valid request's encoding, truncated at or with one bit flipped at `at` (taken
    modulo its length)."""

    at: int
    truncate: bool
    bit: int

    def apply(self, data: bytes) -> bytes:
        if not data:
            return b"\x0a"
        i = self.at % len(data)
        if self.truncate:
            return data[:i]
        out = bytearray(data)
        out[i] ^= 1 << self.bit
        return bytes(out)


def _strategy(desc: Descriptor) -> st.SearchStrategy[Any]:
    """What one example sends, drawn without looking at the harness's state (hypothesis
    needs that): a request, raw bytes, or a recipe the harness applies to a valid request."""
    parts: list[st.SearchStrategy[Any]] = [cri_fuzz.messages(desc), st.binary(max_size=256)]
    if desc.fields:
        parts.append(st.builds(Broken, st.integers(0, 1 << 16), st.booleans(),
                               st.integers(0, 7)))
        parts += [cri_fuzz.mutations(desc)] * 3  # most examples reach the service layer
    return st.one_of(*parts)


def _request(h: Harness, m: cri_fuzz.Method, drawn: Any) -> Message | bytes:
    if isinstance(drawn, cri_fuzz.Mutation):
        request: Message | bytes = drawn.apply(h.valid(m))
    elif isinstance(drawn, Broken):
        request = drawn.apply(h.valid(m).SerializeToString())
    else:
        request = drawn
    # A StopContainer of a live VM waits for the guest up to its timeout: kept to 0-2 s so
    # that one fuzzed timeout cannot hold the campaign for hours (the timeout is still
    # fuzzed in full against ids that name nothing).
    if (m.name == "StopContainer" and isinstance(request, Message)
            and request.container_id in h.containers):
        request.timeout = request.timeout % 3
    return request


def _fuzz(h: Harness, m: cri_fuzz.Method, examples: int, salt: int) -> None:
    @seed(SEED * 1000 + salt)
    @settings(max_examples=examples, deadline=None, database=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(_strategy(m.request_class.DESCRIPTOR))
    def run(drawn: Any) -> None:
        h.send(m, _request(h, m, drawn))

    run()


def _draws(m: cri_fuzz.Method, examples: int, salt: int) -> list[Any]:
    out: list[Any] = []

    @seed(SEED * 1000 + salt)
    @settings(max_examples=examples, deadline=None, database=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(_strategy(m.request_class.DESCRIPTOR))
    def run(drawn: Any) -> None:
        out.append(drawn)

    run()
    return out


def _campaign(h: Harness, rounds: range, scale: float = 1.0) -> None:
    """Round by round: method after method; every second round's requests are shuffled
    (seeded) and sent by WORKERS threads at once, so calls on one sandbox interleave."""
    for r in rounds:
        methods = cri_fuzz.methods()
        sizes = [max(1, int(EXPENSIVE.get(m.name, PER_METHOD) * scale)) for m in methods]
        if r % 2 == 1:
            for i, (m, n) in enumerate(zip(methods, sizes, strict=True)):
                _fuzz(h, m, n, r * 1000 + i)
            continue
        items = [(m, drawn) for i, (m, n) in enumerate(zip(methods, sizes, strict=True))
                 for drawn in _draws(m, n, r * 1000 + i)]
        random.Random(SEED + r).shuffle(items)
        with ThreadPoolExecutor(WORKERS) as pool:
            list(pool.map(lambda item: h.send(item[0], _request(h, *item)), items))


def test_fuzz_every_rpc_of_both_versions(short_tmp: Path, cni_net: CniTestNet,
                                         served_minimal_image: str) -> None:
    d = vm_runtime(short_tmp, cni_net)
    d.start()
    uids_before = set(ISSUED_UIDS)
    links_before = link_names()
    cleaned = False
    try:
        pid = d.proc.pid  # type: ignore[union-attr]
        pb, _ = APIS["v1"]
        d.images("v1").PullImage(pb.PullImageRequest(image=pb.ImageSpec(
            image=served_minimal_image)), timeout=120)
        h = Harness(d, served_minimal_image, short_tmp / "pods")
        print(f"\nfuzz seed {SEED}, {ROUNDS} rounds")

        started = time.monotonic()
        _campaign(h, range(1), scale=0.2)  # warm-up: threads, caches, libvirt connection
        h.remove_all()
        time.sleep(1)
        rss0, fds0 = rss_kb(pid), open_fds(pid)
        warm = time.monotonic() - started
        _campaign(h, range(1, ROUNDS + 1))
        h.remove_all()
        cleaned = True
        took = time.monotonic() - started
        time.sleep(1)
        rss1, fds1 = rss_kb(pid), open_fds(pid)

        total = sum(v for k, v in h.counts.items() if k != "harness")
        print(f"{total} fuzzed requests (+{h.counts['harness']} harness calls) in "
              f"{took:.0f} s (warm-up {warm:.0f} s)")
        print("status codes:", dict(h.codes.most_common()))
        print("requests per method:", dict(sorted(h.counts.items())))
        for name, codes in sorted(h.by_method.items()):
            print(f"  {name}: {dict(codes.most_common())}")
        for (name, code), text in sorted(h.samples.items()):
            print(f"    {name} {code}: {text}")
        print(f"RSS {rss0} kB -> {rss1} kB ({rss1 - rss0:+d} kB); open fds {fds0} -> {fds1}")
        print(f"pulls whose host was outside loopback, sent with the host localhost: {h.rewritten}")

        assert not h.bad, f"{len(h.bad)} INTERNAL/UNKNOWN answers:\n" + "\n".join(h.bad[:30])
        # a failure off the request path (an event handler, a console follower, a pool's
        # task) answers nothing: its traceback in the daemon's log is the only trace
        out = d.output()
        errors = [line for line in out.splitlines() if " ERROR " in line or "Traceback" in line]
        print(f"daemon log: {len(out.splitlines())} lines, {len(errors)} ERROR/Traceback")
        assert "Traceback" not in out, "\n".join(errors[:20])
        assert total >= MIN_REQUESTS or ROUNDS < 2, total
        assert d.proc is not None and d.proc.poll() is None, "the daemon died"
        v = d.runtime("v1alpha2").Version(APIS["v1alpha2"][0].VersionRequest(), timeout=10)
        assert v.runtime_name == "arktos-vm-runtime"
        assert rss1 - rss0 < RSS_BOUND_KB, f"RSS grew by {rss1 - rss0} kB"
        assert fds1 <= fds0 + FD_SLACK, f"open fds {fds0} -> {fds1}"

        # nothing left: records, domains, VM directories, namespaces, links, leases
        rt = d.runtime("v1")
        assert not rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=10).items
        assert not rt.ListContainers(pb.ListContainersRequest(), timeout=10).containers
        ours = [n for n in domain_names() if _domain_in(n, d.state_dir)]
        assert not ours, f"domains left: {ours}"
        vms = Path(d.state_dir) / "vms"
        assert not (vms.exists() and any(vms.iterdir())), list(vms.iterdir())
        sent = ISSUED_UIDS - uids_before
        assert not own_netns_names() & {f"avr-{u}" for u in sent}, "a pod netns leaked"
        assert not own_taps(link_names() - links_before), "a tap leaked"
        assert not cni_net.ip_files(), f"addresses left: {cni_net.ip_files()}"
        assert not _dnsmasq_of(d.state_dir), "a dnsmasq of this daemon is still running"
    finally:
        if not cleaned:
            _rescue(d, short_tmp, cni_net)
        d.stop()


def _rescue(d: Daemon, tmp: Path, net: CniTestNet) -> None:
    """After a failure: remove every sandbox, through a new daemon on the same state if
    this one died or hangs, so a failed campaign leaves no namespaces, dnsmasq or VMs."""
    pb, _ = APIS["v1"]
    try:
        d.runtime("v1").Version(pb.VersionRequest(), timeout=5)
        Harness(d, "", tmp / "pods").remove_all()
        return
    except grpc.RpcError:
        pass
    d.stop(timeout=10)
    again = vm_runtime(tmp, net)
    again.start()
    try:
        Harness(again, "", tmp / "pods").remove_all()
    finally:
        again.stop()


def _dnsmasq_of(state_dir: str) -> list[int]:
    """The dnsmasq processes serving pods of the daemon whose state is `state_dir`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"dnsmasq") and any(
                state_dir.encode() + b"/" in a for a in argv):
            found.append(int(pid))
    return found


def _domain_in(name: str, state_dir: str) -> bool:
    import subprocess

    r = subprocess.run(["virsh", "-c", "qemu:///system", "dumpxml", "--inactive", name],
                       capture_output=True, text=True)
    return r.returncode == 0 and f"{state_dir}/vms/" in r.stdout

