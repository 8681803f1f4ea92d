"""Small layers and tensor helpers shared by the UNet and the diffusion code."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_AVG_POOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with float32 statistics that returns the input's dtype (stable under fp16/bf16).

    By default a half-precision input is upcast, normalized in float32 and cast back, as guided-diffusion
    does. With `half_input` (set by `use_half_norm`) the kernel reads the fp16/bf16 input directly: it still
    accumulates mean and variance in float32, so only the affine weights are rounded to the input's dtype,
    and the two casts (about half of the norm's memory traffic on a GPU) disappear.
    """

    half_input = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.half_input and x.dtype in (torch.float16, torch.bfloat16):
            weight = None if self.weight is None else self.weight.to(x.dtype)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            with torch.autocast(x.device.type, enabled=False):  # autocast would upcast group_norm again
                return F.group_norm(x, self.num_groups, weight, bias, self.eps)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def use_half_norm(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch every GroupNorm32 in `model` to (or back from) reading half-precision inputs directly."""
    for module in model.modules():
        if isinstance(module, GroupNorm32):
            module.half_input = bool(enabled)
    return model


def conv_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """Create a 1D, 2D or 3D convolution."""
    if dims not in _CONV:
        raise ValueError(f"unsupported dims={dims} for conv_nd (expected 1, 2 or 3)")
    return _CONV[dims](*args, **kwargs)


def linear(*args: Any, **kwargs: Any) -> nn.Linear:
    """Create a linear layer (named like the other factories so the UNet reads uniformly)."""
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """Create a 1D, 2D or 3D average pooling layer."""
    if dims not in _AVG_POOL:
        raise ValueError(f"unsupported dims={dims} for avg_pool_nd (expected 1, 2 or 3)")
    return _AVG_POOL[dims](*args, **kwargs)


def _conv_in_half(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    bias = None if self.bias is None else self.bias.half()
    return self._conv_forward(x.half(), self.weight.half(), bias)


def convert_convs_to_fp16(module: nn.Module) -> None:
    """guided-diffusion's fp16 for every Conv1d/2d/3d in `module`: computed in half precision from half
    weights. The weights stay float32 parameters (the master copy guided-diffusion keeps beside the model),
    rounded to half values once here as its master copy starts from the converted model, and rounded to
    half at each call as its master-to-model copy does after every step; their gradients arrive as the
    half gradients converted to float32, as its model-to-master copy."""
    for conv in module.modules():
        if isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            conv.forward = _conv_in_half.__get__(conv)
            with torch.no_grad():  # guided-diffusion's master copy starts from the half weights
                for param in (conv.weight, conv.bias):
                    if param is not None:
                        param.copy_(param.half().float())


def normalization(channels: int, groups: int = 32) -> GroupNorm32:
    """The UNet's normalization: GroupNorm with float32 statistics, ADM's 32 groups unless the arch key
    `norm_groups` says otherwise. With as many groups as channels it is an instance norm, which removes each
    channel's spatial mean: how a colour offset reaches a narrow net (docs/RESULTS.md)."""
    if groups < 1 or channels % groups:
        raise ValueError(f"norm_groups {groups} must be >= 1 and divide the normalized width {channels}")
    return GroupNorm32(groups, channels)


def full_precision(x: torch.Tensor) -> torch.autocast:
    """Autocast off on `x`'s device. guided-diffusion's fp16 mode halves only the convolutions of the UNet's
    blocks; the time embedding, the blocks' embedding projections and the output head stay float32. Under
    autocast the UNet keeps those three in float32 with this, which took CPU bf16 samples of the digits
    student 2.5x closer to fp32 ones (docs/RESULTS.md)."""
    return torch.autocast(x.device.type, enabled=False)


def check_class_labels(x: torch.Tensor, y: torch.Tensor | None, conditional: bool) -> None:
    """ValueError unless `y` is given exactly when the model is class-conditional, as one label per image."""
    if (y is None) == conditional:
        raise ValueError("pass y (class labels) if and only if the model is class-conditional")
    if y is not None and y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")


def zero_module(module: nn.Module) -> nn.Module:
    """Zero all parameters of `module` in place and return it (residual branches start as identity)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] of (possibly fractional) timesteps [N]: cosines first, then sines."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over all dimensions except the batch dimension."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))
