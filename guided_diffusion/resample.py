"""Timestep samplers for training: uniform, or importance sampling by each timestep's loss second moment."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from .gaussian_diffusion import GaussianDiffusion


def create_named_schedule_sampler(name: str, diffusion: GaussianDiffusion) -> ScheduleSampler:
    """Sampler by name: "uniform" or "loss-second-moment"."""
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise NotImplementedError(
        f"unknown schedule sampler: {name!r} (expected 'uniform' or 'loss-second-moment')"
    )


class ScheduleSampler(ABC):
    """A distribution over timesteps with importance weights that keep the loss estimate unbiased."""

    @abstractmethod
    def weights(self) -> np.ndarray:
        """Positive (unnormalized) sampling weight per timestep."""

    def sample(self, batch_size: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw `batch_size` timesteps; returns (timesteps long [N], loss weights float [N]) on `device`."""
        w = self.weights()
        p = w / np.sum(w)
        indices_np = np.random.choice(len(p), size=(batch_size,), p=p)
        indices = torch.from_numpy(indices_np).long().to(device)
        weights = torch.from_numpy(1 / (len(p) * p[indices_np])).float().to(device)
        return indices, weights


class UniformSampler(ScheduleSampler):
    """Every timestep equally likely (all weights 1)."""

    def __init__(self, diffusion: GaussianDiffusion) -> None:
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps])

    def weights(self) -> np.ndarray:
        """All ones."""
        return self._weights

    def sample(self, batch_size: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw on `device` from torch's default generator there (seeded by the run seed, saved with the
        loop's RNG state): no numpy draw and no host-to-device copy, so the train step never waits."""
        indices = torch.randint(0, len(self._weights), (batch_size,), device=device)
        return indices, torch.ones(batch_size, device=device)


class LossAwareSampler(ScheduleSampler):
    """A sampler whose weights follow the training losses it is told about."""

    def update_with_local_losses(self, local_ts: torch.Tensor, local_losses: torch.Tensor) -> None:
        """Record this rank's per-sample losses; gathers all ranks' so every rank keeps identical weights."""
        if local_ts.shape != local_losses.shape or local_ts.dim() != 1:
            raise ValueError(
                f"local_ts {tuple(local_ts.shape)} and local_losses {tuple(local_losses.shape)} "
                "must be 1-D of equal length"
            )
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            self.update_with_all_losses(local_ts.tolist(), local_losses.detach().float().tolist())
            return
        world = dist.get_world_size()
        sizes = [torch.zeros(1, dtype=torch.long, device=local_ts.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([len(local_ts)], dtype=torch.long, device=local_ts.device))
        counts = [int(s) for s in torch.cat(sizes).cpu()]
        longest = max(counts)
        padded_ts = torch.zeros(longest, dtype=torch.long, device=local_ts.device)
        padded_ts[: len(local_ts)] = local_ts
        padded_losses = torch.zeros(longest, dtype=torch.float32, device=local_ts.device)
        padded_losses[: len(local_ts)] = local_losses.detach().float()
        ts_parts = [torch.empty_like(padded_ts) for _ in range(world)]
        loss_parts = [torch.empty_like(padded_losses) for _ in range(world)]
        dist.all_gather(ts_parts, padded_ts)
        dist.all_gather(loss_parts, padded_losses)
        ts_all = torch.cat([part[:n] for part, n in zip(ts_parts, counts, strict=True)]).cpu().tolist()
        losses_all = torch.cat([part[:n] for part, n in zip(loss_parts, counts, strict=True)]).cpu().tolist()
        self.update_with_all_losses(ts_all, losses_all)

    @abstractmethod
    def update_with_all_losses(self, ts: Sequence[int], losses: Sequence[float]) -> None:
        """Update the weights from every rank's (timestep, loss) pairs; identical on all ranks."""


class LossSecondMomentResampler(LossAwareSampler):
    """Sample t with probability ~ sqrt(E[loss_t^2]) over a short history (improved DDPM's L_vlb sampling).

    Uniform until every timestep has `history_per_term` losses; `uniform_prob` mass always stays uniform.
    """

    def __init__(self, diffusion: GaussianDiffusion, history_per_term: int = 10, uniform_prob: float = 0.001):
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros([diffusion.num_timesteps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=np.int64)

    def weights(self) -> np.ndarray:
        """Uniform before warm-up, then the RMS loss per timestep mixed with `uniform_prob` of uniform."""
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        w = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        w /= np.sum(w)
        w *= 1 - self.uniform_prob
        w += self.uniform_prob / len(w)
        return w

    def update_with_all_losses(self, ts: Sequence[int], losses: Sequence[float]) -> None:
        """Append each loss to its timestep's history, dropping the oldest once the history is full."""
        for t, loss in zip(ts, losses, strict=True):
            if self._loss_counts[t] == self.history_per_term:
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self) -> bool:
        return bool((self._loss_counts == self.history_per_term).all())
