"""The runtime's service layer as one object: settings, state, health, pods and images.
The API layer talks only to this object."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from .. import metrics
from ..adapters import cni, host_facts
from ..adapters.domain_stats import DomainStatsReader
from ..adapters.guest_agent import GuestAgent
from ..adapters.image_translations import ImageTranslator
from ..adapters.libvirt_conn import LibvirtConnection
from ..adapters.libvirt_console import Consoles
from ..adapters.libvirt_domains import Domains, domain_name
from ..adapters.pull_watch import PullLimits
from ..adapters.templates import default_template_dirs
from ..config import Settings, denied_networks
from .console_attach import ConsoleAttach
from .guest_exec import GuestExec
from .guest_exec_stream import GuestExecStream
from .health import Condition, LibvirtHealth, cni_condition
from .image_records import ImageRecord
from .images import ImageStore
from .pod_network import PodNetworks
from .pods import Pods
from .port_forward import PortForward
from .reboot import Reboots
from .statedir import StateDir
from .stats import Stats
from .stream_backends import VmStreams

log = logging.getLogger(__name__)


class Core:
    def __init__(self, settings: Settings, state: StateDir, libvirt: LibvirtConnection) -> None:
        self.settings = settings
        self.state = state
        self.libvirt = libvirt
        self.health = LibvirtHealth(libvirt, settings.libvirt_probe_timeout)
        self.domains = Domains(libvirt, state.instance_id)
        translations_dir = Path(settings.image_translations_dir)
        schemes = {"https", "http"} | ({"file"} if settings.allow_local_images else set())
        self.images = ImageStore(
            state.root / "images", state.store, download_protocol=settings.image_download_protocol,
            allowed_schemes=frozenset(schemes),
            limits=PullLimits(settings.image_pull_deadline, settings.image_pull_min_speed,
                              settings.image_pull_speed_window),
            denied_networks=denied_networks(settings),
            max_size=settings.image_max_size_mib << 20,
            cache_size=settings.image_cache_size_mib << 20,
            translations=ImageTranslator(translations_dir) if translations_dir.is_dir()
            else None)
        template_dirs = default_template_dirs(settings.template_dir)
        self.networks = PodNetworks(
            state.root / "networks", state.store, conf_dir=settings.cni_conf_dir,
            bin_dirs=[settings.cni_bin_dir, *cni.DEFAULT_BIN_DIRS], libvirt_conn=libvirt.get,
            template_dirs=template_dirs)
        self.pods = Pods(settings, state.store, self.domains, self.images, self.networks,
                         state.root / "vms", template_dirs)
        self.health.on_healthy(self.pods.start_reconcile)
        agent = GuestAgent(self.domains)
        self.reboots = Reboots(self.pods.state, self.domains, agent)
        self.guest_exec = GuestExec(self.pods.state, agent)
        # Exec, Attach and PortForward's VM side, handed to the streaming server
        self.streams = VmStreams(GuestExecStream(self.pods.state, agent),
                                 ConsoleAttach(self.pods.state, Consoles(self.domains)),
                                 PortForward(self.pods.state, self.networks.endpoint))
        self.domain_stats = DomainStatsReader(libvirt)
        self.stats = Stats(self.pods.containers, self.pods.sandboxes, self.domain_stats.read,
                           self.networks.interface_usage, str(state.root / "vms"))
        self._pulls: dict[str, tuple[int, int | None, float]] = {}
        self._pulls_lock = threading.Lock()

    def runtime_condition(self) -> Condition:
        return self.health.condition

    def network_condition(self) -> Condition:
        return cni_condition(self.settings.cni_conf_dir)

    def pull(self, name: str, cancel: threading.Event) -> ImageRecord:
        started = time.monotonic()
        counted = 0

        def progress(done: int, total: int | None) -> None:
            nonlocal counted
            if done > counted:
                metrics.PULL_BYTES.inc(done - counted)
                counted = done
            with self._pulls_lock:
                self._pulls[name] = (done, total, started)

        metrics.PULLS_IN_FLIGHT.inc()
        outcome = "failed"
        try:
            rec = self.images.pull(name, cancel=cancel, progress=progress,
                                   in_use=self.pods.image_in_use)
            outcome = "ok"
            return rec
        finally:
            metrics.PULLS_IN_FLIGHT.dec()
            metrics.PULLS.labels(outcome).inc()
            with self._pulls_lock:
                self._pulls.pop(name, None)

    def _pull_summary(self) -> str:
        with self._pulls_lock:
            pulls = list(self._pulls.items())
        parts = []
        for name, (done, total, started) in pulls:
            rate = done / max(time.monotonic() - started, 1e-3) / 2**20
            of = f"/{total / 2**20:.1f}" if total else ""
            parts.append(f"pulling {name[-60:]}: {done / 2**20:.1f}{of} MiB at {rate:.1f} MiB/s")
        return "; ".join(parts)

    def summary(self) -> str:
        """The one-line STATUS= shown by `systemctl status`."""
        rt = self.runtime_condition()
        net = self.network_condition()
        running = sum(c.state == "CONTAINER_RUNNING" for c in self.pods.containers())
        parts = [
            f"serving CRI v1alpha2+v1 on {self.settings.listen}",
            "libvirt ok" if rt.ok else f"libvirt: {rt.reason}",
            "network ok" if net.ok else f"network: {net.reason}",
            f"{running} VMs running",
        ]
        pulls = self._pull_summary()
        if pulls:
            parts.append(pulls)
        return "; ".join(parts)

    def vm_info(self, cid: str) -> dict[str, Any]:
        """ContainerStatus' verbose info: what the node CLI shows beyond the CRI fields."""
        rec = self.pods.container(cid)
        return {"domain": domain_name(rec.id), "vcpus": rec.vcpus, "memoryMiB": rec.memory_mib,
                "qemuPid": host_facts.qemu_pid(self.settings.libvirt_uri, rec.id),
                "consoleWriters": self.streams.console.writers(rec.id),
                "consoleAttachers": self.streams.console.sessions().get(rec.id, 0)}

    def close(self) -> None:
        self.streams.console.close()
        self.reboots.close()
        self.pods.close()
        self.images.close()
