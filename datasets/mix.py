"""Mix real and synthetic images for data-limited / data-based training, picking as the authors' script.

    python datasets/mix.py --dataset REAL.npz --synthetic SYN.npz --ratio R --output_dir DIR [--seed 0]
                           [--format png|npz]

The mixed set has as many images as the real set: exactly round(R * len(real)) real images and the rest
synthetic, each drawn without replacement by numpy's legacy generator seeded with --seed (the authors'
np.random.seed(0) then np.random.choice, real first), real picks then synthetic picks in draw order, so the
same seed picks the same images as their script. png output (default, theirs) is DIR/000000.png, ...;
npz output is DIR/mixed.npz (`arr_0`, uint8 NHWC).
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
    """Indices (real, synthetic), in draw order, of a mix of num_real images with round(ratio * num_real)
    real ones: the authors' draws (one legacy RandomState, real indices first)."""
    if not 0.0 <= ratio <= 1.0:
        raise InputError(f"--ratio must lie in [0, 1], got {ratio}")
    n_real = int(round(ratio * num_real))
    n_syn = num_real - n_real
    if n_syn > num_synthetic:
        raise InputError(
            f"need {n_syn} synthetic images for ratio {ratio}, the synthetic set has {num_synthetic}"
        )
    rng = np.random.RandomState(seed)
    real_idx = rng.choice(list(range(num_real)), n_real, replace=False)
    syn_idx = rng.choice(list(range(num_synthetic)), n_syn, replace=False)
    return real_idx, syn_idx


def mix_arrays(real: np.ndarray, synthetic: np.ndarray, ratio: float, seed: int = 0) -> np.ndarray:
    """The mixed uint8 NHWC array: the real picks, then the synthetic picks, in draw order."""
    if real.shape[1:] != synthetic.shape[1:]:
        raise InputError(
            f"real images {real.shape[1:]} and synthetic images {synthetic.shape[1:]} differ in size"
        )
    real_idx, syn_idx = mix_indices(len(real), len(synthetic), ratio, seed)
    return np.concatenate([real[real_idx], synthetic[syn_idx]])


def write_pngs(images: np.ndarray, output_dir: Path) -> None:
    """Write each image atomically as DIR/000000.png, DIR/000001.png, ... (the authors' names)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        atomic_write(output_dir / f"{i:06d}.png", lambda f, img=img: Image.fromarray(img).save(f, "PNG"))


def main(argv: list[str] | None = None) -> int:
    """CLI: write the mixed set; exit code 2 with a one-line message on bad input."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True, help="real images npz (arr_0 uint8 NHWC)")
    p.add_argument("--synthetic", required=True, help="synthetic images npz (arr_0 uint8 NHWC)")
    p.add_argument("--ratio", type=float, required=True, help="fraction of real images, e.g. 0.05 .. 1.0")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("png", "npz"), default="png")
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
