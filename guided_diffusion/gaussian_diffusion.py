"""Gaussian diffusion (Ho et al. 2020, Nichol & Dhariwal 2021) with the DKDM distillation objective.

Schedules are float64 numpy arrays for exactness; the per-step path reads them from per-device float32 tensors
cached on first use, so sampling and training steps never copy from the host nor sync with it.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .losses import discretized_gaussian_log_likelihood, normal_kl
from .nn import mean_flat

Model = Callable[..., torch.Tensor]
DenoisedFn = Callable[[torch.Tensor], torch.Tensor] | None
CondFn = Callable[..., torch.Tensor] | None


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Named beta schedule: "linear" (Ho et al., scaled to the step count) or "cosine" (Nichol & Dhariwal)."""
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "cosine":
        return betas_for_alpha_bar(
            num_diffusion_timesteps, lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        )
    raise NotImplementedError(f"unknown beta schedule: {schedule_name!r} (expected 'linear' or 'cosine')")


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """Betas whose cumulative product of (1 - beta) follows `alpha_bar` on [0, 1], capped at `max_beta`."""
    n = num_diffusion_timesteps
    return np.array(
        [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], dtype=np.float64
    )


class ModelMeanType(enum.Enum):
    """What the network predicts for the mean."""

    PREVIOUS_X = enum.auto()  # x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise


class ModelVarType(enum.Enum):
    """How the reverse-step variance is obtained (LEARNED_RANGE interpolates between the two fixed bounds)."""

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    """Training objective: simple MSE (+ vb for learned variances) or the full variational bound."""

    MSE = enum.auto()
    RESCALED_MSE = enum.auto()  # vb term scaled by num_timesteps / 1000, as in improved DDPM
    KL = enum.auto()
    RESCALED_KL = enum.auto()  # KL scaled by num_timesteps to estimate the whole bound

    def is_vb(self) -> bool:
        """True for the variational-bound objectives."""
        return self in (LossType.KL, LossType.RESCALED_KL)


def _extract_into_tensor(
    arr: np.ndarray | torch.Tensor, timesteps: torch.Tensor, broadcast_shape: Sequence[int]
) -> torch.Tensor:
    """Gather `arr[timesteps]` as float32 and broadcast it to `broadcast_shape` (batch dim first)."""
    table = torch.from_numpy(arr).to(timesteps.device) if isinstance(arr, np.ndarray) else arr
    res = table[timesteps].float()
    res = res.view(res.shape + (1,) * (len(broadcast_shape) - res.dim()))
    return res.expand(*broadcast_shape)


def _bcast(mask: torch.Tensor, ndim: int) -> torch.Tensor:
    return mask.view(-1, *([1] * (ndim - 1)))


