"""DiT: a diffusion transformer (Peebles & Xie, 2023) in pixel space, as a student or teacher of any method.

Tokens are non-overlapping p x p patches with a fixed 2-D sin-cos position table; every block is attention
plus an MLP whose LayerNorms are modulated (shift, scale) and whose residual branches are gated by the
conditioning vector c = time embedding (+ label embedding), all six from one linear layer that starts at
zero (adaLN-Zero), so a fresh DiT outputs exactly 0. Module names, parameter order and shapes are those of
the DKDM authors' `dit.py` (timm's PatchEmbed / Attention / Mlp names), so their checkpoints load strictly.
The call contract is the UNet's: `model(x, timesteps, y=None, return_features=False)`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .nn import check_class_labels, full_precision, timestep_embedding

# name -> the sizes it fixes: the DiT paper's model grid.
DIT_CONFIGS: dict[str, dict[str, int]] = {
    f"DiT-{size}/{patch}": {"depth": depth, "hidden_size": width, "patch_size": patch, "num_heads": heads}
    for size, (depth, width, heads) in {
        "XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6),
    }.items()
    for patch in (2, 4, 8)
}


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: per-sample shift and scale [N, D] applied to every token of `x` [N, T, D]."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_position_table(width: int, grid: int) -> np.ndarray:
    """[grid*grid, width] fixed position codes, row-major over (row, column): the first half of the
    channels encode the column, the second half the row, each as sines then cosines of geometric
    frequencies 1 / 10000^(2i/(width/2)) (the MAE/DiT table, computed in float64)."""
    if width % 4:
        raise ValueError(f"hidden_size {width} must be divisible by 4 for the 2-D sin-cos position table")
    quarter = width // 4
    freqs = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    cols, rows = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))

    def encode(pos: np.ndarray) -> np.ndarray:
        angles = pos.reshape(-1)[:, None] * freqs[None]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([encode(cols), encode(rows)], axis=1)


class PatchEmbed(nn.Module):
    """[N, C, H, W] -> [N, (H/p)(W/p), D]: one strided convolution, patches in row-major order."""

    def __init__(self, image_size: int, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = image_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention over tokens through `scaled_dot_product_attention` (flash where it can)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(n, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(n, tokens, dim))


class Mlp(nn.Module):
    """Two linear layers with a tanh-approximated GELU between them."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TimestepEmbedder(nn.Module):
    """Timesteps [N] -> [N, D]: a 256-wide sinusoidal code (cosines first) through a SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_size))


class LabelEmbedder(nn.Module):
    """Class labels [N] -> [N, D]. With `dropout_prob` > 0 the table has one extra row, the "no label"
    entry, which replaces each label with that probability in training (classifier-free guidance)."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels: torch.Tensor, train: bool) -> torch.Tensor:
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class DiTBlock(nn.Module):
    """Attention and MLP sub-blocks, each a gated residual over a modulated LayerNorm (adaLN-Zero)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        with full_precision(c):  # the conditioning projections stay float32 under autocast, as the UNet's
            modulation = self.adaLN_modulation(c.float())
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = modulation.chunk(6, dim=1)
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    """Modulated LayerNorm and a linear map from each token to its patch's p*p*out_channels values."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """A diffusion transformer over `input_size` px images split into `patch_size` patches.

    Output channels are 2 * in_channels with `learn_sigma` (eps and the variance interpolation, as the ADM
    UNet), else in_channels. `use_class` adds a label embedding of `num_classes` classes. `use_fp16` is
    accepted for config compatibility; weights stay float32 (mixed precision uses autocast); under autocast
    the time embedding, the blocks' adaLN projections and the output layer run in float32, as the UNet's
    time embedding, embedding projections and output head do, and attention and MLPs in half precision.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        use_class: bool = True,
        use_fp16: bool = False,
    ) -> None:
        super().__init__()
        check_dit_shape(input_size, patch_size, hidden_size, num_heads, depth)
        self.image_size = input_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.use_class = use_class
        self.use_fp16 = use_fp16
        self.num_classes = num_classes if use_class else None

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if use_class:
            self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        grid = self.x_embedder.grid_size
        table = torch.tensor(sincos_position_table(hidden_size, grid), dtype=torch.float32).unsqueeze(0)
        self.pos_embed = nn.Parameter(table, requires_grad=False)  # fixed; a parameter, as in the checkpoints
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier-uniform linear layers (the patch projection as one), zero biases, N(0, 0.02) time and label
        embeddings, and zero adaLN and output layers: every block starts as the identity, the output at 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        proj = self.x_embedder.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        if self.use_class:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [*(block.adaLN_modulation[-1] for block in self.blocks),
                      self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def feature_channels(self) -> dict[str, int | list[int]]:
        """Channel counts of the `return_features` tensors (the UNet's contract; no down/up levels)."""
        return {"emb": self.hidden_size, "down": [], "middle": self.hidden_size, "up": []}

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, T, p*p*C] -> [N, C, H, W], each token's values laid out as (p, p, C)."""
        p, grid, channels = self.patch_size, self.x_embedder.grid_size, tokens.shape[-1] // self.patch_size**2
        x = tokens.reshape(tokens.shape[0], grid, grid, p, p, channels)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(tokens.shape[0], channels, grid * p, grid * p)

    def token_map(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, T, D] -> [N, D, H/p, W/p]: tokens as a feature map, for methods that read convolutionally."""
        grid = self.x_embedder.grid_size
        return tokens.transpose(1, 2).reshape(tokens.shape[0], self.hidden_size, grid, grid)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        y: torch.Tensor | None = None,
        return_features: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
        """Predict [N, out_channels, H, W] for noisy `x` [N, C, H, W] at `timesteps` [N].

        With `return_features=True` returns `(out, feats)`: feats["emb"] the conditioning vector c [N, D];
        feats["middle"] the tokens after the first depth//2 blocks as a map [N, D, H/p, W/p];
        feats["down"] and feats["up"] empty (a DiT has no resolution levels).
        """
        check_class_labels(x, y, self.use_class)
        h = self.x_embedder(x) + self.pos_embed
        with full_precision(x):
            c = self.t_embedder(timesteps)
        if self.use_class:
            c = c + self.y_embedder(y, self.training)
        middle = h
        for index, block in enumerate(self.blocks):
            if index == self.depth // 2:
                middle = h
            h = block(h, c)
        with full_precision(h):
            out = self.unpatchify(self.final_layer(h.float(), c.float()))
        if not return_features:
            return out
        return out, {"emb": c, "down": [], "middle": self.token_map(middle), "up": []}


def check_dit_shape(input_size: int, patch_size: int, hidden_size: int, num_heads: int, depth: int) -> None:
    """ValueError naming the value when the patches do not tile the image or the heads do not split the
    width (checked before any weight exists, so configs fail at load)."""
    if patch_size < 1 or input_size % patch_size:
        raise ValueError(f"patch_size {patch_size} does not divide the image size {input_size}")
    if num_heads < 1 or hidden_size % num_heads:
        raise ValueError(f"num_heads {num_heads} does not divide hidden_size {hidden_size}")
    if hidden_size % 4:
        raise ValueError(f"hidden_size {hidden_size} must be divisible by 4 (the 2-D sin-cos position table)")
    if depth < 1:
        raise ValueError(f"depth {depth} must be at least 1")
