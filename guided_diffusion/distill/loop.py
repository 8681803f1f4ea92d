"""The pool-fed distillation loop: batches from DKDM's dynamic pool, the loss a sum of objectives.

`KDTrainLoop` plugs into `TrainLoop`'s hooks. Every step draws the pool once; the base objective (DKDM's
`training_losses_kd`, or one that replaces it, such as TCCD's) runs the student and the extra objectives
(relational terms, ...) add to it through the one interface of `objective.py`. The pool is saved as
`teacher-state-NNNNNN.cache` with every checkpoint and restored on resume; objectives that are modules are
optimized with the student and kept in the opt file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from .. import logger
from ..infra.compile_util import fast_frozen
from ..train_util import TrainLoop
from .dkdm.objective import DKDMObjective
from .dkdm.pool import DynamicBatch
from .dkdm.setup import KDSetupError, check_diffusions
from .objective import Objective

POOL_PATTERN = "teacher-state-{step:06d}.cache"
TEACHER_PREFIX = "teacher_"


class _PoolRNG:
    """Exposes the pool's generator states as TrainLoop's per-rank "data" state (saved in the opt file)."""

    def __init__(self, pool: DynamicBatch) -> None:
        self.pool = pool

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.pool.rng_state()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.pool.load_rng_state(state)


class KDTrainLoop(TrainLoop):
    """The DKDM student loop: draws from `dynamic_batch` and trains on the sum of its objectives.

    `objectives` maps section names to objectives. Unless one of
    them is a base objective (`base = True`, e.g. TCCD's), DKDM's own `DKDMObjective` is the base, built
    from `input_perturb` and `student_clip_denoised`. `batch_size` (per rank) must equal the pool's batch
    size; `tempfile` is the pool's start cache (prepared there if absent). `cache_save_interval` > 0 also
    writes the pool every that many steps between checkpoints. Remaining keyword arguments go to
    `TrainLoop`.
    """

    def __init__(
        self,
        *,
        teacher: torch.nn.Module,
        teacher_diffusion: Any,
        dynamic_batch: DynamicBatch,
        tempfile: str = "",
        input_perturb: float = 0.0,
        student_clip_denoised: bool = False,
        cache_save_interval: int = -1,
        objectives: Mapping[str, Objective] | None = None,
        **kwargs: Any,
    ) -> None:
        student_diffusion = kwargs["diffusion"]
        check_diffusions(teacher_diffusion, student_diffusion)
        if dynamic_batch.batch_size != kwargs["batch_size"]:
            raise KDSetupError(
                f"the dynamic batch draws {dynamic_batch.batch_size} items per step but the loop's "
                f"batch_size is {kwargs['batch_size']}"
            )
        self.teacher = teacher
        self.teacher_diffusion = teacher_diffusion
        self.dynamic_batch = dynamic_batch
        self.cache_save_interval = int(cache_save_interval)
        named = dict(objectives or {})
        bases = [name for name, obj in named.items() if obj.base]
        if len(bases) > 1:
            raise KDSetupError(f"objectives {bases} each replace the DKDM term; use one of them")
        if bases:
            self.base_name = bases[0]
            self.base = named.pop(self.base_name)
        else:
            self.base_name = "dkdm"
            self.base = DKDMObjective(student_diffusion, input_perturb, student_clip_denoised)
        self.extras = named
        self.base.keep_features = any(obj.needs_features for obj in self.extras.values())
        super().__init__(data=_PoolRNG(dynamic_batch), **kwargs)
        if dynamic_batch.total_t is None:
            dynamic_batch.setup(tempfile)
        # after any in-process preparation (eager): the draws call the teacher at one batch size
        dynamic_batch.teacher = fast_frozen(
            dynamic_batch.teacher, self.fast, name="teacher UNet"
        )

    # ----------------------------------------------------------------------------------------- hooks

    def next_batch(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Advance the pool one draw; return x_t and the rest flattened into per-item tensors (`cond`)."""
        drawn = self.dynamic_batch.draw()
        keep = drawn["weights"]
        cond = {
            "t": drawn["t"],
            "x_tm1": drawn["x_tm1"],
            # normalized so that the batch mean of loss * weights is the mean over the kept items
            "weights": keep / keep.mean().clamp_min(1.0 / keep.numel()),
        }
        cond.update({TEACHER_PREFIX + k: v for k, v in drawn["teacher_out"].items()})
        cond.update(drawn["model_kwargs"])
        return drawn["x_t"], cond

    def compute_losses(
        self, batch: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The base objective, then every extra; per-item losses are weighted by the pool's keep weights
        and averaged, scalar ones added. Logs the base terms as they are and the extras as
        `<section>_<key>`."""
        kd = self.unpack(batch, cond)
        weights = kd["weights"]
        per_item: torch.Tensor | None = None
        scalar: torch.Tensor | None = None
        terms: dict[str, torch.Tensor] = {}
        for name, objective in [(self.base_name, self.base), *self.extras.items()]:
            out = objective(self.ddp_model, kd)
            loss = out["loss"]
            if loss.ndim == 1:
                per_item = loss * weights if per_item is None else per_item + loss * weights
            else:
                scalar = loss if scalar is None else scalar + loss
            prefix = "" if objective is self.base else f"{name}_"
            terms.update({prefix + k: v.detach() for k, v in out.items()})
        if per_item is not None:
            total = per_item.mean() if scalar is None else per_item.mean() + scalar
        else:
            total = scalar
        terms["t"] = kd["t"]
        return total, terms

    def unpack(self, batch: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """The microbatch as an objective's `batch`: x_t, t, x_tm1, teacher_out (p_mean_variance keys),
        weights, step, model_kwargs (whatever else `cond` holds, e.g. class labels)."""
        own = {"t", "x_tm1", "weights"}
        return {
            "x_t": batch,
            "t": cond["t"],
            "x_tm1": cond["x_tm1"],
            "weights": cond["weights"],
            "step": self.step,
            "teacher_out": {
                k[len(TEACHER_PREFIX) :]: v for k, v in cond.items() if k.startswith(TEACHER_PREFIX)
            },
            "model_kwargs": {
                k: v for k, v in cond.items() if k not in own and not k.startswith(TEACHER_PREFIX)
            },
        }

    def extra_params(self) -> dict[str, torch.nn.Module]:
        """Objectives that are modules: optimized with the student, kept in the opt file."""
        objectives = {self.base_name: self.base, **self.extras}
        return {name: obj for name, obj in objectives.items() if isinstance(obj, torch.nn.Module)}

    def extra_state(self) -> dict:
        """The pool's mode and per-rank size; on resume the mode must match and the teacher-state file must
        hold exactly ranks x size items (`load_extra_state`)."""
        return {"iter_choice": self.dynamic_batch.iter_choice, "pool_items": self.dynamic_batch.size}

    def load_extra_state(self, state: dict) -> None:
        """Restore the pool from the resumed set's teacher-state cache (this rank's slice)."""
        if state.get("iter_choice", self.dynamic_batch.iter_choice) != self.dynamic_batch.iter_choice:
            raise KDSetupError(
                f"resumed run used iter_choice {state['iter_choice']}, this one "
                f"{self.dynamic_batch.iter_choice}"
            )
        path = self.resume_files["pool"]
        logger.log(f"restoring the dynamic batch from {path}")
        self.dynamic_batch.load_slice(path, exact=True)

    def load_authors_extra_state(self) -> None:
        """An authors' run dir: the pool from its `teacher-state-NNNNNN.cache` beside the resumed model, as
        their loader does, else from `teacher.tempfile` as a fresh start."""
        if "pool" in self.resume_files:
            self.load_extra_state({})
        else:
            logger.warn("no teacher-state cache beside the resumed checkpoint: the pool starts from "
                        "teacher.tempfile, as the authors' loader does")

    def save_extra_files(self, step: int) -> list[str]:
        """Write the pool (all ranks gathered) as `teacher-state-NNNNNN.cache` beside the checkpoint."""
        path = os.path.join(self.run_dir, POOL_PATTERN.format(step=step))
        self.dynamic_batch.save(path, checksum=True)
        return [path]

    def required_resume_patterns(self) -> dict[str, str]:
        """A resumable DKDM checkpoint set includes the pool file."""
        return {"pool": POOL_PATTERN}

    def run_step(self, batch: torch.Tensor, cond: dict) -> None:
        """One optimizer step; between checkpoints, also write the pool every `cache_save_interval` steps."""
        super().run_step(batch, cond)
        at_checkpoint = bool(self.save_interval) and self.step % self.save_interval == 0
        if self.cache_save_interval > 0 and self.step % self.cache_save_interval == 0 and not at_checkpoint:
            path = os.path.join(self.run_dir, POOL_PATTERN.format(step=self.step))
            self.dynamic_batch.save(path, checksum=True)
