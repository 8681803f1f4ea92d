"""The README's first two commands are exactly what CI (.ci/run) and the Makefile run: nothing hidden."""

import ast
import os
import re
import shutil
import subprocess
import sys
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
        line
        for line in lines
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
    assert cmds[1].endswith("/bin/python -m pytest -q -n 2 tests")


def test_make_demo_runs_the_demo_script():
    cmds = _make_dry_run("demo")[1:]
    assert len(cmds) == 1 and re.search(r"/bin/python scripts/digits_demo\.py\s*$", cmds[0]), cmds
    assert (ROOT / "scripts" / "digits_demo.py").is_file()


def test_install_script_uses_requirements_and_pins():
    script = (ROOT / "tools" / "install.sh").read_text()
    assert "set -euo pipefail" in script
    assert "-c constraints.txt -r requirements.txt -r requirements-dev.txt" in script and "-e ." in script
    pins = _requirement_names(ROOT / "constraints.txt", pinned=True)
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"


def _requirement_names(path: Path, pinned: bool = False) -> dict[str, str]:
    """name -> pinned version (or "") of a requirements or constraints file, names normalised."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line or line.startswith("-"):
            continue
        name, _, version = line.partition("==")
        assert bool(version) == pinned, f"{path.name}: {line!r} (pins belong in constraints.txt only)"
        out[name.strip().lower().replace("_", "-")] = version.strip()
    return out


# import name -> distribution name, where they differ
_DISTRIBUTION = {"PIL": "pillow", "sklearn": "scikit-learn", "yaml": "pyyaml", "tensorflow": "tensorflow-cpu"}
# the repo's packages, and the modules tests import from benchmarks/ and tests/ by putting those on sys.path
_LOCAL = {"guided_diffusion", "evaluations", "datasets", "benchmarks", "scripts", "tests"} | {
    path.stem for folder in ("benchmarks", "tests") for path in (ROOT / folder).glob("*.py")
}


def _third_party_imports(*folders: str) -> set[str]:
    found = set()
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in _LOCAL:
                        found.add(_DISTRIBUTION.get(top, top))
    return found


def test_packaging_matches_what_the_code_imports():
    """setup.py (install_requires + extras) names exactly the distributions the package and scripts import;
    runtime requirements and dev tools are separate files; every name has one pin in constraints.txt."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {
        k.arg: ast.literal_eval(k.value)
        for k in call.keywords
        if k.arg in ("install_requires", "extras_require")
    }
    extras = kw["extras_require"]
    declared = set(kw["install_requires"]) | {name for names in extras.values() for name in names}
    code = _third_party_imports("guided_diffusion", "evaluations", "scripts", "datasets")
    assert code <= declared, f"imported but not declared in setup.py: {sorted(code - declared)}"
    tools = set(extras["dev"])
    assert declared - tools - code <= {"mpich"}, (
        f"declared but never imported: {sorted(declared - tools - code)}"
    )
    assert {"scipy", "pillow"} <= set(kw["install_requires"])
    runtime = _requirement_names(ROOT / "requirements.txt")
    dev = _requirement_names(ROOT / "requirements-dev.txt")
    assert tools <= set(dev) and not tools & set(runtime), "pytest/ruff belong in requirements-dev.txt only"
    assert declared - tools <= set(runtime) | set(dev)
    tests_need = _third_party_imports("tests", "benchmarks") - {"tensorflow-cpu"}
    assert tests_need <= set(runtime) | set(dev), sorted(tests_need - set(runtime) - set(dev))
    pins = _requirement_names(ROOT / "constraints.txt", pinned=True)
    assert set(runtime) | set(dev) <= set(pins), sorted((set(runtime) | set(dev)) - set(pins))
