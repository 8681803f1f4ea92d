"""The digits demo: a whole data-free distillation (DKDM) on scikit-learn's digits, scored and tabulated.

Stages: write the digits npz files; prepare the dynamic batch from the shipped teacher; distill the student
with `KDTrainLoop`; sample teacher and student; score both (FID, precision, recall in the digits classifier's
feature space) against the reference split. Schedules (short / long / smoke) live in yaml/digits_32/demo.yaml.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import datetime
import io
import json
import math
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from . import dist_util
from .checkpoint import atomic_write_bytes
from .config import REPO_ROOT, ConfigError, load_config
from .kd_util import KDTrainLoop, check_sections, load_teacher, make_dynamic_batch
from .run_setup import build_model_and_diffusion, start_run
from .sampling import sample_images, save_grid
from .train_util import loop_kwargs

MODES = ("short", "long", "smoke")
SCHEDULE_KEYS = (
    "timestep_respacing", "rho", "teacher_batch_size", "batch_size", "lr", "ema_rate", "lr_schedule",
    "max_steps", "log_interval", "num_samples", "sample_batch_size",
)
DEMO_YAML = REPO_ROOT / "yaml" / "digits_32" / "demo.yaml"
KD_YAML = REPO_ROOT / "yaml" / "digits_32" / "exp" / "Digits-DKDM.yaml"
DEFAULT_TEACHER = REPO_ROOT / "model" / "digits32_teacher.pt"


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
    return cfg


def model_cost(model: torch.nn.Module, image_size: int) -> dict[str, float]:
    """Parameter count and thop multiply-accumulates of one forward pass on a single image."""
    from thop import profile

    probe = copy.deepcopy(model).float().eval()
    device = next(probe.parameters()).device
    x = torch.zeros(1, 3, image_size, image_size, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    with torch.no_grad():
        macs, _ = profile(probe, inputs=(x, t), verbose=False)
    return {"params": int(sum(p.numel() for p in model.parameters())), "gmacs": float(macs) / 1e9}


def score(extractor: Any, ref_feats: np.ndarray, images: np.ndarray) -> dict[str, float | None]:
    """FID, precision and recall of uint8 images against reference features (FID None when undefined)."""
    from evaluations import metrics

    feats = extractor.features(images)["pool"]
    try:
        fid: float | None = metrics.frechet_distance(
            *metrics.compute_statistics(feats), *metrics.compute_statistics(ref_feats)
        )
    except metrics.InvalidFIDError:
        fid = None
    precision, recall = metrics.precision_recall(ref_feats, feats)
    return {"fid": fid, "precision": precision, "recall": recall}


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
    """Write the distillation loss terms against the step as a PNG (log scale), atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("loss", "mse", "vb"):
        if key in curve and max(curve[key]) > 0:  # a log axis cannot show an all-zero term
            ax.plot(curve["step"], curve[key], label=key)
    ax.set_xlabel("student step")
    ax.set_ylabel("DKDM loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("DKDM distillation on digits")
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


def run_demo(
    mode: str = "short",
    teacher_path: str | os.PathLike | None = None,
    output_root: str | os.PathLike = "experiments/digits_demo",
    data_dir: str | os.PathLike = "experiments/data/digits",
) -> dict[str, Any]:
    """Run every stage and write grids, loss curve and results.json under `output_root/<time>/`."""
    from datasets.digits import load_digits32, write_digits32
    from evaluations.feature_extractors import get_feature_extractor

    teacher_file = Path(teacher_path) if teacher_path else DEFAULT_TEACHER
    if not teacher_file.is_file():
        raise FileNotFoundError(f"teacher checkpoint not found: {teacher_file} (pass --teacher_path)")
    schedule = load_schedule(mode)
    out_dir = Path(output_root) / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = out_dir / "kd"
    cfg = build_demo_config(schedule, str(teacher_file), str(run_dir / "Digits-Dynamic.cache"))
    check_sections(cfg.teacher, cfg.student)
    stages: dict[str, float] = {}
    begin = time.perf_counter()

    with _timed(stages, "data"):
        data_paths = write_digits32(data_dir)
        with np.load(data_paths["ref"]) as ref:
            ref_images = ref["arr_0"]
    start_run("kd", cfg, argparse.Namespace(exp_dir=str(run_dir), wandb=None))
    device = dist_util.dev()
    teacher, teacher_diffusion = load_teacher(cfg.teacher, device)
    student, student_diffusion = build_model_and_diffusion(cfg.student, device)

    with _timed(stages, "prepare"):
        pool = make_dynamic_batch(
            cfg.teacher, cfg.student, teacher, teacher_diffusion, student_diffusion, device
        )
        pool.prepare_and_save(cfg.teacher.tempfile)
    s = cfg.student
    with _timed(stages, "distill"):
        loop = KDTrainLoop(
            teacher=teacher, teacher_diffusion=teacher_diffusion, dynamic_batch=pool,
            tempfile=cfg.teacher.tempfile, input_perturb=cfg.teacher.input_perturb,
            cache_save_interval=s.cache_save_interval, model=student, diffusion=student_diffusion,
            batch_size=s.batch_size,
            **{**loop_kwargs(s, student_diffusion, str(run_dir)), "resume_checkpoint": ""},
        )
        loop.run_loop()
        student_ema = loop.ema_model().eval()

    samples: dict[str, np.ndarray] = {}
    for name, model, diffusion in (
        ("teacher", teacher, teacher_diffusion), ("student", student_ema, student_diffusion)
    ):
        with _timed(stages, f"sample_{name}"):
            samples[name] = sample_images(
                model, diffusion, num_samples=schedule["num_samples"],
                batch_size=schedule["sample_batch_size"], image_size=s.image_size,
                clip_denoised=s.clip_denoised, seed=s.seed, progress=False,
            )
        save_grid(samples[name], str(out_dir / f"samples_grid_{name}.png"))

    results: dict[str, Any] = {"mode": mode, "device": str(device), "schedule": schedule}
    with _timed(stages, "evaluate"):
        extractor = get_feature_extractor("digits", device)
        ref_feats = extractor.features(ref_images)["pool"]
        train_images, _ = load_digits32("train")
        results["real_train"] = score(extractor, ref_feats, train_images[: schedule["num_samples"]])
        for name, model in (("teacher", teacher), ("student", student_ema)):
            results[name] = {**score(extractor, ref_feats, samples[name]), **model_cost(model, s.image_size)}
    plot_loss_curve(read_loss_curve(run_dir / "progress.csv"), out_dir / "loss_curve.png")
    results["stages_s"] = stages
    results["total_s"] = time.perf_counter() - begin
    results["files"] = {
        "out_dir": str(out_dir), "run_dir": str(run_dir), "teacher": str(teacher_file),
        "reference": data_paths["ref"],
    }
    payload = json.dumps(_json_ready(results), indent=2).encode()
    atomic_write_bytes(payload, str(out_dir / "results.json"))
    print(format_table(results), flush=True)
    print(f"[digits demo] outputs in {out_dir}", flush=True)
    dist_util.cleanup()
    return results
