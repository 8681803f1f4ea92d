"""CUDA graphs for the UNet's static-shape calls: frozen inference and the student's forward/backward.

A 32x32 UNet step launches thousands of small kernels, and in eager mode the GPU waits on the Python host
between them. A graph records one call and replays it as a single launch, so the host cost disappears
while the kernels, and therefore the results, stay the same. Graphs read inputs and weights at fixed
addresses: the wrappers copy each call's inputs into recorded buffers, and weights must be updated in place
(optimizer steps and `load_state_dict` do that). Calls a graph cannot serve (another shape, keyword
arguments, CPU tensors, training mode for a frozen net) run the module eagerly; a failed recording logs one
warning and turns the wrapper into a plain pass-through.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import nn

from .. import logger


class TensorLayout(NamedTuple):
    shape: tuple[int, ...]
    dtype: torch.dtype
    stride: tuple[int, ...]
    requires_grad: bool


class Signature(NamedTuple):
    """What a recorded or compiled call depends on besides the weights: the keyword names, each tensor's
    layout (x, timesteps, then the keywords in name order) and the autocast/grad modes."""

    names: tuple[str, ...]
    tensors: tuple[TensorLayout, ...]
    autocast: bool
    autocast_dtype: torch.dtype | None
    grad: bool
    inference_mode: bool


def call_signature(device: torch.device, tensors: tuple[torch.Tensor, ...], names: tuple[str, ...]
                   ) -> Signature:
    """The signature of a call with these tensors and keyword names on `device`, in the current modes."""
    kind = device.type
    autocast = torch.is_autocast_enabled(kind)
    return Signature(
        names,
        tuple(TensorLayout(tuple(t.shape), t.dtype, t.stride(), t.requires_grad) for t in tensors),
        autocast,
        torch.get_autocast_dtype(kind) if autocast else None,
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
    )


def _graphable_args(x: torch.Tensor, timesteps: torch.Tensor, kwargs: dict[str, Any]
                    ) -> tuple[tuple[torch.Tensor, ...], tuple[str, ...]] | None:
    """(tensors, keyword names) when every argument is a CUDA tensor on one device, else None."""
    names = tuple(sorted(kwargs))
    tensors = (x, timesteps, *(kwargs[n] for n in names))
    if not all(isinstance(t, torch.Tensor) and t.is_cuda and t.device == x.device for t in tensors):
        return None
    return tensors, names


@contextlib.contextmanager
def _no_autocast_cache() -> Iterator[None]:
    """Autocast's cache of half-precision weight copies off while a graph is recorded. A graph recorded with
    the cache on reads the cached copies instead of casting, and the cache is freed when the caller's
    autocast region ends: later replays then read freed memory (half-precision sampling on a GPU returned
    black images from its second round on)."""
    enabled = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(enabled)


class _Recorded(NamedTuple):
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor


class GraphedInference:
    """A frozen network (teacher, sampler) whose repeated no-grad calls replay CUDA graphs.

    One graph per call signature, recorded on the second call with that signature (the first runs eagerly,
    which also lets cuDNN pick its algorithms), at most `max_graphs` of them sharing one memory pool; other
    calls run eagerly. Returns a copy of the graph's output, since the next replay overwrites it.
    """

    def __init__(self, module: nn.Module, *, name: str, max_graphs: int = 4) -> None:
        self.module = module
        self.name = name
        self.max_graphs = int(max_graphs)
        self.graphs: dict[Signature, _Recorded] = {}
        self.calls: dict[Signature, int] = {}
        self.pool: Any = None
        self.failed = False

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, **kwargs: Any) -> Any:
        args = None if self.failed or self.module.training or torch.is_grad_enabled() \
            else _graphable_args(x, timesteps, kwargs)
        if args is None:
            return self.module(x, timesteps, **kwargs)
        tensors, names = args
        key = call_signature(x.device, tensors, names)
        recorded = self.graphs.get(key)
        if recorded is None:
            self.calls[key] = self.calls.get(key, 0) + 1
            if self.calls[key] < 2 or len(self.graphs) >= self.max_graphs:
                return self.module(x, timesteps, **kwargs)
            recorded = self._record(key, tensors, names)
            if recorded is None:
                return self.module(x, timesteps, **kwargs)
        for static, value in zip(recorded.inputs, tensors, strict=True):
            static.copy_(value)
        recorded.graph.replay()
        return recorded.output.clone()

    def _record(self, key: Signature, tensors: tuple[torch.Tensor, ...], names: tuple[str, ...]
                ) -> _Recorded | None:
        static = tuple(t.clone() for t in tensors)
        kwargs = dict(zip(names, static[2:], strict=True))
        try:
            with _no_autocast_cache():
                side = torch.cuda.Stream(device=static[0].device)
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # capture needs the lazy initialisations done off the capture
                    self.module(static[0], static[1], **kwargs)
                torch.cuda.current_stream().wait_stream(side)
                if self.pool is None:
                    self.pool = torch.cuda.graph_pool_handle()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    output = self.module(static[0], static[1], **kwargs)
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"expected a tensor output, got {type(output).__name__}")
        except Exception as exc:
            self.failed = True
            self.graphs.clear()
            logger.warn(f"CUDA graph of {self.name} failed ({type(exc).__name__}: {str(exc)[:200]}); "
                        "running eagerly")
            return None
        recorded = _Recorded(graph, static, output)
        self.graphs[key] = recorded
        return recorded

    def __getattr__(self, name: str) -> Any:
        # Attribute reads (image_size, parameters, ...) go to the wrapped module.
        if name == "module":
            raise AttributeError(name)
        return getattr(self.module, name)


class _Forward(nn.Module):
    """Holds the network, so that make_graphed_callables replaces this forward and not the network's own."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.net(x, timesteps)


