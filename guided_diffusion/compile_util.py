"""Optional speed-ups for the hot paths: torch.compile with an eager fallback, channels_last, CUDA graphs.

Every helper keeps what the wrapped code computes (up to floating-point reassociation) and degrades to the
plain eager path when the feature is unavailable (no C++ compiler, no CUDA, an unsupported op), logging a
warning once instead of failing the run.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch

from . import logger

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
BACKEND_ENV = "GUIDED_DIFFUSION_COMPILE_BACKEND"  # e.g. aot_eager: trace without building kernels (CPU tests)


class CompiledWithFallback:
    """Calls `torch.compile(fn)`; on the first compile/run failure logs a warning and calls `fn` eagerly.

    Errors raised by the eager call propagate unchanged, so genuine bugs (bad shapes) are not hidden.
    `clone_outputs` copies tensor outputs, needed when CUDA graphs reuse their output buffers.
    """

    def __init__(self, fn: Callable, *, mode: str = "default", dynamic: bool | None = False,
                 clone_outputs: bool = False, name: str | None = None, backend: str = "inductor") -> None:
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}; got {mode!r}")
        self.fn = fn
        self.mode = mode
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        self.clone_outputs = clone_outputs
        self.failed = False
        try:
            options = {"mode": None if mode == "default" else mode} if backend == "inductor" else {}
            self.compiled: Callable | None = torch.compile(fn, backend=backend, dynamic=dynamic, **options)
        except Exception as exc:  # torch.compile itself is unavailable (old torch, unsupported platform)
            self._give_up(exc)

    def _give_up(self, exc: BaseException) -> None:
        self.failed = True
        self.compiled = None
        logger.warn(f"torch.compile of {self.name} failed ({type(exc).__name__}: {str(exc)[:200]}); "
                    "running eagerly")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is None:
            return self.fn(*args, **kwargs)
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as exc:
            self._give_up(exc)
            torch._dynamo.reset()
            return self.fn(*args, **kwargs)
        return _clone_tensors(out) if self.clone_outputs else out

    def __getattr__(self, name: str) -> Any:
        # Attribute reads (image_size, num_classes, parameters ...) go to the wrapped module.
        if name in ("fn", "compiled"):
            raise AttributeError(name)
        return getattr(self.fn, name)


def _clone_tensors(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, tuple):
        return tuple(_clone_tensors(o) for o in out)
    if isinstance(out, list):
        return [_clone_tensors(o) for o in out]
    if isinstance(out, dict):
        return {k: _clone_tensors(v) for k, v in out.items()}
    return out


def maybe_compile(fn: Callable, enabled: bool, *, mode: str = "default", dynamic: bool | None = False,
                  clone_outputs: bool = False, name: str | None = None,
                  backend: str = "inductor") -> Callable:
    """`fn` compiled with an eager fallback when `enabled`, else `fn` itself (the plain path).

    `backend` other than "inductor" (e.g. "aot_eager", which traces without generating kernels) is for tests.
    """
    if not enabled:
        return fn
    return CompiledWithFallback(fn, mode=mode, dynamic=dynamic, clone_outputs=clone_outputs, name=name,
                                backend=backend)


def to_channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """Store the model's 4-D weights channels_last (NHWC) in place, so cuDNN convs skip layout transposes."""
    return model.to(memory_format=torch.channels_last)


def compile_backend() -> str:
    """The torch.compile backend behind the config's `compile: true`: inductor, unless the environment
    variable BACKEND_ENV names another (aot_eager runs the compiled paths on CPU without kernel builds)."""
    return os.environ.get(BACKEND_ENV, "inductor")


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def prepare_trained_model(model: torch.nn.Module) -> torch.nn.Module:
    """What `compile: true` does to a trained network before its optimizer exists: channels_last weights and
    TF32/cuDNN autotuning on CUDA (nothing on CPU, where NCHW is as fast and fp32 must stay exact)."""
    if _device_of(model).type == "cuda":
        configure_cuda_matmul()
        to_channels_last(model)
    return model


def compile_trained(model: Callable, enabled: bool, name: str = "student UNet") -> Callable:
    """The training forward for `compile: true` (default mode, static shapes, eager fallback); disabled:
    `model` itself."""
    return maybe_compile(model, enabled, name=name, backend=compile_backend())


def compile_frozen(model: torch.nn.Module, enabled: bool, *, static_shapes: bool, name: str) -> Callable:
    """A frozen network (teacher, sampler) for `compile: true`: channels_last on CUDA, then compiled with an
    eager fallback. `static_shapes` (one batch size per call site: pool draws, sampling) adds CUDA graphs
    (mode reduce-overhead, outputs cloned); otherwise (pool preparation, whose last chunk shrinks) the batch
    dimension may turn dynamic and no graphs are recorded. Disabled: `model` itself."""
    if not enabled:
        return model
    prepare_trained_model(model)
    graphs = static_shapes and _device_of(model).type == "cuda" and compile_backend() == "inductor"
    return maybe_compile(model, True, mode="reduce-overhead" if graphs else "default",
                         dynamic=False if static_shapes else None, clone_outputs=graphs, name=name,
                         backend=compile_backend())


def configure_cuda_matmul() -> None:
    """Allow TF32 for fp32 matmuls/convs on CUDA (bf16 autocast covers most of the work; this speeds up the
    rest). Never touches CPU numerics, so the fp32 reference path on CPU stays exact."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def restore_cuda_matmul() -> None:
    """Undo `configure_cuda_matmul` (PyTorch's defaults), so a later plain-path run in the same process is
    not silently TF32."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = False


def compile_available() -> bool:
    """True when torch.compile's default backend can build kernels here (a trial compile of a tiny fn)."""
    return _compile_probe()


@functools.lru_cache(maxsize=1)
def _compile_probe() -> bool:
    try:
        fn = torch.compile(lambda x: torch.sin(x) * 2.0, dynamic=False)
        fn(torch.ones(4))
        return True
    except Exception:
        return False
