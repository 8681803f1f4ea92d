"""Step (progressive) distillation (Salimans & Ho 2022) with RDD's relational terms (Feng et al. 2024).

The student (half the teacher's DDIM steps) learns in one DDIM step what the teacher does in two. For
z_t = q(z_t | x_0) at a student-grid step t, the teacher takes two deterministic DDIM steps t -> t' -> t''
on its own grid (t' the one teacher step between, t'' the student's next step, or the clean image when t is
the student's lowest step), and the target x~ is the x_0 for which one student DDIM step from z_t lands on
the teacher's z_{t''}:

    x~ = (z_{t''} - r z_t) / (sqrt(a_{t''}) - r sqrt(a_t)),   r = sqrt(1 - a_{t''}) / sqrt(1 - a_t)

(a = alpha-bar). The loss is w(t) * ||x0_student(z_t) - x~||^2 with PD's truncated-SNR weight
w = max(snr, 1) by default. `RelationalTerm` adds RDD's relational losses, on UNet features or on a frozen
classifier's features of x~ and the student's x_0; the same term plugs into DKDM's `KDTrainLoop`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import dist_util, logger
from ..gaussian_diffusion import ModelMeanType
from ..nn import mean_flat
from ..train_util import TrainLoop, loop_kwargs
from .relational import RelationalLoss, select_unet_feature, unet_feature_channels

if TYPE_CHECKING:
    import argparse

    from omegaconf import DictConfig

PREDICTIONS = ("x0", "eps")
WEIGHTINGS = ("truncated_snr", "snr", "none")


def step_distill_defaults() -> dict[str, Any]:
    """Every `step_distill:` YAML knob with its default (source noted beside each)."""
    return {
        "student_prediction": "eps",  # network output: "x0" needs student.predict_xstart true; "eps" false
        "loss_weighting": "truncated_snr",  # PD: max(snr, 1) on the x_0 error; "snr" = eps MSE; "none"
        "teacher_clip": True,  # clip the teacher's x_0 to [-1, 1] in its two DDIM steps (as its sampler)
        "init_from_teacher": True,  # PD: the student starts as a copy of its teacher (unless resuming)
        "classifier_path": "",  # RDD classifier (scripts/classifier_train.py) for feature_source classifier
    }


def resolve_step_distill_config(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`config` over the defaults, checked: unknown keys and bad choices raise a one-line ValueError."""
    resolved = step_distill_defaults()
    for key, value in (config or {}).items():
        if key not in resolved:
            raise ValueError(f"step_distill: unknown key {key!r} (known: {', '.join(sorted(resolved))})")
        resolved[key] = value
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


def check_prediction(student_diffusion: Any, prediction: str) -> None:
    """The student's network output must be what `student_prediction` says (x0 or eps)."""
    actual = {ModelMeanType.START_X: "x0", ModelMeanType.EPSILON: "eps"}.get(
        student_diffusion.model_mean_type
    )
    if actual != prediction:
        raise ValueError(
            f"step_distill: student_prediction {prediction!r} but the student's diffusion predicts "
            f"{actual or student_diffusion.model_mean_type}; set student predict_xstart to "
            f"{prediction == 'x0'}"
        )


def _timestep_map(diffusion: Any) -> list[int]:
    return list(getattr(diffusion, "timestep_map", range(diffusion.num_timesteps)))


