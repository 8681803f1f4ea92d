"""The CIFAR DenseNet-BC that RDD's classifier/ trains and freezes for its relational features, with the
state-dict keys of its `ckpt.pt` (`{"model": state_dict}`), so the authors' classifier files load strictly.

`map_and_pooled(x)` returns what RDD's losses read: the 4x4 map after the final BatchNorm and the 1920-d
pooled feature. The authors' forward applies its ReLU in place on the BatchNorm output it also returns, so
their "map" is post-ReLU; that is the default here, `post_relu_map=False` gives the pre-activation map.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

CONFIGS = {  # classifier/densenet.py's named models: growth rate, layers per block, stem width
    "densenet121": {"growth_rate": 32, "block_config": (6, 12, 24, 16), "num_init_features": 64},
    "densenet161": {"growth_rate": 48, "block_config": (6, 12, 36, 24), "num_init_features": 96},
    "densenet169": {"growth_rate": 32, "block_config": (6, 12, 32, 32), "num_init_features": 64},
    "densenet201": {"growth_rate": 32, "block_config": (6, 12, 48, 32), "num_init_features": 64},
}


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (bn_size * growth) then BN-ReLU-3x3 conv (growth) over all earlier features."""

    def __init__(self, in_features: int, growth_rate: int, bn_size: int, drop_rate: float) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_features)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_features, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)
        self.drop_rate = float(drop_rate)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        h = self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))
        h = self.conv2(self.relu2(self.norm2(h)))
        return F.dropout(h, p=self.drop_rate, training=self.training) if self.drop_rate > 0 else h


class DenseBlock(nn.ModuleDict):
    """`num_layers` dense layers (`denselayer1`, ...); the output concatenates the input and every layer's."""

    def __init__(self, num_layers: int, in_features: int, bn_size: int, growth_rate: int, drop_rate: float):
        super().__init__()
        for i in range(num_layers):
            width = in_features + i * growth_rate
            self[f"denselayer{i + 1}"] = DenseLayer(width, growth_rate, bn_size, drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


def _transition(in_features: int, out_features: int) -> nn.Sequential:
    layers = OrderedDict(
        norm=nn.BatchNorm2d(in_features),
        relu=nn.ReLU(),
        conv=nn.Conv2d(in_features, out_features, 1, bias=False),
        pool=nn.AvgPool2d(2, stride=2),
    )
    return nn.Sequential(layers)


class CifarDenseNet(nn.Module):
    """DenseNet-BC with a 3x3 stride-1 stem for 32x32 inputs (`big_input=True`: the ImageNet 7x7 stem and
    max-pool), four dense blocks with halving transitions, a final BatchNorm and a linear classifier."""

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 48, 32),
        num_init_features: int = 64,
        bn_size: int = 4,
        drop_rate: float = 0.0,
        num_classes: int = 10,
        big_input: bool = False,
    ) -> None:
        super().__init__()
        if big_input:
            stem = OrderedDict(
                conv0=nn.Conv2d(3, num_init_features, 7, stride=2, padding=3, bias=False),
                norm0=nn.BatchNorm2d(num_init_features), relu0=nn.ReLU(), pool0=nn.MaxPool2d(3, 2, padding=1),
            )
        else:
            stem = OrderedDict(
                conv0=nn.Conv2d(3, num_init_features, 3, padding=1, bias=False),
                norm0=nn.BatchNorm2d(num_init_features), relu0=nn.ReLU(),
            )
        self.features = nn.Sequential(stem)
        width = num_init_features
        for i, layers in enumerate(block_config):
            self.add_module(f"block{i + 1}", DenseBlock(layers, width, bn_size, growth_rate, drop_rate))
            width += layers * growth_rate
            if i < len(block_config) - 1:
                self.add_module(f"trans{i + 1}", _transition(width, width // 2))
                width //= 2
        self.num_blocks = len(block_config)
        self.feature_channels = width
        self.final_norm = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def final_map(self, x: torch.Tensor) -> torch.Tensor:
        """The final BatchNorm's output (before its ReLU)."""
        h = self.features(x)
        for i in range(1, self.num_blocks + 1):
            h = getattr(self, f"block{i}")(h)
            if i < self.num_blocks:
                h = getattr(self, f"trans{i}")(h)
        return self.final_norm(h)

    def map_and_pooled(
        self, x: torch.Tensor, post_relu_map: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(map [B, C, h, w], pooled [B, C]) as RDD reads them: pooled is the spatial mean of the ReLU'd map;
        the map is post-ReLU as in the authors' code unless `post_relu_map` is False."""
        raw = self.final_map(x)
        activated = F.relu(raw)
        pooled = activated.mean(dim=(2, 3))
        return (activated if post_relu_map else raw), pooled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        return self.fc(self.map_and_pooled(x)[1])


def densenet201(num_classes: int = 10, big_input: bool = False) -> CifarDenseNet:
    """The DenseNet-201 RDD freezes (`classifier/train.py --model densenet201`): 1920 feature channels."""
    return build_densenet("densenet201", num_classes, big_input)


def build_densenet(name: str, num_classes: int = 10, big_input: bool = False) -> CifarDenseNet:
    """One of the authors' named DenseNets (densenet121/161/169/201)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown DenseNet {name!r} (known: {', '.join(CONFIGS)})")
    return CifarDenseNet(**CONFIGS[name], num_classes=num_classes, big_input=big_input)


def load_densenet(
    path: str, name: str = "densenet201", num_classes: int = 10, device: torch.device | str = "cpu"
) -> CifarDenseNet:
    """The authors' classifier file (`ckpt.pt` holding {"model": state_dict}, or the folder their
    `--classifier_path` names), loaded strictly into `name`; frozen, in eval mode."""
    import os

    from ..infra.checkpoint import CheckpointError, load_state_dict_strict, safe_torch_load

    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    payload = safe_torch_load(path)
    if not isinstance(payload, dict) or "model" not in payload:
        raise CheckpointError(f"{path}: not an RDD classifier ckpt.pt (expected a 'model' state dict)")
    model = build_densenet(name, num_classes)
    load_state_dict_strict(model, payload["model"], source=path)
    return model.to(device).eval().requires_grad_(False)


def save_densenet(model: CifarDenseNet, path: str) -> None:
    """Write `{"model": state_dict}` as classifier/train.py does (atomically)."""
    from ..infra.checkpoint import atomic_torch_save

    atomic_torch_save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, path)
