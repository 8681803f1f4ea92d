"""torch.profiler capture of benchmark iterations: the top kernels by device time, per mode, in one text file.

Builds a case as bench_throughput.py does (so "optimized" is the scripts' `compile: true` + bf16 path),
warms it up (compile, CUDA-graph recording, cuDNN autotuning happen there), then profiles `--iters` iterations
and appends, per mode, the wall time per iteration, the summed kernel time (how busy the GPU was) and the
`--top` ops by self device time (self CPU time on CPU) to `--out`.

    python benchmarks/profile_step.py --case kd14 --device cuda --out profile_kd14.txt
    python benchmarks/profile_step.py --case kd14 --tiny --device cpu --out profile.txt   # smoke
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_throughput import CASES, _release, _sync, make_step, mode_options  # noqa: E402

from guided_diffusion import logger  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", default="kd14", choices=sorted(CASES))
    p.add_argument("--modes", default="optimized,baseline", help="comma list of optimized, baseline")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="tiny archs and batches (CPU smoke run)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--compile", default="on", choices=("on", "off"))
    p.add_argument("--out", required=True, help="text file the tables are appended to")
    args = p.parse_args(argv)
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.mode_list if m not in ("optimized", "baseline")]
    if bad or not args.mode_list:
        p.error(f"--modes: unknown {bad or args.modes!r}; choose from optimized, baseline")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


def profile_mode(case_name: str, mode: str, args: argparse.Namespace, device: torch.device) -> str:
    """Warm up, profile `args.iters` iterations; return the report block for this mode."""
    opts = mode_options(mode, args.compile)
    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory() as run_dir:
        step, _ = make_step(CASES[case_name], opts, args.tiny, device, run_dir)
        for _ in range(args.warmup):
            step()
        _sync(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            begin = time.perf_counter()
            for _ in range(args.iters):
                step()
            _sync(device)
            wall = (time.perf_counter() - begin) / args.iters
    events = prof.key_averages()
    sort_key = "self_device_time_total" if cuda else "self_cpu_time_total"
    lines = [f"## {case_name} {mode} ({opts}), {args.iters} iterations after {args.warmup} warm-up",
             f"wall per iteration: {wall * 1e3:.2f} ms"]
    if cuda:
        # Kernel rows only: an aten op's row repeats the device time of the kernels it launched.
        kernels = (e for e in events if e.device_type == DeviceType.CUDA)
        busy = sum(e.self_device_time_total for e in kernels) / 1e3 / args.iters  # us -> ms
        lines.append(f"summed kernel time per iteration: {busy:.2f} ms "
                     f"(GPU busy ~{min(busy / (wall * 1e3), 1.0):.0%} of the wall time)")
    lines.append(events.table(sort_by=sort_key, row_limit=args.top, max_name_column_width=70))
    return "\n".join(lines) + "\n\n"


def main(argv: list[str] | None = None) -> None:
    """Profile each mode and append its block to `--out` as soon as it is done."""
    args = parse_args(argv)
    cuda = args.device == "cuda"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    logger.configure(tempfile.mkdtemp(prefix="profile-log-"), format_strs=[])
    for mode in args.mode_list:
        try:
            block = profile_mode(args.case, mode, args, device)
        except Exception as exc:  # one failing mode (compile bug, OOM) must not cost the other's table
            block = f"## {args.case} {mode}: failed: {type(exc).__name__}: {str(exc)[:300]}\n\n"
        with open(args.out, "a") as handle:
            handle.write(block)
        print(block.splitlines()[0] + f" -> {args.out}", flush=True)
        _release(device)


if __name__ == "__main__":
    main()
