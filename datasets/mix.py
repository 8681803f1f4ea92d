"""Mix real and synthetic images for data-limited / data-based training.

    python datasets/mix.py --dataset REAL.npz --synthetic SYN.npz --ratio R --output_dir DIR [--seed 0]
                           [--format npz|png]

The mixed set has as many images as the real set: exactly round(R * len(real)) real images and the rest
synthetic, both drawn without replacement with a seeded generator. npz output is `DIR/mixed.npz` (`arr_0`,
uint8 NHWC); png output is `DIR/<source>_<index>.png`, a folder image_train reads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from evaluations.npz_io import InputError, atomic_write, read_image_npz, save_npz_atomic  # noqa: E402


def mix_indices(
    num_real: int, num_synthetic: int, ratio: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (real, synthetic) of a mix of num_real images with round(ratio * num_real) real ones."""
    if not 0.0 <= ratio <= 1.0:
        raise InputError(f"--ratio must lie in [0, 1], got {ratio}")
    n_real = int(round(ratio * num_real))
    n_syn = num_real - n_real
    if n_syn > num_synthetic:
        raise InputError(
            f"need {n_syn} synthetic images for ratio {ratio}, the synthetic set has {num_synthetic}"
        )
    rng = np.random.default_rng(seed)
    real_idx = np.sort(rng.choice(num_real, size=n_real, replace=False))
    syn_idx = np.sort(rng.choice(num_synthetic, size=n_syn, replace=False))
    return real_idx, syn_idx


def mix_arrays(real: np.ndarray, synthetic: np.ndarray, ratio: float, seed: int = 0) -> np.ndarray:
    """The mixed uint8 NHWC array (real picks first, then synthetic, then a seeded shuffle)."""
    if real.shape[1:] != synthetic.shape[1:]:
        raise InputError(
            f"real images {real.shape[1:]} and synthetic images {synthetic.shape[1:]} differ in size"
        )
    real_idx, syn_idx = mix_indices(len(real), len(synthetic), ratio, seed)
    mixed = np.concatenate([real[real_idx], synthetic[syn_idx]])
    order = np.random.default_rng(seed + 1).permutation(len(mixed))
    return mixed[order]


def write_pngs(images: np.ndarray, output_dir: Path, prefix: str = "mixed") -> None:
    """Write each image atomically as DIR/<prefix>_<index>.png."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        atomic_write(output_dir / f"{prefix}_{i}.png", lambda f, img=img: Image.fromarray(img).save(f, "PNG"))


def main(argv: list[str] | None = None) -> int:
    """CLI: write the mixed set; exit code 2 with a one-line message on bad input."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True, help="real images npz (arr_0 uint8 NHWC)")
    p.add_argument("--synthetic", required=True, help="synthetic images npz (arr_0 uint8 NHWC)")
    p.add_argument("--ratio", type=float, required=True, help="fraction of real images, e.g. 0.05 .. 1.0")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("npz", "png"), default="npz")
    args = p.parse_args(argv)
    try:
        real = read_image_npz(args.dataset)
        synthetic = read_image_npz(args.synthetic)
        mixed = mix_arrays(real, synthetic, args.ratio, args.seed)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.output_dir)
    if args.format == "npz":
        save_npz_atomic(out / "mixed.npz", mixed)
    else:
        write_pngs(mixed, out)
    print(f"{len(mixed)} images ({int(round(args.ratio * len(real)))} real) written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
