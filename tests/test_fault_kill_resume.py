"""Crash safety end to end: image_kd is SIGKILLed at seeded random moments (some inside a checkpoint write),
resumed from its run dir each time, and must finish with the same student as an uninterrupted run."""

from __future__ import annotations

import csv
import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from script_env import ENV, PY, REPO, write_kd_yaml, write_tiny_checkpoints

from guided_diffusion.distill.dkdm.cache import load_cache
from guided_diffusion.distill.loop import POOL_PATTERN
from guided_diffusion.infra.checkpoint import FAULT_SLEEP_ENV, find_resume_set, read_latest, safe_torch_load

MAX_STEPS, SAVE_INTERVAL = 24, 3
CKPT_TEMP_PREFIXES = (".model", ".ema_", ".opt", ".latest")  # temp files of the checkpoint set's writes
SET_ROLES = {"required": ("model", "opt", "ema", "pool"), "ema_rates": ["0.9999"],
             "extra_patterns": {"pool": POOL_PATTERN}}


@pytest.fixture(scope="module")
def kd_config(tmp_path_factory) -> Path:
    """tiny_kd.yaml with a random-init teacher, its pool cache path, MAX_STEPS and frequent saves."""
    root = tmp_path_factory.mktemp("fault")
    return write_kd_yaml(root / "kd.yaml", write_tiny_checkpoints(root)["teacher"], root / "pool.cache",
                         student={"max_steps": MAX_STEPS, "save_interval": SAVE_INTERVAL})


