"""TCCD: the timestep InfoNCE against a loop-based computation, gradients, the interactive branch's inputs,
and the bundled loss against separate DKDM / interactive computations."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from guided_diffusion.config import load_config, method_defaults, model_and_diffusion_kwargs
from guided_diffusion.distill.tccd import (
    TCCDLoss,
    TimestepNoiseAlignment,
    info_nce_timestep,
    interactive_inputs,
    resolve_tccd_config,
)
from guided_diffusion.distill.tccd import (
    defaults as tccd_defaults,
)
from guided_diffusion.script_util import create_model_and_diffusion

ROOT = Path(__file__).resolve().parents[1]
TINY_KD = ROOT / "tests" / "configs" / "tiny_kd.yaml"
SMALL = {"proj_dim": 8, "encoder_channels": 8}


def direct_info_nce(e, n, t, scale, same_t=True):
    """Loop-based symmetric InfoNCE with soft same-t targets, written from the definition."""
    N = len(t)

    def unit(v):
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    e = [unit(row) for row in e.tolist()]
    n = [unit(row) for row in n.tolist()]
    t = t.tolist()

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True))

    logit = [[scale * dot(e[i], n[j]) for j in range(N)] for i in range(N)]

    def positives(i):
        return [j for j in range(N) if (t[j] == t[i] if same_t else j == i)]

    total_en = 0.0
    total_ne = 0.0
    for i in range(N):
        pos = positives(i)
        row_den = math.log(sum(math.exp(logit[i][k]) for k in range(N)))
        col_den = math.log(sum(math.exp(logit[k][i]) for k in range(N)))
        total_en += -sum(logit[i][j] - row_den for j in pos) / len(pos)
        total_ne += -sum(logit[j][i] - col_den for j in pos) / len(pos)
    return (total_en / N + total_ne / N) / 2


def test_info_nce_equals_direct_computation():
    g = torch.Generator().manual_seed(0)
    e, n = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    t = torch.tensor([3, 1, 3, 7, 1, 2])
    scale = torch.tensor(math.log(1 / 0.2))
    for same_t in (True, False):
        loss, stats = info_nce_timestep(e, n, t, scale, same_t_positives=same_t)
        assert loss.item() == pytest.approx(direct_info_nce(e, n, t, 5.0, same_t), rel=1e-5)
    assert stats["align_temperature"].item() == pytest.approx(0.2, rel=1e-6)


def test_info_nce_is_symmetric_in_the_two_views():
    g = torch.Generator().manual_seed(1)
    e, n = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    t = torch.tensor([0, 4, 4, 9, 0])
    scale = torch.tensor(2.0)
    assert info_nce_timestep(e, n, t, scale)[0].item() == pytest.approx(
        info_nce_timestep(n, e, t, scale)[0].item(), rel=1e-6
    )


def test_same_t_items_are_positives_not_false_negatives():
    # Each embedding sits on the noise of the *other* item with its timestep. Soft targets count that
    # as a match (loss as low as for the exact pairing); one-hot targets make it a false negative.
    # (With identical same-t embeddings both target kinds give exactly the same loss, so the twins differ.)
    g = torch.Generator().manual_seed(2)
    t = torch.tensor([5, 5, 2, 2, 9, 9])
    e = torch.randn(6, 8, generator=g)
    swapped = e[torch.tensor([1, 0, 3, 2, 5, 4])]
    scale = torch.tensor(math.log(1 / 0.07))
    soft, stats = info_nce_timestep(e, swapped, t, scale)
    hard, _ = info_nce_timestep(e, swapped, t, scale, same_t_positives=False)
    assert soft.item() < hard.item() - 1.0
    assert soft.item() == pytest.approx(info_nce_timestep(e, e, t, scale)[0].item(), rel=1e-6)
    assert soft.item() == pytest.approx(direct_info_nce(e, swapped, t, 1 / 0.07), rel=1e-5)
    assert stats["align_acc"].item() == 1.0
    twins = e[torch.tensor([0, 0, 2, 2, 4, 4])]
    assert info_nce_timestep(twins, e, t, scale)[0].item() == pytest.approx(
        info_nce_timestep(twins, e, t, scale, same_t_positives=False)[0].item(), rel=1e-6
    )


def test_logit_scale_is_clamped_to_temperature_range():
    e = torch.randn(4, 3)
    _, stats = info_nce_timestep(e, e, torch.arange(4), torch.tensor(50.0))
    assert stats["align_temperature"].item() == pytest.approx(0.01, rel=1e-5)


def test_bad_view_shapes_raise():
    with pytest.raises(ValueError, match="views"):
        info_nce_timestep(torch.randn(4, 3), torch.randn(4, 2), torch.arange(4), torch.tensor(1.0))
    with pytest.raises(ValueError, match="t must be"):
        info_nce_timestep(torch.randn(4, 3), torch.randn(4, 3), torch.arange(3), torch.tensor(1.0))


def test_gradients_reach_heads_encoder_logit_scale_and_embedding():
    torch.manual_seed(0)
    align = TimestepNoiseAlignment(16, 3, SMALL)
    assert align.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    emb = torch.randn(4, 16, requires_grad=True)
    loss, _ = align(emb, torch.randn(4, 3, 8, 8), torch.tensor([1, 2, 2, 3]))
    loss.backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    for name, p in align.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_config_defaults_and_validation():
    assert method_defaults("tccd") == tccd_defaults()
    assert resolve_tccd_config({"align_weight": 0.3})["align_weight"] == 0.3
    with pytest.raises(ValueError, match="unknown key 'align_wieght'"):
        resolve_tccd_config({"align_wieght": 0.3})
    with pytest.raises(ValueError, match="noise_source"):
        resolve_tccd_config({"noise_source": "pixels"})
    with pytest.raises(ValueError, match="interactive_prob"):
        resolve_tccd_config({"interactive_prob": 1.5})


def test_interactive_schedule_is_deterministic_per_step():
    every = TCCDLoss(8, 3, {"interactive_every": 3, **SMALL})
    assert [s for s in range(10) if every.interactive_now(s)] == [0, 3, 6, 9]
    a, b = TCCDLoss(8, 3, SMALL), TCCDLoss(8, 3, SMALL)
    picks = [a.interactive_now(s) for s in range(400)]
    assert picks == [b.interactive_now(s) for s in range(400)]
    assert 0.4 < sum(picks) / 400 < 0.6
    assert not any(TCCDLoss(8, 3, {"interactive_prob": 0.0, **SMALL}).interactive_now(s) for s in range(50))


# ---------------------------------------------------------------------------------------------------------
# With the tiny UNets


@pytest.fixture(scope="module")
def models():
    cfg = load_config(TINY_KD)
    torch.manual_seed(0)
    # A student-sized teacher keeps the tests fast; only its p_mean_variance output matters here.
    teacher, diffusion = create_model_and_diffusion(**model_and_diffusion_kwargs(cfg.student))
    student, _ = create_model_and_diffusion(**model_and_diffusion_kwargs(cfg.student))
    return student, teacher.eval(), diffusion


class RecordingQuery:
    """A teacher_query stub: records its inputs and answers with the real teacher's p_mean_variance."""

    def __init__(self, teacher, diffusion):
        self.teacher, self.diffusion, self.calls = teacher, diffusion, []

    def __call__(self, x, t):
        self.calls.append((x.clone(), t.clone()))
        with torch.no_grad():
            return self.diffusion.p_mean_variance(self.teacher, x, t)


