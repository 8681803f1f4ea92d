"""Fixtures shared by the test suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import guided_diffusion.distill  # noqa: F401 (registers the methods' YAML sections, as every script does)

REPO_ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("MUTMUT_HITS_DIR"):  # mutation runs (tools/mutants.sh) only

    @pytest.fixture(autouse=True)
    def _scripts_see_the_mutant_under_test():
        """script_env.ENV copied os.environ when it was imported; the scripts a test starts must run the
        mutant mutmut set for this test."""
        import script_env

        script_env.ENV["MUTANT_UNDER_TEST"] = os.environ.get("MUTANT_UNDER_TEST", "")

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_teardown(item):
        """Credit this test with the functions the scripts it started called (tools/mutmut_site), before
        mutmut files the test's own calls."""
        from mutmut.state import state

        for hits in Path(os.environ["MUTMUT_HITS_DIR"]).glob("hits-*.txt"):
            state()._stats.update(line for line in hits.read_text().split() if line)
            hits.unlink()

REFERENCE_DIR = REPO_ROOT.parent / "shared" / "reference"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository checkout (configs such as `yaml/arch/*.yaml` are relative to it)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """Reference data made from the public implementation (`../shared/reference` beside the checkout)."""
    if not (REFERENCE_DIR / "README.md").is_file():
        pytest.fail(f"reference data missing: expected {REFERENCE_DIR} (shared/reference beside the repo)")
    return REFERENCE_DIR
