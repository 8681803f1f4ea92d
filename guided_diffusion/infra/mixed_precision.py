"""Mixed-precision training: fp32 master weights, fp16/bf16 autocast, on-device non-finite step skipping.

The model's parameters always stay fp32 (they are the master weights); only the forward/backward compute
runs in half precision under `torch.autocast`. For fp16 a dynamic loss scale guards against underflow:
it is halved on overflow and doubled after `round(1 / fp16_scale_growth)` clean steps, which matches
guided-diffusion's additive growth of the log2 scale. All bookkeeping lives in device tensors, so a
non-finite step is skipped without a host synchronisation (fused AdamW reads `found_inf` on CUDA).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from .. import logger

PRECISIONS = ("fp32", "fp16", "bf16", "adm_fp16")
ADM_FP16 = "adm_fp16"  # guided-diffusion's fp16: half convolutions, float32 master weights, its loss scale
_BACKOFF = 0.5
_GROWTH = 2.0


class NonFiniteLossError(RuntimeError):
    """Raised when too many consecutive optimizer steps had non-finite gradients."""


AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def autocast_context(
    precision: str, device: torch.device, *, cuda_only: bool = True, cache_enabled: bool = True
) -> contextlib.AbstractContextManager:
    """The one autocast switch: `precision` ("fp32", "fp16", "bf16") on `device` (CUDA only unless
    `cuda_only` is False); a no-op for fp32."""
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None or (cuda_only and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache_enabled)


def apply_adm_fp16(model: torch.nn.Module) -> torch.nn.Module:
    """Put a UNet in guided-diffusion's fp16 (`precision: adm_fp16`): its own `convert_to_fp16`; a network
    without one (the DiT) is refused in one line."""
    convert = getattr(model, "convert_to_fp16", None)
    if convert is None:
        raise ValueError(f"precision adm_fp16 is guided-diffusion's fp16 of the ADM UNet; "
                         f"{type(model).__name__} has no convert_to_fp16 (use fp16 or bf16)")
    convert()
    return model


def resolve_precision(precision: str, use_fp16: bool = False) -> str:
    """Map the config's `precision` and legacy `use_fp16` flag to fp32/fp16/bf16; "auto" means bf16
    autocast when `use_fp16` (no loss scaling needed), else fp32."""
    if precision == "auto":
        return "bf16" if use_fp16 else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of auto, {', '.join(PRECISIONS)}; got {precision!r}")
    return precision


def make_optimizer(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, multi-tensor: fused on CUDA (it reads `found_inf` on device), foreach on CPU."""
    params = list(params)
    on_cuda = bool(params) and params[0].is_cuda
    if on_cuda:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


