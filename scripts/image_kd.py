"""DKDM: distill a pretrained teacher into a student of any architecture, data-free.

    mpiexec -n 1 python scripts/image_kd.py --config yaml/cifar10_32/exp/CIFAR10-57M-Dynamic-0.4.yaml \
        [--resume_checkpoint RUN_DIR_OR_PT [--resume_step N]] [--exp_dir DIR] [--wandb [PROJECT]]

The teacher loads strictly from `teacher.model_path`; the student is built from the `student` section and
optionally initialized (strictly) from `student.model_path`. Method sections (`tccd:`, `relational:`) add
their objectives (guided_diffusion/distill/). The dynamic batch is prepared first when `teacher.tempfile`
does not exist. Runs go to experiments/kd/<config stem>-<time> unless --exp_dir. `--resume_step N` is the
authors' resume counter (it numbered their resumed run dirs); a resume here continues in the resumed run's
own dir, so the counter is only logged. Progressive distillation (`step_distill:`) is scripts/step_distill.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout runs without pip install

from guided_diffusion import logger
from guided_diffusion.config import TRAINING_FLAGS, build_arg_parser, parse_config_args
from guided_diffusion.distill.dkdm.setup import KDSetupError
from guided_diffusion.distill.run import build_run, check_kd_config
from guided_diffusion.run_setup import add_run_arguments, run_script, start_run

FLAGS = {**TRAINING_FLAGS, "cache_save_interval": int}


def main(argv: list[str] | None = None) -> None:
    """Parse flags, check the config, build the run (teacher, student, pool, objectives) and train."""
    parser = build_arg_parser("Data-free knowledge distillation of a diffusion model (DKDM).", FLAGS)
    add_run_arguments(parser)
    parser.add_argument("--classifier_path", default=None, help="classifier for relational.feature_source")
    parser.add_argument("--resume_step", type=int, default=0, help="the authors' resume counter (logged)")
    args, cfg = parse_config_args(parser, argv)
    if args.resume_step < 0:
        parser.exit(2, f"{parser.prog}: error: --resume_step must be >= 0, got {args.resume_step}\n")
    try:
        check_kd_config(cfg)
    except KDSetupError as exc:
        parser.exit(2, f"{parser.prog}: error: {args.config}: {exc}\n")
    run_dir = start_run("kd", cfg, args)
    if args.resume_step:
        logger.log(f"resume {args.resume_step} of this config (--resume_step)")
    build_run(cfg, run_dir, classifier_path=args.classifier_path or "").run_loop()
    logger.log(f"distillation done; checkpoints in {run_dir}")


if __name__ == "__main__":
    run_script(main)
