"""TCCD: time-consistent contrastive distillation on top of the DKDM objective.

Two terms join DKDM's `training_losses_kd`: a timestep-noise alignment (a CLIP-style symmetric InfoNCE between
the student's timestep embedding and an encoding of the noise at the same state, items sharing a timestep
being positives of each other) and interactive guidance (the student takes its own step x_t -> x~_{t-1} and
is trained toward the teacher's prediction there). docs/TCCD.md gives the equations and the knobs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import logger
from ..config import resolve_with_defaults
from .objective import FeatureProbe

NOISE_SOURCES = ("teacher_eps", "student_mid")
MIN_TEMPERATURE = 0.01  # CLIP clamps the logit scale at 100
MAX_TEMPERATURE = 1.0
_KD_KEYS = ("mean", "log_variance", "model_output")

TeacherQuery = Callable[[torch.Tensor, torch.Tensor], Mapping[str, torch.Tensor]]


def defaults() -> dict[str, Any]:
    """Every `tccd:` YAML knob with its default (docs/TCCD.md says why each value)."""
    return {
        "align_weight": 0.1,
        "interactive_weight": 0.5,
        "interactive_prob": 0.5,
        "interactive_every": 0,
        "interactive_seed": 0,
        "noise_source": "teacher_eps",
        "same_t_positives": True,
        "proj_dim": 128,
        "temperature_init": 0.07,
        "encoder_channels": 64,
    }


def resolve_tccd_config(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`config` over the defaults, checked: unknown keys and bad values raise a one-line ValueError."""
    resolved = resolve_with_defaults(dict(config or {}), defaults(), "tccd", "its section")
    checks = [
        ("align_weight", resolved["align_weight"] >= 0, "must be >= 0"),
        ("interactive_weight", resolved["interactive_weight"] >= 0, "must be >= 0"),
        ("interactive_prob", 0 <= resolved["interactive_prob"] <= 1, "must lie in [0, 1]"),
        ("interactive_every", resolved["interactive_every"] >= 0, "must be >= 0"),
        ("noise_source", resolved["noise_source"] in NOISE_SOURCES, f"must be one of {NOISE_SOURCES}"),
        ("proj_dim", resolved["proj_dim"] >= 1, "must be >= 1"),
        (
            "temperature_init",
            MIN_TEMPERATURE <= resolved["temperature_init"] <= MAX_TEMPERATURE,
            f"must lie in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]",
        ),
        ("encoder_channels", resolved["encoder_channels"] >= 1, "must be >= 1"),
    ]
    for key, ok, rule in checks:
        if not ok:
            raise ValueError(f"tccd: {key} {rule}, got {resolved[key]!r}")
    return resolved


# ---------------------------------------------------------------------------------------------------------
# Timestep-noise alignment


