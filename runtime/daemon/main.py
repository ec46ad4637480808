"""Startup, serving, the watchdog and shutdown.

Order at start: settings are checked, the state dir is locked, the socket is made ready,
gRPC starts, and only then READY=1 goes to systemd. On SIGTERM/SIGINT: STOPPING=1, no new
connections, calls in flight finish (up to a grace period), exit 0. VMs are libvirtd's
children, not ours; nothing here ever stops one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from typing import Any
from urllib.parse import urlsplit

import grpc

from ..adapters.libvirt_conn import LibvirtConnection
from ..api.dispatch import TRANSPORT_LIMIT, all_handlers
from ..api.image_service import ImageServicer
from ..api.pools import Kind, Pools
from ..api.runtime_service import RuntimeServicer
from ..config import Settings
from ..errors import InvalidArgument, StartupError
from ..service import faults
from ..service.core import Core
from ..service.statedir import StateDir
from ..service.vm_metrics import StateCollector, VmCollector
from . import sockets, streaming
from .metrics_http import MetricsServer
from .notify import Notifier
from .watchdog import BEAT_INTERVAL, Heartbeat, Watchdog

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 30.0
STATUS_INTERVAL = 1.0
# Whatever the caller's umask (tools/demo, a shell: 022): nothing the daemon makes is
# readable by others unless given its mode on purpose (the directories QEMU traverses,
# image blobs). The store holds cloud-init user-data with passwords.
UMASK = 0o077


def qemu_is_another_user(libvirt_uri: str) -> bool:
    """qemu:///system runs QEMU as libvirt-qemu, which must reach the VM disks by path."""
    u = urlsplit(libvirt_uri)
    return u.scheme.split("+")[0] == "qemu" and u.path == "/system"


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.notifier = Notifier()
        self._stop = asyncio.Event()
        self._relay: sockets.Relay | None = None
        self._owned_socket: str | None = None

    async def _bind(self, server: grpc.aio.Server, state: StateDir,
                    inherited: socket.socket | None) -> None:
        if inherited is not None:
            target = state.private_socket
            sockets.clear_stale(target)
            with sockets.private_umask():
                self._add_port(server, target)
            self._relay = sockets.Relay(inherited, target)
            log.info("socket activation: relaying systemd's socket to %s", target)
            return
        with sockets.private_umask():
            self._add_port(server, self.settings.listen)
        self._owned_socket = self.settings.listen
        sockets.set_permissions(self.settings.listen, self.settings.socket_group)

    @staticmethod
    def _add_port(server: grpc.aio.Server, path: str) -> None:
        try:
            port = server.add_insecure_port(f"unix:{path}")
        except RuntimeError as e:
            raise StartupError(f"cannot listen on {path}: {e}") from e
        if not port:
            raise StartupError(f"cannot listen on {path}")

    def _metrics(self, core: Core) -> MetricsServer:
        made = MetricsServer(self.settings.metrics_address, self.settings.metrics_port, [
            StateCollector(core.pods.sandboxes, core.pods.containers),
            VmCollector(core.stats.list_sandboxes, self.settings.metrics_max_vms)])
        try:
            made.start()
        except OSError as e:
            raise StartupError(
                f"metrics: cannot listen on {self.settings.metrics_address}"
                f" port {self.settings.metrics_port}: {e.strerror or e}") from e
        log.info("Prometheus metrics on %s", made.url)
        return made

    def request_stop(self) -> None:
        self._stop.set()

    @staticmethod
    async def _beat(heartbeat: Heartbeat) -> None:
        """Proves to the watchdog thread that the serving loop answers; does nothing else."""
        while True:
            heartbeat.beat()
            await asyncio.sleep(BEAT_INTERVAL)

    async def _status_line(self, core: Core, pools: Pools) -> None:
        """Keeps systemd's STATUS= current (the summary reads the CNI dir: a quick pool)."""
        last = ""
        while True:
            status = await pools.run(Kind.QUICK, core.summary)
            if status != last:
                self.notifier.status(status)
                last = status
            await asyncio.sleep(STATUS_INTERVAL)

    async def run(self) -> int:
        os.umask(UMASK)
        state = StateDir(self.settings.state_dir,
                         qemu_must_reach=qemu_is_another_user(self.settings.libvirt_uri))
        core: Core | None = None
        pools = Pools()
        watchdog: Watchdog | None = None
        stream_server: Any = None
        metrics_server: MetricsServer | None = None
        try:
            try:  # a testing aid, refused unless explicitly enabled (service/faults.py)
                armed = faults.from_environment(os.environ)
            except InvalidArgument as e:
                raise StartupError(str(e)) from e
            faults.install(armed)
            if armed:
                log.warning("FAULT INJECTION ARMED (testing only): %s",
                            ", ".join(f"{f.point}={f.kind}" for f in armed))
            # Socket problems are found before anything else is set up.
            inherited = sockets.inherited_socket()
            if inherited is None:
                sockets.prepare_path(self.settings.listen)
            libvirt = LibvirtConnection(self.settings.libvirt_uri)
            core = Core(self.settings, state, libvirt)
            server = grpc.aio.server(options=[
                ("grpc.max_receive_message_length", TRANSPORT_LIMIT),
                ("grpc.max_send_message_length", TRANSPORT_LIMIT),
                ("grpc.so_reuseport", 0),
            ])
            servicer = RuntimeServicer(core, pools)
            made = streaming.make_server(core.streams, self.settings)
            try:
                made.start()
            except OSError as e:
                raise StartupError(
                    f"streaming server: cannot listen on {self.settings.streaming_address}"
                    f" port {self.settings.streaming_port}: {e.strerror or e}") from e
            stream_server = servicer.streaming = made
            log.info("streaming server (Exec, Attach, PortForward) on %s",
                     stream_server.base_url)
            if self.settings.metrics_port:
                metrics_server = self._metrics(core)
            server.add_generic_rpc_handlers(
                all_handlers(servicer, ImageServicer(core, pools))
            )
            await self._bind(server, state, inherited)
            await server.start()
            if self._relay is not None:
                await self._relay.start()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
            core.health.start_probe()
            log.info("arktos-vm-runtime serving on %s (state %s, libvirt %s)",
                     self.settings.listen, self.settings.state_dir, self.settings.libvirt_uri)
            self.notifier.ready(core.summary())
            heartbeat = Heartbeat()
            tasks = [asyncio.create_task(self._beat(heartbeat)),
                     asyncio.create_task(self._status_line(core, pools))]
            watchdog = Watchdog(self.notifier, heartbeat, core.health)
            watchdog.start()  # it starts the libvirt probes too
            await self._stop.wait()

            log.info("stopping: finishing calls in flight; VMs keep running")
            self.notifier.stopping("Stopping: finishing calls in flight; VMs keep running")
            if self._relay is not None:
                self._relay.stop_accepting()
            core.pods.events.close()  # event streams end now, not after the grace period
            await server.stop(SHUTDOWN_GRACE)
            if stream_server is not None:  # its sessions end: VMs keep running
                await asyncio.get_running_loop().run_in_executor(None, stream_server.stop)
                stream_server = None
            if self._relay is not None:
                await self._relay.wait_closed(1.0)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return 0
        finally:
            if stream_server is not None:  # started, then a later step failed
                stream_server.stop()
            if metrics_server is not None:
                metrics_server.stop()
            if watchdog is not None:
                watchdog.stop()
            pools.shutdown()
            if self._owned_socket is not None:
                sockets.remove_socket(self._owned_socket)
            if core is not None:
                core.close()
            state.close()
            self.notifier.close()


def serve(settings: Settings) -> int:
    return asyncio.run(Daemon(settings).run())


def call_version(path: str, timeout: float = 10.0, api: str = "v1alpha2") -> str:
    """Calls Version over the socket (for `arktos-vm-runtime check` and install checks)."""
    from ..api.dispatch import api_modules

    pb = api_modules()[api]
    with grpc.insecure_channel(f"unix:{path}") as channel:
        stub = channel.unary_unary(
            f"/runtime.{api}.RuntimeService/Version",
            request_serializer=pb.VersionRequest.SerializeToString,
            response_deserializer=pb.VersionResponse.FromString,
        )
        r = stub(pb.VersionRequest(version=""), timeout=timeout)
    return (f"{r.runtime_name} {r.runtime_version} "
            f"(CRI {r.runtime_api_version}, version {r.version})")


