"""Non-finite losses and failing ranks: one NaN step is skipped (and logged) and training goes on; a NaN
streak stops the run after max_nonfinite_skips with the last checkpoint intact; a rank that raises ends the
job."""

from __future__ import annotations

import csv
import subprocess
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from script_env import ENV, MPIEXEC, PY, REPO, write_kd_yaml, write_tiny_checkpoints

from guided_diffusion import logger
from guided_diffusion.config import load_config
from guided_diffusion.image_datasets import load_data
from guided_diffusion.infra.checkpoint import read_latest, safe_torch_load
from guided_diffusion.infra.mixed_precision import NonFiniteLossError
from guided_diffusion.run_setup import build_model_and_diffusion
from guided_diffusion.train_util import TrainLoop

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def kd_config(tmp_path_factory) -> Path:
    """tiny_kd.yaml with a random-init teacher and a pool cache path in a fresh folder."""
    root = tmp_path_factory.mktemp("nan_kd")
    return write_kd_yaml(root / "kd.yaml", write_tiny_checkpoints(root)["teacher"], root / "pool.cache",
                         student={"log_interval": 1, "save_interval": 2, "max_nonfinite_skips": 3})


def _train_loop(tmp_path: Path, **kwargs) -> TrainLoop:
    cfg = load_config(REPO / "tests/configs/tiny_baseline.yaml")
    torch.manual_seed(0)
    model, diffusion = build_model_and_diffusion(cfg, "cpu")
    run = tmp_path / "run"
    logger.configure(str(run), format_strs=["log", "csv"])
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "data.npz", images)
    data = load_data(data_dir=str(tmp_path / "data.npz"), batch_size=4, image_size=16, shard=0, num_shards=1)
    options = dict(model=model, diffusion=diffusion, data=data, batch_size=4, microbatch=-1, lr=1e-3,
                   ema_rate="0.9", log_interval=1, save_interval=2, resume_checkpoint="", max_steps=4,
                   run_dir=str(run))
    options.update(kwargs)
    return TrainLoop(**options)


def _nan_from(loop: TrainLoop, steps) -> None:
    """Make the loss NaN (on the real graph, so every gradient is NaN) while `loop.step` is in `steps`."""
    original = loop.compute_losses

    def poisoned(batch, cond):
        loss, terms = original(batch, cond)
        return (loss * float("nan") if loop.step in steps else loss), terms

    loop.compute_losses = poisoned


def _progress(run: Path) -> list[dict[str, str]]:
    with open(run / "progress.csv") as f:
        return list(csv.DictReader(f))


def test_trainloop_skips_one_nan_step_logs_it_and_continues(tmp_path):
    loop = _train_loop(tmp_path)
    _nan_from(loop, {1})
    params = []
    original_step = loop.run_step

    def recording_step(batch, cond):
        params.append([p.detach().clone() for p in loop.model_params])
        original_step(batch, cond)

    loop.run_step = recording_step
    loop.run_loop()
    logger.reset()
    params.append([p.detach().clone() for p in loop.model_params])
    assert loop.step == 4 and int(loop.mp_trainer.skipped_total) == 1
    assert all(torch.equal(a, b) for a, b in zip(params[1], params[2], strict=True))  # the NaN step
    for before, after in ((0, 1), (2, 3), (3, 4)):
        assert not all(torch.equal(a, b) for a, b in zip(params[before], params[after], strict=True))
    assert all(torch.isfinite(p).all() for p in params[-1])
    rows = _progress(tmp_path / "run")
    assert [int(float(r["skipped_steps"])) for r in rows] == [0, 1, 1, 1]
    log_text = (tmp_path / "run" / "log.txt").read_text()
    assert "skipped 1 optimizer step(s) with non-finite gradients" in log_text
    final = safe_torch_load(tmp_path / "run" / "model000004.pt")
    assert all(torch.isfinite(v).all() for v in final.values())


def test_trainloop_nan_streak_stops_and_keeps_last_good_checkpoint(tmp_path):
    loop = _train_loop(tmp_path, max_steps=20, max_nonfinite_skips=3)
    _nan_from(loop, range(4, 100))
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive optimizer steps.*max_nonfinite_skips=3"):
        loop.run_loop()
    logger.reset()
    run = tmp_path / "run"
    assert loop.step == 7  # steps 5, 6 and 7 were skipped
    assert read_latest(run)[0] == 6 and not (run / "model000008.pt").exists()
    good, last = safe_torch_load(run / "model000004.pt"), safe_torch_load(run / "model000006.pt")
    assert all(torch.isfinite(v).all() and torch.equal(v, last[k]) for k, v in good.items())
    opt = safe_torch_load(run / "opt000006.pt")
    assert opt["step"] == 6 and int(opt["scaler"]["consecutive_skips"]) == 2


