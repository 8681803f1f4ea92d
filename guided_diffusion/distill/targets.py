"""Diffusion arithmetic shared by the step-distillation and relational terms: float64 gathers, the DDIM
target that makes one student step match two teacher steps, PD's loss weights, x_0 from a raw output."""

from __future__ import annotations

from typing import Any

import torch

from ..gaussian_diffusion import ModelMeanType


def gather64(table: Any, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """`table[t]` in float64, shaped to broadcast against an `ndim`-dim batch."""
    values = torch.as_tensor(table, dtype=torch.float64, device=t.device)[t]
    return values.view(-1, *([1] * (ndim - 1)))


def ddim_target(
    student_diffusion: Any, z_t: torch.Tensor, t: torch.Tensor, z_next: torch.Tensor
) -> torch.Tensor:
    """x~ such that one deterministic DDIM step of `student_diffusion` from z_t at step t with x_0 = x~
    gives `z_next` (computed in float64, returned in z_t's dtype)."""
    a_t = gather64(student_diffusion.alphas_cumprod, t, z_t.dim())
    a_next = gather64(student_diffusion.alphas_cumprod_prev, t, z_t.dim())
    r = torch.sqrt(1 - a_next) / torch.sqrt(1 - a_t)
    target = (z_next.double() - r * z_t.double()) / (torch.sqrt(a_next) - r * torch.sqrt(a_t))
    return target.to(z_t.dtype)


def snr_weight(student_diffusion: Any, t: torch.Tensor, weighting: str) -> torch.Tensor:
    """Per-item weight on the x_0 error: max(snr, 1) ("truncated_snr", PD), snr ("snr") or 1 ("none")."""
    a_t = torch.as_tensor(student_diffusion.alphas_cumprod, dtype=torch.float64, device=t.device)[t]
    snr = a_t / (1 - a_t)
    if weighting == "truncated_snr":
        return snr.clamp_min(1.0).float()
    if weighting == "snr":
        return snr.float()
    return torch.ones_like(snr, dtype=torch.float32)


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
