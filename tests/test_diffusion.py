"""Diffusion math, respacing, losses, samplers and the DKDM objective, checked against reference vectors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.losses import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, normal_kl
from guided_diffusion.nn import mean_flat
from guided_diffusion.resample import (
    LossSecondMomentResampler,
    UniformSampler,
    create_named_schedule_sampler,
)
from guided_diffusion.respace import SpacedDiffusion, space_timesteps
from guided_diffusion.script_util import (
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)

RTOL = 1e-5
ATOL = 1e-5  # where values pass through zero (reference README)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)


@pytest.fixture(scope="module")
def vectors(reference_dir):
    return torch.load(reference_dir / "vectors.pt", weights_only=True)


def _tiny(vectors, respacing: str):
    args = model_and_diffusion_defaults()
    args.update(vectors["common"])
    args.update(vectors["tiny_arch"])
    args.update(learn_sigma=True, noise_schedule="cosine", diffusion_steps=1000, timestep_respacing=respacing)
    model, diffusion = create_model_and_diffusion(**args)
    model.load_state_dict(vectors["unet_state_dict"], strict=True)
    return model.eval(), diffusion


def _diffusion(steps: int = 20, respacing: str = "", schedule: str = "cosine", **kwargs) -> SpacedDiffusion:
    opts = dict(
        model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=gd.ModelVarType.LEARNED_RANGE,
        loss_type=gd.LossType.MSE,
    )
    opts.update(kwargs)
    return SpacedDiffusion(
        space_timesteps(steps, respacing or str(steps)),
        betas=gd.get_named_beta_schedule(schedule, steps),
        **opts,
    )


class ConstModel(torch.nn.Module):
    """Returns a fixed output (a learnable tensor) and records the timesteps it was called with."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = torch.nn.Parameter(out.clone())
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        self.seen.append(t)
        return self.out


# ------------------------------------------------------------------ reference vectors


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_beta_schedules_match_reference(vectors, name):
    betas = gd.get_named_beta_schedule(name, 1000)
    assert betas.dtype == np.float64
    np.testing.assert_allclose(betas, vectors[f"betas_{name}_1000"].numpy(), rtol=1e-12, atol=0)


def test_spacings_match_reference(vectors):
    keys = [k for k in vectors if k.startswith("space_")]
    assert sorted(keys) == sorted(f"space_{s}" for s in ("50", "100", "ddim25", "10,15,20", "1000"))
    for key in keys:
        expected = vectors[key].tolist() if isinstance(vectors[key], torch.Tensor) else list(vectors[key])
        assert sorted(space_timesteps(1000, key[len("space_") :])) == expected, key


@pytest.mark.parametrize("respacing", ["1000", "50"])
def test_tiny_model_step_matches_reference(vectors, respacing):
    model, diffusion = _tiny(vectors, respacing)
    ref = vectors[f"pmv_{respacing}"]
    with torch.no_grad():
        out = diffusion.p_mean_variance(model, ref["x_t"], ref["t"], clip_denoised=True)
    for key in ("mean", "variance", "log_variance", "pred_xstart", "model_output"):
        close(out[key], ref[key])
    ref = vectors[f"ddim_{respacing}"]
    with torch.no_grad():
        out = diffusion.ddim_sample(model, ref["x_t"], ref["t"], clip_denoised=True, eta=0.0)
    close(out["sample"], ref["sample"])


@pytest.mark.parametrize("respacing", ["1000", "50"])
def test_tiny_model_training_losses_match_reference(vectors, respacing):
    model, diffusion = _tiny(vectors, respacing)
    ref = vectors[f"train_loss_{respacing}"]
    with torch.no_grad():
        terms = diffusion.training_losses(model, ref["x_start"], ref["t"], noise=ref["noise"])
    for key in ("loss", "mse", "vb"):
        close(terms[key], ref[key])


