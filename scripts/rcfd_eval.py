"""ddim_eval.py: N-step DDIM samples of an RCFD/RDD model as an .npz for evaluations/evaluator.py.

    python scripts/rcfd_eval.py --config yaml/cifar10_32/rcfd/CIFAR10_EVAL.yaml --logdir logs/CIFAR10/1024 \
        --stride 128                                             # 8-step DDIM of the base model
    python scripts/rcfd_eval.py --config yaml/cifar10_32/rcfd/CIFAR10_EVAL.yaml --logdir logs/8to4/rdd
    python evaluations/evaluator.py REF_BATCH.npz logs/8to4/rdd/ddim_stride1/samples_50000x32x32x3.npz

The model is `<logdir>/ckpt.pt` (EMA for a base model, raw weights for a distilled one); it samples its
own grid (ckpt T steps at its time_scale) with `--stride`. Writes the npz and a grid beside it.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout runs without pip install

import argparse
import json
import os

import numpy as np

from evaluations.evaluator import evaluate
from evaluations.feature_extractors import get_feature_extractor
from evaluations.npz_io import atomic_write
from guided_diffusion import dist_util, logger
from guided_diffusion.ddpm_diffusion import DDPMSchedule
from guided_diffusion.distill.rcfd_run import dry_run, load_stage_model, parse_flags, sample_npz
from guided_diffusion.sampling import save_grid, save_samples


def main(argv: list[str] | None = None) -> None:
    """Parse flags, load the logdir's model, sample num_images and write them."""
    parser = argparse.ArgumentParser(description="Sample an RCFD/RDD model with DDIM for evaluation.")
    parser.add_argument("--output_dir", default=None, help="default <logdir>/ddim_stride<stride>")
    parser.add_argument("--inception_path", default=None, help="FID Inception weights for --fid_cache")
    args, flags = parse_flags(parser, argv, "yaml/cifar10_32/rcfd/CIFAR10_EVAL.yaml")
    if flags["fid_cache"] and not os.path.isfile(flags["fid_cache"]):
        parser.exit(2, f"{parser.prog}: error: --fid_cache {flags['fid_cache']} not found (pytorch-fid "
                    "mu/sigma of the training set; --fid_cache '' samples without scoring)\n")
    if args.dry_run:
        dry_run(flags, {"--logdir": flags["logdir"]})
    device = dist_util.dev()
    model, meta = load_stage_model(flags["logdir"], flags, device)
    steps, scale = meta["T"], meta["time_scale"]
    if not 1 <= flags["stride"] <= steps:
        parser.exit(2, f"{parser.prog}: error: --stride {flags['stride']} must lie in 1..{steps}\n")
    out_dir = args.output_dir or os.path.join(flags["logdir"], f"ddim_stride{flags['stride']}")
    os.makedirs(out_dir, exist_ok=True)
    logger.configure(out_dir, format_strs=["stdout", "log"])
    count = steps // flags["stride"]  # from the largest multiple of the stride, as the authors' sampler
    logger.log(f"{flags['logdir']}: {meta['which']}, {steps} steps x {scale}, stride {flags['stride']} "
               f"-> {count} DDIM steps from step {count * flags['stride']}, {flags['num_images']} images")
    images = sample_npz(
        model, DDPMSchedule(steps * scale), steps, scale, flags["stride"], flags["num_images"],
        flags["batch_size"], flags["img_size"], flags["seed"], flags["class_num"], flags["conditional"],
        device,
    )
    path = save_samples(images, out_dir)
    save_grid(images[:64], os.path.join(out_dir, f"samples_seed{flags['seed']}.png"))
    logger.log(f"wrote {path} ({images.shape}, mean {np.mean(images):.1f})")
    if flags["fid_cache"]:
        score_against_cache(images, path, flags["fid_cache"], args.inception_path, out_dir)


def score_against_cache(images: np.ndarray, path: str, cache: str, weights: str | None, out_dir: str) -> None:
    """FID (and IS) of the samples against the training set's pytorch-fid statistics, as the authors'
    ddim_eval.py scores in-script; written to out_dir/metrics.json."""
    extractor = get_feature_extractor("inception", None, weights)
    result = evaluate(cache, None, path, images, extractor, inception_like=True)
    logger.log(f"FID {result['fid']:.3f} against {cache}; Inception Score {result['inception_score']:.3f}")
    atomic_write(os.path.join(out_dir, "metrics.json"),
                 lambda f: f.write((json.dumps({"fid_cache": cache, **result}, indent=2) + "\n").encode()))


if __name__ == "__main__":
    main()
