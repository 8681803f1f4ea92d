"""DKDM distillation: the student's loop fed by the dynamic batch, and the builders the scripts share.

`KDTrainLoop` plugs into `TrainLoop`'s hooks: batches come from a `DynamicBatch`, the loss is the diffusion's
`training_losses_kd`, the pool is saved as `teacher-state-NNNNNN.cache` with every checkpoint and restored on
resume. Further objectives (TCCD, relational terms) register as `extra_losses` instead of copying the loop.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import torch

from .. import dist_util, logger
from ..infra.compile_util import fast_frozen
from ..infra.mixed_precision import resolve_precision
from ..run_setup import build_model_and_diffusion, load_model_weights
from ..train_util import TrainLoop
from .dkdm.pool import ITERATIVE, DynamicBatch

POOL_PATTERN = "teacher-state-{step:06d}.cache"
TEACHER_PREFIX = "teacher_"


class KDSetupError(ValueError):
    """Teacher and student (or their configs) cannot be distilled together; the message says why."""


class ExtraLoss(Protocol):
    """A term added to the DKDM loss: `loss(loop, batch)` returns per-item or scalar tensors by name; the
    entry "loss" is added (item-weighted) to the objective, all entries are logged as `<name>_<key>`.
    `parameters()` are trained with the student; `needs_features` asks for the student's features."""

    needs_features: bool

    def __call__(self, loop: KDTrainLoop, batch: dict[str, Any]) -> dict[str, torch.Tensor]: ...

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...


class _StudentProbe:
    """Calls the student like `training_losses_kd` does and keeps its raw output (and features if asked)."""

    def __init__(self, model: torch.nn.Module, with_features: bool) -> None:
        self.model = model
        self.with_features = with_features
        self.output: torch.Tensor | None = None
        self.features: dict[str, Any] | None = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.with_features:
            self.output, self.features = self.model(x, t, return_features=True, **kwargs)
        else:
            self.output = self.model(x, t, **kwargs)
        return self.output


class _PoolRNG:
    """Exposes the pool's generator states as TrainLoop's per-rank "data" state (saved in the opt file)."""

    def __init__(self, pool: DynamicBatch) -> None:
        self.pool = pool

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.pool.rng_state()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.pool.load_rng_state(state)


