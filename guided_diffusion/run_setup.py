"""Start-up shared by every script: process group, seeding, run dir, logger, resolved config, model."""

from __future__ import annotations

import argparse
import datetime
import os
import random
import sys
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import numpy as np
import torch
from omegaconf import DictConfig

from . import dist_util, logger
from .config import SOURCE_KEY, model_and_diffusion_kwargs, primary_section, save_config, validate_world_size
from .infra.checkpoint import CheckpointError, load_state_dict_strict, safe_torch_load, unwrap_state_dict
from .infra.run_lock import claim_run_dir
from .script_util import create_any_model_and_diffusion

EXPERIMENTS_DIR = "experiments"
TRAINING_KINDS = ("train", "kd", "step_distill")  # runs that write checkpoints (and so may not overwrite any)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags `start_run` reads: `--exp_dir` (run dir), `--wandb [PROJECT]` and `--dry_run`."""
    parser.add_argument("--exp_dir", default=None, help="run dir (default experiments/<kind>/<stem>-<time>)")
    parser.add_argument("--wandb", nargs="?", const="dkdm", default=None, help="log to this W&B project")
    parser.add_argument(
        "--dry_run", action="store_true",
        help="check the command (config, input files, models built on the meta device) and exit",
    )


def dry_run(kind: str, cfg: Mapping[str, Any]) -> NoReturn:
    """The end of a `--dry_run`: every section's network built on the meta device (its architecture and
    shapes checked, no memory, no weights read), one summary line, exit 0 before any run dir or process
    group exists. The config and input-file checks ran before this."""
    sections = {name: cfg[name] for name in ("teacher", "student") if name in cfg} or {"model": cfg}
    parts = []
    for name, section in sections.items():
        with torch.device("meta"):
            model, _ = create_any_model_and_diffusion(**model_and_diffusion_kwargs(section))
        parts.append(f"{name} {sum(p.numel() for p in model.parameters()):,} parameters")
    print(f"dry run ({kind}): {cfg.get(SOURCE_KEY, 'config')}: {', '.join(parts)}; inputs found; nothing run")
    raise SystemExit(0)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) with `seed`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def use_deterministic(on: bool) -> None:
    """With `on`, every kernel is a deterministic one (an op that has none raises) so that a resumed GPU run
    equals an uninterrupted one bit for bit: PyTorch's switch, cuDNN without autotuning, a fixed cuBLAS
    workspace, and Inductor's deterministic mode (set in the environment too, for its compile workers)."""
    if not on:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ["TORCHINDUCTOR_DETERMINISTIC"] = "1"
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    import torch._inductor.config as inductor_config

    if hasattr(inductor_config, "deterministic"):
        inductor_config.deterministic = True


def choose_run_dir(kind: str, cfg: Mapping[str, Any], exp_dir: str | None, resume: str | None) -> str:
    """`exp_dir` if given; the resumed run's dir; else `experiments/<kind>/<config stem>-<time>-<pid>` (the
    microseconds and pid keep two launches in the same second apart)."""
    if exp_dir:
        return exp_dir
    if resume:
        return resume if os.path.isdir(resume) else os.path.dirname(os.path.abspath(resume))
    stem = os.path.splitext(os.path.basename(str(cfg.get(SOURCE_KEY, "run"))))[0]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    return os.path.join(EXPERIMENTS_DIR, kind, f"{stem}-{stamp}-{os.getpid()}")


def start_run(kind: str, cfg: DictConfig, args: argparse.Namespace, split_batch: bool = True) -> str:
    """Join the process group, check the batch split, seed (seed + rank), pick, lock and return the run dir,
    configure the logger there and save the resolved config. A run dir another process holds, or a fresh
    training run into a dir with checkpoints, stops every rank with a one-line error (run_lock).
    `split_batch=False` for sampling, whose batch_size is per rank."""
    if getattr(args, "dry_run", False):
        dry_run(kind, cfg)
    section = primary_section(cfg)
    use_deterministic(bool(section.get("deterministic", False)))
    world = join_process_group(int(section.get("seed", 0)))
    if split_batch:
        validate_world_size(cfg, world)
    resume = section.get("resume_checkpoint") or None
    run_dir = choose_run_dir(kind, cfg, getattr(args, "exp_dir", None), resume)
    allow_checkpoints = bool(resume) or kind not in TRAINING_KINDS
    return claim_and_configure(
        run_dir, allow_checkpoints, cfg, kind, wandb_project=getattr(args, "wandb", None),
        wandb_config=dict(section),
    )


