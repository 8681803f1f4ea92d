"""RDD and PD on RCFD's models as the public code trains them: one step of `RDDObjective` is the teacher's two
DDIM steps on its (T, time_scale) grid, the student's x0 at z_t, and the loss the flags select.

PD.py trains the truncated-SNR regression only (`pd_defaults`). train_rdd.py with the README's flags
(`--feature --loss_type mp2p --temperature 0.9`, `rdd_defaults`) trains memory p2p + intra p2p + RCFD KL on
a frozen classifier's features of the target x~ and the student's x0, with no regression (`logits` off) and
no ground-truth term (`gt` off). Deviations kept on purpose are options, off by default (docs/RDD.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..config import resolve_with_defaults
from ..ddpm_diffusion import DDPMSchedule, pd_target, truncated_snr_loss
from .rdd_losses import MemoryP2PLoss, intra_p2p, rcfd_kl

LOSS_TYPES = ("mp2p", "none")


def pd_defaults() -> dict[str, Any]:
    """PD.py: the regression alone."""
    return {**rdd_defaults(), "feature": False, "loss_type": "none", "logits": True}


def rdd_defaults() -> dict[str, Any]:
    """The flags in effect for the README's train_rdd.py command, plus this project's options (last)."""
    return {
        "feature": True,  # --feature: classifier features feed the relational and RCFD terms
        "loss_type": "mp2p",  # --loss_type: mp2p = memory p2p + intra p2p; none = RCFD KL only
        "temperature": 0.9,  # --temperature: RCFD KL teacher temperature (the p2p losses use 1.0)
        "logits": False,  # --logits: add the truncated-SNR regression (PD's loss)
        "gt": False,  # --gt: the ground-truth term (the authors compare the teacher's x0 with the data)
        "gt_student_x0": False,  # ours: the gt term on the student's x0 instead (what it looks meant to be)
        "queue_layout": "authors",  # ours: "pixels" enqueues true per-pixel vectors (docs/RDD.md)
        "post_relu_map": True,  # ours: False feeds the pre-ReLU map, as the DenseNet code looks meant to
        "teacher_clip": False,  # ours: clip the teacher's x0 in its two steps (the authors do not)
    }


def resolve_rdd_config(
    config: Mapping[str, Any] | None = None, base: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """`config` over `base` (default `rdd_defaults()`); unknown keys and bad values raise ValueError."""
    resolved = resolve_with_defaults(dict(config or {}), base or rdd_defaults(), "rdd", "its config")
    if resolved["loss_type"] not in LOSS_TYPES:
        raise ValueError(f"rdd: loss_type must be one of {LOSS_TYPES}, got {resolved['loss_type']!r}")
    if resolved["temperature"] <= 0:
        raise ValueError(f"rdd: temperature must be > 0, got {resolved['temperature']!r}")
    if not (resolved["feature"] or resolved["logits"] or resolved["gt"]):
        raise ValueError("rdd: nothing to train (feature, logits and gt are all off)")
    return resolved


class RDDObjective(nn.Module):
    """The loss of one batch for a student with half the teacher's steps (T/2 at 2 * time_scale).

    Holds the memory loss's projection head and queue (trainable/stateful, when feature and mp2p); the
    teacher and the classifier are frozen and not part of its state."""

    def __init__(
        self,
        teacher: nn.Module,
        teacher_steps: int,
        teacher_time_scale: int,
        config: Mapping[str, Any] | None = None,
        classifier: nn.Module | None = None,
        schedule: DDPMSchedule | None = None,
        memory: MemoryP2PLoss | None = None,
    ) -> None:
        super().__init__()
        self.config = resolve_rdd_config(config)
        if teacher_steps % 2:
            raise ValueError(f"rdd: the teacher's steps must be even to halve, got {teacher_steps}")
        if self.config["feature"] and classifier is None:
            raise ValueError("rdd: feature is on but no classifier was given (--classifier_path)")
        self.teacher_steps = teacher_steps
        self.teacher_time_scale = teacher_time_scale
        self.schedule = schedule or DDPMSchedule(teacher_steps * teacher_time_scale)
        self._frozen = (teacher, classifier)  # a tuple: neither trained nor saved with this module
        self.memory = None
        if self.config["feature"] and self.config["loss_type"] == "mp2p":
            channels = classifier.feature_channels
            layout = self.config["queue_layout"]
            self.memory = memory or MemoryP2PLoss(channels, channels, queue_layout=layout)

    def draw_t(self, batch: int, device: torch.device) -> torch.Tensor:
        """t = 2 * U{1, ..., T/2} on the teacher's grid, one per item (global torch RNG, as the authors)."""
        return 2 * torch.randint(1, self.teacher_steps // 2 + 1, (batch,), device=device)

    def forward(
        self,
        student: nn.Module,
        x0: torch.Tensor,
        y: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        perm: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Terms for one batch: `loss` (their sum, in the authors' order), and each active term by name.
        `t`, `noise` and `perm` (the queue permutation) default to fresh draws."""
        teacher, classifier = self._frozen
        cfg, schedule, scale = self.config, self.schedule, self.teacher_time_scale
        t = self.draw_t(x0.shape[0], x0.device) if t is None else t
        noise = torch.randn_like(x0) if noise is None else noise
        with torch.no_grad():
            z_t = schedule.q_sample(x0, t * scale, noise)
        target = pd_target(teacher, schedule, z_t, t, scale, y, clip=cfg["teacher_clip"])
        student_x0 = student(z_t, t * scale, y)
        terms: dict[str, torch.Tensor] = {}
        total = x0.new_zeros(())
        regression = truncated_snr_loss(
            schedule, z_t, t * scale, student_x0, target["x_target"], target["eps_target"]
        )
        if cfg["logits"]:
            terms["regression"] = regression["loss"]
            total = total + regression["loss"]
        if cfg["feature"]:
            with torch.no_grad():
                map_t, pooled_t = classifier.map_and_pooled(target["x_target"], cfg["post_relu_map"])
            map_s, pooled_s = classifier.map_and_pooled(student_x0, cfg["post_relu_map"])
            if self.memory is not None:
                terms["memory_p2p"] = self.memory(map_s, map_t, perm=perm)
                total = total + terms["memory_p2p"]
            if cfg["loss_type"] == "mp2p":
                terms["intra_p2p"] = intra_p2p(map_s, map_t)
                total = total + terms["intra_p2p"]
            terms["rcfd_kl"] = rcfd_kl(pooled_s, pooled_t, cfg["temperature"])
            total = total + terms["rcfd_kl"]
        if cfg["gt"]:
            x0_term = student_x0 if cfg["gt_student_x0"] else target["teacher_x0_tm0"]
            b = x0.shape[0]
            x0_mse = (x0_term - x0).pow(2).reshape(b, -1).mean(dim=1)
            eps_mse = (regression["eps"] - noise).pow(2).reshape(b, -1).mean(dim=1)
            terms["gt"] = torch.maximum(x0_mse, eps_mse).mean()
            total = total + terms["gt"]
        terms["x0_mse"] = regression["x0_mse"].mean().detach()
        terms["loss"] = total
        return terms
