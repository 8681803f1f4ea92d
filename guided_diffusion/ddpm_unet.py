"""The pytorch-ddpm UNet that RCFD and RDD train (their `model.UNet`), with its exact state-dict keys so the
checkpoints RCFD published (`ckpt.pt`: `net_model`, `ema_model`, `T`, `time_scale`, `x_T`) load strictly.

Differences from the ADM `UNetModel`: GroupNorm(32) + Swish, single-head attention inside the residual
blocks of the listed levels and in the first middle block, a frozen sinusoidal time table of T+1 rows
indexed by integer timestep, an optional one-hot class embedding, and one output (x0 in every RCFD config).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import init

CHECKPOINT_KEYS = ("net_model", "ema_model", "T", "time_scale", "x_T")


class Swish(nn.Module):
    """x * sigmoid(x), as a module so the Sequential indices match the published keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


def sinusoid_table(rows: int, width: int) -> torch.Tensor:
    """Row k interleaves sin(k w_j), cos(k w_j) with w_j = exp(-2j ln(10000) / width), j < width / 2."""
    if width % 2:
        raise ValueError(f"time embedding width must be even, got {width}")
    freqs = torch.exp(-torch.arange(0, width, 2) / width * math.log(10000))
    angles = torch.arange(rows).float()[:, None] * freqs[None, :]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).view(rows, width)


def _xavier(module: nn.Conv2d | nn.Linear, gain: float = 1.0) -> None:
    init.xavier_uniform_(module.weight, gain=gain)
    init.zeros_(module.bias)


class TimeEmbedding(nn.Module):
    """Frozen sinusoid table lookup, then Linear-Swish-Linear (keys `timembedding.{0,1,3}`)."""

    def __init__(self, rows: int, width: int, dim: int) -> None:
        super().__init__()
        self.timembedding = nn.Sequential(
            nn.Embedding.from_pretrained(sinusoid_table(rows, width)),
            nn.Linear(width, dim),
            Swish(),
            nn.Linear(dim, dim),
        )
        _xavier(self.timembedding[1])
        _xavier(self.timembedding[3])

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.timembedding(t)


