"""The bash completion the .deb ships names exactly the parser's commands and flags, and
bash itself completes with it."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from arktos_vm_runtime.cli import build_parser

COMPLETION = Path(__file__).parents[2] / "packaging" / "completion" / "arktos-vm-runtime"


def parser_flags() -> dict[str, set[str]]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: {o for a in p._actions for o in a.option_strings
                   if o.startswith("--") and o != "--help"} for name, p in sub.choices.items()}


def test_completion_lists_the_parsers_commands_and_flags() -> None:
    text = COMPLETION.read_text()
    flags = parser_flags()
    commands = re.search(r'local commands="([^"]*)"', text)
    assert commands and set(commands.group(1).split()) == set(flags)
    for line in re.findall(r"^\s+([a-z|]+)\) flags=\"([^\"]*)\"", text, re.M):
        names, listed = line
        for name in names.split("|"):
            assert set(listed.split()) == flags[name], name


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_bash_completes_with_it() -> None:
    def complete(*words: str) -> list[str]:
        script = (f"source {COMPLETION}\nCOMP_WORDS=(arktos-vm-runtime {' '.join(words)})\n"
                  f"COMP_CWORD={len(words)}\n_arktos_vm_runtime\n"
                  'printf "%s\\n" "${COMPREPLY[@]}"\n')
        r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        return r.stdout.split()

    assert complete("d") == ["diagnose"]
    assert set(complete("pods", "--")) == {"--listen", "--output", "--timeout", "--help"}
    assert complete("pods", "-o", "j") == ["json"]
    assert "--metrics-port" in complete("serve", "--metrics")
