"""The training loop (guided-diffusion's `TrainLoop`): AdamW, EMA, lr schedules, microbatching, DDP,
guided-diffusion-named checkpoints with exact resume, and hooks for the distillation loops."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import signal
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from . import dist_util, logger
from .infra.checkpoint import (
    CheckpointError,
    ResumeSet,
    atomic_torch_save,
    find_resume_set,
    is_plain_optimizer_state,
    load_state_dict_strict,
    prune_checkpoint_sets,
    remove_stale_temp_files,
    safe_torch_load,
    saved_ema_rates,
    write_latest,
)
from .infra.compile_util import FastPath, fast_trained
from .infra.mixed_precision import (
    ADM_FP16,
    MixedPrecisionTrainer,
    NonFiniteLossError,
    apply_adm_fp16,
    make_optimizer,
    resolve_precision,
)

if TYPE_CHECKING:
    from .gaussian_diffusion import GaussianDiffusion
    from .resample import ScheduleSampler

LR_SCHEDULES = ("constant", "cosine")


def parse_ema_rates(ema_rate: float | str | Iterable[float]) -> list[float]:
    """guided-diffusion's `ema_rate`: a float, a comma-separated string ("0.9999,0.999") or a list."""
    if isinstance(ema_rate, str):
        return [float(x) for x in ema_rate.split(",") if x.strip()]
    if isinstance(ema_rate, (int, float)):
        return [float(ema_rate)]
    return [float(x) for x in ema_rate]


