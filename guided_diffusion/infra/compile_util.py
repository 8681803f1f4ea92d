"""The fast path of the hot UNet calls: which speed-ups a config turns on, and torch.compile with a fallback.

Every helper keeps what the wrapped code computes (up to floating-point rounding) and degrades to the plain
eager path when the feature is unavailable (no C++ compiler, no CUDA, an unsupported op), logging a warning
once instead of failing the run. The CUDA-graph wrappers live in `cuda_graphs`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .. import logger
from ..nn import use_half_norm
from .background_compile import FirstCallCompiled
from .cuda_graphs import GraphedInference, GraphedTraining

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


def compile_backend() -> str:
    """The torch.compile backend behind the config's `compile: true`: inductor, unless the environment
    variable BACKEND_ENV names another (aot_eager runs the compiled paths on CPU without kernel builds)."""
    return os.environ.get(BACKEND_ENV, "inductor")


@dataclass(frozen=True)
class FastPath:
    """The config's speed switches (training/sampling section keys of the same names).

    `half_norm`: GroupNorm reads fp16/bf16 activations directly (float32 statistics, no casts).
    `cuda_graphs`: static-shape UNet calls replay CUDA graphs (frozen nets; the student's forward/backward
    in single-process training with one microbatch). `compile`: torch.compile for the frozen nets (with
    graphs at static shapes) and for a student that runs without graphs; CUDA models only.
    `compile_background`: a frozen net is compiled by a worker process while its calls run uncompiled
    (`background_compile`), so a run's first step does not wait for the compile; off under `deterministic`,
    where the step at which the compiled net takes over would depend on the wall clock.
    All are no-ops on CPU and for fp32, so the reference path is untouched.
    """

    compile: bool = False
    cuda_graphs: bool = False
    half_norm: bool = False
    compile_background: bool = False

    @classmethod
    def from_section(cls, section: Any) -> FastPath:
        """The switches of a config section (a flat training/sampling section or the KD student's)."""
        background = bool(section.compile_background) and not bool(section.get("deterministic", False))
        return cls(compile=bool(section.compile), cuda_graphs=bool(section.cuda_graphs),
                   half_norm=bool(section.half_norm), compile_background=background)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _compiles_here(model: torch.nn.Module) -> bool:
    """`compile` acts on CUDA models. On CPU, inductor's C++ build takes minutes and gains nothing on the
    small machines CPU runs use, so it stays eager there unless BACKEND_ENV names a backend (the tests)."""
    return _device_of(model).type == "cuda" or BACKEND_ENV in os.environ


def fast_trained(model: Callable, fast: FastPath, *, graphs_allowed: bool, name: str = "student UNet"
                 ) -> Callable:
    """The training forward: CUDA graphs of forward and backward with `cuda_graphs` when `graphs_allowed`
    (the loop's single-process, one-microbatch case) on CUDA; otherwise torch.compile (default mode,
    eager fallback) with `compile`; otherwise `model` itself. Graphs come first because they measured
    faster for training on the H100 than the compiled forward (docs/PERFORMANCE.md). `half_norm` switches
    the model's GroupNorms first."""
    if fast.half_norm:
        use_half_norm(model)
    if fast.cuda_graphs and graphs_allowed and _device_of(model).type == "cuda":
        return GraphedTraining(model, name=name)
    if fast.compile and _compiles_here(model):
        return maybe_compile(model, True, name=name, backend=compile_backend())
    return model


def fast_frozen(model: torch.nn.Module, fast: FastPath, *, name: str) -> Callable:
    """A frozen network (teacher, sampler) on the fast path; every call site gives it one batch size (pool
    draws, sampling; the pool preparation pads its calls to a few sizes). With `compile`: compiled for the
    first call's static shapes with an eager fallback, plus CUDA graphs (mode reduce-overhead, outputs
    cloned) on CUDA, other shapes on the path below; with `compile_background` the compile runs in a
    worker process while the calls run on the path below (`background_compile.FirstCallCompiled`). With
    `cuda_graphs` only: GraphedInference, which graphs the repeated shapes and runs one-off shapes
    eagerly. Neither: `model` itself. `half_norm` is only ever switched on here, so sampling a training
    student with default switches leaves its GroupNorm mode alone."""
    if fast.half_norm:
        use_half_norm(model)
    cuda = _device_of(model).type == "cuda"
    uncompiled = GraphedInference(model, name=name) if fast.cuda_graphs and cuda else model
    if not (fast.compile and _compiles_here(model)):
        return uncompiled
    graphs = cuda and compile_backend() == "inductor"
    mode = "reduce-overhead" if graphs else "default"

    def build() -> Callable:
        return maybe_compile(model, True, mode=mode, dynamic=False, clone_outputs=graphs, name=name,
                             backend=compile_backend())

    return FirstCallCompiled(model, fallback=uncompiled, compile=build, name=name,
                             in_worker=fast.compile_background, mode=mode, backend=compile_backend())


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
