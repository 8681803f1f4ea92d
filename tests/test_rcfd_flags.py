"""The RDD README's command lines as written: absl flag files in ./config, bare and --no booleans, repeated
multi-flags, --gpu_id and the launcher's --local-rank, and the stage read from the flags."""

from __future__ import annotations

import argparse
import re
import shlex

import pytest
from omegaconf import OmegaConf
from script_env import REPO

from guided_diffusion.distill.rcfd_flags import absl_to_argparse, to_flagfile
from guided_diffusion.distill.rcfd_run import flag_defaults, load_flags, parse_flags

SCRIPTS = {"train_base.py": "base", "PD.py": "pd", "train_rdd.py": "rdd"}


def _parse(argv, monkeypatch):
    monkeypatch.chdir(REPO)
    return parse_flags(argparse.ArgumentParser(prog="rcfd_train.py"), argv, "CIFAR10_PD.yaml")[1]


@pytest.mark.parametrize("name", ["CIFAR10_BASE", "CIFAR10_PD", "CIFAR10_EVAL"])
def test_shipped_flag_files_are_the_yaml_configs(name, monkeypatch):
    yaml = REPO / "yaml" / "cifar10_32" / "rcfd" / f"{name}.yaml"
    raw = OmegaConf.to_container(OmegaConf.load(yaml))
    assert (REPO / "config" / f"{name}.txt").read_text() == to_flagfile(raw)
    method = ["--method", raw["method"]] if "method" in raw else []
    from_txt = _parse(["--flagfile", f"./config/{name}.txt", *method], monkeypatch)
    from_yaml = load_flags(str(yaml))
    assert {k: v for k, v in from_txt.items() if k != "config"} == {
        k: v for k, v in from_yaml.items() if k != "config"}


def test_absl_spellings(monkeypatch):
    defaults = flag_defaults()
    argv, launch = absl_to_argparse(
        ["--feature", "--noconditional", "--ch_mult=1", "--ch_mult", "4", "--lr=1e-4", "--local-rank=3",
         "--gpu_id", "0,1", "--num_gpus", "2", "--distributed", "--dataset", "cifar10"], defaults)
    pairs = dict(zip(argv[::2], argv[1::2], strict=True))
    assert pairs == {"--feature": "true", "--conditional": "false", "--lr": "1e-4", "--ch_mult": "1,4"}
    assert launch == {"local_rank": "3", "gpu_id": "0,1", "num_gpus": "2", "distributed": "true",
                      "dataset": "cifar10"}
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    flags = _parse(["--flagfile=./config/CIFAR10_PD.txt", "--local-rank=2", "--gpu_id", "1,3", "--feature"],
                   monkeypatch)
    assert flags["feature"] is True and flags["method"] == "rdd" and flags["ch_mult"] == [1, 2, 2, 2]
    import os

    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1,3" and os.environ["LOCAL_RANK"] == "2"
    with pytest.raises(SystemExit):
        _parse(["--flagfile", "./config/NOPE.txt"], monkeypatch)


def _readme_commands() -> list[tuple[str, list[str]]]:
    """(the authors' script, its argv) for every training command of the RDD README."""
    seeds = sorted((REPO.parent / "shared" / "seeds").glob("003_*.txt"))
    if not seeds:
        pytest.fail("the RDD README is missing: expected ../shared/seeds/003_*.txt beside the checkout")
    text = re.sub(r"\\\n\s*", " ", seeds[0].read_text())
    found = []
    for line in text.splitlines():
        words = shlex.split(line.strip()) if "--flagfile" in line else []
        script = next((w for w in words if w in SCRIPTS), None)
        if script:
            found.append((script, words[words.index(script) + 1:]))
    return found


def test_readme_lines_parse_to_their_stage(monkeypatch):
    commands = _readme_commands()
    assert [s for s, _ in commands] == ["train_base.py", "PD.py", "PD.py", "train_rdd.py"]
    for script, argv in commands:
        flags = _parse(argv, monkeypatch)
        assert flags["method"] == SCRIPTS[script], argv
    rdd = _parse(commands[-1][1], monkeypatch)
    assert (rdd["total_steps"], rdd["loss_type"], rdd["num_workers"], rdd["lr"]) == (20000, "mp2p", 8, 5e-5)
    assert rdd["classifier_path"] == "./classifier/result/cifar10/densenet201" and rdd["feature"] is True
    assert _parse(commands[0][1], monkeypatch)["total_steps"] == 800000


def test_torch_distributed_launch_runs_a_flag_file_stage(tmp_path):
    """`python -m torch.distributed.launch --nproc_per_node=1 ... --flagfile ./config/CIFAR10_BASE.txt`:
    the launcher's --local-rank and env:// rendezvous, the flag file, then a tiny base run on digits."""
    import subprocess

    from script_env import ENV, PY

    from datasets.digits import write_digits

    data = write_digits(tmp_path / "digits", image_size=16)["train"]
    logdir = tmp_path / "base"
    cmd = [PY, "-m", "torch.distributed.launch", "--nproc_per_node=1", "scripts/rcfd_train.py",
           "--flagfile", "./config/CIFAR10_BASE.txt", "--gpu_id", "0", "--logdir", str(logdir),
           "--data_dir", str(data), "--img_size", "16", "--ch", "32", "--batch_size", "8",
           "--total_steps", "2", "--save_step", "2", "--sample_step", "0", "--norandom_flip"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = OmegaConf.load(logdir / "config.yaml")
    assert (logdir / "ckpt.pt").is_file() and saved.method == "base" and saved.T == 1024