def test_non_finite_weights_are_never_saved(tmp_path):
    """Finite gradients can still leave non-finite weights (issue 19: `lr: .inf` exited 0 with NaN weights).
    The save refuses, so `latest` keeps the last good set."""
    loop = _train_loop(tmp_path, max_steps=6)
    original = loop.mp_trainer.optimize

    def blow_up(opt):
        original(opt)
        if loop.step == 3:  # the update of step 4 (0-based 3) writes inf into one weight
            with torch.no_grad():
                loop.model_params[0].view(-1)[0] = float("inf")

    loop.mp_trainer.optimize = blow_up
    with pytest.raises(NonFiniteLossError, match=r"step 4: the model or EMA weights are not finite"):
        loop.run_loop()
    logger.reset()
    run = tmp_path / "run"
    assert read_latest(run)[0] == 2 and not (run / "model000004.pt").exists()
    assert all(torch.isfinite(v).all() for v in safe_torch_load(run / "model000002.pt").values())


NAN_WRAPPER = textwrap.dedent(
    """
    import runpy, sys
    from guided_diffusion.distill import loop as kd_util

    first_bad = int(sys.argv.pop(1))
    original = kd_util.KDTrainLoop.compute_losses

    def poisoned(self, batch, cond):
        loss, terms = original(self, batch, cond)
        return (loss * float("nan") if self.step >= first_bad else loss), terms

    kd_util.KDTrainLoop.compute_losses = poisoned
    sys.argv[0] = "scripts/image_kd.py"
    runpy.run_path("scripts/image_kd.py", run_name="__main__")
    """
)


def test_image_kd_nan_streak_stops_cleanly_with_last_good_checkpoint(kd_config, tmp_path):
    wrapper = tmp_path / "nan_kd.py"
    wrapper.write_text(NAN_WRAPPER)
    run = tmp_path / "run"
    args = [PY, str(wrapper), "2", "--config", str(kd_config), "--exp_dir", str(run), "--max_steps", "20"]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**ENV, "PYTHONPATH": str(REPO)})
    assert proc.returncode != 0
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert "NonFiniteLossError: 3 consecutive optimizer steps" in last, proc.stderr[-2000:]
    assert "max_nonfinite_skips=3" in last  # K comes from the config (default 50)
    assert "skipped 1 optimizer step(s) with non-finite gradients" in (run / "log.txt").read_text()
    step, files = read_latest(run)  # steps 3 and 4 were skipped, the save at 4 holds step 2's weights
    assert step == 4 and not (run / "model000006.pt").exists()
    good, last_saved = safe_torch_load(run / "model000002.pt"), safe_torch_load(run / "model000004.pt")
    assert all(torch.isfinite(v).all() and torch.equal(v, last_saved[k]) for k, v in good.items())
    assert all((run / name).is_file() for name in files)


FAILING_RANK = textwrap.dedent(
    """
    import runpy, sys
    from guided_diffusion import dist_util
    from guided_diffusion.distill import loop as kd_util

    original = kd_util.KDTrainLoop.run_step

    def failing(self, batch, cond):
        if dist_util.get_rank() == 1 and self.step == 1:
            raise RuntimeError("injected failure on rank 1")
        original(self, batch, cond)

    kd_util.KDTrainLoop.run_step = failing
    sys.argv[0] = "scripts/image_kd.py"
    runpy.run_path("scripts/image_kd.py", run_name="__main__")
    """
)


@pytest.mark.mpi
def test_image_kd_failing_rank_ends_the_job_with_its_error(kd_config, tmp_path):
    wrapper = tmp_path / "fail_rank.py"
    wrapper.write_text(FAILING_RANK)
    run = tmp_path / "run"
    raw = OmegaConf.load(kd_config)
    raw.teacher.tempfile = str(tmp_path / "pool2.cache")
    config = tmp_path / "kd2.yaml"
    OmegaConf.save(raw, config)
    start = time.monotonic()
    proc = subprocess.run(
        [MPIEXEC, "-n", "2", PY, str(wrapper), "--config", str(config), "--exp_dir", str(run),
         "--max_steps", "6"],
        cwd=REPO, capture_output=True, text=True, timeout=150, env={**ENV, "PYTHONPATH": str(REPO)},
    )
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "[rank 1] uncaught RuntimeError: injected failure on rank 1" in proc.stderr, proc.stderr[-2000:]
    assert elapsed < 90, f"the job took {elapsed:.0f} s to end after a rank failed"
    assert not list(run.glob("model*.pt"))
