"""Throughput of the project's hot paths: DKDM/image_train iterations, sampling and pool-preparation steps.

Each case is built from the real arch/diffusion YAMLs and runs the very objects the scripts run per iteration
(TrainLoop.run_step, the KD loop's step with its DynamicBatch draw, the diffusion's p_sample, the pool's
teacher_step), with random weights and synthetic in-memory data. `--mode baseline` is the public code's
recipe on our loops (fp16 autocast, fp32 master weights, dynamic loss scale, GroupNorm through fp32, eager);
`--mode optimized` is what the scripts run by default with `precision: bf16` (bf16 autocast, `half_norm`
GroupNorm, `cuda_graphs` for the student's forward/backward, `compile` with CUDA graphs for the frozen
teacher/sampler; `--compile off` measures the scripts with `compile: false`). Rows are printed (and the
JSON rewritten) as each case finishes, so a timeout still leaves numbers.

    python benchmarks/bench_throughput.py --device cuda --mode both --json bench.json
    python benchmarks/bench_throughput.py --tiny --device cpu --iters 2 --warmup 1
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from guided_diffusion import logger  # noqa: E402
from guided_diffusion.distill.dkdm.pool import DynamicBatch  # noqa: E402
from guided_diffusion.distill.loop import KDTrainLoop  # noqa: E402
from guided_diffusion.infra.atomic_io import atomic_write_text  # noqa: E402
from guided_diffusion.infra.compile_util import FastPath, fast_frozen  # noqa: E402
from guided_diffusion.model_cost import forward_cost  # noqa: E402
from guided_diffusion.script_util import architecture_defaults, create_any_model_and_diffusion  # noqa: E402
from guided_diffusion.train_util import TrainLoop  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
DIFFUSION_YAML = "yaml/cifar10_32/diffusion.yaml"
ARCHS = {
    "14M": "yaml/arch/14M-CNN.yaml", "57M": "yaml/arch/57M-CNN.yaml",
    "DiT-S/2": "yaml/arch/DiT-S-2.yaml", "DiT-B/2": "yaml/arch/DiT-B-2.yaml",
}
TINY_ARCHS = {
    "14M": "tests/configs/tiny_student_arch.yaml", "57M": "tests/configs/tiny_arch.yaml",
    "DiT-S/2": "tests/configs/tiny_dit_arch.yaml", "DiT-B/2": "tests/configs/tiny_dit_arch.yaml",
}

# The public implementation on an H100 80GB (PyTorch 2.11, fp16 + fp32 master weights), from the issue.
PUBLIC = {"kd14": 702.0, "kd57": 582.0, "train14": 820.0, "train57": 749.0, "sample14": 9900.0,
          "sample57": 4940.0, "prepare57": 4950.0}


@dataclass(frozen=True)
class Case:
    """One benchmark case: what runs per iteration, on which archs, at which batch size."""

    name: str
    kind: str  # kd | train | sample | prepare
    model: str  # the trained/sampled arch (the student for kd)
    batch: int
    tiny_batch: int
    teacher: str | None = None


CASES = {
    c.name: c
    for c in (
        Case("kd14", "kd", "14M", 128, 4, teacher="57M"),
        Case("kd57", "kd", "57M", 128, 4, teacher="57M"),
        Case("train14", "train", "14M", 128, 4),
        Case("train57", "train", "57M", 128, 4),
        Case("sample14", "sample", "14M", 2500, 8),
        Case("sample57", "sample", "57M", 2500, 8),
        Case("prepare57", "prepare", "57M", 3072, 16),
        Case("kd_dit_s2", "kd", "DiT-S/2", 128, 4, teacher="57M"),  # the 57M UNet teacher into DiTs
        Case("kd_dit_b2", "kd", "DiT-B/2", 128, 4, teacher="57M"),
        Case("train_dit_s2", "train", "DiT-S/2", 128, 4),
        Case("train_dit_b2", "train", "DiT-B/2", 128, 4),
    )
}


@dataclass(frozen=True)
class Options:
    """The knobs a mode sets (see module docstring)."""

    precision: str  # fp16 | bf16 (fp32 on CPU either way)
    fast: FastPath


def mode_options(mode: str, compile_flag: str) -> Options:
    """Baseline = the public code's recipe; optimized = the scripts' defaults in bf16 (`compile: false` with
    `compile_flag` "off"). The fast-path switches are no-ops on CPU."""
    if mode == "baseline":
        return Options("fp16", FastPath())
    return Options("bf16", FastPath(compile=compile_flag == "on", cuda_graphs=True, half_norm=True))


# ----------------------------------------------------------------------------------------------- building


def _read_yaml(rel: str) -> dict[str, Any]:
    path = REPO / rel
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of options")
    return data


def build(arch: str, tiny: bool, device: torch.device):
    """(UNet or DiT on `device`, SpacedDiffusion) from the arch YAML and the CIFAR10 diffusion YAML."""
    merged = {**_read_yaml((TINY_ARCHS if tiny else ARCHS)[arch]), **_read_yaml(DIFFUSION_YAML)}
    kwargs = architecture_defaults(merged)
    kwargs.update({k: v for k, v in merged.items() if k in kwargs})
    for key in ("channel_mult", "attention_resolutions", "timestep_respacing"):
        if key in kwargs:
            kwargs[key] = str(kwargs[key])
    model, diffusion = create_any_model_and_diffusion(**kwargs)
    diffusion.cache_tables(device)
    return model.to(device), diffusion


def _random_pool(pool: DynamicBatch, seed: int) -> None:
    """Fill the pool with random states at random steps (what a prepared pool looks like, minus the cost)."""
    rng = np.random.default_rng(seed)
    total_t = rng.integers(1, pool.T, size=pool.size).astype(np.int64)
    total_x = rng.standard_normal((pool.size, *pool.image_shape), dtype=np.float32)
    pool.load_arrays(total_t, total_x, source="benchmark pool")


def _train_loop(model, diffusion, batch: int, opts: Options, run_dir: str, loop_cls=TrainLoop, **extra):
    if loop_cls is TrainLoop:
        extra["data"] = iter(())
    loop = loop_cls(
        model=model, diffusion=diffusion, batch_size=batch, microbatch=-1, lr=1e-4,
        ema_rate="0.9999", log_interval=0, save_interval=0, resume_checkpoint="", use_fp16=True,
        precision=opts.precision, fp16_scale_growth=1e-3, run_dir=run_dir, fast=opts.fast, **extra,
    )
    return loop


def _kd_loop(student, diffusion, teacher, t_diffusion, batch: int, opts: Options, run_dir: str):
    """KDTrainLoop over a randomly filled dynamic pool (rho 0.4, as CIFAR10-*-Dynamic-0.4); the loop
    puts student and teacher on the fast path itself (as image_kd.py does)."""
    teacher.eval().requires_grad_(False)
    pool = DynamicBatch(
        teacher, t_diffusion, batch_size=batch,
        image_shape=(3, teacher.image_size, teacher.image_size),
        rho=0.4, student_timesteps=diffusion.num_timesteps, teacher_batch_size=batch,
        precision=opts.precision, device=next(student.parameters()).device, seed=0,
    )
    _random_pool(pool, 0)
    return _train_loop(student, diffusion, batch, opts, run_dir, loop_cls=KDTrainLoop, teacher=teacher,
                       teacher_diffusion=t_diffusion, dynamic_batch=pool)


def make_step(case: Case, opts: Options, tiny: bool, device: torch.device, run_dir: str
              ) -> tuple[Callable[[], None], float]:
    """(one iteration of the case as a closure, its FLOPs)."""
    batch = case.tiny_batch if tiny else case.batch
    torch.manual_seed(0)
    model, diffusion = build(case.model, tiny, device)
    fwd = forward_cost(model)["flops"] * batch
    if case.kind == "train":
        loop = _train_loop(model, diffusion, batch, opts, run_dir)
        x = torch.randn(batch, 3, model.image_size, model.image_size, device=device).clamp(-1, 1)
        return (lambda: loop.run_step(x, {})), 3 * fwd
    if case.kind == "kd":
        teacher, t_diffusion = build(case.teacher, tiny, device)
        t_fwd = forward_cost(teacher)["flops"] * batch
        loop = _kd_loop(model, diffusion, teacher, t_diffusion, batch, opts, run_dir)
        return (lambda: loop.run_step(*loop.next_batch())), 3 * fwd + t_fwd
    model = model.eval().requires_grad_(False)
    if case.kind == "sample":  # as sampling.sample_images: one batch size per call site
        net = fast_frozen(model, opts.fast, name="sampling UNet")
        x = torch.randn(batch, 3, model.image_size, model.image_size, device=device)
        t = torch.full((batch,), diffusion.num_timesteps // 2, dtype=torch.long, device=device)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[opts.precision]
        autocast = (torch.autocast("cuda", dtype=dtype) if device.type == "cuda"
                    else contextlib.nullcontext())

        def sample_step() -> None:
            with torch.no_grad(), autocast:
                diffusion.p_sample(net, x, t, clip_denoised=True)

        return sample_step, fwd
    pool = DynamicBatch(  # as dynamic_prepare.py: full-size calls of mixed timesteps
        fast_frozen(model, opts.fast, name="teacher UNet"),
        diffusion, batch_size=batch, image_shape=(3, model.image_size, model.image_size),
        iter_choice="shuffled_iterative_distillation", teacher_batch_size=batch,
        precision=opts.precision, device=device, seed=0,
    )
    x = torch.randn(batch, 3, model.image_size, model.image_size, device=device)
    t = torch.full((batch,), diffusion.num_timesteps // 2, dtype=torch.long, device=device)
    return (lambda: pool.teacher_step(x, t)), fwd


# ----------------------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    """The GPU's bf16 dense peak (TFLOP/s) for MFU; None on CPU or an unknown GPU."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def run_case(case: Case, mode: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Build, warm up, time the iterations (`--iters`/`--warmup`; `--infer-iters`/`--infer-warmup` for the
    sample and prepare cases, whose iterations are large batches); return the result row."""
    opts = mode_options(mode, args.compile)
    inference = case.kind in ("sample", "prepare")
    iters = args.infer_iters if inference and args.infer_iters else args.iters
    warmup = args.infer_warmup if inference and args.infer_warmup is not None else args.warmup
    with tempfile.TemporaryDirectory() as run_dir:
        step, flops = make_step(case, opts, args.tiny, device, run_dir)
        t0 = time.perf_counter()
        for _ in range(warmup):
            step()
        _sync(device)
        warm_s = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        _sync(device)
        elapsed = time.perf_counter() - t0
    batch = case.tiny_batch if args.tiny else case.batch
    per_iter = elapsed / iters
    tflops = flops / per_iter / 1e12
    peak = peak_tflops(device, args.peak_tflops)
    row = {
        "case": case.name, "mode": mode, "kind": case.kind, "batch": batch, "tiny": args.tiny,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "unit": "img/s" if case.kind in ("kd", "train") else "img-steps/s",
        "throughput": batch / per_iter, "ms_per_iter": per_iter * 1e3, "warmup_s": warm_s,
        "iters": iters, "warmup": warmup,
        "peak_mem_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "flops_per_iter": flops, "tflops": tflops, "mfu": tflops / peak if peak else None,
        "public": None if args.tiny else PUBLIC.get(case.name),  # the authors' scripts train no DiT
        "options": {"precision": opts.precision, **opts.fast.__dict__},
    }
    row["vs_public"] = row["throughput"] / row["public"] if row["public"] else None
    return row


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


HEADER = ("| case | mode | throughput | unit | ms/iter | peak GPU MiB | TFLOP/s | MFU | x public |\n"
          "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")


def format_row(r: dict[str, Any]) -> str:
    """One Markdown table row for a result (or an error) row."""
    if "error" in r:
        return f"| {r['case']} | {r['mode']} | error: {r['error']} | | | | | | |"
    return (f"| {r['case']} | {r['mode']} | {r['throughput']:,.1f} | {r['unit']} | {r['ms_per_iter']:.2f} | "
            f"{_fmt(r['peak_mem_mib'], ',.0f')} | {r['tflops']:.3f} | {_fmt(r['mfu'], '.1%')} | "
            f"{_fmt(r['vs_public'], '.2f')} |")


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Write the results atomically (temp file in the same dir, fsync, rename)."""
    atomic_write_text(path, json.dumps(payload, indent=2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="all", help=f"all or a comma list of {','.join(CASES)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="tiny archs and batches (CPU smoke run, CI)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--infer-iters", type=int, default=0, help="timed sample/prepare iterations (0: --iters)")
    p.add_argument("--infer-warmup", type=int, default=None, help="sample/prepare warm-up (default --warmup)")
    p.add_argument("--mode", default="both", choices=("baseline", "optimized", "both"))
    p.add_argument("--compile", default="on", choices=("on", "off"),
                   help="optimized mode with the scripts' default `compile: true`, or with `compile: false`")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak for MFU (default by GPU)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--json", default=None, help="write the results here (rewritten after every case)")
    args = p.parse_args(argv)
    names = list(CASES) if args.cases == "all" else [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        p.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    if args.iters < 1 or args.warmup < 0 or args.infer_iters < 0 or (args.infer_warmup or 0) < 0:
        p.error(f"--iters must be >= 1 and warm-ups/--infer-iters >= 0; got {args.iters}, {args.warmup}, "
                f"{args.infer_iters}, {args.infer_warmup}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    args.case_names = names
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the selected cases in the selected modes; print the table and return (and write) the rows."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" \
        else torch.device("cpu")
    modes = ["baseline", "optimized"] if args.mode == "both" else [args.mode]
    logger.configure(tempfile.mkdtemp(prefix="bench-log-"), format_strs=[])
    rows: list[dict[str, Any]] = []
    meta = {"torch": torch.__version__, "argv": sys.argv[1:] if argv is None else argv,
            "device": args.device, "tiny": args.tiny, "iters": args.iters, "warmup": args.warmup}
    print(HEADER, flush=True)
    for name in args.case_names:
        for mode in modes:
            try:
                row = run_case(CASES[name], mode, args, device)
            except Exception as exc:  # a failing case (OOM, compile bug) must not cost the others' numbers
                traceback.print_exc()
                row = {"case": name, "mode": mode, "error": f"{type(exc).__name__}: {str(exc)[:120]}"}
            rows.append(row)
            print(format_row(row), flush=True)
            if args.json:
                write_json(args.json, {"meta": meta, "results": rows})
            _release(device)
    return rows


def _release(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
