"""Loss-curve check: the digits DKDM student trained once per precision (same seed and pool, KDTrainLoop).

Distils the shipped digits teacher (data-free) into the digits student of yaml/digits_16/exp/Digits-DKDM.yaml
through `build_run`, once per `--precision`. The teacher pool is prepared once (fp32) and every run
loads it with fresh generators, the same seed and the same student initialization, so the curves differ only
by the precision (and, with `--optimized`, by the scripts' default fast path, `compile`, `cuda_graphs` and
`half_norm`, applied to every precision but fp32, whose run keeps all three off, so the comparison reads
"plain fp32 vs optimized bf16"). Writes `curves.csv`, `loss_curves.png`, `summary.json` and each run's
own dir under `--out`, and prints the final smoothed losses and their relative difference.

    python benchmarks/loss_curve_check.py --steps 2000 --precision fp32,bf16 --device cuda --optimized \
        --out DIR
    python benchmarks/loss_curve_check.py --steps 20 --device cpu --batch-size 4 --timestep-respacing 10 \
        --out DIR
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from guided_diffusion import dist_util, logger  # noqa: E402
from guided_diffusion.config import load_config  # noqa: E402
from guided_diffusion.distill.dkdm.setup import load_teacher, make_dynamic_batch  # noqa: E402
from guided_diffusion.distill.run import build_run  # noqa: E402
from guided_diffusion.infra.checkpoint import atomic_write_bytes  # noqa: E402
from guided_diffusion.run_setup import build_model_and_diffusion, seed_everything  # noqa: E402

CONFIG = REPO / "yaml" / "digits_16" / "exp" / "Digits-DKDM.yaml"
TEACHER = REPO / "model" / "digits16_teacher.pt"
PRECISIONS = ("fp32", "fp16", "bf16")
TERMS = ("loss", "mse", "vb")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000, help="student steps per precision")
    p.add_argument("--precision", default="fp32,bf16", help="comma list of fp32, fp16, bf16")
    p.add_argument("--out", required=True, help="output dir (curves.csv, loss_curves.png, summary.json)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=("cuda", "cpu"))
    p.add_argument("--optimized", action="store_true",
                   help="compile, cuda_graphs, half_norm for every precision but fp32 (off otherwise)")
    p.add_argument("--config", default=str(CONFIG), help="the KD config (default Digits-DKDM.yaml)")
    p.add_argument("--teacher", default=str(TEACHER), help="teacher checkpoint")
    p.add_argument("--batch-size", type=int, default=None, help="student batch (default: the config's)")
    p.add_argument("--timestep-respacing", default=None, help="steps of teacher and student (default config)")
    p.add_argument("--log-interval", type=int, default=0, help="logged means every N steps (0: steps/200)")
    p.add_argument("--smooth", type=float, default=0.1, help="final = mean of this last fraction of logs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = p.parse_args(argv)
    args.precisions = [x.strip() for x in args.precision.split(",") if x.strip()]
    bad = [x for x in args.precisions if x not in PRECISIONS]
    if bad or not args.precisions:
        p.error(f"--precision: unknown {bad or args.precision!r}; choose from {', '.join(PRECISIONS)}")
    if args.steps < 1 or not 0 < args.smooth <= 1:
        p.error(f"--steps must be >= 1 and --smooth in (0, 1]; got {args.steps}, {args.smooth}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if not Path(args.teacher).is_file():
        p.error(f"--teacher: checkpoint not found: {args.teacher}")
    args.log_interval = args.log_interval or max(1, args.steps // 200)
    return args


def build_config(args: argparse.Namespace, precision: str, pool_path: str):
    """The KD config for one run: the schedule from the flags, the precision on teacher draws and student."""
    fast = args.optimized and precision != "fp32"
    overrides = {"max_steps": args.steps, "log_interval": args.log_interval, "save_interval": 0,
                 "batch_size": args.batch_size, "timestep_respacing": args.timestep_respacing,
                 "seed": args.seed, "precision": precision, "compile": fast, "cuda_graphs": fast,
                 "half_norm": fast}
    cfg = load_config(args.config, overrides)
    if args.timestep_respacing is not None:
        cfg.teacher.timestep_respacing = str(args.timestep_respacing)
    cfg.teacher.model_path = str(args.teacher)
    cfg.teacher.tempfile = pool_path
    cfg.teacher.batch_size = min(int(cfg.teacher.batch_size), 4 * int(cfg.student.batch_size))
    cfg.teacher.precision = precision
    return cfg


def prepare_pool(args: argparse.Namespace, pool_path: str, device: torch.device) -> None:
    """Prepare the teacher pool once, in fp32, and write it where every run loads it."""
    cfg = build_config(args, "fp32", pool_path)
    seed_everything(args.seed)
    teacher, t_diffusion = load_teacher(cfg.teacher, device)
    _, s_diffusion = build_model_and_diffusion(cfg.student, torch.device("meta"))
    pool = make_dynamic_batch(cfg.teacher, cfg.student, teacher, t_diffusion, s_diffusion, device)
    pool.prepare_and_save(pool_path, progress=False)


def train_once(args: argparse.Namespace, precision: str, pool_path: str, run_dir: Path,
               device: torch.device) -> float:
    """One distillation run (the scripts' `build_run`) logging to `run_dir/progress.csv`; returns seconds."""
    cfg = build_config(args, precision, pool_path)
    cfg.student.save_interval, cfg.student.resume_checkpoint = 0, ""
    logger.configure(str(run_dir), format_strs=["log", "csv"])
    seed_everything(args.seed)
    loop = build_run(cfg, str(run_dir), device=device)
    begin = time.perf_counter()
    loop.run_loop()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - begin
    return seconds


def read_progress(path: Path) -> dict[str, list[float]]:
    """step and the loss terms of a run's progress.csv, as float columns."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "loss" not in rows[0]:
        raise ValueError(f"{path}: no logged loss rows")
    return {key: [float(r[key]) for r in rows] for key in ("step", *TERMS) if key in rows[0]}


def smoothed_final(values: list[float], fraction: float) -> float:
    """Mean of the last `fraction` of the logged values (at least one)."""
    n = max(1, round(len(values) * fraction))
    return sum(values[-n:]) / n


def write_csv(curves: dict[str, dict[str, list[float]]], path: Path) -> None:
    """One row per logged step: `step`, then `<term>_<precision>` for every run (atomically)."""
    names = list(curves)
    steps = curves[names[0]]["step"]
    columns = [f"{term}_{name}" for name in names for term in TERMS if term in curves[name]]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["step", *columns])
    for i, step in enumerate(steps):
        row = [int(step)]
        for name in names:
            row += [curves[name][term][i] for term in TERMS if term in curves[name]]
        writer.writerow(row)
    atomic_write_bytes(buffer.getvalue().encode(), str(path))


def plot(curves: dict[str, dict[str, list[float]]], path: Path, title: str) -> None:
    """Both runs' losses against the step, log scale, in one PNG (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        ax.plot(curve["step"], curve["loss"], label=name, linewidth=1)
    ax.set_xlabel("student step")
    ax.set_ylabel("DKDM loss (interval mean)")
    if min(v for c in curves.values() for v in c["loss"]) > 0:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(buffer.getvalue(), str(path))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Prepare the pool, train once per precision, write curves/plot/summary; return the summary."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dist_util._device = device  # the loops compute on dist_util.dev(); --device cpu must hold on a GPU box
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pool_path = str(out / "pool.cache")
    logger.configure(str(out / "prepare"), format_strs=["log"])
    prepare_pool(args, pool_path, device)
    curves: dict[str, dict[str, list[float]]] = {}
    runs: dict[str, Any] = {}
    for precision in args.precisions:
        optimized = args.optimized and precision != "fp32"
        name = f"{precision}-optimized" if optimized else precision
        seconds = train_once(args, precision, pool_path, out / name, device)
        curves[name] = read_progress(out / name / "progress.csv")
        runs[name] = {"precision": precision, "optimized": optimized, "train_s": seconds,
                      "steps_per_s": args.steps / seconds,
                      "final_loss": smoothed_final(curves[name]["loss"], args.smooth)}
        print(f"[loss curve] {name}: final smoothed loss {runs[name]['final_loss']:.6g} "
              f"({args.steps} steps in {seconds:.1f} s)", flush=True)
    names = list(runs)
    reference = runs[names[0]]["final_loss"]
    for name in names[1:]:
        runs[name]["rel_diff_vs_" + names[0]] = abs(runs[name]["final_loss"] - reference) / abs(reference)
        print(f"[loss curve] {name} vs {names[0]}: relative difference of the final smoothed loss "
              f"{runs[name]['rel_diff_vs_' + names[0]]:.3%}", flush=True)
    write_csv(curves, out / "curves.csv")
    plot(curves, out / "loss_curves.png", f"digits DKDM student, {args.steps} steps, seed {args.seed}")
    summary = {"torch": torch.__version__, "device": torch.cuda.get_device_name(device)
               if device.type == "cuda" else "cpu", "steps": args.steps, "log_interval": args.log_interval,
               "smooth_fraction": args.smooth, "config": args.config, "runs": runs}
    atomic_write_bytes(json.dumps(summary, indent=2).encode(), str(out / "summary.json"))
    print(f"[loss curve] wrote curves.csv, loss_curves.png and summary.json in {out}", flush=True)
    return summary


if __name__ == "__main__":
    main()