def rng_state() -> dict:
    """This process's torch/numpy/python (and CUDA) RNG states, in a `weights_only`-loadable form."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state(dist_util.dev())
    return state


def set_rng_state(state: Mapping) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"], dist_util.dev())


STOPPED_EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


class StopRequest:
    """SIGTERM (a scheduler's pre-emption, a time budget) asks the loop to save and stop instead of dying
    mid-step. The ranks agree on the step: the flag is all-reduced every `every` steps (1 in one process),
    so every rank saves the same set."""

    def __init__(self, every: int) -> None:
        self.every = max(1, int(every))
        self.flag = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._request)

    def _request(self, signum: int, frame: Any) -> None:
        self.flag = True

    def agreed(self, step: int) -> bool:
        """Whether every rank stops after `step` (called by every rank at every step)."""
        if step % self.every:
            return False
        if dist_util.get_world_size() == 1:
            return self.flag
        return bool(dist_util.all_reduce_mean(torch.tensor(float(self.flag))).item() > 0)

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None


def log_memory(step: int, device: torch.device) -> None:
    """One log line with this process's resident host memory and, on CUDA, the allocator's allocated and
    reserved bytes (MiB), so that growth over a long run can be read from log.txt."""
    line = f"memory step {step}: host_rss_mib {host_rss_mib():.1f}"
    if device.type == "cuda":
        line += (f" cuda_allocated_mib {torch.cuda.memory_allocated(device) / 2**20:.1f}"
                 f" cuda_reserved_mib {torch.cuda.memory_reserved(device) / 2**20:.1f}")
    logger.log(line)


def host_rss_mib() -> float:
    """Resident set size of this process in MiB (Linux /proc; the peak from getrusage elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def loop_kwargs(section: Any, diffusion: GaussianDiffusion, run_dir: str | None) -> dict[str, Any]:
    """The `TrainLoop` keyword arguments a config section sets (training keys of config.py's schema).

    Every script and tool builds its loop from this one mapping, so a training key added to the schema
    reaches every loop (callers add model, data and batch, and override what they fix themselves).
    """
    from .resample import create_named_schedule_sampler

    return dict(
        microbatch=section.microbatch, lr=section.lr, ema_rate=section.ema_rate,
        log_interval=section.log_interval, save_interval=section.save_interval,
        resume_checkpoint=section.resume_checkpoint, use_fp16=section.use_fp16, precision=section.precision,
        fp16_scale_growth=section.fp16_scale_growth,
        schedule_sampler=create_named_schedule_sampler(section.schedule_sampler, diffusion),
        weight_decay=section.weight_decay, lr_anneal_steps=section.lr_anneal_steps,
        max_steps=section.max_steps, grad_clip=section.grad_clip, keep_checkpoints=section.keep_checkpoints,
        max_nonfinite_skips=section.max_nonfinite_skips, lr_schedule=section.lr_schedule,
        seed=section.seed, run_dir=run_dir, sample_interval=section.sample_interval,
        memory_log_interval=section.memory_log_interval, fast=FastPath.from_section(section),
    )


class TrainLoop:
    """Trains `model` on `diffusion.training_losses` over batches from `data`.

    `batch_size` is per rank (the scripts divide the config's global batch by the world size). Each step
    the batch is split into microbatches of `microbatch` (-1/0: whole batch) whose losses are weighted by
    their share of the batch, so microbatching never changes the gradient. The parameters stay fp32;
    `precision` ("auto" = bf16 if `use_fp16`, else fp32) picks the autocast dtype on CUDA. `fast` (the
    config's `compile`, `cuda_graphs` and `half_norm`, see compile_util.FastPath) speeds up the student's
    calls without changing what they compute; CUDA graphs serve single-process runs with one microbatch.

    Hooks for distillation loops (override in a subclass):
      - `next_batch() -> (batch, cond)`: the next training input (default: `next(data)`).
      - `compute_losses(batch, cond) -> (loss, terms)`: `loss` is the scalar to backpropagate; `terms`
        maps names to per-item tensors or scalars for logging. A per-item int tensor under "t" adds
        guided-diffusion's per-quartile terms (`mse_q0` ...) and is not itself logged. Called inside
        autocast with `self.ddp_model`.
      - `extra_params() -> dict[str, nn.Module]`: extra trainable modules (e.g. TCCD heads) optimized with
        the model and saved in the opt file. Create them before calling `TrainLoop.__init__`.
      - `extra_state() -> dict` / `load_extra_state(state)`: loop state saved in (and restored from) the
        opt file; during `load_extra_state`, `self.resume_files` maps roles to the resumed set's paths.
      - `save_extra_files(step) -> list[str]`: write extra files of the checkpoint set (called on every
        rank so it may communicate; only rank 0 should write) and return their paths.
      - `required_resume_patterns() -> dict[str, str]`: role -> file pattern with `{step}` (e.g.
        `{"pool": "teacher-state-{step:06d}.cache"}`) that a checkpoint set must hold to be resumable.
    """

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        diffusion: GaussianDiffusion,
        data: Iterator,
        batch_size: int,
        microbatch: int,
        lr: float,
        ema_rate: float | str | Iterable[float],
        log_interval: int,
        save_interval: int,
        resume_checkpoint: str,
        use_fp16: bool = False,
        precision: str = "auto",
        fp16_scale_growth: float = 1e-3,
        schedule_sampler: ScheduleSampler | None = None,
        weight_decay: float = 0.0,
        lr_anneal_steps: int = 0,
        max_steps: int = 0,
        grad_clip: float = 0.0,
        max_nonfinite_skips: int = 50,
        lr_schedule: str = "constant",
        seed: int = 0,
        run_dir: str | None = None,
        sample_interval: int = 0,
        keep_checkpoints: int = 0,
        memory_log_interval: int = 0,
        sample_diffusion: GaussianDiffusion | None = None,
        fast: FastPath | None = None,
    ) -> None:
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        if lr_schedule == "cosine" and max_steps <= 0:
            raise ValueError("lr_schedule 'cosine' decays over max_steps; set max_steps > 0")
        self.model = model
        self.diffusion = diffusion
        self.data = data
        self.batch_size = batch_size
        self.microbatch = microbatch if microbatch > 0 else batch_size
        self.lr = lr
        self.ema_rate = parse_ema_rates(ema_rate)
        self.log_interval = log_interval
        self.save_interval = save_interval
        self.resume_checkpoint = resume_checkpoint
        self.weight_decay = weight_decay
        self.lr_anneal_steps = lr_anneal_steps
        self.max_steps = max_steps
        self.max_nonfinite_skips = max_nonfinite_skips
        self.lr_schedule = lr_schedule
        self.seed = seed
        self.run_dir = run_dir or logger.get_dir()
        self.sample_interval = sample_interval
        self.keep_checkpoints = int(keep_checkpoints)
        self.memory_log_interval = int(memory_log_interval)
        self.sample_diffusion = sample_diffusion or diffusion
        if schedule_sampler is None:
            from .resample import UniformSampler

            schedule_sampler = UniformSampler(diffusion)
        self.schedule_sampler = schedule_sampler
        self.device = dist_util.dev()
        self.world_size = dist_util.get_world_size()
        self.step = 0
        self.resume_files: dict[str, str] = {}

        self.fast = fast or FastPath()
        self.extra_modules = dict(self.extra_params())
        extra = [p for m in self.extra_modules.values() for p in m.parameters()]
        if self.world_size > 1:
            dist_util.sync_params(model.parameters())
            dist_util.sync_params(extra)
        self.mp_trainer = MixedPrecisionTrainer(
            model, resolve_precision(precision, use_fp16), fp16_scale_growth=fp16_scale_growth,
            grad_clip=grad_clip, extra_params=extra,
        )
        if self.mp_trainer.precision == ADM_FP16:
            apply_adm_fp16(model)
        self.opt = make_optimizer(self.mp_trainer.params, lr, weight_decay)
        self.model_params = [p for p in model.parameters() if p.requires_grad]
        self.ema_params = [[p.detach().clone() for p in self.model_params] for _ in self.ema_rate]
        single_backward = self.microbatch >= batch_size
        # Several ranks, one backward per step, graphs on CUDA: the student is graphed as in one process and
        # its gradients are averaged in one all-reduce after the backward, instead of DDP's hooks inside it.
        graphed_ranks = (self.world_size > 1 and single_backward and self.fast.cuda_graphs
                         and self.device.type == "cuda")
        synced_here = extra + (self.model_params if graphed_ranks else [])
        self._grads_to_sync = synced_here if self.world_size > 1 else []
        if self.world_size > 1 and not graphed_ranks:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = DistributedDataParallel(
                model, device_ids=ids, output_device=ids[0] if ids else None, broadcast_buffers=False,
            )
        else:
            self.ddp_model = model
        graphs_allowed = single_backward and (self.world_size == 1 or graphed_ranks)
        self.ddp_model = fast_trained(self.ddp_model, self.fast, graphs_allowed=graphs_allowed)
        if resume_checkpoint:
            self._resume(resume_checkpoint)
        self._acc: dict[str, list[torch.Tensor]] = {}
        self._quart: dict[str, list[torch.Tensor]] = {}
        self._tick = (time.time(), self.step)

    # ----------------------------------------------------------------------------------------- hooks

    def next_batch(self) -> tuple[torch.Tensor, dict]:
        """The next `(batch, cond)`; the default reads the data iterator."""
        return next(self.data)

    def compute_losses(self, batch: torch.Tensor, cond: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """guided-diffusion's objective: sampler timesteps, `training_losses`, importance weights."""
        from .resample import LossAwareSampler

        t, weights = self.schedule_sampler.sample(batch.shape[0], batch.device)
        losses = self.diffusion.training_losses(self.ddp_model, batch, t, model_kwargs=cond)
        if isinstance(self.schedule_sampler, LossAwareSampler):
            self.schedule_sampler.update_with_local_losses(t, losses["loss"].detach())
        terms = {k: v.detach() * weights for k, v in losses.items()}
        terms["t"] = t
        return (losses["loss"] * weights).mean(), terms

    def extra_params(self) -> dict[str, torch.nn.Module]:
        """Extra trainable modules optimized and saved with the model (none by default)."""
        return {}

    def extra_state(self) -> dict:
        """Loop state to save in the opt file (none by default)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what `extra_state` returned (nothing by default)."""

    def save_extra_files(self, step: int) -> list[str]:
        """Write extra checkpoint files for `step`; return their paths (none by default)."""
        return []

    def required_resume_patterns(self) -> dict[str, str]:
        """Extra roles a resumable checkpoint set must hold: role -> pattern with `{step}` (none)."""
        return {}

    # ----------------------------------------------------------------------------------------- loop

    def _done(self) -> bool:
        if self.lr_anneal_steps and self.step >= self.lr_anneal_steps:
            return True
        return bool(self.max_steps) and self.step >= self.max_steps

    def _total_steps(self) -> int | None:
        limits = [x for x in (self.lr_anneal_steps, self.max_steps) if x]
        return min(limits) if limits else None

    def run_loop(self) -> None:
        """Train until `lr_anneal_steps`/`max_steps` (forever if both are 0), logging, saving, sampling."""
        self._log_model_info()
        progress = None
        if dist_util.is_main_process():
            from tqdm import tqdm

            progress = tqdm(total=self._total_steps(), initial=self.step, desc="train", dynamic_ncols=True)
        last_saved = self.step if self.resume_checkpoint else -1
        stop = StopRequest(self.log_interval if self.world_size > 1 else 1)
        try:
            while not self._done():
                batch, cond = self.next_batch()
                self.run_step(batch, cond)
                if progress is not None:
                    progress.update(1)
                if stop.agreed(self.step):
                    if last_saved != self.step:
                        self.save()
                    logger.log(f"stopped by SIGTERM at step {self.step}; its checkpoint set is saved, resume "
                               f"with --resume_checkpoint {self.run_dir}")
                    raise SystemExit(STOPPED_EXIT_CODE)
                if self.log_interval and self.step % self.log_interval == 0:
                    self.log_step()
                if self.memory_log_interval and self.step % self.memory_log_interval == 0:
                    log_memory(self.step, self.device)
                if self.save_interval and self.step % self.save_interval == 0:
                    self.save()
                    last_saved = self.step
                if self.sample_interval and self.step % self.sample_interval == 0:
                    self.save_sample_grid()
        finally:
            stop.restore()
            if progress is not None:
                progress.close()
        if last_saved != self.step:
            self.save()

    def run_step(self, batch: torch.Tensor, cond: dict) -> None:
        """One optimizer step on `batch`: forward/backward over microbatches, optimize, EMA, step += 1."""
        self.forward_backward(batch, cond)
        self._set_lr()
        self._sync_grads()
        self.mp_trainer.optimize(self.opt)
        self._update_ema()
        self._acc_add("grad_norm", self.mp_trainer.grad_norm)
        self.step += 1

    def forward_backward(self, batch: torch.Tensor, cond: dict) -> None:
        """Accumulate gradients of the batch's loss; DDP syncs only on the last microbatch."""
        self.mp_trainer.zero_grad()
        n = batch.shape[0]
        for i in range(0, n, self.microbatch):
            micro = batch[i : i + self.microbatch].to(self.device)
            micro_cond = {k: v[i : i + self.microbatch].to(self.device) for k, v in cond.items()}
            last = i + self.microbatch >= n
            no_sync = self.world_size > 1 and not last
            with self.ddp_model.no_sync() if no_sync else contextlib.nullcontext():
                with self.mp_trainer.autocast():
                    loss, terms = self.compute_losses(micro, micro_cond)
                self.mp_trainer.backward(loss * (micro.shape[0] / n))
            self._record_terms(terms)

    def _set_lr(self) -> None:
        lr = self.current_lr()
        for group in self.opt.param_groups:
            group["lr"] = lr

    def current_lr(self) -> float:
        """The learning rate for the step being taken (linear anneal or cosine decay to 0, or constant)."""
        if self.lr_anneal_steps:
            return self.lr * (1 - self.step / self.lr_anneal_steps)
        if self.lr_schedule == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * min(self.step, self.max_steps) / self.max_steps))
        return self.lr

    def _sync_grads(self) -> None:
        """Average over ranks the gradients DDP does not reduce (extra modules; the graphed student's)."""
        grads = [p.grad for p in self._grads_to_sync if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        for g, part in zip(grads, torch.split(flat, [g.numel() for g in grads]), strict=True):
            g.copy_(part.view_as(g))

    def _update_ema(self) -> None:
        # ema += (1 - rate) * taken * (param - ema): a skipped (non-finite) step has taken = 0 on the device.
        # The weight stays a device tensor; `_foreach_lerp_` would read it back as a host scalar every step.
        taken = self.mp_trainer.step_taken
        current = [p.detach() for p in self.model_params]
        for rate, ema in zip(self.ema_rate, self.ema_params, strict=True):
            delta = torch._foreach_sub(current, ema)
            torch._foreach_mul_(delta, (1.0 - rate) * taken)
            torch._foreach_add_(ema, delta)

    # ----------------------------------------------------------------------------------------- logging

    def _acc_add(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        total, count = self._acc.setdefault(key, [torch.zeros((), device=value.device), 0])
        self._acc[key] = [total + value.sum(), count + value.numel()]

    def _record_terms(self, terms: Mapping[str, torch.Tensor]) -> None:
        t = terms.get("t")
        for key, value in terms.items():
            if key == "t":
                continue
            value = torch.as_tensor(value).detach().float()
            self._acc_add(key, value)
            if t is not None and value.ndim == 1 and value.shape[0] == t.shape[0]:
                num_t = self.diffusion.num_timesteps
                quart = (4 * t.to(value.device) // num_t).clamp(0, 3)
                sums, counts = self._quart.setdefault(
                    key, [torch.zeros(4, device=value.device), torch.zeros(4, device=value.device)]
                )
                sums.index_add_(0, quart, value)
                counts.index_add_(0, quart, torch.ones_like(value))

    def log_step(self) -> None:
        """Dump the interval's means (one host read) and raise if too many steps in a row were skipped."""
        self.mp_trainer.check_skips(self.max_nonfinite_skips)
        now = time.time()
        then, then_step = self._tick
        self._tick = (now, self.step)
        global_batch = self.batch_size * self.world_size
        logger.logkv("step", self.step)
        logger.logkv("samples", self.step * global_batch)
        for key, (total, count) in self._acc.items():
            logger.logkv(key, float(total) / max(count, 1))
        for key, (sums, counts) in self._quart.items():
            for q, (s, c) in enumerate(zip(sums.tolist(), counts.tolist(), strict=True)):
                if c:
                    logger.logkv(f"{key}_q{q}", s / c)
        logger.logkv("lg_loss_scale", float(self.mp_trainer.lg_loss_scale))
        logger.logkv("skipped_steps", int(self.mp_trainer.skipped_total))
        logger.logkv("lr", self.opt.param_groups[0]["lr"])
        if now > then:
            logger.logkv("img_per_s", (self.step - then_step) * global_batch / (now - then))
        logger.dumpkvs()
        self._acc.clear()
        self._quart.clear()

    def _log_model_info(self) -> None:
        n_params = sum(p.numel() for p in self.model.parameters())
        logger.log(f"model parameters: {n_params:,} ({n_params / 1e6:.2f}M)")
        logger.log(f"forward FLOPs (batch 1): {self._flops_per_forward()}")

    def _flops_per_forward(self) -> str:
        try:
            from .model_cost import forward_cost

            cost = forward_cost(self.model)
            return f"{cost['flops'] / 1e9:.3f} GFLOPs ({cost['macs'] / 1e9:.3f} GMACs + attention)"
        except Exception as exc:  # thop fails on unusual modules; the count is informative only
            logger.log(f"FLOP count failed: {type(exc).__name__}: {exc}")
            return "n/a"

    # ----------------------------------------------------------------------------------------- checkpoints

    def _ema_state_dict(self, ema: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        state = self.model.state_dict()
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        for name, value in zip(names, ema, strict=True):
            state[name] = value.detach().clone()
        return {k: v.cpu() for k, v in state.items()}

    def _opt_payload(self) -> dict:
        local = {"rng": rng_state()}
        if hasattr(self.data, "state_dict"):
            local["data"] = self.data.state_dict()
        per_rank = [local]
        if self.world_size > 1:
            per_rank = [None] * self.world_size
            dist.all_gather_object(per_rank, local)
        return {
            "opt": self.opt.state_dict(),
            "step": self.step,
            "world_size": self.world_size,
            "scaler": self.mp_trainer.state_dict(),
            "sampler": _sampler_state(self.schedule_sampler),
            "ranks": per_rank,
            "extra_modules": {k: m.state_dict() for k, m in self.extra_modules.items()},
            "extra": self.extra_state(),
        }

    def save(self) -> None:
        """Write model, EMA and opt files for the current step (rank 0), the extras, then `latest`."""
        step = self.step
        self._check_finite_weights()
        payload = self._opt_payload()
        extra_files = self.save_extra_files(step)
        if dist_util.is_main_process():
            os.makedirs(self.run_dir, exist_ok=True)
            files = []
            path = os.path.join(self.run_dir, f"model{step:06d}.pt")
            atomic_torch_save({k: v.cpu() for k, v in self.model.state_dict().items()}, path)
            files.append(path)
            for rate, ema in zip(self.ema_rate, self.ema_params, strict=True):
                path = os.path.join(self.run_dir, f"ema_{rate}_{step:06d}.pt")
                atomic_torch_save(self._ema_state_dict(ema), path)
                files.append(path)
            path = os.path.join(self.run_dir, f"opt{step:06d}.pt")
            atomic_torch_save(payload, path)
            files.append(path)
            write_latest(self.run_dir, step, files + list(extra_files))
            logger.log(f"saved checkpoint set for step {step} in {self.run_dir}")
            if self.keep_checkpoints:
                removed = prune_checkpoint_sets(self.run_dir, self.keep_checkpoints)
                if removed:
                    logger.log(f"keep_checkpoints {self.keep_checkpoints}: removed steps {removed}")
        dist_util.barrier()

    def _check_finite_weights(self) -> None:
        """Refuse to save non-finite weights (e.g. after an infinite learning rate): no file is written, so
        `latest` keeps pointing at the last good checkpoint set."""
        tensors = [*self.model_params, *(p for ema in self.ema_params for p in ema)]
        finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all()
        if not bool(finite):
            raise NonFiniteLossError(
                f"step {self.step}: the model or EMA weights are not finite; nothing saved, "
                f"{self.run_dir}/latest still names the last good set (check the learning rate and precision)"
            )

    def _resume(self, path: str) -> None:
        extra = self.required_resume_patterns()
        authors_opt = None  # the authors' bare optimizer state, read once, when the set is theirs
        try:
            found = find_resume_set(path, required=("model", "opt", "ema", *extra), ema_rates=self.ema_rate,
                                    extra_patterns=extra)
        except CheckpointError:
            authors = self._authors_set(path)
            if authors is None:
                raise
            found, authors_opt = authors
        if found is None and (authors := self._authors_set(path)) is not None:
            found, authors_opt = authors
        if found is None:
            saved = saved_ema_rates(path)
            wanted = {str(rate) for rate in self.ema_rate}
            if saved and not wanted <= saved:
                raise FileNotFoundError(
                    f"{path}: the run's EMA files have rate(s) {', '.join(sorted(saved))} but ema_rate is "
                    f"{', '.join(sorted(wanted))}; resume with the run's ema_rate"
                )
            raise FileNotFoundError(f"{path}: no complete checkpoint set to resume from")
        logger.log(f"resuming from step {found.step} in {found.run_dir}")
        if dist_util.is_main_process():
            remove_stale_temp_files(self.run_dir)
        model_path = found.get("model")
        load_state_dict_strict(self.model, safe_torch_load(model_path), source=model_path)
        for rate, ema in zip(self.ema_rate, self.ema_params, strict=True):
            ema_path = found.ema_path(rate)
            state = safe_torch_load(ema_path)
            names = [n for n, p in self.model.named_parameters() if p.requires_grad]
            missing = [n for n in names if n not in state]
            if missing:
                raise KeyError(f"{ema_path}: missing EMA parameters {missing[:5]}")
            torch._foreach_copy_(ema, [state[n].to(self.device) for n in names])
        if authors_opt is not None:
            self._resume_authors_run(found, authors_opt)
            return
        opt_path = found.get("opt")
        payload = safe_torch_load(opt_path, map_location=self.device)
        if is_plain_optimizer_state(payload):
            self._resume_authors_run(found, payload)
            return
        self.opt.load_state_dict(payload["opt"])
        self.mp_trainer.load_state_dict(payload["scaler"])
        for name, module in self.extra_modules.items():
            module.load_state_dict(payload["extra_modules"][name])
        _load_sampler_state(self.schedule_sampler, payload.get("sampler"))
        self.step = int(payload["step"])
        rank = dist_util.get_rank()
        if payload["world_size"] == self.world_size:
            mine = payload["ranks"][rank]
            set_rng_state(_to_cpu(mine["rng"]))
            if "data" in mine and hasattr(self.data, "load_state_dict"):
                self.data.load_state_dict(mine["data"])
        else:
            logger.warn(f"{opt_path}: saved with {payload['world_size']} ranks, now {self.world_size}: "
                        "RNG and data order restart (the run continues, but not bit-exactly)")
        self.resume_files = dict(found.paths)
        self.load_extra_state(payload["extra"])

    def _authors_set(self, path: str) -> tuple[ResumeSet, dict] | None:
        """A checkpoint set written by the authors' guided-diffusion loop (model, EMA and an opt file holding
        a plain optimizer state dict; no files of this project's extras) and that state, or None."""
        try:
            found = find_resume_set(path, required=("model", "opt", "ema"), ema_rates=self.ema_rate,
                                    extra_patterns=self.required_resume_patterns())
        except CheckpointError:
            return None
        if found is None:
            return None
        opt_state = safe_torch_load(found.get("opt"), map_location=self.device)
        return (found, opt_state) if is_plain_optimizer_state(opt_state) else None

    def _resume_authors_run(self, found: ResumeSet, opt_state: dict) -> None:
        """Continue a run the authors' code wrote: their optimizer state, and the step count their file
        names under-count by one (their `modelN.pt` is saved after update N + 1). RNG and data order
        restart; extras resume only from the files such a run has (`load_authors_extra_state`)."""
        try:
            self.opt.load_state_dict(opt_state)
        except ValueError as exc:
            raise CheckpointError(f"{found.get('opt')}: the authors' optimizer state does not fit this "
                                  f"run's parameters ({exc})") from None
        self.step = found.step + 1
        logger.warn(f"{found.run_dir}: a run of the authors' code (their opt{found.step:06d}.pt is a plain "
                    f"optimizer state): resuming after {self.step} updates (their file names count one "
                    "fewer); RNG and data order restart")
        self.resume_files = dict(found.paths)
        self.load_authors_extra_state()

    def load_authors_extra_state(self) -> None:
        """Hook: restore what a resumed authors' run dir holds beyond model, EMA and optimizer (default:
        nothing)."""

    # ----------------------------------------------------------------------------------------- samples

    def ema_model(self) -> torch.nn.Module:
        """A copy of the model holding the first EMA rate's weights (for samples and evaluation)."""
        model = copy.deepcopy(self.model)
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            torch._foreach_copy_(params, self.ema_params[0])
        return model

    def save_sample_grid(self, num_samples: int = 16) -> None:
        """Sample a small grid from the EMA model (all ranks take part) and write it to the run dir."""
        from .sampling import sample_images, save_grid

        per_rank = math.ceil(num_samples / self.world_size)
        arr = sample_images(
            self.ema_model(), self.sample_diffusion, num_samples=num_samples, batch_size=per_rank,
            image_size=self.model.image_size, class_cond=bool(getattr(self.model, "num_classes", None)),
            num_classes=getattr(self.model, "num_classes", None), precision=self.mp_trainer.precision,
            seed=self.seed, progress=False,
        )
        if arr is not None:
            path = save_grid(arr, os.path.join(self.run_dir, f"samples_{self.step:06d}.png"))
            logger.log(f"wrote sample grid {path}")


def _to_cpu(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {k: _to_cpu(v) for k, v in state.items()}
    return state


def _sampler_state(sampler: ScheduleSampler) -> dict | None:
    return sampler.state_dict() if hasattr(sampler, "state_dict") else None


def _load_sampler_state(sampler: ScheduleSampler, state: dict | None) -> None:
    if state is not None and hasattr(sampler, "load_state_dict"):
        sampler.load_state_dict(state)
