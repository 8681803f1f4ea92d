"""Timestep respacing: run a diffusion on a subset of its steps (fewer sampling steps, same trained model)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion, Model


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
    """Timesteps to keep from `num_timesteps`.

    `section_counts` is a list (or comma string) of counts, one per equal section of the chain, each section
    sampled at evenly rounded strides, e.g. "10,15,20"; or "ddimN": DDIM's integer stride giving N steps
    from t = 0; or "trailingN": N steps of stride T/N ending at the noisiest step T-1 (the grid RDD's
    authors distil on: no step at t = 0, the first step from pure noise; N must divide T).
    """
    if isinstance(section_counts, str) and section_counts.startswith("trailing"):
        wanted = int(section_counts[len("trailing") :])
        if wanted < 1 or num_timesteps % wanted:
            raise ValueError(f"{section_counts!r}: N must be >= 1 and divide the {num_timesteps} steps")
        stride = num_timesteps // wanted
        return {num_timesteps - 1 - i * stride for i in range(wanted)}
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            wanted = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == wanted:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(
                f"no integer stride gives exactly {wanted} of {num_timesteps} steps ({section_counts!r})"
            )
        try:
            section_counts = [int(part) for part in section_counts.split(",")]
        except ValueError:
            raise ValueError(
                f"timestep_respacing must be 'ddimN', 'trailingN' or comma-separated ints, got "
                f"{section_counts!r}"
            ) from None

    base, extra = divmod(num_timesteps, len(section_counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(section_counts):
        size = base + (1 if i < extra else 0)
        if not 0 < count <= size:
            raise ValueError(f"cannot take {count} steps from a section of {size} (of {num_timesteps} total)")
        stride = 1.0 if count == 1 else (size - 1) / (count - 1)
        position = 0.0  # accumulated (not k * stride) so the float rounding matches the published spacing
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return set(kept)


class _WrappedModel:
    """Calls the model with original-chain timesteps (rescaled to [0, 1000) if asked) for respaced indices."""

    def __init__(self, model: Model, diffusion: SpacedDiffusion) -> None:
        self.model = model
        self.diffusion = diffusion

    def __call__(self, x: torch.Tensor, ts: torch.Tensor, **kwargs: Any) -> Any:
        new_ts = self.diffusion.timestep_map_tensor(ts.device)[ts]
        if self.diffusion.rescale_timesteps:
            new_ts = new_ts.float() * (1000.0 / self.diffusion.original_num_steps)
        return self.model(x, new_ts, **kwargs)


class SpacedDiffusion(GaussianDiffusion):
    """A `GaussianDiffusion` over the kept steps `use_timesteps` of the base chain given by `betas`.

    Betas are recomputed so the kept steps have the base chain's alpha-bars; the model always sees the
    original timestep numbers.
    """

    def __init__(self, use_timesteps: Iterable[int], **kwargs: Any) -> None:
        self.use_timesteps = set(use_timesteps)
        base = GaussianDiffusion(**kwargs)
        self.original_num_steps = base.num_timesteps
        bad = sorted(t for t in self.use_timesteps if not 0 <= t < base.num_timesteps)
        if bad or not self.use_timesteps:
            raise ValueError(
                f"use_timesteps must be a non-empty subset of [0, {base.num_timesteps}), bad: {bad}"
            )
        self.timestep_map = sorted(self.use_timesteps)
        kept_alpha_bars = base.alphas_cumprod[self.timestep_map]
        previous = np.append(1.0, kept_alpha_bars[:-1])
        kwargs["betas"] = 1.0 - kept_alpha_bars / previous
        super().__init__(**kwargs)
        self._timestep_maps: dict[torch.device, torch.Tensor] = {}

    def cache_tables(self, device: torch.device | str) -> None:
        """Build the per-device schedule tensors and timestep map now (before compile or graph capture)."""
        super().cache_tables(device)
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.timestep_map_tensor(device)

    def timestep_map_tensor(self, device: torch.device) -> torch.Tensor:
        """Respaced index -> original timestep, as a long tensor cached per device."""
        table = self._timestep_maps.get(device)
        if table is None:
            table = torch.tensor(self.timestep_map, dtype=torch.long, device=device)
            self._timestep_maps[device] = table
        return table

    def _wrap_model(self, model: Model) -> Model:
        """`model` taking respaced indices (idempotent)."""
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self)

    def _scale_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        # The wrapper maps and rescales; scaling here as well would apply it twice.
        return t

    def p_mean_variance(self, model: Model, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """`GaussianDiffusion.p_mean_variance` with the model seeing original timesteps."""
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model: Model, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """`GaussianDiffusion.training_losses` with the model seeing original timesteps."""
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def training_losses_kd(self, model: Model, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """`GaussianDiffusion.training_losses_kd` with the student seeing original timesteps."""
        return super().training_losses_kd(self._wrap_model(model), *args, **kwargs)

    def condition_mean(self, cond_fn: Model, *args: Any, **kwargs: Any) -> torch.Tensor:
        """`GaussianDiffusion.condition_mean` with the classifier seeing original timesteps."""
        return super().condition_mean(self._wrap_model(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn: Model, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """`GaussianDiffusion.condition_score` with the classifier seeing original timesteps."""
        return super().condition_score(self._wrap_model(cond_fn), *args, **kwargs)
