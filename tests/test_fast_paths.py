"""The optimized paths compute what the plain paths compute (CPU, fp32); the KD step reads nothing back."""

from __future__ import annotations

import copy
import traceback

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from guided_diffusion import dist_util, logger
from guided_diffusion.distill.dkdm.pool import DynamicBatch
from guided_diffusion.distill.loop import KDTrainLoop
from guided_diffusion.infra import compile_util
from guided_diffusion.infra.background_compile import FirstCallCompiled
from guided_diffusion.infra.compile_util import (
    CompiledWithFallback,
    FastPath,
    fast_frozen,
    fast_trained,
    maybe_compile,
)
from guided_diffusion.infra.cuda_graphs import GraphedInference, GraphedTraining
from guided_diffusion.nn import GroupNorm32, use_half_norm
from guided_diffusion.script_util import create_dit_model, create_gaussian_diffusion, create_model
from guided_diffusion.train_util import TrainLoop

torch.set_num_threads(1)  # 2 shared cores: more threads only contend on tiny models


def _model(seed: int = 0, attention: str = "4") -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model(
        8, 32, 1, channel_mult="1,2", learn_sigma=True, class_cond=False, use_checkpoint=False,
        attention_resolutions=attention, num_heads=4, num_head_channels=16, num_heads_upsample=-1,
        use_scale_shift_norm=True, dropout=0.0, resblock_updown=True, use_fp16=False,
        use_new_attention_order=True,
    )
    with torch.no_grad():  # the zero-initialised output convs would hide any difference
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _diffusion():
    return create_gaussian_diffusion(
        steps=20, learn_sigma=True, noise_schedule="cosine", timestep_respacing=""
    )


@pytest.fixture(autouse=True)
def _log_dir(tmp_path, monkeypatch):
    logger.configure(str(tmp_path / "log"), format_strs=[])
    # These checks are about the CPU path; on a GPU machine the loops would otherwise pick the GPU.
    monkeypatch.setattr(dist_util, "dev", lambda: torch.device("cpu"))


def _dit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_dit_model("custom", 2, 32, 2, 2, input_size=8, in_channels=3)
    with torch.no_grad():  # adaLN-Zero starts every gate and the output layer at 0
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("build", [_model, _dit], ids=["unet", "dit"])
def test_compiled_network_matches_eager_forward_and_backward(build):
    model = build()
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([0, 7, 19])
    compiled = maybe_compile(model, True, backend="aot_eager", name="test network")
    out = compiled(x, t)
    assert not compiled.failed
    ref = model(x, t)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]  # the DiT's position table is fixed
    grads = torch.autograd.grad(out.square().sum(), params)
    ref_grads = torch.autograd.grad(ref.square().sum(), params)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_compile_failure_falls_back_to_eager(monkeypatch):
    model = _model()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])

    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    warnings = []
    monkeypatch.setattr(compile_util.logger, "warn", lambda *a: warnings.append(" ".join(map(str, a))))
    wrapped = CompiledWithFallback(model, name="broken")
    torch.testing.assert_close(wrapped(x, t), model(x, t), rtol=0, atol=0)
    assert wrapped.failed and len(warnings) == 1 and "broken" in warnings[0]
    assert wrapped.image_size == 8  # module attributes still reachable through the wrapper
    with pytest.raises(RuntimeError, match="size"):
        wrapped(torch.randn(2, 5, 8, 8), t)  # a genuine error surfaces from the eager call


def test_disabled_compile_is_the_plain_module():
    model = _model()
    assert maybe_compile(model, False) is model
    with pytest.raises(ValueError, match="compile mode"):
        CompiledWithFallback(model, mode="fastest")


def _train_losses(model, steps: int = 3, fast: FastPath | None = None) -> list[float]:
    diffusion = _diffusion()
    loop = TrainLoop(model=model, diffusion=diffusion, data=iter(()), batch_size=4, microbatch=-1, lr=1e-3,
                     ema_rate="0.9", log_interval=0, save_interval=0, resume_checkpoint="", seed=0, fast=fast)
    torch.manual_seed(1)
    batch = torch.rand(4, 3, 8, 8) * 2 - 1
    losses = []
    for _ in range(steps):
        torch.manual_seed(len(losses) + 10)  # timesteps and noise both come from torch's generator
        loop.run_step(batch, {})
        total, count = loop._acc["loss"]
        losses.append(float(total) / count)
        loop._acc.clear()
    return losses


def test_fast_path_leaves_cpu_fp32_training_unchanged():
    """The default switches (cuda_graphs, half_norm) are no-ops on CPU in fp32: the same loss sequence."""
    plain = _train_losses(_model())
    fast = _train_losses(_model(), fast=FastPath(cuda_graphs=True, half_norm=True))
    assert len(plain) == 3 and plain[0] != plain[2]  # training moves the loss
    assert fast == plain


