"""Tests of the YAML config system and the shipped yaml/ tree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from guided_diffusion import config as config_mod
from guided_diffusion.config import (
    ConfigError,
    build_arg_parser,
    check_file_exists,
    is_kd_config,
    load_config,
    model_and_diffusion_kwargs,
    parse_config_args,
    primary_section,
    save_config,
    validate_world_size,
)
from guided_diffusion.distill.dkdm.pool import MODES
from guided_diffusion.script_util import architecture_defaults, model_and_diffusion_defaults

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = REPO.parent / "shared" / "reference" / "published_configs.md"
if not PUBLISHED.exists():
    PUBLISHED = Path("/work/shared/reference/published_configs.md")
TINY = REPO / "tests" / "configs"


def _published() -> dict[str, str]:
    text = PUBLISHED.read_text()
    blocks = re.findall(r"^## \./(\S+)\n```yaml\n(.*?)```", text, flags=re.S | re.M)
    assert len(blocks) > 30, f"could not parse {PUBLISHED}"
    return dict(blocks)


PUBLISHED_BLOCKS = _published()
# YAML files that are not experiment configs (the digits demo's schedules, tests/test_demo.py covers them;
# the paper tables, tests/test_tables.py).
TABLES = {f"yaml/tables/{p.name}" for p in (REPO / "yaml" / "tables").glob("*.yaml")}
NOT_CONFIGS = {"yaml/digits_16/demo.yaml", *TABLES}
_YAML_FILES = [*(REPO / "yaml").rglob("*.yaml"), *TINY.glob("*.yaml")]
# RCFD/RDD flag files (yaml/*/rcfd/): the authors' flag names, read by scripts/rcfd_train.py and rcfd_eval.py.
FLAG_YAMLS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "yaml").glob("*/rcfd/*.yaml"))
ALL_YAMLS = sorted(
    rel
    for rel in (p.relative_to(REPO).as_posix() for p in _YAML_FILES)
    if rel not in NOT_CONFIGS and rel not in FLAG_YAMLS
)


def _raw(path: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture()
def arch_and_diffusion(tmp_path: Path) -> tuple[Path, Path]:
    """An arch file whose use_fp16 is true and dropout 0.1, and a diffusion file with respacing ''."""
    arch = _raw(TINY / "tiny_arch.yaml")
    arch.update(use_fp16=True, dropout=0.1)
    arch_path = tmp_path / "arch.yaml"
    OmegaConf.save(OmegaConf.create(arch), arch_path)
    diffusion_path = tmp_path / "diffusion.yaml"
    OmegaConf.save(OmegaConf.load(TINY / "tiny_diffusion.yaml"), diffusion_path)
    return arch_path, diffusion_path


# --- the shipped tree -------------------------------------------------------------------------------------


@pytest.mark.parametrize("rel", sorted(PUBLISHED_BLOCKS))
def test_published_file_matches(rel: str) -> None:
    path = REPO / "yaml" / rel
    assert path.is_file(), f"yaml/{rel} missing"
    block = PUBLISHED_BLOCKS[rel]
    assert _raw(path) == OmegaConf.to_container(OmegaConf.create(block))
    text = path.read_text()
    for comment in re.findall(r"#.*", block):
        assert comment in text, f"yaml/{rel} lost the comment {comment!r}"


@pytest.mark.parametrize("rel", ALL_YAMLS)
def test_every_yaml_loads(rel: str) -> None:
    cfg = load_config(rel)
    section = primary_section(cfg)
    assert set(model_and_diffusion_kwargs(section)) == set(architecture_defaults(section))
    if is_kd_config(cfg):
        assert cfg.teacher.iter_choice in MODES


@pytest.mark.parametrize("rel", FLAG_YAMLS)
def test_every_rcfd_flag_yaml_loads(rel: str) -> None:
    from guided_diffusion.distill.rcfd_run import load_flags

    flags = load_flags(rel)
    assert flags["mean_type"] == "xstart" and flags["method"] in ("base", "pd", "rdd")


def test_rcfd_flag_yamls_hold_the_seed_flagfiles() -> None:
    """One YAML per flagfile the seed uses, with the published values (config/CIFAR10_*.txt)."""
    from guided_diffusion.distill.rcfd_run import load_flags

    assert {Path(rel).name for rel in FLAG_YAMLS if "cifar10_32" in rel} == {
        "CIFAR10_BASE.yaml", "CIFAR10_PD.yaml", "CIFAR10_RDD.yaml", "CIFAR10_EVAL.yaml"
    }
    base = load_flags("yaml/cifar10_32/rcfd/CIFAR10_BASE.yaml")
    assert (base["lr"], base["batch_size"], base["total_steps"], base["warmup"], base["dropout"]) == (
        2e-4, 256, 800000, 5000, 0.1
    )
    rdd = load_flags("yaml/cifar10_32/rcfd/CIFAR10_RDD.yaml")
    assert (rdd["feature"], rdd["loss_type"], rdd["temperature"], rdd["lr"], rdd["total_steps"]) == (
        True, "mp2p", 0.9, 5e-5, 20000
    )
    assert (rdd["logits"], rdd["gt"], rdd["ch_mult"], rdd["attn"]) == (False, False, [1, 2, 2, 2], [1])


def test_tree_has_seed_named_configs() -> None:
    exp = REPO / "yaml" / "cifar10_32" / "exp"
    base = _raw(exp / "CIFAR10-57M-Dynamic-0.4.yaml")
    ablation = exp / "ablation"
    expected = {
        ablation / "iterative-distillation" / "CIFAR10-57M-Iterative.yaml": {
            "iter_choice": "iterative_distillation"
        },
        ablation / "shuffled-iterative-distillation" / "CIFAR10-57M-Shuffled.yaml": {
            "iter_choice": "shuffled_iterative_distillation"
        },
    }
    for rho in ("0.01", "0.02", "0.03", "0.05", "0.1", "0.2", "0.3", "0.4"):
        path = ablation / "dynamic-iterative-distillation" / f"CIFAR10-57M-Dynamic-{rho}.yaml"
        expected[path] = {"BATCH": float(rho), "tempfile": f"experiments/cache/CIFAR10-Dynamic-{rho}.cache"}
    for path, teacher_changes in expected.items():
        want = OmegaConf.to_container(OmegaConf.create(base))
        want["teacher"].update(teacher_changes)
        assert _raw(path) == want, path
    siblings = {
        exp / "CIFAR10-14M-Baseline-0.yaml": exp / "CIFAR10-14M-Baseline-0.05.yaml",
        REPO / "yaml/celeba_64/exp/CelebA64-57M-Baseline.yaml": REPO
        / "yaml/celeba_64/exp/CelebA64-57M-Baseline-0.yaml",
        REPO / "yaml/imagenet_32/exp/ImageNet32-14M-Baseline.yaml": REPO
        / "yaml/imagenet_32/exp/ImageNet32-14M-Baseline-0.yaml",
    }
    for path, sibling in siblings.items():
        assert _raw(path) == _raw(sibling), path


# --- merging ---------------------------------------------------------------------------------------------


def test_flat_merge_order(tmp_path: Path, arch_and_diffusion: tuple[Path, Path]) -> None:
    arch, diffusion = arch_and_diffusion
    exp = _write(
        tmp_path / "exp.yaml", f"lr: 0.0002\nuse_fp16: false\nmodel: {arch}\ndiffusion: {diffusion}\n"
    )
    cfg = load_config(exp)
    assert not is_kd_config(cfg)
    assert cfg.use_fp16 is False  # the section's key beats the arch file's true
    assert cfg.dropout == 0.1  # from the arch file
    assert cfg.num_channels == 32 and cfg.channel_mult == "1,2"
    assert cfg.diffusion_steps == 20 and cfg.noise_schedule == "cosine"  # from the diffusion file
    assert cfg.lr == 0.0002
    assert cfg.batch_size == 1 and cfg.ema_rate == "0.9999" and cfg.seed == 0  # defaults fill
    assert cfg.precision == "auto" and cfg.max_steps == 0 and cfg.num_samples == 10000
    assert cfg.model == str(arch) and cfg.diffusion == str(diffusion)
    assert cfg.config == str(exp)


def test_kd_merge_and_iter_choice_spelling(tmp_path: Path, arch_and_diffusion: tuple[Path, Path]) -> None:
    arch, diffusion = arch_and_diffusion
    text = (TINY / "tiny_kd.yaml").read_text()
    text = text.replace(
        "iter_choice: dynamic_iterative_distillation", "iter_choice: shffled_iterative_distillation"
    )
    text = text.replace("model: tests/configs/tiny_arch.yaml", f"model: {arch}")
    cfg = load_config(_write(tmp_path / "kd.yaml", text))
    assert is_kd_config(cfg)
    teacher, student = cfg.teacher, cfg.student
    assert teacher.iter_choice == "shuffled_iterative_distillation"
    assert teacher.use_fp16 is True and teacher.dropout == 0.1  # arch value kept where section is silent
    assert teacher.batch_size == 8 and teacher.BATCH == 0.4 and teacher.prob == 1.0
    assert teacher.precision == "auto" and "lr" not in teacher
    assert student.channel_mult == "1" and student.attention_resolutions == ""
    assert student.batch_size == 4 and student.max_steps == 6 and student.lr_schedule == "constant"
    assert primary_section(cfg) is not None and primary_section(cfg).batch_size == 4
    assert student.model.endswith("tests/configs/tiny_student_arch.yaml")


def test_model_and_diffusion_kwargs_exact_keys() -> None:
    cfg = load_config(TINY / "tiny_kd.yaml")
    kwargs = model_and_diffusion_kwargs(cfg.teacher)
    assert list(kwargs) == list(model_and_diffusion_defaults())
    assert kwargs["attention_resolutions"] == "8" and kwargs["learn_sigma"] is True
    with pytest.raises(ConfigError, match="lacks model/diffusion keys"):
        model_and_diffusion_kwargs({"image_size": 16})


def test_overrides_go_to_flat_or_student() -> None:
    flat = load_config(TINY / "tiny_baseline.yaml", {"batch_size": 2, "use_ddim": "True", "lr": None})
    assert flat.batch_size == 2 and flat.use_ddim is True and flat.lr == 0.0001
    kd = load_config(TINY / "tiny_kd.yaml", {"batch_size": 2, "model_path": "x.pt"})
    assert kd.student.batch_size == 2 and kd.student.model_path == "x.pt"
    assert kd.teacher.batch_size == 8 and kd.teacher.model_path == ""
    with pytest.raises(ConfigError, match=r"command line: unknown key 'bach_size'.*'batch_size'"):
        load_config(TINY / "tiny_baseline.yaml", {"bach_size": 2})


def test_number_typed_respacing_becomes_string(tmp_path: Path) -> None:
    text = (
        (TINY / "tiny_diffusion.yaml").read_text().replace('timestep_respacing: ""', "timestep_respacing: 20")
    )
    diffusion = _write(tmp_path / "d.yaml", text)
    cfg = load_config(
        _write(tmp_path / "e.yaml", f"model: {TINY / 'tiny_arch.yaml'}\ndiffusion: {diffusion}\n")
    )
    assert cfg.timestep_respacing == "20"


# --- validation ------------------------------------------------------------------------------------------


def test_unknown_key_suggests_nearest(tmp_path: Path) -> None:
    bad = _write(tmp_path / "x.yaml", "learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert str(info.value) == f"{bad}: unknown key 'learning_rate' in the config (did you mean 'lr'?)"
    kd = (TINY / "tiny_kd.yaml").read_text().replace("  prob: 1.0", "  prb: 1.0")
    with pytest.raises(ConfigError, match=r"unknown key 'prb' in teacher \(did you mean 'prob'\?\)"):
        load_config(_write(tmp_path / "kd.yaml", kd))
    arch = _write(tmp_path / "arch.yaml", "num_chanels: 8\n")
    with pytest.raises(ConfigError, match=r"arch.yaml: unknown key 'num_chanels'.*'num_channels'"):
        load_config(_write(tmp_path / "e.yaml", f"model: {arch}\n"))


def test_wrong_types(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"key 'lr' in the config must be a float, got str 'fast'"):
        load_config(_write(tmp_path / "a.yaml", "lr: fast\n"))
    with pytest.raises(ConfigError, match=r"key 'batch_size' in the config must be an int, got float 4.5"):
        load_config(_write(tmp_path / "b.yaml", "batch_size: 4.5\n"))
    with pytest.raises(ConfigError, match=r"key 'use_ddim'.*must be a bool, got str 'maybe'"):
        load_config(TINY / "tiny_baseline.yaml", {"use_ddim": "maybe"})
    cfg = load_config(_write(tmp_path / "c.yaml", "weight_decay: 0\nclip_denoised: 'False'\n"))
    assert isinstance(cfg.weight_decay, float) and cfg.clip_denoised is False


def test_invalid_choices(tmp_path: Path) -> None:
    for key, value in (("precision", "fp8"), ("lr_schedule", "linear")):
        with pytest.raises(ConfigError, match=rf"invalid {key} '{value}'"):
            load_config(_write(tmp_path / f"{key}.yaml", f"{key}: {value}\n"))
    kd = (TINY / "tiny_kd.yaml").read_text().replace("dynamic_iterative_distillation", "random_distillation")
    with pytest.raises(ConfigError, match=r"kd.yaml: invalid iter_choice 'random_distillation' in teacher"):
        load_config(_write(tmp_path / "kd.yaml", kd))


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found: nowhere.yaml"):
        load_config("nowhere.yaml")
    exp = _write(tmp_path / "exp.yaml", "model: yaml/arch/999M-CNN.yaml\n")
    with pytest.raises(
        ConfigError, match=r"exp.yaml: model file of the config not found: yaml/arch/999M-CNN"
    ):
        load_config(exp)
    kd = (TINY / "tiny_kd.yaml").read_text().replace("tests/configs/tiny_diffusion.yaml", "gone.yaml", 1)
    with pytest.raises(ConfigError, match=r"diffusion file of teacher not found: gone.yaml"):
        load_config(_write(tmp_path / "kd.yaml", kd))
    with pytest.raises(ConfigError, match=r"teacher checkpoint not found: model/none.pt"):
        check_file_exists("model/none.pt", "teacher checkpoint")
    assert check_file_exists("tests/configs/tiny_arch.yaml", "arch").is_file()


def test_bad_respacing(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"timestep_respacing '30' in the config is invalid for diffusion_steps 20"
    ):
        load_config(TINY / "tiny_baseline.yaml", {"timestep_respacing": "30"})
    with pytest.raises(ConfigError, match=r"timestep_respacing 'ddim8'.*diffusion_steps 20"):
        load_config(TINY / "tiny_baseline.yaml", {"timestep_respacing": "ddim8"})
    assert load_config(TINY / "tiny_baseline.yaml", {"timestep_respacing": "10"}).timestep_respacing == "10"


def test_world_size() -> None:
    cfg = load_config(TINY / "tiny_kd.yaml")
    validate_world_size(cfg, 2)
    with pytest.raises(ConfigError, match=r"tiny_kd.yaml: batch_size 4 in student is not divisible by .* 3"):
        validate_world_size(cfg, 3)


def test_kd_needs_both_sections(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"needs a 'student:' mapping"):
        load_config(_write(tmp_path / "kd.yaml", "teacher:\n  prob: 1.0\n"))


# --- method sections --------------------------------------------------------------------------------------


def test_method_section_defaults(tmp_path: Path) -> None:
    from guided_diffusion.distill import objective

    fake = {"contrastive_weight": 0.1, "temperature": 0.07, "enabled": True}
    objective.register("fake_method", lambda: dict(fake))
    try:
        text = (TINY / "tiny_kd.yaml").read_text() + "fake_method:\n  contrastive_weight: 1\n"
        cfg = load_config(_write(tmp_path / "kd.yaml", text))
        assert cfg.fake_method == {"contrastive_weight": 1.0, "temperature": 0.07, "enabled": True}
        bad = (TINY / "tiny_kd.yaml").read_text() + "fake_method:\n  temprature: 0.5\n"
        with pytest.raises(
            ConfigError, match=r"unknown key 'temprature' in fake_method \(did you mean 'temperature'\?\)"
        ):
            load_config(_write(tmp_path / "bad.yaml", bad))
    finally:
        objective.unregister("fake_method")
    assert "fake_method" not in load_config(TINY / "tiny_kd.yaml")


def test_unknown_method_section_is_named(tmp_path: Path) -> None:
    text = (TINY / "tiny_kd.yaml").read_text() + "relatinal:\n  weight: 1.0\n"
    with pytest.raises(ConfigError, match=r"r.yaml: unknown section 'relatinal'.*did you mean 'relational'"):
        load_config(_write(tmp_path / "r.yaml", text))
    flat = (TINY / "tiny_baseline.yaml").read_text() + "relational:\n  weight: 1.0\n"
    with pytest.raises(ConfigError, match=r"unknown key 'relational'"):
        load_config(_write(tmp_path / "flat.yaml", flat))


# --- saving and the command line ----------------------------------------------------------------------------


def test_save_config_round_trip(tmp_path: Path) -> None:
    cfg = load_config(TINY / "tiny_kd.yaml", {"batch_size": 2})
    out = tmp_path / "run" / "config.yaml"
    save_config(cfg, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["config.yaml"]
    again = load_config(out)
    assert again.teacher == cfg.teacher and again.student == cfg.student
    assert again.config == str(out)


def test_cli_flags_override(tmp_path: Path) -> None:
    parser = build_arg_parser("sample", {"batch_size": int, "use_ddim": bool, "timestep_respacing": str})
    args, cfg = parse_config_args(
        parser,
        ["--config", str(TINY / "tiny_baseline.yaml"), "--batch_size", "2", "--use_ddim", "True"],
    )
    assert args.config == str(TINY / "tiny_baseline.yaml") and args.timestep_respacing is None
    assert cfg.batch_size == 2 and cfg.use_ddim is True and cfg.timestep_respacing == ""
    bad = _write(tmp_path / "bad.yaml", "learning_rate: 1\n")
    with pytest.raises(SystemExit) as info:
        parse_config_args(parser, ["--config", str(bad)])
    assert info.value.code == 2


def test_teacher_aliases_name_the_authors_keys(tmp_path: Path) -> None:
    base = (TINY / "tiny_kd.yaml").read_text()
    aliased = base.replace("  BATCH: 0.4\n", "  rho: 0.2\n")
    aliased = aliased.replace("  batch_size: 8\n", "  prepare_batch_size: 16\n", 1)
    cfg = load_config(_write(tmp_path / "alias.yaml", aliased))
    assert cfg.teacher.BATCH == 0.2 and cfg.teacher.batch_size == 16 and "rho" not in cfg.teacher
    both = base.replace("  BATCH: 0.4\n", "  BATCH: 0.4\n  rho: 0.2\n")
    with pytest.raises(ConfigError, match=r"both.yaml: teacher sets both 'rho' and 'BATCH'"):
        load_config(_write(tmp_path / "both.yaml", both))


def test_the_teacher_section_is_dkdms_and_needs_it_registered(monkeypatch) -> None:
    """config.py imports no method: the `teacher:` keys come from DKDM's registered schema (dkdm/settings),
    and without it a KD config is a one-line error saying what to import."""
    from guided_diffusion.distill.dkdm import settings

    assert config_mod.teacher_schema() is settings.SCHEMA
    assert set(settings.defaults()) <= set(load_config("yaml/digits_16/exp/Digits-DKDM.yaml").teacher)
    monkeypatch.setattr(config_mod, "_TEACHER_SCHEMA", None)
    with pytest.raises(ConfigError, match="teacher: section is DKDM's; import guided_diffusion.distill"):
        load_config("yaml/digits_16/exp/Digits-DKDM.yaml")
