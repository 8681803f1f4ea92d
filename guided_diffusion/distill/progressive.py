"""Step (progressive) distillation (Salimans & Ho 2022) with RDD's relational terms (Feng et al. 2024).

The student (half the teacher's DDIM steps) learns in one DDIM step what the teacher does in two. For
z_t = q(z_t | x_0) at a student-grid step t, the teacher takes two deterministic DDIM steps t -> t' -> t''
on its own grid (t' the one teacher step between, t'' the student's next step, or the clean image when t is
the student's lowest step), and the target x~ is the x_0 for which one student DDIM step from z_t lands on
the teacher's z_{t''}:

    x~ = (z_{t''} - r z_t) / (sqrt(a_{t''}) - r sqrt(a_t)),   r = sqrt(1 - a_{t''}) / sqrt(1 - a_t)

(a = alpha-bar). The loss is the squared error between the student's output and x~ read in the
`student_prediction` parameterisation (eps, x0 or v, each converted from the network's own head, so a
copy of an eps teacher gives the teacher's step whatever the choice): eps and v errors are the x_0 error
times snr and snr + 1, and x0 takes PD's truncated-SNR weight max(snr, 1); `loss_weighting` overrides it.
`RelationalTerm` adds RDD's relational losses, on UNet features or on a frozen
classifier's features of x~ and the student's x_0; the same term plugs into DKDM's `KDTrainLoop`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..config import resolve_with_defaults
from ..gaussian_diffusion import ModelMeanType
from ..nn import mean_flat
from ..train_util import TrainLoop
from .objective import FeatureProbe
from .relational import RelationalTerm
from .targets import ddim_target, snr_weight, x0_to_prediction

if TYPE_CHECKING:
    import argparse

    from omegaconf import DictConfig

PREDICTIONS = ("eps", "x0", "v")
WEIGHTINGS = ("auto", "truncated_snr", "snr", "snr_plus_one", "none")


def defaults() -> dict[str, Any]:
    """Every `step_distill:` YAML knob with its default (source noted beside each)."""
    return {
        "student_prediction": "eps",  # space of the loss: "eps", "x0" or "v" (docs/RESULTS.md measures the 3)
        "loss_weighting": "auto",  # "auto": that space's MSE (x0: PD's max(snr, 1)); else an x_0-error weight
        "teacher_clip": False,  # clip the teacher's x_0 to [-1, 1] in its two DDIM steps (authors: no)
        "init_from_teacher": True,  # PD: the student starts as a copy of its teacher (unless resuming)
        "classifier_path": "",  # RDD classifier (scripts/classifier_train.py) for feature_source classifier
    }


def resolve_step_distill_config(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`config` over the defaults, checked: unknown keys and bad choices raise a one-line ValueError."""
    resolved = resolve_with_defaults(dict(config or {}), defaults(), "step_distill", "its section")
    if resolved["student_prediction"] not in PREDICTIONS:
        raise ValueError(
            f"step_distill: student_prediction must be one of {PREDICTIONS}, "
            f"got {resolved['student_prediction']!r}"
        )
    if resolved["loss_weighting"] not in WEIGHTINGS:
        raise ValueError(
            f"step_distill: loss_weighting must be one of {WEIGHTINGS}, got {resolved['loss_weighting']!r}"
        )
    return resolved


def check_same_head(teacher_diffusion: Any, student_diffusion: Any) -> None:
    """A student initialised from its teacher must read the copied output head the same way (eps or x0):
    `student_prediction` converts it, `predict_xstart` would reinterpret it."""
    heads = {ModelMeanType.START_X: "x0", ModelMeanType.EPSILON: "eps"}
    teacher, student = (heads.get(d.model_mean_type) for d in (teacher_diffusion, student_diffusion))
    if teacher is None or student is None:
        raise ValueError("step_distill: teacher and student must predict eps or x0 (predict_xstart)")
    if teacher != student:
        raise ValueError(
            f"step_distill: the student starts from a teacher whose head predicts {teacher} but its "
            f"predict_xstart reads it as {student}; set student predict_xstart to {teacher == 'x0'} and "
            f"choose the loss's parameterisation with step_distill.student_prediction"
        )


def _timestep_map(diffusion: Any) -> list[int]:
    return list(getattr(diffusion, "timestep_map", range(diffusion.num_timesteps)))


