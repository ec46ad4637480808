"""The daemon as a process: its socket, its state dir, systemd's protocols, signals."""

from __future__ import annotations

import grp
import os
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.daemon_proc import APIS, PYTHON, Daemon, NotifyListener, run_cli


def _version(d: Daemon, api: str = "v1alpha2") -> str:
    pb, _ = APIS[api]
    return d.runtime(api).Version(pb.VersionRequest(), timeout=10).runtime_api_version


def test_socket_is_0660_with_the_configured_group(short_tmp: Path) -> None:
    group = grp.getgrnam("daemon")
    d = Daemon(short_tmp, args=["--socket-group", "daemon"]).start()
    try:
        st = os.stat(d.socket)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == group.gr_gid
        parent = os.stat(os.path.dirname(d.socket))
        assert parent.st_uid == 0 and not parent.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    finally:
        assert d.stop() == 0
    assert not os.path.exists(d.socket), "the daemon removes the socket it created"


def test_stale_socket_is_replaced_but_a_live_one_is_not(short_tmp: Path) -> None:
    run = short_tmp / "run"
    run.mkdir(mode=0o755)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(run / "virtlet.sock"))
    stale.close()  # the file stays, nothing listens: a crashed daemon's leftover
    d = Daemon(short_tmp).start()
    try:
        assert _version(d) == "v1alpha2"
        other = short_tmp / "other"
        other.mkdir()
        r = run_cli("serve", "--listen", d.socket, "--state-dir", str(other / "state"),
                    "--libvirt-uri", "test:///default")
        assert r.returncode != 0
        assert r.stderr.strip() == f"arktos-vm-runtime: error: another daemon is already " \
                                   f"serving on {d.socket}"
        assert _version(d) == "v1alpha2", "the running daemon is untouched"
    finally:
        d.stop()


def test_refuses_to_replace_a_file_that_is_not_a_socket(short_tmp: Path) -> None:
    (short_tmp / "run").mkdir()
    (short_tmp / "run" / "virtlet.sock").write_text("precious")
    r = run_cli("serve", "--listen", str(short_tmp / "run" / "virtlet.sock"),
                "--state-dir", str(short_tmp / "state"), "--libvirt-uri", "test:///default")
    assert r.returncode == 1
    assert "is not a socket" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (short_tmp / "run" / "virtlet.sock").read_text() == "precious"


def test_second_daemon_on_the_same_state_dir_fails(daemon: Daemon, short_tmp: Path) -> None:
    r = run_cli("serve", "--listen", str(short_tmp / "run" / "two.sock"),
                "--state-dir", daemon.state_dir, "--libvirt-uri", "test:///default")
    assert r.returncode == 1
    line = r.stderr.strip()
    assert "is in use by another arktos-vm-runtime" in line and str(daemon.proc.pid) in line
    assert len(line.splitlines()) == 1


@pytest.mark.parametrize("case", ["long-socket", "state-not-writable", "bad-config"])
def test_bad_settings_fail_at_start_with_one_line(short_tmp: Path, case: str) -> None:
    args = ["serve", "--listen", str(short_tmp / "s.sock"), "--state-dir",
            str(short_tmp / "state"), "--libvirt-uri", "test:///default"]
    expect = ""
    if case == "long-socket":
        args[2] = "/tmp/" + "x" * 120 + ".sock"
        expect = "a unix socket path can hold at most 107"
    elif case == "state-not-writable":
        (short_tmp / "file").write_text("")
        args[4] = str(short_tmp / "file" / "state")
        expect = "cannot be written"
    else:
        (short_tmp / "c.yaml").write_text("listen: [1, 2]\n")
        args += ["--config", str(short_tmp / "c.yaml")]
        expect = "setting listen"
    r = run_cli(*args)
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert expect in r.stderr


def test_config_file_is_read_and_flags_win(short_tmp: Path) -> None:
    cfg = short_tmp / "config.yaml"
    cfg.write_text(f"libvirt-uri: qemu+unix:///x?socket=/nonexistent\n"
                   f"cni_conf_dir: {short_tmp}/from-config\nimage-download-protocol: http\n")
    d = Daemon(short_tmp, args=["--config", str(cfg)]).start()
    try:
        pb, _ = APIS["v1"]
        info = d.runtime("v1").Status(pb.StatusRequest(verbose=True), timeout=5).info
        import json
        config = json.loads(info["config"])
        assert config["libvirt_uri"] == "test:///default", "the flag wins over the file"
        assert config["cni_conf_dir"] == str(d.cni_dir)
        assert config["image_download_protocol"] == "http", "the file wins over the default"
    finally:
        d.stop()


def test_sd_notify_ready_status_watchdog_stopping_and_exit_0(short_tmp: Path) -> None:
    d = Daemon(short_tmp, env={"WATCHDOG_USEC": "400000"}).start()
    assert d.notify is not None
    ready = d.notify.wait_for("READY=1", 5)
    assert "STATUS=serving CRI v1alpha2+v1 on " + d.socket in ready
    assert f"MAINPID={d.proc.pid}" in ready
    d.notify.wait_for("WATCHDOG=1", 3)
    t0 = time.monotonic()
    pings = 0
    while time.monotonic() - t0 < 2:
        pings += sum(m == "WATCHDOG=1" for m in d.notify.drain(0.3))
    assert pings >= 6, f"expected a ping every 0.2 s, got {pings} in 2 s"
    d.signal(signal.SIGTERM)
    assert d.proc.wait(30) == 0
    stopping = d.notify.wait_for("STOPPING=1", 2)
    assert "VMs keep running" in stopping
    d.stop()