def test_kd_objective_matches_reference(vectors):
    ref = vectors["kd"]
    args = model_and_diffusion_defaults()
    args.update(vectors["common"])
    args.update(ref["student_arch"])
    args.update(learn_sigma=True, noise_schedule="cosine", diffusion_steps=1000, timestep_respacing="1000")
    student, diffusion = create_model_and_diffusion(**args)
    student.load_state_dict(ref["student_state_dict"], strict=True)
    teacher_out = {
        "mean": ref["teacher_mean"],
        "log_variance": ref["teacher_log_variance"],
        "model_output": ref["teacher_model_output"],
    }
    # The DKDM authors' positional call: (model, x_tm1, x_t, t, out, model_kwargs, clip_last, clip_denoised).
    terms = diffusion.training_losses_kd(
        student, ref["x_tm1"], ref["x_t"], ref["t"], teacher_out, {}, False, False
    )
    for key in ("loss", "mse", "vb"):
        assert ref[key].abs().min() > 0, key
        close(terms[key].detach(), ref[key])
    by_keyword = diffusion.training_losses_kd(
        model=student, x_t=ref["x_t"], t=ref["t"], teacher_out=teacher_out, x_tm1=ref["x_tm1"]
    )
    for key in ("loss", "mse", "vb"):
        assert torch.equal(by_keyword[key], terms[key]), key


def test_kd_clip_flags_clamp_the_students_x0_where_the_authors_do():
    """clip_denoised clamps every item's x0 in the vb term, clip_last only the items at t = T-1."""
    diffusion = _diffusion(20)
    x_t = 4 * torch.randn(2, 3, 4, 4)
    t = torch.tensor([19, 5])
    student = ConstModel(3 * torch.randn(2, 6, 4, 4))
    teacher = diffusion.p_mean_variance(ConstModel(torch.randn(2, 6, 4, 4)), x_t, t, clip_denoised=False)

    def vb(**flags):
        return diffusion.training_losses_kd(student, None, x_t, t, teacher, **flags)["vb"].detach()

    plain, last, every = vb(), vb(clip_last=True), vb(clip_denoised=True)
    assert last[0] != plain[0] and last[1] == plain[1]
    assert every[0] == last[0] and every[1] != plain[1]
    with pytest.raises(TypeError, match="both"):
        diffusion.training_losses_kd(student, None, x_t, t, teacher, teacher_out=teacher)
    with pytest.raises(TypeError, match="positional order is the DKDM authors'"):
        diffusion.training_losses_kd(student, x_t, t, teacher)  # the old (model, x_t, t, teacher_out) order


# ------------------------------------------------------------------ diffusion math


def test_oracle_eps_recovers_x0_and_ddim_lands_on_forward_marginal():
    diffusion = _diffusion(40, "10", model_var_type=gd.ModelVarType.FIXED_SMALL)
    torch.manual_seed(0)
    x0 = torch.rand(3, 3, 8, 8) * 1.6 - 0.8
    noise = torch.randn_like(x0)
    t = torch.tensor([9, 5, 1])
    x_t = diffusion.q_sample(x0, t, noise)
    oracle = ConstModel(noise)
    out = diffusion.p_mean_variance(oracle, x_t, t, clip_denoised=False)
    # float32 tables: at the noisiest step eps is amplified by sqrt(1 / alphabar - 1) ~ 60.
    torch.testing.assert_close(out["pred_xstart"], x0, rtol=0, atol=1e-3)
    step = diffusion.ddim_sample(oracle, x_t, t, clip_denoised=False)
    torch.testing.assert_close(step["sample"], diffusion.q_sample(x0, t - 1, noise), rtol=1e-4, atol=1e-4)
    back = diffusion.ddim_reverse_sample(oracle, step["sample"], t - 1, clip_denoised=False)
    torch.testing.assert_close(back["sample"], x_t, rtol=1e-4, atol=1e-4)
    # The posterior mean at the true x0 equals the model mean for an oracle.
    true_mean, _, _ = diffusion.q_posterior_mean_variance(x0, x_t, t)
    torch.testing.assert_close(out["mean"], true_mean, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "var_type", [gd.ModelVarType.FIXED_SMALL, gd.ModelVarType.FIXED_LARGE, gd.ModelVarType.LEARNED]
)
def test_variance_types(var_type):
    diffusion = _diffusion(10, model_var_type=var_type)
    x = torch.randn(2, 3, 4, 4)
    t = torch.tensor([0, 7])
    channels = 6 if var_type == gd.ModelVarType.LEARNED else 3
    out = diffusion.p_mean_variance(ConstModel(torch.full((2, channels, 4, 4), -2.0)), x, t)
    expected = {
        gd.ModelVarType.FIXED_SMALL: diffusion.posterior_variance[[0, 7]],
        gd.ModelVarType.FIXED_LARGE: [diffusion.posterior_variance[1], diffusion.betas[7]],
        gd.ModelVarType.LEARNED: [math.exp(-2.0)] * 2,
    }[var_type]
    torch.testing.assert_close(out["variance"][:, 0, 0, 0], torch.tensor(expected, dtype=torch.float32))
    with pytest.raises(ValueError, match="output channels"):
        diffusion.p_mean_variance(ConstModel(torch.zeros(2, 9 - channels, 4, 4)), x, t)