class GaussianDiffusion:
    """Forward noising, reverse sampling (ancestral, DDIM), likelihoods and training losses of a diffusion."""

    _TABLES = (
        "betas",
        "log_betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "alphas_cumprod_next",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "recip_posterior_mean_coef1",
        "posterior_mean_coef_ratio",
        "fixed_large_variance",
        "fixed_large_log_variance",
    )

    def __init__(
        self,
        *,
        betas: Sequence[float] | np.ndarray,
        model_mean_type: ModelMeanType,
        model_var_type: ModelVarType,
        loss_type: LossType,
        rescale_timesteps: bool = False,
    ) -> None:
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps

        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])
        self.log_betas = np.log(betas)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0); its variance is 0 at t = 0, so the log is clipped to the t = 1 value there.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # A one-step chain has no t = 1 value; beta_0 (the FIXED_LARGE bound) stands in there.
        first_variance = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first_variance, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )
        self.recip_posterior_mean_coef1 = 1.0 / self.posterior_mean_coef1
        self.posterior_mean_coef_ratio = self.posterior_mean_coef2 / self.posterior_mean_coef1
        # FIXED_LARGE uses beta_t, except posterior variance at t = 0 for a usable decoder.
        self.fixed_large_variance = np.append(first_variance, betas[1:])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)

        self._device_tables: dict[tuple[str, torch.device], torch.Tensor] = {}

    # ----------------------------------------------------------------- schedule lookups

    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        """The named schedule as a float32 tensor on `device`, built once per device."""
        key = (name, device)
        table = self._device_tables.get(key)
        if table is None:
            table = torch.from_numpy(getattr(self, name)).float().to(device)
            self._device_tables[key] = table
        return table

    def cache_tables(self, device: torch.device | str) -> None:
        """Build every per-device schedule tensor now, e.g. before torch.compile or CUDA-graph capture."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        for name in self._TABLES:
            self._table(name, device)

    def _extract(self, name: str, t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        return _extract_into_tensor(self._table(name, t.device), t, shape)

    def _scale_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Timesteps as the model sees them: mapped to [0, 1000) when `rescale_timesteps` is set."""
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    # ----------------------------------------------------------------- forward process

    def q_mean_variance(
        self, x_start: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
        variance = 1.0 - self._extract("alphas_cumprod", t, x_start.shape)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(
        self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) (with the given noise when supplied)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of the posterior q(x_{t-1} | x_t, x_0)."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start shape {tuple(x_start.shape)} != x_t shape {tuple(x_t.shape)}")
        mean = (
            self._extract("posterior_mean_coef1", t, x_t.shape) * x_start
            + self._extract("posterior_mean_coef2", t, x_t.shape) * x_t
        )
        variance = self._extract("posterior_variance", t, x_t.shape)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t.shape)
        return mean, variance, log_variance

    # ----------------------------------------------------------------- reverse process

    def _split_output(self, raw: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean half and (for learned variances) variance half of a model output."""
        channels = x.shape[1]
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            if raw.shape[1] != 2 * channels:
                raise ValueError(
                    f"learned variance needs {2 * channels} output channels, model gave {raw.shape[1]}"
                )
            mean_part, var_part = torch.split(raw, channels, dim=1)
            return mean_part, var_part
        if raw.shape[1] != channels:
            raise ValueError(f"fixed variance needs {channels} output channels, model gave {raw.shape[1]}")
        return raw, None

    def learned_log_variance_range(
        self, t: torch.Tensor, shape: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The log-variances a learned-range output interpolates between at `t`: the clipped posterior's
        (output -1) and beta_t's (output +1), broadcast to `shape`."""
        return (
            self._extract("posterior_log_variance_clipped", t, shape),
            self._extract("log_betas", t, shape),
        )

    def _variance(
        self, var_part: torch.Tensor | None, t: torch.Tensor, shape: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reverse-step variance and log-variance from the output's variance half (or the fixed schedule)."""
        if self.model_var_type == ModelVarType.LEARNED:
            return torch.exp(var_part), var_part
        if self.model_var_type == ModelVarType.LEARNED_RANGE:
            min_log, max_log = self.learned_log_variance_range(t, shape)
            frac = (var_part + 1) / 2  # the network outputs [-1, 1]
            log_variance = frac * max_log + (1 - frac) * min_log
            return torch.exp(log_variance), log_variance
        if self.model_var_type == ModelVarType.FIXED_LARGE:
            names = ("fixed_large_variance", "fixed_large_log_variance")
        else:
            names = ("posterior_variance", "posterior_log_variance_clipped")
        return self._extract(names[0], t, shape), self._extract(names[1], t, shape)

    def p_mean_variance(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Apply the model to get p(x_{t-1} | x_t).

        Returns dict(mean, variance, log_variance, pred_xstart, model_output);

        `model_output` is the mean half of the network output (eps for EPSILON models).
        """
        model_kwargs = {} if model_kwargs is None else model_kwargs
        if t.shape != x.shape[:1]:
            raise ValueError(f"t shape {tuple(t.shape)} does not match batch size {x.shape[0]}")
        raw = model(x, self._scale_timesteps(t), **model_kwargs)
        model_output, var_part = self._split_output(raw, x)
        variance, log_variance = self._variance(var_part, t, x.shape)

        def process_xstart(x0: torch.Tensor) -> torch.Tensor:
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x_t=x, t=t, xprev=model_output))
            mean = model_output
        else:
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = process_xstart(model_output)
            else:
                pred_xstart = process_xstart(self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output))
            mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        return {
            "mean": mean,
            "variance": variance,
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "model_output": model_output,
        }

    def _predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape) * eps
        )

    def _predict_xstart_from_xprev(
        self, x_t: torch.Tensor, t: torch.Tensor, xprev: torch.Tensor
    ) -> torch.Tensor:
        return (
            self._extract("recip_posterior_mean_coef1", t, x_t.shape) * xprev
            - self._extract("posterior_mean_coef_ratio", t, x_t.shape) * x_t
        )

    def _predict_eps_from_xstart(
        self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor
    ) -> torch.Tensor:
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t - pred_xstart) / self._extract(
            "sqrt_recipm1_alphas_cumprod", t, x_t.shape
        )

    def condition_mean(
        self,
        cond_fn: Callable[..., torch.Tensor],
        p_mean_var: dict[str, torch.Tensor],
        x: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """Shift the reverse-step mean by variance * grad log p(y | x) (Sohl-Dickstein guidance)."""
        gradient = cond_fn(x, self._scale_timesteps(t), **(model_kwargs or {}))
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(
        self,
        cond_fn: Callable[..., torch.Tensor],
        p_mean_var: dict[str, torch.Tensor],
        x: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Score guidance (Song et al.): eps -= sqrt(1 - alphabar) * grad, then x0 and mean are recomputed."""
        sqrt_one_minus = self._extract("sqrt_one_minus_alphas_cumprod", t, x.shape)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - sqrt_one_minus * cond_fn(x, self._scale_timesteps(t), **(model_kwargs or {}))
        out = dict(p_mean_var)
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(x_start=out["pred_xstart"], x_t=x, t=t)
        return out

    def p_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None,
        cond_fn: CondFn = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """One ancestral step x_t -> x_{t-1} (no noise at t = 0).

        Returns sample and pred_xstart plus the `p_mean_variance` entries (mean, variance, log_variance,
        model_output), which the DKDM teacher step hands to the student objective.
        """
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        noise = torch.randn_like(x)
        nonzero_mask = _bcast((t != 0).float(), x.dim())
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, **out}

    def _initial_noise(
        self,
        model: Model,
        shape: Sequence[int],
        noise: torch.Tensor | None,
        device: torch.device | str | None,
    ) -> torch.Tensor:
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise shape {tuple(noise.shape)} != requested shape {tuple(shape)}")
            return noise if device is None else noise.to(device)
        if device is None:
            device = next(model.parameters()).device
        return torch.randn(*shape, device=device)

    def _sample_loop(
        self,
        step: Callable[..., dict[str, torch.Tensor]],
        model: Model,
        shape: Sequence[int],
        noise: torch.Tensor | None,
        device: torch.device | str | None,
        progress: bool,
        clip_denoised: bool,
        clip_first: bool,
        clip_last: bool,
        **step_kwargs: Any,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Run `step(model, img, t, clip_denoised=clip, **step_kwargs)` from t = T-1 down to 0 without
        gradients, yielding each output: one skeleton for the ancestral and DDIM loops.

        `clip` is clip_denoised, or clip_first at t = T-1, or clip_last at t = 0; each output's "sample"
        feeds the next step.
        """
        img = self._initial_noise(model, shape, noise, device)
        indices = range(self.num_timesteps - 1, -1, -1)
        for i in tqdm(indices) if progress else indices:
            t = torch.full((shape[0],), i, device=img.device, dtype=torch.long)
            clip = clip_denoised or (clip_first and i == self.num_timesteps - 1) or (clip_last and i == 0)
            with torch.no_grad():
                out = step(model, img, t, clip_denoised=clip, **step_kwargs)
            yield out
            img = out["sample"]

    @staticmethod
    def _final_sample(outputs: Iterator[dict[str, torch.Tensor]]) -> torch.Tensor:
        """The "sample" of the last output of a progressive loop."""
        final: dict[str, torch.Tensor] = {}
        for out in outputs:
            final = out
        return final["sample"]

    def p_sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None,
        cond_fn: CondFn = None,
        model_kwargs: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        clip_first: bool = False,
        clip_last: bool = False,
    ) -> torch.Tensor:
        """Ancestral sampling from noise to x_0; see `p_sample_loop_progressive` for the clip flags."""
        return self._final_sample(
            self.p_sample_loop_progressive(
                model,
                shape,
                noise,
                clip_denoised,
                denoised_fn,
                cond_fn,
                model_kwargs,
                device,
                progress,
                clip_first=clip_first,
                clip_last=clip_last,
            )
        )

    def p_sample_loop_progressive(
        self,
        model: Model,
        shape: Sequence[int],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None,
        cond_fn: CondFn = None,
        model_kwargs: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        clip_first: bool = False,
        clip_last: bool = False,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield every `p_sample` output from t = T-1 down to 0.

        With clip_denoised False, `clip_first` still clips pred_xstart at the first step (t = T-1) and
        `clip_last` at the last step (t = 0), as the DKDM diffusion YAML's keys of the same names ask.
        """
        yield from self._sample_loop(
            self.p_sample, model, shape, noise, device, progress, clip_denoised, clip_first, clip_last,
            denoised_fn=denoised_fn, cond_fn=cond_fn, model_kwargs=model_kwargs,
        )

    def ddim_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None,
        cond_fn: CondFn = None,
        model_kwargs: dict[str, Any] | None = None,
        eta: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """One DDIM step x_t -> x_{t-1} (Song et al. 2021); eta = 0 is deterministic, eta = 1 is DDPM-like."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract("alphas_cumprod", t, x.shape)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x.shape)
        sigma = (
            eta
            * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        mean_pred = (
            out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        )
        nonzero_mask = _bcast((t != 0).float(), x.dim())
        sample = mean_pred + nonzero_mask * sigma * torch.randn_like(x)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None,
        model_kwargs: dict[str, Any] | None = None,
        eta: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """Deterministic DDIM inversion step x_t -> x_{t+1}; only eta = 0 is defined."""
        if eta != 0.0:
            raise ValueError(f"ddim_reverse_sample supports only eta=0.0, got eta={eta}")
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = self._extract("alphas_cumprod_next", t, x.shape)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None,
        cond_fn: CondFn = None,
        model_kwargs: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        eta: float = 0.0,
        clip_first: bool = False,
        clip_last: bool = False,
    ) -> torch.Tensor:
        """DDIM sampling from noise to x_0; see `ddim_sample_loop_progressive` for the clip flags."""
        return self._final_sample(
            self.ddim_sample_loop_progressive(
                model,
                shape,
                noise,
                clip_denoised,
                denoised_fn,
                cond_fn,
                model_kwargs,
                device,
                progress,
                eta,
                clip_first=clip_first,
                clip_last=clip_last,
            )
        )

    def ddim_sample_loop_progressive(
        self,
        model: Model,
        shape: Sequence[int],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None,
        cond_fn: CondFn = None,
        model_kwargs: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        eta: float = 0.0,
        clip_first: bool = False,
        clip_last: bool = False,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield every `ddim_sample` output from t = T-1 down to 0.

        With clip_denoised False, `clip_first` still clips pred_xstart at the first step (t = T-1) and
        `clip_last` at the last step (t = 0).
        """
        yield from self._sample_loop(
            self.ddim_sample, model, shape, noise, device, progress, clip_denoised, clip_first, clip_last,
            denoised_fn=denoised_fn, cond_fn=cond_fn, model_kwargs=model_kwargs, eta=eta,
        )

    # ----------------------------------------------------------------- likelihood terms and losses

    def _vb_terms_bpd(
        self,
        model: Model,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """One term of the variational bound in bits/dim: KL to the true posterior, decoder NLL at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(
            2.0
        )
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def _frozen_mean_model(self, model_output: torch.Tensor, var_part: torch.Tensor) -> Model:
        """A stand-in model that returns the detached mean half with the live variance half.

        The vb term then trains only the variance, leaving the mean to the MSE term (improved DDPM).
        """
        frozen = torch.cat([model_output.detach(), var_part], dim=1)
        return lambda *args, **kwargs: frozen

    def training_losses(
        self,
        model: Model,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict[str, Any] | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample training terms: loss, plus mse and (learned variance) vb for the MSE losses."""
        model_kwargs = {} if model_kwargs is None else model_kwargs
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms: dict[str, torch.Tensor] = {}
        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(
                model, x_start, x_t, t, clip_denoised=False, model_kwargs=model_kwargs
            )["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        raw = model(x_t, self._scale_timesteps(t), **model_kwargs)
        model_output, var_part = self._split_output(raw, x_t)
        if var_part is not None:
            terms["vb"] = self._vb_terms_bpd(
                self._frozen_mean_model(model_output, var_part), x_start, x_t, t, clip_denoised=False
            )["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            target = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0]
        elif self.model_mean_type == ModelMeanType.START_X:
            target = x_start
        else:
            target = noise
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def training_losses_kd(
        self,
        model: Model,
        x_tm1: torch.Tensor | None = None,
        x_t: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
        out: dict[str, torch.Tensor] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        clip_last: bool = False,
        clip_denoised: bool = False,
        input_perturb: float = 0.0,
        *,
        teacher_out: dict[str, torch.Tensor] | None = None,
        noise: torch.Tensor | None = None,
        decoder_nll_at_t0: bool = False,
    ) -> dict[str, torch.Tensor]:
        """DKDM objective: the student (`model`) at (x_t, t) matches the teacher's reverse step `out`.

        Positional order is the DKDM authors' (model, x_tm1, x_t, t, out, model_kwargs, clip_last,
        clip_denoised, input_perturb); `teacher_out=` is accepted for `out`. mse = mean_flat((teacher
        model_output - student model_output)^2). With a learned variance, vb = KL(teacher Gaussian ||
        student Gaussian) in bits, the student's mean frozen, at every t as the authors' code and the
        reference vectors do; the student's x0 is clamped when `clip_denoised`, or at t = T-1 only when
        `clip_last` (the authors' names). `decoder_nll_at_t0` takes the decoder NLL of `x_tm1` at t = 0
        instead. `input_perturb` > 0 replaces x_t by x_t + input_perturb * sqrt(1 - alphabar_t) * noise
        for everything the student sees.
        """
        if isinstance(t, dict):
            raise TypeError(
                "training_losses_kd got the teacher's step as t: the positional order is the DKDM authors' "
                "(model, x_tm1, x_t, t, out); pass x_t=, t=, out= by keyword otherwise"
            )
        if teacher_out is not None and out is not None:
            raise TypeError("training_losses_kd got both out and teacher_out; pass the teacher's step once")
        out = teacher_out if out is None else out
        if x_t is None or t is None or out is None:
            raise TypeError("training_losses_kd needs x_t, t and the teacher's step out")
        if self.loss_type.is_vb():
            raise ValueError(f"training_losses_kd supports MSE and RESCALED_MSE, not {self.loss_type}")
        missing = [k for k in ("mean", "log_variance", "model_output") if k not in out]
        if missing:
            raise KeyError(f"teacher out lacks {missing}; pass the teacher's p_mean_variance/p_sample output")
        if decoder_nll_at_t0 and x_tm1 is None:
            raise ValueError(
                "training_losses_kd(decoder_nll_at_t0=True) needs x_tm1, the teacher's next state"
            )
        model_kwargs = {} if model_kwargs is None else model_kwargs
        if input_perturb > 0:
            if noise is None:
                noise = torch.randn_like(x_t)
            x_t = x_t + self._extract("sqrt_one_minus_alphas_cumprod", t, x_t.shape) * input_perturb * noise

        raw = model(x_t, self._scale_timesteps(t), **model_kwargs)
        model_output, var_part = self._split_output(raw, x_t)
        terms: dict[str, torch.Tensor] = {}
        if var_part is not None:
            student = self.p_mean_variance(
                self._frozen_mean_model(model_output, var_part),
                x_t,
                t,
                clip_denoised=clip_denoised,
                denoised_fn=self._clamp_at_first_step(t) if clip_last and not clip_denoised else None,
            )
            kl = normal_kl(out["mean"], out["log_variance"], student["mean"], student["log_variance"])
            terms["vb"] = mean_flat(kl) / math.log(2.0)
            if decoder_nll_at_t0:
                decoder_nll = -discretized_gaussian_log_likelihood(
                    x_tm1, means=student["mean"], log_scales=0.5 * student["log_variance"]
                )
                terms["vb"] = torch.where(t == 0, mean_flat(decoder_nll) / math.log(2.0), terms["vb"])
            if self.loss_type == LossType.RESCALED_MSE:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        terms["mse"] = mean_flat((out["model_output"] - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _clamp_at_first_step(self, t: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """x0 post-processing that clamps to [-1, 1] the items at t = T-1 only (the authors' `clip_last`)."""
        first = t == self.num_timesteps - 1

        def clamp(x0: torch.Tensor) -> torch.Tensor:
            return torch.where(first.view(-1, *([1] * (x0.dim() - 1))), x0.clamp(-1, 1), x0)

        return clamp

    def _prior_bpd(self, x_start: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x_0) || N(0, I)) in bits/dim; not trainable, but part of the full bound."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=torch.long)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(qt_mean, qt_log_variance, 0.0, 0.0)) / math.log(2.0)

    def calc_bpd_loop(
        self,
        model: Model,
        x_start: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Whole variational bound in bits/dim, per sample, with its per-timestep terms.

        Returns total_bpd, prior_bpd, vb [N, T], xstart_mse [N, T] and mse (eps) [N, T].
        """
        batch = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        for i in range(self.num_timesteps - 1, -1, -1):
            t = torch.full((batch,), i, device=x_start.device, dtype=torch.long)
            noise = torch.randn_like(x_start)
            x_t = self.q_sample(x_start=x_start, t=t, noise=noise)
            with torch.no_grad():
                out = self._vb_terms_bpd(
                    model,
                    x_start=x_start,
                    x_t=x_t,
                    t=t,
                    clip_denoised=clip_denoised,
                    model_kwargs=model_kwargs,
                )
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))
        vb_t = torch.stack(vb, dim=1).flip(1)
        prior_bpd = self._prior_bpd(x_start)
        return {
            "total_bpd": vb_t.sum(dim=1) + prior_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb_t,
            "xstart_mse": torch.stack(xstart_mse, dim=1).flip(1),
            "mse": torch.stack(mse, dim=1).flip(1),
        }
