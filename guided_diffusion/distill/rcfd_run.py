"""RDD's and RCFD's scripts as one module: a YAML per flagfile with the authors' flag names, base training
(train_base.py), a PD or RDD halving stage (PD.py, train_rdd.py) and N-step evaluation samples (ddim_eval.py).

Run dirs hold what the authors' logdirs hold (`ckpt.pt` in their layout, `ddim_clip/<step>.png` grids) plus
this project's `log.txt`/`progress.csv`, `config.yaml` and `train_state.pt` (optimizer, schedule, step, RNG,
EMA, memory head and queue), so a killed run resumes with `--resume` (the authors' cannot resume).
"""

from __future__ import annotations

import copy
import os
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import dist_util, logger
from ..config import ConfigError, resolve_with_defaults
from ..ddpm_diffusion import DDPMSchedule, ddim_sample, truncated_snr_loss
from ..ddpm_unet import DDPMUNet, load_rcfd_checkpoint, save_rcfd_checkpoint
from ..infra.checkpoint import atomic_torch_save, safe_torch_load
from ..train_util import rng_state, set_rng_state
from .rcfd_flags import absl_to_argparse, apply_launch_flags, has_flagfile
from .rdd import RDDObjective, pd_defaults, rdd_defaults

METHODS = ("base", "pd", "rdd")
STATE_FILE = "train_state.pt"
CKPT_FILE = "ckpt.pt"


def flag_defaults() -> dict[str, Any]:
    """Every flag a config may set, with the authors' defaults (train_base.py, PD.py, train_rdd.py,
    ddim_eval.py) and this project's additions at the end."""
    return {
        "T": 1024, "time_scale": 1, "mean_type": "xstart", "var_type": "fixedlarge",
        "lr": 2e-4, "wd": 0.0, "batch_size": 128, "ema_decay": 0.9999, "grad_clip": 1.0,
        "sample_size": 64, "sample_step": 1000, "save_step": 1000, "total_steps": 10000, "warmup": 0,
        "ch": 128, "attn": [1], "ch_mult": [1, 2, 2, 2], "dropout": 0.0, "num_res_blocks": 2,
        "img_size": 32, "num_workers": 4, "class_num": 10, "conditional": False,
        "logdir": "", "base_ckpt": "", "seed": 0,
        "feature": False, "loss_type": "none", "temperature": 0.9, "logits": False, "gt": False,
        "classifier": "densenet201", "classifier_path": "",
        "stride": 1, "num_images": 50000, "fid_cache": "",
        "method": "base",  # ours: which script this config is for (base, pd, rdd)
        "data_dir": "",  # ours: the training images; empty: the authors' torchvision CIFAR-10
        "dataset_root": "/data/dataset",  # the authors' torchvision root (rcfd_train.py, no data_dir)
        "queue_layout": "authors", "post_relu_map": True, "teacher_clip": False, "gt_student_x0": False,
        "log_interval": 100,  # ours: steps between progress.csv rows
        "random_flip": True,  # ours: the authors flip CIFAR-10 horizontally; digits configs turn it off
        "teacher_steps": 0,  # ours: > 0 reads base_ckpt as a teacher of that many DDIM steps on its chain
    }


def add_flag_arguments(parser: Any) -> None:
    """`--<flag>` for every flag (lists as comma-separated ints), default None = keep the YAML's value."""
    from ..script_util import str2bool

    for key, default in flag_defaults().items():
        if isinstance(default, bool):
            kind: Any = str2bool
        elif isinstance(default, list):
            def kind(text: str) -> list[int]:
                return [int(v) for v in text.split(",") if v]
        else:
            kind = type(default)
        parser.add_argument(f"--{key}", type=kind, default=None)


def overrides_from(args: Any) -> dict[str, Any]:
    """The flags given on the command line."""
    return {key: getattr(args, key) for key in flag_defaults() if getattr(args, key, None) is not None}