def teacher_step_plan(teacher_diffusion: Any, student_diffusion: Any) -> torch.Tensor:
    """For each student step i, the teacher-grid index of the same timestep; the teacher steps from there
    twice (once at the lowest student step when it is also the teacher's lowest). Raises ValueError when
    the grids do not nest as N -> N/2 (e.g. ddim8 -> ddim4 of the same chain)."""
    teacher_map, student_map = _timestep_map(teacher_diffusion), _timestep_map(student_diffusion)
    if not all(s in teacher_map for s in student_map):
        raise ValueError(
            f"step_distill: student steps {student_map} are not all on the teacher grid "
            f"{teacher_map}; use timestep_respacing ddimN (teacher) and ddim(N/2) (student)"
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


def _gather64(table: Any, t: torch.Tensor, ndim: int) -> torch.Tensor:
    values = torch.as_tensor(table, dtype=torch.float64, device=t.device)[t]
    return values.view(-1, *([1] * (ndim - 1)))


def ddim_target(
    student_diffusion: Any, z_t: torch.Tensor, t: torch.Tensor, z_next: torch.Tensor
) -> torch.Tensor:
    """x~ such that one deterministic DDIM step of `student_diffusion` from z_t at step t with x_0 = x~
    gives `z_next` (computed in float64, returned in z_t's dtype)."""
    a_t = _gather64(student_diffusion.alphas_cumprod, t, z_t.dim())
    a_next = _gather64(student_diffusion.alphas_cumprod_prev, t, z_t.dim())
    r = torch.sqrt(1 - a_next) / torch.sqrt(1 - a_t)
    target = (z_next.double() - r * z_t.double()) / (torch.sqrt(a_next) - r * torch.sqrt(a_t))
    return target.to(z_t.dtype)


def snr_weight(student_diffusion: Any, t: torch.Tensor, weighting: str) -> torch.Tensor:
    """Per-item weight on the x_0 error: max(snr, 1) ("truncated_snr", PD), snr ("snr") or 1 ("none")."""
    a_t = torch.as_tensor(student_diffusion.alphas_cumprod, dtype=torch.float64, device=t.device)[t]
    snr = a_t / (1 - a_t)
    if weighting == "truncated_snr":
        return snr.clamp_min(1.0).float()
    if weighting == "snr":
        return snr.float()
    return torch.ones_like(snr, dtype=torch.float32)


class FeatureProbe:
    """Calls a UNet (with `return_features` when `keep`) and remembers its features of the last call."""

    def __init__(self, model: nn.Module, keep: bool) -> None:
        self.model = model
        self.keep = keep
        self.features: dict[str, Any] | None = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if not self.keep:
            return self.model(x, t, **kwargs)
        out, self.features = self.model(x, t, return_features=True, **kwargs)
        return out


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
        check_prediction(student_diffusion, self.config["student_prediction"])
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
        loss = snr_weight(self.student_diffusion, t, self.config["loss_weighting"]) * mse
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


def pred_xstart_from_output(
    diffusion: Any, x_t: torch.Tensor, t: torch.Tensor, raw: torch.Tensor
) -> torch.Tensor:
    """x_0 from a raw network output (x0 or eps mean half; learned-sigma halves dropped), unclipped."""
    out = raw[:, : x_t.shape[1]]
    if diffusion.model_mean_type == ModelMeanType.START_X:
        return out
    if diffusion.model_mean_type != ModelMeanType.EPSILON:
        raise ValueError(f"relational: cannot read x_0 from a {diffusion.model_mean_type} model output")
    a_t = _gather64(diffusion.alphas_cumprod, t, x_t.dim()).to(x_t.dtype)
    return (x_t - torch.sqrt(1 - a_t) * out) / torch.sqrt(a_t)


class RelationalTerm(nn.Module):
    """RDD's relational loss with its feature source: the UNets' own features (teacher vs student at z_t)
    or a frozen classifier applied to the teacher's and the student's x_0. Its trainable head and pixel
    memory are its state (saved in the opt file by the loops); teacher and classifier are not.

    Called as a DKDM extra loss (`loop`, `batch`) it runs the teacher at the batch's x_t for its features.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        student: nn.Module,
        teacher: nn.Module,
        classifier: nn.Module | None = None,
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        self.source = config.get("feature_source", "unet")
        self.unet_feature = config.get("unet_feature", "middle")
        self.needs_features = self.source == "unet"
        if self.source == "classifier":
            if classifier is None:
                raise ValueError(
                    "relational: feature_source 'classifier' needs step_distill.classifier_path "
                    "(or --classifier_path), a file from scripts/classifier_train.py"
                )
            from .classifier import feature_channels

            channels = feature_channels(classifier, image_size or student.image_size)
            s_channels = t_channels = channels
        else:
            s_channels = unet_feature_channels(student.feature_channels(), self.unet_feature)
            t_channels = unet_feature_channels(teacher.feature_channels(), self.unet_feature)
        self.relation = RelationalLoss(s_channels, t_channels, dict(config))
        # Plain tuple: the frozen networks are neither trained nor saved with this module.
        self._frozen = (teacher, classifier)

    def compare(
        self,
        *,
        student_feats: Mapping[str, Any] | None = None,
        teacher_feats: Mapping[str, Any] | None = None,
        student_x0: torch.Tensor | None = None,
        teacher_x0: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Relational terms from UNet feature dicts (unet source) or from x_0 images (classifier source)."""
        if self.needs_features:
            if student_feats is None or teacher_feats is None:
                raise ValueError("relational: unet features were not captured for this batch")
            return self.relation(
                select_unet_feature(student_feats, self.unet_feature),
                select_unet_feature(teacher_feats, self.unet_feature),
            )
        from .classifier import features_and_logits

        classifier = self._frozen[1]
        with torch.no_grad():
            t_map, t_logits = features_and_logits(classifier, teacher_x0.float())
        s_map, s_logits = features_and_logits(classifier, student_x0.float())
        return self.relation(s_map, t_map, s_logits, t_logits)

    def forward(self, loop: Any, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The DKDM extra-loss call: teacher features at the batch's x_t (unet source) or the x_0 of the
        pool's teacher output and of the student's output (classifier source)."""
        x_t, t, kwargs = batch["x_t"], batch["t"], batch["model_kwargs"]
        if self.needs_features:
            probe = FeatureProbe(self._frozen[0], True)
            with torch.no_grad():
                loop.teacher_diffusion.p_mean_variance(probe, x_t, t, model_kwargs=kwargs)
            return self.compare(student_feats=batch["student_features"], teacher_feats=probe.features)
        teacher_eps = batch["teacher_out"]["model_output"]
        return self.compare(
            student_x0=pred_xstart_from_output(loop.diffusion, x_t, t, batch["student_output"]),
            teacher_x0=pred_xstart_from_output(loop.teacher_diffusion, x_t, t, teacher_eps),
        )


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
    """Stage flags of scripts/image_kd.py: `--teacher_path`, `--teacher_steps`, `--classifier_path`."""
    parser.add_argument("--teacher_path", default=None, help="stage teacher (and the student's start)")
    parser.add_argument("--teacher_steps", type=int, default=None, help="N: teacher ddimN, student ddim(N/2)")
    parser.add_argument("--classifier_path", default=None, help="RDD classifier file (classifier source)")


def apply_stage_overrides(
    cfg: DictConfig, teacher_path: str | None = None, teacher_steps: int | None = None
) -> None:
    """Point a stage at its teacher: `teacher_path` becomes teacher.model_path (and the student's start);
    `teacher_steps` N sets the grids to ddimN (teacher) and ddim(N/2) (student)."""
    if teacher_path:
        cfg.teacher.model_path = teacher_path
        cfg.student.model_path = ""
    if teacher_steps:
        if teacher_steps < 2 or teacher_steps % 2:
            raise ValueError(f"--teacher_steps must be an even number >= 2, got {teacher_steps}")
        from ..respace import space_timesteps

        for section, steps in ((cfg.teacher, teacher_steps), (cfg.student, teacher_steps // 2)):
            try:
                space_timesteps(section.diffusion_steps, f"ddim{steps}")
            except ValueError as exc:
                raise ValueError(f"--teacher_steps {teacher_steps}: {exc}") from None
            section.timestep_respacing = f"ddim{steps}"


def build_relational_term(
    cfg: Mapping[str, Any],
    student: nn.Module,
    teacher: nn.Module,
    classifier_path: str = "",
    device: torch.device | str = "cpu",
) -> RelationalTerm | None:
    """The `relational:` section as a term for either loop (None without the section); the classifier is
    loaded from `classifier_path` when the feature source asks for it."""
    if "relational" not in cfg:
        return None
    rel = dict(cfg["relational"])
    classifier = None
    if rel.get("feature_source") == "classifier" and classifier_path:
        from .classifier import load_classifier

        classifier = load_classifier(classifier_path, device)
    return RelationalTerm(rel, student, teacher, classifier).to(device)


def run_step_distill(cfg: DictConfig, args: argparse.Namespace) -> str:
    """Build teacher, student (a copy of the teacher unless student.model_path or resuming), data and
    relational term from a step-distillation config, train, and return the run dir."""
    from ..image_datasets import load_data
    from ..run_setup import build_model_and_diffusion, load_model_weights, start_run
    from .loop import check_sections, load_teacher

    teacher_s, student_s = cfg.teacher, cfg.student
    step_cfg = resolve_step_distill_config(cfg.step_distill)
    classifier_path = getattr(args, "classifier_path", None) or step_cfg["classifier_path"]
    check_sections(teacher_s, student_s)
    run_dir = start_run("step_distill", cfg, args)
    device = dist_util.dev()
    teacher, teacher_diffusion = load_teacher(teacher_s, device)
    student, student_diffusion = build_model_and_diffusion(student_s, device)
    init = student_s.model_path or (teacher_s.model_path if step_cfg["init_from_teacher"] else "")
    if init and not student_s.resume_checkpoint:
        logger.log(f"initializing the student from {init}")
        load_model_weights(student, init)
    relational = build_relational_term(cfg, student, teacher, classifier_path, device)
    per_rank = student_s.batch_size // dist_util.get_world_size()
    data = load_data(
        data_dir=student_s.data_dir,
        batch_size=per_rank,
        image_size=student_s.image_size,
        class_cond=student_s.class_cond,
        seed=student_s.seed,
    )
    StepDistillLoop(
        teacher=teacher,
        teacher_diffusion=teacher_diffusion,
        step_config=step_cfg,
        relational=relational,
        model=student,
        diffusion=student_diffusion,
        data=data,
        batch_size=per_rank,
        **loop_kwargs(student_s, student_diffusion, run_dir),
    ).run_loop()
    logger.log(f"step distillation done; checkpoints in {run_dir}")
    return run_dir
