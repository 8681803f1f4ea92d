"""distill/targets.py against the diffusion's own arithmetic: x_0 read from a raw eps or x_0 output (the
relational term's input), the DDIM target's dtype, and the parameterisations x0_to_prediction writes."""

from __future__ import annotations

import pytest
import torch

from guided_diffusion.distill.targets import ddim_target, pred_xstart_from_output, x0_to_prediction
from guided_diffusion.gaussian_diffusion import ModelMeanType
from guided_diffusion.script_util import create_gaussian_diffusion


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x_t, raw = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    return x_t, raw, torch.tensor([0, 7, 19])


def test_x0_from_an_eps_output_is_the_diffusions_own_and_drops_the_sigma_half():
    diffusion = create_gaussian_diffusion(steps=20, learn_sigma=True, noise_schedule="cosine")
    x_t, raw, t = _batch()
    x0 = pred_xstart_from_output(diffusion, x_t, t, raw)  # raw: eps in channels 0-1, sigma in 2-3
    expected = diffusion._predict_xstart_from_eps(x_t.double(), t, raw[:, :2].double())
    assert x0.dtype == torch.float32 and x0.shape == x_t.shape
    torch.testing.assert_close(x0.double(), expected, rtol=1e-5, atol=1e-5)


def test_x0_from_an_x0_output_is_the_output_and_other_means_are_refused():
    diffusion = create_gaussian_diffusion(steps=20, learn_sigma=True, predict_xstart=True,
                                          noise_schedule="cosine")
    x_t, raw, t = _batch(1)
    assert torch.equal(pred_xstart_from_output(diffusion, x_t, t, raw), raw[:, :2])
    diffusion.model_mean_type = ModelMeanType.PREVIOUS_X
    with pytest.raises(ValueError, match="cannot read x_0 from a ModelMeanType.PREVIOUS_X model output"):
        pred_xstart_from_output(diffusion, x_t, t, raw)


def test_ddim_target_comes_back_in_the_inputs_dtype():
    diffusion = create_gaussian_diffusion(steps=20, timestep_respacing="10", noise_schedule="cosine")
    x_t, raw, t = _batch(2)
    t = t.clamp_max(9)
    for dtype in (torch.float32, torch.float64):
        assert ddim_target(diffusion, x_t.to(dtype), t, raw[:, :2].to(dtype)).dtype == dtype


def test_x0_rewritten_as_eps_and_v_reads_back_the_same_x0():
    diffusion = create_gaussian_diffusion(steps=20, noise_schedule="cosine")
    x_t, raw, t = _batch(3)
    x0 = raw[:, :2]
    a = torch.as_tensor(diffusion.alphas_cumprod)[t].view(-1, 1, 1, 1)
    eps = x0_to_prediction(diffusion, x0, x_t, t, "eps")
    torch.testing.assert_close(eps, (x_t.double() - a.sqrt() * x0.double()) / (1 - a).sqrt())
    v = x0_to_prediction(diffusion, x0, x_t, t, "v")
    torch.testing.assert_close(v, a.sqrt() * eps - (1 - a).sqrt() * x0.double())
    assert x0_to_prediction(diffusion, x0, x_t, t, "x0").dtype == torch.float64