class MixedPrecisionTrainer:
    """Owns the trainable parameters' precision policy: autocast, loss scaling, unscale, clip, skip."""

    def __init__(
        self,
        model: torch.nn.Module,
        precision: str = "fp32",
        fp16_scale_growth: float = 1e-3,
        initial_lg_loss_scale: float = 20.0,
        grad_clip: float = 0.0,
        extra_params: Iterable[torch.nn.Parameter] = (),
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
        if fp16_scale_growth <= 0:
            raise ValueError(f"fp16_scale_growth must be > 0; got {fp16_scale_growth}")
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.params += [p for p in extra_params if p.requires_grad]
        if not self.params:
            raise ValueError("MixedPrecisionTrainer: the model has no trainable parameters")
        self.device = self.params[0].device
        self.requested_precision = precision
        if precision not in ("fp32", ADM_FP16) and self.device.type != "cuda":
            logger.log(f"precision {precision} requested on {self.device.type}: computing in fp32 instead")
            precision = "fp32"
        self.precision = precision
        self.grad_clip = float(grad_clip)
        self.growth_interval = max(1, round(1.0 / fp16_scale_growth))
        self.fp16_scale_growth = float(fp16_scale_growth)
        dev = self.device
        init_scale = 2.0**initial_lg_loss_scale if precision in ("fp16", ADM_FP16) else 1.0
        self.scale = torch.tensor(init_scale, dtype=torch.float32, device=dev)
        self.lg_scale64 = torch.tensor(initial_lg_loss_scale, dtype=torch.float64, device=dev)  # adm_fp16
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=dev)
        # 0-dim like torch.amp.GradScaler's: fused AdamW subtracts it in place from its 0-dim step counters.
        self.found_inf = torch.zeros((), dtype=torch.float32, device=dev)
        self.grad_norm = torch.zeros((), dtype=torch.float32, device=dev)
        self.skipped_total = torch.zeros((), dtype=torch.int64, device=dev)
        self._reported_skips = 0  # skipped_total at the last check_skips, to log each skip once
        self.consecutive_skips = torch.zeros((), dtype=torch.int64, device=dev)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The compute dtype under autocast, or None for plain fp32."""
        return AUTOCAST_DTYPES.get(self.precision)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for forward passes: autocast in the chosen dtype, a no-op for fp32. No cast cache: each
        weight is cast where it is used, which CUDA graphs of the student need (a cached cast would be
        recorded once and go stale after the optimizer step)."""
        return autocast_context(self.precision, self.device, cuda_only=False, cache_enabled=False)

    @property
    def lg_loss_scale(self) -> torch.Tensor:
        """log2 of the current loss scale (a device scalar, 0 unless fp16)."""
        return torch.log2(self.scale)

    @property
    def step_taken(self) -> torch.Tensor:
        """Device scalar: 1.0 when the last `optimize` applied its update, 0.0 when it was skipped."""
        return 1.0 - self.found_inf

    def zero_grad(self) -> None:
        """Drop all gradients (set to None) before accumulating a new step."""
        for p in self.params:
            p.grad = None

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate `loss`, multiplied by the loss scale for fp16."""
        if self.precision in ("fp16", ADM_FP16):
            loss = loss * self.scale
        loss.backward()

    def optimize(self, opt: torch.optim.Optimizer) -> None:
        """Unscale, detect non-finite grads on device, clip, step (skipped on overflow), update the scale."""
        grads = [p.grad for p in self.params if p.grad is not None]
        self.found_inf.zero_()
        if grads:
            if self.precision == ADM_FP16:  # guided-diffusion's 1 / 2**lg in float64, then rounded
                inv_scale = torch.reciprocal(torch.exp2(self.lg_scale64)).float()
            else:
                inv_scale = torch.reciprocal(self.scale)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found_inf, inv_scale)
            norms = torch._foreach_norm(grads)
            self.grad_norm = torch.linalg.vector_norm(torch.stack(norms))
            if self.grad_clip > 0:
                coef = torch.clamp(self.grad_clip / (self.grad_norm + 1e-6), max=1.0)
                torch._foreach_mul_(grads, coef)
        self._step(opt)
        if self.precision == "fp16":
            torch._amp_update_scale_(
                self.scale, self.growth_tracker, self.found_inf, _GROWTH, _BACKOFF, self.growth_interval
            )
        elif self.precision == ADM_FP16:
            # guided-diffusion: lg_loss_scale -= 1 on overflow (step skipped), else += fp16_scale_growth, kept
            # in float64 as its Python float is, the scale 2**lg rounded to float32 where it multiplies
            taken = 1.0 - self.found_inf.double()
            self.lg_scale64 += self.fp16_scale_growth * taken - (1.0 - taken)
            self.scale.copy_(torch.exp2(self.lg_scale64))
        skipped = self.found_inf.to(torch.int64)
        self.skipped_total += skipped
        self.consecutive_skips.mul_(skipped).add_(skipped)

    def _step(self, opt: torch.optim.Optimizer) -> None:
        if getattr(opt, "_step_supports_amp_scaling", False) and self.device.type == "cuda":
            opt.found_inf = self.found_inf
            try:
                opt.step()
            finally:
                opt.found_inf = None
        elif self.found_inf.item() == 0.0:
            # Reading the flag on CPU costs nothing: there is no asynchronous device queue to drain.
            opt.step()

    def check_skips(self, max_consecutive: int) -> None:
        """Log steps skipped since the last call, and raise NonFiniteLossError once `max_consecutive` (> 0)
        steps in a row were skipped (host read)."""
        total = int(self.skipped_total.item())
        if total > self._reported_skips:
            logger.warn(
                f"skipped {total - self._reported_skips} optimizer step(s) with non-finite gradients "
                f"({total} in all, lg_loss_scale {float(self.lg_loss_scale):.2f})"
            )
            self._reported_skips = total
        if max_consecutive <= 0:
            return
        count = int(self.consecutive_skips.item())
        if count >= max_consecutive:
            raise NonFiniteLossError(
                f"{count} consecutive optimizer steps had non-finite gradients "
                f"(limit max_nonfinite_skips={max_consecutive}, lg_loss_scale="
                f"{float(self.lg_loss_scale):.2f}); check the learning rate, data and precision"
            )

    def state_dict(self) -> dict:
        """The loss-scaler state (scale, growth tracker, skip counters) for checkpoints."""
        return {
            "precision": self.precision,
            "lg_scale64": self.lg_scale64.detach().cpu(),
            "scale": self.scale.detach().cpu(),
            "growth_tracker": self.growth_tracker.detach().cpu(),
            "skipped_total": self.skipped_total.detach().cpu(),
            "consecutive_skips": self.consecutive_skips.detach().cpu(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the scaler state written by `state_dict` (scale is reset if the precision changed)."""
        if state.get("precision") == self.precision:
            self.scale.copy_(state["scale"])
            self.growth_tracker.copy_(state["growth_tracker"])
            if "lg_scale64" in state:
                self.lg_scale64.copy_(state["lg_scale64"])
        else:
            saved = state.get("precision")
            logger.log(f"loss-scaler state was saved for {saved}, now {self.precision}: not restored")
        self.skipped_total.copy_(state["skipped_total"])
        self._reported_skips = int(self.skipped_total.item())
        self.consecutive_skips.copy_(state["consecutive_skips"])

