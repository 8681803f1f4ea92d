"""Download CIFAR-10 with torchvision and dump it as PNGs whose names carry the class, as the authors' script.

    python datasets/download_cifar10.py [--output_dir .] [--download_root DIR]

Writes OUTPUT_DIR/cifar_train/<class>_<index:05d>.png and OUTPUT_DIR/cifar_test/... with the authors' class
names (plane, car, ...), so the image loader derives the label from the file name; a split whose folder
exists is skipped. The torchvision archive goes to a temporary folder unless --download_root keeps it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from evaluations.npz_io import atomic_write  # noqa: E402

CLASSES = ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")  # the authors'


def dump_pngs(
    dataset: Sequence[tuple[Any, int]], out_dir: str | Path, classes: Sequence[str] = CLASSES
) -> int:
    """Save every (PIL image, label) item as out_dir/<class>_<index:05d>.png; returns the number written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for index in range(len(dataset)):
        image, label = dataset[index]
        if not isinstance(image, Image.Image):
            image = Image.fromarray(image)
        atomic_write(
            out / f"{classes[label]}_{index:05d}.png", lambda f, im=image: im.convert("RGB").save(f, "PNG")
        )
    return len(dataset)


def main(argv: list[str] | None = None) -> int:
    """CLI: download both splits and dump each one whose folder does not exist yet."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output_dir", default=".", help="where cifar_train/ and cifar_test/ go (default: .)")
    p.add_argument("--download_root", default="", help="keep the torchvision archive here")
    args = p.parse_args(argv)
    import torchvision

    for split in ("train", "test"):
        out = Path(args.output_dir) / f"cifar_{split}"
        if out.exists():
            print(f"skipping split {split}: {out} already exists")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            data = torchvision.datasets.CIFAR10(
                root=args.download_root or tmp, train=split == "train", download=True
            )
            written = dump_pngs(data, out)
        print(f"{written} {split} images written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
