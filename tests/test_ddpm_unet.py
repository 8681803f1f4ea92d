"""DDPMUNet against the RDD reference (shared/reference/rdd): the published configs' state-dict keys, shapes
and parameter counts, the reference forward pass, and RCFD's ckpt.pt layout."""

from __future__ import annotations

import json

import pytest
import torch

from guided_diffusion.ddpm_unet import DDPMUNet, load_rcfd_checkpoint, save_rcfd_checkpoint, sinusoid_table
from guided_diffusion.infra.checkpoint import CheckpointError, CheckpointMismatchError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def rdd(reference_dir):
    folder = reference_dir / "rdd"
    manifest = json.loads((folder / "manifest.json").read_text())
    vectors = torch.load(folder / "vectors.pt", weights_only=True)
    return manifest, vectors


def _config(entry):
    cfg = dict(entry["config"])
    if isinstance(cfg["dropout"], dict):
        cfg["dropout"] = 0.0
    return cfg


@pytest.mark.parametrize("name", ["unet_cifar10", "unet_imagenet64"])
def test_published_configs_have_the_authors_keys_shapes_and_counts(rdd, name):
    entry = rdd[0][name]
    with torch.device("meta"):
        model = DDPMUNet(**_config(entry))
    state = model.state_dict()
    assert [[k, list(v.shape)] for k, v in state.items()] == entry["keys"]
    assert len(state) == entry["state_dict_entries"]
    assert sum(p.numel() for p in model.parameters()) == entry["params"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == entry["trainable_params"]


def test_forward_reproduces_the_reference(rdd):
    ref = rdd[1]["unet"]
    model = DDPMUNet(**ref["config"])
    model.load_state_dict(ref["state_dict"])
    assert model.time_embedding.timembedding[0].weight.shape[0] == ref["time_table_rows"] == 1025
    model.eval()
    with torch.no_grad():
        out = model(ref["x"], ref["t"])
        out_y, feature = model(ref["x"], ref["t"], None, feature=True)
    torch.testing.assert_close(out, ref["out"], rtol=1e-5, atol=1e-5)
    assert torch.equal(out, out_y) and feature.shape[0] == 4 and not feature.requires_grad
    table = ref["state_dict"]["time_embedding.timembedding.0.weight"]
    torch.testing.assert_close(sinusoid_table(1025, ref["config"]["ch"]), table.float(), rtol=0, atol=1e-6)


def test_rcfd_checkpoint_layout_loads_strictly_with_the_authors_rule(tmp_path):
    cfg = dict(T=1024, ch=32, ch_mult=[1, 2], attn=[1], num_res_blocks=1, dropout=0.0)
    torch.manual_seed(0)
    net, ema = DDPMUNet(**cfg), DDPMUNet(**cfg)
    x_T = torch.randn(2, 3, 16, 16)
    save_rcfd_checkpoint(str(tmp_path / "base.pt"), net, T=1024, time_scale=1, x_T=x_T, ema_model=ema)
    save_rcfd_checkpoint(str(tmp_path / "pd.pt"), net, T=8, time_scale=128, x_T=x_T)
    kwargs = {k: v for k, v in cfg.items() if k != "T"}
    base, meta = load_rcfd_checkpoint(str(tmp_path / "base.pt"), **kwargs)
    assert meta["which"] == "ema_model" and meta["T"] == 1024 and base.T == 1024
    loaded, saved = base.state_dict(), ema.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    student, meta = load_rcfd_checkpoint(str(tmp_path / "pd.pt"), **kwargs)
    assert meta["which"] == "net_model" and (meta["T"], meta["time_scale"]) == (8, 128) and student.T == 1024
    assert torch.equal(meta["x_T"], x_T)
    with pytest.raises(CheckpointMismatchError, match="pd.pt"):
        load_rcfd_checkpoint(str(tmp_path / "pd.pt"), **{**kwargs, "ch_mult": [1, 2, 2]})
    torch.save({"model": net.state_dict()}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an RCFD/RDD ckpt.pt"):
        load_rcfd_checkpoint(str(tmp_path / "other.pt"), **kwargs)
