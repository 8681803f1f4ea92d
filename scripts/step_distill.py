"""Progressive (step) distillation, optionally with RDD's relational terms: one halving stage per run.

    mpiexec -n 1 python scripts/step_distill.py --config yaml/digits_16/exp/rdd/Digits-RDD-8to4.yaml \
        [--teacher_path PT --teacher_steps N] [--classifier_path PT] [--exp_dir DIR]

The student (timestep_respacing ddim(N/2)) learns in one DDIM step what the teacher (ddimN) does in two, on
the data of `student.data_dir`. `--teacher_path`/`--teacher_steps` point a config at the next stage of a
halving chain. Runs go to experiments/step_distill/<config stem>-<time> unless --exp_dir. docs/RDD.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout runs without pip install

from guided_diffusion import logger
from guided_diffusion.config import TRAINING_FLAGS, build_arg_parser, parse_config_args
from guided_diffusion.distill.dkdm.setup import KDSetupError
from guided_diffusion.distill.progressive import add_step_distill_arguments, apply_stage_overrides
from guided_diffusion.distill.run import build_step_distill_run
from guided_diffusion.run_setup import add_run_arguments, run_script, start_run


def main(argv: list[str] | None = None) -> None:
    """Parse flags, apply the stage overrides, build the stage's run and train."""
    parser = build_arg_parser("Progressive (step) distillation with relational terms (RDD).", TRAINING_FLAGS)
    add_run_arguments(parser)
    add_step_distill_arguments(parser)
    args, cfg = parse_config_args(parser, argv)
    if "step_distill" not in cfg:
        parser.exit(2, f"{parser.prog}: error: {args.config} has no step_distill: section\n")
    try:
        apply_stage_overrides(cfg, args.teacher_path, args.teacher_steps)
    except ValueError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    run_dir = start_run("step_distill", cfg, args)
    try:
        loop = build_step_distill_run(cfg, run_dir, classifier_path=args.classifier_path or "")
    except KDSetupError as exc:
        raise SystemExit(f"error: {args.config}: {exc}") from None
    loop.run_loop()
    logger.log(f"step distillation done; checkpoints in {run_dir}")


if __name__ == "__main__":
    run_script(main)
