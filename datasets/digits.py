"""Handwritten digits from scikit-learn (8x8), upscaled to RGB, as a download-free image data set.

`load_digits(split, image_size)` gives uint8 NHWC images and labels; `write_digits(output_dir, image_size)`
writes the `digits<size>_train.npz` / `digits<size>_ref.npz` files (`arr_0` images, `arr_1` labels) the
package reads. The demo and the digits benchmark use 16x16 (the data has 8x8 pixels).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout runs without pip install

from guided_diffusion.infra.atomic_io import atomic_write

IMAGE_SIZE = 16
REF_FRACTION = 0.2
SPLIT_SEED = 0
SPLITS = ("train", "ref")


def _upscale(images8: np.ndarray, image_size: int) -> np.ndarray:
    """Turn [N, 8, 8] values 0..16 into [N, S, S, 3] grey uint8 by bilinear upscaling."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(images8.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return x[:, 0, :, :, None].expand(-1, -1, -1, 3).contiguous().numpy()


def _split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Deterministic stratified ~80/20 split of sample indices (seed 0)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train_idx, ref_idx = train_test_split(
        idx, test_size=REF_FRACTION, stratify=labels, random_state=SPLIT_SEED, shuffle=True
    )
    return {"train": np.sort(train_idx), "ref": np.sort(ref_idx)}


def load_digits(split: str, image_size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 [N, S, S, 3], labels int64 [N]) of the "train" or "ref" split."""
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}; expected one of {SPLITS}")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    labels = np.asarray(bunch.target, dtype=np.int64)
    idx = _split_indices(labels)[split]
    return _upscale(np.asarray(bunch.images)[idx], image_size), labels[idx]


def _npz_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, images, labels)
    return buf.getvalue()


def _png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_digits(
    output_dir: str | os.PathLike, image_size: int = IMAGE_SIZE, folder: bool = False
) -> dict[str, str]:
    """Write both splits as npz (and, with `folder`, the train split as `<label>_<index>.png` files).

    Returns a dict with keys "train", "ref" (npz paths) and, with `folder`, "train_folder".
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {}
    for split in SPLITS:
        images, labels = load_digits(split, image_size)
        path = out / f"digits{image_size}_{split}.npz"
        data = _npz_bytes(images, labels)
        atomic_write(path, lambda f, data=data: f.write(data))
        paths[split] = str(path)
        if folder and split == "train":
            img_dir = out / f"digits{image_size}_train"
            img_dir.mkdir(exist_ok=True)
            for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
                atomic_write(img_dir / f"{lab}_{i:05d}.png", lambda f, img=img: f.write(_png_bytes(img)))
            paths["train_folder"] = str(img_dir)
    return paths


def main() -> None:
    """CLI: write the digits npz files (and optionally an image folder) under --output_dir."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="experiments/data/digits")
    parser.add_argument("--image_size", type=int, default=IMAGE_SIZE, help="side in pixels (8x8 upscaled)")
    parser.add_argument("--folder", action="store_true", help="also write the train split as PNG files")
    args = parser.parse_args()
    if args.image_size < 8:
        parser.error(f"--image_size must be at least 8 (the data is 8x8), got {args.image_size}")
    for name, path in write_digits(args.output_dir, args.image_size, folder=args.folder).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
