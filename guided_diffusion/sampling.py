"""Sharded sampling to the ADM evaluator's `samples_<N>x<H>x<W>x3.npz` layout, plus PNG grids.

Every rank samples `batch_size` images per round (as guided-diffusion does); round r on rank k is seeded
from (seed, k, r), so a run is reproducible for a given world size. Rank 0 gathers exactly `num_samples`.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from . import dist_util, logger
from .infra.checkpoint import atomic_write_bytes
from .infra.compile_util import FastPath, fast_frozen
from .infra.mixed_precision import ADM_FP16, apply_adm_fp16, autocast_context

if TYPE_CHECKING:
    from .gaussian_diffusion import GaussianDiffusion

_SEED_STRIDE = 1_000_003  # keeps the per-(rank, round) seeds of different base seeds apart


def _round_seed(seed: int, rank: int, round_index: int) -> int:
    return (seed * _SEED_STRIDE + rank * 7_919 + round_index) % (2**63 - 1)


def to_uint8_nhwc(sample: torch.Tensor) -> torch.Tensor:
    """Model-space images in [-1, 1] (NCHW) to uint8 NHWC, rounding as guided-diffusion does."""
    return ((sample + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    if dist_util.get_world_size() == 1:
        return [tensor]
    return list(dist_util.all_gather_tensors(tensor))


@torch.no_grad()
def sample_images_and_labels(
    model: torch.nn.Module,
    diffusion: GaussianDiffusion,
    *,
    num_samples: int,
    batch_size: int,
    image_size: int,
    use_ddim: bool = False,
    clip_denoised: bool = True,
    clip_first: bool = False,
    clip_last: bool = False,
    class_cond: bool = False,
    num_classes: int | None = None,
    precision: str = "fp32",
    seed: int = 0,
    progress: bool = True,
    fast: FastPath | None = None,
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Like `sample_images`, also returning the class labels (None when unconditional) on rank 0."""
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}")
    if class_cond and not num_classes:
        raise ValueError("class_cond sampling needs num_classes")
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    device = next(model.parameters()).device
    loop: Callable = diffusion.ddim_sample_loop if use_ddim else diffusion.p_sample_loop
    was_training = model.training
    model.eval()
    if precision == ADM_FP16:
        apply_adm_fp16(model)
    frozen = fast_frozen(model, fast or FastPath(), name="sampling UNet")
    images: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    collected = 0
    round_index = 0
    rounds = math.ceil(num_samples / (batch_size * world))
    cuda_devices = [device] if device.type == "cuda" else []
    bar = tqdm(total=rounds * diffusion.num_timesteps, desc="sample", disable=not progress or rank != 0,
               dynamic_ncols=True)

    def net(*args, **kwargs):  # one denoising step per call: the bar counts steps over all rounds
        out = frozen(*args, **kwargs)
        bar.update(1)
        return out

    try:
        while collected < num_samples:
            n = min(batch_size, math.ceil((num_samples - collected) / world))
            with torch.random.fork_rng(devices=cuda_devices):
                torch.manual_seed(_round_seed(seed, rank, round_index))
                model_kwargs = {}
                if class_cond:
                    model_kwargs["y"] = torch.randint(0, num_classes, (n,), device=device)
                noise = torch.randn(n, 3, image_size, image_size, device=device)
                with autocast_context(precision, device):
                    sample = loop(
                        net, (n, 3, image_size, image_size), noise=noise, clip_denoised=clip_denoised,
                        model_kwargs=model_kwargs, device=device, progress=False,
                        clip_first=clip_first, clip_last=clip_last,
                    )
            images.extend(t.cpu() for t in _gather(to_uint8_nhwc(sample.float())))
            if class_cond:
                labels.extend(t.cpu() for t in _gather(model_kwargs["y"]))
            collected += n * world
            round_index += 1
            if progress and rank == 0:
                logger.log(f"sampled round {round_index}/{rounds}: {min(collected, num_samples)} images")
    finally:
        bar.close()
        model.train(was_training)
    if rank != 0:
        return None
    arr = torch.cat(images).numpy()[:num_samples]
    label_arr = torch.cat(labels).numpy()[:num_samples] if class_cond else None
    return arr, label_arr


def sample_images(
    model: torch.nn.Module,
    diffusion: GaussianDiffusion,
    *,
    num_samples: int,
    batch_size: int,
    image_size: int,
    use_ddim: bool = False,
    clip_denoised: bool = True,
    clip_first: bool = False,
    clip_last: bool = False,
    class_cond: bool = False,
    num_classes: int | None = None,
    precision: str = "fp32",
    seed: int = 0,
    progress: bool = True,
    fast: FastPath | None = None,
) -> np.ndarray | None:
    """Sample `num_samples` uint8 NHWC images sharded over ranks (`batch_size` per rank per round);
    rank 0 gets exactly `num_samples` of them, the other ranks None. `fast` (the config's speed switches,
    compile_util.FastPath) runs the network through CUDA graphs or torch.compile on CUDA."""
    result = sample_images_and_labels(
        model, diffusion, num_samples=num_samples, batch_size=batch_size, image_size=image_size,
        use_ddim=use_ddim, clip_denoised=clip_denoised, clip_first=clip_first, clip_last=clip_last,
        class_cond=class_cond, num_classes=num_classes, precision=precision, seed=seed, progress=progress,
        fast=fast,
    )
    return None if result is None else result[0]


def save_samples(arr: np.ndarray, out_dir: str, labels: np.ndarray | None = None) -> str:
    """Write `samples_<N>x<H>x<W>x3.npz` (`arr_0` uint8 NHWC, `arr_1` labels if given) atomically."""
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[3] != 3:
        raise ValueError(f"samples must be uint8 NHWC with 3 channels, got {arr.dtype} {arr.shape}")
    os.makedirs(out_dir, exist_ok=True)
    shape_str = "x".join(str(x) for x in arr.shape)
    path = os.path.join(out_dir, f"samples_{shape_str}.npz")
    buffer = io.BytesIO()
    if labels is None:
        np.savez(buffer, arr)
    else:
        np.savez(buffer, arr, labels)
    atomic_write_bytes(buffer.getvalue(), path)
    return path


def make_grid(arr: np.ndarray, n: int = 64) -> np.ndarray:
    """Tile the first `n` uint8 NHWC images into one near-square HWC image with a 2 px gap."""
    arr = arr[:n]
    count, h, w, c = arr.shape
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    pad = 2
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    for i, img in enumerate(arr):
        r, col = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = img
    return grid


def save_grid(arr: np.ndarray, path: str, n: int = 64) -> str:
    """Write a PNG grid of the first `n` images of a uint8 NHWC array, atomically; returns the path."""
    if arr.dtype != np.uint8 or arr.ndim != 4 or len(arr) == 0:
        raise ValueError(f"grid needs a non-empty uint8 NHWC array, got {arr.dtype} {arr.shape}")
    buffer = io.BytesIO()
    Image.fromarray(make_grid(arr, n)).save(buffer, format="PNG")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_bytes(buffer.getvalue(), path)
    return path
