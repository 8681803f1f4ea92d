"""benchmarks/bench_throughput.py stays runnable: every case in both modes on CPU (tiny), with its JSON."""

from __future__ import annotations

import json
import os
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
    names = ["kd14", "kd57", "train14", "train57", "sample14", "sample57", "prepare57",
             "kd_dit_s2", "kd_dit_b2", "train_dit_s2", "train_dit_b2"]
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
    # a DiT student under the same UNet teacher: the teacher's forward is the same share of both kd cases
    assert flops["kd_dit_s2", "baseline"] - flops["train_dit_s2", "baseline"] == pytest.approx(
        flops["kd57", "baseline"] - flops["train57", "baseline"])
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


def test_end_to_end_times_prepare_and_kd_through_the_scripts(repo_root, tmp_path):
    """benchmarks/end_to_end.py on the tiny KD config: both scripts run, each bar is timed and complete; a
    time-limited preparation is stopped; an unfinished bar is extrapolated from its steady rate."""
    out = tmp_path / "e2e"
    script = str(repo_root / "benchmarks" / "end_to_end.py")
    cmd = [sys.executable, script, "--config", "tests/configs/tiny_kd.yaml", "--set",
           "student.log_interval=2", "--kd-steps", "4", "--out", str(out), "--train-config",
           "tests/configs/tiny_baseline.yaml", "--train-steps", "3", "--sample-config",
           "tests/configs/tiny_baseline.yaml", "--sample-num", "6", "--sample-batch", "4",
           "--sample-respacing", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    stages = json.loads((out / "end_to_end.json").read_text())["stages"]
    assert [s["stage"] for s in stages] == ["dynamic_prepare", "image_kd", "image_train", "image_sample"]
    prepare, kd, train, sample = stages
    assert prepare["exit"] == 0 and kd["exit"] == 0 and not prepare["stopped_at_limit"]
    assert prepare["bar"] == "dynamic batch" and prepare["done"] == prepare["total"] > 0
    assert kd["bar"] == "train" and kd["done"] == kd["total"] == 4
    assert train["bar"] == "train" and train["done"] == train["total"] == 3
    assert sample["bar"] == "sample" and sample["done"] == sample["total"] == 10  # 2 rounds of 5 steps
    for stage in stages:
        assert 0 < stage["first_update_s"] <= stage["wall_s"]
    assert (out / "kd0" / "progress.csv").is_file()

    limited = tmp_path / "limited"
    cmd = [sys.executable, script, "--config", "tests/configs/tiny_kd.yaml", "--set", "teacher.BATCH=20",
           "--kd-steps", "0", "--prepare-limit", "0.001", "--out", str(limited)]
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (stage,) = json.loads((limited / "end_to_end.json").read_text())["stages"]
    assert stage["stopped_at_limit"] and stage["exit"] != 0

    sys.path.insert(0, str(repo_root / "benchmarks"))
    from end_to_end import summarize

    updates = [(10.0, "dynamic batch", 100, 1000), (12.0, "dynamic batch", 300, 1000),
               (14.0, "dynamic batch", 500, 1000), (1.0, "other", 1, 2)]
    result = summarize("dynamic_prepare", updates, wall=15.0, rc=-15, stopped=True, cmd=["x"])
    assert result["bar"] == "dynamic batch" and result["first_update_s"] == 10.0
    assert result["steady_per_s"] == 100.0 and result["extrapolated_wall_s"] == 19.0


def test_student_eps_error_splits_exactly_and_is_zero_for_the_teacher_itself(repo_root, tmp_path):
    """benchmarks/student_eps_error.py: grey + colour cast + colour detail add up to the total at every
    timestep, a student that is the teacher has no error, and a student with another init has some."""
    import torch
    from omegaconf import OmegaConf

    sys.path.insert(0, str(repo_root / "benchmarks"))
    sys.path.insert(0, str(repo_root / "tests"))
    from script_env import write_tiny_checkpoints
    from student_eps_error import main as eps_error

    from guided_diffusion.distill.dkdm.cache import save_cache

    paths = write_tiny_checkpoints(tmp_path)
    raw = OmegaConf.load(repo_root / "tests" / "configs" / "tiny_kd.yaml")
    raw.teacher.model_path, raw.teacher.tempfile = str(paths["teacher"]), str(tmp_path / "pool.cache")
    raw.student.model = raw.teacher.model  # a student of the teacher's arch
    OmegaConf.save(raw, tmp_path / "kd.yaml")
    steps = torch.arange(1, 9).repeat(3)
    states = torch.randn(len(steps), 3, 16, 16).clamp(-3, 3)
    save_cache(tmp_path / "pool.cache", steps.numpy(), states.numpy())
    base = ["--config", str(tmp_path / "kd.yaml"), "--pool", str(tmp_path / "pool.cache")]
    same = eps_error([*base, "--student", str(paths["teacher"])])
    assert [r["t"] for r in same] == list(range(8)) and all(r["n"] == 3 for r in same)
    assert all(r["total"] < 1e-10 for r in same)
    other = tmp_path / "other.pt"
    torch.manual_seed(1)
    model = torch.load(paths["teacher"], weights_only=True)
    torch.save({k: v + 0.05 * torch.randn_like(v) for k, v in model.items()}, other)
    rows = eps_error([*base, "--student", str(other)])
    for r in rows:
        assert r["total"] > 0
        assert abs(r["grey"] + r["colour_cast"] + r["colour_detail"] - r["total"]) <= 1e-6 * r["total"]


def test_sampling_precision_applies_half_autocast_on_the_cpu(repo_root, tmp_path):
    """benchmarks/sampling_precision.py: bf16 on a CPU really samples in bf16 (other images than fp32, from
    the same seed, yet close to them), and writes image_sample.py's samples file."""
    import numpy as np
    import torch

    sys.path.insert(0, str(repo_root / "benchmarks"))
    sys.path.insert(0, str(repo_root / "tests"))
    from sampling_precision import main as sample_at
    from script_env import write_tiny_checkpoints

    paths = write_tiny_checkpoints(tmp_path)
    torch.manual_seed(1)  # a fresh UNet's output conv is zero, which would hide the precision
    weights = torch.load(paths["student"], weights_only=True)
    torch.save({k: v + 0.05 * torch.randn_like(v) for k, v in weights.items()}, tmp_path / "student.pt")
    config = repo_root / "tests" / "configs" / "tiny_kd.yaml"
    common = ["--config", str(config), "--model_path", str(tmp_path / "student.pt"), "--device", "cpu",
              "--num_samples", "4", "--batch_size", "4", "--timestep_respacing", "4"]
    arrays = {}
    for precision in ("fp32", "bf16"):
        path = sample_at([*common, "--precision", precision, "--output_dir", str(tmp_path / precision)])
        assert path.endswith("samples_4x16x16x3.npz")
        with np.load(path) as f:
            arrays[precision] = f["arr_0"].astype(np.int16)
    diff = np.abs(arrays["bf16"] - arrays["fp32"])
    assert diff.max() > 0 and diff.mean() < 32