def parse_flags(parser: Any, argv: list[str] | None, example: str) -> tuple[Any, dict[str, Any]]:
    """Add `--config` (a flag YAML like `example`) and every `--<flag>` to the scripts' parser, parse the
    command line (also as the RDD README writes it: `--flagfile`, bare and `--no` booleans, repeated
    multi-flags, `--gpu_id`, the launcher's `--local-rank`; rcfd_flags), and return (args, flags); a bad
    config exits with a one-line error. Without `--config` the flags start from the defaults."""
    parser.add_argument("--config", default="", help=f"flag YAML ({example}); or the authors' --flagfile")
    parser.add_argument("--dry_run", action="store_true", help="check flags, inputs and the UNet; exit")
    add_flag_arguments(parser)
    try:
        given = sys.argv[1:] if argv is None else list(argv)
        plain, launch = absl_to_argparse(given, flag_defaults())
        args = parser.parse_args(plain)
        if not args.config and not has_flagfile(given):
            raise ConfigError(f"give --config (a flag YAML like {example}) or the authors' --flagfile")
        apply_launch_flags(launch)
        overrides = overrides_from(args)
        if not args.config and "method" not in overrides:
            overrides["method"] = infer_method(overrides)
        return args, load_flags(args.config, overrides)
    except ConfigError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")


def dry_run(flags: Mapping[str, Any], reads: Mapping[str, str]) -> None:
    """The end of a `--dry_run`: the files the command reads exist (`reads`: what -> path; a logdir
    stands for its ckpt.pt) and the flags' UNet builds on the meta device; exit 0 before any work."""
    for what, path in reads.items():
        if path and not os.path.exists(os.path.join(path, CKPT_FILE) if os.path.isdir(path) else path):
            raise SystemExit(f"error: {what} {path}: no {CKPT_FILE} there")
    with torch.device("meta"):
        unet = build_unet(flags, flags["T"] * flags["time_scale"])
    count = sum(p.numel() for p in unet.parameters())
    print(f"dry run ({flags['method']}): {flags['config']}: UNet {count:,} parameters; inputs found")
    raise SystemExit(0)


def infer_method(flags: Mapping[str, Any]) -> str:
    """The stage a flag-file command trains when it names no `--method`: RDD when it asks for the
    relational losses (`--feature`, a `--loss_type`, a classifier), PD when it names a teacher
    (`--base_ckpt`), else a base model; the README's PD.py and train_rdd.py lines share one flag file."""
    if flags.get("feature") or flags.get("loss_type", "none") != "none" or flags.get("classifier_path"):
        return "rdd"
    return "pd" if flags.get("base_ckpt") else "base"


