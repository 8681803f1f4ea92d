"""UNet tests: published state-dict layout, reference output, features, labels, timesteps, dtypes."""

from __future__ import annotations

import argparse
import inspect
import io
import json
import math

import pytest
import torch

import yaml
from guided_diffusion.nn import GroupNorm32, timestep_embedding
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    create_model,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    str2bool,
)
from guided_diffusion.unet import QKVAttention

ARCHS = ["14M-CNN", "24M-CNN", "32M-CNN", "44M-CNN", "57M-CNN", "57M-CNN-CelebA", "295M-CNN"]
MODEL_KEYS = set(inspect.signature(create_model).parameters)

TINY = dict(
    image_size=16,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2",
    attention_resolutions="8",
    num_head_channels=16,
    resblock_updown=True,
    use_new_attention_order=True,
    learn_sigma=True,
)


def model_kwargs(**overrides) -> dict:
    """guided-diffusion defaults restricted to create_model's arguments, then `overrides`."""
    kwargs = {k: v for k, v in model_and_diffusion_defaults().items() if k in MODEL_KEYS}
    kwargs.update(overrides)
    return kwargs


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values (a fresh UNet outputs zeros: its last conv starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def tiny_model(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize(create_model(**model_kwargs(**{**TINY, **overrides})), seed)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny models run fastest on one thread, and the shared 2-core machine is often oversubscribed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def manifest(reference_dir):
    with open(reference_dir / "unet_manifest.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def vectors(reference_dir):
    return torch.load(reference_dir / "vectors.pt", weights_only=True)


def arch_kwargs(repo_root, name: str) -> dict:
    with open(repo_root / "yaml" / "arch" / f"{name}.yaml") as f:
        arch = yaml.safe_load(f)
    return model_kwargs(**arch, learn_sigma=True)


@pytest.mark.parametrize("name", ARCHS)
def test_arch_state_dict_matches_manifest(repo_root, manifest, name):
    with torch.device("meta"):
        model = create_model(**arch_kwargs(repo_root, name))
    got = [[key, list(t.shape)] for key, t in model.state_dict().items()]
    assert got == manifest[name]["keys"]
    assert sum(p.numel() for p in model.parameters()) == manifest[name]["params"]


def test_reference_vectors_output(vectors):
    args = {**vectors["common"], **vectors["tiny_arch"]}
    model = create_model(**model_kwargs(**args, learn_sigma=True)).eval()
    model.load_state_dict(vectors["unet_state_dict"], strict=True)
    with torch.no_grad():
        out = model(vectors["unet_x"], vectors["unet_t"])
    expected = vectors["unet_out"]
    assert out.shape == expected.shape
    assert expected.abs().max() > 0.1, "reference output must exercise the (perturbed) output layers"
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_reference_class_conditional_output(vectors):
    """The class-conditional entry: label embedding added to the time embedding, as the public UNet does."""
    ref = vectors["cond"]
    args = {**vectors["common"], **ref["arch"]}
    model = create_model(**model_kwargs(**args, learn_sigma=True)).eval()
    model.load_state_dict(ref["state_dict"], strict=True)
    with torch.no_grad():
        out = model(ref["x"], ref["t"], y=ref["y"])
        other = model(ref["x"], ref["t"], y=(ref["y"] + 1) % model.num_classes)
    torch.testing.assert_close(out, ref["out"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(other, ref["out"], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("legacy", [True, False])
def test_attention_head_layout_matches_explicit_softmax(legacy):
    heads, ch, length, batch = 3, 8, 10, 2
    qkv = torch.randn(batch, 3 * heads * ch, length, dtype=torch.float64)
    out = QKVAttention(heads, legacy=legacy)(qkv)
    expected = []
    for h in range(heads):
        if legacy:
            base = h * 3 * ch
            q, k, v = (qkv[:, base + i * ch : base + (i + 1) * ch] for i in range(3))
        else:
            q, k, v = (qkv[:, (i * heads + h) * ch : (i * heads + h + 1) * ch] for i in range(3))
        weight = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(ch), dim=-1)
        expected.append(torch.einsum("bts,bcs->bct", weight, v))
    torch.testing.assert_close(out, torch.cat(expected, dim=1))


def test_attention_order_flag_changes_output():
    new = tiny_model(use_new_attention_order=True)
    legacy = tiny_model(use_new_attention_order=False)
    legacy.load_state_dict(new.state_dict())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        assert not torch.allclose(new(x, t), legacy(x, t))


def test_random_checkpoint_in_manifest_layout_roundtrips(repo_root, manifest):
    with torch.device("meta"):
        model = create_model(**arch_kwargs(repo_root, "57M-CNN"))
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    state = {key: torch.randn(shape, generator=gen) for key, shape in manifest["57M-CNN"]["keys"]}
    buffer = io.BytesIO()  # in memory: the 57M state is ~150 MB, too much for CI's scratch disk
    torch.save(state, buffer)
    buffer.seek(0)
    model.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    loaded = model.state_dict()
    assert list(loaded) == list(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_return_features_same_output_and_documented_shapes():
    model = tiny_model(channel_mult="1,2,2", num_res_blocks=2, attention_resolutions="8,4")
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 999])
    with torch.no_grad():
        plain = model(x, t)
        out, feats = model(x, t, return_features=True)
    assert torch.equal(out, plain)
    chans = model.feature_channels()
    assert chans == {"emb": 128, "down": [32, 64, 64], "middle": 64, "up": [64, 64, 32]}
    assert feats["emb"].shape == (2, chans["emb"])
    assert [tuple(f.shape) for f in feats["down"]] == [(2, 32, 16, 16), (2, 64, 8, 8), (2, 64, 4, 4)]
    assert feats["middle"].shape == (2, chans["middle"], 4, 4)
    assert [tuple(f.shape) for f in feats["up"]] == [(2, 64, 8, 8), (2, 64, 16, 16), (2, 32, 16, 16)]


def test_features_carry_gradients_to_parameters():
    model = tiny_model().train()
    _, feats = model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), return_features=True)
    feats["up"][0].sum().backward()
    assert model.input_blocks[0][0].weight.grad.abs().sum() > 0
    assert model.out[2].weight.grad is None


def test_class_conditional_model_uses_labels():
    model = tiny_model(class_cond=True)
    assert model.label_emb.weight.shape == (1000, 128)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 5])
    with torch.no_grad():
        a = model(x, t, y=torch.tensor([1, 2]))
        b = model(x, t, y=torch.tensor([3, 2]))
    assert not torch.allclose(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    with pytest.raises(ValueError, match="class-conditional"):
        model(x, t)
    with pytest.raises(ValueError, match="class-conditional"):
        tiny_model()(x, t, y=torch.tensor([1, 2]))


def test_float_timesteps():
    model = tiny_model()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ints = model(x, torch.tensor([10, 500]))
        same = model(x, torch.tensor([10.0, 500.0]))
        frac = model(x, torch.tensor([10.5, 500.25]))
    torch.testing.assert_close(same, ints)
    assert torch.isfinite(frac).all()
    assert not torch.allclose(frac, ints)


def test_timestep_embedding_values():
    t = torch.tensor([0.0, 3.5])
    emb = timestep_embedding(t, 7)
    assert emb.shape == (2, 7)
    freqs = torch.exp(-math.log(10000) * torch.arange(3) / 3)
    torch.testing.assert_close(emb[1, :3], torch.cos(3.5 * freqs))
    torch.testing.assert_close(emb[1, 3:6], torch.sin(3.5 * freqs))
    assert torch.equal(emb[:, 6], torch.zeros(2))
    torch.testing.assert_close(emb[0, :3], torch.ones(3))


def test_use_checkpoint_same_output_and_grads():
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([4, 40])
    grads = []
    for flag in (False, True):
        model = tiny_model(use_checkpoint=flag).train()
        model(x, t).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, ckpt in zip(*grads, strict=True):
        torch.testing.assert_close(ckpt, plain)


def test_use_fp16_keeps_fp32_weights_and_groupnorm_returns_input_dtype():
    model = tiny_model(use_fp16=True)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    norm = GroupNorm32(4, 8)
    x = torch.randn(2, 8, 4, 4)
    out = norm(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), norm(x), rtol=1e-2, atol=1e-2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))
    assert torch.isfinite(y.float()).all()