class GraphedTraining:
    """The student's training forward with its backward, recorded as CUDA graphs on the first call.

    Serves calls with the recorded signature (batch shape, dtypes, autocast mode, grad enabled, module in
    training mode, no keyword arguments); everything else (TCCD's no-grad trajectory steps, RDD's feature
    calls, another batch size) runs the module eagerly. The recording runs with autocast's weight-cast cache
    off, so the graph casts the weights it reads, which optimizer steps change in place. Gradients
    come back in buffers the next replay reuses, so use it with one backward per optimizer step (no
    microbatch accumulation); the training loop only wraps the student then.
    """

    def __init__(self, module: nn.Module, *, name: str) -> None:
        self.module = module
        self.name = name
        self.graphed: Any = None
        self.signature: Signature | None = None
        self.failed = False

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, **kwargs: Any) -> Any:
        eligible = not (self.failed or kwargs) and self.module.training and torch.is_grad_enabled()
        args = _graphable_args(x, timesteps, {}) if eligible else None
        if args is None:
            return self.module(x, timesteps, **kwargs)
        key = call_signature(x.device, args[0], ())
        if self.graphed is None and not self._record(key, x, timesteps):
            return self.module(x, timesteps)
        if key != self.signature:
            return self.module(x, timesteps)
        return self.graphed(x, timesteps)

    def _record(self, key: Signature, x: torch.Tensor, timesteps: torch.Tensor) -> bool:
        sample = (x.detach().clone().requires_grad_(x.requires_grad), timesteps.clone())
        # The recording runs on a side stream and keeps the parameters' gradient-accumulation nodes alive,
        # so every later backward on the main stream meets them there. PyTorch warns about the extra
        # stream synchronisation; it is expected here, measured in docs/PERFORMANCE.md, and not an error.
        quiet = getattr(torch.autograd.graph, "set_warn_on_accumulate_grad_stream_mismatch", None)
        if quiet is not None:
            quiet(False)
        # The warm-up passes before the capture draw from the RNG (dropout). A resumed run records again at
        # its first step, so they must not move the training's RNG stream, or it leaves the uninterrupted one.
        devices = [x.device] if x.is_cuda else []
        try:
            with _no_autocast_cache(), torch.random.fork_rng(devices=devices):
                self.graphed = torch.cuda.make_graphed_callables(
                    _Forward(self.module), sample, num_warmup_iters=3, allow_unused_input=True
                )
        except Exception as exc:
            self.failed = True
            self.graphed = None
            logger.warn(f"CUDA graph of {self.name} failed ({type(exc).__name__}: {str(exc)[:200]}); "
                        "running eagerly")
            return False
        self.signature = key
        return True

    def __getattr__(self, name: str) -> Any:
        if name == "module":
            raise AttributeError(name)
        return getattr(self.module, name)