def load_flags(path: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A flag YAML over the defaults, then the command line's `overrides` (None values skipped); checked."""
    from omegaconf import OmegaConf

    from ..config import check_file_exists

    if path:
        source = str(check_file_exists(path, "config file"))
        raw = OmegaConf.to_container(OmegaConf.load(source), resolve=True)
    else:
        source, raw = "command line", {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of flags")
    flags = resolve_with_defaults(raw, flag_defaults(), source, "the flags")
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    flags = resolve_with_defaults({**flags, **given}, flag_defaults(), "command line", "the flags")
    if flags["method"] not in METHODS:
        raise ConfigError(f"{source}: method must be one of {METHODS}, got {flags['method']!r}")
    if flags["mean_type"] != "xstart":
        raise ConfigError(f"{source}: mean_type {flags['mean_type']!r}: RCFD/RDD models predict xstart")
    if flags["T"] < 1 or flags["time_scale"] < 1:
        raise ConfigError(f"{source}: T and time_scale must be >= 1, got {flags['T']}, {flags['time_scale']}")
    flags["config"] = source
    return flags


def build_unet(flags: Mapping[str, Any], total_index: int) -> DDPMUNet:
    """The DDPMUNet the flags describe, with a time table for indices 0..total_index."""
    return DDPMUNet(
        T=total_index, ch=flags["ch"], ch_mult=flags["ch_mult"], attn=flags["attn"],
        num_res_blocks=flags["num_res_blocks"], dropout=flags["dropout"],
        conditional=flags["conditional"], class_num=flags["class_num"],
    )


def load_stage_model(path: str, flags: Mapping[str, Any], device: torch.device) -> tuple[DDPMUNet, dict]:
    """A `ckpt.pt` (or a logdir holding one) as the authors load a stage's model: EMA for a base model,
    raw weights for a distilled one."""
    if os.path.isdir(path):
        path = os.path.join(path, CKPT_FILE)
    kwargs = {k: flags[k] for k in ("ch", "ch_mult", "attn", "num_res_blocks", "dropout")}
    return load_rcfd_checkpoint(path, device, conditional=flags["conditional"], class_num=flags["class_num"],
                                **kwargs)


def _as_teacher_of(meta: dict[str, Any], steps: int, source: str) -> dict[str, Any]:
    """The checkpoint's chain (T * time_scale indices) read as a `steps`-step DDIM teacher: the authors
    reach e.g. the 8-step teacher through PD stages; this uses the base model's 8-step DDIM directly."""
    total = meta["T"] * meta["time_scale"]
    if steps < 2 or total % steps:
        raise ConfigError(f"teacher_steps {steps} must be >= 2 and divide {source}'s {total} indices")
    return {**meta, "T": steps, "time_scale": total // steps}


def ema_update(source: nn.Module, target: nn.Module, decay: float) -> None:
    """target = decay * target + (1 - decay) * source over every state entry (pytorch-ddpm's rule)."""
    with torch.no_grad():
        own = target.state_dict()
        for key, value in source.state_dict().items():
            own[key].copy_(own[key] * decay + value * (1 - decay))


def base_loss(
    model: nn.Module, schedule: DDPMSchedule, x0: torch.Tensor, T: int, time_scale: int,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """train_base.py's objective: t ~ U{0..T}, the x0 prediction's truncated-SNR loss against the data."""
    t = torch.randint(T + 1, (x0.shape[0],), device=x0.device)
    noise = torch.randn_like(x0)
    index = t * time_scale
    z = schedule.q_sample(x0, index, noise)
    return truncated_snr_loss(schedule, z, index, model(z, index, y), x0, noise)["loss"]


class StageTrainer:
    """One run of base training or a PD/RDD halving stage on the flags; `run()` trains to total_steps."""

    def __init__(self, flags: Mapping[str, Any], logdir: str, data: Iterator, resume: bool = False) -> None:
        self.flags = dict(flags)
        self.logdir = logdir
        self.data = data
        self.device = dist_util.dev()
        self.world = dist_util.get_world_size()
        method = flags["method"]
        self.method = method
        if method == "base":
            self.T, self.time_scale = flags["T"], flags["time_scale"]
            self.schedule = DDPMSchedule(self.T * self.time_scale)
            self.model = build_unet(flags, self.T * self.time_scale).to(self.device)
            self.ema = copy.deepcopy(self.model)
            self.objective: RDDObjective | None = None
            self.x_T = self._fresh_x_T()
        else:
            if not flags["base_ckpt"]:
                raise ConfigError(f"{flags['config']}: a {method} stage needs base_ckpt (teacher logdir)")
            teacher, meta = load_stage_model(flags["base_ckpt"], flags, self.device)
            if flags["teacher_steps"]:
                meta = _as_teacher_of(meta, flags["teacher_steps"], flags["base_ckpt"])
            if meta["T"] % 2:
                raise ConfigError(f"{flags['base_ckpt']}: the teacher has {meta['T']} steps; cannot halve")
            teacher.eval().requires_grad_(False)
            self.T, self.time_scale = meta["T"] // 2, meta["time_scale"] * 2
            self.schedule = DDPMSchedule(meta["T"] * meta["time_scale"])
            self.model = copy.deepcopy(teacher).train().requires_grad_(True)
            self.ema = None
            config = self._objective_config(method)
            classifier = self._classifier() if config["feature"] else None
            self.objective = RDDObjective(
                teacher, meta["T"], meta["time_scale"], config, classifier=classifier, schedule=self.schedule
            ).to(self.device)
            self.x_T = meta["x_T"] if meta["x_T"] is not None else self._fresh_x_T()
        self.x_T = self.x_T.to(self.device)
        self.trained = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.trained = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
            if self.objective is not None and self.objective.memory is not None:
                if self.device.type == "cuda":  # the authors' SyncBatchNorm: head statistics over all ranks
                    self.objective.memory = nn.SyncBatchNorm.convert_sync_batchnorm(self.objective.memory)
                else:
                    logger.log("memory head: per-rank BatchNorm statistics (SyncBatchNorm needs CUDA)")
        self.opt = torch.optim.Adam(self.model.parameters(), lr=flags["lr"], weight_decay=flags["wd"])
        if method == "base":
            warmup = max(int(flags["warmup"]), 1)
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(s, warmup) / warmup)
        else:
            self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=flags["total_steps"])
        head = list(self.objective.memory.parameters()) if self.objective and self.objective.memory else []
        self.head_opt = torch.optim.Adam(head, lr=flags["lr"], weight_decay=flags["wd"]) if head else None
        self.step = 0
        if resume:
            self._resume()

    def _fresh_x_T(self) -> torch.Tensor:
        size = self.flags["img_size"]
        return torch.randn(self.flags["sample_size"] // self.world, 3, size, size)

    def _objective_config(self, method: str) -> dict[str, Any]:
        base = pd_defaults() if method == "pd" else rdd_defaults()
        keys = ("feature", "loss_type", "temperature", "logits", "gt", "queue_layout", "post_relu_map",
                "teacher_clip", "gt_student_x0")
        config = {k: self.flags[k] for k in keys}
        if method == "pd":
            config.update(feature=False, loss_type="none", logits=True, gt=False)
        return {**base, **config}

    def _classifier(self) -> nn.Module:
        from .densenet import load_densenet

        path = self.flags["classifier_path"]
        if not path:
            raise ConfigError(f"{self.flags['config']}: feature is on but classifier_path is empty")
        return load_densenet(path, self.flags["classifier"], self.flags["class_num"], self.device)

    # ------------------------------------------------------------------------------------------ state

    def _state(self) -> dict[str, Any]:
        state = {
            "step": self.step, "total_steps": self.flags["total_steps"], "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(), "x_T": self.x_T.cpu(),
            "per_rank": dist_util.all_gather_object(
                {"rng": rng_state(), "data": self._data_state(), "memory": self._memory_state()}
            ),
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.head_opt is not None:
            state["head_opt"] = self.head_opt.state_dict()
        return state

    def _memory_state(self) -> dict | None:
        """The memory head and queue of this rank: each rank enqueues its own random pick of the gathered
        keys (and, on the CPU, keeps its own BatchNorm statistics), so every rank's copy is saved."""
        if self.objective is None or self.objective.memory is None:
            return None
        return {k: v.cpu() for k, v in self.objective.memory.state_dict().items()}

    def _resume(self) -> None:
        path = os.path.join(self.logdir, STATE_FILE)
        state = safe_torch_load(path, map_location="cpu")
        if state.get("total_steps") != self.flags["total_steps"]:
            raise ConfigError(
                f"{path}: the run was started with total_steps {state.get('total_steps')}, this resume "
                f"has {self.flags['total_steps']}; the lr schedule depends on it, so use the run's value"
            )
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        own = state["per_rank"][dist_util.get_rank()]
        if "head_opt" in state:
            # files written before the per-rank copies hold rank 0's memory at the top level
            self.objective.memory.load_state_dict(own.get("memory") or state["memory"])
            self.head_opt.load_state_dict(state["head_opt"])
        self.x_T = state["x_T"].to(self.device)
        self.step = int(state["step"])
        if own["data"] is not None:
            self.data.load_state_dict(own["data"])
        set_rng_state(own["rng"])
        logger.log(f"resumed {path} at step {self.step}")

    def _data_state(self) -> dict | None:
        return self.data.state_dict() if hasattr(self.data, "state_dict") else None

    def save(self) -> None:
        """`ckpt.pt` in the authors' layout, then the resume state (rank 0, atomic writes)."""
        state = self._state()  # every rank takes part in gathering the per-rank state
        if dist_util.is_main_process():
            save_rcfd_checkpoint(
                os.path.join(self.logdir, CKPT_FILE), self.model, self.T, self.time_scale, self.x_T,
                ema_model=self.ema,
            )
            atomic_torch_save(state, os.path.join(self.logdir, STATE_FILE))
        dist_util.barrier()

    # ------------------------------------------------------------------------------------------ loop

    def train_step(self) -> dict[str, float]:
        """One batch: loss, backward, gradient clipping of the model, the optimizers and the schedule."""
        x0, cond = next(self.data)
        x0 = x0.to(self.device)
        y = cond["y"].to(self.device) if self.flags["conditional"] else None
        if self.method == "base":
            terms = {"loss": base_loss(self.trained, self.schedule, x0, self.T, self.time_scale, y)}
        else:
            terms = self.objective(self.trained, x0, y)
        self.opt.zero_grad(set_to_none=True)
        if self.head_opt is not None:
            self.head_opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if self.head_opt is not None and self.world > 1:
            for p in self.objective.memory.parameters():
                if p.grad is not None:
                    p.grad.copy_(dist_util.all_reduce_mean(p.grad))
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.flags["grad_clip"])
        self.opt.step()
        if self.head_opt is not None:
            self.head_opt.step()
        self.sched.step()
        if self.ema is not None:
            ema_update(self.model, self.ema, self.flags["ema_decay"])
        self.step += 1
        return {**{k: float(v.detach()) for k, v in terms.items()}, "grad_norm": float(grad_norm)}

    def sample_grid(self) -> None:
        """`ddim_clip/<step>.png`: the EMA (base) or the student sampled from the fixed x_T on its grid."""
        from ..sampling import save_grid, to_uint8_nhwc

        model = self.ema if self.ema is not None else self.model
        was_training = model.training
        model.eval()
        with torch.no_grad():
            images = ddim_sample(model, self.schedule, self.x_T, self.T, self.time_scale)
        model.train(was_training)
        if dist_util.is_main_process():
            folder = os.path.join(self.logdir, "ddim_clip")
            os.makedirs(folder, exist_ok=True)
            save_grid(to_uint8_nhwc(images).cpu().numpy(), os.path.join(folder, f"{self.step}.png"))

    def run(self) -> None:
        """Train to total_steps with a progress bar, logging every log_interval, sampling every
        sample_step (and at step 1) and saving every save_step and at the end."""
        from tqdm import tqdm

        flags = self.flags
        bar = tqdm(total=flags["total_steps"], initial=self.step, desc=self.method, dynamic_ncols=True,
                   disable=not dist_util.is_main_process())
        tick = (time.perf_counter(), self.step)
        while self.step < flags["total_steps"]:
            terms = self.train_step()
            bar.update(1)
            for key, value in terms.items():
                logger.logkv_mean(key, value)
            if self.step % max(flags["log_interval"], 1) == 0:
                now = time.perf_counter()
                logger.logkv("step", self.step)
                logger.logkv("lr", self.sched.get_last_lr()[0])
                logger.logkv("steps_per_s", (self.step - tick[1]) / max(now - tick[0], 1e-9))
                logger.dumpkvs()
                tick = (now, self.step)
            if flags["sample_step"] > 0 and (self.step % flags["sample_step"] == 0 or self.step == 1):
                self.sample_grid()
            if flags["save_step"] > 0 and self.step % flags["save_step"] == 0:
                self.save()
        bar.close()
        self.save()


def sample_npz(
    model: nn.Module, schedule: DDPMSchedule, steps: int, time_scale: int, stride: int, num_images: int,
    batch_size: int, img_size: int, seed: int, class_num: int = 10, conditional: bool = False,
    device: torch.device | None = None,
) -> np.ndarray:
    """ddim_eval.py's samples as uint8 NHWC: `num_images` DDIM samples with x_T ~ N(0, I) per batch
    (seeded), the model's grid at `stride`."""
    from ..sampling import to_uint8_nhwc

    device = device or next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    out = []
    model.eval()
    with torch.no_grad():
        for start in range(0, num_images, batch_size):
            n = min(batch_size, num_images - start)
            x_T = torch.randn((n, 3, img_size, img_size), generator=generator).to(device)
            y = torch.randint(class_num, (n,), generator=generator).to(device) if conditional else None
            images = ddim_sample(model, schedule, x_T, steps, time_scale, stride=stride, y=y)
            out.append(to_uint8_nhwc(images).cpu().numpy())
    return np.concatenate(out)
