"""Every script and data tool runs from a checkout as the authors' do, without `pip install -e .`: run with
site processing off (so the editable install's path hook is absent) from another folder, `--help` works."""

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = sorted(
    str(p.relative_to(REPO))
    for folder in ("scripts", "datasets", "evaluations")
    for p in (REPO / folder).glob("*.py")
    if '__name__ == "__main__"' in p.read_text()
)


def test_the_tools_are_found():
    assert {"scripts/image_kd.py", "scripts/step_distill.py", "datasets/digits.py",
            "evaluations/evaluator.py"} <= set(TOOLS)


@pytest.mark.parametrize("tool", TOOLS)
def test_tool_runs_without_the_package_installed(tool, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(site.getsitepackages()), "OMP_NUM_THREADS": "1"}
    probe = subprocess.run([sys.executable, "-S", "-c", "import guided_diffusion"], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
    assert probe.returncode != 0, "the package is importable without the checkout on the path: no test"
    proc = subprocess.run([sys.executable, "-S", str(REPO / tool), "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout.lower()
