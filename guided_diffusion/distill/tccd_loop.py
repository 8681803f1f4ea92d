"""TCCD in the DKDM loop: `TCCDTrainLoop` trains the student on `tccd.TCCDLoss` instead of plain DKDM.

The TCCD module (noise encoder, projection heads, temperature) is registered as the student's submodule
`tccd` for the run, so the unchanged `TrainLoop` machinery optimizes it, keeps its EMA, syncs it over DDP and
saves it in the model and EMA files under the prefix `tccd.` (resume restores it by the usual strict load).
`run_setup.load_model_weights` drops those keys when a plain student is loaded for sampling.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .. import logger
from .loop import KDSetupError, KDTrainLoop
from .tccd import TCCD_PREFIX, TCCDLoss, resolve_tccd_config

TCCD_ATTR = TCCD_PREFIX.rstrip(".")
LOG_PREFIX = "tccd_"


class TCCDTrainLoop(KDTrainLoop):
    """DKDM + TCCD (docs/tccd.md): one student forward per microbatch carries the DKDM items and, on
    interactive steps, the student's own next states; the teacher is queried there through the pool's
    `teacher_prediction` (inference mode, the teacher's precision). `tccd_config` is the `tccd:` section."""

    def __init__(self, *, tccd_config: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        if kwargs.get("extra_losses"):
            raise KDSetupError(
                f"TCCD computes the whole objective; extra_losses {sorted(kwargs['extra_losses'])} cannot be "
                "combined with it"
            )
        model: torch.nn.Module = kwargs["model"]
        if hasattr(model, TCCD_ATTR):
            raise KDSetupError(f"the student already has a '{TCCD_ATTR}' attribute; build a fresh student")
        config = resolve_tccd_config(config=dict(tccd_config or {}))
        device = next(model.parameters()).device
        self.tccd = TCCDLoss.for_student(model, config).to(device)
        model.add_module(TCCD_ATTR, self.tccd)
        n_params = sum(p.numel() for p in self.tccd.parameters())
        logger.log(f"TCCD: {n_params:,} extra parameters saved under '{TCCD_PREFIX}'; config {config}")
        super().__init__(**kwargs)

    def teacher_query(self, x: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """The teacher's `p_mean_variance` at (x, t) exactly as the pool computes it: the student's autocast
        is switched off so the pool's own teacher precision applies."""
        with torch.autocast(x.device.type, enabled=False):
            return self.dynamic_batch.teacher_prediction(x, t)

    def compute_losses(
        self, batch: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`TCCDLoss` on the microbatch. Logs the DKDM terms (`loss`, `mse`, `vb` per item, with quartiles)
        and `tccd_*`: align, align_acc, tau, total; on interactive steps interactive, interactive_items."""
        kd = self.unpack(batch, cond)
        out = self.tccd(
            self.ddp_model, self.diffusion, kd, self.teacher_query, self.step,
            clip_denoised=self.dynamic_batch.clip_denoised, input_perturb=self.input_perturb,
            student_clip_denoised=self.student_clip_denoised,
        )
        terms: dict[str, torch.Tensor] = {"loss": out["kd"]}
        for key in ("mse", "vb"):
            if key in out:
                terms[key] = out[key]
        if "align" in out:
            terms[LOG_PREFIX + "align"] = out["align"]
            terms[LOG_PREFIX + "align_acc"] = out["align_acc"]
            terms[LOG_PREFIX + "tau"] = out["align_temperature"]
        if self.tccd.interactive_now(self.step):
            terms[LOG_PREFIX + "interactive"] = out["interactive"]
            terms[LOG_PREFIX + "interactive_items"] = out["interactive_count"]
        terms[LOG_PREFIX + "total"] = out["loss"].detach()
        terms["t"] = kd["t"]
        return out["loss"], terms
