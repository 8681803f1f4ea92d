"""DKDM loop and scripts: strict teacher, T check, masked and extra losses, exact resume, 2-rank run."""

import csv
import shutil
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from script_env import DUMP_PARAMS, ENV, MPIEXEC, PY, REPO, write_kd_yaml, write_tiny_checkpoints

from guided_diffusion import logger
from guided_diffusion.config import load_config, model_and_diffusion_kwargs
from guided_diffusion.distill.dkdm.cache import load_cache, save_cache
from guided_diffusion.distill.dkdm.setup import (
    KDSetupError,
    check_diffusions,
    load_teacher,
    make_dynamic_batch,
)
from guided_diffusion.distill.loop import KDTrainLoop
from guided_diffusion.infra.checkpoint import CheckpointMismatchError
from guided_diffusion.script_util import create_gaussian_diffusion, create_model_and_diffusion

torch.set_num_threads(1)  # the CI box has 2 shared cores; more threads only contend


@pytest.fixture(scope="module")
def kd_files(tmp_path_factory):
    """A random tiny teacher checkpoint, a student-arch checkpoint and a KD YAML pointing at them."""
    root = tmp_path_factory.mktemp("kd")
    teacher = write_tiny_checkpoints(root)["teacher"]
    return root, write_kd_yaml(root / "tiny_kd_run.yaml", teacher, root / "pool.cache")


def _run(script: str, args: list[str], mpi: int = 0, timeout: int = 120) -> subprocess.CompletedProcess:
    cmd = [PY, script, *args]
    if mpi:
        cmd = [MPIEXEC, "-n", str(mpi), *cmd]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "progress.csv") as f:
        return {int(float(r["step"])): float(r["loss"]) for r in csv.DictReader(f)}


def test_teacher_loads_strictly(kd_files):
    root, config = kd_files
    cfg = load_config(config)
    teacher, diffusion = load_teacher(cfg.teacher, torch.device("cpu"))
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    wrong = OmegaConf.merge(cfg.teacher, {"model_path": str(root / "student.pt")})
    with pytest.raises(CheckpointMismatchError, match="student.pt"):
        load_teacher(wrong, torch.device("cpu"))
    with pytest.raises(KDSetupError, match="model_path"):
        load_teacher(OmegaConf.merge(cfg.teacher, {"model_path": ""}), torch.device("cpu"))


def test_teacher_and_student_must_share_T():
    d20 = create_gaussian_diffusion(steps=20, learn_sigma=True, noise_schedule="cosine")
    d10 = create_gaussian_diffusion(
        steps=20, learn_sigma=True, noise_schedule="cosine", timestep_respacing="10"
    )
    check_diffusions(d20, create_gaussian_diffusion(steps=20, noise_schedule="linear", learn_sigma=True))
    with pytest.raises(KDSetupError, match="T=20.*T=10"):
        check_diffusions(d20, d10)


class ScaledEps(torch.nn.Module):
    """An extra loss with a trainable weight: loss = w * mean(middle features^2) per item (the student's
    output layer starts at zero, its features do not)."""

    needs_features = True
    base = False

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))
        self.seen_features = None

    def forward(self, student, batch):
        self.seen_features = batch["student_features"]
        assert batch["student_output"].shape == batch["x_t"].shape[:1] + (6,) + batch["x_t"].shape[2:]
        per_item = batch["student_features"]["middle"].pow(2).flatten(1).mean(dim=1)
        return {"loss": self.w * per_item, "raw": per_item}


def _loop(cfg, tmp_path, prob=1.0, extra=None, **loop_kwargs):
    logger.configure(str(tmp_path / "run"), format_strs=[])
    device = torch.device("cpu")
    teacher, teacher_diffusion = load_teacher(cfg.teacher, device)
    torch.manual_seed(1)
    student, student_diffusion = create_model_and_diffusion(**model_and_diffusion_kwargs(cfg.student))
    section = OmegaConf.merge(
        cfg.teacher, {"prob": prob, "prob_per_item": True, "iter_choice": "shuffled_iterative_distillation"}
    )
    pool = make_dynamic_batch(section, cfg.student, teacher, teacher_diffusion, student_diffusion, device)
    pool.prepare(progress=False)
    return KDTrainLoop(
        teacher=teacher, teacher_diffusion=teacher_diffusion, dynamic_batch=pool, objectives=extra or {},
        model=student, diffusion=student_diffusion, batch_size=pool.batch_size, microbatch=-1, lr=1e-3,
        ema_rate="0.9999", log_interval=0, save_interval=0, resume_checkpoint="",
        run_dir=str(tmp_path / "run"), **loop_kwargs,
    )