class KDTrainLoop(TrainLoop):
    """The DKDM student loop: draws from `dynamic_batch`, trains on `training_losses_kd` toward the teacher.

    `batch_size` (per rank) must equal the pool's batch size; `tempfile` is the pool's start cache (prepared
    there if absent). `cache_save_interval` > 0 also writes the pool every that many steps between
    checkpoints. `student_clip_denoised` clamps the student's x0 in the vb term as the teacher's step does
    (the authors' flag, off by default as in their loop; docs/DKDM.md). Remaining keyword arguments go to
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
        extra_losses: Mapping[str, ExtraLoss] | None = None,
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
        self.input_perturb = float(input_perturb)
        self.student_clip_denoised = bool(student_clip_denoised)
        self.cache_save_interval = int(cache_save_interval)
        self.extra_losses: dict[str, ExtraLoss] = dict(extra_losses or {})
        self._probe: _StudentProbe | None = None
        super().__init__(data=_PoolRNG(dynamic_batch), **kwargs)
        if dynamic_batch.total_t is None:
            dynamic_batch.setup(tempfile)
        # after any preparation (shrinking chunks): the draws call the teacher at one batch size
        dynamic_batch.teacher = fast_frozen(
            dynamic_batch.teacher, self.fast, static_shapes=True, name="teacher UNet"
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
        """DKDM's `training_losses_kd` (masked by the pool's keep weights) plus every registered extra."""
        kd = self.unpack(batch, cond)
        needs_features = any(getattr(extra, "needs_features", False) for extra in self.extra_losses.values())
        self._probe = _StudentProbe(self.ddp_model, needs_features)
        losses = self.diffusion.training_losses_kd(
            self._probe, kd["x_tm1"], kd["x_t"], kd["t"], kd["teacher_out"],
            model_kwargs=kd["model_kwargs"], clip_denoised=self.student_clip_denoised,
            input_perturb=self.input_perturb,
        )
        weights = kd["weights"]
        total = losses["loss"] * weights
        terms = {k: v.detach() for k, v in losses.items()}
        kd.update(student_output=self._probe.output, student_features=self._probe.features, terms=terms)
        for name, extra in self.extra_losses.items():
            for key, value in extra(self, kd).items():
                if key == "loss":
                    total = total + (value * weights if value.ndim == 1 else value)
                terms[f"{name}_{key}"] = value.detach()
        terms["t"] = kd["t"]
        return total.mean(), terms

    def unpack(self, batch: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """The microbatch as a dict: x_t, t, x_tm1, teacher_out (p_mean_variance keys), weights,
        model_kwargs (whatever else `cond` holds, e.g. class labels)."""
        own = {"t", "x_tm1", "weights"}
        return {
            "x_t": batch,
            "t": cond["t"],
            "x_tm1": cond["x_tm1"],
            "weights": cond["weights"],
            "teacher_out": {
                k[len(TEACHER_PREFIX) :]: v for k, v in cond.items() if k.startswith(TEACHER_PREFIX)
            },
            "model_kwargs": {
                k: v for k, v in cond.items() if k not in own and not k.startswith(TEACHER_PREFIX)
            },
        }

    def extra_params(self) -> dict[str, torch.nn.Module]:
        """Trainable extra losses (nn.Modules among `extra_losses`) are optimized and saved with the model."""
        return {name: m for name, m in self.extra_losses.items() if isinstance(m, torch.nn.Module)}

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


# --------------------------------------------------------------------------------------------- builders


def kd_loop_for(cfg: Mapping[str, Any]) -> tuple[type[KDTrainLoop], dict[str, Any]]:
    """The loop class for a KD config and its method keyword arguments: with a `tccd:` section the TCCD
    loop (`tccd_util.TCCDTrainLoop`, docs/tccd.md), otherwise plain DKDM."""
    if "tccd" in cfg:
        from .tccd_loop import TCCDTrainLoop

        return TCCDTrainLoop, {"tccd_config": dict(cfg["tccd"])}
    return KDTrainLoop, {}


def check_diffusions(teacher_diffusion: Any, student_diffusion: Any) -> None:
    """Teacher and student may differ in respacing only if they keep the same number of steps T."""
    t_teacher, t_student = teacher_diffusion.num_timesteps, student_diffusion.num_timesteps
    if t_teacher != t_student:
        raise KDSetupError(
            f"teacher diffusion has T={t_teacher} steps but the student's has T={t_student}; DKDM trains the "
            "student on the teacher's own steps, so set the same timestep_respacing/diffusion_steps"
        )


def check_sections(teacher: Mapping[str, Any], student: Mapping[str, Any]) -> None:
    """Pixel-space distillation needs the same image size, no class conditioning (as the authors)."""
    if teacher["image_size"] != student["image_size"]:
        raise KDSetupError(
            f"teacher image_size {teacher['image_size']} != student image_size {student['image_size']}"
        )
    if teacher["class_cond"] or student["class_cond"]:
        raise KDSetupError("class-conditional DKDM is not supported (class_cond must be false)")


def load_teacher(section: Mapping[str, Any], device: torch.device) -> tuple[torch.nn.Module, Any]:
    """Build the teacher from its section and load `model_path` strictly; frozen, in eval mode."""
    if not section["model_path"]:
        raise KDSetupError("teacher.model_path is empty: DKDM needs a pretrained teacher checkpoint")
    model, diffusion = build_model_and_diffusion(section, device)
    load_model_weights(model, section["model_path"], section)
    model.eval().requires_grad_(False)
    return model, diffusion


def make_dynamic_batch(
    teacher_section: Mapping[str, Any],
    student_section: Mapping[str, Any],
    teacher: torch.nn.Module,
    teacher_diffusion: Any,
    student_diffusion: Any,
    device: torch.device,
) -> DynamicBatch:
    """The pool for this rank from the config: B = student.batch_size / world size, rho = teacher.BATCH."""
    world = dist_util.get_world_size()
    return DynamicBatch(
        teacher,
        teacher_diffusion,
        batch_size=student_section["batch_size"] // world,
        image_shape=(3, teacher_section["image_size"], teacher_section["image_size"]),
        iter_choice=teacher_section["iter_choice"],
        rho=teacher_section["BATCH"],
        student_timesteps=student_diffusion.num_timesteps,
        prob=teacher_section["prob"],
        prob_per_item=teacher_section["prob_per_item"],
        teacher_batch_size=teacher_section["batch_size"],
        clip_denoised=teacher_section["clip_denoised"],
        precision=resolve_precision(teacher_section["precision"], teacher_section["use_fp16"]),
        device=device,
        rank=dist_util.get_rank(),
        world_size=world,
        seed=student_section["seed"],
    )


def check_tempfile(teacher_section: Mapping[str, Any]) -> str:
    """The pool cache path, required for every mode that prepares a pool; a path to be written must be in a
    writable folder."""
    path = str(teacher_section["tempfile"])
    if not path and teacher_section["iter_choice"] != ITERATIVE:
        raise KDSetupError(f"teacher.tempfile is empty; {teacher_section['iter_choice']} needs a cache path")
    if path and not os.path.exists(path):
        # the pool is written here after it is computed: find out now, not after the teacher's work
        folder = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise KDSetupError(f"teacher.tempfile {path}: cannot create its folder: {exc.strerror}") from None
        if not os.access(folder, os.W_OK):
            raise KDSetupError(f"teacher.tempfile {path}: its folder {folder} is not writable")
    return path
