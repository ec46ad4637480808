"""The real SPDY client for the streaming tests: tests/go/spdyclient (on
github.com/docker/spdystream, the library client-go's remotecommand and portforward use),
built on first use into the test cache ($AVR_TEST_CACHE, see tests/guest/images.py) keyed by
a sha256 of its source. Needs Debian's golang-go and golang-github-docker-spdystream-dev
(tools/setup installs both); builds offline in GOPATH mode.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.guest.images import cache_dir

SOURCE = Path(__file__).resolve().parent / "go" / "spdyclient" / "main.go"
GOPATH = "/usr/share/gocode"
SPDYSTREAM = Path(GOPATH) / "src/github.com/docker/spdystream"


class GoClientUnavailable(RuntimeError):
    pass


def spdyclient() -> Path:
    """The built client's path (building it if its source changed)."""
    key = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    cache = cache_dir()
    out = cache / f"spdyclient-{key}"
    if out.exists():
        return out
    go = shutil.which("go")
    if go is None:
        raise GoClientUnavailable("the streaming tests need Go to build tests/go/spdyclient: "
                                  "apt-get install golang-go golang-github-docker-spdystream-dev"
                                  " (tools/setup does)")
    if not SPDYSTREAM.is_dir():
        raise GoClientUnavailable(f"{SPDYSTREAM} missing: apt-get install "
                                  "golang-github-docker-spdystream-dev (tools/setup does)")
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".spdyclient.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.exists():
            return out
        with tempfile.TemporaryDirectory(prefix="spdyclient-") as tmp:
            src = Path(tmp) / "main.go"
            shutil.copy(SOURCE, src)
            env = dict(os.environ, GO111MODULE="off", GOPATH=GOPATH, GOFLAGS="",
                       GOCACHE=str(cache / "gocache"), CGO_ENABLED="0")
            r = subprocess.run([go, "build", "-o", str(Path(tmp) / "bin"), str(src)],
                               env=env, cwd=tmp, capture_output=True, text=True, timeout=300)
            if r.returncode != 0:
                raise GoClientUnavailable(f"building tests/go/spdyclient failed:\n{r.stderr}")
            os.replace(Path(tmp) / "bin", out)
    return out


if __name__ == "__main__":      # tools/test builds it before the tests, like the guests
    print(spdyclient())