def test_student_clip_denoised_reaches_the_kd_objective(kd_files, tmp_path, monkeypatch):
    """teacher.student_clip_denoised (the authors' KDTrainLoop flag) clamps the student's x0 in vb."""
    _, config = kd_files
    seen = []
    for flag in (False, True):
        loop = _loop(load_config(config), tmp_path / str(flag), student_clip_denoised=flag)
        original = loop.base.diffusion.training_losses_kd

        def spy(*args, original=original, **kwargs):
            seen.append(kwargs["clip_denoised"])
            return original(*args, **kwargs)

        monkeypatch.setattr(loop.base.diffusion, "training_losses_kd", spy)
        loop.compute_losses(*loop.next_batch())
    assert seen == [False, True]
    assert load_config(config).teacher.student_clip_denoised is False  # the authors' default


def test_masked_loss_is_mean_over_kept_items_and_extra_losses_train(kd_files, tmp_path):
    _, config = kd_files
    cfg = load_config(config)
    extra = ScaledEps()
    loop = _loop(cfg, tmp_path, prob=0.5, extra={"scaled": extra})
    assert any(p is extra.w for p in loop.mp_trainer.params)
    x_t, cond = loop.next_batch()
    cond["weights"] = torch.tensor([2.0, 0.0, 2.0, 0.0])  # items 0 and 2 kept, normalized as next_batch does
    loss, terms = loop.compute_losses(x_t, cond)
    kd = terms["loss"]
    expected = (kd[[0, 2]] + 0.5 * terms["scaled_raw"][[0, 2]]).mean()
    torch.testing.assert_close(loss, expected)
    assert set(extra.seen_features) >= {"emb", "middle"}
    weights = loop.next_batch()[1]["weights"]
    kept = weights > 0
    torch.testing.assert_close(weights[kept].sum(), torch.tensor(float(weights.numel())))
    before = extra.w.detach().clone()
    loop.run_step(*loop.next_batch())
    assert not torch.equal(before, extra.w.detach())


def test_cache_mismatch_with_world_size_is_clear(kd_files, tmp_path):
    _, config = kd_files
    cfg = load_config(config)
    loop = _loop(cfg, tmp_path)
    path = tmp_path / "small.cache"
    loop.dynamic_batch.save(str(path))
    loop.dynamic_batch.world_size, loop.dynamic_batch.rank = 2, 1
    with pytest.raises(Exception, match=r"small\.cache: holds 4 items .* 8 are needed"):
        loop.dynamic_batch.load_slice(str(path))


