"""Training loop: checkpoints, exact resume, DDP parameter sync, non-finite step handling."""

import csv
import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from script_env import ENV, MPIEXEC, PY, REPO

from guided_diffusion import logger
from guided_diffusion.config import load_config
from guided_diffusion.image_datasets import load_data
from guided_diffusion.infra.mixed_precision import NonFiniteLossError
from guided_diffusion.run_setup import build_model_and_diffusion
from guided_diffusion.train_util import TrainLoop

TINY = "tests/configs/tiny_baseline.yaml"


def _image_folder(root: Path, n: int = 24) -> Path:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"img_{i:03d}.png")
    return root


def _train(args: list[str], timeout: int = 60, mpi: int = 0) -> subprocess.CompletedProcess:
    cmd = [PY, "scripts/image_train.py", "--config", TINY, *args]
    if mpi:
        cmd = [MPIEXEC, "-n", str(mpi), *cmd]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "progress.csv") as f:
        return {int(float(r["step"])): float(r["loss"]) for r in csv.DictReader(f)}


def test_image_train_saves_and_resumes_exactly(tmp_path):
    data = _image_folder(tmp_path / "data")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    short = ["--max_steps", "4", "--save_interval", "2"]
    _train(["--data_dir", str(data), "--exp_dir", str(full), *short])
    for name in ("model000002.pt", "ema_0.9999_000002.pt", "opt000002.pt", "model000004.pt", "latest",
                 "config.yaml", "log.txt"):
        assert (full / name).is_file(), name
    assert '"step": 4' in (full / "latest").read_text()

    _train(["--data_dir", str(data), "--exp_dir", str(resumed), *short,
            "--resume_checkpoint", str(full / "model000002.pt")])
    for name in ("model000004.pt", "ema_0.9999_000004.pt"):
        a = torch.load(full / name, weights_only=True)
        b = torch.load(resumed / name, weights_only=True)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    start = torch.load(full / "model000002.pt", weights_only=True)
    end = torch.load(full / "model000004.pt", weights_only=True)
    assert not all(torch.equal(start[k], end[k]) for k in start)
    full_losses, resumed_losses = _losses(full), _losses(resumed)
    assert sorted(resumed_losses) == [3, 4]
    assert all(resumed_losses[s] == full_losses[s] for s in (3, 4))


DRIVER = textwrap.dedent(
    """
    import sys, torch
    from guided_diffusion import dist_util, logger
    from guided_diffusion.config import load_config
    from guided_diffusion.image_datasets import load_data
    from guided_diffusion.run_setup import build_model_and_diffusion
    from guided_diffusion.train_util import TrainLoop

    data_dir, out = sys.argv[1], sys.argv[2]
    dist_util.setup_dist()
    rank = dist_util.get_rank()
    torch.manual_seed(100 + rank)  # different initial weights per rank: TrainLoop must sync them
    cfg = load_config("tests/configs/tiny_baseline.yaml")
    model, diffusion = build_model_and_diffusion(cfg, dist_util.dev())
    logger.configure(out, format_strs=[])
    data = load_data(data_dir=data_dir, batch_size=2, image_size=16, seed=0)
    loop = TrainLoop(model=model, diffusion=diffusion, data=data, batch_size=2, microbatch=1, lr=1e-3,
                     ema_rate="0.9", log_interval=0, save_interval=0, resume_checkpoint="", max_steps=3,
                     seed=rank, run_dir=out)
    for _ in range(3):
        loop.run_step(*loop.next_batch())
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.save({"params": flat, "ema": torch.cat([e.reshape(-1) for e in loop.ema_params[0]])},
               f"{out}/rank{rank}.pt")
    dist_util.cleanup()
    """
)


@pytest.mark.mpi
def test_ddp_keeps_ranks_identical(tmp_path):
    data = _image_folder(tmp_path / "data", n=8)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    proc = subprocess.run([MPIEXEC, "-n", "2", PY, str(driver), str(data), str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=90, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert torch.equal(r0["params"], r1["params"])
    assert torch.equal(r0["ema"], r1["ema"])


def _loop(tmp_path, **kwargs) -> TrainLoop:
    cfg = load_config(str(REPO / TINY))
    torch.manual_seed(0)
    model, diffusion = build_model_and_diffusion(cfg, "cpu")
    logger.configure(str(tmp_path / "run"), format_strs=["csv"])
    data = load_data(data_dir=str(_image_folder(tmp_path / "data", n=8)), batch_size=4, image_size=16,
                     shard=0, num_shards=1)
    options = dict(model=model, diffusion=diffusion, data=data, batch_size=4, microbatch=2, lr=1e-3,
                   ema_rate="0.9", log_interval=1, save_interval=0, resume_checkpoint="", max_steps=4,
                   run_dir=str(tmp_path / "run"))
    options.update(kwargs)
    return TrainLoop(**options)


def test_nonfinite_step_is_skipped_and_training_continues(tmp_path, monkeypatch):
    loop = _loop(tmp_path)
    original = loop.compute_losses
    snapshots = []

    def flaky(batch, cond):
        loss, terms = original(batch, cond)
        if loop.step == 1:
            loss = loss * float("nan")
        return loss, terms

    monkeypatch.setattr(loop, "compute_losses", flaky)
    for _ in range(3):
        snapshots.append([p.detach().clone() for p in loop.model_params])
        snapshots[-1].append(loop.ema_params[0][0].clone())
        loop.run_step(*loop.next_batch())
        loop.log_step()
    after_skip = [p.detach().clone() for p in loop.model_params]
    assert int(loop.mp_trainer.skipped_total) == 1
    assert int(loop.mp_trainer.consecutive_skips) == 0
    assert all(torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[2], strict=True))  # step 1 skipped
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[0], snapshots[1], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[2], after_skip, strict=True))
    assert all(torch.isfinite(p).all() for p in after_skip)


def test_persistent_nan_stops_with_clear_error(tmp_path, monkeypatch):
    loop = _loop(tmp_path, max_nonfinite_skips=3, max_steps=10)
    def always_nan(batch, cond):
        return loop.model.out[-1].weight.sum() * float("nan"), {}

    monkeypatch.setattr(loop, "compute_losses", always_nan)
    with pytest.raises(NonFiniteLossError, match="3 consecutive"):
        loop.run_loop()
    assert loop.step == 3


def test_lr_schedules(tmp_path):
    anneal = _loop(tmp_path / "a", lr_anneal_steps=4, max_steps=0)
    anneal.step = 3
    assert anneal.current_lr() == pytest.approx(1e-3 * 0.25)
    cosine = _loop(tmp_path / "c", lr_schedule="cosine", max_steps=4)
    cosine.step = 2
    assert cosine.current_lr() == pytest.approx(0.5e-3)
    with pytest.raises(ValueError, match="max_steps"):
        _loop(tmp_path / "bad", lr_schedule="cosine", max_steps=0)


def test_resume_with_another_ema_rate_names_the_saved_rates(tmp_path):
    """Issue 19: changing ema_rate on resume said only "no complete checkpoint set"."""
    first = _loop(tmp_path, ema_rate="0.9", max_steps=2, save_interval=2)
    first.run_loop()
    run_dir = first.run_dir
    assert os.path.isfile(os.path.join(run_dir, "ema_0.9_000002.pt"))
    with pytest.raises(FileNotFoundError, match=r"EMA files have rate\(s\) 0\.9 but ema_rate is 0\.99"):
        _loop(tmp_path / "again", ema_rate="0.99", resume_checkpoint=run_dir)