def _launch(args: list[str], log: Path, save_sleep: float = 0.0) -> subprocess.Popen:
    env = dict(ENV)
    if save_sleep:
        env[FAULT_SLEEP_ENV] = str(save_sleep)
    with open(log, "ab") as out:
        return subprocess.Popen([PY, "scripts/image_kd.py", *args], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def _latest_step(run: Path) -> int:
    found = read_latest(run) if run.is_dir() else None
    return found[0] if found else 0


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 60.0) -> bool:
    """Poll `ready()` every 10 ms until it holds (True) or the process exits first (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    raise AssertionError(f"fault test: condition not reached within {timeout} s")


def _temp_names(run: Path) -> set[str]:
    return {p.name for p in run.iterdir() if p.name.startswith(".")} if run.is_dir() else set()


def _losses(run: Path) -> dict[int, float]:
    """step -> loss from progress.csv; replayed steps must repeat the same loss (checked by the caller)."""
    rows: dict[int, list[float]] = {}
    with open(run / "progress.csv") as f:
        for row in csv.DictReader(f):
            rows.setdefault(int(float(row["step"])), []).append(float(row["loss"]))
    for step, values in rows.items():
        assert len(set(values)) == 1, f"step {step} logged different losses across resumes: {values}"
    return {step: values[0] for step, values in rows.items()}


@pytest.mark.timeout(170)
def test_sigkill_at_random_moments_then_resume_matches_uninterrupted_run(kd_config, tmp_path):
    rng = random.Random(11)
    run, ref = tmp_path / "faulty", tmp_path / "reference"
    log = tmp_path / "faulty.log"
    reference = _launch(["--config", str(kd_config), "--exp_dir", str(ref)], tmp_path / "reference.log")
    resume = ["--config", str(kd_config), "--resume_checkpoint", str(run)]

    # (how the attempt is killed, its argument): after a checkpoint plus a random delay; at the k-th atomic
    # write of a save (k=4 is `latest` itself, so the newest complete set is not yet named by it); and at a
    # random moment after training has visibly moved on.
    plan = [("after_save", rng.uniform(0.0, 0.3)), ("mid_write", rng.randint(1, 3)),
            ("after_save", rng.uniform(0.0, 0.3)), ("mid_write", 4), ("random", rng.uniform(0.0, 1.0))]
    kills = []
    for attempt, (how, arg) in enumerate(plan):
        start = _latest_step(run)
        args = ["--config", str(kd_config), "--exp_dir", str(run)] if attempt == 0 else resume
        proc = _launch(args, log, save_sleep=0.5 if how == "mid_write" else 0.0)
        if how == "after_save":
            hit = _wait_for(proc, lambda s=start: _latest_step(run) > s)
            time.sleep(arg)
        elif how == "mid_write":
            before = _temp_names(run)
            seen: set[str] = set()

            def kth_temp(before=before, seen=seen, k=arg):
                seen.update(n for n in _temp_names(run) - before if n.startswith(CKPT_TEMP_PREFIXES))
                return len(seen) >= k

            hit = _wait_for(proc, kth_temp)
        else:
            hit = _wait_for(proc, lambda: (run / "progress.csv").is_file()
                            and (run / "progress.csv").stat().st_size > 0)
            time.sleep(arg)
        assert hit, f"attempt {attempt} exited early:\n{log.read_text()[-3000:]}"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        kills.append((how, start, _latest_step(run), sorted(_temp_names(run))))

    assert any(how == "mid_write" and temps for how, _, _, temps in kills), kills  # a save was interrupted
    final = _launch(resume, log)
    assert final.wait(timeout=120) == 0, log.read_text()[-3000:]
    assert reference.wait(timeout=120) == 0, (tmp_path / "reference.log").read_text()[-3000:]

    # the run is complete and consistent: `latest` names the final complete set, nothing partial remains
    step, files = read_latest(run)
    assert step == MAX_STEPS
    found = find_resume_set(run, **SET_ROLES)
    assert found is not None and found.step == MAX_STEPS
    assert sorted(files) == sorted(os.path.basename(p) for p in found.paths.values())
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".tmp-")]
    for path in sorted(run.iterdir()):
        if path.suffix == ".pt":
            assert isinstance(safe_torch_load(path), dict), path
        elif path.suffix == ".cache":
            assert load_cache(str(path), T=20)["total_t"].shape[0] > 0, path
    assert "resuming from step" in log.read_text()
    assert json.loads((run / "latest").read_text())["step"] == MAX_STEPS

    # resume is exact: same final student, EMA, optimizer moments and pool as the uninterrupted run
    for name in (f"model{MAX_STEPS:06d}.pt", f"ema_0.9999_{MAX_STEPS:06d}.pt"):
        a, b = safe_torch_load(run / name), safe_torch_load(ref / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    opt_a = safe_torch_load(run / f"opt{MAX_STEPS:06d}.pt")["opt"]["state"]
    opt_b = safe_torch_load(ref / f"opt{MAX_STEPS:06d}.pt")["opt"]["state"]
    assert all(torch.equal(opt_a[i]["exp_avg"], opt_b[i]["exp_avg"]) for i in opt_b)
    pool_a = load_cache(str(run / POOL_PATTERN.format(step=MAX_STEPS)))
    pool_b = load_cache(str(ref / POOL_PATTERN.format(step=MAX_STEPS)))
    assert (pool_a["total_t"] == pool_b["total_t"]).all()
    assert (pool_a["total_x_t_1"] == pool_b["total_x_t_1"]).all()
    faulty_losses, ref_losses = _losses(run), _losses(ref)
    assert sorted(faulty_losses) == list(range(1, MAX_STEPS + 1))
    assert faulty_losses == ref_losses



def _rank_pids(launcher: subprocess.Popen, kd_config: Path, run: Path) -> dict[int, int]:
    """rank -> pid of the job's workers (the processes whose environment holds the launcher's rank)."""
    found = {}
    pids = subprocess.run(["pgrep", "-f", f"scripts/image_kd.py --config {kd_config} --exp_dir {run}"],
                          capture_output=True, text=True).stdout.split()
    for pid in map(int, pids):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for name in (b"PMI_RANK=", b"RANK="):
            value = next((e[len(name):] for e in environ if e.startswith(name)), None)
            if value is not None and pid != launcher.pid:
                found[int(value)] = pid
                break
    return found


@pytest.mark.mpi
@pytest.mark.timeout(400)
@pytest.mark.parametrize("launcher", ["mpiexec", "torchrun"])
def test_a_rank_killed_mid_run_ends_the_job_fast_and_the_run_resumes_from_its_last_set(
    launcher, kd_config, tmp_path
):
    """`mpiexec -n 2` and `torchrun --nproc_per_node 2` (CPU, gloo), rank 1 SIGKILLed mid-step: the job ends
    within 60 s (not the 600 s collective timeout), the launcher's report names the lost rank (torchrun:
    its rank number; MPICH: the killed process), and resuming from the run dir continues from the last
    complete checkpoint set to the end on both ranks."""
    from script_env import MPIEXEC

    start = ([MPIEXEC, "-n", "2", PY] if launcher == "mpiexec"
             else [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])
    run, log = tmp_path / "run", tmp_path / "log.txt"
    cmd = [*start, "scripts/image_kd.py", "--config", str(kd_config), "--exp_dir", str(run), "--max_steps",
           "100000"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT)
    try:
        assert _wait_for(proc, lambda: _latest_step(run) >= 2 * SAVE_INTERVAL, timeout=120)
        ranks = _rank_pids(proc, kd_config, run)
        assert sorted(ranks) == [0, 1], ranks
        victim = ranks[1]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        proc.wait(timeout=60)
        assert time.monotonic() - killed_at < 60 and proc.returncode != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    report = log.read_text()
    if launcher == "torchrun":
        assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", report) and "SIGKILL" in report, report[-1500:]
    else:
        assert str(victim) in report or "signal 9" in report, report[-1500:]
    last = _latest_step(run)
    assert find_resume_set(run, **SET_ROLES).step == last
    resume = [*start, "scripts/image_kd.py", "--config", str(kd_config), "--resume_checkpoint", str(run),
              "--max_steps", str(last + SAVE_INTERVAL)]
    done = subprocess.run(resume, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _latest_step(run) == last + SAVE_INTERVAL and min(s for s in _losses(run) if s > last) == last + 1


@pytest.mark.mpi
@pytest.mark.timeout(300)
@pytest.mark.parametrize("ranks", [1, 2])
def test_sigterm_saves_the_current_step_and_stops_then_the_run_resumes_from_it(ranks, kd_config, tmp_path):
    """SIGTERM (a scheduler's pre-emption, digits_results' time budget) to one process: the loop finishes
    its step, every rank agrees on where to stop (2 ranks: the flag is all-reduced at log steps), the set
    of that step is saved although no save was due, the job exits with 143, and a resume continues there."""
    from script_env import MPIEXEC

    from guided_diffusion.train_util import STOPPED_EXIT_CODE

    run, log = tmp_path / "run", tmp_path / "log.txt"
    start = [MPIEXEC, "-n", "2", PY] if ranks == 2 else [PY]
    cmd = [*start, "scripts/image_kd.py", "--config", str(kd_config), "--exp_dir", str(run), "--max_steps",
           "100000", "--save_interval", "1000", "--log_interval", "2"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT)
    try:
        assert _wait_for(proc, lambda: max(_losses(run), default=0) >= 4 if (run / "progress.csv").is_file()
                         else False, timeout=120)
        pids = _rank_pids(proc, kd_config, run) if ranks == 2 else {0: proc.pid}
        os.kill(pids[max(pids)], signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == STOPPED_EXIT_CODE, log.read_text()[-2000:]
    stopped = _latest_step(run)
    assert stopped >= 4 and stopped % 1000 and stopped % 2 == (0 if ranks == 2 else stopped % 2)
    assert f"stopped by SIGTERM at step {stopped}" in (run / "log.txt").read_text()
    assert find_resume_set(run, **SET_ROLES).step == stopped
    resume = [*start, "scripts/image_kd.py", "--config", str(kd_config), "--resume_checkpoint", str(run),
              "--max_steps", str(stopped + 2), "--save_interval", "1000", "--log_interval", "2"]
    done = subprocess.run(resume, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _latest_step(run) == stopped + 2
