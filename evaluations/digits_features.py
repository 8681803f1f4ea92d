"""A small CNN digit classifier whose penultimate layer serves as the feature space for digits FID.

Inception features mean little on 32x32 grey digits, so the demo measures FID / precision / recall in the
128-d pooled features of this network, trained on the digits train split only
(`scripts/train_digits_features.py`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from guided_diffusion.infra.checkpoint import atomic_torch_save

DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "model" / "digits32_features.pt"
FEATURE_DIM = 128
INPUT_SIZE = 32
NUM_CLASSES = 10


class DigitsNet(nn.Module):
    """Three conv stages (32->16->8 px), global average pool to a 128-d feature, 10-way linear head."""

    def __init__(self) -> None:
        super().__init__()

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
            )

        self.body = nn.Sequential(
            stage(3, 32), nn.MaxPool2d(2), stage(32, 64), nn.MaxPool2d(2), stage(64, FEATURE_DIM)
        )
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map images in [-1, 1] (NCHW) to (pooled features [N, 128], logits [N, 10])."""
        feats = self.body(x).mean(dim=(2, 3))
        return feats, self.head(feats)


def to_input(images: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """Convert uint8 NHWC images (square, 8 to 32 px, 1 or 3 channels) to a float NCHW tensor in [-1, 1] at
    the net's 32x32; smaller images are upscaled bilinearly, as the digits data itself is made from 8x8."""
    arr = np.asarray(images)
    square = arr.ndim == 4 and arr.shape[1] == arr.shape[2] and 8 <= arr.shape[1] <= INPUT_SIZE
    if not square or arr.shape[3] not in (1, 3):
        raise ValueError(f"digits features need uint8 images [N, S, S, 3] with 8 <= S <= 32; got {arr.shape}")
    x = torch.from_numpy(np.ascontiguousarray(arr)).to(device=device, dtype=torch.float32)
    x = x.permute(0, 3, 1, 2) / 127.5 - 1.0
    if x.shape[-1] != INPUT_SIZE:
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class DigitsExtractor:
    """Feature extractor over a trained DigitsNet: `features(images)` -> dict(pool, spatial, logits)."""

    name = "digits"
    feature_dim = FEATURE_DIM

    def __init__(self, net: DigitsNet, device: torch.device | str, batch_size: int = 500) -> None:
        self.net = net.to(device).eval()
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def features(self, images: np.ndarray) -> dict[str, np.ndarray | None]:
        """Pooled features [N, 128] and logits [N, 10] (float64 numpy) of uint8 NHWC images; no spatial."""
        pools, logits = [], []
        for start in range(0, len(images), self.batch_size):
            feats, out = self.net(to_input(images[start : start + self.batch_size], self.device))
            pools.append(feats.double().cpu().numpy())
            logits.append(out.double().cpu().numpy())
        if not pools:
            return {"pool": np.zeros((0, FEATURE_DIM)), "spatial": None, "logits": np.zeros((0, NUM_CLASSES))}
        return {"pool": np.concatenate(pools), "spatial": None, "logits": np.concatenate(logits)}

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        """Fraction of images whose argmax logit equals the label."""
        pred = self.features(images)["logits"].argmax(axis=1)
        return float((pred == np.asarray(labels)).mean())


def build_extractor(
    device: torch.device | str = "cpu", weights_path: str | os.PathLike | None = None
) -> DigitsExtractor:
    """Load the shipped (or given) DigitsNet weights and wrap them as a feature extractor."""
    path = Path(weights_path) if weights_path is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(
            f"digits feature weights not found: {path} (train them with scripts/train_digits_features.py)"
        )
    net = DigitsNet()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return DigitsExtractor(net, device)


def _random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Translate each image by up to `max_shift` pixels (zero fill): cheap augmentation for small data."""
    n = x.shape[0]
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    size = x.shape[-1]
    return torch.stack(
        [padded[i, :, dy[i] : dy[i] + size, dx[i] : dx[i] + size] for i in range(n)]
    )


def train_features(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int = 15,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> DigitsNet:
    """Train a DigitsNet classifier (Adam, cosine lr, random shifts) on uint8 NHWC images; eval mode."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = DigitsNet().to(device)
    x_all = to_input(images, "cpu")
    y_all = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    steps_per_epoch = (len(x_all) + batch_size - 1) // batch_size
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x_all), generator=gen)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            x = _random_shift(x_all[idx], gen).to(device)
            _, logits = net(x)
            loss = F.cross_entropy(logits, y_all[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


def save_weights(net: DigitsNet, path: str | os.PathLike) -> None:
    """Save the state dict (CPU tensors only) atomically: temp file in the same folder, fsync, rename."""
    atomic_torch_save({k: v.detach().cpu() for k, v in net.state_dict().items()}, path)
