"""GaussianDiffusion's steps written out in float64 from its own schedule: q(x_t | x_0), a DDIM step with
eta > 0 (its sigma and its noise), score guidance in DDIM, and the arguments a step hands to the model.
test_diffusion.py pins reference vectors; these catch a wrong term where the reference runs eta = 0 or no
guidance (mutation testing found both)."""

from __future__ import annotations

import torch

from guided_diffusion.script_util import create_gaussian_diffusion

# The diffusion reads its schedule from cached float32 tables; the hand computation is float64 throughout.
TOL = dict(rtol=1e-5, atol=1e-6)


class FixedX0:
    """An x_0-predicting 'network' with a fixed output that records its labels."""

    def __init__(self, x0: torch.Tensor) -> None:
        self.x0, self.labels = x0, []

    def __call__(self, x, t, **kwargs):
        self.labels.append(kwargs.get("y"))
        return self.x0.clone()


def _setup():
    diffusion = create_gaussian_diffusion(steps=20, noise_schedule="cosine", predict_xstart=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    model = FixedX0(torch.rand(3, 2, 4, 4, generator=g, dtype=torch.float64) - 0.5)
    t = torch.tensor([0, 6, 19])
    a = torch.as_tensor(diffusion.alphas_cumprod)[t].view(-1, 1, 1, 1)
    a_prev = torch.as_tensor(diffusion.alphas_cumprod_prev)[t].view(-1, 1, 1, 1)
    return diffusion, x, model, t, a, a_prev


def test_q_mean_variance_is_sqrt_alphabar_x0_and_one_minus_alphabar():
    diffusion, x, _, t, a, _ = _setup()
    mean, variance, log_variance = diffusion.q_mean_variance(x, t)
    torch.testing.assert_close(mean, a.sqrt() * x, **TOL)
    torch.testing.assert_close(variance.double(), (1 - a).expand_as(x), **TOL)
    torch.testing.assert_close(log_variance.double(), (1 - a).log().expand_as(x), **TOL)


def test_ddim_step_with_eta_adds_sigma_times_its_noise_except_at_t0():
    diffusion, x, model, t, a, a_prev = _setup()
    y = torch.tensor([1, 2, 3])
    torch.manual_seed(5)
    out = diffusion.ddim_sample(model, x, t, clip_denoised=False, model_kwargs={"y": y}, eta=0.7)
    torch.manual_seed(5)
    noise = torch.randn_like(x)
    x0 = model.x0
    eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
    sigma = 0.7 * ((1 - a_prev) / (1 - a)).sqrt() * (1 - a / a_prev).sqrt()
    mean = x0 * a_prev.sqrt() + (1 - a_prev - sigma**2).sqrt() * eps
    expected = mean + (t != 0).view(-1, 1, 1, 1) * sigma * noise
    torch.testing.assert_close(out["sample"], expected, **TOL)
    assert (sigma[1:] > 0.01).all() and torch.equal(model.labels[0], y)


def test_ddim_step_under_score_guidance_and_a_denoised_fn():
    diffusion, x, model, t, a, a_prev = _setup()
    y = torch.tensor([4, 5, 6])
    grads = []

    def cond_fn(x_in, t_in, y=None):
        grads.append(y)
        return torch.full_like(x_in, 0.3)

    out = diffusion.ddim_sample(model, x, t, clip_denoised=False, denoised_fn=lambda z: z * 0.5,
                                cond_fn=cond_fn, model_kwargs={"y": y})
    x0 = model.x0 * 0.5
    eps = (x - a.sqrt() * x0) / (1 - a).sqrt() - (1 - a).sqrt() * 0.3
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    torch.testing.assert_close(out["pred_xstart"], x0, **TOL)
    torch.testing.assert_close(out["sample"], x0 * a_prev.sqrt() + (1 - a_prev).sqrt() * eps, **TOL)
    assert torch.equal(grads[0], y)
