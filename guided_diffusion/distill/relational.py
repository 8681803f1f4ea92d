"""RDD relational losses (Feng et al., "Relational Diffusion Distillation for Efficient Image Generation",
ACM MM 2024), usable by any distillation mode.

Three terms between student and teacher features of the same inputs:
  * pixel-to-pixel: every pixel of the batch against every pixel (within and across samples), row softmax
    at `p2p_temperature`, KL with the teacher's row as the target;
  * memory contrast: student pixels (through a 1x1-conv projection head into the teacher's width) and
    teacher pixels against anchors from a queue of past teacher pixels, KL of the two anchor distributions;
  * logit relation (RCFD, for classifier features): KL(softmax(z_t / T) || softmax(z_s)), T = 0.9 sharpens.

Naming: "KL(student || teacher)" in the issue is PyTorch's `kl_div(log p_s, p_t)`, i.e. mathematically
KL(p_t || p_s) = sum p_t log(p_t / p_s): the teacher distribution is the reference (the KD-standard form).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import dist_util
from ..config import resolve_with_defaults
from .objective import FeatureProbe
from .rdd_losses import rcfd_kl
from .targets import pred_xstart_from_output

FEATURE_SOURCES = ("unet", "classifier")


def defaults() -> dict[str, Any]:
    """Every `relational:` YAML knob with its default; the source of each value is noted beside it."""
    return {
        "feature_source": "unet",  # "unet": a return_features tensor; "classifier": RCFD's classifier
        "unet_feature": "middle",  # "middle", "down.<level>" or "up.<level>" (unet source)
        "factor": 1.0,  # pixel-to-pixel weight (the issue leaves it open; 1.0 keeps it on par with the task)
        "p2p_temperature": 1.0,  # not published; 1.0 = plain cosine-similarity softmax
        "chunk_size": 4096,  # rows per block of the [P, P] / [P, anchors] similarity (memory bound only)
        "memory_factor": 0.1,  # RDD: weight of the memory contrast term
        "queue_size": 20000,  # RDD: pixel memory size
        "enqueue_per_step": 128,  # RDD: teacher pixels enqueued per step (per rank)
        "num_anchors": 4096,  # RDD: evenly spaced queue entries used as anchors
        "contrast_temperature": 0.1,  # RDD: similarity temperature against the anchors
        "kd_temperature": 1.0,  # RDD: KD temperature on the anchor distributions
        "logit_factor": 1.0,  # RCFD: its single (feature/logit) KL term has weight 1
        "logit_temperature": 0.9,  # RCFD/RDD (--temperature 0.9): sharpens the teacher's distribution
    }


def resolve_relational_config(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`config` over the defaults, checked: unknown keys and bad values raise a one-line ValueError."""
    resolved = resolve_with_defaults(dict(config or {}), defaults(), "relational", "its section")
    positive = ("p2p_temperature", "chunk_size", "queue_size", "enqueue_per_step", "num_anchors",
                "contrast_temperature", "kd_temperature", "logit_temperature")
    for key in positive:
        if not resolved[key] > 0:
            raise ValueError(f"relational: {key} must be > 0, got {resolved[key]!r}")
    for key in ("factor", "memory_factor", "logit_factor"):
        if resolved[key] < 0:
            raise ValueError(f"relational: {key} must be >= 0, got {resolved[key]!r}")
    if resolved["feature_source"] not in FEATURE_SOURCES:
        raise ValueError(f"relational: feature_source must be one of {FEATURE_SOURCES}, "
                         f"got {resolved['feature_source']!r}")
    _parse_unet_feature(resolved["unet_feature"])
    return resolved


def _parse_unet_feature(name: str) -> tuple[str, int | None]:
    if name == "middle":
        return "middle", None
    kind, _, level = name.partition(".")
    if kind not in ("down", "up") or not level.lstrip("-").isdigit():
        raise ValueError(f"relational: unet_feature must be 'middle', 'down.<i>' or 'up.<i>', got {name!r}")
    return kind, int(level)


def select_unet_feature(feats: Mapping[str, Any], name: str) -> torch.Tensor:
    """The `return_features` tensor named by `unet_feature` ("middle", "down.<i>", "up.<i>")."""
    kind, level = _parse_unet_feature(name)
    return feats[kind] if level is None else feats[kind][level]


