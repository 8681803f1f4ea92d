"""The ADM UNet (guided-diffusion layout): state-dict keys match the published DDPM-IP teachers."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .nn import (
    avg_pool_nd,
    check_class_labels,
    conv_nd,
    convert_convs_to_fp16,
    full_precision,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)


class TimestepBlock(nn.Module):
    """A module whose forward also takes the timestep embedding."""

    @abstractmethod
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Apply the block to `x` conditioned on `emb`."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A sequential container that passes the timestep embedding to the children that take it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling (inner two dims for 3D), optionally followed by a 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        elif self.out_channels != channels:
            raise ValueError(f"Upsample without conv keeps channels: {channels} != {self.out_channels}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling (inner two dims for 3D) by a strided 3x3 conv or by average pooling."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        stride = (1, 2, 2) if dims == 3 else 2
        if use_conv:
            self.op = conv_nd(dims, channels, self.out_channels, 3, stride=stride, padding=1)
        elif self.out_channels != channels:
            raise ValueError(f"Downsample without conv keeps channels: {channels} != {self.out_channels}")
        else:
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding (added or scale-shift), optionally resampling."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
        norm_groups: int = 32,
    ):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels, norm_groups),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        emb_out = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels, norm_groups),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )

        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        with full_precision(emb):
            emb_out = self.emb_layers(emb.float()).to(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *([1] * (h.ndim - 2)))
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class QKVAttention(nn.Module):
    """Multi-head attention over a packed [N, 3*H*C, T] tensor, via fused scaled_dot_product_attention.

    `legacy=False` ("new order") packs q, k, v first and heads second; `legacy=True` packs heads first,
    each head holding its own q, k, v (the layout of older checkpoints).
    """

    def __init__(self, n_heads: int, legacy: bool = False):
        super().__init__()
        self.n_heads = n_heads
        self.legacy = legacy

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        batch, width, length = qkv.shape
        if width % (3 * self.n_heads):
            raise ValueError(f"qkv width {width} is not divisible by 3 * n_heads ({self.n_heads})")
        ch = width // (3 * self.n_heads)
        if self.fp16_math:
            return self._guided_diffusion_fp16(qkv, ch)
        if self.legacy:
            qkv = qkv.reshape(batch, self.n_heads, 3, ch, length).permute(2, 0, 1, 4, 3)
        else:
            qkv = qkv.reshape(batch, 3, self.n_heads, ch, length).permute(1, 0, 2, 4, 3)
        q, k, v = qkv.contiguous().unbind(0)  # each [N, H, T, C]
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(-1, -2).reshape(batch, self.n_heads * ch, length)

    fp16_math = False  # set by UNetModel.convert_to_fp16: the attention arithmetic of guided-diffusion's fp16

    def _guided_diffusion_fp16(self, qkv: torch.Tensor, ch: int) -> torch.Tensor:
        """Attention as guided-diffusion computes it, in the same layouts (which its fp16 gradients depend
        on): q and k each scaled by ch^-1/4, the logits in the input dtype, the softmax in float32 and cast
        back, then the weighted sum of v, per (batch, head) as [C, T] matrices."""
        batch, _, length = qkv.shape
        rows = batch * self.n_heads
        if self.legacy:
            q, k, v = qkv.reshape(rows, ch * 3, length).split(ch, dim=1)
        else:
            q, k, v = (part.reshape(rows, ch, length) for part in qkv.chunk(3, dim=1))
        scale = 1 / (ch ** 0.25)
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        return torch.einsum("bts,bcs->bct", weight, v).reshape(batch, -1, length)


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions, added residually."""

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
        norm_groups: int = 32,
    ):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        elif channels % num_head_channels:
            raise ValueError(f"channels {channels} not divisible by num_head_channels {num_head_channels}")
        else:
            self.num_heads = channels // num_head_channels
        if channels % self.num_heads:
            raise ValueError(f"channels {channels} not divisible by num_heads {self.num_heads}")
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels, norm_groups)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.attention = QKVAttention(self.num_heads, legacy=not use_new_attention_order)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, *spatial = x.shape
        x = x.reshape(batch, channels, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(batch, channels, *spatial)


class UNetModel(nn.Module):
    """The ADM UNet with attention and timestep (and optional class) conditioning.

    `attention_resolutions` holds downsample rates (1, 2, 4, ...) at which attention is used.
    `use_fp16` is accepted for config compatibility; weights stay fp32 (mixed precision uses autocast).
    `convert_to_fp16()` gives guided-diffusion's own fp16 instead (`precision: adm_fp16`).
    """

    block_dtype = torch.float32  # float16 after convert_to_fp16

    def convert_to_fp16(self) -> None:
        """guided-diffusion's fp16 (its method of this name): the convolutions of the input, middle and
        output blocks compute in half precision, with guided-diffusion's attention arithmetic; the
        embeddings and the output head stay float32. Parameters stay float32 (nn.convert_convs_to_fp16)."""
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            convert_convs_to_fp16(part)
            for attention in part.modules():
                if isinstance(attention, QKVAttention):
                    attention.fp16_math = True
        self.block_dtype = torch.float16

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        norm_groups: int = 32,
    ):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.dropout = dropout
        self.channel_mult = tuple(channel_mult)
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.use_fp16 = use_fp16
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim),
            nn.SiLU(),
            linear(time_embed_dim, time_embed_dim),
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        def res_block(ch: int, out_ch: int, **updown: bool) -> ResBlock:
            return ResBlock(
                ch,
                time_embed_dim,
                dropout,
                out_channels=out_ch,
                dims=dims,
                use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm,
                norm_groups=norm_groups,
                **updown,
            )

        def attention(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(
                ch,
                num_heads=heads,
                num_head_channels=num_head_channels,
                use_checkpoint=use_checkpoint,
                use_new_attention_order=use_new_attention_order,
                norm_groups=norm_groups,
            )

        ch = input_ch = int(self.channel_mult[0] * model_channels)
        conv_in = conv_nd(dims, in_channels, ch, 3, padding=1)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_in)])
        skip_chans = [ch]
        down_idx: list[int] = []
        down_chans: list[int] = []
        ds = 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in self.attention_resolutions:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            down_idx.append(len(self.input_blocks) - 1)
            down_chans.append(ch)
            if level != len(self.channel_mult) - 1:
                down = (
                    res_block(ch, ch, down=True)
                    if resblock_updown
                    else Downsample(ch, conv_resample, dims=dims, out_channels=ch)
                )
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res_block(ch, ch), attention(ch, num_heads), res_block(ch, ch)
        )
        middle_ch = ch

        self.output_blocks = nn.ModuleList([])
        up_idx: list[int] = []
        up_chans: list[int] = []
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(num_res_blocks + 1):
                skip_ch = skip_chans.pop()
                layers = [res_block(ch + skip_ch, int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in self.attention_resolutions:
                    layers.append(attention(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(
                        res_block(ch, ch, up=True)
                        if resblock_updown
                        else Upsample(ch, conv_resample, dims=dims, out_channels=ch)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
            up_idx.append(len(self.output_blocks) - 1)
            up_chans.append(ch)

        self.out = nn.Sequential(
            normalization(ch, norm_groups),
            nn.SiLU(),
            zero_module(conv_nd(dims, input_ch, out_channels, 3, padding=1)),
        )

        self._down_idx = tuple(down_idx)
        self._up_idx = tuple(up_idx)
        self._feature_channels = {
            "emb": time_embed_dim,
            "down": down_chans,
            "middle": middle_ch,
            "up": up_chans,
        }

    def feature_channels(self) -> dict[str, int | list[int]]:
        """Channel counts of the `return_features` tensors (to size projection heads without a forward)."""
        chans = self._feature_channels
        return {
            "emb": chans["emb"],
            "down": list(chans["down"]),
            "middle": chans["middle"],
            "up": list(chans["up"]),
        }

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        y: torch.Tensor | None = None,
        return_features: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
        """Predict the model output [N, out_channels, ...] for noisy `x` [N, C, ...] at `timesteps` [N].

        With `return_features=True` returns `(out, feats)`: feats["emb"] the conditioning embedding
        [N, 4*model_channels]; feats["down"][l] the last input-block output at level l before its
        downsample; feats["middle"] the middle-block output; feats["up"][j] the last output-block output of
        the j-th level in output order (after its upsample, if any).
        """
        check_class_labels(x, y, self.num_classes is not None)
        with full_precision(x):
            emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if y is not None:
            emb = emb + self.label_emb(y)

        skips = []
        downs = []
        h = x.type(self.block_dtype) if self.block_dtype != torch.float32 else x
        for i, module in enumerate(self.input_blocks):
            h = module(h, emb)
            skips.append(h)
            if i in self._down_idx:
                downs.append(h)
        h = self.middle_block(h, emb)
        middle = h
        ups = []
        for i, module in enumerate(self.output_blocks):
            h = module(torch.cat([h, skips.pop()], dim=1), emb)
            if i in self._up_idx:
                ups.append(h)
        with full_precision(h):
            out = self.out(h.float())
        if not return_features:
            return out
        return out, {"emb": emb, "down": downs, "middle": middle, "up": ups}
