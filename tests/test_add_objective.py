"""Adding a method is one new file that registers its YAML section, imported before the config is loaded:
a small example objective is found by its section name, validated, built by `build_run`, trained and
saved; before its module is imported the section is unknown."""

from __future__ import annotations

import csv
import importlib
import textwrap

import pytest
import torch
from omegaconf import OmegaConf

from guided_diffusion import dist_util, logger
from guided_diffusion.config import ConfigError, load_config, model_and_diffusion_kwargs
from guided_diffusion.distill.objective import find_method, unregister
from guided_diffusion.distill.run import build_run
from guided_diffusion.script_util import create_model_and_diffusion

torch.set_num_threads(1)

EXAMPLE = textwrap.dedent(
    '''
    """Example method: pulls the student's middle features toward zero, scaled by a trainable weight."""

    import torch

    from guided_diffusion.distill.objective import register


    def defaults():
        return {"weight": 1.0}


    class MiddleEnergy(torch.nn.Module):
        base = False
        needs_features = True

        def __init__(self, weight):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(float(weight)))

        def forward(self, student, batch):
            energy = batch["student_features"]["middle"].pow(2).flatten(1).mean(dim=1)
            return {"loss": self.scale * energy, "energy": energy}


    def build(config, parts):
        return MiddleEnergy(config["weight"]).to(parts.device)


    register("middle_energy", defaults, build)
    '''
)


@pytest.fixture()
def example_method(tmp_path, monkeypatch):
    """The example module in a folder of its own, importable as `middle_energy`; the test imports it."""
    folder = tmp_path / "methods"
    folder.mkdir()
    (folder / "middle_energy.py").write_text(EXAMPLE)
    monkeypatch.syspath_prepend(str(folder))
    yield
    import sys

    sys.modules.pop("middle_energy", None)
    unregister("middle_energy")


def test_a_new_objective_is_one_file_and_a_yaml_section(example_method, tmp_path):
    raw = OmegaConf.load("tests/configs/tiny_kd.yaml")
    cfg0 = load_config("tests/configs/tiny_kd.yaml")
    torch.manual_seed(0)
    teacher, _ = create_model_and_diffusion(**model_and_diffusion_kwargs(cfg0.teacher))
    torch.nn.init.normal_(teacher.out[-1].weight, std=0.05)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    raw.teacher.model_path = str(tmp_path / "teacher.pt")
    raw.teacher.tempfile = str(tmp_path / "pool.cache")
    raw.student.max_steps, raw.student.save_interval = 2, 2
    raw.middle_energy = {"weight": 0.5}
    OmegaConf.save(raw, tmp_path / "kd.yaml")
    with pytest.raises(ConfigError, match=r"unknown section 'middle_energy': no method owns it"):
        load_config(tmp_path / "kd.yaml")
    importlib.import_module("middle_energy")  # registers its section, as a script using the method would

    assert find_method("middle_energy").defaults() == {"weight": 1.0}
    cfg = load_config(tmp_path / "kd.yaml")
    assert cfg.middle_energy == {"weight": 0.5}
    run_dir = tmp_path / "run"
    logger.configure(str(run_dir), format_strs=["csv"])
    loop = build_run(cfg, str(run_dir), device=torch.device("cpu"))
    assert set(loop.extras) == {"middle_energy"} and loop.base.keep_features
    loop.run_loop()
    dist_util.cleanup()
    with open(run_dir / "progress.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(float(r["middle_energy_energy"]) > 0 for r in rows)
    saved = torch.load(run_dir / "opt000002.pt", weights_only=True)["extra_modules"]["middle_energy"]
    assert saved["scale"].item() != 0.5  # trained with the student, kept in the opt file
    raw.middle_energy = {"wieght": 0.5}
    OmegaConf.save(raw, tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match=r"unknown key 'wieght' in middle_energy \(did you mean 'weight'"):
        load_config(tmp_path / "bad.yaml")
