"""benchmarks/bench_throughput.py stays runnable: every case in both modes on CPU (tiny), with its JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_tiny_benchmark_runs_all_cases_in_both_modes(repo_root, tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(repo_root / "benchmarks" / "bench_throughput.py"), "--tiny", "--device", "cpu",
           "--mode", "both", "--iters", "1", "--warmup", "1", "--threads", "1", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    names = ["kd14", "kd57", "train14", "train57", "sample14", "sample57", "prepare57"]
    expected = [(n, m) for n in names for m in ("baseline", "optimized")]
    assert [(r["case"], r["mode"]) for r in rows] == expected
    for r in rows:
        assert r["throughput"] > 0 and r["ms_per_iter"] > 0 and r["tflops"] > 0
        assert r["mfu"] is None and r["peak_mem_mib"] is None  # CPU: no GPU peak to compare against
        assert r["unit"] == ("img/s" if r["kind"] in ("kd", "train") else "img-steps/s")
    flops = {(r["case"], r["mode"]): r["flops_per_iter"] for r in rows}
    # kd = student fwd/bwd (3 forwards) + one teacher forward; the tiny "57M" is the larger arch
    assert flops["kd57", "baseline"] > flops["train57", "baseline"] > flops["train14", "baseline"]
    assert flops["kd14", "optimized"] == flops["kd14", "baseline"]
    assert proc.stdout.count("| kd14 |") == 2 and "| prepare57 | optimized |" in proc.stdout


def test_bad_case_name_is_one_line_error(repo_root):
    proc = subprocess.run([sys.executable, str(repo_root / "benchmarks" / "bench_throughput.py"), "--cases",
                           "kd99"], cwd=repo_root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown case(s) ['kd99']" in proc.stderr


@pytest.mark.parametrize("arch,low,high", [("14M", 10e6, 20e6), ("57M", 50e6, 65e6)])
def test_real_archs_build_from_their_yaml(repo_root, monkeypatch, arch, low, high):
    import torch

    monkeypatch.syspath_prepend(str(repo_root / "benchmarks"))
    from bench_throughput import build

    with torch.device("meta"):
        model, diffusion = build(arch, tiny=False, device=torch.device("meta"))
    n = sum(p.numel() for p in model.parameters())
    assert low < n < high and diffusion.num_timesteps == 1000


def test_profile_step_writes_a_table_per_mode(repo_root, tmp_path):
    out = tmp_path / "profile.txt"
    cmd = [sys.executable, str(repo_root / "benchmarks" / "profile_step.py"), "--case", "train14", "--tiny",
           "--device", "cpu", "--warmup", "1", "--iters", "1", "--top", "5", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    assert text.count("## train14 ") == 2 and "## train14 optimized" in text and "## train14 baseline" in text
    assert text.count("Self CPU time total") == 2 and "wall per iteration" in text
