"""Cold start under socket activation (issue 13): the daemon's modules load without the
libraries only a later call needs (pyroute2: the first pod network; jinja2: the first
CreateContainer), and those load when first used."""

from __future__ import annotations

import subprocess
import sys
import textwrap

LATER = ("pyroute2", "jinja2")


def _run(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_the_daemon_starts_without_pyroute2_and_jinja2() -> None:
    loaded = _run(f"""
        import sys
        import arktos_vm_runtime.cli
        import arktos_vm_runtime.daemon.main
        print(",".join(m for m in {LATER!r} if m in sys.modules))
    """)
    assert loaded == ""


def test_they_load_on_first_use() -> None:
    out = _run("""
        import errno, sys
        from arktos_vm_runtime.adapters import netlink, templates
        from arktos_vm_runtime.errors import NotFound
        templates.environment(templates.default_template_dirs(None), autoescape=True)
        with netlink.Netlink() as nl:  # an rtnetlink socket needs no privilege to read
            assert nl.link("lo") is not None
            # a netlink error is still translated although pyroute2 came late
            try:
                nl.index("avrnolink0")
            except NotFound as e:
                assert e.context["errno"] == errno.ENODEV
        print("pyroute2" in sys.modules, "jinja2" in sys.modules)
    """)
    assert out == "True True"
