"""ADM-style logger: log.txt, progress.csv with keys appearing late, levels, resumption, wandb hooks."""

from __future__ import annotations

import csv
import inspect
import sys
import types
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from guided_diffusion import logger


@pytest.fixture(autouse=True)
def _fresh_logger():
    logger.reset()
    yield
    logger.reset()


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_log_txt_and_progress_csv_with_late_keys(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    logger.configure(dir=str(tmp_path / "run"))
    assert logger.get_dir() == str(tmp_path / "run")
    logger.log("hello", 42)
    logger.logkv("step", 0)
    logger.logkv_mean("loss", 1.0)
    logger.logkv_mean("loss", torch.tensor(3.0))
    assert logger.dumpkvs() == {"step": 0, "loss": 2.0}
    logger.logkv("step", 1)
    logger.logkv_mean("loss", 0.5)
    logger.logkv("grad_norm", 7)
    logger.logkv("aaa", "x")
    logger.dumpkvs()
    logger.logkv("step", 2)
    logger.dumpkvs()
    assert _rows(tmp_path / "run" / "progress.csv") == [
        ["loss", "step", "aaa", "grad_norm"],
        ["2.0", "0", "", ""],
        ["0.5", "1", "x", "7"],
        ["", "2", "", ""],
    ]
    text = (tmp_path / "run" / "log.txt").read_text()
    assert "hello 42" in text and "| loss" in text and "grad_norm" in text
    assert "hello 42" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["log.txt", "progress.csv"]


def test_reconfigure_continues_existing_files(tmp_path: Path) -> None:
    logger.configure(dir=str(tmp_path), format_strs=["log", "csv"])
    logger.log("first run")
    logger.logkv("step", 10)
    logger.dumpkvs()
    logger.configure(dir=str(tmp_path), format_strs=["log", "csv"])
    logger.log("resumed")
    logger.logkv("step", 20)
    logger.logkv("lr", 0.1)
    logger.dumpkvs()
    assert _rows(tmp_path / "progress.csv") == [["step", "lr"], ["10", ""], ["20", "0.1"]]
    text = (tmp_path / "log.txt").read_text()
    assert text.index("first run") < text.index("resumed")


def test_levels_suffix_and_bad_input(tmp_path: Path) -> None:
    logger.configure(dir=str(tmp_path), format_strs=["log", "json"], log_suffix="-r1")
    logger.set_level(logger.WARN)
    logger.info("quiet info")
    logger.debug("quiet debug")
    logger.warn("loud warning")
    logger.logkv("a", 1.5)
    logger.dumpkvs()
    text = (tmp_path / "log-r1.txt").read_text()
    assert "quiet" not in text and "WARNING: loud warning" in text
    assert (tmp_path / "progress-r1.json").read_text().strip() == '{"a": 1.5}'
    with pytest.raises(TypeError, match="'name'"):
        logger.logkv_mean("name", "abc")
    with pytest.raises(ValueError, match="tensorboard"):
        logger.configure(dir=str(tmp_path), format_strs=["tensorboard"])


def test_configure_without_formats_still_makes_run_dir(tmp_path: Path) -> None:
    logger.configure(dir=str(tmp_path / "quiet"), format_strs=[])
    logger.log("nowhere")
    logger.logkv("a", 1)
    assert logger.dumpkvs() == {"a": 1}
    assert (tmp_path / "quiet").is_dir() and not any((tmp_path / "quiet").iterdir())


def test_default_logger_writes_stdout_only(capsys: pytest.CaptureFixture) -> None:
    logger.log("before configure")
    assert logger.get_dir() is None
    assert "before configure" in capsys.readouterr().out


def _fake_wandb(calls: list, fail_init: bool = False, fail_log: bool = False) -> types.ModuleType:
    mod = types.ModuleType("wandb")

    class Run:
        def log(self, data, step=None):
            if fail_log:
                raise ConnectionError("offline")
            calls.append(("log", dict(data), step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        if fail_init:
            raise RuntimeError("no network")
        calls.append(("init", kwargs))
        return Run()

    mod.init = init
    return mod


def test_wandb_receives_dumps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = {"lr": 1e-4, "arch": OmegaConf.create({"num_channels": 32})}
    logger.configure(dir=str(tmp_path), format_strs=["csv"], wandb_project="dkdm", wandb_config=config)
    logger.logkv("step", 5)
    logger.logkv_mean("loss", 0.25)
    logger.dumpkvs()
    logger.reset()
    assert calls[0] == ("init", {"project": "dkdm", "config": {"lr": 1e-4, "arch": {"num_channels": 32}},
                                 "dir": str(tmp_path), "mode": "offline"})
    assert type(calls[0][1]["config"]["arch"]) is dict
    assert calls[1] == ("log", {"step": 5, "loss": 0.25}, 5)
    assert calls[2] == ("finish",)


@pytest.mark.parametrize("where", ["init", "log"])
def test_wandb_failure_warns_once_and_continues(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                where: str) -> None:
    calls: list = []
    fake = _fake_wandb(calls, fail_init=where == "init", fail_log=where == "log")
    monkeypatch.setitem(sys.modules, "wandb", fake)
    logger.configure(dir=str(tmp_path), format_strs=["log", "csv"], wandb_project="dkdm")
    for step in range(3):
        logger.logkv("step", step)
        logger.dumpkvs()
    assert _rows(tmp_path / "progress.csv") == [["step"], ["0"], ["1"], ["2"]]
    assert (tmp_path / "log.txt").read_text().count("WARNING: wandb") == 1


def test_wandb_init_arguments_exist_in_installed_wandb() -> None:
    import wandb

    params = inspect.signature(wandb.init).parameters
    assert {"project", "config", "dir", "mode"} <= set(params)
