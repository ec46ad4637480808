"""The `arktos-vm-runtime` command: serve, version, check, and the node commands (pods,
images, console, diagnose: cli/node.py)."""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..config import DEFAULT_SOCKET, build
from ..errors import InvalidArgument, StartupError
from . import node


def _serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML file with the same settings; flags win")
    p.add_argument("--listen", metavar="PATH", help=f"unix socket to serve on ({DEFAULT_SOCKET})")
    p.add_argument("--state-dir", metavar="DIR", help="state (/var/lib/arktos-vm-runtime)")
    p.add_argument("--libvirt-uri", metavar="URI", help="libvirt connection (qemu:///system)")
    p.add_argument("--socket-group", metavar="GROUP", help="group owning the socket (root)")
    p.add_argument("--cni-conf-dir", metavar="DIR", help="CNI configuration (/etc/cni/net.d)")
    p.add_argument("--cni-bin-dir", metavar="DIR", help="CNI plugins (/opt/cni/bin)")
    p.add_argument("--disable-kvm", action="store_const", const=True,
                   help="run guests under TCG emulation instead of KVM")
    p.add_argument("--image-download-protocol", choices=["https", "http"],
                   help="scheme prepended to image names (https)")
    p.add_argument("--image-translations-dir", metavar="DIR",
                   help="YAML image name translations (/etc/arktos-vm-runtime/images)")
    p.add_argument("--allow-local-images", action="store_const", const=True,
                   help="allow file:// image names")
    p.add_argument("--image-pull-deadline", type=float, metavar="SECONDS",
                   help="longest time one image download may take (3600)")
    p.add_argument("--image-pull-min-speed", type=int, metavar="BYTES",
                   help="slowest download allowed, bytes/s over the window (10240; 0: any)")
    p.add_argument("--image-pull-speed-window", type=float, metavar="SECONDS",
                   help="the window the minimum speed is measured over (60)")
    p.add_argument("--max-pods", type=int, metavar="N",
                   help="pod sandboxes held at once (110, the kubelet's default; 0: no limit)")
    p.add_argument("--max-pod-vcpus", type=int, metavar="N",
                   help="vCPUs of one pod's VM (0, the default: the host's CPUs)")
    p.add_argument("--max-pod-memory-mib", type=int, metavar="MIB",
                   help="memory of one pod's VM (0, the default: the host's memory)")
    p.add_argument("--max-pod-root-volume-gib", type=int, metavar="GIB",
                   help="root disk of one pod's VM (256; 0: no limit)")
    p.add_argument("--image-pull-denied-networks", metavar="CIDRS",
                   help="comma-separated networks image downloads never connect to (loopback, "
                        "unspecified, link-local and cloud metadata; '' for none)")
    p.add_argument("--image-max-size-mib", type=int, metavar="MIB",
                   help="largest image a pull may bring (32768; 0: no cap)")
    p.add_argument("--image-cache-size-mib", type=int, metavar="MIB",
                   help="total size of stored images; unused ones are evicted (0: no cap)")
    p.add_argument("--vm-max-vcpus", type=int, metavar="N",
                   help="vCPUs a VM can grow to live (0, the default: --max-pod-vcpus)")
    p.add_argument("--vm-max-memory-mib", type=int, metavar="MIB",
                   help="memory a VM can grow to live (0, the default: its size at "
                        "creation; capped by --max-pod-memory-mib)")
    p.add_argument("--streaming-address", metavar="IP",
                   help="address of the Exec/Attach/PortForward streaming server (127.0.0.1)")
    p.add_argument("--streaming-port", type=int, metavar="PORT",
                   help="its TCP port (0, the default: a free port picked at each start)")
    p.add_argument("--volume-allowed-roots", metavar="DIRS",
                   help="comma-separated roots host directories shared into VMs must lie "
                        "below (/var/lib/kubelet/pods; never /)")
    p.add_argument("--volume-files-max-kib", type=int, metavar="KIB",
                   help="ConfigMap/Secret/projected files one pod's seed carries (4096)")
    p.add_argument("--max-vm-disks", type=int, metavar="N",
                   help="block devices plus extra disks of one VM (8)")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics on this TCP port (0, the default: off)")
    p.add_argument("--metrics-address", metavar="IP",
                   help="address the metrics endpoint listens on (127.0.0.1)")
    p.add_argument("--metrics-max-vms", type=int, metavar="N",
                   help="VMs with per-VM series in a scrape; the rest are counted as "
                        "dropped (500)")
    p.add_argument("--template-dir", metavar="DIR",
                   help="operator template overrides (/etc/arktos-vm-runtime/templates)")
    p.add_argument("--pod-logs-dir", metavar="DIR",
                   help="console logs are written only below this directory (/var/log/pods)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def build_parser() -> argparse.ArgumentParser:
    """Every command and flag (the bash completion is checked against it)."""
    parser = argparse.ArgumentParser(prog="arktos-vm-runtime",
                                     description="CRI runtime that runs pods as libvirt VMs")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_flags(sub.add_parser("serve", help="serve the CRI on a unix socket"))
    sub.add_parser("version", help="print the version")
    check = sub.add_parser("check", help="call Version on a running daemon's socket")
    check.add_argument("--listen", metavar="PATH", default=DEFAULT_SOCKET)
    check.add_argument("--api", choices=["v1alpha2", "v1"], default="v1alpha2")
    node.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    if args.command in node.COMMANDS:
        return node.run(args)

    if args.command == "version":
        print(f"arktos-vm-runtime {__version__}")
        return 0
    if args.command == "check":
        import grpc

        from ..daemon.main import call_version
        try:
            print(call_version(args.listen, api=args.api))
        except grpc.RpcError as e:
            print(f"arktos-vm-runtime: {args.listen}: {e.code().name}: {e.details()}",
                  file=sys.stderr)
            return 1
        return 0

    from ..daemon import logs
    from ..daemon.main import serve

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    try:
        settings = build(args.config, overrides)
        logs.setup(settings.log_level)
        return serve(settings)
    except (StartupError, InvalidArgument) as e:
        print(f"arktos-vm-runtime: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
