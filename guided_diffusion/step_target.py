"""The x_0 target of step distillation, shared by the ADM (GaussianDiffusion) and the RCFD (DDPMSchedule)
model families: one student DDIM step must land where the teacher's two steps do."""

from __future__ import annotations

import torch


def two_step_target(
    z_t: torch.Tensor,
    z_next: torch.Tensor,
    alpha_t: torch.Tensor,
    sigma_t: torch.Tensor,
    alpha_next: torch.Tensor,
    sigma_next: torch.Tensor,
) -> torch.Tensor:
    """Step distillation's target: the x_0 for which one deterministic DDIM step from z_t (signal and noise
    scales alpha_t, sigma_t) lands on z_next (alpha_next, sigma_next), the teacher's two-step result. The
    one formula behind both model families; computed in the dtype of its arguments."""
    ratio = sigma_next / sigma_t
    return (z_next - ratio * z_t) / (alpha_next - ratio * alpha_t)
