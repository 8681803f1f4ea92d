"""A frozen net compiled for its first call signature, in a worker process or here (CPU, aot_eager backend:
dynamo and AOT tracing without kernel builds, so a worker finishes in seconds)."""

from __future__ import annotations

import os
import time

import torch

from guided_diffusion import logger
from guided_diffusion.infra import compile_util
from guided_diffusion.infra.background_compile import (
    FirstCallCompiled,
    _weightless_copy,
    apply_settings,
    numeric_settings,
)
from guided_diffusion.infra.compile_util import FastPath, fast_frozen, maybe_compile
from guided_diffusion.script_util import create_model

torch.set_num_threads(1)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(
        8,
        32,
        1,
        channel_mult="1,2",
        learn_sigma=True,
        class_cond=False,
        use_checkpoint=False,
        attention_resolutions="4",
        num_heads=4,
        num_head_channels=16,
        num_heads_upsample=-1,
        use_scale_shift_norm=True,
        dropout=0.0,
        resblock_updown=True,
        use_fp16=False,
        use_new_attention_order=True,
    )
    with torch.no_grad():  # the zero-initialised output convs would hide any difference
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval().requires_grad_(False)


class _Counting:
    """The fallback path, counting its calls."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module, self.calls = module, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.module(*args, **kwargs)


def _wrapped(model, fallback, *, in_worker=True, backend="aot_eager"):
    return FirstCallCompiled(
        model,
        fallback=fallback,
        name="test UNet",
        in_worker=in_worker,
        mode="default",
        backend=backend,
        compile=lambda: maybe_compile(model, True, name="test UNet", backend="aot_eager"),
    )


def _until_settled(net, x, t, limit_s=180.0):
    net(x, t)  # the first call starts the worker
    start = time.monotonic()
    while net.state == "compiling" and time.monotonic() - start < limit_s:
        net(x, t)
        time.sleep(0.05)


def test_worker_compiles_while_the_fallback_serves_then_the_first_signature_runs_compiled(tmp_path):
    logger.configure(str(tmp_path / "log"), format_strs=[])
    model = _model()
    fallback = _Counting(model)
    net = _wrapped(model, fallback)
    x, t = torch.randn(4, 3, 8, 8), torch.randint(0, 20, (4,))
    with torch.inference_mode():
        expected = model(x, t)
        torch.testing.assert_close(net(x, t), expected, rtol=0, atol=0)
        assert net.state == "compiling" and fallback.calls == 1 and net.worker is not None
        _until_settled(net, x, t)
        assert net.state == "ready", open(net.log_path).read()
        served = fallback.calls
        torch.testing.assert_close(net(x, t), expected, rtol=1e-5, atol=1e-6)
        assert fallback.calls == served  # the compiled net served it
        other_x, other_t = torch.randn(2, 3, 8, 8), torch.randint(0, 20, (2,))
        torch.testing.assert_close(net(other_x, other_t), model(other_x, other_t), rtol=0, atol=0)
        assert fallback.calls == served + 1  # another shape stays on the fallback
    assert net.log_path == str(tmp_path / "log" / "compile_test_unet_rank0.log")
    assert "compiled UNetModel for x (4, 3, 8, 8)" in open(net.log_path).read()
    assert not os.path.exists(net.spec_path)


def test_a_failed_worker_leaves_the_fallback_in_place_with_one_warning(tmp_path, monkeypatch):
    logger.configure(str(tmp_path / "log"), format_strs=[])
    warnings = []
    monkeypatch.setattr(logger, "warn", lambda *a: warnings.append(" ".join(map(str, a))))
    model = _model()
    fallback = _Counting(model)
    net = _wrapped(model, fallback, backend="no_such_backend")
    x, t = torch.randn(4, 3, 8, 8), torch.randint(0, 20, (4,))
    with torch.inference_mode():
        _until_settled(net, x, t)
        assert net.state == "failed"
        calls = fallback.calls
        torch.testing.assert_close(net(x, t), model(x, t), rtol=0, atol=0)
    assert fallback.calls == calls + 1 and net.compiled is None
    assert len(warnings) == 1 and "exited with code" in warnings[0] and net.log_path in warnings[0]
    assert "no_such_backend" in open(net.log_path).read()


def test_in_process_mode_compiles_at_the_first_call_without_a_worker(tmp_path):
    logger.configure(str(tmp_path / "log"), format_strs=[])
    model = _model()
    fallback = _Counting(model)
    net = _wrapped(model, fallback, in_worker=False)
    x, t = torch.randn(4, 3, 8, 8), torch.randint(0, 20, (4,))
    with torch.inference_mode():
        torch.testing.assert_close(net(x, t), model(x, t), rtol=1e-5, atol=1e-6)
    assert net.state == "ready" and net.worker is None and fallback.calls == 0


def test_fast_frozen_compiles_in_a_worker_only_when_the_config_asks(monkeypatch):
    monkeypatch.setenv(compile_util.BACKEND_ENV, "aot_eager")
    background = fast_frozen(_model(), FastPath(compile=True, compile_background=True), name="teacher UNet")
    here = fast_frozen(_model(), FastPath(compile=True), name="teacher UNet")
    assert isinstance(background, FirstCallCompiled) and background.in_worker
    assert isinstance(here, FirstCallCompiled) and not here.in_worker
    assert background.image_size == 8  # attribute reads reach the module


def test_the_worker_copy_has_the_structure_without_the_weights():
    model = _model()
    model.input_blocks[0][0].weight.requires_grad_(True)
    copy = _weightless_copy(model)
    params = dict(model.named_parameters())
    for name, p in copy.named_parameters():
        assert p.device.type == "meta" and p.shape == params[name].shape and p.dtype == params[name].dtype
        assert p.requires_grad == params[name].requires_grad
    assert next(model.parameters()).device.type == "cpu"  # the original is untouched


def test_the_workers_settings_leave_the_state_inductors_cache_key_reads_unchanged():
    """The worker first set the matmul precision to the caller's "highest" unconditionally, which reads as
    "ieee" where the default reads "none": every hand-over on the H200 missed the cache and recompiled
    (41-47 s) instead of loading the worker's kernels."""

    def key_state():
        return (
            torch.backends.cuda.matmul.fp32_precision,
            torch.backends.cudnn.fp32_precision,
            torch.backends.cudnn.benchmark,
            torch.are_deterministic_algorithms_enabled(),
        )

    before = key_state()
    apply_settings(numeric_settings())
    assert key_state() == before


def test_the_worker_never_imports_mpi():
    """Under `mpiexec` the worker inherits the rank's MPI environment; an MPI_Init in it (mpi4py's import)
    could join or hang the job. Loading the worker and the UNet it unpickles must not import mpi4py."""
    import subprocess
    import sys

    code = (
        "import sys, guided_diffusion.infra.background_compile, guided_diffusion.unet, "
        "guided_diffusion.ddpm_unet; sys.exit('mpi4py' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