def teacher_step_plan(teacher_diffusion: Any, student_diffusion: Any) -> torch.Tensor:
    """For each student step i, the teacher-grid index of the same timestep; the teacher steps from there
    twice (once at the lowest student step when it is also the teacher's lowest). Raises ValueError when
    the grids do not nest as N -> N/2 (e.g. trailing8 -> trailing4, or ddim8 -> ddim4, of one chain)."""
    teacher_map, student_map = _timestep_map(teacher_diffusion), _timestep_map(student_diffusion)
    if not all(s in teacher_map for s in student_map):
        raise ValueError(
            f"step_distill: student steps {student_map} are not all on the teacher grid "
            f"{teacher_map}; use timestep_respacing trailingN (teacher) and trailing(N/2) (student)"
        )
    index = [teacher_map.index(s) for s in student_map]
    if index[0] > 1 or any(b - a != 2 for a, b in zip(index, index[1:], strict=False)):
        raise ValueError(
            f"step_distill: each student step must span two teacher steps, got teacher indices "
            f"{index} for student steps {student_map} (teacher grid {teacher_map})"
        )
    if not torch.allclose(
        torch.from_numpy(teacher_diffusion.alphas_cumprod[index]),
        torch.from_numpy(student_diffusion.alphas_cumprod),
    ):
        raise ValueError("step_distill: teacher and student use different noise schedules at the same steps")
    return torch.tensor(index, dtype=torch.long)


