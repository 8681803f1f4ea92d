"""Ablations behind the fast path's choices, eager bf16 on one GPU: GroupNorm input dtype, memory layout,
cuDNN autotuning and CUDA graphs, for a GroupNorm alone, the 57M teacher forward and a training step.

Each row is the median of `--iters` CUDA-event timings after warm-up. It answers why `half_norm` and
`cuda_graphs` are on by default and why channels_last is not used (docs/PERFORMANCE.md).

    python benchmarks/ablate_layers.py --json ablate.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_throughput import build  # noqa: E402

from guided_diffusion.nn import GroupNorm32, use_half_norm  # noqa: E402

BF16 = torch.bfloat16


def median_ms(fn: Callable[[], object], iters: int, warmup: int = 3) -> float:
    """Median of `iters` event-timed calls of `fn` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return statistics.median(times)


def graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """`fn` recorded as a CUDA graph (after a side-stream warm-up); returns the replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _layout(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def groupnorm_rows(iters: int) -> dict[str, float]:
    """One GroupNorm32 on a [2500, 128, 32, 32] bf16 activation: upcast vs half input, NCHW vs NHWC."""
    rows = {}
    x = torch.randn(2500, 128, 32, 32, device="cuda", dtype=BF16)
    norm = GroupNorm32(32, 128).cuda()
    for half in (False, True):
        use_half_norm(norm, half)
        for nhwc in (False, True):
            xx = x.contiguous(memory_format=_layout(nhwc))
            with torch.autocast("cuda", dtype=BF16):
                rows[f"groupnorm {'half' if half else 'upcast'} {'NHWC' if nhwc else 'NCHW'}"] = \
                    median_ms(lambda xx=xx: norm(xx), iters)
    return rows


def teacher_rows(batch: int, iters: int, variants: list[tuple[bool, bool, bool, bool]]) -> dict[str, float]:
    """57M forward under inference_mode + bf16 autocast for (half_norm, nhwc, cudnn.benchmark, graphs)."""
    rows = {}
    for half, nhwc, bench, graphs in variants:
        torch.backends.cudnn.benchmark = bench
        torch.manual_seed(0)
        model, _ = build("57M", False, torch.device("cuda"))
        model = use_half_norm(model.eval().requires_grad_(False), half).to(memory_format=_layout(nhwc))
        x = torch.randn(batch, 3, 32, 32, device="cuda").contiguous(memory_format=_layout(nhwc))
        t = torch.randint(0, 1000, (batch,), device="cuda")

        def forward(model=model, x=x, t=t):
            with torch.inference_mode(), torch.autocast("cuda", dtype=BF16):
                return model(x, t)

        name = (f"teacher57 fwd B{batch} {'half' if half else 'upcast'} {'NHWC' if nhwc else 'NCHW'} "
                f"benchmark={int(bench)} graphs={int(graphs)}")
        rows[name] = median_ms(graphed(forward) if graphs else forward, iters)
        del model
        torch.cuda.empty_cache()
    torch.backends.cudnn.benchmark = False
    return rows


def train_rows(arch: str, iters: int) -> dict[str, float]:
    """Student forward + backward + fused AdamW at batch 128, eager vs make_graphed_callables."""
    rows = {}
    for half, graphs in ((False, False), (True, False), (True, True)):
        torch.manual_seed(0)
        model, _ = build(arch, False, torch.device("cuda"))
        model = use_half_norm(model.train(), half)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        x = torch.randn(128, 3, 32, 32, device="cuda")
        t = torch.randint(0, 1000, (128,), device="cuda")
        net = model
        if graphs:
            with torch.autocast("cuda", dtype=BF16, cache_enabled=False):
                net = torch.cuda.make_graphed_callables(model, (x, t), allow_unused_input=True)

        def step(net=net, model=model, opt=opt, x=x, t=t):
            for p in model.parameters():
                p.grad = None
            with torch.autocast("cuda", dtype=BF16, cache_enabled=False):
                loss = net(x, t).float().square().mean()
            loss.backward()
            opt.step()

        name = f"train{arch} step B128 {'half' if half else 'upcast'} graphs={int(graphs)}"
        rows[name] = median_ms(step, iters)
        del model, opt, net
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the ablations, print one line per row and write them to `--json`."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    rows: dict[str, float] = {}
    sections = [
        lambda: groupnorm_rows(args.iters),
        lambda: teacher_rows(2500, args.iters, [(False, False, False, False), (True, False, False, False),
                                                (True, True, False, False), (True, False, True, False)]),
        lambda: teacher_rows(128, args.iters, [(False, False, False, False), (True, False, False, False),
                                               (True, False, True, False), (True, True, True, False),
                                               (True, False, False, True)]),
        lambda: train_rows("14M", args.iters),
        lambda: train_rows("57M", args.iters),
    ]
    for section in sections:
        for name, ms in section().items():
            rows[name] = ms
            print(f"{name}: {ms:.2f} ms", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"torch": torch.__version__,
                                                   "device": torch.cuda.get_device_name(), "ms": rows},
                                                  indent=1))
    return rows


if __name__ == "__main__":
    main()
