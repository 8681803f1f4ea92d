"""The frozen image classifier of RDD/RCFD: a timm model (DenseNet-201 for 32x32 as RDD), its training on an
image folder or npz with labels, its checkpoint file, and the feature map + logits the relational loss uses.

Images enter as the diffusion sees them (NCHW in [-1, 1]), so the classifier can judge x_0 predictions
directly. For small images the stem of DenseNet/ResNet families is adapted as CIFAR models are (3x3 stride-1
first convolution, no stem max-pool), so a 32x32 input keeps a 4x4 final map instead of 1x1.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import logger
from ..infra.checkpoint import atomic_torch_save, safe_torch_load

SMALL_IMAGE_LIMIT = 64  # the stem is adapted for images up to this size (as CIFAR models do)


def _adapt_densenet_stem(model: nn.Module) -> bool:
    features = getattr(model, "features", None)
    conv0 = getattr(features, "conv0", None)
    if not isinstance(conv0, nn.Conv2d):
        return False
    features.conv0 = nn.Conv2d(conv0.in_channels, conv0.out_channels, 3, stride=1, padding=1, bias=False)
    if hasattr(features, "pool0"):
        features.pool0 = nn.Identity()
    return True


def _adapt_resnet_stem(model: nn.Module) -> bool:
    conv1 = getattr(model, "conv1", None)
    if isinstance(conv1, nn.Sequential) and isinstance(conv1[0], nn.Conv2d):
        conv1[0].stride = (1, 1)
    elif isinstance(conv1, nn.Conv2d):
        model.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, stride=1, padding=1, bias=False)
    else:
        return False
    if hasattr(model, "maxpool"):
        model.maxpool = nn.Identity()
    return True


def build_classifier(
    model_name: str,
    num_classes: int,
    image_size: int,
    model_kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """A timm classifier (`pretrained=False`, nothing downloaded); DenseNet/ResNet stems adapted to small
    images. `model_kwargs` go to `timm.create_model` (e.g. a tiny `growth_rate`/`block_config`)."""
    import timm

    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    try:
        model = timm.create_model(
            model_name, pretrained=False, num_classes=num_classes, **dict(model_kwargs or {})
        )
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"cannot build timm model {model_name!r}: {exc}") from exc
    if image_size <= SMALL_IMAGE_LIMIT:
        adapted = (
            _adapt_densenet_stem(model) if model_name.startswith("densenet") else _adapt_resnet_stem(model)
        )
        if not adapted:
            logger.log(f"classifier {model_name}: stem kept as timm builds it (no small-image adaptation)")
    return model


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The last feature map [N, C, h, w] (timm `forward_features`) and the logits [N, K] computed from it."""
    feats = model.forward_features(x)
    return feats, model.forward_head(feats)


def save_classifier(
    model: nn.Module,
    path: str,
    *,
    model_name: str,
    num_classes: int,
    image_size: int,
    model_kwargs: Mapping[str, Any] | None = None,
) -> None:
    """Write the weights and how to rebuild them (`model_name`, `num_classes`, `image_size`, kwargs),
    atomically."""
    payload = {
        "model_name": model_name,
        "num_classes": int(num_classes),
        "image_size": int(image_size),
        "model_kwargs": dict(model_kwargs or {}),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    atomic_torch_save(payload, path)


def load_classifier(path: str, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild a classifier saved by `save_classifier`; frozen and in eval mode."""
    payload = safe_torch_load(path)
    if not isinstance(payload, dict) or "state_dict" not in payload or "model_name" not in payload:
        raise ValueError(f"{path}: not a classifier file from scripts/classifier_train.py")
    model = build_classifier(
        payload["model_name"], payload["num_classes"], payload["image_size"], payload.get("model_kwargs")
    )
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise ValueError(
            f"{path}: weights do not fit {payload['model_name']}: {str(exc).splitlines()[0]}"
        ) from exc
    return model.to(device).eval().requires_grad_(False)


def feature_channels(model: nn.Module, image_size: int) -> int:
    """Channel count of the classifier's feature map (one probe forward of a blank image)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(torch.zeros(1, 3, image_size, image_size, device=device))
    model.train(was_training)
    return int(feats.shape[1])


def train_classifier(
    model: nn.Module,
    data: Any,
    *,
    num_classes: int,
    epochs: int,
    lr: float,
    weight_decay: float = 5e-4,
    device: torch.device | str = "cpu",
) -> list[float]:
    """SGD (momentum 0.9, cosine lr) with cross entropy over `epochs` passes of `data` (a `load_data`
    iterator with labels); returns the per-epoch training accuracy."""
    steps_per_epoch = data.batches_per_epoch()
    total = max(1, epochs * steps_per_epoch)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    model.to(device).train()
    accuracies = []
    for epoch in range(epochs):
        correct = seen = 0
        loss_sum = 0.0
        start = time.time()
        for _ in range(steps_per_epoch):
            x, cond = next(data)
            if "y" not in cond:
                raise ValueError("classifier training needs labels (an npz with arr_1 or label_*.png names)")
            x, y = x.to(device), cond["y"].to(device)
            if int(y.max()) >= num_classes or int(y.min()) < 0:
                raise ValueError(f"label {int(y.max())} is outside [0, {num_classes}); set --num_classes")
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            correct += int((logits.argmax(1) == y).sum())
            seen += y.numel()
            loss_sum += float(loss.detach()) * y.numel()
        accuracies.append(correct / max(seen, 1))
        logger.log(
            f"epoch {epoch + 1}/{epochs}: loss {loss_sum / max(seen, 1):.4f}, "
            f"train acc {accuracies[-1]:.4f} ({time.time() - start:.1f}s)"
        )
    model.eval()
    return accuracies


def train_with_test_selection(
    model: nn.Module,
    train: Any,
    test: Any,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    device: torch.device | str,
    save_best: Any,
) -> float:
    """The RDD authors' classifier schedule: SGD (momentum 0.9) with the learning rate divided by 10 at
    epochs // 2 and 3 * epochs // 4, cross entropy over `train` (a loader of (images, labels)), the
    accuracy on `test` after every epoch, and `save_best(model)` whenever it improves; returns the best."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    best = 0.0
    for epoch in range(epochs):
        if epoch in (epochs // 2, epochs * 3 // 4):
            for group in opt.param_groups:
                group["lr"] /= 10
        model.train()
        start, loss_sum, seen = time.time(), 0.0, 0
        for x, y in train:
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum, seen = loss_sum + float(loss.detach()) * y.numel(), seen + y.numel()
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in test:
                correct += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
                total += y.numel()
        accuracy = correct / max(total, 1)
        logger.log(f"epoch {epoch + 1}/{epochs}: train loss {loss_sum / max(seen, 1):.4f}, test acc "
                   f"{100 * accuracy:.2f}%, lr {opt.param_groups[0]['lr']:g} ({time.time() - start:.1f}s)")
        if accuracy > best:
            best = accuracy
            save_best(model)
            logger.log(f"best test accuracy updated: {100 * best:.2f}%")
    return best
