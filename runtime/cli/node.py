"""The node commands: `pods`, `images`, `console POD`, `diagnose`, over the daemon's socket.

Tables by default, `-o json` for scripts; an error says what went wrong and the command
exits 1 (2 for a bad command line, as argparse does).
"""

from __future__ import annotations

import argparse
import sys

from ..config import DEFAULT_SOCKET
from .client import Client, CliError

COMMANDS = ("pods", "images", "console", "diagnose")


def _common(p: argparse.ArgumentParser, output: bool = True) -> None:
    p.add_argument("--listen", metavar="PATH", default=DEFAULT_SOCKET,
                   help=f"the daemon's socket ({DEFAULT_SOCKET})")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="for each call to the daemon (30)")
    if output:
        p.add_argument("-o", "--output", choices=["table", "json"], default="table",
                       help="table (the default) or json")


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    _common(sub.add_parser(
        "pods", help="the VM pods on this node",
        description="The VM pods on this node: pod, tenant, namespace, state, IPs, NICs, "
                    "image, vCPUs, memory, QEMU pid, uptime (from the CRI answers)."))
    _common(sub.add_parser(
        "images", help="the stored VM images",
        description="The stored VM images with their size, digest and the pods using them."))
    con = sub.add_parser(
        "console", help="a VM's serial console (Ctrl-] detaches)",
        description="Attach to a VM's serial console through the daemon (as kubectl "
                    "attach does); the console log keeps receiving it. Ctrl-] detaches and "
                    "leaves the VM running. POD is a sandbox id (or its first 6+ "
                    "characters), NAMESPACE/NAME, TENANT/NAMESPACE/NAME or a unique NAME.")
    con.add_argument("pod", metavar="POD")
    con.add_argument("--force", action="store_true",
                     help="type even when another writer is attached")
    con.add_argument("--linger", type=float, default=2.0, metavar="SECONDS",
                     help="with stdin from a pipe: how long to stay after its end (2)")
    _common(con, output=False)
    diag = sub.add_parser(
        "diagnose", help="a tarball for a bug report (secrets removed)",
        description="Writes a .tar.gz of the daemon's journal (or --log-file), the state "
                    "store as JSON with secrets removed, each VM's domain XML, the pod "
                    "namespaces' links and addresses, CNI results, versions and the "
                    "configuration. Run as root on the node.")
    _common(diag, output=False)
    diag.add_argument("-o", "--output", metavar="FILE",
                      help="the tarball (./arktos-vm-runtime-diagnose-TIME.tar.gz)")
    diag.add_argument("--config", metavar="FILE",
                      help="the daemon's config file, read when the daemon does not answer")
    diag.add_argument("--log-file", metavar="FILE",
                      help="the daemon's log file, used when the journal has no entries")


def run(args: argparse.Namespace) -> int:
    try:
        if args.command == "diagnose":
            from . import diagnose
            return diagnose.run(args.listen, args.output, args.config, args.log_file,
                                args.timeout)
        with Client(args.listen, args.timeout) as c:
            if args.command == "console":
                from . import console
                return console.run(c, args.pod, args.force, args.linger)
            from . import views
            if args.command == "pods":
                print(views.show_pods(views.pod_rows(c), args.output))
            else:
                print(views.show_images(views.image_rows(c), args.output))
            return 0
    except CliError as e:
        print(f"arktos-vm-runtime {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
