"""The README's RDD command, one batch, against shared/reference/rdd: each term, their total, the queue
after the call, and the student's gradient norm before clipping; PD's loss through the same objective."""

from __future__ import annotations

import pytest
import torch

from guided_diffusion.ddpm_unet import DDPMUNet
from guided_diffusion.distill.densenet import CifarDenseNet
from guided_diffusion.distill.rdd import RDDObjective, pd_defaults, resolve_rdd_config
from guided_diffusion.distill.rdd_losses import MemoryP2PLoss

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ref(reference_dir):
    return torch.load(reference_dir / "rdd" / "vectors.pt", weights_only=True)


def _unets(ref):
    cfg, state = ref["unet"]["config"], ref["unet"]["state_dict"]
    teacher, student = DDPMUNet(**cfg), DDPMUNet(**cfg)
    teacher.load_state_dict(state)
    student.load_state_dict({**state, **ref["pd"]["student_state_dict_overrides"]})
    return teacher.eval().requires_grad_(False), student.eval()


def test_readme_command_terms_total_queue_and_grad_norm(ref):
    c, p = ref["composition"], ref["pd"]
    teacher, student = _unets(ref)
    classifier = CifarDenseNet(**c["classifier"]["config"], num_classes=10)
    classifier.load_state_dict(c["classifier"]["state_dict"])
    classifier.eval().requires_grad_(False)
    init = c["memory_loss"]["state_dict_initial"]
    memory = MemoryP2PLoss(32, 32, pixel_memory_size=init["teacher_pixel_queue"].shape[0],
                           pixel_contrast_size=c["memory_loss"]["sampled_indices"].shape[0])
    memory.load_state_dict(init)
    memory.train()
    objective = RDDObjective(teacher, 8, 128, {}, classifier=classifier, memory=memory)
    terms = objective(student, p["x_0"], p["y"], t=p["t"], noise=p["noise"], perm=c["memory_loss"]["perm"])
    assert set(terms) == {"memory_p2p", "intra_p2p", "rcfd_kl", "x0_mse", "loss"}
    for name in ("memory_p2p", "intra_p2p", "rcfd_kl"):
        torch.testing.assert_close(terms[name], c["terms"][name], rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(terms["loss"], c["total"], rtol=1e-5, atol=1e-7)
    queue_after = c["memory_loss"]["queue_after"]
    torch.testing.assert_close(memory.teacher_pixel_queue, queue_after, rtol=1e-4, atol=1e-5)
    assert int(memory.pixel_queue_ptr[0]) == c["memory_loss"]["ptr_after"]
    terms["loss"].backward()
    norm = torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    torch.testing.assert_close(norm, c["student_grad_norm_before_clip"], rtol=1e-5, atol=0)
    head_norm = torch.linalg.vector_norm(torch.stack([q.grad.norm() for q in memory.parameters()]))
    torch.testing.assert_close(head_norm, c["memory_head_grad_norm"], rtol=1e-5, atol=0)
    assert not any(q.grad is not None for q in classifier.parameters())


def test_pd_is_the_regression_alone(ref):
    p = ref["pd"]
    teacher, student = _unets(ref)
    objective = RDDObjective(teacher, 8, 128, pd_defaults())
    terms = objective(student, p["x_0"], p["y"], t=p["t"], noise=p["noise"])
    assert set(terms) == {"regression", "x0_mse", "loss"}
    torch.testing.assert_close(terms["loss"], p["loss"], rtol=1e-5, atol=1e-6)
    gt = RDDObjective(teacher, 8, 128, {**pd_defaults(), "logits": False, "gt": True})
    torch.testing.assert_close(gt(student, p["x_0"], p["y"], t=p["t"], noise=p["noise"])["loss"],
                               p["gt_term_if_enabled"], rtol=1e-5, atol=1e-6)


def test_config_errors_are_one_line():
    with pytest.raises(ValueError, match="unknown key 'temprature'"):
        resolve_rdd_config({"temprature": 1.0})
    with pytest.raises(ValueError, match="nothing to train"):
        resolve_rdd_config({"feature": False})
    with pytest.raises(ValueError, match="no classifier"):
        RDDObjective(torch.nn.Identity(), 8, 128, {})
