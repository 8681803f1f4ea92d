"""TCCD in the DKDM loop: configs, the real loop's interactive teacher query and gradients, and a script run
that trains, saves (its heads in the opt file), resumes exactly and samples."""

import csv
import subprocess

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from script_env import ENV, PY, REPO

from guided_diffusion import logger
from guided_diffusion.config import load_config, model_and_diffusion_kwargs
from guided_diffusion.distill import tccd as tccd_method
from guided_diffusion.distill.dkdm.setup import load_teacher, make_dynamic_batch
from guided_diffusion.distill.loop import KDTrainLoop
from guided_diffusion.distill.objective import RunParts, find_method
from guided_diffusion.distill.run import method_sections
from guided_diffusion.distill.tccd import TCCDObjective
from guided_diffusion.distill.tccd import defaults as tccd_defaults
from guided_diffusion.infra.checkpoint import CheckpointMismatchError
from guided_diffusion.run_setup import load_model_weights
from guided_diffusion.script_util import create_model_and_diffusion

torch.set_num_threads(1)  # the CI box has 2 shared cores; more threads only contend


TCCD_CONFIGS = {  # TCCD config -> the DKDM config it extends
    **{f"cifar10_32/exp/CIFAR10-{s}M-TCCD-0.4.yaml": f"cifar10_32/exp/CIFAR10-{s}M-Dynamic-0.4.yaml"
       for s in (14, 24, 32, 44, 57)},
    "celeba_64/exp/CelebA64-57M-TCCD-0.4.yaml": "celeba_64/exp/CelebA64-57M-Dynamic-0.4.yaml",
    "imagenet_32/exp/ImageNet32-14M-TCCD-0.4.yaml": "imagenet_32/exp/ImageNet32-14M-Dynamic-0.4.yaml",
    "digits_16/exp/Digits-TCCD.yaml": "digits_16/exp/Digits-DKDM.yaml",
}


@pytest.mark.parametrize("tccd_path", sorted(TCCD_CONFIGS))
def test_tccd_yaml_is_its_dkdm_config_plus_every_tccd_knob(tccd_path):
    tccd, dkdm = load_config(REPO / "yaml" / tccd_path), load_config(REPO / "yaml" / TCCD_CONFIGS[tccd_path])
    assert dict(tccd.tccd) == tccd_defaults()
    written = OmegaConf.load(REPO / "yaml" / tccd_path).tccd
    assert set(written) == set(tccd_defaults())  # every knob spelled out for users
    assert tccd.teacher == dkdm.teacher and tccd.student == dkdm.student
    assert list(method_sections(tccd)) == ["tccd"] and method_sections(dkdm) == {}
    assert find_method("tccd").build is tccd_method.build


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A random tiny teacher checkpoint (non-zero eps) and tiny_kd.yaml + a tccd section (interactive every
    2 steps)."""
    root = tmp_path_factory.mktemp("tccd")
    base = load_config(REPO / "tests/configs/tiny_kd.yaml")
    torch.manual_seed(0)
    teacher, _ = create_model_and_diffusion(**model_and_diffusion_kwargs(base.teacher))
    torch.nn.init.normal_(teacher.out[-1].weight, std=0.05)  # a zero output layer would predict eps = 0
    torch.save(teacher.state_dict(), root / "teacher.pt")
    raw = OmegaConf.load(REPO / "tests/configs/tiny_kd.yaml")
    raw.teacher.model_path = str(root / "teacher.pt")
    raw.teacher.tempfile = str(root / "pool.cache")
    raw.tccd = {"interactive_every": 2, "proj_dim": 16, "encoder_channels": 8}
    config = root / "tiny_tccd.yaml"
    OmegaConf.save(raw, config)
    return root, config


class RecordingTeacher(torch.nn.Module):
    """Wraps the teacher and, while `recording`, keeps every (x, t) it is called with."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.recording = False
        self.calls = []

    def forward(self, x, t, **kwargs):
        if self.recording:
            self.calls.append((x.clone(), t.clone()))
        return self.inner(x, t, **kwargs)


