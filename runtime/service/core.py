"""The runtime's service layer as one object: settings, state, health, and the managers
that later issues add (sandboxes, containers, images, networking). The API layer talks
only to this object."""

from __future__ import annotations

from ..adapters.libvirt_conn import LibvirtConnection
from ..config import Settings
from .health import Condition, LibvirtHealth, cni_condition
from .statedir import StateDir


class Core:
    def __init__(self, settings: Settings, state: StateDir, libvirt: LibvirtConnection) -> None:
        self.settings = settings
        self.state = state
        self.libvirt = libvirt
        self.health = LibvirtHealth(libvirt, settings.libvirt_probe_timeout)

    def runtime_condition(self) -> Condition:
        return self.health.condition

    def network_condition(self) -> Condition:
        return cni_condition(self.settings.cni_conf_dir)

    def summary(self) -> str:
        """The one-line STATUS= shown by `systemctl status`."""
        rt = self.runtime_condition()
        net = self.network_condition()
        parts = [
            f"serving CRI v1alpha2+v1 on {self.settings.listen}",
            "libvirt ok" if rt.ok else f"libvirt: {rt.reason}",
            "network ok" if net.ok else f"network: {net.reason}",
        ]
        return "; ".join(parts)
