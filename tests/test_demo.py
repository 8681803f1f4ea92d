"""The digits demo: schedules and config, the shipped teacher, and the `--smoke` run end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from guided_diffusion.config import ConfigError, load_config
from guided_diffusion.digits_demo import (
    DEFAULT_TEACHER,
    MODES,
    build_demo_config,
    format_table,
    load_schedule,
    read_loss_curve,
)
from guided_diffusion.run_setup import build_model_and_diffusion, load_model_weights

ROOT = Path(__file__).resolve().parents[1]


def test_every_mode_has_a_complete_schedule():
    for mode in MODES:
        schedule = load_schedule(mode)
        assert schedule["max_steps"] > 0 and schedule["num_samples"] >= 16
    assert load_schedule("smoke")["max_steps"] < load_schedule("short")["max_steps"]
    assert load_schedule("short")["max_steps"] < load_schedule("long")["max_steps"]
    with pytest.raises(ValueError, match="unknown demo mode 'fast'"):
        load_schedule("fast")


def test_schedule_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "demo.yaml"
    bad.write_text("short:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=f"{bad}: schedule 'short' has missing keys"):
        load_schedule("short", bad)


def test_demo_config_applies_the_schedule_to_both_sections(tmp_path):
    schedule = load_schedule("short")
    cfg = build_demo_config(schedule, "teacher.pt", str(tmp_path / "pool.cache"))
    assert cfg.teacher.timestep_respacing == cfg.student.timestep_respacing == schedule["timestep_respacing"]
    assert cfg.teacher.BATCH == schedule["rho"] and cfg.student.batch_size == schedule["batch_size"]
    assert cfg.student.max_steps == cfg.student.save_interval == schedule["max_steps"]
    assert cfg.teacher.model_path == "teacher.pt" and cfg.teacher.tempfile.endswith("pool.cache")
    assert cfg.teacher.student_clip_denoised is True
    # the student is the smaller network: about a quarter of the teacher's parameters
    teacher, _ = build_model_and_diffusion(cfg.teacher, "cpu")
    student, _ = build_model_and_diffusion(cfg.student, "cpu")
    ratio = sum(p.numel() for p in student.parameters()) / sum(p.numel() for p in teacher.parameters())
    assert 0.2 < ratio < 0.35
    assert sum(p.numel() for p in teacher.parameters()) * 4 < 16 * 2**20


def test_table_lists_models_and_stages():
    row = {"fid": 12.5, "precision": 0.5, "recall": None}
    results = {
        "teacher": {**row, "params": 1_923_622, "gmacs": 0.41},
        "student": {**row, "params": 512_000, "gmacs": 0.14},
        "real_train": row,
        "stages_s": {"prepare": 1.0, "distill": 2.0},
        "total_s": 3.0,
        "device": "cpu",
    }
    table = format_table(results)
    assert "1.92M" in table and "0.51M" in table and "n/a" in table
    assert "prepare 1.0s, distill 2.0s" in table


def test_missing_teacher_is_a_one_line_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "scripts/digits_demo.py", "--smoke", "--teacher_path", str(tmp_path / "none.pt"),
         "--output_root", str(tmp_path / "out"), "--data_dir", str(tmp_path / "data")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert f"teacher checkpoint not found: {tmp_path / 'none.pt'}" in proc.stderr


def test_shipped_teacher_fits_the_teacher_arch():
    assert DEFAULT_TEACHER.stat().st_size < 16 * 2**20
    teacher, _ = build_model_and_diffusion(load_config(ROOT / "yaml/digits_16/teacher.yaml"), "cpu")
    load_model_weights(teacher, str(DEFAULT_TEACHER))
    assert any(p.abs().sum() > 0 for p in teacher.out.parameters()), "output layer still zero: untrained?"


@pytest.mark.slow
def test_smoke_demo_end_to_end(tmp_path):
    """`--smoke` with the shipped teacher: every stage (one script each) runs and writes its outputs."""
    teacher, _ = build_model_and_diffusion(load_config(ROOT / "yaml/digits_16/teacher.yaml"), "cpu")
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, "scripts/digits_demo.py", "--smoke", "--device", "cpu",
         "--output_root", str(tmp_path / "out"), "--data_dir", str(tmp_path / "data")],
        cwd=ROOT, capture_output=True, text=True, timeout=480, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (out_dir,) = (tmp_path / "out").iterdir()
    for name in ("samples_grid_teacher.png", "samples_grid_student.png", "loss_curve.png"):
        with Image.open(out_dir / name) as img:
            assert img.size[0] > 64 and img.size[1] > 64
    results = json.loads((out_dir / "results.json").read_text())
    assert results["mode"] == "smoke" and results["device"] == "cpu"
    assert results["files"]["teacher"] == str(DEFAULT_TEACHER)
    assert results["teacher"]["params"] == sum(p.numel() for p in teacher.parameters())
    assert 0.2 < results["student"]["params"] / results["teacher"]["params"] < 0.35
    assert results["student"]["gmacs"] < results["teacher"]["gmacs"]
    for name in ("teacher", "student"):
        assert 0.0 <= results[name]["precision"] <= 1.0 and 0.0 <= results[name]["recall"] <= 1.0
    # real held-out digits are close to the reference split in the classifier's feature space
    assert results["real_train"]["precision"] > 0.5 and results["real_train"]["recall"] > 0.5
    assert set(results["stages_s"]) == {
        "data", "prepare", "distill", "sample_teacher", "sample_student", "evaluate"
    }
    curve = read_loss_curve(out_dir / "kd" / "progress.csv")
    assert curve["step"][-1] == load_schedule("smoke")["max_steps"]
    assert np.isfinite(curve["loss"]).all()
    assert (out_dir / "Digits-Dynamic.cache").is_file()
    assert "student" in proc.stdout and "stage wall time" in proc.stdout
    with np.load(tmp_path / "data" / "digits16_ref.npz") as ref:
        assert ref["arr_0"].shape == (360, 16, 16, 3)
    for name in ("teacher", "student"):  # the arrays that were scored, in the ADM evaluator's layout
        with np.load(out_dir / f"samples_{name}.npz") as arr:
            assert arr["arr_0"].shape == (16, 16, 16, 3) and arr["arr_0"].dtype == np.uint8
        assert json.loads((out_dir / f"eval_{name}.json").read_text())["fid"] == results[name]["fid"]
    # the papers' scripts ran, each with its own log
    for stage in ("prepare", "distill", "sample_teacher", "sample_student"):
        assert (out_dir / "logs" / f"{stage}.log").stat().st_size > 0
    assert (out_dir / "prepare" / "config.yaml").is_file() and (out_dir / "kd" / "config.yaml").is_file()