def test_half_norm_reads_bf16_with_float32_statistics():
    norm = GroupNorm32(4, 16)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(16))
        norm.bias.copy_(0.2 * torch.randn(16))
    x = (3.0 + 2.0 * torch.randn(2, 16, 8, 8)).to(torch.bfloat16)  # offset mean: stresses the variance
    upcast = norm(x)  # default: normalize in float32, cast back
    assert not norm.half_input and upcast.dtype == torch.bfloat16
    use_half_norm(norm)
    direct = norm(x)
    assert norm.half_input and direct.dtype == torch.bfloat16
    reference = torch.nn.functional.group_norm(x.double(), 4, norm.weight.double(), norm.bias.double(), 1e-5)
    for out in (upcast, direct):  # both within bf16 rounding of the float64 result
        assert (out.double() - reference).abs().max() < 0.05
    assert (direct.double() - upcast.double()).abs().max() < 0.05
    x32 = x.float()
    torch.testing.assert_close(norm(x32), torch.nn.functional.group_norm(x32, 4, norm.weight, norm.bias))
    use_half_norm(norm, False)
    assert torch.equal(norm(x), upcast)


def test_cuda_graph_wrappers_pass_cpu_calls_through():
    """On CPU (and for calls a graph cannot serve) the wrappers run the module itself, recording nothing."""
    model = _model().eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    frozen = GraphedInference(model, name="test")
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(frozen(x, t), model(x, t))
    assert frozen.graphs == {} and not frozen.failed and frozen.image_size == 8
    trained = GraphedTraining(model.train(), name="test")
    assert torch.equal(trained(x, t), model(x, t)) and trained.graphed is None
    assert fast_trained(model, FastPath(cuda_graphs=True), graphs_allowed=True) is model  # no CUDA here
    assert fast_frozen(model, FastPath(cuda_graphs=True), name="t") is model


def test_recording_a_training_graph_leaves_the_rng_stream_where_it_was(monkeypatch):
    """The recording's warm-up passes draw dropout masks; a resumed run records again at its first step, so
    they must not move the RNG, or the resumed run leaves the uninterrupted one (seen on the GPU: CIFAR 14M,
    dropout 0.3, resumed at step 20, model 1.9e-3 away at step 40)."""

    def warm_up_and_record(module, sample, num_warmup_iters, allow_unused_input):
        for _ in range(num_warmup_iters):
            torch.nn.functional.dropout(torch.ones(64), p=0.3, training=True)  # draws from the RNG
        return module

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", warm_up_and_record)
    model = _model().train()
    trained = GraphedTraining(model, name="test")
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    torch.manual_seed(7)
    before = torch.get_rng_state()
    assert trained._record(None, x, t)
    assert torch.equal(torch.get_rng_state(), before)


def _kd_loop(tmp_path) -> KDTrainLoop:
    teacher, student = _model(1), _model(2, attention="")
    diffusion = _diffusion()
    pool = DynamicBatch(teacher.eval().requires_grad_(False), diffusion, batch_size=4, image_shape=(3, 8, 8),
                        rho=0.4, seed=0)
    pool.prepare(progress=False)
    pool.total_t[:2] = 0  # two items restart from noise in the first draws
    return KDTrainLoop(teacher=teacher, teacher_diffusion=diffusion, dynamic_batch=pool, model=student,
                       diffusion=diffusion, batch_size=4, microbatch=2, lr=1e-3, ema_rate="0.9",
                       log_interval=0, save_interval=0, resume_checkpoint="", run_dir=str(tmp_path))


