"""Baseline: boot a test guest as a transient libvirt domain with nothing but libvirt-python.

    .venv/bin/python -m bench.baseline_raw_libvirt {minimal,cloud} [--runs 3] [--boot disk]

Per run: a qcow2 overlay on the cached guest image (tests/guest/images.py builds it if needed)
and a NoCloud seed ISO, then createXML of a domain like the runtime's (type 'qemu' = TCG,
machine pc, 2 vCPUs, 512 MiB, virtio disk, seed as IDE CD-ROM, serial console to a file).
Measured from the createXML call: its return, the first complete console line, and the guest's
marker line (MINIMAL-GUEST-UP, or CLOUD-INIT-MARKER echoed by the seed's runcmd). Prints each
run and min/median/max; every domain and file is removed afterwards, also on failure.
The runtime's own benchmark compares its figures against these.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import libvirt

if not __package__:  # run as a script: make tests.guest importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.guest.images import cloud_guest_image, minimal_guest

CLOUD_MARKER = "CLOUD-INIT-MARKER"
MINIMAL_MARKER = "MINIMAL-GUEST-UP"
POLL_S = 0.02


@dataclass
class Run:
    prep: float  # overlay + seed ISO
    create: float  # createXML returned (libvirt + QEMU start)
    first_line: float  # first complete line on the serial console
    marker: float


def ensure_libvirtd(uri: str) -> libvirt.virConnect:
    """Connect; with no libvirtd answering (no systemd here), start it as the tests do."""
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors arrive as exceptions
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError:
        if uri != "qemu:///system":
            raise
    for daemon in ("virtlogd", "libvirtd"):
        if subprocess.run(["pgrep", "-x", daemon], capture_output=True).returncode != 0:
            subprocess.run([daemon, "-d"], check=True)
    deadline = time.monotonic() + 15
    while True:
        try:
            return libvirt.open(uri)
        except libvirt.libvirtError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def warn_kvm_permissions() -> None:
    # /dev/kvm that QEMU's user cannot open (root-only without udev) makes libvirt 9 discard
    # its cached QEMU capabilities at every lookup: each createXML then takes about 60 s.
    try:
        st = os.stat("/dev/kvm")
    except FileNotFoundError:
        return
    if not st.st_mode & 0o060:
        print("warning: /dev/kvm is root-only; libvirt re-probes QEMU on each start "
              "(createXML ~60 s). Fix as udev would: chgrp kvm /dev/kvm; chmod 0660 /dev/kvm",
              file=sys.stderr)


def make_seed(d: Path, kind: str, run_id: str) -> Path:
    src = d / "seed"
    src.mkdir()
    (src / "meta-data").write_text(f"instance-id: {run_id}\nlocal-hostname: baseline\n")
    user_data = "#cloud-config\n"
    if kind == "cloud":
        user_data += f"runcmd:\n  - echo {CLOUD_MARKER} > /dev/ttyS0\n"
    (src / "user-data").write_text(user_data)
    iso = d / "seed.iso"
    subprocess.run(["genisoimage", "-quiet", "-o", str(iso), "-V", "cidata", "-J", "-r",
                    str(src / "user-data"), str(src / "meta-data")], check=True)
    return iso


def domain_xml(name: str, *, disk: Path, seed: Path, console: Path, vcpus: int, mem_mib: int,
               kernel: tuple[Path, Path, str] | None, agent: bool) -> str:
    q = quoteattr
    boot = "<boot dev='hd'/>"
    if kernel:
        k, i, cmdline = kernel
        boot = (f"<kernel>{escape(str(k))}</kernel><initrd>{escape(str(i))}</initrd>"
                f"<cmdline>{escape(cmdline)}</cmdline>")
    channel = ("<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/>"
               "</channel>") if agent else ""
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{mem_mib}</memory>
  <vcpu>{vcpus}</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>{boot}</os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/><source file={q(str(disk))}/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/><source file={q(str(seed))}/>
      <target dev='hdc' bus='ide'/><readonly/>
    </disk>
    <serial type='file'><source path={q(str(console))}/><target port='0'/></serial>
    {channel}
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>"""


