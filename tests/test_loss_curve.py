"""loss_curve_check.py on CPU: two precisions through the real KDTrainLoop, curves, plot, summary."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest


def test_loss_curve_check_runs_on_cpu(repo_root, tmp_path):
    out = tmp_path / "curves"
    cmd = [sys.executable, str(repo_root / "benchmarks" / "loss_curve_check.py"), "--steps", "20", "--device",
           "cpu", "--precision", "fp32,bf16", "--batch-size", "4", "--timestep-respacing", "10",
           "--log-interval", "5", "--threads", "1", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(out / "curves.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [5, 10, 15, 20]
    fp32 = [float(r["loss_fp32"]) for r in rows]
    bf16 = [float(r["loss_bf16"]) for r in rows]
    assert all(v > 0 for v in fp32) and len(set(fp32)) > 1  # the student trains: the loss moves
    # On CPU bf16 autocast falls back to fp32, so the same seed and pool must give the very same curve.
    assert bf16 == fp32
    summary = json.loads((out / "summary.json").read_text())
    runs = summary["runs"]
    assert set(runs) == {"fp32", "bf16"} and runs["bf16"]["rel_diff_vs_fp32"] == 0.0
    assert runs["fp32"]["final_loss"] == pytest.approx(fp32[-1])  # the last 10% of 4 logged points: 1
    assert (out / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "relative difference of the final smoothed loss 0.000%" in proc.stdout


def test_bad_precision_is_one_line_error(repo_root):
    cmd = [sys.executable, str(repo_root / "benchmarks" / "loss_curve_check.py"), "--precision", "fp8",
           "--out", "unused"]
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--precision: unknown ['fp8']" in proc.stderr