def test_spaced_diffusion_keeps_alpha_bars_and_maps_timesteps():
    base = gd.GaussianDiffusion(
        betas=gd.get_named_beta_schedule("linear", 100),
        model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=gd.ModelVarType.FIXED_SMALL,
        loss_type=gd.LossType.MSE,
    )
    spaced = _diffusion(100, "ddim10", schedule="linear", model_var_type=gd.ModelVarType.FIXED_SMALL)
    assert spaced.timestep_map == list(range(0, 100, 10))
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[spaced.timestep_map], rtol=1e-12)
    model = ConstModel(torch.zeros(2, 3, 4, 4))
    spaced.p_mean_variance(model, torch.zeros(2, 3, 4, 4), torch.tensor([0, 9]))
    assert model.seen[-1].tolist() == [0, 90]
    rescaled = _diffusion(
        100, "ddim10", schedule="linear", model_var_type=gd.ModelVarType.FIXED_SMALL, rescale_timesteps=True
    )
    rescaled.training_losses(model, torch.zeros(2, 3, 4, 4), torch.tensor([1, 9]))
    assert model.seen[-1].dtype == torch.float32 and model.seen[-1].tolist() == [100.0, 900.0]


def test_device_tables_are_built_once():
    diffusion = _diffusion(10)
    diffusion.cache_tables("cpu")
    cached = dict(diffusion._device_tables)
    assert len(cached) == len(gd.GaussianDiffusion._TABLES)
    diffusion.training_losses(
        ConstModel(torch.zeros(2, 6, 4, 4)), torch.zeros(2, 3, 4, 4), torch.tensor([0, 3])
    )
    assert diffusion._device_tables.keys() == cached.keys()
    assert all(diffusion._device_tables[k] is v for k, v in cached.items())
    assert diffusion.timestep_map_tensor(torch.device("cpu")) is diffusion.timestep_map_tensor(
        torch.device("cpu")
    )


def test_training_losses_terms_and_scaling():
    torch.manual_seed(1)
    x0 = torch.rand(4, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 3, 7, 9])
    out = torch.cat([noise, torch.zeros_like(noise)], dim=1)
    plain = _diffusion(20, "10").training_losses(ConstModel(out), x0, t, noise=noise)
    assert torch.all(plain["mse"] == 0)
    close(plain["loss"], plain["vb"])
    rescaled = _diffusion(20, "10", loss_type=gd.LossType.RESCALED_MSE).training_losses(
        ConstModel(out), x0, t, noise=noise
    )
    close(rescaled["vb"], plain["vb"] * (10 / 1000))
    kl = _diffusion(20, "10", loss_type=gd.LossType.RESCALED_KL).training_losses(
        ConstModel(out), x0, t, noise=noise
    )
    close(kl["loss"], plain["vb"] * 10)
    fixed = _diffusion(20, "10", model_var_type=gd.ModelVarType.FIXED_SMALL)
    terms = fixed.training_losses(ConstModel(noise + 1), x0, t, noise=noise)
    assert set(terms) == {"loss", "mse"}
    close(terms["mse"], torch.ones(4))