def wait_console(console: Path, marker: bytes, t0: float, timeout: float) -> tuple[float, float]:
    first_line = None
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        try:
            data = console.read_bytes()
        except FileNotFoundError:
            data = b""
        now = time.monotonic()
        if first_line is None and b"\n" in data:
            first_line = now - t0
        if marker in data:
            return first_line if first_line is not None else now - t0, now - t0
        time.sleep(POLL_S)
    tail = data[-2000:].decode(errors="replace")
    raise TimeoutError(f"no {marker.decode()} within {timeout} s; console ends with:\n{tail}")


def one_run(conn: libvirt.virConnect, args: argparse.Namespace, base: Path,
            kernel: tuple[Path, Path, str] | None, i: int) -> Run:
    run_id = f"avr-baseline-{args.kind}-{os.getpid()}-{i}"
    d = Path(tempfile.mkdtemp(prefix="arktos-baseline.", dir=args.workdir))
    dom = None
    try:
        d.chmod(0o755)  # QEMU runs as libvirt-qemu
        t = time.monotonic()
        overlay = d / "disk.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                        str(base), str(overlay)], check=True)
        seed = make_seed(d, args.kind, run_id)
        prep = time.monotonic() - t
        console = d / "console.log"
        xml = domain_xml(run_id, disk=overlay, seed=seed, console=console, vcpus=args.vcpus,
                         mem_mib=args.memory, kernel=kernel, agent=args.kind == "cloud")
        marker = (CLOUD_MARKER if args.kind == "cloud" else MINIMAL_MARKER).encode()
        t0 = time.monotonic()
        dom = conn.createXML(xml, 0)
        create = time.monotonic() - t0
        first_line, at_marker = wait_console(console, marker, t0, args.timeout)
        return Run(prep, create, first_line, at_marker)
    finally:
        if dom is not None:
            with contextlib.suppress(libvirt.libvirtError):  # already gone
                dom.destroy()
        shutil.rmtree(d, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["minimal", "cloud"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--boot", choices=["disk", "kernel"], default="disk",
                    help="minimal guest: GRUB disk (the runtime's image model) or direct kernel")
    ap.add_argument("--uri", default="qemu:///system")
    ap.add_argument("--vcpus", type=int, default=2)
    ap.add_argument("--memory", type=int, default=512, help="MiB")
    ap.add_argument("--timeout", type=float, help="per boot, s (default 120 minimal, 300 cloud)")
    ap.add_argument("--workdir", default="/var/tmp",
                    help="scratch parent; must be reachable by the libvirt-qemu user")
    args = ap.parse_args(argv)
    if args.timeout is None:
        args.timeout = 300.0 if args.kind == "cloud" else 120.0
    if args.boot == "kernel" and args.kind != "minimal":
        ap.error("--boot kernel is for the minimal guest")

    kernel = None
    if args.kind == "cloud":
        base = cloud_guest_image()
    else:
        g = minimal_guest()
        base = g.disk
        if args.boot == "kernel":
            kernel = (g.kernel, g.initrd, g.cmdline)
    warn_kvm_permissions()
    conn = ensure_libvirtd(args.uri)
    label = f"{args.kind} ({'direct kernel' if kernel else 'disk'} boot)"
    print(f"baseline raw libvirt: {label}, {args.vcpus} vCPU, {args.memory} MiB, TCG, "
          f"{args.runs} runs; image {base}")
    print(f"{'run':>4} {'prep s':>8} {'create s':>9} {'1st line s':>11} {'marker s':>9}")
    runs = []
    try:
        for i in range(args.runs):
            r = one_run(conn, args, base, kernel, i)
            runs.append(r)
            print(f"{i + 1:>4} {r.prep:8.2f} {r.create:9.2f} {r.first_line:11.2f} "
                  f"{r.marker:9.2f}", flush=True)
    finally:
        conn.close()
    print(f"{'':<10} {'min':>8} {'median':>9} {'max':>11}")
    for field in ("prep", "create", "first_line", "marker"):
        values = [getattr(r, field) for r in runs]
        print(f"{field:<10} {min(values):8.2f} {statistics.median(values):9.2f} "
              f"{max(values):11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
