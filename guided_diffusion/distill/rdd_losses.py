"""RDD's three feature losses as the public code computes them (the README command trains their sum):
the memory pixel-to-pixel contrast ("fun loss"), the pixel-to-pixel relation between every pair of samples
("mini loss") and RCFD's KL on pooled classifier features ("rcdf loss"). Conventions and the authors' file
and line for each are in ../shared/reference/rdd/README.md (#12-#14).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import dist_util

QUEUE_LAYOUTS = ("authors", "pixels")


def rcfd_kl(pooled_s: torch.Tensor, pooled_t: torch.Tensor, temperature: float = 0.9) -> torch.Tensor:
    """KL(softmax(f_T / temperature) || softmax(f_S)) summed over features, averaged over the batch; the
    temperature applies to the teacher only and there is no temperature**2 factor (as the authors). RCFD's
    term on pooled features and the relational term's logit relation alike; [N, K] inputs, float32."""
    if pooled_s.shape != pooled_t.shape or pooled_s.dim() != 2:
        raise ValueError(f"RCFD KL needs equal [N, K] inputs, got {tuple(pooled_s.shape)} and "
                         f"{tuple(pooled_t.shape)}")
    target = F.softmax(pooled_t.detach().float() / temperature, dim=-1)
    return F.kl_div(F.log_softmax(pooled_s.float(), dim=-1), target, reduction="batchmean")


def _pair_similarities(feat: torch.Tensor) -> torch.Tensor:
    """Cosine similarities of every pixel of sample b with every pixel of sample d, for all (b, d):
    rows [B * B * HW, HW]."""
    b, c = feat.shape[:2]
    flat = F.normalize(feat, p=2, dim=1).reshape(b, c, -1)
    sim = torch.einsum("bci,dcj->bdij", flat, flat)
    return sim.reshape(-1, sim.shape[-1])


def intra_p2p(
    feat_s: torch.Tensor, feat_t: torch.Tensor, temperature: float = 1.0, factor: float = 1.0
) -> torch.Tensor:
    """Per row (a pixel of one sample against all pixels of one partner sample), KL(teacher || student) of
    the softmax over the partner's pixels; summed and divided by B * B * HW rows."""
    log_p_s = F.log_softmax(_pair_similarities(feat_s) / temperature, dim=1)
    p_t = F.softmax(_pair_similarities(feat_t) / temperature, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * factor


def contrast_indices(memory_size: int, contrast_size: int) -> torch.Tensor:
    """The queue rows the loss contrasts against: round(linspace(0, M - 1, n)) in float32, half to even."""
    return torch.round(torch.linspace(0, memory_size - 1, contrast_size)).long()


class MemoryP2PLoss(nn.Module):
    """RDD's memory pixel-to-pixel contrast: the student's map through a trainable projection head and the
    teacher's map, both per-pixel normalised, are compared through their similarities to `contrast_size`
    rows of a queue of past teacher pixel vectors (KL over those rows, temperature `contrast_temperature`).

    Each call first enqueues min(#pixels, 128) teacher vectors. `queue_layout="authors"` takes them as the
    public code does, reshaping [B, C, H, W] straight to [C, B*H*W] (channels of different samples and
    pixels mix for B > 1); `"pixels"` takes true per-pixel channel vectors. State-dict keys match the
    authors' module (`project_head.*`, `teacher_pixel_queue`, `pixel_queue_ptr`)."""

    def __init__(
        self,
        s_channels: int = 1920,
        t_channels: int = 1920,
        pixel_memory_size: int = 20000,
        pixel_contrast_size: int = 4096,
        contrast_kd_temperature: float = 1.0,
        contrast_temperature: float = 0.1,
        factor: float = 0.1,
        update_per_step: int = 128,
        queue_layout: str = "authors",
    ) -> None:
        super().__init__()
        if queue_layout not in QUEUE_LAYOUTS:
            raise ValueError(f"queue_layout must be one of {QUEUE_LAYOUTS}, got {queue_layout!r}")
        self.project_head = nn.Sequential(
            nn.Conv2d(s_channels, t_channels, 1, bias=False),
            nn.BatchNorm2d(t_channels),
            nn.ReLU(),
            nn.Conv2d(t_channels, t_channels, 1, bias=False),
        )
        self.register_buffer(
            "teacher_pixel_queue", F.normalize(torch.randn(pixel_memory_size, t_channels), p=2, dim=1)
        )
        self.register_buffer("pixel_queue_ptr", torch.zeros(1, dtype=torch.long))
        self.sampled_indices = contrast_indices(pixel_memory_size, pixel_contrast_size)
        self.contrast_kd_temperature = contrast_kd_temperature
        self.contrast_temperature = contrast_temperature
        self.factor = factor
        self.update_per_step = update_per_step
        self.queue_layout = queue_layout

    @torch.no_grad()
    def enqueue(self, t_feats: torch.Tensor, perm: torch.Tensor | None = None) -> None:
        """Write min(#pixels, 128) teacher vectors (all ranks' gathered) in `perm` order (default: a fresh
        torch.randperm) at the pointer, or over the last rows when they would not fit (pointer to 0)."""
        keys = _gather_ranks(t_feats)
        b, c, h, w = keys.shape
        if self.queue_layout == "authors":
            columns = keys.contiguous().view(c, -1)
        else:
            columns = keys.permute(1, 0, 2, 3).reshape(c, -1)
        n = columns.shape[1]
        perm = torch.randperm(n) if perm is None else perm
        k = min(n, self.update_per_step)
        rows = F.normalize(columns[:, perm[:k].to(columns.device)].t(), p=2, dim=1)
        queue, ptr = self.teacher_pixel_queue, int(self.pixel_queue_ptr[0])
        if ptr + k >= queue.shape[0]:
            queue[-k:] = rows
            self.pixel_queue_ptr[0] = 0
        else:
            queue[ptr : ptr + k] = rows
            self.pixel_queue_ptr[0] = (ptr + k) % queue.shape[0]

    def forward(
        self, s_feats: torch.Tensor, t_feats: torch.Tensor, perm: torch.Tensor | None = None
    ) -> torch.Tensor:
        t_norm = F.normalize(t_feats, p=2, dim=1)
        s_norm = F.normalize(self.project_head(s_feats), p=2, dim=1)
        self.enqueue(t_norm.detach().clone(), perm)
        b, c = s_norm.shape[:2]
        contrast = self.teacher_pixel_queue[self.sampled_indices.to(t_norm.device)]
        t_logits = t_norm.reshape(b, c, -1).transpose(1, 2) @ contrast.t() / self.contrast_temperature
        s_logits = s_norm.reshape(b, c, -1).transpose(1, 2) @ contrast.t() / self.contrast_temperature
        tau = self.contrast_kd_temperature
        log_p_s = F.log_softmax(s_logits / tau, dim=2)
        p_t = F.softmax(t_logits.detach() / tau, dim=2)
        kl = F.kl_div(log_p_s, p_t, reduction="batchmean") * tau**2
        return kl / log_p_s.shape[1] * self.factor


def _gather_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' tensors concatenated along the batch (the tensor itself on one process)."""
    if dist_util.get_world_size() == 1:
        return tensor
    return torch.cat(dist_util.all_gather_tensors(tensor))
