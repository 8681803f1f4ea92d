"""Pack downsampled ImageNet 32x32 into `ImageNet32_train_all.npz` (arr_0: uint8 [1281167, 32, 32, 3]).

    python evaluations/imagenet32_npz.py [--data_dir ./ImageNet64] [--output ImageNet32_train_all.npz]

DIR (default ./ImageNet64, the folder the authors' script reads) holds `train_data_batch_1` ..
`train_data_batch_10` (the pickled release) or the same names with `.npz`.
Each batch's `data` rows are 3072 bytes: the red plane, then green, then blue, each 32x32 row-major.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from evaluations.cifar_npz import rows_to_nhwc  # noqa: E402
from evaluations.npz_io import InputError, load_array_pickle, write_images_npz_cli  # noqa: E402

NUM_BATCHES = 10


def _batch_rows(root: Path, index: int) -> np.ndarray:
    base = root / f"train_data_batch_{index}"
    if base.is_file():
        batch = load_array_pickle(base)
    elif base.with_suffix(".npz").is_file():
        with np.load(base.with_suffix(".npz"), allow_pickle=False) as data:
            batch = {k: data[k] for k in data.files}
    else:
        raise InputError(f"{base}: missing batch file (pickle or .npz)")
    if "data" not in batch:
        raise InputError(f"{base}: no 'data' entry")
    return batch["data"]


def load_imagenet32(data_dir: str | Path) -> np.ndarray:
    """All training images, batches 1..10 in numeric order, as uint8 NHWC."""
    root = Path(data_dir)
    return np.concatenate([rows_to_nhwc(_batch_rows(root, i)) for i in range(1, NUM_BATCHES + 1)])


def main(argv: list[str] | None = None) -> int:
    """CLI: write the npz; exit code 2 with a one-line message on bad input."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default="./ImageNet64", help="default: the authors' folder")
    p.add_argument("--output", default="ImageNet32_train_all.npz")
    args = p.parse_args(argv)
    return write_images_npz_cli(args.output, lambda: load_imagenet32(args.data_dir), args.data_dir)


if __name__ == "__main__":
    sys.exit(main())
