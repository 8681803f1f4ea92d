"""DKDMObjective hands the batch to training_losses_kd as it is: the class labels reach the student, the
authors' input perturbation moves what the student sees, and the raw output is kept for the other terms."""

from __future__ import annotations

import torch

from guided_diffusion.distill.dkdm.objective import DKDMObjective
from guided_diffusion.script_util import create_gaussian_diffusion


class RecordingStudent(torch.nn.Module):
    """Returns x * w and records the input and keyword arguments of each call."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))
        self.calls: list[tuple[torch.Tensor, dict]] = []

    def forward(self, x, t, **kwargs):
        self.calls.append((x.detach().clone(), kwargs))
        return x * self.w


def _batch():
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 1, 2, 2, generator=g)
    teacher = {"mean": torch.zeros_like(x_t), "log_variance": torch.zeros_like(x_t),
               "model_output": torch.randn(2, 1, 2, 2, generator=g)}
    return {"x_tm1": None, "x_t": x_t, "t": torch.tensor([3, 8]), "teacher_out": teacher,
            "model_kwargs": {"y": torch.tensor([4, 1])}}


def test_labels_reach_the_student_and_the_mse_is_against_the_teachers_output():
    diffusion = create_gaussian_diffusion(steps=10, noise_schedule="cosine")
    student, batch = RecordingStudent(), _batch()
    terms = DKDMObjective(diffusion)(student, batch)
    x, kwargs = student.calls[0]
    assert torch.equal(x, batch["x_t"]) and torch.equal(kwargs["y"], torch.tensor([4, 1]))
    expected = ((batch["teacher_out"]["model_output"] - 0.5 * batch["x_t"]) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(terms["mse"], expected)
    assert torch.equal(batch["student_output"], 0.5 * batch["x_t"])


def test_input_perturbation_moves_the_students_input_by_its_noise_scale():
    diffusion = create_gaussian_diffusion(steps=10, noise_schedule="cosine")
    student, batch = RecordingStudent(), _batch()
    torch.manual_seed(7)
    DKDMObjective(diffusion, input_perturb=0.1)(student, batch)
    torch.manual_seed(7)
    noise = torch.randn_like(batch["x_t"])
    scale = torch.as_tensor(diffusion.sqrt_one_minus_alphas_cumprod, dtype=torch.float32)[batch["t"]]
    torch.testing.assert_close(student.calls[0][0], batch["x_t"] + scale.view(-1, 1, 1, 1) * 0.1 * noise)


def test_the_student_x0_is_not_clipped_in_the_vb_term_unless_asked():
    diffusion = create_gaussian_diffusion(steps=10, noise_schedule="cosine", learn_sigma=True)
    batch = _batch()
    batch["x_t"] = batch["x_t"] * 4  # the student's x_0 leaves [-1, 1], where clipping changes the vb term

    def student(x, t, **kwargs):
        return torch.cat([x * 0.5, torch.zeros_like(x)], dim=1)

    def kd(clip):
        return diffusion.training_losses_kd(student, None, batch["x_t"], batch["t"], batch["teacher_out"],
                                            model_kwargs=batch["model_kwargs"], clip_denoised=clip)["vb"]

    default = DKDMObjective(diffusion)(student, dict(batch))["vb"]
    assert torch.equal(default, kd(False)) and not torch.allclose(default, kd(True))
    clipped = DKDMObjective(diffusion, student_clip_denoised=True)(student, dict(batch))["vb"]
    torch.testing.assert_close(clipped, kd(True))