def test_vb_term_trains_only_the_variance_half():
    diffusion = _diffusion(10)
    model = ConstModel(torch.randn(2, 6, 4, 4) * 0.3)
    terms = diffusion.training_losses(model, torch.rand(2, 3, 4, 4) - 0.5, torch.tensor([0, 5]))
    (grad,) = torch.autograd.grad(terms["vb"].sum(), model.out)
    assert torch.all(grad[:, :3] == 0) and grad[:, 3:].abs().sum() > 0


def test_p_sample_returns_teacher_quantities_and_no_noise_at_zero():
    diffusion = _diffusion(10)
    x = torch.randn(2, 3, 4, 4)
    out = diffusion.p_sample(ConstModel(torch.randn(2, 6, 4, 4)), x, torch.tensor([0, 4]))
    assert {"sample", "pred_xstart", "mean", "variance", "log_variance", "model_output"} <= set(out)
    close(out["sample"][0], out["mean"][0])
    assert not torch.allclose(out["sample"][1], out["mean"][1])


@pytest.mark.parametrize("loop", ["p_sample_loop_progressive", "ddim_sample_loop_progressive"])
@pytest.mark.parametrize("flag", ["clip_first", "clip_last"])
def test_clip_first_and_last(loop, flag):
    diffusion = _diffusion(20, "5")
    model = ConstModel(torch.cat([torch.full((2, 3, 4, 4), -3.0), torch.zeros(2, 3, 4, 4)], dim=1))
    noise = torch.full((2, 3, 4, 4), 2.5)
    steps = list(
        getattr(diffusion, loop)(model, (2, 3, 4, 4), noise=noise, clip_denoised=False, **{flag: True})
    )
    inside = [bool(s["pred_xstart"].abs().max() <= 1) for s in steps]
    expected = [False] * len(steps)
    expected[0 if flag == "clip_first" else -1] = True
    assert inside == expected
    clipped = list(getattr(diffusion, loop)(model, (2, 3, 4, 4), noise=noise, clip_denoised=True))
    assert all(s["pred_xstart"].abs().max() <= 1 for s in clipped)


def test_sample_loops_are_reproducible():
    diffusion = _diffusion(20, "4")
    model = ConstModel(torch.randn(2, 6, 8, 8))
    for name in ("p_sample_loop", "ddim_sample_loop"):
        torch.manual_seed(3)
        a = getattr(diffusion, name)(model, (2, 3, 8, 8))
        torch.manual_seed(3)
        b = getattr(diffusion, name)(model, (2, 3, 8, 8), progress=True)
        assert a.shape == (2, 3, 8, 8) and torch.isfinite(a).all() and a.abs().max() <= 1
        torch.testing.assert_close(a, b)
    assert [t.tolist() for t in model.seen[:4]] == [[19, 19], [13, 13], [6, 6], [0, 0]]


