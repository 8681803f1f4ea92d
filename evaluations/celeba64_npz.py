"""Pack CelebA into `celeba64_train.npz` (arr_0: uint8 [202599, 64, 64, 3]) with DDPM-IP's preprocessing.

    python evaluations/celeba64_npz.py [--data_dir ./img_align_celeba] [--output celeba64_train.npz]
        [--center_crop 0]

DIR holds the aligned JPEGs (`img_align_celeba/*.jpg` or directly), read in directory-listing order as the
authors' script reads ./img_align_celeba (the default). DDPM-IP's published script resizes
the whole 178x218 aligned image to 64x64 with OpenCV's default INTER_LINEAR (no crop, no antialiasing);
that is the default here. `--center_crop 140` gives the other common protocol (centred 140x140 crop, then
the same resize).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from evaluations.npz_io import InputError, write_images_npz_cli  # noqa: E402

IMAGE_SIZE = 64


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV INTER_LINEAR sampling: half-pixel centres, source clamped to the image."""
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0.0, None)
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (src - lo).astype(np.float64)


def resize_linear(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize of a uint8 HWC image as cv2.resize(img, (width, height)) does (float, rounded)."""
    ylo, yhi, fy = _linear_taps(image.shape[0], height)
    xlo, xhi, fx = _linear_taps(image.shape[1], width)
    img = image.astype(np.float64)
    rows = img[ylo] * (1 - fy)[:, None, None] + img[yhi] * fy[:, None, None]
    out = rows[:, xlo] * (1 - fx)[None, :, None] + rows[:, xhi] * fx[None, :, None]
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The centred size x size window of an HWC image."""
    h, w = image.shape[:2]
    if size > min(h, w):
        raise InputError(f"center crop {size} is larger than the image {w}x{h}")
    top, left = (h - size) // 2, (w - size) // 2
    return image[top : top + size, left : left + size]


def list_images(data_dir: str | Path) -> list[Path]:
    """CelebA JPEG/PNG files under DIR/img_align_celeba or DIR, in os.listdir order (the authors')."""
    root = Path(data_dir)
    folder = root / "img_align_celeba" if (root / "img_align_celeba").is_dir() else root
    if not folder.is_dir():
        raise InputError(f"{root}: no such directory")
    files = [folder / n for n in os.listdir(folder) if Path(n).suffix.lower() in (".jpg", ".jpeg", ".png")]
    if not files:
        raise InputError(f"{folder}: no .jpg/.png images")
    return files


def preprocess(path: Path, crop: int = 0, size: int = IMAGE_SIZE) -> np.ndarray:
    """One image as uint8 size x size x 3: optional centre crop, then the linear resize."""
    image = np.asarray(Image.open(path).convert("RGB"))
    if crop:
        image = center_crop(image, crop)
    return resize_linear(image, size, size)


def main(argv: list[str] | None = None) -> int:
    """CLI: write the npz; exit code 2 with a one-line message on bad input."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default="./img_align_celeba", help="default: the authors' folder")
    p.add_argument("--output", default="celeba64_train.npz")
    p.add_argument("--center_crop", type=int, default=0, help="0 = DDPM-IP (no crop); 140 = common protocol")
    p.add_argument("--image_size", type=int, default=IMAGE_SIZE)
    args = p.parse_args(argv)

    def load() -> np.ndarray:
        return np.stack(
            [preprocess(f, args.center_crop, args.image_size) for f in list_images(args.data_dir)]
        )

    return write_images_npz_cli(args.output, load, args.data_dir)


if __name__ == "__main__":
    sys.exit(main())
