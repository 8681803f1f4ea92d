"""Bad inputs through the real entry points: hostile pickles, truncated files, wrong checkpoints, config and
CLI mistakes, broken image npz files. Each must fail fast with a clear error naming the file or value, run no
foreign code, and leave its input untouched; config mistakes must fail before a run dir or model exists."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from script_env import ENV, MPIEXEC, PY, REPO, write_kd_yaml, write_tiny_checkpoints

from evaluations import evaluator
from guided_diffusion.config import ConfigError, load_config, model_and_diffusion_kwargs
from guided_diffusion.distill.dkdm.cache import CacheError, load_cache, save_cache
from guided_diffusion.image_datasets import DataError, load_data
from guided_diffusion.infra.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    load_state_dict_strict,
    safe_torch_load,
)
from guided_diffusion.script_util import create_model_and_diffusion


class _Payload:
    """Unpickling this would run a shell command that creates `marker` (what a hostile download does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Random tiny teacher/student checkpoints, a valid pool cache and a KD YAML template."""
    root = tmp_path_factory.mktemp("bad")
    checkpoints = write_tiny_checkpoints(root)
    rng = np.random.default_rng(0)
    save_cache(str(root / "pool.cache"), rng.integers(0, 21, 32), rng.standard_normal((32, 3, 16, 16)))
    return {"root": root, **checkpoints, "pool": root / "pool.cache"}


def _kd_yaml(
    files: dict[str, Path], path: Path, teacher: dict | None = None, student: dict | None = None
) -> Path:
    return write_kd_yaml(path, files["teacher"], files["pool"], teacher, {"max_steps": 1, **(student or {})})


def _script(script: str, args: list[str], mpi: int = 0, timeout: int = 120) -> tuple[int, str]:
    """Run a script; return its exit code and stderr."""
    cmd = [PY, f"scripts/{script}", *args]
    if mpi:
        cmd = [MPIEXEC, "-n", str(mpi), *cmd]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=ENV)
    return proc.returncode, proc.stderr


def _last_line(stderr: str) -> str:
    """The last stderr line without the `[rankN]: ` prefix torch.distributed adds to uncaught errors."""
    lines = [re.sub(r"^\[rank\d+\]:\s?", "", line) for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _fingerprint(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


# ------------------------------------------------------------------------- config and CLI, before any work

CONFIG_CASES = {
    "unknown_key": ({}, {"learning_rate": 0.1},
                    "unknown key 'learning_rate' in student (did you mean 'lr'?)"),
    "wrong_type": ({}, {"batch_size": "four"}, "key 'batch_size' in student must be an int, got str 'four'"),
    "bad_respacing": ({}, {"timestep_respacing": "25"},
                      "timestep_respacing '25' in student is invalid for diffusion_steps 20"),
    "missing_teacher": ({"model_path": "{root}/absent_teacher.pt"}, {},
                        "model_path in teacher does not exist: {root}/absent_teacher.pt"),
    "empty_teacher": ({"model_path": ""}, {}, "model_path in teacher is empty"),
    "missing_student_init": ({}, {"model_path": "{root}/absent_student.pt"},
                             "model_path in student does not exist: {root}/absent_student.pt"),
    "ema_above_one": ({}, {"ema_rate": "1.5"}, "ema_rate '1.5' in student: rates must be in [0, 1), got 1.5"),
    "lr_nan": ({}, {"lr": float("nan")}, "lr nan in student must be finite and in (0.0, inf)"),
    "head_channels": ({}, {"num_head_channels": 7}, "model in student: channels 32 not divisible by"),
    "attention_off_level": ({"attention_resolutions": "5"}, {}, "model in teacher: attention_resolutions="),
}

# Values issue 19 found accepted (or refused only after the run dir existed), refused at load now.
LATE_VALUES = {
    "ema_rate": ("1.5", "rates must be in [0, 1)"),
    "max_steps": (-5, "max_steps -5 in student must be finite and in [0, inf)"),
    "save_interval": (-1, "save_interval -1 in student must be finite and in [0, inf)"),
    "lr": (float("inf"), "lr inf in student must be finite"),
    "dropout": (2.0, "dropout 2.0 in student must be finite and in [0.0, 1.0)"),
    "schedule_sampler": ("importance", "invalid schedule_sampler 'importance' in student"),
    "noise_schedule": ("sigmoid", "invalid noise_schedule 'sigmoid' in student"),
    "channel_mult": ("a,b", "channel_mult='a,b' is not a comma-separated number list"),
    "attention_resolutions": ("2", "the UNet has no 2px level"),
}


@pytest.mark.parametrize("key", sorted(LATE_VALUES))
def test_bad_values_are_refused_at_load(key):
    value, expected = LATE_VALUES[key]
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "tests" / "configs" / "tiny_kd.yaml", {key: value})
    message = str(info.value)
    assert "\n" not in message and "tiny_kd.yaml" in message and expected in message


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_mistake_fails_in_one_line_before_any_run_dir(files, tmp_path, case):
    teacher, student, expected = CONFIG_CASES[case]
    root = str(files["root"])
    fill = {k: v.format(root=root) if isinstance(v, str) else v for k, v in {**teacher, **student}.items()}
    config = _kd_yaml(files, tmp_path / f"{case}.yaml", {k: fill[k] for k in teacher},
                      {k: fill[k] for k in student})
    code, err = _script("image_kd.py", ["--config", str(config), "--exp_dir", str(tmp_path / "run")])
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and str(config) in err, err
    assert expected.format(root=root) in err
    assert not (tmp_path / "run").exists()


def test_missing_data_file_fails_before_any_run_dir(tmp_path):
    absent = tmp_path / "absent.npz"
    code, err = _script("image_train.py", ["--config", "tests/configs/tiny_baseline.yaml", "--data_dir",
                                           str(absent), "--exp_dir", str(tmp_path / "run")])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"data_dir in the config does not exist: {absent}" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.mpi
def test_batch_not_divisible_by_ranks_fails_before_run_dir(files, tmp_path):
    config = _kd_yaml(files, tmp_path / "odd.yaml", student={"batch_size": 3})
    code, err = _script("image_kd.py", ["--config", str(config), "--exp_dir", str(tmp_path / "run")], mpi=2)
    assert code != 0
    assert f"{config}: batch_size 3 in student is not divisible by the number of ranks 2" in err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ hostile and broken files


def test_code_running_checkpoint_is_refused_and_nothing_runs(files, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil_teacher.pt"
    torch.save({"weight": _Payload(marker)}, evil)
    config = _kd_yaml(files, tmp_path / "evil.yaml", teacher={"model_path": str(evil)})
    before = _fingerprint(evil)
    code, err = _script("image_kd.py", ["--config", str(config), "--exp_dir", str(tmp_path / "run")])
    last = _last_line(err)
    assert code != 0 and "CheckpointError" in last and str(evil) in last and "system" in last, err
    assert not marker.exists()
    assert _fingerprint(evil) == before
    assert not list((tmp_path / "run").glob("model*.pt"))


def test_code_running_cache_is_refused_and_nothing_runs(files, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.cache"
    evil.write_bytes(pickle.dumps({"total_t": _Payload(marker)}, protocol=4))
    with pytest.raises(CacheError, match=r"evil\.cache: refused to load global '(posix|os)\.system'"):
        load_cache(str(evil))
    config = _kd_yaml(files, tmp_path / "evil.yaml", teacher={"tempfile": str(evil)})
    code, err = _script("image_kd.py", ["--config", str(config), "--exp_dir", str(tmp_path / "run")])
    last = _last_line(err)
    assert code != 0 and "CacheError" in last and str(evil) in last and "refused" in last, err
    assert not marker.exists()
    assert not list((tmp_path / "run").glob("model*.pt"))


def test_truncated_teacher_checkpoint_is_one_line_error(files, tmp_path):
    cut = tmp_path / "cut_teacher.pt"
    cut.write_bytes(files["teacher"].read_bytes()[:5000])
    config = _kd_yaml(files, tmp_path / "cut.yaml", teacher={"model_path": str(cut)})
    code, err = _script("image_kd.py", ["--config", str(config), "--exp_dir", str(tmp_path / "run")])
    last = _last_line(err)
    assert code != 0, err
    assert last.startswith("guided_diffusion.infra.checkpoint.CheckpointError: cannot load"), err
    assert str(cut) in last and "5000 bytes" in last


def test_truncated_cache_is_one_line_error(files, tmp_path):
    cut = tmp_path / "cut.cache"
    cut.write_bytes(files["pool"].read_bytes()[:-100])
    with pytest.raises(CacheError) as info:
        load_cache(str(cut))
    assert "\n" not in str(info.value) and str(cut) in str(info.value) and "truncated" in str(info.value)
    config = _kd_yaml(files, tmp_path / "cut.yaml", teacher={"tempfile": str(cut)})
    code, err = _script("image_kd.py", ["--config", str(config), "--exp_dir", str(tmp_path / "run")])
    assert code != 0 and "CacheError" in _last_line(err) and str(cut) in _last_line(err), err


def test_wrong_teacher_checkpoint_lists_keys(files, tmp_path):
    config = _kd_yaml(files, tmp_path / "swap.yaml", teacher={"model_path": str(files["student"])})
    code, err = _script("image_kd.py", ["--config", str(config), "--exp_dir", str(tmp_path / "run")])
    assert code != 0 and "CheckpointMismatchError" in err, err
    assert f"{files['student']}: state dict does not fit the model" in err
    assert "missing (" in err and "mis-shaped (" in err and "input_blocks" in err
    assert "fits none of the arch files" in _last_line(err)
    assert not list((tmp_path / "run").glob("model*.pt"))


def test_student_init_with_wrong_keys_lists_keys_and_the_fitting_arch(files, tmp_path):
    config = _kd_yaml(files, tmp_path / "init.yaml", student={"model_path": str(files["teacher"])})
    code, err = _script("image_kd.py", ["--config", str(config), "--exp_dir", str(tmp_path / "run")])
    assert code != 0 and "CheckpointMismatchError" in err, err
    assert f"{files['teacher']}: state dict does not fit the model" in err
    assert "unexpected (" in err and "mis-shaped (" in err
    assert not list((tmp_path / "run").glob("model*.pt"))

    # the student's optional init, strictly, and the arch suggestion when an arch file fits
    arch_dir = tmp_path / "arch"
    arch_dir.mkdir()
    for name in ("tiny_arch.yaml", "tiny_student_arch.yaml"):
        shutil.copy(REPO / "tests/configs" / name, arch_dir / name)
    cfg = load_config(config)
    student, _ = create_model_and_diffusion(**model_and_diffusion_kwargs(cfg.student))
    before = [p.detach().clone() for p in student.parameters()]
    with pytest.raises(CheckpointMismatchError) as info:
        load_state_dict_strict(student, torch.load(files["teacher"], weights_only=True),
                               source=str(files["teacher"]), arch_dir=arch_dir)
    assert "the checkpoint fits arch tiny_arch.yaml (learn_sigma=True)" in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))


# ------------------------------------------------------------------------------ image npz inputs

def _npz_cases(root: Path) -> dict[str, Path]:
    rng = np.random.default_rng(1)
    arrays = {
        "float_dtype": rng.random((4, 16, 16, 3)).astype(np.float32),
        "out_of_range": np.full((4, 16, 16, 3), 300, np.int16),
        "nchw_layout": np.zeros((4, 3, 16, 16), np.uint8),
        "empty": np.zeros((0, 16, 16, 3), np.uint8),
    }
    paths = {}
    for name, arr in arrays.items():
        paths[name] = root / f"{name}.npz"
        np.savez(paths[name], arr)
    good = root / "good.npz"
    np.savez(good, rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    paths["truncated"] = root / "truncated.npz"
    paths["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    paths["zero_bytes"] = root / "zero_bytes.npz"
    paths["zero_bytes"].write_bytes(b"")
    return paths


NPZ_MESSAGES = {
    "float_dtype": "dtype float32", "out_of_range": "dtype int16", "nchw_layout": "NHWC",
    "empty": "no images", "truncated": "cannot read npz", "zero_bytes": "cannot read npz",
}


def test_bad_training_npz_is_one_line_error_and_untouched(tmp_path):
    paths = _npz_cases(tmp_path)
    for name, path in paths.items():
        before = _fingerprint(path)
        with pytest.raises(DataError) as info:
            load_data(data_dir=str(path), batch_size=4, image_size=16, shard=0, num_shards=1)
        message = str(info.value)
        assert "\n" not in message and str(path) in message and NPZ_MESSAGES[name] in message, (name, message)
        assert _fingerprint(path) == before, name
    code, err = _script("image_train.py", ["--config", "tests/configs/tiny_baseline.yaml", "--data_dir",
                                           str(paths["truncated"]), "--exp_dir", str(tmp_path / "run")])
    last = _last_line(err)
    assert code != 0 and "DataError" in last and str(paths["truncated"]) in last, err
    assert not list((tmp_path / "run").glob("model*.pt"))


PLUGIN = """
import numpy as np


class Mean:
    def features(self, images):
        return {"pool": images.reshape(len(images), -1, 3).mean(1), "spatial": None, "logits": None}


def build(device, weights_path):
    return Mean()
"""


def test_bad_evaluator_npz_is_one_line_error_and_untouched(tmp_path, monkeypatch, capsys):
    (tmp_path / "mean_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    ref = tmp_path / "ref.npz"
    np.savez(ref, np.random.default_rng(2).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    for name, path in _npz_cases(tmp_path).items():
        before = {p: _fingerprint(p) for p in (ref, path)}
        code = evaluator.main([str(ref), str(path), "--features", "mean_plugin:build"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and str(path.name) in err, (name, err)
        assert before == {p: _fingerprint(p) for p in (ref, path)}, name



def test_sampling_with_settings_shapes_cannot_show_is_refused(tmp_path):
    """Issue 19: use_new_attention_order, num_head_channels or noise_schedule changed after training kept
    every shape, so the teacher loaded and sampled wrong images. The run dir's config.yaml is compared now."""
    from guided_diffusion.config import save_config
    from guided_diffusion.run_setup import build_model_and_diffusion, load_model_weights

    cfg = load_config(REPO / "tests" / "configs" / "tiny_baseline.yaml")
    model, _ = build_model_and_diffusion(cfg, "cpu")
    run = tmp_path / "run"
    run.mkdir()
    torch.save(model.state_dict(), run / "ema_0.9999_000010.pt")
    save_config(cfg, run / "config.yaml")
    load_model_weights(model, str(run / "ema_0.9999_000010.pt"), cfg)  # the same settings load
    flipped = {"use_new_attention_order": not cfg.use_new_attention_order, "noise_schedule": "linear"}
    changed = load_config(REPO / "tests" / "configs" / "tiny_baseline.yaml", flipped)
    other, _ = build_model_and_diffusion(changed, "cpu")
    with pytest.raises(CheckpointError) as info:
        load_model_weights(other, str(run / "ema_0.9999_000010.pt"), changed)
    message = str(info.value)
    assert "\n" not in message and "use_new_attention_order: trained" in message
    assert "noise_schedule: trained 'cosine', now 'linear'" in message


@pytest.mark.parametrize("config, published", [
    ("yaml/cifar10_32/exp/CIFAR10-57M-Dynamic-0.4.yaml", "ADM_cifar10_baseline.pt"),
    ("yaml/celeba_64/exp/CelebA64-57M-Dynamic-0.4.yaml", "DDPM_IP_celeba64.pt"),
])
def test_missing_published_teacher_names_the_download(config, published, tmp_path):
    """The READMEs' teachers are downloaded by hand: the error says which file, from where, and where to
    put it, before a run dir exists (and the checkpoint loader says the same)."""
    code, err = _script("image_kd.py", ["--config", config, "--exp_dir", str(tmp_path / "run")])
    line = _last_line(err)
    assert code != 0 and f"download {published} from DDPM-IP" in line, err[-1500:]
    assert "save it as model/" in line and not (tmp_path / "run").exists()
    with pytest.raises(CheckpointError, match=f"download {published}"):
        safe_torch_load(tmp_path / load_config(REPO / config).teacher.model_path)


def test_image_sample_refuses_a_checkpoint_trained_with_other_shape_blind_settings(tmp_path):
    """A run dir's config.yaml records predict_xstart true; sampling its model as an eps model would draw
    noise with weights that load fine, so image_sample stops in one line naming the key, writing nothing."""
    cfg = load_config(REPO / "tests/configs/tiny_baseline.yaml")
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**model_and_diffusion_kwargs(cfg))
    run = tmp_path / "run"
    run.mkdir()
    torch.save(model.state_dict(), run / "model000003.pt")
    (run / "config.yaml").write_text("predict_xstart: true\nnorm_groups: 32\n")
    out = tmp_path / "samples"
    code, err = _script("image_sample.py", ["--config", "tests/configs/tiny_baseline.yaml", "--model_path",
                                            str(run / "model000003.pt"), "--num_samples", "2",
                                            "--batch_size", "2", "--output_dir", str(out)])
    assert code != 0 and "predict_xstart: trained True, now False" in _last_line(err), err[-1500:]
    assert not list(out.glob("*.npz"))