def info_nce_timestep(
    emb_z: torch.Tensor,
    noise_z: torch.Tensor,
    t: torch.Tensor,
    logit_scale: torch.Tensor,
    same_t_positives: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Symmetric InfoNCE between timestep-embedding and noise views [N, D] (L2-normalized here).

    logits = exp(clamp(logit_scale, 0, log 100)) * e n^T. The target row of anchor i is uniform over
    {j : t_j == t_i} (just j = i when `same_t_positives` is off); loss = (CE(e->n) + CE(n->e)) / 2.
    """
    if emb_z.dim() != 2 or emb_z.shape != noise_z.shape:
        raise ValueError(f"info_nce_timestep: views must be [N, D] alike, got {tuple(emb_z.shape)} "
                         f"and {tuple(noise_z.shape)}")
    if t.shape != emb_z.shape[:1]:
        raise ValueError(f"info_nce_timestep: t must be [{emb_z.shape[0]}], got {tuple(t.shape)}")
    e = F.normalize(emb_z.float(), dim=1)
    n = F.normalize(noise_z.float(), dim=1)
    scale = logit_scale.float().clamp(0.0, math.log(1.0 / MIN_TEMPERATURE)).exp()
    logits = scale * (e @ n.t())
    if same_t_positives:
        positive = t[:, None] == t[None, :]
    else:
        positive = torch.eye(t.shape[0], dtype=torch.bool, device=t.device)
    targets = positive.float() / positive.sum(dim=1, keepdim=True)
    # `targets` is symmetric, so the noise->emb direction uses the same rows on the transposed logits.
    loss_e2n = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    loss_n2e = -(targets * F.log_softmax(logits.t(), dim=1)).sum(dim=1).mean()
    hit = positive.gather(1, logits.argmax(dim=1, keepdim=True)).float().mean()
    stats = {"align_acc": hit.detach(), "align_temperature": (1.0 / scale).detach()}
    return (loss_e2n + loss_n2e) / 2, stats


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


def _mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    hidden = max(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, out_dim))


class NoiseEncoder(nn.Module):
    """Conv stem + global average pooling + MLP: a vector summary [N, width] of a noise or feature map."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            _group_norm(width),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            _group_norm(width),
            nn.SiLU(),
        )
        self.mlp = _mlp(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode [N, C, H, W] into [N, width]."""
        return self.mlp(self.stem(x).mean(dim=(2, 3)))


class TimestepNoiseAlignment(nn.Module):
    """TCCD stage one: noise encoder, two projection heads and a learnable CLIP logit scale log(1/tau)."""

    def __init__(self, emb_dim: int, noise_channels: int, config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        cfg = resolve_tccd_config(config)
        self.same_t_positives = bool(cfg["same_t_positives"])
        self.encoder = NoiseEncoder(noise_channels, cfg["encoder_channels"])
        self.emb_head = _mlp(emb_dim, cfg["proj_dim"])
        self.noise_head = _mlp(cfg["encoder_channels"], cfg["proj_dim"])
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg["temperature_init"])))

    def forward(
        self, emb: torch.Tensor, noise_input: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Alignment loss between the timestep embeddings [N, E] and the noise inputs [N, C, H, W] at `t`."""
        return info_nce_timestep(
            self.emb_head(emb), self.noise_head(self.encoder(noise_input)), t, self.logit_scale,
            same_t_positives=self.same_t_positives,
        )


# ---------------------------------------------------------------------------------------------------------
# Interactive self-supervised guidance


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A detached tensor usable in autograd (tensors made under inference_mode are copied)."""
    return tensor.clone() if tensor.is_inference() else tensor.detach()


def _select_kwargs(model_kwargs: Mapping[str, Any] | None, keep: torch.Tensor) -> dict[str, Any]:
    return {k: v[keep] for k, v in (model_kwargs or {}).items()}


def _student_step(
    student: Any,
    diffusion: Any,
    x_t: torch.Tensor,
    t: torch.Tensor,
    clip_denoised: bool,
    model_kwargs: Mapping[str, Any] | None,
) -> torch.Tensor:
    """One ancestral step of the student, as `p_sample`, with its log-variance kept in the learned range.

    The learned-range parameterization means [posterior variance, beta_t]; a student that has not learned
    its variance on its own states can output far outside it, and one such step would send x~_{t-1} (and
    the teacher's answer there) to inf. Inside the range this is exactly `p_sample` (same noise draw).
    """
    out = diffusion.p_mean_variance(student, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
    lo, hi = diffusion.learned_log_variance_range(t, x_t.shape)
    log_variance = out["log_variance"].clamp(torch.minimum(lo, hi), torch.maximum(lo, hi))
    noise = torch.randn_like(x_t)
    nonzero = (t != 0).float().view(-1, *([1] * (x_t.dim() - 1)))
    return out["mean"] + nonzero * torch.exp(0.5 * log_variance) * noise


def interactive_inputs(
    student: Any,
    diffusion: Any,
    x_t: torch.Tensor,
    t: torch.Tensor,
    teacher_query: TeacherQuery,
    clip_denoised: bool = True,
    model_kwargs: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """The student's own step x_t -> x~_{t-1} (no gradient) and the teacher's prediction at (x~_{t-1}, t-1).

    Returns (x~_{t-1}, t-1, teacher_out, keep) for the items with t > 0 (`keep` marks them in the batch).
    """
    keep = t > 0
    with torch.no_grad():
        x_prev = _student_step(student, diffusion, x_t, t, clip_denoised, model_kwargs)
        x_sel, t_sel = x_prev[keep], t[keep] - 1
        if x_sel.shape[0] == 0:
            return x_sel, t_sel, {}, keep
        raw = teacher_query(x_sel, t_sel)
    missing = [k for k in _KD_KEYS if k not in raw]
    if missing:
        raise KeyError(f"teacher_query output lacks {missing}; return the teacher's p_mean_variance dict")
    teacher_out = {k: _plain(v) for k, v in raw.items()}
    return x_sel, t_sel, teacher_out, keep


# ---------------------------------------------------------------------------------------------------------
# The bundled loss


class TCCDLoss(nn.Module):
    """DKDM objective + align_weight * L_align + interactive_weight * L_interactive in one student forward.

    The interactive items (x~_{t-1}, t-1) are appended to the DKDM batch so the student runs once with
    gradient (DDP-safe); the alignment uses the captured `feats["emb"]` of the DKDM items.
    """

    def __init__(self, emb_dim: int, noise_channels: int, config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.config = resolve_tccd_config(config)
        self.alignment = (
            TimestepNoiseAlignment(emb_dim, noise_channels, self.config)
            if self.config["align_weight"] > 0
            else None
        )

    @classmethod
    def for_student(cls, student: nn.Module, config: Mapping[str, Any] | None = None) -> TCCDLoss:
        """Size the module from a UNet student: its embedding width and the chosen noise view's channels."""
        cfg = resolve_tccd_config(config)
        channels = student.feature_channels()
        if cfg["noise_source"] == "teacher_eps":
            noise_channels = int(student.in_channels)
        else:
            noise_channels = int(channels["middle"])
        return cls(int(channels["emb"]), noise_channels, cfg)

    def interactive_now(self, step: int) -> bool:
        """Whether `step` runs the interactive branch: every `interactive_every` steps when > 0, otherwise
        with probability `interactive_prob` from a generator seeded by (interactive_seed, step), so every
        rank and a resumed run decide alike."""
        cfg = self.config
        if cfg["interactive_weight"] == 0:
            return False
        if cfg["interactive_every"] > 0:
            return step % cfg["interactive_every"] == 0
        gen = torch.Generator().manual_seed(int(cfg["interactive_seed"]) * 1_000_003 + int(step))
        return bool(torch.rand((), generator=gen).item() < cfg["interactive_prob"])

    def forward(
        self,
        student: Any,
        diffusion: Any,
        batch: Mapping[str, Any],
        teacher_query: TeacherQuery | None,
        step: int,
        clip_denoised: bool = True,
        student_clip_denoised: bool = False,
        capture: FeatureProbe | None = None,
        **kd_kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """Terms for one (micro)batch as `DynamicBatch.draw` gives it (x_t, t, teacher_out, weights,
        model_kwargs). `loss` is the scalar to backpropagate; the rest are detached for logging.
        `clip_denoised` applies to the student's own step, `student_clip_denoised` to the student's x0 in the
        vb term; `kd_kwargs` (e.g. input_perturb) go to `training_losses_kd`. `capture` (a featured
        `FeatureProbe` of the student) is the probe to use, for callers that read the output afterwards."""
        x_t, t, teacher_out = batch["x_t"], batch["t"], batch["teacher_out"]
        n = x_t.shape[0]
        weights = batch.get("weights")
        weights = torch.ones(n, device=x_t.device) if weights is None else weights
        model_kwargs = dict(batch.get("model_kwargs") or {})

        xs, ts = [x_t], [t]
        outs = [{k: _plain(teacher_out[k]) for k in _KD_KEYS}]
        kwargs_parts = [model_kwargs]
        n_inter = 0
        if self.interactive_now(step):
            if teacher_query is None:
                raise ValueError(f"TCCD step {step} is interactive but no teacher_query was given")
            x_i, t_i, out_i, keep = interactive_inputs(
                student, diffusion, x_t, t, teacher_query, clip_denoised, model_kwargs
            )
            n_inter = x_i.shape[0]
            if n_inter:
                xs.append(x_i)
                ts.append(t_i)
                outs.append({k: out_i[k] for k in _KD_KEYS})
                kwargs_parts.append(_select_kwargs(model_kwargs, keep))

        capture = capture or FeatureProbe(student, keep=True)
        terms = diffusion.training_losses_kd(
            capture,
            x_t=torch.cat(xs),
            t=torch.cat(ts),
            out={k: torch.cat([o[k] for o in outs]) for k in _KD_KEYS},
            model_kwargs={k: torch.cat([p[k] for p in kwargs_parts]) for k in model_kwargs},
            clip_denoised=student_clip_denoised,
            **kd_kwargs,
        )
        kd = terms["loss"][:n]
        zero = x_t.new_zeros(())
        interactive = terms["loss"][n:].mean() if n_inter else zero
        total = (kd * weights).mean() + self.config["interactive_weight"] * interactive
        out: dict[str, torch.Tensor] = {
            "kd": kd.detach(),
            "interactive": interactive.detach(),
            "interactive_count": torch.tensor(float(n_inter), device=x_t.device),
        }
        for key in ("mse", "vb"):
            if key in terms:
                out[key] = terms[key][:n].detach()
        if self.alignment is not None:
            feats = capture.features
            if feats is None:
                raise RuntimeError("training_losses_kd did not call the student; TCCD needs its features")
            if self.config["noise_source"] == "teacher_eps":
                noise_input = outs[0]["model_output"]
            else:
                noise_input = feats["middle"][:n]
            align, stats = self.alignment(feats["emb"][:n], noise_input, t)
            total = total + self.config["align_weight"] * align
            out["align"] = align.detach()
            out.update(stats)
        out["loss"] = total
        return out


def _first_items(features: Any, n: int) -> Any:
    """The UNet feature structure (dicts and lists of [N, ...] tensors) cut to its first `n` items."""
    if isinstance(features, torch.Tensor):
        return features[:n]
    if isinstance(features, Mapping):
        return {k: _first_items(v, n) for k, v in features.items()}
    return [_first_items(v, n) for v in features]


class TCCDObjective(nn.Module):
    """TCCD as the base objective of the DKDM loop (`tccd:` section): `TCCDLoss` on the pool's batch, with
    the teacher queried through the pool (`teacher_query`) at the pool's precision. Terms: `loss` (the
    TCCD total), `kd` (DKDM's per-item term), mse, vb, `tccd_align`, `tccd_align_acc`, `tccd_tau` and on
    interactive steps `tccd_interactive` and `tccd_interactive_items`."""

    base = True
    needs_features = False

    def __init__(
        self,
        student: nn.Module,
        diffusion: Any,
        teacher_query: TeacherQuery,
        config: Mapping[str, Any] | None = None,
        clip_denoised: bool = True,
        input_perturb: float = 0.0,
        student_clip_denoised: bool = False,
    ) -> None:
        super().__init__()
        self.loss = TCCDLoss.for_student(student, config)
        self.diffusion = diffusion
        self.teacher_query = teacher_query
        self.clip_denoised = clip_denoised
        self.input_perturb = float(input_perturb)
        self.student_clip_denoised = bool(student_clip_denoised)
        self.keep_features = False

    def forward(self, student: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        capture = FeatureProbe(student, keep=True)
        out = self.loss(
            student, self.diffusion, batch, self._query, batch["step"], clip_denoised=self.clip_denoised,
            input_perturb=self.input_perturb, student_clip_denoised=self.student_clip_denoised,
            capture=capture,
        )
        n = batch["x_t"].shape[0]  # the pool's items come first, the interactive ones after them
        batch.update(
            student_output=capture.output[:n], student_features=_first_items(capture.features, n)
        )
        terms: dict[str, torch.Tensor] = {"loss": out["loss"], "kd": out["kd"]}
        for key in ("mse", "vb"):
            if key in out:
                terms[key] = out[key]
        if "align" in out:
            terms["tccd_align"] = out["align"]
            terms["tccd_align_acc"] = out["align_acc"]
            terms["tccd_tau"] = out["align_temperature"]
        if self.loss.interactive_now(batch["step"]):
            terms["tccd_interactive"] = out["interactive"]
            terms["tccd_interactive_items"] = out["interactive_count"]
        return terms

    def _query(self, x: torch.Tensor, t: torch.Tensor) -> Mapping[str, torch.Tensor]:
        """The teacher's answer with the student's autocast off, so the pool's teacher precision applies."""
        with torch.autocast(x.device.type, enabled=False):
            return self.teacher_query(x, t)


def build(config: Mapping[str, Any], parts: Any) -> TCCDObjective:
    """The `tccd:` section's objective for a DKDM run (`parts`: objective.RunParts)."""
    teacher = parts.cfg["teacher"]
    objective = TCCDObjective(
        parts.student, parts.student_diffusion, parts.pool.teacher_prediction, resolve_tccd_config(config),
        clip_denoised=parts.pool.clip_denoised, input_perturb=teacher["input_perturb"],
        student_clip_denoised=teacher["student_clip_denoised"],
    ).to(parts.device)
    n_params = sum(p.numel() for p in objective.parameters())
    logger.log(f"TCCD: {n_params:,} extra parameters (kept in the opt file); config {objective.loss.config}")
    return objective