def test_prepare_script_then_image_kd_resumes_exactly(kd_files, tmp_path):
    root, config = kd_files
    _run("scripts/dynamic_prepare.py", ["--config", str(config), "--exp_dir", str(tmp_path / "prep")])
    pool = load_cache(root / "pool.cache", T=20)
    assert pool["total_t"].shape[0] == round(0.4 * 20) * 4
    assert (pool["total_t"] >= 1).all() and (pool["total_t"] <= 19).all()
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    short = ["--config", str(config), "--max_steps", "4", "--save_interval", "2"]
    _run("scripts/image_kd.py", [*short, "--exp_dir", str(full)])
    for step in (2, 4):
        for name in (f"model{step:06d}.pt", f"opt{step:06d}.pt", f"teacher-state-{step:06d}.cache"):
            assert (full / name).is_file(), name
    resume = ["--resume_checkpoint", str(full / "model000002.pt"), "--resume_step", "1"]  # the authors' flags
    _run("scripts/image_kd.py", [*short, "--exp_dir", str(resumed), *resume])
    assert "resume 1 of this config" in (resumed / "log.txt").read_text()
    a = torch.load(full / "model000004.pt", weights_only=True)
    b = torch.load(resumed / "model000004.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    full_losses, resumed_losses = _losses(full), _losses(resumed)
    assert sorted(resumed_losses) == [3, 4]
    assert all(resumed_losses[s] == full_losses[s] for s in (3, 4))
    pa = load_cache(full / "teacher-state-000004.cache")
    pb = load_cache(resumed / "teacher-state-000004.cache")
    np.testing.assert_array_equal(pa["total_t"], pb["total_t"])
    np.testing.assert_array_equal(pa["total_x_t_1"], pb["total_x_t_1"])


def test_prepare_never_replaces_a_pool_of_another_size_or_mode(kd_files, tmp_path):
    """A shuffled-mode config shares the dynamic pool's tempfile (it reads the pool's first batch), so
    preparing it is refused as the authors' script does; a dynamic config of another rho is refused too."""
    root, _ = kd_files
    teacher = root / "teacher.pt"
    pool = tmp_path / "shared.cache"
    save_cache(pool, np.arange(32) % 19 + 1, np.zeros((32, 3, 16, 16), np.float32))
    before = pool.read_bytes()
    for name, overrides in (
        ("shuffled", {"iter_choice": "shuffled_iterative_distillation"}),
        ("rho", {"BATCH": 0.2}),
    ):
        config = write_kd_yaml(tmp_path / f"{name}.yaml", teacher, pool, teacher=overrides)
        cmd = [PY, "scripts/dynamic_prepare.py", "--config", str(config), "--exp_dir", str(tmp_path / name)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=ENV)
        assert proc.returncode != 0, name
        message = proc.stderr.strip().splitlines()[-1]
        expected = "only dynamic_iterative_distillation" if name == "shuffled" else "holds a pool of 32 items"
        assert expected in message, proc.stderr[-2000:]
        assert pool.read_bytes() == before, name




@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [2, 4])
def test_ranks_prepare_and_train_in_sync(kd_files, tmp_path, ranks):
    _, config = kd_files
    raw = OmegaConf.load(config)
    raw.teacher.tempfile = str(tmp_path / "mpi_pool.cache")
    mpi_config = tmp_path / "mpi_kd.yaml"
    OmegaConf.save(raw, mpi_config)
    wrapper = tmp_path / "dump.py"
    wrapper.write_text(DUMP_PARAMS)
    run = tmp_path / "run"
    args = [str(tmp_path), "--config", str(mpi_config), "--exp_dir", str(run), "--max_steps", "2",
            "--save_interval", "2"]
    _run(str(wrapper), args, mpi=ranks, timeout=300)  # the cache is absent: every rank prepares its share
    per_rank = 4 // ranks  # student batch 4 split over the ranks
    n_per_rank = round(0.4 * 20) * per_rank
    pool = load_cache(tmp_path / "mpi_pool.cache", T=20)
    assert pool["total_t"].shape[0] == ranks * n_per_rank
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(ranks)]
    assert all(torch.equal(states[0][k], other[k]) for other in states[1:] for k in states[0])
    saved = load_cache(run / "teacher-state-000002.cache", T=20)
    assert saved["total_t"].shape[0] == ranks * n_per_rank
    moved = saved["total_t"] != pool["total_t"]
    # 2 steps x per_rank drawn items per rank, each rank in its own slice (an item may be drawn twice)
    for r in range(ranks):
        assert 1 <= moved[r * n_per_rank : (r + 1) * n_per_rank].sum() <= 2 * per_rank
    if ranks == 4:  # a 4-rank checkpoint resumes onto 2 ranks: same global batch, so the same pool size
        _run("scripts/image_kd.py", ["--config", str(mpi_config), "--resume_checkpoint", str(run),
                                     "--max_steps", "4", "--save_interval", "2"], mpi=2, timeout=300)
        assert load_cache(run / "teacher-state-000004.cache", T=20)["total_t"].shape[0] == 4 * n_per_rank


ABORT_AT_TEARDOWN = textwrap.dedent(
    """
    import atexit, os, runpy, sys

    atexit.register(os.abort)  # a fault in interpreter teardown, as a library's static destructor raising
    sys.argv[0] = "scripts/image_kd.py"
    runpy.run_path("scripts/image_kd.py", run_name="__main__")
    """
)


@pytest.mark.mpi
def test_finished_run_exits_zero_whatever_teardown_does(kd_files, tmp_path):
    """Issue 19: finished 2-rank runs exited with code 6 (SIGABRT, "terminate called without an active
    exception") from the interpreter's teardown; the scripts now end with status 0 once their work is
    saved."""
    _, config = kd_files
    raw = OmegaConf.load(config)
    raw.teacher.tempfile = str(tmp_path / "pool.cache")
    OmegaConf.save(raw, tmp_path / "kd.yaml")
    wrapper = tmp_path / "abort_at_teardown.py"
    wrapper.write_text(ABORT_AT_TEARDOWN)
    run = tmp_path / "run"
    args = ["--config", str(tmp_path / "kd.yaml"), "--exp_dir", str(run), "--max_steps", "2",
            "--save_interval", "2"]
    proc = _run(str(wrapper), args, mpi=2, timeout=300)
    assert "distillation done" in proc.stdout
    assert (run / "model000002.pt").is_file()


