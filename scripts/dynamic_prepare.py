"""Prepare the DKDM dynamic batch: advance noise with the teacher to random end steps and write the cache.

    mpiexec -n 1 python scripts/dynamic_prepare.py --config yaml/cifar10_32/exp/CIFAR10-57M-Dynamic-0.4.yaml

Each rank prepares round(BATCH * T) * (student batch_size / ranks) items with an equal share of teacher steps;
rank 0 writes all of them to `teacher.tempfile` in the authors' cache layout.
"""

from __future__ import annotations

from guided_diffusion import dist_util, logger
from guided_diffusion.compile_util import FastPath, fast_frozen
from guided_diffusion.config import build_arg_parser, model_and_diffusion_kwargs, parse_config_args
from guided_diffusion.dynamic_batch import ITERATIVE
from guided_diffusion.kd_util import check_sections, check_tempfile, load_teacher, make_dynamic_batch
from guided_diffusion.run_setup import add_run_arguments, start_run
from guided_diffusion.script_util import create_gaussian_diffusion

FLAGS = {"batch_size": int, "seed": int}


def student_diffusion_of(section) -> object:
    """The student's diffusion alone (its T sets the pool size); no student network is needed here."""
    kw = model_and_diffusion_kwargs(section)
    return create_gaussian_diffusion(
        steps=kw["diffusion_steps"], learn_sigma=kw["learn_sigma"], noise_schedule=kw["noise_schedule"],
        use_kl=kw["use_kl"], predict_xstart=kw["predict_xstart"], rescale_timesteps=kw["rescale_timesteps"],
        rescale_learned_sigmas=kw["rescale_learned_sigmas"], timestep_respacing=kw["timestep_respacing"],
    )


def main(argv: list[str] | None = None) -> None:
    """Parse the KD config, load the teacher strictly, prepare this rank's share and write the cache."""
    parser = build_arg_parser("Prepare the DKDM dynamic batch (teacher-state cache).", FLAGS)
    add_run_arguments(parser)
    args, cfg = parse_config_args(parser, argv)
    if "teacher" not in cfg:
        parser.exit(2, f"{parser.prog}: error: {args.config} is not a KD config (no teacher: section)\n")
    check_sections(cfg.teacher, cfg.student)
    if cfg.teacher.iter_choice == ITERATIVE:
        parser.exit(2, f"{parser.prog}: error: iterative_distillation starts from noise; no cache needed\n")
    path = check_tempfile(cfg.teacher)
    start_run("prepare", cfg, args)
    device = dist_util.dev()
    teacher, teacher_diffusion = load_teacher(cfg.teacher, device)
    pool = make_dynamic_batch(
        cfg.teacher, cfg.student, teacher, teacher_diffusion, student_diffusion_of(cfg.student), device
    )
    pool.teacher = fast_frozen(teacher, FastPath.from_section(cfg.student), static_shapes=False,
                               name="teacher UNet")
    logger.log(f"preparing {pool.size} items per rank x {pool.world_size} rank(s) -> {path}")
    pool.prepare_and_save(path)
    dist_util.cleanup()


if __name__ == "__main__":
    main()