def unet_feature_channels(channels: Mapping[str, Any], name: str) -> int:
    """Channel count of that tensor from `UNetModel.feature_channels()`."""
    kind, level = _parse_unet_feature(name)
    return int(channels[kind] if level is None else channels[kind][level])


# ---------------------------------------------------------------------------------------------------------
# Losses


def pixel_embeddings(feat: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N*H*W, C] rows, each pixel's channel vector L2-normalized (float32)."""
    if feat.dim() != 4:
        raise ValueError(f"expected a feature map [N, C, H, W], got shape {tuple(feat.shape)}")
    return F.normalize(feat.float().permute(0, 2, 3, 1).reshape(-1, feat.shape[1]), dim=1)


def _block_kl(
    s_rows: torch.Tensor, s_keys: torch.Tensor, t_rows: torch.Tensor, t_keys: torch.Tensor, temperature: float
) -> torch.Tensor:
    log_p_s = F.log_softmax(s_rows @ s_keys.t() / temperature, dim=1)
    log_p_t = F.log_softmax(t_rows @ t_keys.t() / temperature, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum()


def _relation_kl(
    s_rows: torch.Tensor,
    s_keys: torch.Tensor,
    t_rows: torch.Tensor,
    t_keys: torch.Tensor,
    temperature: float,
    chunk_size: int | None,
) -> torch.Tensor:
    """Mean over rows i of KL(softmax(t_i . t_keys / T) || softmax(s_i . s_keys / T)), in row blocks.

    With several blocks under autograd each block is recomputed in backward (activation checkpointing),
    so only one [block, keys] similarity is alive at a time in either pass.
    """
    rows = s_rows.shape[0]
    step = rows if chunk_size is None else max(1, int(chunk_size))
    recompute = step < rows and torch.is_grad_enabled()
    total = s_rows.new_zeros(())
    for start in range(0, rows, step):
        args = (s_rows[start : start + step], s_keys, t_rows[start : start + step], t_keys, temperature)
        block = checkpoint(_block_kl, *args, use_reentrant=False) if recompute else _block_kl(*args)
        total = total + block
    return total / rows


def pixel_relation_loss(
    student_feat: torch.Tensor,
    teacher_feat: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """RDD's pixel-to-pixel relation: KL(p_t || p_s) of each pixel's softmax similarity to all N*H*W pixels.

    Channel counts may differ (each similarity lives in its own model's space); N, H, W must agree.
    """
    if student_feat.shape[0] != teacher_feat.shape[0] or student_feat.shape[2:] != teacher_feat.shape[2:]:
        raise ValueError(f"pixel relation needs equal N, H, W: student {tuple(student_feat.shape)}, "
                         f"teacher {tuple(teacher_feat.shape)}")
    s = pixel_embeddings(student_feat)
    t = pixel_embeddings(teacher_feat).detach()
    return _relation_kl(s, s, t, t, temperature, chunk_size)


def memory_contrast_loss(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    anchors: torch.Tensor,
    contrast_temperature: float = 0.1,
    kd_temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """RDD's memory contrast: rows [P, D] vs anchors [A, D], logits / contrast_T, then KD at kd_T:
    kd_T^2 * mean_i KL(softmax(t_i a^T / (c kd_T)) || softmax(s_i a^T / (c kd_T)))."""
    if student_emb.shape != teacher_emb.shape or anchors.shape[1:] != student_emb.shape[1:]:
        raise ValueError(f"memory contrast needs [P, D] rows and [A, D] anchors: student "
                         f"{tuple(student_emb.shape)}, teacher {tuple(teacher_emb.shape)}, "
                         f"anchors {tuple(anchors.shape)}")
    anchors = anchors.detach().float()
    kl = _relation_kl(
        student_emb.float(), anchors, teacher_emb.detach().float(), anchors,
        contrast_temperature * kd_temperature, chunk_size,
    )
    return kl * kd_temperature**2


# ---------------------------------------------------------------------------------------------------------
# Memory and projection head


class PixelMemoryQueue(nn.Module):
    """A ring buffer of L2-normalized teacher pixel embeddings, identical on every rank (saved for resume).

    Each `enqueue` writes `enqueue_per_step` random pixels per rank, gathered in rank order, after the
    newest entry, wrapping around; only the last `size` of an oversized write are kept.
    """

    def __init__(self, dim: int, size: int = 20000, enqueue_per_step: int = 128) -> None:
        super().__init__()
        if dim < 1 or size < 1 or enqueue_per_step < 1:
            raise ValueError(f"PixelMemoryQueue needs positive dim/size/enqueue_per_step, got "
                             f"{dim}/{size}/{enqueue_per_step}")
        self.size = size
        self.enqueue_per_step = enqueue_per_step
        self.register_buffer("queue", torch.zeros(size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        # Host copies of ptr/filled avoid a device sync per step; the buffers carry them through state_dict.
        self._ptr = 0
        self._filled = 0
        self.register_load_state_dict_post_hook(_sync_queue_counters)

    @property
    def num_filled(self) -> int:
        """How many entries hold embeddings."""
        return self._filled

    @torch.no_grad()
    def enqueue(self, emb: torch.Tensor) -> torch.Tensor:
        """Add `enqueue_per_step` random rows of `emb` ([M, D] rows or an [N, D, H, W] map) from every rank;
        returns the gathered rows written (in rank order)."""
        rows = pixel_embeddings(emb) if emb.dim() == 4 else F.normalize(emb.detach().float(), dim=1)
        if rows.shape[1] != self.queue.shape[1]:
            raise ValueError(f"queue holds {self.queue.shape[1]}-dim embeddings, got {rows.shape[1]}")
        pick = torch.randperm(rows.shape[0], device=rows.device)[: self.enqueue_per_step]
        gathered = torch.cat(dist_util.all_gather_tensors(rows[pick]))
        self._write(gathered.to(self.queue.device))
        return gathered

    def _write(self, rows: torch.Tensor) -> None:
        rows = rows[-self.size :]
        n = rows.shape[0]
        index = (self._ptr + torch.arange(n, device=self.queue.device)) % self.size
        self.queue[index] = rows.to(self.queue.dtype)
        self._ptr = (self._ptr + n) % self.size
        self._filled = min(self._filled + n, self.size)
        self.ptr.fill_(self._ptr)
        self.filled.fill_(self._filled)

    def ordered(self) -> torch.Tensor:
        """The filled entries from oldest to newest."""
        if self._filled < self.size:
            return self.queue[: self._filled]
        return torch.cat([self.queue[self._ptr :], self.queue[: self._ptr]])

    def anchors(self, num: int) -> torch.Tensor:
        """`num` evenly spaced entries of the filled part (all of it when fewer are filled)."""
        k = min(num, self._filled)
        index = torch.arange(k, device=self.queue.device) * self._filled // max(k, 1)
        return self.queue[index]


def _sync_queue_counters(module: nn.Module, incompatible_keys: Any) -> None:
    module._ptr = int(module.ptr)
    module._filled = int(module.filled)


def projection_head(in_channels: int, out_channels: int) -> nn.Module:
    """RDD's student head: 1x1 conv, BatchNorm, ReLU, 1x1 conv into the teacher's width. With several ranks
    in a process group the BatchNorm becomes SyncBatchNorm (PyTorch supports that on GPU tensors only)."""
    head = nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 1),
    )
    if dist_util.get_world_size() > 1:
        head = nn.SyncBatchNorm.convert_sync_batchnorm(head)
    return head


# ---------------------------------------------------------------------------------------------------------
# The bundled module


class RelationalLoss(nn.Module):
    """The enabled RDD terms from a `relational:` config: p2p (factor > 0), memory (memory_factor > 0) and
    logit (logit_factor > 0 with feature_source "classifier"). Student maps are resized to the teacher's
    H, W when they differ; the head's 1x1 convs bridge channel widths."""

    def __init__(
        self, student_channels: int, teacher_channels: int, config: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__()
        self.config = resolve_relational_config(config)
        cfg = self.config
        self.use_p2p = cfg["factor"] > 0
        use_memory = cfg["memory_factor"] > 0
        self.use_logit = cfg["logit_factor"] > 0 and cfg["feature_source"] == "classifier"
        self.head = projection_head(student_channels, teacher_channels) if use_memory else None
        self.memory = (
            PixelMemoryQueue(teacher_channels, cfg["queue_size"], cfg["enqueue_per_step"])
            if use_memory
            else None
        )

    def forward(
        self,
        student_feats: torch.Tensor,
        teacher_feats: torch.Tensor,
        student_logits: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Terms for one batch: `loss` (weighted sum, to backpropagate) and the detached unweighted terms.
        In training mode the teacher's pixels are enqueued before the anchors are drawn."""
        cfg = self.config
        teacher_feats = teacher_feats.detach()
        if student_feats.shape[2:] != teacher_feats.shape[2:]:
            student_feats = F.interpolate(student_feats, size=teacher_feats.shape[2:], mode="bilinear",
                                          align_corners=False)
        total = student_feats.new_zeros((), dtype=torch.float32)
        terms: dict[str, torch.Tensor] = {}
        if self.use_p2p:
            p2p = pixel_relation_loss(student_feats, teacher_feats, cfg["p2p_temperature"], cfg["chunk_size"])
            total = total + cfg["factor"] * p2p
            terms["p2p"] = p2p.detach()
        if self.head is not None and self.memory is not None:
            if self.training:
                self.memory.enqueue(teacher_feats)
            if self.memory.num_filled:
                memory = memory_contrast_loss(
                    pixel_embeddings(self.head(student_feats)),
                    pixel_embeddings(teacher_feats),
                    self.memory.anchors(cfg["num_anchors"]),
                    cfg["contrast_temperature"],
                    cfg["kd_temperature"],
                    cfg["chunk_size"],
                )
                total = total + cfg["memory_factor"] * memory
                terms["memory"] = memory.detach()
        if self.use_logit:
            if student_logits is None or teacher_logits is None:
                raise ValueError("relational: logit_factor > 0 with feature_source 'classifier' needs "
                                 "student_logits and teacher_logits")
            logit = rcfd_kl(student_logits, teacher_logits, cfg["logit_temperature"])
            total = total + cfg["logit_factor"] * logit
            terms["logit"] = logit.detach()
        terms["loss"] = total
        return terms


class RelationalTerm(nn.Module):
    """RDD's relational loss with its feature source: the UNets' own features (teacher vs student at z_t)
    or a frozen classifier applied to the teacher's and the student's x_0. Its trainable head and pixel
    memory are its state (saved in the opt file by the loops); teacher and classifier are not.

    As a DKDM objective (`relational:` section) it runs the teacher at the batch's x_t for its features.
    """

    base = False

    def __init__(
        self,
        config: Mapping[str, Any],
        student: nn.Module,
        teacher: nn.Module,
        classifier: nn.Module | None = None,
        image_size: int | None = None,
        teacher_diffusion: Any = None,
        student_diffusion: Any = None,
    ) -> None:
        super().__init__()
        self.teacher_diffusion = teacher_diffusion
        self.student_diffusion = student_diffusion
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

    def forward(self, student: Any, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The DKDM objective call: teacher features at the batch's x_t (unet source) or the x_0 of the
        pool's teacher output and of the student's output (classifier source); the student's own output
        and features come from the base objective."""
        x_t, t, kwargs = batch["x_t"], batch["t"], batch["model_kwargs"]
        if self.needs_features:
            probe = FeatureProbe(self._frozen[0], True)
            with torch.no_grad():
                self.teacher_diffusion.p_mean_variance(probe, x_t, t, model_kwargs=kwargs)
            return self.compare(student_feats=batch["student_features"], teacher_feats=probe.features)
        teacher_eps = batch["teacher_out"]["model_output"]
        return self.compare(
            student_x0=pred_xstart_from_output(self.student_diffusion, x_t, t, batch["student_output"]),
            teacher_x0=pred_xstart_from_output(self.teacher_diffusion, x_t, t, teacher_eps),
        )




def build_relational_term(
    cfg: Mapping[str, Any],
    student: nn.Module,
    teacher: nn.Module,
    classifier_path: str = "",
    device: torch.device | str = "cpu",
    teacher_diffusion: Any = None,
    student_diffusion: Any = None,
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
    return RelationalTerm(
        rel, student, teacher, classifier, teacher_diffusion=teacher_diffusion,
        student_diffusion=student_diffusion,
    ).to(device)




def build(config: Mapping[str, Any], parts: Any) -> RelationalTerm:
    """The `relational:` section's objective for a DKDM run (`parts`: objective.RunParts)."""
    return build_relational_term(
        {"relational": config}, parts.student, parts.teacher, parts.classifier_path, parts.device,
        parts.teacher_diffusion, parts.student_diffusion,
    )