class StepDistiller:
    """The teacher's two DDIM steps and the step-distillation loss for a student on the halved grid."""

    def __init__(
        self,
        teacher: nn.Module,
        teacher_diffusion: Any,
        student_diffusion: Any,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.config = resolve_step_distill_config(config)
        self.teacher = teacher
        self.teacher_diffusion = teacher_diffusion
        self.student_diffusion = student_diffusion
        self.plan = teacher_step_plan(teacher_diffusion, student_diffusion)

    @torch.no_grad()
    def teacher_two_steps(
        self,
        z_t: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict | None = None,
        probe: FeatureProbe | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's z at the student's next step (two DDIM steps from z_t, or one to x_0 at the
        lowest step) and its x_0 prediction at z_t. `probe` (wrapping the teacher) keeps its z_t features."""
        model = probe or self.teacher
        clip = self.config["teacher_clip"]
        j = self.plan.to(t.device)[t]
        first = self.teacher_diffusion.ddim_sample(
            model, z_t, j, clip_denoised=clip, model_kwargs=model_kwargs
        )
        j2 = (j - 1).clamp_min(0)
        second = self.teacher_diffusion.ddim_sample(
            self.teacher, first["sample"], j2, clip_denoised=clip, model_kwargs=model_kwargs
        )
        done = (j == 0).view(-1, *([1] * (z_t.dim() - 1)))
        return torch.where(done, first["sample"], second["sample"]), first["pred_xstart"]

    def losses(
        self,
        student: nn.Module,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict | None = None,
        noise: torch.Tensor | None = None,
        relational: RelationalTerm | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-item `loss` (weighted x_0 MSE plus the relational loss when given), `mse`, and the detached
        relational terms (`rel_*`)."""
        model_kwargs = model_kwargs or {}
        if noise is None:
            noise = torch.randn_like(x_start)
        z_t = self.student_diffusion.q_sample(x_start, t, noise=noise)
        use_unet = relational is not None and relational.needs_features
        teacher_probe = FeatureProbe(self.teacher, use_unet)
        z_next, _ = self.teacher_two_steps(z_t, t, model_kwargs, teacher_probe)
        target = ddim_target(self.student_diffusion, z_t, t, z_next)
        student_probe = FeatureProbe(student, use_unet)
        out = self.student_diffusion.p_mean_variance(
            student_probe, z_t, t, clip_denoised=False, model_kwargs=model_kwargs
        )
        mse = mean_flat((out["pred_xstart"].float() - target.float()) ** 2)
        terms = {"mse": mse.detach()}
        loss = self.weighted_error(out["pred_xstart"], target, z_t, t)
        if relational is not None:
            rel = relational.compare(
                student_feats=student_probe.features,
                teacher_feats=teacher_probe.features,
                student_x0=out["pred_xstart"],
                teacher_x0=target,
            )
            loss = loss + rel["loss"]
            terms.update({f"rel_{k}": v.detach() for k, v in rel.items()})
        terms["loss"] = loss
        return terms

    def prediction(self, x0: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """An x_0 at z_t read as the student's `student_prediction` (float64)."""
        return x0_to_prediction(self.student_diffusion, x0, z_t, t, self.config["student_prediction"])

    def weighted_error(
        self, x0: torch.Tensor, target: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """Per-item loss of the student's x_0 against x~: with "auto", the MSE in the eps or v space (the x_0
        error times snr or snr + 1) or, for x0, PD's truncated-SNR weight on the x_0 MSE; else the x_0 MSE
        times the named `loss_weighting`."""
        weighting = self.config["loss_weighting"]
        if weighting == "auto" and self.config["student_prediction"] != "x0":
            err = self.prediction(x0, z_t, t) - self.prediction(target, z_t, t)
            return mean_flat(err.float() ** 2)
        mse = mean_flat((x0.float() - target.float()) ** 2)
        weighting = "truncated_snr" if weighting == "auto" else weighting  # PD's, for x0
        return snr_weight(self.student_diffusion, t, weighting) * mse


class StepDistillLoop(TrainLoop):
    """`TrainLoop` on x_0 batches from `data` with the step-distillation loss (and the relational term):
    checkpoints, EMA, resume and logging as every loop; the relational head/memory live in the opt file."""

    def __init__(
        self,
        *,
        teacher: nn.Module,
        teacher_diffusion: Any,
        step_config: Mapping[str, Any] | None = None,
        relational: RelationalTerm | None = None,
        **kwargs: Any,
    ) -> None:
        self.distiller = StepDistiller(teacher, teacher_diffusion, kwargs["diffusion"], step_config)
        self.relational = relational
        super().__init__(**kwargs)

    def compute_losses(
        self, batch: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Step-distillation loss at uniformly drawn student steps (schedule sampler weights applied)."""
        t, weights = self.schedule_sampler.sample(batch.shape[0], batch.device)
        terms = self.distiller.losses(self.ddp_model, batch, t, model_kwargs=cond, relational=self.relational)
        loss = terms["loss"] * weights
        logged = {k: v.detach() for k, v in terms.items()}
        logged["t"] = t
        return loss.mean(), logged

    def extra_params(self) -> dict[str, nn.Module]:
        """The relational head and pixel memory (if any): trained with the student, kept in the opt file."""
        return {"relational": self.relational} if self.relational is not None else {}

    def extra_state(self) -> dict:
        """The teacher grid this student was distilled against, checked on resume."""
        return {"teacher_plan": self.distiller.plan.tolist()}

    def load_extra_state(self, state: dict) -> None:
        """Refuse to resume a run distilled against a different teacher grid."""
        saved = state.get("teacher_plan")
        if saved is not None and saved != self.distiller.plan.tolist():
            raise ValueError(
                f"step_distill: resumed run used teacher grid indices {saved}, this one "
                f"{self.distiller.plan.tolist()}"
            )


# --------------------------------------------------------------------------------------------- builders


def add_step_distill_arguments(parser: argparse.ArgumentParser) -> None:
    """Stage flags of scripts/step_distill.py: `--teacher_path`, `--teacher_steps`, `--classifier_path`."""
    parser.add_argument("--teacher_path", default=None, help="stage teacher (and the student's start)")
    parser.add_argument("--teacher_steps", type=int, default=None, help="N: grids trailingN / trailing(N/2)")
    parser.add_argument("--classifier_path", default=None, help="RDD classifier file (classifier source)")


def apply_stage_overrides(
    cfg: DictConfig, teacher_path: str | None = None, teacher_steps: int | None = None
) -> None:
    """Point a stage at its teacher: `teacher_path` becomes teacher.model_path (and the student's start);
    `teacher_steps` N sets the grids to trailingN (teacher) and trailing(N/2) (student)."""
    if teacher_path:
        cfg.teacher.model_path = teacher_path
        cfg.student.model_path = ""
    if teacher_steps:
        if teacher_steps < 2 or teacher_steps % 2:
            raise ValueError(f"--teacher_steps must be an even number >= 2, got {teacher_steps}")
        from ..respace import space_timesteps

        for section, steps in ((cfg.teacher, teacher_steps), (cfg.student, teacher_steps // 2)):
            try:
                space_timesteps(section.diffusion_steps, f"trailing{steps}")
            except ValueError as exc:
                raise ValueError(f"--teacher_steps {teacher_steps}: {exc}") from None
            section.timestep_respacing = f"trailing{steps}"
