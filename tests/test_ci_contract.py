"""The README's first two commands are exactly what CI (.ci/run) and the Makefile run: nothing hidden."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _first_code_block(text: str) -> list[str]:
    match = re.search(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S)
    assert match, "README.md has no fenced code block"
    return [line.strip() for line in match.group(1).splitlines() if line.strip() and not line.startswith("#")]


def _commands(script: str) -> list[str]:
    """Non-comment lines of a shell script, without the shebang, shell options and the cd to the root."""
    lines = [line.strip() for line in script.splitlines()]
    return [
        line for line in lines
        if line and not line.startswith("#") and not line.startswith("set -") and not line.startswith("cd ")
    ]


def _make_dry_run(target: str) -> list[str]:
    make = shutil.which("make")
    assert make, "make is not installed; CI and the README need it"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    out = subprocess.run(
        [make, "-n", "--always-make", target], cwd=ROOT, capture_output=True, text=True, env=env, check=True
    )
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def test_readme_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert text.startswith("# "), "README.md must start with its title"
    head = text.split("\n## ", 1)[0]
    assert _first_code_block(head)[:2] == ["make demo", "make test"]
    assert _first_code_block(text) == ["make demo", "make test"]


def test_ci_runs_exactly_make_test():
    run = ROOT / ".ci" / "run"
    script = run.read_text()
    assert os.access(run, os.X_OK), ".ci/run must be executable"
    assert script.startswith("#!/usr/bin/env bash\n") or script.startswith("#!/bin/bash\n")
    assert "set -euo pipefail" in script
    assert _commands(script) == ["make test"]
    assert 'cd "$(dirname "$0")/.."' in script.splitlines(), ".ci/run must cd to the repo root"


@pytest.mark.parametrize("target", ["test", "demo"])
def test_make_targets_install_first(target):
    cmds = _make_dry_run(target)
    assert cmds[0] == "bash tools/install.sh", f"make {target} must install the environment first: {cmds}"


def test_make_test_is_ruff_then_pytest():
    cmds = _make_dry_run("test")[1:]
    assert len(cmds) == 2, cmds
    assert cmds[0].endswith("/bin/ruff check .")
    assert cmds[1].endswith("/bin/python -m pytest -q tests")


def test_make_demo_runs_the_demo_script():
    cmds = _make_dry_run("demo")[1:]
    assert len(cmds) == 1 and re.search(r"/bin/python scripts/digits_demo\.py\s*$", cmds[0]), cmds
    assert (ROOT / "scripts" / "digits_demo.py").is_file()


def test_install_script_uses_requirements_and_pins():
    script = (ROOT / "tools" / "install.sh").read_text()
    assert "set -euo pipefail" in script
    assert "-r requirements.txt" in script and "-e ." in script
    reqs = (ROOT / "requirements.txt").read_text().split()
    assert "torch==2.14.1" in reqs and "torchvision==0.29.1" in reqs
