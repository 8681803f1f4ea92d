"""The RCFD/RDD diffusion against shared/reference/rdd: the float64 schedule, the N=4 student grid, the
4-step DDIM trajectory (and the 8-step teacher's), and the progressive-distillation target and loss."""

from __future__ import annotations

import pytest
import torch

from guided_diffusion.ddpm_diffusion import DDPMSchedule, ddim_sample, pd_target, truncated_snr_loss
from guided_diffusion.ddpm_unet import DDPMUNet

torch.set_num_threads(1)
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def ref(reference_dir):
    return torch.load(reference_dir / "rdd" / "vectors.pt", weights_only=True)


def _unet(ref, overrides=None):
    model = DDPMUNet(**ref["unet"]["config"])
    model.load_state_dict({**ref["unet"]["state_dict"], **(overrides or {})})
    return model.eval().requires_grad_(False)


def test_schedule_tables_are_the_authors(ref):
    schedule = DDPMSchedule(ref["schedule"]["T_total"])
    for name in ("betas", "alphas_bar", "sqrt_alphas_bar", "sqrt_one_minus_alphas_bar"):
        table = getattr(schedule, name)
        assert table.dtype == torch.float64 and table.shape == (ref["schedule"]["n_betas"],)
        torch.testing.assert_close(table, ref["schedule"][name], rtol=1e-12, atol=0)
    grid = ref["grid"]
    index = torch.tensor(grid["student_sample_index"])
    torch.testing.assert_close(schedule.alphas_bar[index], grid["alpha_bar_at_student_sample_index"])
    student = [s * grid["student_time_scale"] for s in grid["student_sample_steps"]]
    assert student == grid["student_sample_index"]
    teacher = [s * grid["teacher_time_scale"] for s in range(grid["teacher_T"], -1, -1)]
    assert teacher == grid["teacher_index_grid"]


def test_ddim_trajectory_of_the_student_and_the_teacher(ref):
    d = ref["ddim"]
    model, schedule = _unet(ref), DDPMSchedule()
    trace = []
    with torch.no_grad():
        final = ddim_sample(model, schedule, d["x_T"], steps=4, time_scale=256, trace=trace)
        teacher_final = ddim_sample(model, schedule, d["x_T"], steps=8, time_scale=128)
        strided = ddim_sample(model, schedule, d["x_T"], steps=1024, time_scale=1, stride=256)
    for i, step in enumerate(trace):
        torch.testing.assert_close(step["z"], d["z"][i], **TOL)
        torch.testing.assert_close(step["x0_raw"], d["x0_raw"][i], **TOL)
        torch.testing.assert_close(step["x0"], d["x0_clipped"][i], **TOL)
        torch.testing.assert_close(step["eps"], d["eps"][i], **TOL)
    torch.testing.assert_close(final, d["final"], **TOL)
    torch.testing.assert_close(final, d["z"][-1], **TOL)
    torch.testing.assert_close(teacher_final, d["teacher_2N_step_final"], **TOL)
    assert torch.equal(strided, final)  # the same indices, hence the same computation


def test_pd_target_and_truncated_snr_loss(ref):
    p = ref["pd"]
    teacher = _unet(ref)
    student = _unet(ref, p["student_state_dict_overrides"])
    schedule = DDPMSchedule()
    t, scale = p["t"], p["teacher_sampler"]["time_scale"]
    z_t = schedule.q_sample(p["x_0"], t * scale, p["noise"])
    torch.testing.assert_close(z_t, p["z_t"], **TOL)
    states = pd_target(teacher, schedule, z_t, t, scale)
    pairs = {"teacher_x0_tm0": "teacher_x0_t", "teacher_eps_tm0": "teacher_eps_t",
             "teacher_x0_tm1": "teacher_x0_tm1", "teacher_eps_tm1": "teacher_eps_tm1", "z_tm1": "z_tm1",
             "z_tm2": "z_tm2", "x_target": "x_target", "eps_target": "eps_target"}
    for ours, theirs in pairs.items():
        size = float(p[theirs].abs().max())  # eps near t = 0 divides by a small sqrt(1 - alpha_bar)
        torch.testing.assert_close(states[ours], p[theirs], rtol=1e-5, atol=1e-5 * size, msg=ours)
    assert torch.equal(t * scale, p["t_index"]) and torch.equal((t - 2) * scale, p["tm2_index"])
    x0_pred = student(z_t, t * scale, None)
    torch.testing.assert_close(x0_pred, p["student_x0"], **TOL)
    out = truncated_snr_loss(schedule, z_t, t * scale, x0_pred, states["x_target"], states["eps_target"])
    torch.testing.assert_close(out["eps"], p["student_eps"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["x0_mse"], p["loss_x0_per_item"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["eps_mse"], p["loss_eps_per_item"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["loss"], p["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], p["loss_via_rdd_logits"], rtol=1e-5, atol=1e-6)


def test_a_stride_that_does_not_divide_the_steps_starts_at_its_largest_multiple():
    """The authors' ddim walks reversed(range(stride, T + 1, stride)): 8 steps at stride 3 visit 6, 3."""
    schedule = DDPMSchedule()
    seen = []

    def model(z, index, y):
        seen.append(int(index[0]))
        return torch.zeros_like(z)

    ddim_sample(model, schedule, torch.zeros(1, 3, 4, 4), steps=8, time_scale=128, stride=3)
    assert seen == [6 * 128, 3 * 128]