class DownSample(nn.Module):
    """Stride-2 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.main = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        _xavier(self.main)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.main(x)


class UpSample(nn.Module):
    """Nearest 2x upsampling, then a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.main = nn.Conv2d(channels, channels, 3, stride=1, padding=1)
        _xavier(self.main)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.main(F.interpolate(x, scale_factor=2, mode="nearest"))


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions with 1x1 q/k/v/out projections and a residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(32, channels)
        self.proj_q = nn.Conv2d(channels, channels, 1)
        self.proj_k = nn.Conv2d(channels, channels, 1)
        self.proj_v = nn.Conv2d(channels, channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        for conv in (self.proj_q, self.proj_k, self.proj_v):
            _xavier(conv)
        _xavier(self.proj, gain=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        normed = self.group_norm(x)
        q = self.proj_q(normed).permute(0, 2, 3, 1).reshape(b, h * w, c)
        k = self.proj_k(normed).reshape(b, c, h * w)
        v = self.proj_v(normed).permute(0, 2, 3, 1).reshape(b, h * w, c)
        weights = F.softmax(torch.bmm(q, k) * (int(c) ** -0.5), dim=-1)
        out = torch.bmm(weights, v).view(b, h, w, c).permute(0, 3, 1, 2)
        return x + self.proj(out.contiguous())


class ResBlock(nn.Module):
    """GN-Swish-conv, plus the projected time embedding, GN-Swish-dropout-conv, a 1x1 shortcut when the
    width changes, then attention when asked."""

    def __init__(self, in_ch: int, out_ch: int, tdim: int, dropout: float, attn: bool = False) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.GroupNorm(32, in_ch), Swish(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.temb_proj = nn.Sequential(Swish(), nn.Linear(tdim, out_ch))
        self.block2 = nn.Sequential(
            nn.GroupNorm(32, out_ch), Swish(), nn.Dropout(dropout), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        )
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.attn = AttnBlock(out_ch) if attn else nn.Identity()
        for module in (self.block1[2], self.temb_proj[1], self.shortcut):
            if isinstance(module, nn.Conv2d | nn.Linear):
                _xavier(module)
        _xavier(self.block2[3], gain=1e-5)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x) + self.temb_proj(temb)[:, :, None, None]
        h = self.block2(h) + self.shortcut(x)
        return self.attn(h)


class DDPMUNet(nn.Module):
    """`DDPMUNet(T, ch, ch_mult, attn, num_res_blocks, dropout)`: the UNet of RCFD/RDD for images of any
    size divisible by 2**(len(ch_mult)-1). `T` is the largest timestep index (T * time_scale of the run:
    1024), the time table has T+1 rows. `forward(x, t, y=None, feature=False)` returns the output (x0), or
    `(out, feature)` with the last up-path activation (detached) when `feature`."""

    def __init__(
        self,
        T: int,
        ch: int,
        ch_mult: Sequence[int],
        attn: Sequence[int],
        num_res_blocks: int,
        dropout: float,
        conditional: bool = False,
        class_num: int = 1000,
    ) -> None:
        super().__init__()
        if any(level >= len(ch_mult) for level in attn):
            raise ValueError(f"attn levels {list(attn)} must index ch_mult {list(ch_mult)}")
        tdim = 4 * ch
        self.T = T
        self.time_embedding = TimeEmbedding(T + 1, ch, tdim)
        self.head = nn.Conv2d(3, ch, 3, padding=1)
        _xavier(self.head)
        self.downblocks = nn.ModuleList()
        skip_channels = [ch]
        width = ch
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.downblocks.append(ResBlock(width, ch * mult, tdim, dropout, attn=level in attn))
                width = ch * mult
                skip_channels.append(width)
            if level != len(ch_mult) - 1:
                self.downblocks.append(DownSample(width))
                skip_channels.append(width)
        self.middleblocks = nn.ModuleList(
            [ResBlock(width, width, tdim, dropout, attn=True), ResBlock(width, width, tdim, dropout)]
        )
        self.upblocks = nn.ModuleList()
        for level in reversed(range(len(ch_mult))):
            for _ in range(num_res_blocks + 1):
                out_ch = ch * ch_mult[level]
                self.upblocks.append(
                    ResBlock(skip_channels.pop() + width, out_ch, tdim, dropout, attn=level in attn)
                )
                width = out_ch
            if level != 0:
                self.upblocks.append(UpSample(width))
        self.tail = nn.Sequential(nn.GroupNorm(32, width), Swish(), nn.Conv2d(width, 3, 3, padding=1))
        _xavier(self.tail[2], gain=1e-5)
        self.conditional = conditional
        self.class_num = class_num
        if conditional:
            self.y_embedding = nn.Linear(class_num, tdim)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, feature: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        temb = self.time_embedding(t)
        if self.conditional:
            if y is None:
                raise ValueError("a conditional DDPMUNet needs class labels y")
            temb = temb + self.y_embedding(F.one_hot(y.long(), num_classes=self.class_num).float())
        h = self.head(x)
        skips = [h]
        for block in self.downblocks:
            h = block(h, temb)
            skips.append(h)
        for block in self.middleblocks:
            h = block(h, temb)
        for block in self.upblocks:
            if isinstance(block, ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, temb)
        last = h.detach().clone()
        out = self.tail(h)
        return (out, last) if feature else out


def load_rcfd_checkpoint(
    path: str, device: torch.device | str = "cpu", which: str | None = None, **unet_kwargs: Any
) -> tuple[DDPMUNet, dict[str, Any]]:
    """Build a DDPMUNet from `unet_kwargs` (T defaults to ckpt T * time_scale) and load an RCFD/RDD
    `ckpt.pt` strictly. `which` picks `net_model` or `ema_model`; by default the authors' rule: the EMA
    for a base model (time_scale 1), the raw weights for a distilled student. Returns (model, the
    checkpoint's T / time_scale / x_T)."""
    from .infra.checkpoint import CheckpointError, load_state_dict_strict, safe_torch_load

    ckpt = safe_torch_load(path, map_location="cpu")
    if not isinstance(ckpt, Mapping) or "net_model" not in ckpt:
        raise CheckpointError(f"{path}: not an RCFD/RDD ckpt.pt (expected keys {', '.join(CHECKPOINT_KEYS)})")
    time_scale = int(ckpt.get("time_scale", 1))
    which = which or ("ema_model" if time_scale == 1 and "ema_model" in ckpt else "net_model")
    if which not in ckpt:
        raise CheckpointError(f"{path}: has no '{which}' (keys: {', '.join(map(str, ckpt))})")
    unet_kwargs.setdefault("T", int(ckpt["T"]) * time_scale)
    model = DDPMUNet(**unet_kwargs)
    load_state_dict_strict(model, ckpt[which], source=f"{path}[{which}]")
    meta = {"T": int(ckpt["T"]), "time_scale": time_scale, "x_T": ckpt.get("x_T"), "which": which}
    return model.to(device), meta


def save_rcfd_checkpoint(
    path: str,
    net_model: nn.Module,
    T: int,
    time_scale: int,
    x_T: torch.Tensor,
    ema_model: nn.Module | None = None,
) -> None:
    """Write a `ckpt.pt` in the RCFD/RDD layout (atomically): `net_model`, optional `ema_model` (base
    models), `T` (the model's steps), `time_scale` (T * time_scale = 1024 in the published chain), `x_T`."""
    from .infra.checkpoint import atomic_torch_save

    def on_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}

    payload: dict[str, Any] = {"net_model": on_cpu(net_model), "T": int(T), "time_scale": int(time_scale)}
    if ema_model is not None:
        payload["ema_model"] = on_cpu(ema_model)
    payload["x_T"] = x_T.detach().cpu()
    atomic_torch_save(payload, path)
