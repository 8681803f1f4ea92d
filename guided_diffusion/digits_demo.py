"""The digits demo: a whole data-free distillation (DKDM) on scikit-learn's digits, scored and tabulated.

The demo runs the papers' commands, one process each, on a config it writes into its run dir:
`datasets/digits.py` -> `scripts/dynamic_prepare.py` -> `scripts/image_kd.py` -> `scripts/image_sample.py`
(teacher and student) -> `evaluations/evaluator.py --features digits` (FID, precision, recall in the digits
classifier's feature space against the reference split). Schedules (short / long / smoke) live in
yaml/digits_16/demo.yaml.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from . import distill  # noqa: F401 (registers the methods' YAML sections)
from .config import REPO_ROOT, ConfigError, load_config, save_config
from .infra.checkpoint import atomic_write_bytes
from .model_cost import forward_cost
from .run_setup import build_model_and_diffusion
from .sampling import save_grid

MODES = ("short", "long", "smoke")
SCHEDULE_KEYS = (
    "timestep_respacing", "rho", "teacher_batch_size", "batch_size", "lr", "ema_rate", "lr_schedule",
    "max_steps", "log_interval", "num_samples", "sample_batch_size", "student_clip_denoised",
)
DEMO_YAML = REPO_ROOT / "yaml" / "digits_16" / "demo.yaml"
KD_YAML = REPO_ROOT / "yaml" / "digits_16" / "exp" / "Digits-DKDM.yaml"
TEACHER_YAML = REPO_ROOT / "yaml" / "digits_16" / "teacher.yaml"
DEFAULT_TEACHER = REPO_ROOT / "model" / "digits16_teacher.pt"
IMAGE_SIZE = 16


def load_schedule(mode: str, path: str | os.PathLike = DEMO_YAML) -> dict[str, Any]:
    """The `mode` section of the demo schedules file, checked to hold exactly SCHEDULE_KEYS."""
    if mode not in MODES:
        raise ValueError(f"unknown demo mode {mode!r}; expected one of {MODES}")
    schedules = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(schedules, dict) or not isinstance(schedules.get(mode), dict):
        raise ConfigError(f"{path}: no '{mode}:' schedule")
    section = schedules[mode]
    missing = sorted(set(SCHEDULE_KEYS) - set(section))
    unknown = sorted(set(section) - set(SCHEDULE_KEYS))
    if missing or unknown:
        raise ConfigError(f"{path}: schedule '{mode}' has missing keys {missing} / unknown keys {unknown}")
    section["timestep_respacing"] = str(section["timestep_respacing"])
    section["ema_rate"] = str(section["ema_rate"])
    return section


def build_demo_config(schedule: Mapping[str, Any], teacher_path: str, cache_path: str) -> DictConfig:
    """Digits-DKDM.yaml with the schedule applied to both sections and the given teacher and pool cache."""
    student_overrides = {
        key: schedule[key]
        for key in ("timestep_respacing", "batch_size", "lr", "ema_rate", "lr_schedule", "max_steps",
                    "log_interval")
    }
    student_overrides["save_interval"] = schedule["max_steps"]
    cfg = load_config(KD_YAML, student_overrides)
    cfg.teacher.timestep_respacing = schedule["timestep_respacing"]
    cfg.teacher.BATCH = float(schedule["rho"])
    cfg.teacher.batch_size = int(schedule["teacher_batch_size"])
    cfg.teacher.model_path = str(teacher_path)
    cfg.teacher.tempfile = str(cache_path)
    cfg.teacher.student_clip_denoised = bool(schedule["student_clip_denoised"])
    return cfg


def model_cost(model: torch.nn.Module, image_size: int) -> dict[str, float]:
    """Parameter count and thop multiply-accumulates (GMACs) of one forward pass on a single image."""
    cost = forward_cost(model, image_size)
    return {"params": int(cost["params"]), "gmacs": cost["macs"] / 1e9}


def read_loss_curve(progress_csv: str | os.PathLike) -> dict[str, list[float]]:
    """Columns `step`, `loss`, `mse`, `vb` (those present) of a run's progress.csv, as float lists."""
    with open(progress_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    curve: dict[str, list[float]] = {}
    for key in ("step", "loss", "mse", "vb"):
        values = [row.get(key, "") for row in rows]
        if values and all(v not in ("", None) for v in values):
            curve[key] = [float(v) for v in values]
    if "step" not in curve or "loss" not in curve:
        raise ValueError(f"{progress_csv}: no step/loss columns to plot")
    return curve


def plot_loss_curve(curve: Mapping[str, list[float]], path: str | os.PathLike) -> None:
    """Write the distillation loss terms against the step as a PNG, atomically: `mse` and `vb` on separate
    log axes (their scales differ by orders of magnitude at the noisiest steps; docs/DKDM.md says why)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = [key for key in ("mse", "vb") if key in curve] or ["loss"]
    fig, axes = plt.subplots(1, len(terms), figsize=(5 * len(terms), 3.5), squeeze=False)
    for ax, key in zip(axes[0], terms, strict=True):
        ax.plot(curve["step"], curve[key])
        ax.set_xlabel("student step")
        ax.set_ylabel(key)
        if min(curve[key]) > 0:
            ax.set_yscale("log")
        ax.set_title(f"DKDM {key}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(buffer.getvalue(), str(path))


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def format_table(results: Mapping[str, Any]) -> str:
    """The demo's summary: quality and cost per model, then the wall time of each stage."""
    lines = [
        f"{'model':<16}{'FID':>9}{'precision':>11}{'recall':>8}{'params':>11}{'GMACs':>8}",
        "-" * 63,
    ]
    for name in ("teacher", "student", "real_train"):
        row = results[name]
        params = f"{row['params'] / 1e6:.2f}M" if "params" in row else ""
        gmacs = _fmt(row.get("gmacs"), ".3f") if "gmacs" in row else ""
        lines.append(
            f"{name:<16}{_fmt(row['fid'], '.2f'):>9}{_fmt(row['precision'], '.3f'):>11}"
            f"{_fmt(row['recall'], '.3f'):>8}{params:>11}{gmacs:>8}"
        )
    lines.append("")
    lines.append("stage wall time: " + ", ".join(f"{k} {v:.1f}s" for k, v in results["stages_s"].items()))
    lines.append(f"total {results['total_s']:.1f}s on {results['device']}")
    return "\n".join(lines)


@contextlib.contextmanager
def _timed(stages: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    stages[name] = time.perf_counter() - start
    print(f"[digits demo] {name}: {stages[name]:.1f}s", flush=True)


def _json_ready(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


class StageError(RuntimeError):
    """A demo stage (one of the scripts) failed; the message names the command and its log file."""


def run_stage(args: list[str], log_path: Path, env: Mapping[str, str]) -> str:
    """Run one script of the pipeline with the demo's Python, output kept in `log_path`; returns stdout."""
    cmd = [sys.executable, *args]
    print("[digits demo] $ " + " ".join(args), flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.run(
            cmd, cwd=REPO_ROOT, env=dict(env), stdout=subprocess.PIPE, stderr=log, text=True
        )
        log.write(proc.stdout)
    if proc.returncode != 0:
        raise StageError(f"{args[0]} exited with {proc.returncode}; see {log_path}")
    return proc.stdout


def write_demo_config(schedule: Mapping[str, Any], teacher_path: str, out_dir: Path) -> Path:
    """The KD config of this run (Digits-DKDM.yaml with the schedule), saved as `out_dir/kd.yaml`."""
    cfg = build_demo_config(schedule, teacher_path, str(out_dir / "Digits-Dynamic.cache"))
    path = out_dir / "kd.yaml"
    save_config(cfg, path)
    return path


def evaluate_npz(ref: str, sample: str, out_json: Path, log_dir: Path, env: Mapping[str, str]) -> dict:
    """`evaluations/evaluator.py REF SAMPLE --features digits --json OUT`; returns FID/precision/recall."""
    run_stage(
        ["evaluations/evaluator.py", ref, sample, "--features", "digits", "--json", str(out_json)],
        log_dir / f"evaluate_{out_json.stem}.log", env,
    )
    result = json.loads(out_json.read_text())
    return {key: result[key] for key in ("fid", "precision", "recall")}


def run_demo(
    mode: str = "short",
    teacher_path: str | os.PathLike | None = None,
    output_root: str | os.PathLike = "experiments/digits_demo",
    data_dir: str | os.PathLike = "experiments/data/digits",
    env: Mapping[str, str] | None = None,
    schedules: str | os.PathLike = DEMO_YAML,
) -> dict[str, Any]:
    """Run every stage; write grids, sample arrays, loss curve and results.json in `output_root/<time>/`."""
    teacher_file = Path(teacher_path) if teacher_path else DEFAULT_TEACHER
    if not teacher_file.is_file():
        raise FileNotFoundError(f"teacher checkpoint not found: {teacher_file} (pass --teacher_path)")
    env = dict(os.environ if env is None else env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    schedule = load_schedule(mode, schedules)
    out_dir = Path(output_root).resolve() / datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    logs = out_dir / "logs"
    logs.mkdir(parents=True)
    config = write_demo_config(schedule, str(teacher_file.resolve()), out_dir)
    cfg = load_config(config)
    data = Path(data_dir).resolve()
    ref_npz = str(data / f"digits{IMAGE_SIZE}_ref.npz")
    steps, n = str(schedule["max_steps"]), str(schedule["num_samples"])
    sampling = ["--num_samples", n, "--batch_size", str(schedule["sample_batch_size"]),
                "--timestep_respacing", schedule["timestep_respacing"]]
    stages: dict[str, float] = {}
    begin = time.perf_counter()

    with _timed(stages, "data"):
        run_stage(["datasets/digits.py", "--image_size", str(IMAGE_SIZE), "--output_dir", str(data)],
                  logs / "data.log", env)
    with _timed(stages, "prepare"):
        prepare_dir = str(out_dir / "prepare")
        run_stage(["scripts/dynamic_prepare.py", "--config", str(config), "--exp_dir", prepare_dir],
                  logs / "prepare.log", env)
    with _timed(stages, "distill"):
        run_stage(["scripts/image_kd.py", "--config", str(config), "--exp_dir", str(out_dir / "kd")],
                  logs / "distill.log", env)
    student_file = out_dir / "kd" / f"ema_{schedule['ema_rate']}_{int(steps):06d}.pt"
    runs = {
        "teacher": ["--config", str(TEACHER_YAML), "--model_path", str(teacher_file.resolve())],
        "student": ["--config", str(config), "--model_path", str(student_file)],
    }
    samples: dict[str, str] = {}
    for name, args in runs.items():
        with _timed(stages, f"sample_{name}"):
            folder = out_dir / f"sample_{name}"
            path = run_stage(["scripts/image_sample.py", *args, *sampling, "--output_dir", str(folder)],
                             logs / f"sample_{name}.log", env).strip().splitlines()[-1]
        samples[name] = str(out_dir / f"samples_{name}.npz")
        shutil.copyfile(path, samples[name])
        with np.load(samples[name]) as arr:
            save_grid(arr["arr_0"], str(out_dir / f"samples_grid_{name}.png"))

    results: dict[str, Any] = {"mode": mode, "device": _device_name(env), "schedule": schedule}
    with _timed(stages, "evaluate"):
        from datasets.digits import load_digits

        real = out_dir / "real_train.npz"
        np.savez(real, load_digits("train", IMAGE_SIZE)[0][: int(n)])
        results["real_train"] = evaluate_npz(ref_npz, str(real), out_dir / "eval_real_train.json", logs, env)
        for name, section in (("teacher", cfg.teacher), ("student", cfg.student)):
            results[name] = {
                **evaluate_npz(ref_npz, samples[name], out_dir / f"eval_{name}.json", logs, env),
                **model_cost(build_model_and_diffusion(section, "cpu")[0], IMAGE_SIZE),
            }
    plot_loss_curve(read_loss_curve(out_dir / "kd" / "progress.csv"), out_dir / "loss_curve.png")
    results["stages_s"] = stages
    results["total_s"] = time.perf_counter() - begin
    results["files"] = {
        "out_dir": str(out_dir), "config": str(config), "teacher": str(teacher_file),
        "student": str(student_file), "reference": ref_npz, **{f"samples_{k}": v for k, v in samples.items()},
    }
    payload = json.dumps(_json_ready(results), indent=2).encode()
    atomic_write_bytes(payload, str(out_dir / "results.json"))
    print(format_table(results), flush=True)
    print(f"[digits demo] outputs in {out_dir}", flush=True)
    return results


def _device_name(env: Mapping[str, str]) -> str:
    """What the stages run on: the first visible GPU, else the CPU."""
    hidden = env.get("CUDA_VISIBLE_DEVICES") == ""
    return "cuda" if torch.cuda.is_available() and not hidden else "cpu"
