"""RDD's CIFAR DenseNet against shared/reference/rdd: DenseNet-201's keys, shapes and parameter count, and
the (map, pooled) features and logits of a seeded DenseNet-201 filled by the reference's rule."""

from __future__ import annotations

import json
import math

import pytest
import torch

from guided_diffusion.distill.densenet import CifarDenseNet, densenet201

torch.set_num_threads(1)


def fill(model: torch.nn.Module, seed: int) -> None:
    """The reference README's fill rule, in state-dict order."""
    g = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            continue
        if key.endswith("running_var"):
            value = 0.5 + torch.rand(tensor.shape, generator=g)
        elif tensor.dim() >= 2:
            value = torch.randn(tensor.shape, generator=g) * math.sqrt(2.0 / tensor[0].numel())
        elif key.endswith("weight"):
            value = 1 + 0.1 * torch.randn(tensor.shape, generator=g)
        else:
            value = 0.1 * torch.randn(tensor.shape, generator=g)
        tensor.copy_(value)


@pytest.fixture(scope="module")
def ref(reference_dir):
    folder = reference_dir / "rdd"
    manifest = json.loads((folder / "manifest.json").read_text())
    return manifest["densenet201_cifar10"], torch.load(folder / "vectors.pt", weights_only=True)


def test_densenet201_keys_shapes_and_count(ref):
    entry, _ = ref
    model = densenet201(num_classes=10)
    assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == entry["keys"]
    assert sum(p.numel() for p in model.parameters()) == entry["params"]
    assert model.feature_channels == entry["feature_channels"] == 1920


def test_features_and_logits_match_the_reference(ref):
    _, vectors = ref
    f = vectors["densenet201_feature"]
    model = densenet201(num_classes=10)
    fill(model, f["fill_seed"])
    model.eval()
    with torch.no_grad():
        feature_map, pooled = model.map_and_pooled(f["x"])
        logits = model(f["x"])
        raw, _ = model.map_and_pooled(f["x"], post_relu_map=False)
    torch.testing.assert_close(feature_map, f["map"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, f["pooled"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, f["logits_type_both"], rtol=1e-5, atol=1e-5)
    assert feature_map.min() == 0 and raw.min().item() == pytest.approx(f["final_norm_output_min"], rel=1e-4)


def test_small_family_member_loads_the_composition_classifier(ref):
    _, vectors = ref
    c = vectors["composition"]["classifier"]
    model = CifarDenseNet(**c["config"], num_classes=10)
    model.load_state_dict(c["state_dict"])
    assert model.feature_channels == c["feature_channels"]
