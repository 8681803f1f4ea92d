"""Train a diffusion model on images (a folder or an .npz): the data-free baselines' training script.

    mpiexec -n 1 python scripts/image_train.py --config yaml/cifar10_32/exp/CIFAR10-57M-Baseline.yaml \
        --data_dir path/to/synthetic_data [--resume_checkpoint RUN_DIR_OR_PT] [--exp_dir DIR] [--wandb]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout runs without pip install

import guided_diffusion.distill  # noqa: F401 (registers the methods' YAML sections)
from guided_diffusion import dist_util, logger
from guided_diffusion.config import TRAINING_FLAGS, build_arg_parser, parse_config_args, primary_section
from guided_diffusion.image_datasets import load_data
from guided_diffusion.run_setup import (
    add_run_arguments,
    build_model_and_diffusion,
    load_model_weights,
    run_script,
    start_run,
)
from guided_diffusion.train_util import TrainLoop, loop_kwargs

FLAGS = TRAINING_FLAGS


def main(argv: list[str] | None = None) -> None:
    """Parse flags, start the run, build model/diffusion/data and run the training loop."""
    parser = build_arg_parser("Train a diffusion model on images.", FLAGS)
    add_run_arguments(parser)
    args, cfg = parse_config_args(parser, argv)
    section = primary_section(cfg)
    run_dir = start_run("train", cfg, args)
    model, diffusion = build_model_and_diffusion(section, dist_util.dev())
    if section.model_path and not section.resume_checkpoint:
        logger.log(f"initializing from {section.model_path}")
        load_model_weights(model, section.model_path, section)
    per_rank_batch = section.batch_size // dist_util.get_world_size()
    data = load_data(
        data_dir=section.data_dir, batch_size=per_rank_batch, image_size=section.image_size,
        class_cond=section.class_cond, seed=section.seed,
    )
    TrainLoop(
        model=model, diffusion=diffusion, data=data, batch_size=per_rank_batch,
        **loop_kwargs(section, diffusion, run_dir),
    ).run_loop()
    logger.log(f"training done; checkpoints in {run_dir}")


if __name__ == "__main__":
    run_script(main)
