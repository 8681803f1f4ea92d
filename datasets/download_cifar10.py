"""Download CIFAR-10 with torchvision and dump it as PNGs whose names carry the class.

    python datasets/download_cifar10.py --output_dir DIR

Writes DIR/train/<class>_<index>.png and DIR/test/<class>_<index>.png (e.g. `truck_49997.png`), so the
image loader derives the label from the file name; the torchvision download stays in DIR/cifar-10-batches-py.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from evaluations.npz_io import atomic_write  # noqa: E402


def dump_pngs(dataset: Sequence[tuple[Any, int]], classes: Sequence[str], out_dir: str | Path) -> int:
    """Save every (PIL image, label) item as out_dir/<class>_<index>.png; returns the number written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    for index in range(len(dataset)):
        image, label = dataset[index]
        if not isinstance(image, Image.Image):
            image = Image.fromarray(image)
        atomic_write(
            out / f"{classes[label]}_{index}.png", lambda f, im=image: im.convert("RGB").save(f, "PNG")
        )
        count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    """CLI: download both splits and dump them."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output_dir", required=True)
    args = p.parse_args(argv)
    import torchvision

    root = Path(args.output_dir)
    for split, train in (("train", True), ("test", False)):
        data = torchvision.datasets.CIFAR10(root=str(root), train=train, download=True)
        written = dump_pngs(data, data.classes, root / split)
        print(f"{written} {split} images written to {root / split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
