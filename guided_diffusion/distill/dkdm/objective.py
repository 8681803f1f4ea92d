"""DKDM's objective: the student's `training_losses_kd` toward the teacher's step stored in the pool."""

from __future__ import annotations

from typing import Any

import torch

from ..objective import FeatureProbe


class DKDMObjective:
    """The base term of every pool-fed run: per-item `loss` (mse + vb) and its parts. Keeps the student's
    raw output (and its features when an extra objective asks) in the batch for the other terms.
    `student_clip_denoised` clamps the student's x0 in the vb term as the teacher's step does (off, as in
    the authors' loop; docs/DKDM.md); `input_perturb` is the authors' input perturbation."""

    base = True
    needs_features = False

    def __init__(
        self, diffusion: Any, input_perturb: float = 0.0, student_clip_denoised: bool = False
    ) -> None:
        self.diffusion = diffusion
        self.input_perturb = float(input_perturb)
        self.student_clip_denoised = bool(student_clip_denoised)
        self.keep_features = False

    def __call__(self, student: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        probe = FeatureProbe(student, self.keep_features)
        terms = self.diffusion.training_losses_kd(
            probe, batch["x_tm1"], batch["x_t"], batch["t"], batch["teacher_out"],
            model_kwargs=batch["model_kwargs"], clip_denoised=self.student_clip_denoised,
            input_perturb=self.input_perturb,
        )
        batch.update(student_output=probe.output, student_features=probe.features)
        return terms

    def parameters(self) -> list[torch.nn.Parameter]:
        """No trainable state."""
        return []
