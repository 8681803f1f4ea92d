"""DKDM's `teacher:` section: the teacher and pool keys with their defaults (the authors' names and values),
the pool modes, the spellings the authors' YAMLs use, and the checks of their values. The config loader
reads it through `config.TeacherSchema`, registered when guided_diffusion.distill is imported."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...config import TeacherSchema
from .pool import MODES, SHUFFLED


def defaults() -> dict[str, Any]:
    """Every `teacher:` key DKDM adds to the model and sampling keys, with its default."""
    return {
        "prob": 1.0,
        "prob_per_item": False,  # ours: drop single items from the loss instead of the authors' whole batch
        "BATCH": 0.4,  # rho (alias `rho`): the pool holds round(rho * T) * student batch_size states
        "input_perturb": 0.0,
        "student_clip_denoised": False,  # the authors' KDTrainLoop flag: clamp the student's x0 in vb
        "batch_size": 1,  # alias `prepare_batch_size`: teacher states advanced per call while preparing
        "model_path": "",
        "iter_choice": "dynamic_iterative_distillation",
        "tempfile": "",
        "use_fp16": False,
        "precision": "auto",
    }


def check(section: Mapping[str, Any], where: str) -> None:
    """Values the types cannot rule out: `prob` in (0, 1] and a positive `BATCH` (rho)."""
    if "prob" in section and not 0.0 < section["prob"] <= 1.0:
        raise ValueError(f"prob {section['prob']} in {where} must be in (0, 1]")
    if "BATCH" in section and section["BATCH"] <= 0.0:
        raise ValueError(f"BATCH {section['BATCH']} in {where} must be positive")


SCHEMA = TeacherSchema(
    defaults=defaults,
    choices={"iter_choice": MODES},
    value_aliases={"iter_choice": {"shffled_iterative_distillation": SHUFFLED}},  # the authors' spelling
    key_aliases={"rho": "BATCH", "prepare_batch_size": "batch_size"},  # clear names for the authors' keys
    check=check,
)
