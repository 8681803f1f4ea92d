"""Diffusion arithmetic shared by the step-distillation and relational terms: float64 gathers, the DDIM
target that makes one student step match two teacher steps, PD's loss weights, x_0 from a raw output."""

from __future__ import annotations

from typing import Any

import torch

from ..gaussian_diffusion import ModelMeanType
from ..step_target import two_step_target


def gather64(table: Any, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """`table[t]` in float64, shaped to broadcast against an `ndim`-dim batch."""
    values = torch.as_tensor(table, dtype=torch.float64, device=t.device)[t]
    return values.view(-1, *([1] * (ndim - 1)))


def ddim_target(
    student_diffusion: Any, z_t: torch.Tensor, t: torch.Tensor, z_next: torch.Tensor
) -> torch.Tensor:
    """`two_step_target` on a guided-diffusion student grid at step t (its next step's alpha-bar is
    `alphas_cumprod_prev`), computed in float64 and returned in z_t's dtype."""
    a_t = gather64(student_diffusion.alphas_cumprod, t, z_t.dim())
    a_next = gather64(student_diffusion.alphas_cumprod_prev, t, z_t.dim())
    target = two_step_target(
        z_t.double(), z_next.double(), torch.sqrt(a_t), torch.sqrt(1 - a_t), torch.sqrt(a_next),
        torch.sqrt(1 - a_next),
    )
    return target.to(z_t.dtype)


def snr_weight(student_diffusion: Any, t: torch.Tensor, weighting: str) -> torch.Tensor:
    """Per-item weight on the x_0 error: max(snr, 1) ("truncated_snr", PD), snr ("snr", the eps error),
    snr + 1 ("snr_plus_one", the v error) or 1 ("none")."""
    a_t = torch.as_tensor(student_diffusion.alphas_cumprod, dtype=torch.float64, device=t.device)[t]
    snr = a_t / (1 - a_t)
    if weighting == "truncated_snr":
        return snr.clamp_min(1.0).float()
    if weighting == "snr":
        return snr.float()
    if weighting == "snr_plus_one":
        return (snr + 1).float()
    return torch.ones_like(snr, dtype=torch.float32)


def x0_to_prediction(
    diffusion: Any, x0: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor, prediction: str
) -> torch.Tensor:
    """x_0 at z_t rewritten as the `prediction` ("x0", "eps" or "v" = sqrt(a) eps - sqrt(1 - a) x_0) it
    implies, in float64: the same output read in another parameterisation."""
    if prediction == "x0":
        return x0.double()
    a_t = gather64(diffusion.alphas_cumprod, t, z_t.dim())
    eps = (z_t.double() - torch.sqrt(a_t) * x0.double()) / torch.sqrt(1 - a_t)
    if prediction == "eps":
        return eps
    return torch.sqrt(a_t) * eps - torch.sqrt(1 - a_t) * x0.double()


def pred_xstart_from_output(
    diffusion: Any, x_t: torch.Tensor, t: torch.Tensor, raw: torch.Tensor
) -> torch.Tensor:
    """x_0 from a raw network output (x0 or eps mean half; learned-sigma halves dropped), unclipped."""
    out = raw[:, : x_t.shape[1]]
    if diffusion.model_mean_type == ModelMeanType.START_X:
        return out
    if diffusion.model_mean_type != ModelMeanType.EPSILON:
        raise ValueError(f"relational: cannot read x_0 from a {diffusion.model_mean_type} model output")
    a_t = gather64(diffusion.alphas_cumprod, t, x_t.dim()).to(x_t.dtype)
    return (x_t - torch.sqrt(1 - a_t) * out) / torch.sqrt(a_t)