def _loop(cfg, tmp_path, **tccd):
    logger.configure(str(tmp_path / "run"), format_strs=[])
    device = torch.device("cpu")
    teacher, teacher_diffusion = load_teacher(cfg.teacher, device)
    teacher = RecordingTeacher(teacher)
    torch.manual_seed(1)
    student, student_diffusion = create_model_and_diffusion(**model_and_diffusion_kwargs(cfg.student))
    pool = make_dynamic_batch(cfg.teacher, cfg.student, teacher, teacher_diffusion, student_diffusion, device)
    pool.prepare(progress=False)
    parts = RunParts(
        teacher=teacher, teacher_diffusion=teacher_diffusion, student=student,
        student_diffusion=student_diffusion, cfg=cfg, device=device, pool=pool,
    )
    objective = tccd_method.build({**dict(cfg.tccd), **tccd}, parts)
    assert isinstance(objective, TCCDObjective) and objective.base
    loop = KDTrainLoop(
        objectives={"tccd": objective},
        teacher=teacher, teacher_diffusion=teacher_diffusion, dynamic_batch=pool,
        model=student, diffusion=student_diffusion, batch_size=pool.batch_size, microbatch=-1, lr=1e-3,
        ema_rate="0.9999", log_interval=0, save_interval=0, resume_checkpoint="",
        run_dir=str(tmp_path / "run"),
    )
    return loop, teacher


def test_interactive_branch_queries_teacher_at_t_minus_1_on_students_own_state(files, tmp_path):
    _, config = files
    loop, teacher = _loop(load_config(config), tmp_path, interactive_every=1)
    x_t, cond = loop.next_batch()
    cond["t"] = torch.tensor([5, 0, 12, 1])  # one item at t = 0 has no next state
    rng = torch.get_rng_state()
    teacher.recording = True
    _, terms = loop.compute_losses(x_t, cond)
    teacher.recording = False
    assert len(teacher.calls) == 1
    seen_x, seen_t = teacher.calls[0]
    assert seen_t.tolist() == [4, 11, 0]
    torch.set_rng_state(rng)  # the student's own step draws its noise first, from the global generator
    with torch.no_grad():
        own = loop.diffusion.p_sample(loop.model, x_t, cond["t"], clip_denoised=True)["sample"]
    torch.testing.assert_close(seen_x, own[[0, 2, 3]])
    assert not torch.allclose(seen_x, x_t[[0, 2, 3]])
    assert terms["tccd_interactive_items"].item() == 3 and terms["tccd_interactive"] > 0


def test_gradients_reach_heads_and_student_time_embedding_and_heads_train(files, tmp_path):
    _, config = files
    loop, _ = _loop(load_config(config), tmp_path)
    heads = dict(loop.base.named_parameters())
    assert {n for n in heads if n.startswith("loss.alignment.")} == set(heads)
    assert "loss.alignment.logit_scale" in heads
    optimized = {id(p) for p in loop.mp_trainer.params}
    assert all(id(p) in optimized for p in heads.values())
    batch = loop.next_batch()
    loop.forward_backward(*batch)
    for name, p in heads.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # The student's output layer starts at zero, so its time embedding is reached only through the alignment.
    for name, p in loop.model.time_embed.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    before = {n: p.detach().clone() for n, p in heads.items()}
    loop.run_step(*batch)
    assert all(not torch.equal(before[n], p) for n, p in heads.items())


def test_tccd_state_lives_in_the_opt_file_not_the_model(files, tmp_path):
    _, config = files
    loop, _ = _loop(load_config(config), tmp_path)
    assert not any(k.startswith(("tccd.", "loss.")) for k in loop.model.state_dict())
    assert set(loop.extra_modules) == {"tccd"}
    student, _ = create_model_and_diffusion(**model_and_diffusion_kwargs(load_config(config).student))
    stray = {**loop.model.state_dict(), "tccd.alignment.logit_scale": torch.zeros(())}
    torch.save(stray, tmp_path / "bad.pt")
    with pytest.raises(CheckpointMismatchError, match=r"bad\.pt.*1 unexpected"):
        load_model_weights(student, str(tmp_path / "bad.pt"))