def test_autocast_halves_block_convolutions_but_keeps_embeddings_and_output_head_float32():
    """As guided-diffusion's fp16 mode: under autocast only the blocks' convolutions run in half precision;
    the time embedding, the embedding projections and the output head (which writes eps) stay float32."""
    model = tiny_model()
    seen: dict[str, torch.dtype] = {}

    def record(name):
        return lambda _module, _inputs, output: seen.__setitem__(name, output.dtype)

    model.time_embed.register_forward_hook(record("time_embed"))
    model.input_blocks[1][0].emb_layers.register_forward_hook(record("emb_layers"))
    model.input_blocks[1][0].in_layers[2].register_forward_hook(record("block_conv"))
    model.out.register_forward_hook(record("out"))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 999])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x, t)
    assert seen == {
        "time_embed": torch.float32,
        "emb_layers": torch.float32,
        "block_conv": torch.bfloat16,
        "out": torch.float32,
    }
    with torch.no_grad():
        head_in = torch.randn(2, model.out[0].num_channels, 16, 16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            head = model.out(head_in)
    assert head.dtype == torch.bfloat16  # the head alone would be halved: the UNet's forward keeps it fp32
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, model(x, t), rtol=0.1, atol=0.1)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="image_size=48"):
        create_model(**model_kwargs(image_size=48, channel_mult=""))
    with pytest.raises(ValueError, match="channel_mult"):
        create_model(**model_kwargs(image_size=16, channel_mult="1,x"))
    with pytest.raises(ValueError, match="num_head_channels"):
        create_model(**model_kwargs(**{**TINY, "num_head_channels": 24}))


