"""Sample images from a trained model into `samples_<N>x<H>x<W>x3.npz` (the ADM evaluator's layout).

    mpiexec -n 4 python scripts/image_sample.py --config yaml/cifar10_32/teacher.yaml \
        --model_path model/32x32_diffusion_cifar10.pt --batch_size 2500 --num_samples 50000 \
        --timestep_respacing 1000 --use_ddim False [--clip_denoised True] [--output_dir DIR] [--seed 0]

For a KD config the student section is used. Without --output_dir the run goes under experiments/sample/.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout runs without pip install

import os

import guided_diffusion.distill  # noqa: F401 (registers the methods' YAML sections)
from guided_diffusion import dist_util, logger
from guided_diffusion.config import build_arg_parser, parse_config_args, primary_section
from guided_diffusion.infra.compile_util import FastPath
from guided_diffusion.infra.mixed_precision import resolve_precision
from guided_diffusion.run_setup import (
    add_run_arguments,
    build_model_and_diffusion,
    load_model_weights,
    run_script,
    start_run,
)
from guided_diffusion.sampling import sample_images_and_labels, save_grid, save_samples

FLAGS = {
    "model_path": str,
    "batch_size": int,
    "num_samples": int,
    "timestep_respacing": str,
    "use_ddim": bool,
    "clip_denoised": bool,
    "seed": int,
    "precision": str,
}


def main(argv: list[str] | None = None) -> None:
    """Parse flags, load the model strictly, sample over all ranks, write the npz and a grid on rank 0."""
    parser = build_arg_parser("Sample images from a diffusion model.", FLAGS)
    parser.add_argument("--output_dir", default=None, help="where the npz goes (default: the run dir)")
    add_run_arguments(parser)
    args, cfg = parse_config_args(parser, argv)
    section = primary_section(cfg)
    if not section.model_path:
        parser.exit(2, f"{parser.prog}: error: --model_path is required (or model_path in the config)\n")
    if args.output_dir and not args.exp_dir:
        args.exp_dir = args.output_dir
    run_dir = start_run("sample", cfg, args, split_batch=False)
    out_dir = args.output_dir or run_dir
    model, diffusion = build_model_and_diffusion(section, dist_util.dev())
    load_model_weights(model, section.model_path, section)
    model.eval()
    result = sample_images_and_labels(
        model, diffusion, num_samples=section.num_samples, batch_size=section.batch_size,
        image_size=section.image_size, use_ddim=section.use_ddim, clip_denoised=section.clip_denoised,
        clip_first=section.clip_first, clip_last=section.clip_last, class_cond=section.class_cond,
        num_classes=section.get("num_classes", 1000) if section.class_cond else None,
        precision=resolve_precision(section.precision, section.use_fp16), seed=section.seed,
        fast=FastPath.from_section(section),
    )
    if result is not None:
        arr, labels = result
        path = save_samples(arr, out_dir, labels)
        save_grid(arr, os.path.join(out_dir, "samples_grid.png"))
        logger.log(f"saved {len(arr)} samples to {path}")
        print(path, flush=True)


if __name__ == "__main__":
    run_script(main)
