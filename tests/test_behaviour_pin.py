"""Behaviour pin: tiny fixed-seed CPU DKDM and TCCD runs through scripts/image_kd.py, their 50 logged losses
and the SHA-256 of the final student weights, recorded before the training loop was reorganised. A refactor
that changes any number a run computes fails here."""

import csv
import hashlib
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from script_env import ENV, PY, REPO, TINY_KD

from guided_diffusion.config import load_config, model_and_diffusion_kwargs
from guided_diffusion.script_util import create_model_and_diffusion

STEPS = 50
EXPECTED = {
    "dkdm": {
        "losses": [
            0.9036414623260498, 0.6377120018005371, 0.47362834215164185, 206.9740753173828,
            0.4330921173095703, 0.5109680891036987, 0.9279398918151855, 0.523526132106781,
            0.3706120252609253, 0.9120177030563354, 0.545866072177887, 0.537408173084259,
            0.3402109742164612, 0.7666682004928589, 229.19207763671875, 0.3800804615020752,
            0.35655879974365234, 0.4146551191806793, 0.40018874406814575, 0.36133384704589844,
            225.84320068359375, 226.47584533691406, 1.1086466312408447, 0.48097822070121765,
            0.36528921127319336, 246.23033142089844, 0.4879472851753235, 0.33908024430274963,
            0.9142276644706726, 0.47433918714523315, 0.43832048773765564, 0.9063867926597595,
            0.5392577052116394, 0.37236812710762024, 0.8468543291091919, 0.4946504235267639,
            0.30352118611335754, 222.5771026611328, 0.6805659532546997, 0.9725298881530762,
            0.9904642701148987, 0.311685174703598, 0.4244411289691925, 0.5312278270721436,
            0.3580067753791809, 0.49172624945640564, 0.4343501925468445, 0.5380197763442993,
            0.470403254032135, 0.45273202657699585,
        ],
        "sha256": "5c7eb9c83fec2d2175b513d91a99a2e37ebd53ff119d372d80f6ef58d1ef31b7",
    },
    "tccd": {
        "losses": [
            1.4672915935516357, 0.7955711483955383, 0.8613878488540649, 206.72808837890625,
            0.8057689666748047, 0.6544417142868042, 1.356618881225586, 0.6650977730751038,
            0.6965396404266357, 1.0481833219528198, 0.8910335898399353, 0.6771420240402222,
            0.6523733139038086, 0.9040836691856384, 229.2165985107422, 0.519770085811615,
            0.6703256368637085, 0.5527697205543518, 0.7319731712341309, 0.5002652406692505,
            226.2975616455078, 227.13490295410156, 1.5761826038360596, 0.617731511592865,
            0.6766757369041443, 246.18507385253906, 0.8423189520835876, 0.47383585572242737,
            1.3583588600158691, 0.6052756309509277, 0.8109429478645325, 1.0409090518951416,
            0.9287551045417786, 0.5085553526878357, 1.2399402856826782, 0.630426824092865,
            0.6062255501747131, 222.3404083251953, 1.067732572555542, 1.1111971139907837,
            1.428789734840393, 0.44818317890167236, 0.750641942024231, 0.6683318018913269,
            0.710792601108551, 0.626930832862854, 0.8488140106201172, 0.6726914644241333,
            0.9125055074691772, 0.5878264904022217,
        ],
        "sha256": "976c8cf5583838a3164b42c2abeb225e22dae501dfd696838496159951c105b8",
    },
}


def weights_sha256(path: Path) -> str:
    """SHA-256 over the state dict's keys, dtypes, shapes and raw bytes, in the file's key order."""
    digest = hashlib.sha256()
    for key, value in torch.load(path, map_location="cpu", weights_only=True).items():
        tensor = value.detach().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def run_pinned(method: str, root: Path) -> dict:
    """Write a seed-0 tiny teacher (non-zero output layer) and run `method` for STEPS steps from it."""
    base = load_config(TINY_KD)
    torch.manual_seed(0)
    teacher, _ = create_model_and_diffusion(**model_and_diffusion_kwargs(base.teacher))
    torch.nn.init.normal_(teacher.out[-1].weight, std=0.05)
    torch.save(teacher.state_dict(), root / "teacher.pt")
    raw = OmegaConf.load(TINY_KD)
    raw.teacher.model_path, raw.teacher.tempfile = str(root / "teacher.pt"), str(root / "pool.cache")
    raw.student.update({"max_steps": STEPS, "save_interval": STEPS, "log_interval": 1, "lr": 0.001})
    if method == "tccd":
        raw.tccd = {"interactive_every": 2, "proj_dim": 16, "encoder_channels": 8}
    OmegaConf.save(raw, root / "run.yaml")
    run_dir = root / "run"
    proc = subprocess.run(
        [PY, "scripts/image_kd.py", "--config", str(root / "run.yaml"), "--exp_dir", str(run_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(run_dir / "progress.csv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    return {"losses": losses, "sha256": weights_sha256(run_dir / f"model{STEPS:06d}.pt")}


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_tiny_run_reproduces_its_pinned_losses_and_weights(method, tmp_path):
    got = run_pinned(method, tmp_path)
    assert len(got["losses"]) == STEPS
    assert got["losses"] == pytest.approx(EXPECTED[method]["losses"], rel=1e-6, abs=0)
    assert got["sha256"] == EXPECTED[method]["sha256"]
