"""PyTorch port of the FID Inception-v3 graph (TensorFlow `classify_image_graph_def.pb`, 2015-12-05).

Module names and parameter shapes follow the standard PyTorch FID weights file
`pt_inception-2015-12-05-6726825d.pth` (torchvision's Inception3 layout, no aux head, 1008-way fc), including
the FID-specific blocks: average pools that exclude padding, and a max pool in the last block. The input
stage reproduces the graph: uint8 values as float, TF's legacy bilinear resize to 299x299, (x - 128) / 128.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from evaluations.downloads import fetch_verified

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_SHA256_PREFIX = "6726825d"  # the hash prefix in the file name, as torch.hub names weights files
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_NAME
WEIGHTS_ENV = "GD_INCEPTION_WEIGHTS"
WEIGHTS_URL_ENV = "GD_INCEPTION_URL"  # a mirror of WEIGHTS_URL (the file name must keep its hash prefix)
INPUT_SIZE = 299
SPATIAL_CHANNELS = 7


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, as the TF graph), ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """conv -> bn -> relu."""
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_same(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (TF mixed .. mixed_2): 1x1, 5x5, double 3x3 and pooled branches."""

    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate the four branches along channels."""
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_same(x))], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (TF mixed_3)."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Strided 3x3, strided double 3x3 and a max-pooled branch."""
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (TF mixed_4 .. mixed_7)."""

    def __init__(self, cin: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate 1x1, 7x7, double 7x7 and pooled branches."""
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
            d = layer(d)
        d = self.branch7x7dbl_5(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_same(x))], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (TF mixed_8)."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Strided 3x3, strided 7x7x3 and a max-pooled branch."""
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs (TF mixed_9 with an average pool, mixed_10 with a max pool)."""

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate 1x1, split 3x3, split double 3x3 and pooled branches."""
        s = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(s), self.branch3x3_2b(s)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool_same(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


def _legacy_resize_matrix(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """[n_out, n_in] weights of TF's ResizeBilinear, align_corners=False (source = dest * n_in / n_out)."""
    src = torch.arange(n_out, dtype=torch.float64, device=device) * (n_in / n_out)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = (src - lo.double()).float()
    mat = torch.zeros(n_out, n_in, dtype=torch.float32, device=device)
    rows = torch.arange(n_out, device=device)
    mat.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    mat.index_put_((rows, hi), frac, accumulate=True)
    return mat


def tf_resize_bilinear(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """Resize NCHW float images to size x size the way the 2015 graph's ResizeBilinear op does."""
    rh = _legacy_resize_matrix(x.shape[2], size, x.device)
    rw = _legacy_resize_matrix(x.shape[3], size, x.device)
    return torch.einsum("oh,nchw,pw->ncop", rh, x, rw)


class InceptionV3FID(nn.Module):
    """The FID Inception-v3: [0, 255] floats in; (pool_3 [N,2048], spatial [N,2023], logits [N,1008]) out.

    spatial is TF's `mixed_6/conv` (Mixed_6d.branch1x1 after BN+ReLU), first 7 channels, flattened in HWC
    order; logits are pool_3 @ fc.weight^T without bias, as ADM's softmax graph multiplies only by the
    MatMul weight.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images: float NCHW with values in [0, 255], any size. Returns (pool, spatial, logits)."""
        x = tf_resize_bilinear(images.float())
        x = (x - 128.0) / 128.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))))
        spatial = self.Mixed_6d.branch1x1(x)[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(self.Mixed_6d(x)))))
        pool = x.mean(dim=(2, 3))
        return pool, spatial, pool @ self.fc.weight.t()


def resolve_inception_path(path: str | os.PathLike | None = None) -> Path:
    """The weights file: `path`, else $GD_INCEPTION_WEIGHTS, else ~/.cache/guided_diffusion/<WEIGHTS_NAME>."""
    if path:
        return Path(path).expanduser()
    if os.environ.get(WEIGHTS_ENV):
        return Path(os.environ[WEIGHTS_ENV]).expanduser()
    return Path.home() / ".cache" / "guided_diffusion" / WEIGHTS_NAME


def sha256_of(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_weights_hash(path: Path) -> None:
    """torch.hub's rule for a downloaded weights file: its SHA-256 starts with the prefix in its name."""
    digest = sha256_of(path)
    if not digest.startswith(WEIGHTS_SHA256_PREFIX):
        raise ValueError(f"SHA-256 {digest[:8]}... where {WEIGHTS_NAME} has {WEIGHTS_SHA256_PREFIX}...")


def load_inception(
    path: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> InceptionV3FID:
    """Build the FID Inception-v3 and load its weights strictly from a local file (never a different net)."""
    file = resolve_inception_path(path)
    if not file.is_file() and not path and not os.environ.get(WEIGHTS_ENV):
        file = fetch_verified(os.environ.get(WEIGHTS_URL_ENV, WEIGHTS_URL), file, check_weights_hash,
                              "--inception_path")
    if not file.is_file():
        raise FileNotFoundError(
            f"Inception weights not found: {file} (expected {WEIGHTS_NAME}, "
            f"SHA-256 {WEIGHTS_SHA256_PREFIX}..., from the pytorch-fid GitHub releases: {WEIGHTS_URL}); "
            f"pass --inception_path or set {WEIGHTS_ENV}"
        )
    digest = sha256_of(file)
    if not digest.startswith(WEIGHTS_SHA256_PREFIX):
        warnings.warn(
            f"{file} is not the published FID weights file (SHA-256 {digest[:8]}..., expected "
            f"{WEIGHTS_SHA256_PREFIX}...); scores are not comparable with published numbers",
            stacklevel=2,
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
        net = InceptionV3FID()
        missing, unexpected = net.load_state_dict(state, strict=False)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot load Inception weights {file}: {first_line}") from exc
    if missing or unexpected:
        raise ValueError(
            f"{file} does not have the FID Inception layout: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return net.to(device).eval()
