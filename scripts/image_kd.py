"""DKDM: distill a pretrained teacher into a student of any architecture, data-free.

    mpiexec -n 1 python scripts/image_kd.py --config yaml/cifar10_32/exp/CIFAR10-57M-Dynamic-0.4.yaml \
        [--resume_checkpoint RUN_DIR_OR_PT [--resume_step N]] [--exp_dir DIR] [--wandb [PROJECT]]

The teacher loads strictly from `teacher.model_path`; the student is built from the `student` section and
optionally initialized (strictly) from `student.model_path`. The dynamic batch is prepared first when
`teacher.tempfile` does not exist. Runs go to experiments/kd/<config stem>-<time> unless --exp_dir.
`--resume_step N` is the authors' resume counter (it numbered their resumed run dirs); a resume here
continues in the resumed run's own dir, so the counter is only logged.
"""

from __future__ import annotations

from guided_diffusion import dist_util, logger
from guided_diffusion.config import TRAINING_FLAGS, build_arg_parser, parse_config_args
from guided_diffusion.distill.loop import (
    KDSetupError,
    check_diffusions,
    check_sections,
    check_tempfile,
    kd_loop_for,
    load_teacher,
    make_dynamic_batch,
)
from guided_diffusion.distill.progressive import (
    add_step_distill_arguments,
    apply_stage_overrides,
    build_relational_term,
    run_step_distill,
)
from guided_diffusion.run_setup import (
    add_run_arguments,
    build_model_and_diffusion,
    load_model_weights,
    start_run,
)
from guided_diffusion.train_util import loop_kwargs

FLAGS = {**TRAINING_FLAGS, "cache_save_interval": int}


def main(argv: list[str] | None = None) -> None:
    """Parse flags, build teacher, student and dynamic batch, and run the KD loop."""
    parser = build_arg_parser("Data-free knowledge distillation of a diffusion model (DKDM).", FLAGS)
    add_run_arguments(parser)
    add_step_distill_arguments(parser)
    parser.add_argument("--resume_step", type=int, default=0, help="the authors' resume counter (logged)")
    args, cfg = parse_config_args(parser, argv)
    if args.resume_step < 0:
        parser.exit(2, f"{parser.prog}: error: --resume_step must be >= 0, got {args.resume_step}\n")
    if "step_distill" in cfg:  # step (progressive) distillation / RDD: docs/RDD.md
        apply_stage_overrides(cfg, args.teacher_path, args.teacher_steps)
        run_step_distill(cfg, args)
        dist_util.cleanup()
        return
    if "teacher" not in cfg:
        parser.exit(2, f"{parser.prog}: error: {args.config} is not a KD config (no teacher: section)\n")
    teacher_s, student_s = cfg.teacher, cfg.student
    try:
        check_sections(teacher_s, student_s)
        tempfile = check_tempfile(teacher_s)
    except KDSetupError as exc:
        parser.exit(2, f"{parser.prog}: error: {args.config}: {exc}\n")
    run_dir = start_run("kd", cfg, args)
    if args.resume_step:
        logger.log(f"resume {args.resume_step} of this config (--resume_step)")
    device = dist_util.dev()
    teacher, teacher_diffusion = load_teacher(teacher_s, device)
    student, student_diffusion = build_model_and_diffusion(student_s, device)
    check_diffusions(teacher_diffusion, student_diffusion)
    if student_s.model_path and not student_s.resume_checkpoint:
        logger.log(f"initializing the student from {student_s.model_path}")
        load_model_weights(student, student_s.model_path, student_s)
    relational = build_relational_term(cfg, student, teacher, args.classifier_path or "", device)
    pool = make_dynamic_batch(teacher_s, student_s, teacher, teacher_diffusion, student_diffusion, device)
    loop_class, method_kwargs = kd_loop_for(cfg)
    loop_class(
        teacher=teacher, teacher_diffusion=teacher_diffusion, dynamic_batch=pool, tempfile=tempfile,
        **({"extra_losses": {"relational": relational}} if relational is not None else {}),
        input_perturb=teacher_s.input_perturb, student_clip_denoised=teacher_s.student_clip_denoised,
        cache_save_interval=student_s.cache_save_interval,
        model=student, diffusion=student_diffusion, batch_size=pool.batch_size,
        **loop_kwargs(student_s, student_diffusion, run_dir), **method_kwargs,
    ).run_loop()
    logger.log(f"distillation done; checkpoints in {run_dir}")
    dist_util.cleanup()


if __name__ == "__main__":
    main()