def test_unwritable_pool_path_is_refused_before_the_teacher_runs(kd_files, tmp_path):
    """Issue 19: a tempfile that cannot be written was found only after the whole pool was computed."""
    root, _ = kd_files
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder should be")
    config = write_kd_yaml(tmp_path / "kd.yaml", root / "teacher.pt", blocker / "pool.cache")
    for script in ("scripts/dynamic_prepare.py", "scripts/image_kd.py"):
        cmd = [PY, script, "--config", str(config), "--exp_dir", str(tmp_path / "run")]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=ENV)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert len(proc.stderr.strip().splitlines()) == 1
        assert f"teacher.tempfile {blocker / 'pool.cache'}: cannot create its folder" in proc.stderr
        assert not (tmp_path / "run").exists()


def test_shuffled_run_never_writes_the_dynamic_cache_it_shares(kd_files, tmp_path):
    """The shuffled ablation run first, with no cache yet: it trains from a pool prepared in memory and
    leaves the shared (dynamic) cache path alone, so the dynamic run after it prepares its full pool there."""
    root, _ = kd_files
    pool = tmp_path / "cache" / "shared.cache"
    shuffled = write_kd_yaml(tmp_path / "shuffled.yaml", root / "teacher.pt", pool,
                             teacher={"iter_choice": "shuffled_iterative_distillation"},
                             student={"max_steps": 2, "save_interval": 2})
    _run("scripts/image_kd.py", ["--config", str(shuffled), "--exp_dir", str(tmp_path / "shuffled")])
    assert (tmp_path / "shuffled" / "model000002.pt").is_file() and not pool.exists()
    dynamic = write_kd_yaml(tmp_path / "dynamic.yaml", root / "teacher.pt", pool,
                            student={"max_steps": 2, "save_interval": 2})
    _run("scripts/image_kd.py", ["--config", str(dynamic), "--exp_dir", str(tmp_path / "dynamic")])
    cfg = load_config(dynamic)
    assert load_cache(pool)["total_t"].shape[0] == round(cfg.teacher.BATCH * 20) * cfg.student.batch_size


@pytest.mark.parametrize("with_pool", [True, False])
def test_authors_run_dir_resumes(kd_files, tmp_path, with_pool):
    """A run folder as the authors' image_kd writes it (their modelN/ema/optN.pt after N + 1 updates, the
    opt file a bare AdamW state dict, teacher-state-N.cache only when they saved one) resumes: optimizer
    state loaded, N + 1 updates counted, the pool from that cache or else from teacher.tempfile."""
    root, config = kd_files
    ours, theirs, cont = tmp_path / "ours", tmp_path / "theirs", tmp_path / "cont"
    steps = ["--config", str(config), "--save_interval", "3"]
    _run("scripts/image_kd.py", [*steps, "--max_steps", "3", "--exp_dir", str(ours)])
    theirs.mkdir()
    shutil.copy(ours / "model000003.pt", theirs / "model000002.pt")
    shutil.copy(ours / "ema_0.9999_000003.pt", theirs / "ema_0.9999_000002.pt")
    torch.save(torch.load(ours / "opt000003.pt", weights_only=True)["opt"], theirs / "opt000002.pt")
    if with_pool:
        shutil.copy(ours / "teacher-state-000003.cache", theirs / "teacher-state-000002.cache")
    resume = ["--resume_checkpoint", str(theirs / "model000002.pt"), "--resume_step", "1"]
    _run("scripts/image_kd.py", [*steps, "--max_steps", "6", "--exp_dir", str(cont), *resume])
    log = (cont / "log.txt").read_text()
    assert "a run of the authors' code" in log and "resuming after 3 updates" in log
    assert ("starts from teacher.tempfile" in log) != with_pool
    assert sorted(_losses(cont)) == [4, 5, 6] and (cont / "model000006.pt").is_file()
    resumed_opt = torch.load(cont / "opt000006.pt", weights_only=True)["opt"]["state"]
    assert int(resumed_opt[0]["step"]) == 6  # Adam's own count: 3 loaded + 3 taken
