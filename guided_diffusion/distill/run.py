"""One way to build a distillation run from a resolved config: the scripts, the demo, the benchmarks and
the tests all call `build_run` (DKDM, TCCD and their extra terms) or `build_step_distill_run`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .. import dist_util, logger
from ..run_setup import build_model_and_diffusion, load_model_weights
from ..train_util import loop_kwargs
from .dkdm.setup import (
    KDSetupError,
    check_diffusions,
    check_sections,
    check_tempfile,
    load_teacher,
    make_dynamic_batch,
)
from .loop import KDTrainLoop
from .objective import RunParts, build_objectives
from .progressive import StepDistillLoop, check_same_head, resolve_step_distill_config
from .relational import build_relational_term

RUN_SECTIONS = ("teacher", "student", "config")  # top-level keys that are not method sections


def method_sections(cfg: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The config's method sections (`tccd:`, `relational:`, ...) in YAML order."""
    return {name: cfg[name] for name in cfg if name not in RUN_SECTIONS}


def check_kd_config(cfg: Mapping[str, Any]) -> str:
    """The checks a DKDM run makes before any work (KDSetupError with the reason); returns the pool
    cache path."""
    if "teacher" not in cfg:
        raise KDSetupError("not a KD config (no teacher: section)")
    if "step_distill" in cfg:
        raise KDSetupError("a step_distill: config is progressive distillation: run scripts/step_distill.py")
    check_sections(cfg["teacher"], cfg["student"])
    return check_tempfile(cfg["teacher"])


def build_run(
    cfg: Mapping[str, Any],
    run_dir: str | None,
    *,
    classifier_path: str = "",
    device: torch.device | None = None,
) -> KDTrainLoop:
    """Teacher (strict load, frozen), student (optionally initialized from `student.model_path`), the
    rank's pool and every method section's objective, assembled into the DKDM loop writing to `run_dir`."""
    tempfile = check_kd_config(cfg)
    teacher_s, student_s = cfg["teacher"], cfg["student"]
    device = device or dist_util.dev()
    teacher, teacher_diffusion = load_teacher(teacher_s, device)
    student, student_diffusion = build_model_and_diffusion(student_s, device)
    check_diffusions(teacher_diffusion, student_diffusion)
    if student_s["model_path"] and not student_s["resume_checkpoint"]:
        logger.log(f"initializing the student from {student_s['model_path']}")
        load_model_weights(student, student_s["model_path"], student_s)
    pool = make_dynamic_batch(teacher_s, student_s, teacher, teacher_diffusion, student_diffusion, device)
    parts = RunParts(
        teacher=teacher, teacher_diffusion=teacher_diffusion, student=student,
        student_diffusion=student_diffusion, cfg=cfg, device=device, pool=pool,
        classifier_path=classifier_path,
    )
    return KDTrainLoop(
        teacher=teacher, teacher_diffusion=teacher_diffusion, dynamic_batch=pool, tempfile=tempfile,
        objectives=build_objectives(method_sections(cfg), parts),
        input_perturb=teacher_s["input_perturb"], student_clip_denoised=teacher_s["student_clip_denoised"],
        cache_save_interval=student_s["cache_save_interval"],
        model=student, diffusion=student_diffusion, batch_size=pool.batch_size,
        **loop_kwargs(student_s, student_diffusion, run_dir),
    )


def build_step_distill_run(
    cfg: Mapping[str, Any], run_dir: str | None, *, classifier_path: str = "",
    device: torch.device | None = None,
) -> StepDistillLoop:
    """Teacher, student (a copy of the teacher unless student.model_path or resuming), data and relational
    term of a step-distillation config, assembled into its loop writing to `run_dir`."""
    from ..image_datasets import load_data

    teacher_s, student_s = cfg["teacher"], cfg["student"]
    step_cfg = resolve_step_distill_config(cfg["step_distill"])
    classifier_path = classifier_path or step_cfg["classifier_path"]
    check_sections(teacher_s, student_s)
    device = device or dist_util.dev()
    teacher, teacher_diffusion = load_teacher(teacher_s, device)
    student, student_diffusion = build_model_and_diffusion(student_s, device)
    from_teacher = not student_s["model_path"] and step_cfg["init_from_teacher"]
    if from_teacher:
        check_same_head(teacher_diffusion, student_diffusion)
    init = student_s["model_path"] or (teacher_s["model_path"] if from_teacher else "")
    if init and not student_s["resume_checkpoint"]:
        logger.log(f"initializing the student from {init}")
        load_model_weights(student, init)
    relational = build_relational_term(cfg, student, teacher, classifier_path, device)
    per_rank = student_s["batch_size"] // dist_util.get_world_size()
    data = load_data(
        data_dir=student_s["data_dir"], batch_size=per_rank, image_size=student_s["image_size"],
        class_cond=student_s["class_cond"], seed=student_s["seed"],
    )
    return StepDistillLoop(
        teacher=teacher, teacher_diffusion=teacher_diffusion, step_config=step_cfg, relational=relational,
        model=student, diffusion=student_diffusion, data=data, batch_size=per_rank,
        **loop_kwargs(student_s, student_diffusion, run_dir),
    )
