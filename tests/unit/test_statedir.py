"""The state directory checked at startup: a symlink, a group/world-writable directory,
another owner, or one QEMU cannot traverse to is refused with a StartupError naming the
problem; a new one is made 0711 whatever the umask; store files are made private."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from arktos_vm_runtime.daemon.main import qemu_is_another_user
from arktos_vm_runtime.errors import StartupError
from arktos_vm_runtime.service.statedir import StateDir
from tests.daemon_proc import run_cli


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_a_new_state_dir_is_made_0711_whatever_the_umask(short_tmp: Path) -> None:
    old = os.umask(0o077)
    try:
        s = StateDir(str(short_tmp / "a" / "state"), qemu_must_reach=True)
    finally:
        os.umask(old)
    s.close()
    assert _mode(short_tmp / "a" / "state") == 0o711
    assert _mode(short_tmp / "a") == 0o711


def test_store_files_of_a_looser_umask_are_made_private(short_tmp: Path) -> None:
    old = os.umask(0o022)
    try:
        s = StateDir(str(short_tmp / "state"))
        s.store.put("sandboxes", "x", {"secret": "user-data"})
        s.close()
        for p in (short_tmp / "state").glob("state.db*"):
            os.chmod(p, 0o644)  # as the previous version left them under umask 022
        s = StateDir(str(short_tmp / "state"))
    finally:
        os.umask(old)
    made = [p for p in (short_tmp / "state").iterdir() if p.name.startswith("state.db")]
    assert made and all(_mode(p) == 0o600 for p in made), {p.name: oct(_mode(p)) for p in made}
    s.close()


def test_a_symlinked_state_dir_is_refused(short_tmp: Path) -> None:
    (short_tmp / "real").mkdir(mode=0o711)
    (short_tmp / "link").symlink_to(short_tmp / "real")
    with pytest.raises(StartupError, match="is a symlink"):
        StateDir(str(short_tmp / "link"))
    assert not (short_tmp / "real" / "lock").exists()


@pytest.mark.parametrize("mode", [0o777, 0o771, 0o1777])
def test_a_group_or_world_writable_state_dir_is_refused(short_tmp: Path, mode: int) -> None:
    d = short_tmp / "state"
    d.mkdir()
    os.chmod(d, mode)
    with pytest.raises(StartupError, match=f"writable by group or others .mode {mode:04o}"):
        StateDir(str(d))


def test_a_state_dir_owned_by_another_user_is_refused(short_tmp: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root to give a directory away (the unit tier runs as root here)")
    d = short_tmp / "state"
    d.mkdir(mode=0o711)
    os.chown(d, 65534, 65534)
    with pytest.raises(StartupError, match="owned by uid 65534"):
        StateDir(str(d))


def test_a_state_dir_qemu_cannot_reach_is_refused(short_tmp: Path) -> None:
    closed = short_tmp / "closed"
    closed.mkdir(mode=0o700)
    os.chmod(closed, 0o700)
    with pytest.raises(StartupError, match=f"{closed} has mode 0700, without x for others"):
        StateDir(str(closed / "state"), qemu_must_reach=True)
    StateDir(str(closed / "state2")).close()  # QEMU as this user (test:///default): fine
    with pytest.raises(StartupError, match="mode 0700"):
        StateDir(str(closed / "state2"), qemu_must_reach=True)


def test_which_libvirt_uris_run_qemu_as_another_user() -> None:
    assert qemu_is_another_user("qemu:///system")
    assert qemu_is_another_user("qemu+unix:///system?socket=/run/x.sock")
    assert not qemu_is_another_user("qemu:///session")
    assert not qemu_is_another_user("test:///default")


def test_the_daemon_refuses_to_start_naming_the_problem(short_tmp: Path) -> None:
    (short_tmp / "real").mkdir(mode=0o711)
    (short_tmp / "link").symlink_to(short_tmp / "real")
    r = run_cli("serve", "--listen", str(short_tmp / "s.sock"), "--state-dir",
                str(short_tmp / "link"), "--libvirt-uri", "test:///default")
    assert r.returncode == 1
    assert f"error: state dir {short_tmp / 'link'} is a symlink" in r.stderr