def interactive_guidance_loss(student, diffusion, x_t, t, teacher_query):
    """TCCD stage two on its own, the oracle for the bundled loss: the DKDM objective at the student's own
    next state (items with t > 0); loss is the mean over those items (0 if none)."""
    x_sel, t_sel, teacher_out, keep = interactive_inputs(student, diffusion, x_t, t, teacher_query)
    count = keep.sum()
    if x_sel.shape[0] == 0:
        return {"loss": x_t.new_zeros(()), "count": count}
    terms = diffusion.training_losses_kd(student, x_t=x_sel, t=t_sel, out=teacher_out)
    return {**{k: v.mean() for k, v in terms.items()}, "count": count}


def make_batch(teacher, diffusion, t):
    g = torch.Generator().manual_seed(3)
    x_t = torch.randn(len(t), 3, 16, 16, generator=g)
    with torch.inference_mode():
        out = diffusion.p_mean_variance(teacher, x_t, t)
    return {"x_t": x_t, "t": t, "teacher_out": out, "weights": torch.ones(len(t)), "model_kwargs": {}}


def test_interactive_queries_teacher_at_students_own_step(models):
    student, teacher, diffusion = models
    t = torch.tensor([0, 5, 19, 0, 1])
    x_t = make_batch(teacher, diffusion, t)["x_t"]
    query = RecordingQuery(teacher, diffusion)
    torch.manual_seed(11)
    terms = interactive_guidance_loss(student, diffusion, x_t, t, query)
    torch.manual_seed(11)
    with torch.no_grad():
        own = diffusion.p_sample(student, x_t, t)["sample"]
    keep = t > 0
    [(x_seen, t_seen)] = query.calls
    assert torch.equal(t_seen, torch.tensor([4, 18, 0]))
    torch.testing.assert_close(x_seen, own[keep], rtol=0, atol=0)
    assert int(terms["count"]) == 3
    expected = diffusion.training_losses_kd(student, x_t=own[keep], t=t_seen, out=query(own[keep], t_seen))[
        "loss"
    ]
    torch.testing.assert_close(terms["loss"], expected.mean())


