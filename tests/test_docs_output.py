"""The outputs shown in the docs are what the commands print.

A teaching page shows a command's expected output in a fenced block tagged `console`: the first
line is the command after `$ `, the rest is what it prints, stdout and stderr together, as a
terminal shows them. Every such command runs on the local runtime with fixed costs (or needs no
clock at all), so its output is the same on every machine; this test runs each one and compares
the whole output, line by line. A doc change that shows stale output, or a code change that
changes what a documented command prints, fails here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```console\n\$ (?P<command>[^\n]+)\n(?P<output>.*?)^```", re.M | re.S)


def documented() -> list[tuple[str, str, str]]:
    """(page, command, expected output) for every `console` block of README.md and docs/."""
    out = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for m in BLOCK.finditer(page.read_text()):
            out.append((page.name, m["command"], m["output"]))
    return out


def run(command: str) -> str:
    argv = shlex.split(command)
    if argv[0] == "minipipe":
        argv = [sys.executable, "-m", "minipipe", *argv[1:]]
    elif argv[0] == "python":
        argv = [sys.executable, *argv[1:]]
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    r = subprocess.run(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stdout
    return r.stdout


def lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.rstrip("\n").split("\n")]


def test_the_docs_show_outputs():
    pages = {page for page, _, _ in documented()}
    assert {"runtime.md", "pipeinfer.md", "specpipe.md", "kvcache.md"} <= pages, pages


@pytest.mark.parametrize("page, command, expected", documented(),
                         ids=[f"{page}-{i}" for i, (page, _, _) in enumerate(documented())])
def test_documented_output_is_what_the_command_prints(page, command, expected):
    got = lines(run(command))
    want = lines(expected)
    assert got == want, f"{page}: `{command}` prints\n" + "\n".join(got)
