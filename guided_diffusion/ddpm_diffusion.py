"""The diffusion RCFD and RDD run their DDPMUNet with: a 1025-beta cosine chain, x0 parameterisation,
deterministic DDIM on a strided grid, and the progressive-distillation target (two teacher steps folded into
one student step). Coefficients stay float64 and are cast to float32 after the gather, as the authors do.

Indices: a model with `steps` steps at `time_scale` sees the integer index step * time_scale in [0, T_total]
(T_total = 1024 in every published stage), so the 8-step teacher steps 8 -> 7 -> ... on indices 1024, 896, ...
and the 4-step student on 1024, 768, 512, 256.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .step_target import two_step_target

Model = Callable[..., torch.Tensor]


def cosine_betas(n: int, s: float = 8e-3, max_beta: float = 0.999) -> torch.Tensor:
    """`n` float64 betas of the cosine schedule sampled at i / n, i = 0..n (the authors call this with
    n = T_total + 1, so alpha_bar[k] is the cosine value at (k + 1) / n)."""
    grid = torch.arange(n + 1, dtype=torch.float64) / n + s
    f = torch.cos(grid / (1 + s) * math.pi / 2).pow(2)
    f = f / f[0]
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


class DDPMSchedule:
    """The float64 tables of a T_total-index chain (T_total + 1 betas) and the x0/eps arithmetic on them."""

    def __init__(self, total_steps: int = 1024) -> None:
        self.total_steps = total_steps
        self.betas = cosine_betas(total_steps + 1)
        self.alphas_bar = torch.cumprod(1.0 - self.betas, dim=0)
        self.sqrt_alphas_bar = self.alphas_bar.sqrt()
        self.sqrt_one_minus_alphas_bar = (1.0 - self.alphas_bar).sqrt()

    @staticmethod
    def gather(table: torch.Tensor, index: torch.Tensor, ndim: int) -> torch.Tensor:
        """`table[index]` cast to float32 and shaped [B, 1, ...] for an `ndim`-dim batch."""
        values = table.to(index.device)[index].float()
        return values.view(-1, *([1] * (ndim - 1)))

    def q_sample(self, x0: torch.Tensor, index: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z = sqrt(a) x0 + sqrt(1 - a) noise at integer indices."""
        return self.combine(x0, noise, index)

    def combine(self, x0: torch.Tensor, eps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The state at `index` with clean part `x0` and noise part `eps` (a DDIM step lands here)."""
        n = x0.dim()
        return self.gather(self.sqrt_alphas_bar, index, n) * x0 + self.gather(
            self.sqrt_one_minus_alphas_bar, index, n
        ) * eps

    def eps_from_x0(self, z: torch.Tensor, x0: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """eps = (z - sqrt(a) x0) / sqrt(1 - a)."""
        n = x0.dim()
        return (z - self.gather(self.sqrt_alphas_bar, index, n) * x0) / self.gather(
            self.sqrt_one_minus_alphas_bar, index, n
        )


def ddim_sample(
    model: Model,
    schedule: DDPMSchedule,
    x_T: torch.Tensor,
    steps: int,
    time_scale: int,
    stride: int = 1,
    clip: bool = True,
    y: torch.Tensor | None = None,
    trace: list[dict[str, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Deterministic DDIM from x_T over the multiples of `stride` from the largest one <= steps down to
    stride, as the authors' sampler (x0-predicting model): each step clips x0 to [-1, 1] when `clip`,
    recomputes eps from it and jumps to the next index; the final sample is clipped. `trace` (a list)
    receives each step's input z, raw and used x0 and eps."""
    z = x_T
    batch = x_T.shape[0]
    for step in range(steps // stride * stride, 0, -stride):
        index = torch.full((batch,), step * time_scale, dtype=torch.long, device=x_T.device)
        nxt = torch.full((batch,), (step - stride) * time_scale, dtype=torch.long, device=x_T.device)
        raw = model(z, index, y)
        x0 = raw.clamp(-1.0, 1.0) if clip else raw
        eps = schedule.eps_from_x0(z, x0, index)
        if trace is not None:
            trace.append({"z": z, "x0_raw": raw, "x0": x0, "eps": eps})
        z = schedule.combine(x0, eps, nxt)
    return z.clamp(-1.0, 1.0)


@torch.no_grad()
def pd_target(
    teacher: Model,
    schedule: DDPMSchedule,
    z_t: torch.Tensor,
    t: torch.Tensor,
    time_scale: int,
    y: torch.Tensor | None = None,
    clip: bool = False,
) -> dict[str, torch.Tensor]:
    """The teacher's two DDIM steps t -> t-1 -> t-2 (teacher steps, unclipped x0 by default as the authors
    train) and the x0 (`x_target`) and eps (`eps_target`) that take z_t to z_{t-2} in one step."""
    n = z_t.dim()
    states = {"z_t": z_t}
    z = z_t
    for k in (0, 1):
        index = (t - k) * time_scale
        x0 = teacher(z, index, y)
        x0 = x0.clamp(-1.0, 1.0) if clip else x0
        eps = schedule.eps_from_x0(z, x0, index)
        states[f"teacher_x0_tm{k}"], states[f"teacher_eps_tm{k}"] = x0, eps
        z = schedule.combine(x0, eps, (t - k - 1) * time_scale)
        states[f"z_tm{k + 1}"] = z
    i_t, i_2 = t * time_scale, (t - 2) * time_scale
    states["x_target"] = two_step_target(
        z_t, z,
        schedule.gather(schedule.sqrt_alphas_bar, i_t, n),
        schedule.gather(schedule.sqrt_one_minus_alphas_bar, i_t, n),
        schedule.gather(schedule.sqrt_alphas_bar, i_2, n),
        schedule.gather(schedule.sqrt_one_minus_alphas_bar, i_2, n),
    )
    states["eps_target"] = schedule.eps_from_x0(z_t, states["x_target"], i_t)
    return states


def truncated_snr_loss(
    schedule: DDPMSchedule,
    z_t: torch.Tensor,
    index: torch.Tensor,
    x0_pred: torch.Tensor,
    x_target: torch.Tensor,
    eps_target: torch.Tensor,
) -> dict[str, Any]:
    """PD's loss_type 'both': per item the larger of the x0 MSE and the eps MSE (= max(1, SNR) x the x0
    MSE), averaged over the batch; returns `loss` and the per-item `x0_mse`, `eps_mse`."""
    b = x0_pred.shape[0]
    eps_pred = schedule.eps_from_x0(z_t, x0_pred, index)
    x0_mse = (x0_pred - x_target).pow(2).reshape(b, -1).mean(dim=1)
    eps_mse = (eps_pred - eps_target).pow(2).reshape(b, -1).mean(dim=1)
    return {"loss": torch.maximum(x0_mse, eps_mse).mean(), "x0_mse": x0_mse, "eps_mse": eps_mse,
            "eps": eps_pred}
