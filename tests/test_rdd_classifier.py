"""RDD's classifier with the authors' recipe (scripts/rdd_classifier_train.py): Cutout, the step schedule,
best-test-accuracy selection, and a tiny end-to-end run whose ckpt.pt RDD's loader reads."""

from __future__ import annotations

import importlib.util
import subprocess

import numpy as np
import torch
from script_env import ENV, PY, REPO

from guided_diffusion import logger
from guided_diffusion.distill.classifier import train_with_test_selection
from guided_diffusion.distill.densenet import load_densenet

spec = importlib.util.spec_from_file_location("_rdd_train", REPO / "scripts" / "rdd_classifier_train.py")
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)


def test_cutout_zeroes_one_clipped_square():
    np.random.seed(3)
    out = script.Cutout(1, 16)(torch.ones(3, 32, 32))
    zero = out[0] == 0
    rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
    assert 0 < len(rows) <= 16 and 0 < len(cols) <= 16
    assert int(zero.sum()) == len(rows) * len(cols)  # one rectangle, the same on every channel
    assert torch.equal(out[0], out[2])


def test_schedule_divides_the_lr_at_half_and_three_quarters_and_keeps_the_best(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long()
    loader = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    model = torch.nn.Linear(4, 2)
    saved = []
    logger.configure(str(tmp_path), format_strs=["log"])
    best = train_with_test_selection(model, loader, loader, epochs=8, lr=0.1, weight_decay=0.0, device="cpu",
                                     save_best=lambda m: saved.append(m.weight.detach().clone()))
    logger.configure(str(tmp_path / "other"), format_strs=["log"])
    lines = [line for line in (tmp_path / "log.txt").read_text().splitlines() if line.startswith("epoch")]
    lrs = [float(line.split("lr ")[1].split(" ")[0]) for line in lines]
    assert lrs == [0.1] * 4 + [0.01] * 2 + [0.001] * 2
    accuracies = [float(line.split("test acc ")[1].split("%")[0]) for line in lines]
    improvements = sum(1 for i, a in enumerate(accuracies) if a > max([0.0, *accuracies[:i]]))
    assert len(saved) == improvements and round(best * 100, 2) == max(accuracies) and best > 0.9


def test_tiny_run_writes_the_best_ckpt_rdd_reads(tmp_path):
    from datasets.digits import write_digits

    with np.load(write_digits(tmp_path / "digits")["train"]) as data:
        images, labels = data["arr_0"], data["arr_1"]
    np.savez(tmp_path / "train.npz", images[:48], labels[:48])
    np.savez(tmp_path / "test.npz", images[48:64], labels[48:64])
    cmd = [PY, str(REPO / "scripts" / "rdd_classifier_train.py"), "--model", "densenet121", "--epoch", "1",
           "--train_npz", str(tmp_path / "train.npz"), "--test_npz", str(tmp_path / "test.npz"),
           "--num_workers", "0", "--batchsize", "16", "--seed", "0"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    path = tmp_path / "classifier" / "result" / "cifar10" / "densenet121"
    assert "best test accuracy" in (path / "log.txt").read_text()
    load_densenet(str(path), "densenet121")
