"""Step distillation: the target's defining property, the teacher grid plan, a copy-of-teacher student's
loss, the relational term (unet and classifier sources) and the classifier utilities."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.config import load_config, model_and_diffusion_kwargs
from guided_diffusion.distill.classifier import (
    build_classifier,
    feature_channels,
    features_and_logits,
    load_classifier,
    save_classifier,
)
from guided_diffusion.distill.progressive import (
    StepDistiller,
    StepDistillLoop,
    apply_stage_overrides,
    check_same_head,
    resolve_step_distill_config,
    teacher_step_plan,
)
from guided_diffusion.distill.relational import RelationalTerm
from guided_diffusion.distill.relational import defaults as relational_defaults
from guided_diffusion.distill.targets import ddim_target, pred_xstart_from_output, snr_weight
from guided_diffusion.respace import SpacedDiffusion
from guided_diffusion.script_util import create_gaussian_diffusion, create_model_and_diffusion

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
TINY_CLASSIFIER = {"growth_rate": 4, "block_config": (1, 1), "bn_size": 2}


def _diffusion(respacing: str, steps: int = 20, predict_xstart: bool = False):
    return create_gaussian_diffusion(
        steps=steps, learn_sigma=True, noise_schedule="cosine", predict_xstart=predict_xstart,
        rescale_learned_sigmas=True, timestep_respacing=respacing,
    )


def _tiny_unet(seed: int):
    cfg = load_config(REPO / "tests/configs/tiny_baseline.yaml", {"timestep_respacing": "ddim4"})
    torch.manual_seed(seed)
    model, diffusion = create_model_and_diffusion(**model_and_diffusion_kwargs(cfg))
    return model.eval(), diffusion


class _X0Model:
    """A 'network' that outputs fixed x_0 values (and a zero variance half), per batch item."""

    def __init__(self, x0: torch.Tensor) -> None:
        self.x0 = x0

    def __call__(self, x, t, **kwargs):
        return torch.cat([self.x0, torch.zeros_like(self.x0)], dim=1)


def _ddim_step64(diffusion, z_t, t, x0):
    """guided-diffusion's deterministic DDIM step (eta = 0) on the float64 schedule."""
    a = torch.from_numpy(diffusion.alphas_cumprod)[t].view(-1, 1, 1, 1)
    a_prev = torch.from_numpy(diffusion.alphas_cumprod_prev)[t].view(-1, 1, 1, 1)
    eps = (z_t - a.sqrt() * x0) / (1 - a).sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def test_target_lands_on_teacher_result():
    """One student-grid DDIM step from z_t with x_0 = x~ reproduces z_next, at every student step: to 1e-5
    in float64, and through the package's `ddim_sample` (whose schedule tables are float32) to 1e-4."""
    student = _diffusion("ddim4", steps=1000, predict_xstart=True)
    gen = torch.Generator().manual_seed(0)
    n = 4 * student.num_timesteps
    z_t = torch.randn(n, 3, 4, 4, generator=gen, dtype=torch.float64)
    z_next = torch.randn(n, 3, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.arange(student.num_timesteps).repeat(4)
    target = ddim_target(student, z_t, t, z_next)
    assert (_ddim_step64(student, z_t, t, target) - z_next).abs().max() < 1e-5
    step = student.ddim_sample(_X0Model(target.float()), z_t.float(), t, clip_denoised=False)["sample"]
    assert (step.double() - z_next).abs().max() < 1e-4
    assert (target - z_next).abs().max() > 0.1  # not trivially the identity
    # at the lowest step the DDIM step lands on x_0 itself, so x~ is the teacher's result
    low = t == 0
    assert torch.allclose(target[low], z_next[low])


def test_teacher_plan_nests_grids():
    assert teacher_step_plan(_diffusion("ddim8", 1000), _diffusion("ddim4", 1000)).tolist() == [0, 2, 4, 6]
    assert teacher_step_plan(_diffusion("ddim4"), _diffusion("ddim2")).tolist() == [0, 2]
    with pytest.raises(ValueError, match="two teacher steps"):
        teacher_step_plan(_diffusion("ddim8", 1000), _diffusion("ddim2", 1000))
    with pytest.raises(ValueError, match="not all on the teacher grid"):
        teacher_step_plan(_diffusion("ddim4", 1000), _diffusion("ddim3", 1000))


def test_trailing_grids_are_the_authors_layout_and_nest():
    from guided_diffusion.respace import space_timesteps

    assert sorted(space_timesteps(1000, "trailing4")) == [249, 499, 749, 999]
    assert sorted(space_timesteps(1000, "trailing8")) == [124, 249, 374, 499, 624, 749, 874, 999]
    with pytest.raises(ValueError, match="divide the 1000 steps"):
        space_timesteps(1000, "trailing16")
    teacher, student = _diffusion("trailing8", 1000), _diffusion("trailing4", 1000)
    assert teacher_step_plan(teacher, student).tolist() == [1, 3, 5, 7]
    assert student.timestep_map[-1] == 999 and 0 not in student.timestep_map  # a step from pure noise


def test_trailing_lowest_step_takes_two_teacher_steps_to_x0():
    teacher, teacher_diffusion = _tiny_unet(1)
    with torch.no_grad():
        teacher.out[-1].weight.normal_(0, 0.05)
    teacher_diffusion = _diffusion("trailing4")
    distiller = StepDistiller(teacher, teacher_diffusion, _diffusion("trailing2"), {"teacher_clip": False})
    z = torch.randn(2, 3, 16, 16)
    got, _ = distiller.teacher_two_steps(z, torch.tensor([0, 0]))
    with torch.no_grad():
        mid = teacher_diffusion.ddim_sample(teacher, z, torch.tensor([1, 1]), clip_denoised=False)["sample"]
        x0 = teacher_diffusion.ddim_sample(teacher, mid, torch.tensor([0, 0]), clip_denoised=False)["sample"]
    torch.testing.assert_close(got, x0)
    assert not torch.allclose(mid, x0)


def test_teacher_two_steps_are_its_ddim_chain():
    teacher, teacher_diffusion = _tiny_unet(1)
    with torch.no_grad():
        teacher.out[-1].weight.normal_(0, 0.05)
    student_diffusion = _diffusion("ddim2")
    distiller = StepDistiller(teacher, teacher_diffusion, student_diffusion, {"teacher_clip": True})
    z = torch.randn(2, 3, 16, 16)
    t = torch.tensor([1, 1])
    got, _ = distiller.teacher_two_steps(z, t)
    with torch.no_grad():
        mid = teacher_diffusion.ddim_sample(teacher, z, torch.tensor([2, 2]))["sample"]
        want = teacher_diffusion.ddim_sample(teacher, mid, torch.tensor([1, 1]))["sample"]
    assert torch.allclose(got, want)
    assert not torch.allclose(got, mid)


def test_copy_of_teacher_has_near_zero_loss_at_t1():
    """t = 1 (DDPM counting; index 0 here): the teacher's last step is the student's, so a copy has zero
    loss while another network does not. With an eps = 0 teacher (fresh ADM UNet, zeroed output layer),
    DDIM is path-consistent, so a copy has zero loss at index 1 too. Clipping is off: a clipped target
    differs from the unclipped student x_0 wherever a random network's x_0 leaves [-1, 1]."""
    teacher, teacher_diffusion = _tiny_unet(1)
    with torch.no_grad():
        teacher.out[-1].weight.normal_(0, 0.05)
    other, _ = _tiny_unet(2)
    with torch.no_grad():
        other.out[-1].weight.normal_(0, 0.05)
    student_diffusion = _diffusion("ddim2")
    distiller = StepDistiller(teacher, teacher_diffusion, student_diffusion, {"teacher_clip": False})
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.zeros(4, dtype=torch.long)
    with torch.no_grad():
        copy = distiller.losses(teacher, x0, t, noise=noise)
        different = distiller.losses(other, x0, t, noise=noise)
    assert copy["loss"].max() < 1e-8
    assert different["loss"].min() > 1e-4

    zero_eps, _ = _tiny_unet(3)
    consistent = StepDistiller(zero_eps, teacher_diffusion, student_diffusion, {"teacher_clip": False})
    with torch.no_grad():
        at_one = consistent.losses(zero_eps, x0, torch.ones(4, dtype=torch.long), noise=noise)
        other_at_one = consistent.losses(other, x0, torch.ones(4, dtype=torch.long), noise=noise)
    assert at_one["loss"].max() < 1e-8
    assert other_at_one["loss"].min() > 1e-4


def test_weighting_and_config_checks():
    d = _diffusion("ddim2")
    t = torch.tensor([0, 1])
    snr = torch.from_numpy(d.alphas_cumprod / (1 - d.alphas_cumprod)).float()
    assert torch.allclose(snr_weight(d, t, "snr"), snr)
    assert torch.allclose(snr_weight(d, t, "truncated_snr"), snr.clamp_min(1))
    assert torch.allclose(snr_weight(d, t, "snr_plus_one"), snr + 1)
    assert torch.equal(snr_weight(d, t, "none"), torch.ones(2))
    with pytest.raises(ValueError, match="unknown key 'lr'"):
        resolve_step_distill_config({"lr": 1.0})
    with pytest.raises(ValueError, match="loss_weighting"):
        resolve_step_distill_config({"loss_weighting": "p2"})
    with pytest.raises(ValueError, match="student_prediction"):
        resolve_step_distill_config({"student_prediction": "score"})
    eps_teacher = _diffusion("ddim4")
    check_same_head(eps_teacher, d)
    with pytest.raises(ValueError, match="predicts eps but its predict_xstart reads it as x0"):
        check_same_head(eps_teacher, _diffusion("ddim2", predict_xstart=True))


def _teacher_and_copy_setup():
    teacher, teacher_diffusion = _tiny_unet(1)
    with torch.no_grad():
        teacher.out[-1].weight.normal_(0, 0.05)
    return teacher, teacher_diffusion, _diffusion("ddim2")


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_copy_of_an_eps_teacher_predicts_its_step_in_every_parameterisation(prediction):
    """The student's output read as eps, x0 or v is the eps teacher's own output at the same z_t and
    timestep, converted: before any update the student predicts what its teacher predicts."""
    teacher, teacher_diffusion, student_diffusion = _teacher_and_copy_setup()
    config = {"student_prediction": prediction}
    distiller = StepDistiller(teacher, teacher_diffusion, student_diffusion, config)
    z = torch.randn(2, 3, 16, 16)
    t = torch.tensor([0, 1])
    j = distiller.plan[t]
    with torch.no_grad():
        eps = teacher(z, teacher_diffusion._scale_timesteps(j))[:, :3].double()
        student = student_diffusion.p_mean_variance(teacher, z, t, clip_denoised=False)
        ours = distiller.prediction(student["pred_xstart"], z, t)
        theirs = teacher_diffusion.ddim_sample(teacher, z, j, clip_denoised=False)
    a = torch.from_numpy(student_diffusion.alphas_cumprod)[t].view(-1, 1, 1, 1)
    x0 = theirs["pred_xstart"].double()
    want = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[prediction]
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-5)