def _run(script, args, timeout=180):
    proc = subprocess.run(
        [PY, script, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=ENV
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _progress(run_dir):
    with open(run_dir / "progress.csv") as f:
        return {int(float(r["step"])): r for r in csv.DictReader(f)}


def test_tccd_script_trains_saves_resumes_exactly_and_samples(files, tmp_path):
    _, config = files
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    short = ["--config", str(config), "--max_steps", "4", "--save_interval", "2"]
    _run("scripts/image_kd.py", [*short, "--exp_dir", str(full)])
    opt = torch.load(full / "opt000004.pt", weights_only=True)
    assert any(k.startswith("loss.alignment.") for k in opt["extra_modules"]["tccd"])
    rows = _progress(full)
    assert sorted(rows) == [1, 2, 3, 4]
    for key in ("loss", "kd", "tccd_align", "tccd_align_acc", "tccd_tau"):
        assert all(rows[s][key] != "" for s in rows), key
    assert 0.01 <= float(rows[1]["tccd_tau"]) <= 1.0
    # interactive every 2 steps: steps 0 and 2 (logged as 1 and 3)
    assert [s for s in rows if rows[s].get("tccd_interactive", "") != ""] == [1, 3]

    resume = ["--resume_checkpoint", str(full / "model000002.pt")]
    _run("scripts/image_kd.py", [*short, "--exp_dir", str(resumed), *resume])
    a = torch.load(full / "model000004.pt", weights_only=True)
    b = torch.load(resumed / "model000004.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = _progress(resumed)
    assert sorted(again) == [3, 4]
    for step in (3, 4):
        for key in ("loss", "kd", "tccd_align", "tccd_tau"):
            assert again[step][key] == rows[step][key], (step, key)

    out = tmp_path / "samples"
    _run("scripts/image_sample.py", [
        "--config", str(config), "--model_path", str(full / "ema_0.9999_000004.pt"), "--batch_size", "2",
        "--num_samples", "2", "--timestep_respacing", "3", "--use_ddim", "False", "--output_dir", str(out),
    ])
    with np.load(out / "samples_2x16x16x3.npz") as npz:
        assert npz["arr_0"].shape == (2, 16, 16, 3) and npz["arr_0"].dtype == np.uint8


def test_tccd_and_relational_compose_in_one_run(files, tmp_path):
    """A config with both sections: TCCD is the base, the relational term reads the student's output and
    features of the pool's items (not the interactive ones) and both terms are logged and trained."""
    from guided_diffusion.distill.run import build_run

    _, config = files
    raw = OmegaConf.load(config)
    raw.relational = {"queue_size": 64, "num_anchors": 16}
    OmegaConf.save(raw, tmp_path / "both.yaml")
    logger.configure(str(tmp_path / "run"), format_strs=[])
    loop = build_run(load_config(tmp_path / "both.yaml"), str(tmp_path / "run"), device=torch.device("cpu"))
    assert isinstance(loop.base, TCCDObjective) and set(loop.extras) == {"relational"}
    assert set(loop.extra_modules) == {"tccd", "relational"}
    seen = {}
    original = loop.extras["relational"].forward

    def spy(student, batch):
        seen["n"] = batch["student_output"].shape[0]
        seen["feature_n"] = batch["student_features"]["middle"].shape[0]
        return original(student, batch)

    loop.extras["relational"].forward = spy
    loop.step = 0  # interactive every 2 steps: step 0 appends the students' own states
    loss, terms = loop.compute_losses(*loop.next_batch())
    assert seen == {"n": 4, "feature_n": 4}
    assert {"kd", "tccd_align", "tccd_interactive", "relational_loss"} <= set(terms)
    assert torch.isfinite(loss) and loss.ndim == 0
