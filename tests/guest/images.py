"""Test guests built from Debian packages on first use, and cached.

    cloud_guest_image()  Debian bookworm + cloud-init + qemu-guest-agent, one qcow2
    minimal_guest()      cloud kernel + busybox initramfs (MINIMAL-GUEST-UP on ttyS0),
                         as kernel/initrd for direct boot and as a tiny bootable qcow2

The cache ($AVR_TEST_CACHE, default /var/cache/arktos-vm-runtime-tests) is keyed by a sha256 of
the build scripts, so editing a script rebuilds and nothing else does. One lock serialises builds
across processes (parallel pytest runs and CI share the cache and the .deb cache), and each
artefact appears under its final name only complete, by rename.

CLI (CI runs it before the tests, so no test pays for a build):
    python -m tests.guest.images [cloud|minimal|all]   build if needed, print the paths
    python -m tests.guest.images prune                 remove artefacts of older scripts
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = "/var/cache/arktos-vm-runtime-tests"

# Every file a build reads, so the key changes whenever the result could.
CLOUD_INPUTS = ("build-cloud-guest.sh", "lib.sh")
MINIMAL_INPUTS = ("build-minimal-guest.sh", "lib.sh", "minimal-init.sh")

# What the guests print on ttyS0 once up (cloud: only if user-data's runcmd echoes it).
MINIMAL_MARKER = "MINIMAL-GUEST-UP"
MINIMAL_CMDLINE = "console=ttyS0"


class GuestBuildError(RuntimeError):
    """A build script failed; the message ends with the tail of its log."""


@dataclass(frozen=True)
class MinimalGuest:
    kernel: Path
    initrd: Path
    disk: Path
    # For direct kernel boot; the disk's GRUB passes the same. Append avr.ip=ADDR/PREFIX
    # [avr.gw=GW] or avr.ip=dhcp to configure eth0 (see minimal-init.sh).
    cmdline: str = MINIMAL_CMDLINE
    marker: str = MINIMAL_MARKER


def cache_dir() -> Path:
    return Path(os.environ.get("AVR_TEST_CACHE", DEFAULT_CACHE))


def build_key(inputs: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for name in inputs:
        h.update(name.encode() + b"\0")
        h.update((HERE / name).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def cloud_guest_path() -> Path:
    return cache_dir() / f"cloud-guest-{build_key(CLOUD_INPUTS)}.qcow2"


def minimal_guest_dir() -> Path:
    return cache_dir() / f"minimal-guest-{build_key(MINIMAL_INPUTS)}"


@contextlib.contextmanager
def _build_lock(cache: Path) -> Iterator[None]:
    # flock, not a pid file: the kernel drops it when a builder dies, so no stale lock.
    with open(cache / ".build.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run_script(script: str, out: Path, log: Path | None, scratch: Path) -> None:
    env = dict(os.environ)
    env.setdefault("AVR_DEB_CACHE", str(cache_dir() / "debs"))
    # Scratch beside the cache: same filesystem for the final rename, and away from /tmp,
    # which other test suites clean by pattern.
    env["TMPDIR"] = str(scratch)
    cmd = ["bash", str(HERE / script), str(out)]
    if log is None:  # CLI: let the build talk to the terminal
        rc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL).returncode
        tail = ""
    else:
        with open(log, "wb") as f:
            rc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=f,
                                stderr=subprocess.STDOUT).returncode
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        tail = f"\n--- last lines of {log} ---\n{tail}"
    if rc != 0:
        raise GuestBuildError(f"{script} failed with exit code {rc}{tail}")


def _build(final: Path, script: str, *, verbose: bool) -> Path:
    """Run SCRIPT into a scratch path and rename the result to FINAL, once."""
    if final.exists():  # fast path, no lock: FINAL only ever appears complete
        return final
    cache = cache_dir()
    if not cache.exists():
        # Readable by libvirt-qemu whatever the umask: QEMU opens the images from here.
        cache.mkdir(parents=True)
        cache.chmod(0o755)
    with _build_lock(cache):
        if final.exists():  # another process built it while we waited
            return final
        if os.geteuid() != 0:
            raise GuestBuildError(f"building {final.name} needs root (mmdebstrap, chroot)")
        scratch_root = cache / "tmp"
        scratch_root.mkdir(exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f"{final.name}.", dir=scratch_root))
        try:
            out = scratch / final.name
            log = None if verbose else cache / f"{final.name}.log"
            _run_script(script, out, log, scratch)
            # libvirt runs QEMU as libvirt-qemu, which must read the image as a backing file.
            for p in [out, *out.rglob("*")] if out.is_dir() else [out]:
                p.chmod(0o755 if p.is_dir() else 0o644)
            os.rename(out, final)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return final


def cloud_guest_image(*, verbose: bool = False) -> Path:
    """The cloud-init guest's qcow2 (read-only base: boot it through an overlay)."""
    return _build(cloud_guest_path(), "build-cloud-guest.sh", verbose=verbose)


def minimal_guest(*, verbose: bool = False) -> MinimalGuest:
    """The busybox guest: kernel + initrd for direct boot, and a bootable qcow2."""
    d = _build(minimal_guest_dir(), "build-minimal-guest.sh", verbose=verbose)
    return MinimalGuest(kernel=d / "vmlinuz", initrd=d / "initrd.img", disk=d / "disk.qcow2")


def prune() -> list[Path]:
    """Remove artefacts (and logs) built from other versions of the scripts."""
    cache = cache_dir()
    keep = {cloud_guest_path().name, minimal_guest_dir().name}
    removed = []
    with _build_lock(cache):
        for p in [*cache.glob("cloud-guest-*"), *cache.glob("minimal-guest-*")]:
            if p.name.removesuffix(".log") in keep:
                continue
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
    return removed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.guest.images", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", default="all", choices=["cloud", "minimal", "all", "prune"])
    ap.add_argument("-q", "--quiet", action="store_true",
                    help="send build output to a log file in the cache instead of stderr")
    args = ap.parse_args(argv)
    verbose = not args.quiet
    try:
        if args.what == "prune":
            for p in prune():
                print(f"removed {p}")
            return 0
        if args.what in ("cloud", "all"):
            print(f"cloud {cloud_guest_image(verbose=verbose)}")
        if args.what in ("minimal", "all"):
            g = minimal_guest(verbose=verbose)
            print(f"minimal-kernel {g.kernel}\nminimal-initrd {g.initrd}\nminimal-disk {g.disk}")
    except GuestBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