def _wedged_libvirtd(path: Path) -> socket.socket:
    """A socket that accepts libvirt connections and never answers: a hung libvirtd."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(8)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            held.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    return srv


def test_watchdog_stops_while_libvirt_is_wedged(short_tmp: Path) -> None:
    wedge = _wedged_libvirtd(short_tmp / "libvirt.sock")
    cfg = short_tmp / "c.yaml"
    cfg.write_text("libvirt-probe-timeout: 1.5\n")
    d = Daemon(short_tmp, args=["--config", str(cfg)], env={"WATCHDOG_USEC": "400000"},
               libvirt_uri=f"qemu+unix:///system?socket={short_tmp}/libvirt.sock")
    d.start()
    try:
        assert d.notify is not None
        d.notify.drain(0.5)
        time.sleep(2.5)  # the probe hangs; after 1.5 s the daemon counts libvirt as wedged
        d.notify.drain(0.1)
        # Two seconds of listening (a STATUS= may come meanwhile: the one the full queue
        # had no room for, sent again), and no ping among what came.
        quiet_since, got = time.monotonic(), []
        while (left := 2.0 - (time.monotonic() - quiet_since)) > 0:
            got += d.notify.drain(left)
        assert "WATCHDOG=1" not in got, f"pings went on while libvirt hung: {got}"
        # The daemon itself still answers, and says why it is not ready.
        pb, _ = APIS["v1"]
        r = d.runtime("v1").Status(pb.StatusRequest(), timeout=5)
        cond = {c.type: c for c in r.status.conditions}["RuntimeReady"]
        assert not cond.status and cond.reason == "LibvirtNotResponding"
        assert "libvirt: LibvirtNotResponding" in "".join(m for _, m in d.notify.messages)
    finally:
        d.stop()
        wedge.close()


def test_watchdog_keeps_pinging_while_libvirt_is_merely_down(short_tmp: Path) -> None:
    """Restarting the daemon would not bring libvirtd back: that is not a wedge."""
    d = Daemon(short_tmp, env={"WATCHDOG_USEC": "400000"},
               libvirt_uri=f"qemu+unix:///system?socket={short_tmp}/absent.sock").start()
    try:
        assert d.notify is not None
        time.sleep(1.0)
        d.notify.drain(0.1)
        got = d.notify.drain(1.5)
        got += d.notify.drain(0.5)
        assert "WATCHDOG=1" in got
    finally:
        d.stop()


def test_socket_activation_answers_the_connection_that_started_it(short_tmp: Path) -> None:
    activate = shutil.which("systemd-socket-activate")
    assert activate, "systemd-socket-activate (package systemd) is needed for this test"
    run = short_tmp / "run"
    run.mkdir(mode=0o755)
    sock = str(run / "virtlet.sock")
    notify = NotifyListener(short_tmp / "notify.sock")
    log = open(short_tmp / "daemon.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [activate, "-l", sock, "-E", f"NOTIFY_SOCKET={notify.path}",
         "-E", "PYTHONPATH=" + os.environ.get("PYTHONPATH", ""),
         PYTHON, "-m", "arktos_vm_runtime", "serve", "--listen", sock,
         "--state-dir", str(short_tmp / "state"), "--libvirt-uri", "test:///default"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
            time.sleep(0.05)
        assert not notify.drain(0.2), "nothing may start before the first connection"
        d = Daemon.__new__(Daemon)
        d.socket, d._channel = sock, None
        # This first call is what starts the daemon; it must be answered, not time out.
        assert _version(d, "v1alpha2") == "v1alpha2"
        assert _version(d, "v1") == "v1"
        notify.wait_for("READY=1", 5)
        assert os.path.exists(short_tmp / "state" / "private" / "grpc.sock")
        assert os.path.exists(sock), "systemd's socket stays in place"
        d.channel.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
        log.close()
        notify.close()
    assert rc == 0, (short_tmp / "daemon.log").read_text()


def test_journald_native_protocol_carries_structured_fields(short_tmp: Path) -> None:
    """Under journald (JOURNAL_STREAM names our stderr) entries go to the journal socket
    with CRI_METHOD, GRPC_CODE and ids as fields. A real journald is not running here, so
    the test binds the journal's socket path itself and reads the datagrams; the booted
    systemd of the system tests checks `journalctl -o json` end to end."""
    path = "/run/systemd/journal/socket"
    assert not os.path.exists(path), f"{path} exists: a journald runs; use the system tests"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(path)
    try:
        errlog = short_tmp / "stderr.log"
        with open(errlog, "wb") as f:
            st = os.fstat(f.fileno())
            d = Daemon(short_tmp, env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
            d._logf = f
            d.proc = subprocess.Popen(d.argv, env=d.env, stdout=f, stderr=f)
            d.wait_ready()
            pb, _ = APIS["v1alpha2"]
            # Stopping a container that is not there succeeds, and is logged.
            d.runtime("v1alpha2").StopContainer(
                pb.StopContainerRequest(container_id="abc123"), timeout=5)
            entries = []
            journal.settimeout(3)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                try:
                    data = journal.recv(1 << 20).decode(errors="replace")
                except TimeoutError:
                    break
                fields = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
                entries.append(fields)
                if fields.get("CRI_METHOD") == "StopContainer":
                    break
            d.stop()
        hit = [e for e in entries if e.get("CRI_METHOD") == "StopContainer"]
        assert hit, f"no StopContainer entry among {entries}"
        e = hit[0]
        assert e["CONTAINER_ID"] == "abc123"
        assert e["GRPC_CODE"] == "OK" and e["SYSLOG_IDENTIFIER"] == "arktos-vm-runtime"
        assert e["PRIORITY"] == "6"  # INFO
        assert "StopContainer" not in errlog.read_text(), "journald mode: nothing on stderr"
    finally:
        journal.close()
        os.unlink(path)
