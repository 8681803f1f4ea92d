"""Step distillation and RDD end to end on a tiny config (in-process script calls): PD, RDD on UNet
features and RDD with a tiny classifier each train, save, resume exactly and sample with DDIM on the halved
grid; DKDM with a `relational:` section trains; classifier_train runs on a tiny npz; the digits stage
configs resolve against the shipped teacher."""

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from guided_diffusion import dist_util
from guided_diffusion.config import load_config, model_and_diffusion_kwargs
from guided_diffusion.infra.checkpoint import safe_torch_load
from guided_diffusion.script_util import create_model_and_diffusion

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
TINY_CLASSIFIER = '{"growth_rate": 4, "block_config": [1, 1], "bn_size": 2}'


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _leave_process_group():
    yield
    dist_util.cleanup()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny teacher checkpoint (20-step diffusion, sampled on ddim4), a labeled npz and a stage YAML."""
    root = tmp_path_factory.mktemp("rdd")
    base = load_config(REPO / "tests/configs/tiny_baseline.yaml")
    torch.manual_seed(0)
    teacher, _ = create_model_and_diffusion(**model_and_diffusion_kwargs(base))
    with torch.no_grad():
        teacher.out[-1].weight.normal_(0, 0.02)
    torch.save(teacher.state_dict(), root / "teacher.pt")
    rng = np.random.default_rng(0)
    np.savez(root / "data.npz", rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8), rng.integers(0, 3, 12))
    section = {"model": "tests/configs/tiny_arch.yaml", "diffusion": "tests/configs/tiny_diffusion.yaml"}
    stage = {
        "teacher": {**section, "model_path": str(root / "teacher.pt"), "timestep_respacing": "ddim4"},
        "student": {
            **section, "timestep_respacing": "ddim2", "data_dir": str(root / "data.npz"), "batch_size": 4,
            "lr": 5e-5, "grad_clip": 1.0, "max_steps": 4, "lr_schedule": "cosine", "save_interval": 2,
            "log_interval": 1, "ema_rate": "0.9",
        },
        "step_distill": {"student_prediction": "eps"},
    }
    OmegaConf.save(OmegaConf.create(stage), root / "pd.yaml")
    return root


def _write(root: Path, name: str, extra: dict) -> Path:
    cfg = OmegaConf.merge(OmegaConf.load(root / "pd.yaml"), extra)
    OmegaConf.save(cfg, root / name)
    return root / name


def _losses(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "progress.csv") as f:
        return list(csv.DictReader(f))


def _train_resume_sample(config: Path, run: Path, extra_args: tuple[str, ...] = ()) -> list[dict[str, str]]:
    kd = _script("step_distill")
    kd.main(["--config", str(config), "--exp_dir", str(run / "a"), *extra_args])
    dist_util.cleanup()
    kd.main(["--config", str(config), "--exp_dir", str(run / "b"), *extra_args,
             "--resume_checkpoint", str(run / "a" / "model000002.pt")])
    dist_util.cleanup()
    for name in ("model000004.pt", "ema_0.9_000004.pt"):
        first, resumed = safe_torch_load(run / "a" / name), safe_torch_load(run / "b" / name)
        assert all(torch.equal(first[k], resumed[k]) for k in first), name
    opt_a, opt_b = safe_torch_load(run / "a" / "opt000004.pt"), safe_torch_load(run / "b" / "opt000004.pt")
    for key, value in opt_a["extra_modules"].get("relational", {}).items():
        assert torch.equal(value, opt_b["extra_modules"]["relational"][key]), key
    teacher = safe_torch_load(config.parent / "teacher.pt")
    student = safe_torch_load(run / "a" / "model000004.pt")
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)  # it trained from the teacher
    _script("image_sample").main([
        "--config", str(config), "--model_path", str(run / "a" / "model000004.pt"), "--num_samples", "2",
        "--batch_size", "2", "--timestep_respacing", "ddim2", "--use_ddim", "True",
        "--output_dir", str(run / "samples"),
    ])
    arr = np.load(run / "samples" / "samples_2x16x16x3.npz")["arr_0"]
    assert arr.shape == (2, 16, 16, 3) and arr.dtype == np.uint8
    rows = _losses(run / "a")
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    return rows


def test_pd_trains_resumes_and_samples(files, tmp_path):
    rows = _train_resume_sample(files / "pd.yaml", tmp_path)
    assert float(rows[0]["mse"]) > 0 and "rel_p2p" not in rows[0]


def test_rdd_unet_features(files, tmp_path):
    config = _write(files, "rdd_unet.yaml", {"relational": {
        "feature_source": "unet", "unet_feature": "middle", "queue_size": 64, "num_anchors": 16,
        "enqueue_per_step": 8,
    }})
    rows = _train_resume_sample(config, tmp_path)
    assert float(rows[-1]["rel_p2p"]) > 0 and float(rows[-1]["rel_memory"]) > 0


def test_classifier_train_and_rdd_classifier(files, tmp_path):
    clf = tmp_path / "clf.pt"
    _script("classifier_train").main([
        "--data_dir", str(files / "data.npz"), "--model", "densenet121", "--model_kwargs", TINY_CLASSIFIER,
        "--num_classes", "3", "--image_size", "16", "--epochs", "2", "--batch_size", "4",
        "--output", str(clf),
    ])
    payload = safe_torch_load(clf)
    assert payload["model_name"] == "densenet121" and payload["num_classes"] == 3
    config = _write(files, "rdd_clf.yaml", {
        "relational": {"feature_source": "classifier", "queue_size": 64, "num_anchors": 16},
        "step_distill": {"classifier_path": str(clf)},
    })
    rows = _train_resume_sample(config, tmp_path)
    assert float(rows[-1]["rel_logit"]) >= 0 and float(rows[-1]["rel_p2p"]) > 0


def test_classifier_train_rejects_unlabeled_data(tmp_path):
    np.savez(tmp_path / "nolabels.npz", np.zeros((4, 16, 16, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="labels"):
        _script("classifier_train").main([
            "--data_dir", str(tmp_path / "nolabels.npz"), "--model", "densenet121",
            "--model_kwargs", TINY_CLASSIFIER, "--image_size", "16", "--epochs", "1", "--batch_size", "2",
            "--output", str(tmp_path / "x.pt"),
        ])


def test_dkdm_with_relational_section(files, tmp_path):
    raw = OmegaConf.load(REPO / "tests/configs/tiny_kd.yaml")
    raw.teacher.model_path = str(files / "teacher.pt")
    raw.teacher.tempfile = str(tmp_path / "pool.cache")
    raw.student.max_steps = 2
    raw.student.save_interval = 2
    raw.relational = {"feature_source": "unet", "unet_feature": "middle", "queue_size": 64, "num_anchors": 16}
    OmegaConf.save(raw, tmp_path / "kd_rel.yaml")
    _script("image_kd").main(["--config", str(tmp_path / "kd_rel.yaml"), "--exp_dir", str(tmp_path / "run")])
    rows = _losses(tmp_path / "run")
    assert float(rows[-1]["relational_p2p"]) > 0
    opt = safe_torch_load(tmp_path / "run" / "opt000002.pt")
    assert "relation.memory.queue" in opt["extra_modules"]["relational"]


def test_stage_flags_and_bad_grids(files, tmp_path, capsys):
    kd, pd = _script("step_distill"), str(files / "pd.yaml")
    with pytest.raises(SystemExit):
        kd.main(["--config", pd, "--exp_dir", str(tmp_path / "bad"), "--teacher_steps", "6"])
    assert "--teacher_steps 6: 'trailing6': N must be >= 1 and divide the 20 steps" in capsys.readouterr().err
    bad_grid = _write(files, "bad_grid.yaml", {"teacher": {"timestep_respacing": "ddim10"}})
    with pytest.raises(ValueError, match="two teacher steps"):
        kd.main(["--config", str(bad_grid), "--exp_dir", str(tmp_path / "bad2")])
    dist_util.cleanup()
    with pytest.raises(SystemExit):
        kd.main(["--config", pd, "--exp_dir", str(tmp_path / "odd"), "--teacher_steps", "3"])
    assert "even number" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["Digits-PD-8to4.yaml", "Digits-RDD-8to4.yaml"])
def test_digits_stage_configs_build_on_the_shipped_teacher(name):
    """The digits stages resolve, nest trailing8 -> trailing4 and load the shipped teacher (a few CPU steps of
    them are what the lead's GPU run repeats at full length)."""
    from guided_diffusion.distill.dkdm.setup import load_teacher
    from guided_diffusion.distill.progressive import StepDistiller
    from guided_diffusion.run_setup import build_model_and_diffusion

    cfg = load_config(REPO / "yaml/digits_16/exp/rdd" / name)
    if not (REPO / cfg.teacher.model_path).is_file():
        pytest.fail(f"shipped teacher missing: {cfg.teacher.model_path}")
    teacher, teacher_diffusion = load_teacher(cfg.teacher, torch.device("cpu"))
    _, student_diffusion = build_model_and_diffusion(cfg.student, "cpu")
    distiller = StepDistiller(teacher, teacher_diffusion, student_diffusion, cfg.step_distill)
    assert distiller.plan.tolist() == [1, 3, 5, 7]  # trailing8 -> trailing4
