"""What the tests that launch the scripts share: checkout, interpreter, mpiexec and environment, plus the
tiny KD set-up (random-init checkpoints of tiny_kd.yaml's archs and a KD YAML pointing at them)."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from guided_diffusion.config import load_config, model_and_diffusion_kwargs
from guided_diffusion.script_util import create_model_and_diffusion

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
MPIEXEC = str(Path(PY).parent / "mpiexec")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per rank: mpiexec ranks share CI's 2 cores
TINY_KD = REPO / "tests" / "configs" / "tiny_kd.yaml"


def write_tiny_checkpoints(root: Path) -> dict[str, Path]:
    """Random-init (seed 0) teacher and student checkpoints of tiny_kd.yaml's archs, saved in `root`."""
    base = load_config(TINY_KD)
    torch.manual_seed(0)
    paths = {}
    for name in ("teacher", "student"):
        model, _ = create_model_and_diffusion(**model_and_diffusion_kwargs(base[name]))
        paths[name] = root / f"{name}.pt"
        torch.save(model.state_dict(), paths[name])
    return paths


def write_kd_yaml(path: Path, teacher_pt: Path, pool: Path, teacher: dict[str, Any] | None = None,
                  student: dict[str, Any] | None = None) -> Path:
    """tiny_kd.yaml with the teacher checkpoint, pool cache path and section overrides, saved at `path`."""
    raw = OmegaConf.load(TINY_KD)
    raw.teacher.model_path, raw.teacher.tempfile = str(teacher_pt), str(pool)
    for section, values in (("teacher", teacher or {}), ("student", student or {})):
        for key, value in values.items():
            raw[section][key] = value
    OmegaConf.save(raw, path)
    return path


# Runs scripts/image_kd.py with the argv after its first item (a folder) and saves each rank's trained student
# there as rank<r>.pt: how the multi-rank tests compare the ranks' weights.
DUMP_PARAMS = textwrap.dedent(
    """
    import runpy, sys, torch
    from guided_diffusion import dist_util
    from guided_diffusion.distill import loop as kd_util

    out = sys.argv.pop(1)
    original = kd_util.KDTrainLoop.run_loop

    def run_and_dump(self):
        original(self)
        torch.save(self.model.state_dict(), f"{out}/rank{dist_util.get_rank()}.pt")

    kd_util.KDTrainLoop.run_loop = run_and_dump
    sys.argv[0] = "scripts/image_kd.py"
    runpy.run_path("scripts/image_kd.py", run_name="__main__")
    """
)
