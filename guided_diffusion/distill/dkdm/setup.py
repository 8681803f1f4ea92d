"""DKDM's run pieces: the checks on teacher and student, the frozen teacher, the per-rank pool."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from ... import dist_util
from ...config import model_and_diffusion_kwargs
from ...infra.mixed_precision import ADM_FP16, apply_adm_fp16, resolve_precision
from ...run_setup import build_model_and_diffusion, load_model_weights
from ...script_util import create_gaussian_diffusion
from .pool import ITERATIVE, DynamicBatch


class KDSetupError(ValueError):
    """Teacher and student (or their configs) cannot be distilled together; the message says why."""


def check_diffusions(teacher_diffusion: Any, student_diffusion: Any) -> None:
    """Teacher and student may differ in respacing only if they keep the same number of steps T."""
    t_teacher, t_student = teacher_diffusion.num_timesteps, student_diffusion.num_timesteps
    if t_teacher != t_student:
        raise KDSetupError(
            f"teacher diffusion has T={t_teacher} steps but the student's has T={t_student}; DKDM trains the "
            "student on the teacher's own steps, so set the same timestep_respacing/diffusion_steps"
        )


def check_sections(teacher: Mapping[str, Any], student: Mapping[str, Any]) -> None:
    """Pixel-space distillation needs the same image size, no class conditioning (as the authors)."""
    if teacher["image_size"] != student["image_size"]:
        raise KDSetupError(
            f"teacher image_size {teacher['image_size']} != student image_size {student['image_size']}"
        )
    if teacher["class_cond"] or student["class_cond"]:
        raise KDSetupError("class-conditional DKDM is not supported (class_cond must be false)")


def load_teacher(section: Mapping[str, Any], device: torch.device) -> tuple[torch.nn.Module, Any]:
    """Build the teacher from its section and load `model_path` strictly; frozen, in eval mode."""
    if not section["model_path"]:
        raise KDSetupError("teacher.model_path is empty: DKDM needs a pretrained teacher checkpoint")
    model, diffusion = build_model_and_diffusion(section, device)
    load_model_weights(model, section["model_path"], section)
    model.eval().requires_grad_(False)
    return model, diffusion


def make_dynamic_batch(
    teacher_section: Mapping[str, Any],
    student_section: Mapping[str, Any],
    teacher: torch.nn.Module,
    teacher_diffusion: Any,
    student_diffusion: Any,
    device: torch.device,
) -> DynamicBatch:
    """The pool for this rank from the config: B = student.batch_size / world size, rho = teacher.BATCH."""
    world = dist_util.get_world_size()
    precision = resolve_precision(teacher_section["precision"], teacher_section["use_fp16"])
    if precision == ADM_FP16:
        apply_adm_fp16(teacher)
    return DynamicBatch(
        teacher,
        teacher_diffusion,
        batch_size=student_section["batch_size"] // world,
        image_shape=(3, teacher_section["image_size"], teacher_section["image_size"]),
        iter_choice=teacher_section["iter_choice"],
        rho=teacher_section["BATCH"],
        student_timesteps=student_diffusion.num_timesteps,
        prob=teacher_section["prob"],
        prob_per_item=teacher_section["prob_per_item"],
        teacher_batch_size=teacher_section["batch_size"],
        clip_denoised=teacher_section["clip_denoised"],
        precision=precision,
        device=device,
        rank=dist_util.get_rank(),
        world_size=world,
        seed=student_section["seed"],
    )


def check_tempfile(teacher_section: Mapping[str, Any]) -> str:
    """The pool cache path, required for every mode that prepares a pool; a path to be written must be in a
    writable folder."""
    path = str(teacher_section["tempfile"])
    if not path and teacher_section["iter_choice"] != ITERATIVE:
        raise KDSetupError(f"teacher.tempfile is empty; {teacher_section['iter_choice']} needs a cache path")
    if path and not os.path.exists(path):
        # the pool is written here after it is computed: find out now, not after the teacher's work
        folder = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise KDSetupError(f"teacher.tempfile {path}: cannot create its folder: {exc.strerror}") from None
        if not os.access(folder, os.W_OK):
            raise KDSetupError(f"teacher.tempfile {path}: its folder {folder} is not writable")
    return path


def student_diffusion_of(section: Any) -> Any:
    """The student's diffusion alone (its T sets the pool size); no student network is needed here."""
    kw = model_and_diffusion_kwargs(section)
    return create_gaussian_diffusion(
        steps=kw["diffusion_steps"], learn_sigma=kw["learn_sigma"], noise_schedule=kw["noise_schedule"],
        use_kl=kw["use_kl"], predict_xstart=kw["predict_xstart"], rescale_timesteps=kw["rescale_timesteps"],
        rescale_learned_sigmas=kw["rescale_learned_sigmas"], timestep_respacing=kw["timestep_respacing"],
    )