def test_auto_weighting_is_the_error_in_the_prediction_space():
    """eps: snr x the x_0 MSE, v: (snr + 1) x it, x0: PD's max(snr, 1) x it; a named weighting overrides."""
    teacher, teacher_diffusion, student_diffusion = _teacher_and_copy_setup()
    z, x0, target = torch.randn(3, 2, 3, 16, 16).double().unbind(0)
    t = torch.tensor([0, 1])
    mse = ((x0 - target) ** 2).mean(dim=(1, 2, 3)).float()
    a = torch.from_numpy(student_diffusion.alphas_cumprod)[t]
    snr = (a / (1 - a)).float()
    want = {"eps": snr * mse, "v": (snr + 1) * mse, "x0": snr.clamp_min(1) * mse}
    for prediction, expected in want.items():
        d = StepDistiller(teacher, teacher_diffusion, student_diffusion, {"student_prediction": prediction})
        torch.testing.assert_close(d.weighted_error(x0, target, z, t), expected, rtol=1e-4, atol=0)
    named = StepDistiller(
        teacher, teacher_diffusion, student_diffusion, {"student_prediction": "eps", "loss_weighting": "none"}
    )
    torch.testing.assert_close(named.weighted_error(x0, target, z, t), mse)


def test_relational_unet_term_trains_student_and_head():
    teacher, teacher_diffusion = _tiny_unet(1)
    student, _ = _tiny_unet(2)
    student.train()
    rel = RelationalTerm({**relational_defaults(), "queue_size": 64, "num_anchors": 16}, student, teacher)
    distiller = StepDistiller(teacher, teacher_diffusion, _diffusion("ddim2"))
    out = distiller.losses(student, torch.rand(2, 3, 16, 16) * 2 - 1, torch.tensor([0, 1]), relational=rel)
    assert {"rel_p2p", "rel_memory", "mse"} <= set(out)
    out["loss"].mean().backward()
    assert student.input_blocks[0][0].weight.grad.abs().sum() > 0
    assert rel.relation.head[0].weight.grad.abs().sum() > 0
    assert not any(k.startswith("_frozen") for k in rel.state_dict())
    assert rel.relation.memory.num_filled > 0


