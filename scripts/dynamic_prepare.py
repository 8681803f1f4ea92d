"""Prepare the DKDM dynamic batch: advance noise with the teacher to random end steps and write the cache.

    mpiexec -n 1 python scripts/dynamic_prepare.py --config yaml/cifar10_32/exp/CIFAR10-57M-Dynamic-0.4.yaml

Each rank prepares round(BATCH * T) * (student batch_size / ranks) items with an equal share of teacher steps;
rank 0 writes all of them to `teacher.tempfile` in the authors' cache layout.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout runs without pip install

import os

from guided_diffusion import dist_util, logger
from guided_diffusion.config import build_arg_parser, parse_config_args
from guided_diffusion.distill.dkdm.cache import CacheError, load_cache
from guided_diffusion.distill.dkdm.pool import DYNAMIC, pool_size
from guided_diffusion.distill.dkdm.setup import (
    KDSetupError,
    check_sections,
    check_tempfile,
    load_teacher,
    make_dynamic_batch,
    student_diffusion_of,
)
from guided_diffusion.infra.compile_util import FastPath, fast_frozen
from guided_diffusion.run_setup import add_run_arguments, run_script, start_run

FLAGS = {"batch_size": int, "seed": int}


def existing_cache_refusal(path: str, need: int) -> str | None:
    """Why an existing file at `path` must not be replaced by a pool of `need` items (None: replace it).

    A cache of another size belongs to another config (e.g. the 51,200-item pool of rho 0.4); an unreadable
    file may be a user's download in progress. Either way the user decides, not this script.
    """
    if not os.path.exists(path):
        return None
    try:
        have = load_cache(path)["total_t"].shape[0]
    except CacheError as exc:
        return f"{exc}; not replacing it: remove the file or set another teacher.tempfile"
    if have != need:
        return (f"{path} already holds a pool of {have} items and this config prepares {need}; not replacing "
                "it: remove the file or set another teacher.tempfile")
    logger.log(f"{path} holds a pool of the same size ({have} items); preparing it again")
    return None


def main(argv: list[str] | None = None) -> None:
    """Parse the KD config, load the teacher strictly, prepare this rank's share and write the cache."""
    parser = build_arg_parser("Prepare the DKDM dynamic batch (teacher-state cache).", FLAGS)
    add_run_arguments(parser)
    args, cfg = parse_config_args(parser, argv)
    if "teacher" not in cfg:
        parser.exit(2, f"{parser.prog}: error: {args.config} is not a KD config (no teacher: section)\n")
    try:
        check_sections(cfg.teacher, cfg.student)
        path = check_tempfile(cfg.teacher)
    except KDSetupError as exc:
        parser.exit(2, f"{parser.prog}: error: {args.config}: {exc}\n")
    if cfg.teacher.iter_choice != DYNAMIC:
        parser.exit(2, f"{parser.prog}: error: {args.config}: teacher.iter_choice is "
                    f"{cfg.teacher.iter_choice}; only {DYNAMIC} prepares a cache (the shuffled mode reads "
                    "the first batch of the dynamic cache, the iterative one starts from noise)\n")
    start_run("prepare", cfg, args)
    student_diffusion = student_diffusion_of(cfg.student)
    need = dist_util.get_world_size() * pool_size(
        DYNAMIC, cfg.teacher.BATCH, student_diffusion.num_timesteps,
        cfg.student.batch_size // dist_util.get_world_size(),
    )
    refusal = existing_cache_refusal(path, need)
    if refusal:
        raise SystemExit(f"{parser.prog}: error: {refusal}")
    device = dist_util.dev()
    teacher, teacher_diffusion = load_teacher(cfg.teacher, device)
    pool = make_dynamic_batch(
        cfg.teacher, cfg.student, teacher, teacher_diffusion, student_diffusion, device
    )
    pool.teacher = fast_frozen(teacher, FastPath.from_section(cfg.student), name="teacher UNet")
    logger.log(f"preparing {pool.size} items per rank x {pool.world_size} rank(s) -> {path}")
    pool.prepare_and_save(path)


if __name__ == "__main__":
    run_script(main)
