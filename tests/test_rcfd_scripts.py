"""The seed's RDD workflow through the project's scripts on CPU, tiny: base training, the classifier file,
an RDD 8 -> 4 stage that resumes exactly, and evaluation samples of the base (8 steps) and the student."""

from __future__ import annotations

import csv
import subprocess

import numpy as np
import pytest
import torch
from script_env import ENV, MPIEXEC, PY, REPO

from guided_diffusion.distill.densenet import build_densenet, save_densenet

torch.set_num_threads(1)
NET = "--ch 32 --ch_mult 1,2 --num_res_blocks 1".split()
TINY = [*NET, *"--batch_size 4 --log_interval 1 --sample_step 0".split()]
CUT = """
import runpy, sys
from guided_diffusion.distill import rcfd_run

def stop_after_two(self):
    while self.step < 2:
        self.train_step()
    self.save()

rcfd_run.StageTrainer.run = stop_after_two
sys.argv[0] = "scripts/rcfd_train.py"
runpy.run_path("scripts/rcfd_train.py", run_name="__main__")
"""


def _run(argv, ok=True):
    proc = subprocess.run([PY, *argv], cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    if ok:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _train(config, data, logdir, *extra, ok=True):
    args = ["--config", f"yaml/digits_16/rcfd/{config}", "--data_dir", data, "--logdir", str(logdir), *extra]
    return _run(["scripts/rcfd_train.py", *args], ok=ok)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from datasets.digits import write_digits

    root = tmp_path_factory.mktemp("rcfd")
    return str(write_digits(str(root / "data"), 16)["train"])


def test_base_rdd_resume_and_eval(digits, tmp_path):
    base = tmp_path / "base"
    _train("DIGITS_BASE.yaml", digits, base, "--total_steps", "3", "--save_step", "2", *TINY)
    ckpt = torch.load(base / "ckpt.pt", weights_only=True)
    assert set(ckpt) == {"net_model", "ema_model", "T", "time_scale", "x_T"} and ckpt["T"] == 1024
    with open(base / "progress.csv") as f:
        assert [int(float(r["step"])) for r in csv.DictReader(f)] == [1, 2, 3]

    classifier = tmp_path / "densenet121"
    classifier.mkdir()
    torch.manual_seed(0)
    save_densenet(build_densenet("densenet121"), str(classifier / "ckpt.pt"))
    stage = ["--base_ckpt", str(base), "--classifier_path", str(classifier), "--classifier", "densenet121",
             "--total_steps", "4", "--save_step", "2", *TINY]
    _train("DIGITS_RDD.yaml", digits, tmp_path / "full", *stage)
    cut = ["--config", "yaml/digits_16/rcfd/DIGITS_RDD.yaml", "--data_dir", digits, "--logdir",
           str(tmp_path / "cut"), *stage]
    _run(["-c", CUT, *cut])  # the script, killed after its step-2 save
    _train("DIGITS_RDD.yaml", digits, tmp_path / "cut", *stage, "--resume")
    full = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)
    resumed = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)
    assert (full["T"], full["time_scale"]) == (4, 256) and "ema_model" not in full
    assert all(torch.equal(full["net_model"][k], resumed["net_model"][k]) for k in full["net_model"])
    with open(tmp_path / "full" / "progress.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"memory_p2p", "intra_p2p", "rcfd_kl"} <= set(rows[0]) and "regression" not in rows[0]
    state = torch.load(tmp_path / "full" / "train_state.pt", weights_only=True)
    assert state["per_rank"][0]["memory"]["teacher_pixel_queue"].shape == (20000, 1024)

    for logdir, stride, name in ((base, "128", "base8"), (tmp_path / "full", "1", "rdd4")):
        out = tmp_path / name
        config = "yaml/digits_16/rcfd/DIGITS_EVAL.yaml"
        _run(["scripts/rcfd_eval.py", "--config", config, "--logdir", str(logdir), "--stride", stride,
              "--num_images", "3", "--batch_size", "2", *NET, "--output_dir", str(out)])
        with np.load(out / "samples_3x16x16x3.npz") as npz:
            assert npz["arr_0"].shape == (3, 16, 16, 3) and npz["arr_0"].dtype == np.uint8


def test_bad_flags_are_one_line_errors(digits, tmp_path):
    proc = _train("DIGITS_PD.yaml", digits, tmp_path / "pd", ok=False)
    assert proc.returncode != 0 and "needs base_ckpt" in proc.stderr.strip().splitlines()[-1]
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: base\nlerning_rate: 0.1\n")
    proc = _run(["scripts/rcfd_train.py", "--config", str(bad), "--data_dir", digits, "--logdir",
                 str(tmp_path / "b")], ok=False)
    assert proc.returncode == 2 and "unknown key 'lerning_rate'" in proc.stderr
    proc = _train("DIGITS_BASE.yaml", digits, tmp_path / "none", "--resume", ok=False)
    assert proc.returncode == 2 and "train_state.pt does not exist" in proc.stderr
    used = tmp_path / "used"
    used.mkdir()
    (used / "ckpt.pt").write_bytes(b"a finished run's model")
    proc = _train("DIGITS_BASE.yaml", digits, used, ok=False)
    assert proc.returncode == 2 and "already holds a ckpt.pt; pass --resume" in proc.stderr
    assert (used / "ckpt.pt").read_bytes() == b"a finished run's model"


def test_rdd_classifier_layout_trains_and_loads(tmp_path):
    """scripts/classifier_train.py --layout rdd writes the authors' {"model": state_dict} file."""
    from guided_diffusion.distill.densenet import load_densenet

    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"
    np.savez(data, rng.integers(0, 255, (16, 16, 16, 3), dtype=np.uint8), np.arange(16) % 10)
    out = tmp_path / "densenet121" / "ckpt.pt"
    _run(["scripts/classifier_train.py", "--layout", "rdd", "--model", "densenet121", "--image_size", "16",
          "--epochs", "1", "--batch_size", "8", "--data_dir", str(data), "--output", str(out)])
    assert set(torch.load(out, weights_only=True)) == {"model"}
    assert load_densenet(str(out.parent), "densenet121").feature_channels == 1024
    proc = _run(["scripts/classifier_train.py", "--layout", "rdd", "--model", "densenet99",
                 "--image_size", "16", "--data_dir", str(data), "--output", str(out)], ok=False)
    assert proc.returncode == 2 and "unknown DenseNet 'densenet99'" in proc.stderr


@pytest.mark.mpi
def test_two_ranks_train_an_rdd_stage_in_sync_and_resume_every_rank_exactly(digits, tmp_path):
    """mpiexec -n 2 on CPU: DDP student, the gathered queue keys, per-rank BatchNorm in the memory head
    (SyncBatchNorm needs CUDA), each rank's data shard; both ranks end with the same student. Each rank's
    queue is its own random pick of the gathered keys, so a run cut after step 2 and resumed must give every
    rank back its own memory: both ranks then end equal to an uninterrupted run's."""
    base = tmp_path / "base"
    _train("DIGITS_BASE.yaml", digits, base, "--total_steps", "1", "--save_step", "1", *TINY)
    classifier = tmp_path / "cls"
    classifier.mkdir()
    torch.manual_seed(0)
    save_densenet(build_densenet("densenet121"), str(classifier / "ckpt.pt"))
    dump = tmp_path / "dump.py"
    dump.write_text(
        "import os, runpy, sys, torch\n"
        "from guided_diffusion import dist_util\n"
        "from guided_diffusion.distill import rcfd_run\n"
        "run = rcfd_run.StageTrainer.run\n"
        "def run_and_dump(self):\n"
        "    if os.environ.get('CUT_AT'):\n"
        "        while self.step < int(os.environ['CUT_AT']):\n"
        "            self.train_step()\n"
        "        self.save()\n"
        "        return\n"
        "    run(self)\n"
        "    torch.save({'model': self.model.state_dict(), 'memory': self.objective.memory.state_dict()},\n"
        "               os.path.join(self.logdir, f'rank{dist_util.get_rank()}.pt'))\n"
        "rcfd_run.StageTrainer.run = run_and_dump\n"
        "sys.argv[0] = 'scripts/rcfd_train.py'\n"
        "runpy.run_path('scripts/rcfd_train.py', run_name='__main__')\n"
    )

    def launch(logdir, *extra, cut_at=""):
        args = ["--config", "yaml/digits_16/rcfd/DIGITS_RDD.yaml", "--data_dir", digits, "--logdir",
                str(logdir), "--base_ckpt", str(base), "--classifier_path", str(classifier),
                "--classifier", "densenet121", "--total_steps", "4", "--save_step", "2", *TINY, *extra]
        proc = subprocess.run([MPIEXEC, "-n", "2", PY, str(dump), *args], cwd=REPO, capture_output=True,
                              text=True, timeout=300, env={**ENV, "CUT_AT": cut_at})
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return [torch.load(logdir / f"rank{r}.pt", weights_only=True) for r in (0, 1)] if not cut_at else None

    full = launch(tmp_path / "full")
    launch(tmp_path / "cut", cut_at="2")
    resumed = launch(tmp_path / "cut", "--resume")
    assert all(torch.equal(full[0]["model"][k], full[1]["model"][k]) for k in full[0]["model"])
    queue = "teacher_pixel_queue"
    assert not torch.equal(full[0]["memory"][queue], full[1]["memory"][queue])  # the ranks' queues differ
    for rank in (0, 1):
        for part in ("model", "memory"):
            a, b = full[rank][part], resumed[rank][part]
            assert all(torch.equal(a[k], b[k]) for k in a), f"rank {rank} {part} differs after the resume"
    assert "per-rank BatchNorm statistics" in (tmp_path / "full" / "log.txt").read_text()


def test_eval_scores_fid_against_the_fid_cache_and_refuses_a_missing_one(digits, tmp_path, monkeypatch):
    """ddim_eval.py scores FID in-script against --fid_cache (pytorch-fid mu/sigma); rcfd_eval does the
    same through the evaluator (checked here with the digits features in place of Inception), and a
    cache that is not there stops the command before any sampling."""
    import importlib.util
    import json

    from evaluations import metrics
    from evaluations.feature_extractors import get_feature_extractor

    proc = _run(["scripts/rcfd_eval.py", "--config", "yaml/digits_16/rcfd/DIGITS_EVAL.yaml", "--logdir",
                 str(tmp_path), "--fid_cache", str(tmp_path / "none.npz")], ok=False)
    assert proc.returncode == 2 and "--fid_cache" in proc.stderr.strip().splitlines()[-1]
    spec = importlib.util.spec_from_file_location("_rcfd_eval", REPO / "scripts" / "rcfd_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    digits_features = get_feature_extractor("digits", "cpu")
    monkeypatch.setattr(module, "get_feature_extractor", lambda *args: digits_features)
    images = np.load(digits)["arr_0"][:20]
    dims = digits_features.features(images[:2])["pool"].shape[1]
    cache = tmp_path / "cifar10.train.npz"
    np.savez(cache, mu=np.zeros(dims), sigma=np.eye(dims))
    module.logger.configure(str(tmp_path), format_strs=["log"])
    np.savez(tmp_path / "s.npz", images)  # the sample batch rcfd_eval has just written
    module.score_against_cache(images, str(tmp_path / "s.npz"), str(cache), None, str(tmp_path))
    written = json.loads((tmp_path / "metrics.json").read_text())
    stats = metrics.compute_statistics(digits_features.features(images)["pool"])
    assert written["fid"] == pytest.approx(metrics.frechet_distance(*stats, np.zeros(dims), np.eye(dims)))