def test_create_model_and_diffusion_takes_exactly_the_default_keys():
    args = model_and_diffusion_defaults()
    args.update(TINY, diffusion_steps=40, timestep_respacing="10")
    args.update(noise_schedule="cosine", rescale_learned_sigmas=True)
    model, diffusion = create_model_and_diffusion(**args)
    assert model.out_channels == 6 and model.image_size == 16
    assert diffusion.num_timesteps == 10
    assert diffusion.model_var_type.name == "LEARNED_RANGE"
    assert diffusion.loss_type.name == "RESCALED_MSE"
    with pytest.raises(TypeError, match="use_ddim"):
        create_model_and_diffusion(**args, use_ddim=False)
    del args["dropout"]
    with pytest.raises(TypeError, match="dropout"):
        create_model_and_diffusion(**args)


def test_argparser_round_trip_parses_bools_and_numbers():
    parser = argparse.ArgumentParser()
    defaults = model_and_diffusion_defaults()
    add_dict_to_argparser(parser, defaults)
    args = parser.parse_args(["--class_cond", "true", "--num_channels", "64", "--use_fp16", "no"])
    parsed = args_to_dict(args, defaults.keys())
    assert parsed == {**defaults, "class_cond": True, "num_channels": 64, "use_fp16": False}
    assert str2bool("Y") is True and str2bool("0") is False
    with pytest.raises(argparse.ArgumentTypeError, match="maybe"):
        str2bool("maybe")


def test_forward_cost_counts_layers_and_attention():
    from guided_diffusion.model_cost import forward_cost
    from guided_diffusion.script_util import create_model

    common = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", num_heads=2,
                  learn_sigma=False, class_cond=False)
    costs = {}
    for attention in ("8", ""):  # the middle block attends at 8x8 either way
        model = create_model(**common, attention_resolutions=attention)
        blocks = sum(1 for m in model.modules() if type(m).__name__ == "QKVAttention")
        cost = forward_cost(model)
        # per block, q@k^T and w@v are 2 * L^2 * C FLOPs each: L = 64 positions, C = 64 channels at 8x8
        assert cost["attention_flops"] == blocks * 4.0 * 64 * 64 * 64
        assert cost["flops"] == 2 * cost["macs"] + cost["attention_flops"]
        costs[attention] = (blocks, cost)
    assert costs["8"][0] > costs[""][0] == 1 and costs["8"][1]["flops"] > costs[""][1]["flops"]


