"""Compiling a frozen network in a worker process while its calls run on the fallback path.

torch.compile of a 57M UNet spends about 50 s before its first call returns, so a compiled teacher or
sampler used to start every run with that wait. Here the first call starts a worker process that compiles a
weightless copy of the network for that call's signature, which leaves the kernels in inductor's on-disk
cache; until the worker exits the calls run on the fallback (CUDA graphs of the eager network). Then the
network is compiled in this process, now a cache hit, and serves that signature from then on. A worker
that fails leaves the fallback in place with one warning. Run as a module, this file is the worker.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import logger
from .cuda_graphs import Signature, TensorLayout, call_signature

_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])


def _weightless_copy(module: torch.nn.Module) -> torch.nn.Module:
    """`module` with every parameter and buffer on the meta device (same dtype, shape, requires_grad)."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


def numeric_settings() -> dict[str, Any]:
    """The process-wide settings a compiled graph depends on besides its call signature."""
    return {
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
    }


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class FirstCallCompiled:
    """A frozen network compiled for the signature of its first call, the rest served by `fallback`.

    With `in_worker` the compile runs in a worker process (see the module doc) and `fallback` serves every
    call until it is done; without, this process compiles at the first call. Either way only one signature
    is compiled: other shapes (the preparation's shrinking tail calls, TCCD's extra queries) replay
    `fallback`'s CUDA graphs instead of waiting for a compile each. `compile` builds this process's
    compiled network (e.g. `maybe_compile` of `module`); `mode` and `backend` are the torch.compile
    arguments it uses, which the worker repeats so that both compile the same graph.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        fallback: Callable,
        compile: Callable[[], Callable],
        name: str,
        in_worker: bool = True,
        mode: str = "reduce-overhead",
        backend: str = "inductor",
    ) -> None:
        self.module = module
        self.fallback = fallback
        self.build_compiled = compile
        self.name = name
        self.in_worker = in_worker
        self.mode, self.backend = mode, backend
        self.key: Signature | None = None
        self.worker: subprocess.Popen | None = None
        self.compiled: Callable | None = None
        self.state = "idle"  # idle -> compiling -> ready | failed
        self.started = 0.0
        self.spec_path = ""
        self.log_path = ""

    def __getattr__(self, name: str) -> Any:
        # Attribute reads (image_size, num_classes, parameters ...) go to the wrapped module.
        if name in ("module", "fallback", "state"):
            raise AttributeError(name)
        return getattr(self.module, name)

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, **kwargs: Any) -> Any:
        names = tuple(sorted(kwargs))
        tensors = (x, timesteps, *(kwargs[n] for n in names))
        if all(isinstance(t, torch.Tensor) and t.device == x.device for t in tensors):
            key = call_signature(x.device, tensors, names)
            if self.state == "idle" and not self.in_worker:
                self.key, self.compiled, self.state = key, self.build_compiled(), "ready"
            elif self.state == "idle":
                self._start(key, x.device)
            elif self.state == "compiling":
                self._poll()
            if self.state == "ready" and key == self.key:
                return self._call_compiled(x, timesteps, kwargs)
        return self.fallback(x, timesteps, **kwargs)

    def _start(self, key: Signature, device: torch.device) -> None:
        spec = {
            "module": _weightless_copy(self.module),
            "device": str(device),
            "signature": key,
            "settings": numeric_settings(),
            "mode": self.mode,
            "backend": self.backend,
        }
        slug = re.sub(r"[^A-Za-z0-9]+", "_", self.name).strip("_").lower()
        fd, self.spec_path = tempfile.mkstemp(prefix=f"compile_{slug}_", suffix=".pt")
        os.close(fd)
        torch.save(spec, self.spec_path)
        log_dir = logger.get_dir() or tempfile.gettempdir()
        self.log_path = os.path.join(log_dir, f"compile_{slug}_rank{_rank()}.log")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
        # all cores but two for the worker's kernel builds (this process's Python thread drives the GPU
        # meanwhile): on the H200 half the cores made the compile 19% slower and the preparation longer
        env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(max(1, (os.cpu_count() or 2) - 2)))
        with open(self.log_path, "w") as log:
            self.worker = subprocess.Popen(
                [sys.executable, "-m", "guided_diffusion.infra.background_compile", self.spec_path],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                stdin=subprocess.DEVNULL,
            )
        atexit.register(self._stop_worker)
        self.key, self.state, self.started = key, "compiling", time.perf_counter()
        logger.log(
            f"{self.name}: compiling in a worker process (log: {self.log_path}); "
            "running on the uncompiled fast path until it is done"
        )

    def _poll(self) -> None:
        code = self.worker.poll()
        if code is None:
            return
        self._remove_spec()
        if code != 0:
            self.state = "failed"
            logger.warn(
                f"{self.name}: the compile worker exited with code {code} (log: {self.log_path}); "
                "staying on the uncompiled fast path"
            )
            return
        self.compiled = self.build_compiled()
        self.state = "ready"

    def _call_compiled(self, x: torch.Tensor, timesteps: torch.Tensor, kwargs: dict[str, Any]) -> Any:
        first = self.worker is not None
        begin = time.perf_counter()
        out = self.compiled(x, timesteps, **kwargs)
        if first:  # the hand-over: this process's compile, from the worker's cache
            self.worker = None
            logger.log(
                f"{self.name}: compiled by the worker, in use {begin - self.started:.1f} s after its start; "
                f"loaded from its cache in {time.perf_counter() - begin:.1f} s"
            )
        return out

    def _remove_spec(self) -> None:
        if self.spec_path and os.path.exists(self.spec_path):
            os.remove(self.spec_path)

    def _stop_worker(self) -> None:
        """At exit: a worker still compiling is stopped (its cache entries are written atomically)."""
        if self.worker is not None and self.worker.poll() is None:
            self.worker.terminate()
            self.worker.wait()
        self._remove_spec()


def apply_settings(settings: dict[str, Any]) -> None:
    """Give this process the settings of `numeric_settings`, setting only those that differ: a value set
    equal to its default still changes the state inductor's cache key reads (the matmul precision "highest"
    set explicitly reads as "ieee", the default as "none"), and the caller would miss the cache."""
    if torch.get_float32_matmul_precision() != settings["float32_matmul_precision"]:
        torch.set_float32_matmul_precision(settings["float32_matmul_precision"])
    if torch.backends.cudnn.benchmark != settings["cudnn_benchmark"]:
        torch.backends.cudnn.benchmark = settings["cudnn_benchmark"]
    if torch.are_deterministic_algorithms_enabled() != settings["deterministic"]:
        torch.use_deterministic_algorithms(settings["deterministic"])


def _zeros(layout: TensorLayout, device: torch.device) -> torch.Tensor:
    t = torch.empty_strided(layout.shape, layout.stride, dtype=layout.dtype, device=device).zero_()
    return t.requires_grad_(layout.requires_grad)


def warm_cache(spec_path: str) -> None:
    """The worker: compile the spec's weightless network for its call signature and run it once, which
    writes the compiled kernels to inductor's cache (the one of this environment, shared with the caller)."""
    spec = torch.load(spec_path, weights_only=False)
    apply_settings(spec["settings"])
    device = torch.device(spec["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    module = spec["module"].to_empty(device=device)
    with torch.no_grad():
        for t in (*module.parameters(), *module.buffers()):
            t.zero_()
    signature: Signature = spec["signature"]
    x, timesteps, *rest = (_zeros(layout, device) for layout in signature.tensors)
    kwargs = dict(zip(signature.names, rest, strict=True))
    options = (
        {"mode": None if spec["mode"] == "default" else spec["mode"]} if spec["backend"] == "inductor" else {}
    )
    compiled = torch.compile(module, backend=spec["backend"], dynamic=False, **options)
    autocast = (
        torch.autocast(device.type, dtype=signature.autocast_dtype)
        if signature.autocast
        else contextlib.nullcontext()
    )
    begin = time.perf_counter()
    with torch.inference_mode(signature.inference_mode), torch.set_grad_enabled(signature.grad), autocast:
        compiled(x, timesteps, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    print(
        f"compiled {type(module).__name__} for x {tuple(x.shape)} in {time.perf_counter() - begin:.1f} s",
        flush=True,
    )


if __name__ == "__main__":
    warm_cache(sys.argv[1])