def test_kd_step_reads_no_tensor_back_to_the_host(tmp_path, monkeypatch):
    """Counts host reads (item, bool, int, float, tolist) during draws and steps. Allowed are the two CPU-only
    ones: the optimizer-skip flag MixedPrecisionTrainer reads on CPU and the foreach AdamW's CPU step counter
    (on CUDA the fused AdamW reads the flag and keeps its step counters on the device)."""
    loop = _kd_loop(tmp_path)
    reads: list[str] = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            import traceback

            caller = traceback.extract_stack(limit=2)[0]
            reads.append(f"{name} at {caller.filename.rsplit('/', 1)[-1]}:{caller.name}")
            return original(self, *args, **kwargs)

        return wrapper

    for name in ("item", "__bool__", "__int__", "__float__", "__index__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    for _ in range(3):
        loop.run_step(*loop.next_batch())
    monkeypatch.undo()
    allowed = {"item at mixed_precision.py:_step", "item at optimizer.py:_get_value"}
    assert sorted({r for r in reads if r not in allowed}) == []
    assert reads.count("item at mixed_precision.py:_step") == 3  # the CPU-only flag, once per step
    assert loop.step == 3


def _caller_frame(filename: str) -> bool:
    """Our code or torch.optim, not torch's dispatch/dynamo wrappers in between."""
    return "/torch/" not in filename or "/torch/optim/" in filename


class _ScalarReads(TorchDispatchMode):
    """Records where `aten._local_scalar_dense` runs: every tensor-to-host-scalar read, including those the
    C++ argument parser makes when a 0-dim tensor is passed where an op expects a Python number."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            frame = next(f for f in reversed(traceback.extract_stack()[:-1]) if _caller_frame(f.filename))
            self.sites.append(f"{frame.filename.rsplit('/', 1)[-1]}:{frame.name}")
        return func(*args, **(kwargs or {}))


def test_kd_step_converts_no_tensor_to_a_host_scalar(tmp_path):
    """Catches what the Python-level count cannot, e.g. a device weight passed to `_foreach_lerp_` as a
    Scalar (the EMA used to do that: one host sync per step)."""
    loop = _kd_loop(tmp_path)
    loop.run_step(*loop.next_batch())  # optimizer state exists from here on
    with _ScalarReads() as reads:
        for _ in range(2):
            loop.run_step(*loop.next_batch())
    allowed = {"mixed_precision.py:_step", "optimizer.py:_get_value"}  # CPU only, as above
    assert sorted(set(reads.sites) - allowed) == []
    assert reads.sites.count("mixed_precision.py:_step") == 2


def test_sync_free_draw_keeps_the_pool_semantics(tmp_path):
    loop = _kd_loop(tmp_path)
    pool = loop.dynamic_batch
    before = pool.total_t.clone()
    state = copy.deepcopy(pool.rng_state())
    batch = pool.draw()
    changed = (pool.total_t != before).nonzero().flatten()
    assert changed.numel() == 4
    # drawn items advanced one step; restarted ones (k = 0) start again at T - 1
    expected = torch.where(before[changed] == 0, torch.full_like(changed, pool.T), before[changed]) - 1
    assert sorted(pool.total_t[changed].tolist()) == sorted(expected.tolist())
    assert sorted(batch["t"].tolist()) == sorted(expected.tolist())
    assert torch.equal(pool.total_x[changed.sort().values], batch["x_tm1"][batch_order(pool, state)])


def batch_order(pool: DynamicBatch, state: dict) -> torch.Tensor:
    """Positions in the batch of the drawn items sorted by pool index (replays the index draw)."""
    gen = torch.Generator()
    gen.set_state(state["index_rng"])
    idx = torch.randperm(pool.size, generator=gen)[: pool.batch_size]
    return idx.argsort()


def test_config_compile_flag_wires_student_teacher_and_sampler(tmp_path, monkeypatch):
    """`compile: true` as the scripts pass it: the loop's forward, the pool's teacher and the sampler run
    compiled (dynamo with the eager backend here), and they compute what the plain path computes."""
    from guided_diffusion.sampling import sample_images

    monkeypatch.setenv(compile_util.BACKEND_ENV, "eager")  # dynamo tracing only: fast
    teacher = _model(1, attention="")  # small graphs: each trace costs seconds on this CPU
    pool = DynamicBatch(teacher.eval().requires_grad_(False), _diffusion(), batch_size=4,
                        image_shape=(3, 8, 8), iter_choice="iterative_distillation", seed=0)
    loop = KDTrainLoop(teacher=teacher, teacher_diffusion=_diffusion(), dynamic_batch=pool,
                       model=_model(2, attention=""),
                       diffusion=_diffusion(), batch_size=4, microbatch=-1, lr=1e-3, ema_rate="0.9",
                       log_interval=0, save_interval=0, resume_checkpoint="", run_dir=str(tmp_path),
                       fast=FastPath(compile=True))
    assert isinstance(loop.ddp_model, CompiledWithFallback) and isinstance(pool.teacher, FirstCallCompiled)
    loop.run_step(*loop.next_batch())
    assert loop.step == 1 and not loop.ddp_model.failed
    assert pool.teacher.state == "ready" and not pool.teacher.compiled.failed
    kwargs = dict(num_samples=3, batch_size=3, image_size=8, seed=5, progress=False)
    plain = sample_images(teacher, _diffusion(), **kwargs)
    fast = sample_images(teacher, _diffusion(), fast=FastPath(compile=True), **kwargs)
    assert np.abs(fast.astype(int) - plain.astype(int)).max() <= 1  # uint8 rounding of ~1e-6 differences
