"""FID statistics of a training set, as RDD's `score/get_npz.py` makes them for `ddim_eval.py --fid_cache`:

    python evaluations/fid_stats.py --dataset cifar10          # theirs: python get_npz.py --dataset cifar10

CIFAR-10's 50,000 training images from torchvision's folder (`--data_root`, their /data/dataset, else
./data where datasets/download_cifar10.py's torchvision archive goes), or any uint8 NHWC `--npz`, through
the FID Inception (`--features`, `--inception_path`; fetched on first use), written as pytorch-fid's
`mu`/`sigma` file to ./stats/<dataset>.train.npz, which evaluations/evaluator.py also takes as a reference.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluations import metrics  # noqa: E402
from evaluations.cifar_npz import BATCH_FILES, load_cifar10  # noqa: E402
from evaluations.npz_io import InputError, read_image_npz, save_npz_atomic  # noqa: E402

AUTHORS_ROOT = "/data/dataset"  # where their get_npz.py reads CIFAR-10 (download=False)
LOCAL_ROOT = "./data"  # torchvision's usual root, the fallback


def cifar_root(given: str | None) -> Path:
    """The torchvision CIFAR-10 root: `given`, else the authors' /data/dataset, else ./data; InputError when
    the one chosen holds no cifar-10-batches-py."""
    candidates = [given] if given else [AUTHORS_ROOT, LOCAL_ROOT]
    for root in candidates:
        if (Path(root) / "cifar-10-batches-py" / BATCH_FILES["train"][0]).is_file():
            return Path(root)
    raise InputError(f"no cifar-10-batches-py under {' or '.join(candidates)}; pass --data_root "
                     "(torchvision's CIFAR-10 folder) or --npz")


def main(argv: list[str] | None = None) -> int:
    """CLI: exit 2 with a one-line message on bad input."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="cifar10", choices=("cifar10",))
    p.add_argument("--gpu_id", default="", help="CUDA_VISIBLE_DEVICES (unless already set)")
    p.add_argument("--batchsize", type=int, default=128)
    p.add_argument("--local_rank", type=int, default=-1, help="accepted, as theirs; one process computes")
    p.add_argument("--data_root", default=None, help=f"torchvision root (default {AUTHORS_ROOT}, ./data)")
    p.add_argument("--npz", default=None, help="images npz (arr_0 uint8 NHWC) instead of CIFAR-10")
    p.add_argument("--features", default="inception", help="feature network (evaluator.py's --features)")
    p.add_argument("--inception_path", default=None)
    p.add_argument("--output", default=None, help="default ./stats/<dataset>.train.npz")
    p.add_argument("--dry_run", action="store_true", help="find the images, then exit")
    args = p.parse_args(argv)
    output = args.output or os.path.join("stats", f"{args.dataset}.train.npz")
    try:
        source = args.npz if args.npz else str(cifar_root(args.data_root))
        if args.npz and not os.path.isfile(args.npz):
            raise InputError(f"{args.npz}: no such file")
        if args.dry_run:
            print(f"dry run: images from {source}, statistics to {output}; nothing computed")
            return 0
        if args.gpu_id:
            os.environ.setdefault("CUDA_VISIBLE_DEVICES", args.gpu_id)
        images = read_image_npz(args.npz) if args.npz else load_cifar10(source, "train")
        from evaluations.feature_extractors import get_feature_extractor

        extractor = get_feature_extractor(args.features, None, args.inception_path, args.batchsize)
        mu, sigma = metrics.compute_statistics(extractor.features(images)["pool"])
    except (InputError, FileNotFoundError, ValueError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    save_npz_atomic(output, mu=mu, sigma=sigma)
    print(f"statistics of {len(images)} images ({mu.shape[0]} features) written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