def test_classifier_features_save_load_and_relational_term(tmp_path):
    torch.manual_seed(0)
    clf = build_classifier("densenet121", 3, 16, TINY_CLASSIFIER)
    assert clf.features.conv0.stride == (1, 1)
    feats, logits = features_and_logits(clf.eval(), torch.zeros(2, 3, 16, 16))
    assert feats.shape[2:] == (8, 8) and logits.shape == (2, 3)
    path = tmp_path / "clf.pt"
    save_classifier(clf, str(path), model_name="densenet121", num_classes=3, image_size=16,
                    model_kwargs=TINY_CLASSIFIER)
    loaded = load_classifier(str(path))
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(features_and_logits(loaded, x)[1], features_and_logits(clf, x)[1])
    assert not any(p.requires_grad for p in loaded.parameters())
    torch.save({"x": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt"):
        load_classifier(str(tmp_path / "bad.pt"))

    teacher, _ = _tiny_unet(1)
    config = {**relational_defaults(), "feature_source": "classifier", "memory_factor": 0.0}
    rel = RelationalTerm(config, teacher, teacher, loaded)
    assert rel.relation.use_logit and feature_channels(loaded, 16) == feats.shape[1]
    student_x0 = torch.randn(2, 3, 16, 16, requires_grad=True)
    terms = rel.compare(student_x0=student_x0, teacher_x0=torch.randn(2, 3, 16, 16))
    terms["loss"].backward()
    assert terms["logit"] > 0 and student_x0.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="classifier_path"):
        RelationalTerm(config, teacher, teacher, None)


class _LabelledX0Model(_X0Model):
    """_X0Model that records the class labels and the input it was called with."""

    def __init__(self, x0: torch.Tensor) -> None:
        super().__init__(x0)
        self.seen: list[tuple[torch.Tensor, object]] = []

    def __call__(self, x, t, **kwargs):
        self.seen.append((x.clone(), kwargs.get("y")))
        return super().__call__(x, t, **kwargs)


def test_losses_written_out_for_fixed_x0_networks_with_labels_and_given_noise():
    """The logged mse and the loss (x0 student, truncated-SNR weight) against the two-step DDIM target, by
    hand; the labels reach teacher and student, and the given noise makes z_t."""
    teacher_diffusion, student_diffusion = _diffusion("ddim4", predict_xstart=True), _diffusion(
        "ddim2", predict_xstart=True)
    g = torch.Generator().manual_seed(0)
    x_start, noise = torch.rand(2, 3, 4, 4, generator=g) * 2 - 1, torch.randn(2, 3, 4, 4, generator=g)
    teacher = _LabelledX0Model(torch.rand(2, 3, 4, 4, generator=g) - 0.5)
    student = _LabelledX0Model(torch.rand(2, 3, 4, 4, generator=g) - 0.5)
    distiller = StepDistiller(teacher, teacher_diffusion, student_diffusion,
                              {"teacher_clip": False, "student_prediction": "x0", "loss_weighting": "auto"})
    t, y = torch.tensor([1, 1]), torch.tensor([3, 5])
    with torch.no_grad():
        terms = distiller.losses(student, x_start, t, model_kwargs={"y": y}, noise=noise)
    z_t = student_diffusion.q_sample(x_start, t, noise=noise)
    assert torch.equal(student.seen[0][0], z_t)
    assert all(torch.equal(labels, y) for _, labels in teacher.seen + student.seen)
    j = distiller.plan[t]
    z_mid = _ddim_step64(teacher_diffusion, z_t.double(), j, teacher.x0.double())
    z_next = _ddim_step64(teacher_diffusion, z_mid, j - 1, teacher.x0.double())
    a_t = torch.from_numpy(student_diffusion.alphas_cumprod)[t].view(-1, 1, 1, 1)
    a_next = torch.from_numpy(student_diffusion.alphas_cumprod_prev)[t].view(-1, 1, 1, 1)
    # x~ : the x_0 whose one DDIM step from z_t lands on z_next
    target = (z_next - (1 - a_next).sqrt() / (1 - a_t).sqrt() * z_t.double()) / (
        a_next.sqrt() - (1 - a_next).sqrt() / (1 - a_t).sqrt() * a_t.sqrt())
    mse = ((student.x0.double() - target) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(terms["mse"].double(), mse, rtol=1e-5, atol=1e-7)
    snr = (a_t / (1 - a_t)).view(-1).clamp_min(1)
    torch.testing.assert_close(terms["loss"].double(), snr * mse, rtol=1e-5, atol=1e-7)


def test_relational_term_on_a_dkdm_batch_compares_the_x0_of_the_students_and_the_pools_outputs():
    """The classifier source on a pool batch: x_0 of the student's raw output (its diffusion) and of the
    teacher's stored eps (the teacher's diffusion), then `compare` on them, student first."""
    torch.manual_seed(0)
    classifier = build_classifier("densenet121", 3, 16, TINY_CLASSIFIER).eval()
    teacher, _ = _tiny_unet(1)
    teacher_diffusion, student_diffusion = _diffusion(""), _diffusion("", predict_xstart=True)
    config = {**relational_defaults(), "feature_source": "classifier", "memory_factor": 0.0}
    rel = RelationalTerm(config, teacher, teacher, classifier, teacher_diffusion=teacher_diffusion,
                         student_diffusion=student_diffusion)
    g = torch.Generator().manual_seed(1)
    x_t, t = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([2, 9])
    batch = {"x_t": x_t, "t": t, "model_kwargs": {},
             "student_output": torch.randn(2, 6, 16, 16, generator=g),
             "teacher_out": {"model_output": torch.randn(2, 3, 16, 16, generator=g)}}
    with torch.no_grad():
        terms = rel(None, batch)
        student_x0 = pred_xstart_from_output(student_diffusion, x_t, t, batch["student_output"])
        teacher_x0 = pred_xstart_from_output(teacher_diffusion, x_t, t, batch["teacher_out"]["model_output"])
        direct = rel.compare(student_x0=student_x0, teacher_x0=teacher_x0)
        swapped = rel.compare(student_x0=teacher_x0, teacher_x0=student_x0)
    assert terms["loss"] > 0 and torch.equal(terms["loss"], direct["loss"])
    assert not torch.equal(terms["loss"], swapped["loss"])


def test_stage_overrides_point_the_stage_at_its_teacher_and_halve_the_grid():
    def cfg():
        return OmegaConf.create({"teacher": {"model_path": "t0.pt", "diffusion_steps": 1000,
                                             "timestep_respacing": ""},
                                 "student": {"model_path": "s0.pt", "diffusion_steps": 1000,
                                             "timestep_respacing": ""}})

    staged = cfg()
    apply_stage_overrides(staged, teacher_path="stage1.pt", teacher_steps=8)
    assert (staged.teacher.model_path, staged.student.model_path) == ("stage1.pt", "")
    grids = (staged.teacher.timestep_respacing, staged.student.timestep_respacing)
    assert grids == ("trailing8", "trailing4")
    lowest = cfg()
    apply_stage_overrides(lowest, teacher_steps=2)  # the last stage, 2 -> 1
    assert lowest.student.timestep_respacing == "trailing1" and lowest.teacher.model_path == "t0.pt"
    for bad in (3, 1):
        with pytest.raises(ValueError, match=f"--teacher_steps must be an even number >= 2, got {bad}"):
            apply_stage_overrides(cfg(), teacher_steps=bad)


def test_loop_state_hooks_keep_the_relational_head_and_refuse_another_teacher_grid_on_resume():
    head = torch.nn.Linear(1, 1)
    assert StepDistillLoop.extra_params(SimpleNamespace(relational=head)) == {"relational": head}
    assert StepDistillLoop.extra_params(SimpleNamespace(relational=None)) == {}
    plan = teacher_step_plan(_diffusion("trailing8", 1000), _diffusion("trailing4", 1000))
    loop = SimpleNamespace(distiller=SimpleNamespace(plan=plan))
    state = StepDistillLoop.extra_state(loop)
    assert state == {"teacher_plan": loop.distiller.plan.tolist()} and loop.distiller.plan.dtype == torch.long
    StepDistillLoop.load_extra_state(loop, state)
    StepDistillLoop.load_extra_state(loop, {})  # a run saved before the plan was recorded
    with pytest.raises(ValueError, match=r"resumed run used teacher grid indices \[0, 2, 4, 6\], this one"):
        StepDistillLoop.load_extra_state(loop, {"teacher_plan": [0, 2, 4, 6]})


def test_plans_read_a_plain_chain_and_refuse_another_schedule_or_head():
    base = _diffusion("")
    plain = gd.GaussianDiffusion(betas=base.betas, model_mean_type=base.model_mean_type,
                                 model_var_type=base.model_var_type, loss_type=base.loss_type)
    assert teacher_step_plan(plain, _diffusion("ddim10")).tolist() == teacher_step_plan(
        _diffusion(""), _diffusion("ddim10")).tolist()  # no timestep_map: every step of the chain
    other = SpacedDiffusion(use_timesteps=set(range(0, 20, 2)), betas=base.betas * 0.5,
                            model_mean_type=base.model_mean_type, model_var_type=base.model_var_type,
                            loss_type=base.loss_type)  # nests on the grid, another schedule
    with pytest.raises(ValueError, match="teacher and student use different noise schedules at the same"):
        teacher_step_plan(base, other)
    odd = _diffusion("")
    odd.model_mean_type = gd.ModelMeanType.PREVIOUS_X
    for pair in ((odd, _diffusion("")), (_diffusion(""), odd)):
        with pytest.raises(ValueError, match=r"must predict eps or x0 \(predict_xstart\)"):
            check_same_head(*pair)
    with pytest.raises(ValueError, match="head predicts eps but its predict_xstart reads it as x0"):
        check_same_head(_diffusion(""), _diffusion("", predict_xstart=True))
