"""What one forward pass of a UNet or DiT costs: parameters, thop's multiply-accumulates of its layers, and
the attention matmuls thop does not count. The one count behind the training log, the demo and the
benchmarks."""

from __future__ import annotations

import copy

import torch

from .dit import Attention as TokenAttention
from .unet import QKVAttention


def forward_cost(model: torch.nn.Module, image_size: int | None = None) -> dict[str, float]:
    """`params`, `macs` (thop, layers only), `attention_flops` (q@k^T and w@v) and `flops` = 2 * macs +
    attention_flops for one batch-1 forward of an ADM UNet or a DiT at `image_size` (default: the model's),
    on a float32 CPU copy so the model itself is untouched."""
    from thop import profile

    probe = copy.deepcopy(model).float().cpu().eval()
    size = int(image_size or probe.image_size)
    attention: list[float] = []

    def count(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        _, width, length = inputs[0].shape
        attention.append(4.0 * length * length * width / 3)  # two [L, L] x [L, C/3]-sized matmuls, 2 FLOPs

    def count_tokens(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        _, length, width = inputs[0].shape  # [N, T, D] tokens: the same two matmuls over T tokens of width D
        attention.append(4.0 * length * length * width)

    hooks = [m.register_forward_hook(count) for m in probe.modules() if isinstance(m, QKVAttention)]
    hooks += [m.register_forward_hook(count_tokens) for m in probe.modules() if isinstance(m, TokenAttention)]
    inputs = [torch.zeros(1, probe.in_channels, size, size), torch.zeros(1, dtype=torch.long)]
    if getattr(probe, "num_classes", None):
        inputs.append(torch.zeros(1, dtype=torch.long))
    try:
        with torch.no_grad():
            macs, _ = profile(probe, inputs=tuple(inputs), verbose=False)
    finally:
        for hook in hooks:
            hook.remove()
    attention_flops = float(sum(attention))
    return {
        "params": float(sum(p.numel() for p in model.parameters())),
        "macs": float(macs),
        "attention_flops": attention_flops,
        "flops": 2.0 * float(macs) + attention_flops,
    }