def join_process_group(seed: int) -> int:
    """Join the process group (an exception on one rank aborts them all) and seed this rank with
    `seed` + rank; returns the world size."""
    dist_util.setup_dist()
    dist_util.abort_on_exception()
    seed_everything(seed + dist_util.get_rank())
    return dist_util.get_world_size()


def claim_and_configure(
    run_dir: str,
    allow_checkpoints: bool,
    cfg: Mapping[str, Any],
    kind: str,
    wandb_project: str | None = None,
    wandb_config: Mapping[str, Any] | None = None,
) -> str:
    """Lock `run_dir` (rank 0 decides; a refusal stops every rank with a one-line error, run_lock),
    configure the logger there, save the resolved `cfg` as config.yaml and return the dir (rank 0's)."""
    refusal = claim_run_dir(run_dir, allow_checkpoints) if dist_util.get_rank() == 0 else None
    run_dir, refusal = dist_util.broadcast_object((run_dir, refusal))
    if refusal:
        raise SystemExit(f"error: {refusal}")
    logger.configure(
        run_dir, format_strs=["stdout", "log", "csv"], wandb_project=wandb_project,
        wandb_config=dict(wandb_config or {}),
    )
    if dist_util.is_main_process():
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
    world = dist_util.get_world_size()
    logger.log(f"{kind}: config {cfg.get(SOURCE_KEY)}, {world} rank(s), device {dist_util.dev()}"
               + (", deterministic kernels" if torch.are_deterministic_algorithms_enabled() else ""))
    dist_util.barrier()
    return run_dir


def build_model_and_diffusion(
    section: Mapping[str, Any], device: torch.device | str
) -> tuple[torch.nn.Module, Any]:
    """The network (UNet or DiT, moved to `device`) and diffusion described by a resolved config section."""
    model, diffusion = create_any_model_and_diffusion(**model_and_diffusion_kwargs(section))
    return model.to(device), diffusion


# Settings that change what a UNet computes or how its output is read without changing any weight's shape.
SHAPE_BLIND_KEYS = (
    "use_new_attention_order", "num_heads", "num_head_channels", "num_heads_upsample", "noise_schedule",
    "diffusion_steps", "predict_xstart", "rescale_learned_sigmas", "rescale_timesteps", "norm_groups",
)


def recorded_setting_differences(path: str, section: Mapping[str, Any]) -> list[str]:
    """`key: trained X, now Y` for each shape-blind setting where `section` differs from the config.yaml that
    this project saved in the checkpoint's run dir (the student's section of a KD run); [] without one."""
    from omegaconf import OmegaConf

    recorded_path = os.path.join(os.path.dirname(os.path.abspath(path)), "config.yaml")
    if not os.path.isfile(recorded_path):
        return []
    recorded = OmegaConf.to_container(OmegaConf.load(recorded_path), resolve=True)
    if not isinstance(recorded, dict):
        return []
    if isinstance(recorded.get("student"), dict):
        recorded = recorded["student"]
    return [
        f"{key}: trained {recorded[key]!r}, now {section[key]!r}"
        for key in SHAPE_BLIND_KEYS
        if key in recorded and key in section and recorded[key] != section[key]
    ]


def load_model_weights(model: torch.nn.Module, path: str, section: Mapping[str, Any] | None = None) -> None:
    """Load a checkpoint into `model` strictly; errors name the file and the mismatching keys (methods keep
    their training state in the opt file, so model files hold weights only). With `section`, a checkpoint
    whose run dir recorded other shape-blind settings (`SHAPE_BLIND_KEYS`) is refused, the keys named."""
    if section is not None:
        differences = recorded_setting_differences(path, section)
        if differences:
            raise CheckpointError(
                f"{path} was trained with other settings that shapes cannot show ({'; '.join(differences)}); "
                "use the run's values"
            )
    state, notes = unwrap_state_dict(safe_torch_load(path), path)
    for note in notes:
        logger.log(f"note: {note}")
    load_state_dict_strict(model, state, source=path)


def run_script(main: Callable[[], Any]) -> NoReturn:
    """Run a script's `main`, then end the process: wait for every rank, leave the process group, flush the
    logs and exit with status 0 at once (the scripts' `main`s leave this ending to it). Exiting through the
    interpreter's teardown instead runs the communication libraries' static destructors, where a rare
    "terminate called without an active exception" turned finished multi-rank runs into exit code 6
    (SIGABRT), which a job scheduler reads as a failure. Errors still raise as usual."""
    main()
    dist_util.cleanup()
    logger.reset()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
