"""Pack CIFAR-10 into the reference batch `cifar10_train.npz` (arr_0: uint8 [50000, 32, 32, 3]).

    python evaluations/cifar_npz.py [--data_dir ./cifar] [--output cifar10_train.npz] [--split train|test]

With no arguments it does what the authors' script does: the PNGs in ./cifar (datasets/download_cifar10.py
writes cifar_train/; their README has it renamed), read in directory-listing order, into cifar10_train.npz.
DIR may also be torchvision's download folder (`cifar-10-batches-py/` with the python pickles, read in the
dataset's order) or a folder holding `<split>/` or `cifar_<split>/` of PNGs.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from evaluations.npz_io import InputError, load_array_pickle, write_images_npz_cli  # noqa: E402

BATCH_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
PNG_NAME = re.compile(r"^[A-Za-z0-9]+_(\d+)\.png$")


def rows_to_nhwc(rows: np.ndarray, size: int = 32) -> np.ndarray:
    """Rows of 3*size*size bytes (all R, then G, then B, row-major) to uint8 NHWC images."""
    rows = np.asarray(rows, dtype=np.uint8)
    if rows.ndim != 2 or rows.shape[1] != 3 * size * size:
        raise InputError(f"expected rows of {3 * size * size} bytes, got shape {rows.shape}")
    return rows.reshape(-1, 3, size, size).transpose(0, 2, 3, 1)


def _from_pickles(folder: Path, split: str) -> np.ndarray:
    parts = []
    for name in BATCH_FILES[split]:
        path = folder / name
        if not path.is_file():
            raise InputError(f"{path}: missing CIFAR-10 batch file")
        batch = load_array_pickle(path)
        if "data" not in batch:
            raise InputError(f"{path}: no 'data' entry")
        parts.append(rows_to_nhwc(batch["data"]))
    return np.concatenate(parts)


def _from_pngs(folder: Path) -> np.ndarray:
    """The folder's <class>_<index>.png images in os.listdir order, the order the authors' script reads."""
    files = [folder / name for name in os.listdir(folder) if PNG_NAME.match(name)]
    if not files:
        raise InputError(f"{folder}: no <class>_<index>.png files")
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files])


def load_cifar10(data_dir: str | Path, split: str = "train") -> np.ndarray:
    """CIFAR-10 images of a split as uint8 NHWC, from the python pickles or the PNG dump."""
    root = Path(data_dir)
    for folder in (root / "cifar-10-batches-py", root):
        if (folder / BATCH_FILES[split][0]).is_file():
            return _from_pickles(folder, split)
    for folder in (root / split, root / f"cifar_{split}", root):
        if folder.is_dir() and any(PNG_NAME.match(p.name) for p in folder.iterdir()):
            return _from_pngs(folder)
    raise InputError(f"{root}: neither cifar-10-batches-py pickles nor a {split}/ PNG dump found")


def main(argv: list[str] | None = None) -> int:
    """CLI: write the npz; exit code 2 with a one-line message on bad input."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default="./cifar", help="default: ./cifar, as the authors' script")
    p.add_argument("--output", default="cifar10_train.npz")
    p.add_argument("--split", choices=sorted(BATCH_FILES), default="train")
    args = p.parse_args(argv)
    return write_images_npz_cli(args.output, lambda: load_cifar10(args.data_dir, args.split), args.data_dir)


if __name__ == "__main__":
    sys.exit(main())