def test_norm_groups_changes_what_groupnorm_computes_but_no_weight():
    """`norm_groups` (ours; ADM's 32 by default): fewer groups, the same state-dict keys and shapes, another
    output; a count that does not divide every normalized width is refused naming the key."""
    torch.manual_seed(0)
    adm = randomize(create_model(**model_kwargs(**TINY)))
    fewer = create_model(**model_kwargs(**TINY, norm_groups=8))
    assert {m.num_groups for m in adm.modules() if isinstance(m, GroupNorm32)} == {32}
    assert {m.num_groups for m in fewer.modules() if isinstance(m, GroupNorm32)} == {8}
    fewer.load_state_dict(adm.state_dict())  # strict: same keys and shapes
    x, t = torch.randn(2, 3, TINY["image_size"], TINY["image_size"]), torch.tensor([3, 7])
    with torch.no_grad():
        assert not torch.allclose(adm(x, t), fewer(x, t))
    with pytest.raises(ValueError, match="norm_groups 7"):
        create_model(**model_kwargs(**TINY, norm_groups=7))
    assert model_and_diffusion_defaults()["norm_groups"] == 32


def test_norm_groups_is_checked_at_load_and_against_the_trained_setting(tmp_path):
    from guided_diffusion.config import ConfigError, load_config
    from guided_diffusion.run_setup import recorded_setting_differences

    arch = tmp_path / "arch.yaml"
    arch.write_text(yaml.safe_dump({**TINY, "norm_groups": 7}))
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"model": str(arch), "diffusion": "tests/configs/tiny_diffusion.yaml"}))
    with pytest.raises(ConfigError, match="norm_groups 7"):
        load_config(config)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"norm_groups": 8}))
    differences = recorded_setting_differences(str(tmp_path / "model.pt"), {"norm_groups": 32})
    assert differences == ["norm_groups: trained 8, now 32"]


@pytest.mark.parametrize("legacy", [True, False])
def test_fp16_attention_math_is_the_same_attention(legacy):
    """guided-diffusion's fp16 attention arithmetic (used after convert_to_fp16) computes the same
    attention as the fused path, head layout included (float64 here: only rounding could differ)."""
    qkv = torch.randn(2, 3 * 3 * 8, 10, dtype=torch.float64)
    fused = QKVAttention(3, legacy=legacy)(qkv)
    theirs = QKVAttention(3, legacy=legacy)
    theirs.fp16_math = True
    torch.testing.assert_close(theirs(qkv), fused)


def test_convert_to_fp16_equals_half_convolution_weights():
    """convert_to_fp16 keeps float32 parameters (the master copy) rounded to half values and computes the
    blocks' convolutions in half: bitwise what a copy with genuinely half convolution weights computes, as
    guided-diffusion's convert_to_fp16 makes it; the embeddings and the output head stay float32."""
    import copy
    from pathlib import Path

    from guided_diffusion.config import load_config, model_and_diffusion_kwargs

    cfg = load_config(Path(__file__).resolve().parents[1] / "tests/configs/tiny_baseline.yaml")
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**model_and_diffusion_kwargs(cfg))
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, std=0.05)
    half = copy.deepcopy(model)
    for part in (half.input_blocks, half.middle_block, half.output_blocks):
        for m in part.modules():
            if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)):
                m.half()
            if isinstance(m, QKVAttention):
                m.fp16_math = True
    half.block_dtype = torch.float16
    model.convert_to_fp16()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    block_conv, head_conv = model.input_blocks[1][0].in_layers[2].weight, model.out[2].weight
    assert torch.equal(block_conv, block_conv.half().float())  # rounded: the master copy's start
    assert not torch.equal(head_conv, head_conv.half().float())  # the output head stays float32
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 7])
    with torch.no_grad():
        assert torch.equal(model(x, t), half(x, t))
        assert model(x, t).dtype == torch.float32