def test_calc_bpd_loop_adds_up():
    diffusion = _diffusion(6)
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    out = diffusion.calc_bpd_loop(ConstModel(torch.zeros(2, 6, 4, 4)), x0, clip_denoised=False)
    assert out["vb"].shape == (2, 6) and out["mse"].shape == (2, 6) and out["xstart_mse"].shape == (2, 6)
    close(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"])
    assert torch.all(out["prior_bpd"] >= 0)


# ------------------------------------------------------------------ DKDM objective


def test_kd_self_distillation_is_zero_and_gradients_split():
    diffusion = _diffusion(20, "10")
    torch.manual_seed(2)
    x_t = torch.randn(3, 3, 4, 4)
    t = torch.tensor([0, 4, 9])
    student = ConstModel(torch.randn(3, 6, 4, 4) * 0.5)
    with torch.no_grad():
        teacher = diffusion.p_sample(student, x_t, t, clip_denoised=False)
    terms = diffusion.training_losses_kd(student, x_t=x_t, t=t, out=teacher, x_tm1=teacher["sample"])
    close(terms["loss"], torch.zeros(3))
    shifted = {  # means apart too: at equal means the KL's mean gradient is zero whether frozen or not
        **teacher,
        "mean": teacher["mean"] + 0.3,
        "model_output": teacher["model_output"] + 1,
        "log_variance": teacher["log_variance"] + 1,
    }
    terms = diffusion.training_losses_kd(student, x_t=x_t, t=t, out=shifted, x_tm1=teacher["sample"])
    close(terms["mse"], torch.ones(3))
    (grad_vb,) = torch.autograd.grad(terms["vb"].sum(), student.out, retain_graph=True)
    (grad_mse,) = torch.autograd.grad(terms["mse"].sum(), student.out)
    assert torch.all(grad_vb[:, :3] == 0) and grad_vb[:, 3:].abs().sum() > 0
    assert torch.all(grad_mse[:, 3:] == 0) and grad_mse[:, :3].abs().sum() > 0


def test_kd_kl_direction_decoder_option_and_rescaling():
    diffusion = _diffusion(20, "10")
    x_t = torch.randn(2, 3, 4, 4)
    t = torch.tensor([0, 6])
    student = ConstModel(torch.randn(2, 6, 4, 4) * 0.5)
    own = diffusion.p_mean_variance(student, x_t, t, clip_denoised=False)
    teacher = {
        "mean": own["mean"] + 0.1,
        "log_variance": own["log_variance"] - 0.5,
        "model_output": own["model_output"],
    }
    x_tm1 = torch.rand(2, 3, 4, 4) * 2 - 1
    terms = diffusion.training_losses_kd(student, x_t=x_t, t=t, out=teacher, x_tm1=x_tm1)
    kl = normal_kl(teacher["mean"], teacher["log_variance"], own["mean"], own["log_variance"])
    close(terms["vb"].detach(), mean_flat(kl) / math.log(2))
    nll = -discretized_gaussian_log_likelihood(x_tm1, means=own["mean"], log_scales=0.5 * own["log_variance"])
    with_nll = diffusion.training_losses_kd(
        student, x_t=x_t, t=t, out=teacher, x_tm1=x_tm1, decoder_nll_at_t0=True
    )
    close(with_nll["vb"][0].detach(), mean_flat(nll)[0] / math.log(2))
    close(with_nll["vb"][1].detach(), terms["vb"][1].detach())
    rescaled = _diffusion(20, "10", loss_type=gd.LossType.RESCALED_MSE)
    close(
        rescaled.training_losses_kd(student, x_t=x_t, t=t, out=teacher)["vb"].detach(),
        terms["vb"].detach() / 100,
    )
    with pytest.raises(KeyError, match="model_output"):
        diffusion.training_losses_kd(
            student, x_t=x_t, t=t, out={"mean": own["mean"], "log_variance": own["log_variance"]}
        )


def test_kd_vb_explodes_at_the_noisiest_step_unless_the_student_x0_is_clamped_too():
    """Why vb reaches 1e3+ bits in DKDM: the teacher's step clamps its x0, the authors' vb term computes the
    student's mean from an unclamped x0, and at t = T-1 (alphabar ~ 0) clamping moves x0 by orders of
    magnitude. Even a student equal to the teacher then pays a large vb there; `clip_denoised` removes it."""
    diffusion = _diffusion(20)
    x_t = torch.randn(4, 3, 4, 4)
    net = ConstModel(torch.cat([0.3 * torch.randn(4, 3, 4, 4), torch.zeros(4, 3, 4, 4)], dim=1))
    for step, noisy in ((19, True), (10, False)):
        t = torch.full((4,), step)
        teacher = diffusion.p_mean_variance(net, x_t, t, clip_denoised=True)
        authors = diffusion.training_losses_kd(net, None, x_t, t, teacher)["vb"].detach()
        clamped = diffusion.training_losses_kd(net, None, x_t, t, teacher, clip_denoised=True)["vb"].detach()
        assert torch.all(clamped.abs() < 1e-5)
        assert bool(torch.all(authors > 1.0)) == noisy


def test_kd_input_perturb_shifts_the_student_input():
    diffusion = _diffusion(20, "10")
    x_t = torch.randn(2, 3, 4, 4)
    t = torch.tensor([2, 8])
    noise = torch.randn_like(x_t)
    student = ConstModel(torch.randn(2, 6, 4, 4) * 0.5)
    teacher = diffusion.p_mean_variance(student, x_t, t)
    perturbed = diffusion.training_losses_kd(
        student, x_t=x_t, t=t, out=teacher, input_perturb=0.1, noise=noise
    )
    sigma = torch.from_numpy(diffusion.sqrt_one_minus_alphas_cumprod[[2, 8]]).float().view(-1, 1, 1, 1)
    manual = diffusion.training_losses_kd(student, x_t=x_t + 0.1 * sigma * noise, t=t, out=teacher)
    close(perturbed["vb"].detach(), manual["vb"].detach())
    unperturbed = diffusion.training_losses_kd(student, x_t=x_t, t=t, out=teacher)
    assert not torch.allclose(perturbed["vb"], unperturbed["vb"])


# ------------------------------------------------------------------ losses, spacing and schedule errors


def test_normal_kl_and_discretized_likelihood():
    m, lv = torch.randn(5), torch.randn(5)
    close(normal_kl(m, lv, m, lv), torch.zeros(5))
    close(
        normal_kl(torch.tensor(1.0), 0.0, 0.0, math.log(4.0)),
        torch.tensor(0.5 * (-1 + math.log(4) + 0.25 + 0.25)),
    )
    x = torch.linspace(-4, 4, 101)
    np.testing.assert_allclose(approx_standard_normal_cdf(x).numpy(), norm.cdf(x.numpy()), atol=1e-3)
    levels = torch.linspace(-1, 1, 256)
    log_p = discretized_gaussian_log_likelihood(
        levels, means=torch.full((256,), 0.3), log_scales=torch.full((256,), math.log(0.2))
    )
    assert abs(log_p.exp().sum().item() - 1.0) < 1e-4
    with pytest.raises(ValueError, match="shape mismatch"):
        discretized_gaussian_log_likelihood(levels, means=torch.zeros(3), log_scales=torch.zeros(256))


def test_bad_inputs_raise():
    with pytest.raises(NotImplementedError, match="quadratic"):
        gd.get_named_beta_schedule("quadratic", 10)
    with pytest.raises(ValueError, match="ddim7"):
        space_timesteps(10, "ddim7")
    with pytest.raises(ValueError, match="5 steps from a section of 4"):
        space_timesteps(10, "5,1,1")
    with pytest.raises(ValueError, match="comma-separated"):
        space_timesteps(10, "fast")
    with pytest.raises(ValueError, match="subset"):
        SpacedDiffusion([0, 120], **_diffusion_kwargs(100))
    with pytest.raises(ValueError, match="eta=0.5"):
        _diffusion(10).ddim_reverse_sample(
            ConstModel(torch.zeros(1, 6, 2, 2)), torch.zeros(1, 3, 2, 2), torch.tensor([1]), eta=0.5
        )
    with pytest.raises(ValueError, match="MSE"):
        _diffusion(10, loss_type=gd.LossType.KL).training_losses_kd(
            ConstModel(torch.zeros(1, 6, 2, 2)), None, torch.zeros(1, 3, 2, 2), torch.tensor([1]), {}
        )


def _diffusion_kwargs(steps: int) -> dict:
    return dict(
        betas=gd.get_named_beta_schedule("linear", steps),
        model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=gd.ModelVarType.FIXED_SMALL,
        loss_type=gd.LossType.MSE,
    )


def test_start_x_and_previous_x_mean_types():
    torch.manual_seed(4)
    x0 = torch.rand(2, 3, 4, 4) * 1.6 - 0.8
    t = torch.tensor([3, 7])
    noise = torch.randn_like(x0)
    start = _diffusion(
        10, model_var_type=gd.ModelVarType.FIXED_SMALL, model_mean_type=gd.ModelMeanType.START_X
    )
    x_t = start.q_sample(x0, t, noise)
    out = start.p_mean_variance(ConstModel(x0), x_t, t, clip_denoised=False)
    close(out["pred_xstart"], x0)
    prev = _diffusion(
        10, model_var_type=gd.ModelVarType.FIXED_SMALL, model_mean_type=gd.ModelMeanType.PREVIOUS_X
    )
    post_mean, _, _ = prev.q_posterior_mean_variance(x0, x_t, t)
    out = prev.p_mean_variance(ConstModel(post_mean), x_t, t, clip_denoised=False)
    torch.testing.assert_close(out["pred_xstart"], x0, rtol=1e-4, atol=1e-4)
    terms = prev.training_losses(ConstModel(post_mean), x0, t, noise=noise)
    close(terms["mse"], torch.zeros(2))
    close(start.training_losses(ConstModel(x0), x0, t, noise=noise)["loss"], torch.zeros(2))


# ------------------------------------------------------------------ timestep samplers


def test_uniform_sampler():
    sampler = create_named_schedule_sampler("uniform", _diffusion(10))
    assert isinstance(sampler, UniformSampler)
    np.random.seed(0)
    t, w = sampler.sample(64, "cpu")
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 9 and len(set(t.tolist())) > 5
    assert torch.all(w == 1)
    with pytest.raises(NotImplementedError, match="nope"):
        create_named_schedule_sampler("nope", _diffusion(10))


def test_loss_second_moment_sampler():
    sampler = create_named_schedule_sampler("loss-second-moment", _diffusion(4))
    assert isinstance(sampler, LossSecondMomentResampler)
    np.testing.assert_array_equal(sampler.weights(), np.ones(4))
    for _ in range(sampler.history_per_term):
        sampler.update_with_local_losses(torch.arange(4), torch.tensor([1.0, 1.0, 2.0, 4.0]))
    w = sampler.weights()
    expected = np.array([1.0, 1.0, 2.0, 4.0]) / 8 * (1 - 0.001) + 0.001 / 4
    np.testing.assert_allclose(w, expected)
    np.random.seed(1)
    t, weights = sampler.sample(256, "cpu")
    np.testing.assert_allclose(weights.numpy(), 1 / (4 * expected[t.numpy()]), rtol=1e-6)
    assert (t == 3).sum() > (t == 0).sum()
    # A new loss pushes out the oldest entry of its timestep's history.
    sampler.update_with_all_losses([0], [11.0])
    assert sampler._loss_history[0, -1] == 11.0 and sampler._loss_history[0, :-1].tolist() == [1.0] * 9


_GATHER_WORKER = """
import sys, torch, torch.distributed as dist
from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.resample import LossSecondMomentResampler
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
betas = gd.get_named_beta_schedule("linear", 100)[:3]
diffusion = gd.GaussianDiffusion(
    betas=betas, model_mean_type=gd.ModelMeanType.EPSILON,
    model_var_type=gd.ModelVarType.FIXED_SMALL, loss_type=gd.LossType.MSE,
)
sampler = LossSecondMomentResampler(diffusion, history_per_term=2)
ts = torch.tensor([0, 1, 2] if rank == 0 else [2])  # unequal batch sizes exercise the padding
losses = torch.tensor([1.0, 2.0, 3.0] if rank == 0 else [5.0])
sampler.update_with_local_losses(ts, losses)
sampler.update_with_local_losses(ts, losses)
print(sampler._loss_counts.tolist(), sampler._loss_history.tolist())
dist.destroy_process_group()
"""


def test_loss_aware_sampler_gathers_all_ranks(tmp_path):
    import subprocess
    import sys

    store = tmp_path / "store"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _GATHER_WORKER, str(rank), str(store)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    expected = "[2, 2, 2] [[1.0, 1.0], [2.0, 2.0], [3.0, 5.0]]"  # t=2 saw 3 (rank 0), 5 (rank 1) twice
    assert [out.strip() for out, _ in outputs] == [expected, expected]
