"""CUDA graphs compute what the eager calls compute (needs a GPU: run on the GPU machine, see PERFORMANCE.md).

On CPU these are skipped; `tests/test_fast_paths.py` checks there that the wrappers pass CPU calls through.
"""

from __future__ import annotations

import pytest
import torch

from guided_diffusion import logger
from guided_diffusion.distill.dkdm.pool import DynamicBatch
from guided_diffusion.distill.loop import KDTrainLoop
from guided_diffusion.infra.compile_util import FastPath
from guided_diffusion.infra.cuda_graphs import GraphedInference, GraphedTraining
from guided_diffusion.script_util import create_gaussian_diffusion, create_model
from guided_diffusion.train_util import TrainLoop

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")

FAST = FastPath(cuda_graphs=True, half_norm=True)
PLAIN = FastPath(half_norm=True)  # the same kernels without graphs


def _model(seed: int, dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model(
        16, 32, 1, channel_mult="1,2", learn_sigma=True, class_cond=False, use_checkpoint=False,
        attention_resolutions="8", num_heads=4, num_head_channels=16, num_heads_upsample=-1,
        use_scale_shift_norm=True, dropout=dropout, resblock_updown=True, use_fp16=False,
        use_new_attention_order=True,
    )
    with torch.no_grad():  # the zero-initialised output convs would hide any difference
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.cuda()


def _diffusion():
    return create_gaussian_diffusion(steps=50, learn_sigma=True, noise_schedule="cosine",
                                     timestep_respacing="")


@pytest.fixture(autouse=True)
def _log_dir(tmp_path):
    logger.configure(str(tmp_path / "log"), format_strs=[])


def test_graphed_inference_matches_eager_and_records_repeated_shapes():
    model = _model(0).eval().requires_grad_(False)
    graphed = GraphedInference(model, name="test", max_graphs=2)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for i in range(4):
            x = torch.randn(8, 3, 16, 16, device="cuda")
            t = torch.randint(0, 50, (8,), device="cuda")
            out = graphed(x, t)
            torch.testing.assert_close(out, model(x, t), rtol=0, atol=0)
            assert len(graphed.graphs) == (1 if i >= 1 else 0)  # recorded on the second call
        other = torch.randn(3, 3, 16, 16, device="cuda")  # a one-off shape runs eagerly
        t3 = torch.randint(0, 50, (3,), device="cuda")
        torch.testing.assert_close(graphed(other, t3), model(other, t3), rtol=0, atol=0)
    assert len(graphed.graphs) == 1 and not graphed.failed


def test_graphed_inference_outlives_the_autocast_region_it_was_recorded_in():
    """Sampling opens one autocast region per round, and a loaded checkpoint's weights require grad, so
    autocast caches their half copies. A graph recorded from that cache read freed memory in the next
    round: bf16 sampling on the H200 returned black images from its second round on."""
    model = _model(0).eval()
    graphed = GraphedInference(model, name="test")
    x = torch.randn(8, 3, 16, 16, device="cuda")
    t = torch.randint(0, 50, (8,), device="cuda")
    for _round in range(3):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            for _ in range(3):
                out = graphed(x, t)
            expected = model(x, t)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        # blocks of the freed half copies' sizes, filled with NaN: what a read of freed memory would see
        junk = [torch.full_like(p, float("nan"), dtype=torch.bfloat16) for p in model.parameters()]
        del junk
    assert len(graphed.graphs) == 1 and not graphed.failed


def _train(fast: FastPath, steps: int = 4, batch: int = 8
           ) -> tuple[list[float], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Losses, first-step gradients, initial and final parameters of `steps` bf16 training steps."""
    model = _model(1)
    loop = TrainLoop(model=model, diffusion=_diffusion(), data=iter(()), batch_size=batch, microbatch=-1,
                     lr=1e-3, ema_rate="0.9", log_interval=0, save_interval=0, resume_checkpoint="",
                     precision="bf16", seed=0, fast=fast)
    torch.manual_seed(2)
    data = torch.rand(batch, 3, 16, 16, device="cuda") * 2 - 1
    initial = [p.detach().clone() for p in model.parameters()]
    losses, grads = [], []
    for step in range(steps):
        torch.manual_seed(100 + step)
        loop.run_step(data, {})
        if step == 0:
            grads = [p.grad.detach().clone() for p in model.parameters()]
        total, count = loop._acc.pop("loss")
        losses.append(float(total) / count)
        loop._acc.clear()
    if fast.cuda_graphs:
        assert isinstance(loop.ddp_model, GraphedTraining) and loop.ddp_model.graphed is not None
    return losses, grads, initial, [p.detach().clone() for p in model.parameters()]


def test_graphed_training_steps_match_eager_steps():
    """Graphed and eager bf16 steps agree to rounding: on the H200 most first-step gradients are
    bit-identical and the rest differ by at most 0.4% of their norm. Adam turns every gradient into a step
    of about lr whatever its size, so the few elements whose tiny gradients change sign (65 of 828k) move
    the other way: parameters are compared by the size of their difference against the size of the update,
    not element by element (which failed at 82 of 4096 elements of one tensor after 4 steps)."""
    graphed_losses, graphed_grads, initial, graphed_params = _train(FAST)
    eager_losses, eager_grads, _, eager_params = _train(PLAIN)
    assert eager_losses[0] != eager_losses[-1]
    torch.testing.assert_close(torch.tensor(graphed_losses), torch.tensor(eager_losses), rtol=1e-3, atol=1e-4)
    for g, e in zip(graphed_grads, eager_grads, strict=True):
        assert (g - e).norm() <= 2e-2 * e.norm() + 1e-12
    moved = sum(float((e - i).square().sum()) for e, i in zip(eager_params, initial, strict=True)) ** 0.5
    apart = sum(float((g - e).square().sum()) for g, e in zip(graphed_params, eager_params, strict=True))
    apart = apart**0.5
    assert moved > 0 and apart <= 0.1 * moved, (apart, moved)


def test_graphed_training_serves_other_calls_eagerly():
    model = _model(3).train()
    graphed = GraphedTraining(model, name="test")
    x, t = torch.randn(4, 3, 16, 16, device="cuda"), torch.randint(0, 50, (4,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        out = graphed(x, t)
        grads = torch.autograd.grad(out.float().square().mean(), list(model.parameters()))
        ref = model(x, t)
        ref_grads = torch.autograd.grad(ref.float().square().mean(), list(model.parameters()))
        torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-2, atol=1e-4)
        with torch.no_grad():  # e.g. TCCD's trajectory steps
            torch.testing.assert_close(graphed(x[:2], t[:2]), model(x[:2], t[:2]), rtol=1e-3, atol=1e-3)
    assert graphed.graphed is not None and not graphed.failed


def test_kd_loop_with_graphs_matches_eager(tmp_path):
    def run(fast: FastPath) -> list[float]:
        teacher, student = _model(4).eval().requires_grad_(False), _model(5)
        diffusion = _diffusion()
        pool = DynamicBatch(teacher, diffusion, batch_size=8, image_shape=(3, 16, 16), rho=0.4,
                            precision="bf16", device="cuda", seed=0)
        pool.prepare(progress=False)
        loop = KDTrainLoop(teacher=teacher, teacher_diffusion=diffusion, dynamic_batch=pool, model=student,
                           diffusion=diffusion, batch_size=8, microbatch=-1, lr=1e-3, ema_rate="0.9",
                           log_interval=0, save_interval=0, resume_checkpoint="", precision="bf16",
                           run_dir=str(tmp_path / str(fast.cuda_graphs)), seed=0, fast=fast)
        losses = []
        for step in range(4):
            torch.manual_seed(200 + step)
            loop.run_step(*loop.next_batch())
            total, count = loop._acc.pop("loss")
            losses.append(float(total) / count)
            loop._acc.clear()
        if fast.cuda_graphs:
            assert isinstance(pool.teacher, GraphedInference) and len(pool.teacher.graphs) == 1
        return losses

    torch.testing.assert_close(torch.tensor(run(FAST)), torch.tensor(run(PLAIN)), rtol=1e-3, atol=1e-4)