class _WildVarianceStudent(torch.nn.Module):
    """eps = 0 and a variance output far outside [-1, 1]: p_sample steps to ~1e28."""

    def forward(self, x, t, **kwargs):
        return torch.cat([torch.zeros_like(x), torch.full_like(x, 500.0)], dim=1)


def test_interactive_step_keeps_student_variance_in_learned_range(models):
    _, teacher, diffusion = models
    t = torch.tensor([3, 10, 19])
    x_t = torch.randn(3, 3, 16, 16)
    wild = _WildVarianceStudent()
    with torch.no_grad():
        assert diffusion.p_sample(wild, x_t, t)["sample"].abs().max() > 1e6
    query = RecordingQuery(teacher, diffusion)
    interactive_guidance_loss(wild, diffusion, x_t, t, query)
    [(x_seen, _)] = query.calls
    mean = diffusion.p_mean_variance(wild, x_t, t)["mean"]
    beta = torch.from_numpy(diffusion.betas).float()[t].view(-1, 1, 1, 1)
    # At most beta_t's standard deviation (the top of the range) times a Gaussian draw.
    assert torch.isfinite(x_seen).all()
    assert ((x_seen - mean).abs() <= beta.sqrt() * 6).all()


def test_interactive_with_all_t_zero_queries_nothing(models):
    student, teacher, diffusion = models
    query = RecordingQuery(teacher, diffusion)
    terms = interactive_guidance_loss(
        student, diffusion, torch.randn(2, 3, 16, 16), torch.zeros(2, dtype=torch.long), query
    )
    assert query.calls == [] and terms["loss"].item() == 0.0 and int(terms["count"]) == 0


def test_tccd_loss_combines_dkdm_alignment_and_interactive_terms(models):
    student, teacher, diffusion = models
    t = torch.tensor([0, 3, 3, 12])
    batch = make_batch(teacher, diffusion, t)
    tccd = TCCDLoss.for_student(student, {"interactive_every": 1, **SMALL})
    query = RecordingQuery(teacher, diffusion)
    torch.manual_seed(7)
    out = tccd(student, diffusion, batch, query, step=0)
    kd_direct = diffusion.training_losses_kd(student, x_t=batch["x_t"], t=t, out=batch["teacher_out"])["loss"]
    torch.testing.assert_close(out["kd"], kd_direct.detach())
    torch.manual_seed(7)
    fresh_query = RecordingQuery(teacher, diffusion)
    inter = interactive_guidance_loss(student, diffusion, batch["x_t"], t, fresh_query)
    torch.testing.assert_close(out["interactive"], inter["loss"].detach())
    assert out["interactive_count"].item() == 3
    expected = kd_direct.mean() + 0.1 * out["align"] + 0.5 * inter["loss"]
    torch.testing.assert_close(out["loss"], expected.detach(), rtol=1e-5, atol=1e-6)
    out["loss"].backward()
    assert tccd.alignment.logit_scale.grad is not None
    assert all(p.grad is not None for p in tccd.parameters())


def test_alignment_gradient_reaches_student_time_embedding(models):
    student, teacher, diffusion = models
    batch = make_batch(teacher, diffusion, torch.tensor([2, 2, 8, 15]))
    tccd = TCCDLoss.for_student(student, {"interactive_prob": 0.0, **SMALL})
    grads = []
    for weight in (0.1, 10.0):
        tccd.config["align_weight"] = weight
        student.zero_grad()
        tccd(student, diffusion, batch, None, step=0)["loss"].backward()
        grads.append(student.time_embed[0].weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


def test_student_mid_source_encodes_the_middle_block(models):
    student, teacher, diffusion = models
    tccd = TCCDLoss.for_student(student, {"noise_source": "student_mid", "interactive_prob": 0.0, **SMALL})
    assert tccd.alignment.encoder.stem[0].in_channels == student.feature_channels()["middle"]
    batch = make_batch(teacher, diffusion, torch.tensor([1, 4, 9]))
    out = tccd(student, diffusion, batch, None, step=1)
    assert torch.isfinite(out["loss"]) and out["interactive_count"].item() == 0
    always = TCCDLoss.for_student(student, {"interactive_every": 1, **SMALL})
    with pytest.raises(ValueError, match="no teacher_query"):
        always(student, diffusion, batch, None, step=0)
