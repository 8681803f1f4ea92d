"""Experiment configs: load a YAML, merge its arch and diffusion files, fill defaults, validate early.

A flat YAML (baseline training, teacher sampling) gives one flat config. A KD YAML (top-level `teacher:` and
`student:`) gives `cfg.teacher` and `cfg.student`, each flat. In every section the arch file (`model:`) and
the diffusion file (`diffusion:`) come first, the section's own keys on top, then the defaults below fill
what is still missing. Optional method sections (`tccd:`, `relational:`, `step_distill:`) get the defaults
of the module that owns them. Every problem is a `ConfigError` naming the file and the key.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from .infra.atomic_io import atomic_write_text
from .infra.checkpoint import published_teacher_hint

REPO_ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------------
# Schema. Model/diffusion keys and their defaults come from script_util.model_and_diffusion_defaults().

SAMPLING_DEFAULTS: dict[str, Any] = {
    "use_ddim": False,
    "clip_denoised": True,
    "clip_last": False,
    "clip_first": False,
    "num_samples": 10000,
    "batch_size": 1,
}

TRAINING_DEFAULTS: dict[str, Any] = {
    # guided-diffusion's training flags
    "schedule_sampler": "uniform",
    "lr": 1e-4,
    "weight_decay": 0.0,
    "lr_anneal_steps": 0,
    "batch_size": 1,
    "microbatch": -1,
    "ema_rate": "0.9999",
    "resume_checkpoint": "",
    "use_fp16": False,
    "fp16_scale_growth": 1e-3,
    "model_path": "",
    "log_interval": 10,
    "save_interval": 10000,
    "cache_save_interval": -1,
    "data_dir": "",
    # our additions
    "seed": 0,
    "max_steps": 0,  # 0 = unlimited
    "precision": "auto",  # bf16 autocast on CUDA when use_fp16, else fp32
    "grad_clip": 0.0,  # 0 = off
    "max_nonfinite_skips": 50,
    "compile": True,  # CUDA only: torch.compile of the frozen nets (compile_util.FastPath)
    "cuda_graphs": True,  # CUDA only: replay static-shape UNet calls as graphs (compile_util.FastPath)
    "compile_background": True,  # CUDA: frozen nets compile in a worker process, run uncompiled meanwhile
    "half_norm": True,  # CUDA half precision only: GroupNorm reads bf16/fp16 directly, fp32 statistics
    "lr_schedule": "constant",
    "sample_interval": 0,  # 0 = no sample grid during training
    "keep_checkpoints": 0,  # 0 = keep every checkpoint set (guided-diffusion); K > 0: only the K newest
    "deterministic": False,  # deterministic kernels (run_setup.use_deterministic): resumes equal to the bit
    "memory_log_interval": 500,  # log host and CUDA memory every K steps (0 = never)
}

CHOICES: dict[str, tuple[str, ...]] = {
    "precision": ("auto", "fp32", "fp16", "bf16", "adm_fp16"),
    "lr_schedule": ("constant", "cosine"),
    "schedule_sampler": ("uniform", "loss-second-moment"),
    "noise_schedule": ("linear", "cosine"),
}

# Numeric ranges beyond types: key -> (low, high, low inclusive, high inclusive); values must be finite.
RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "lr": (0.0, math.inf, False, False),
    "weight_decay": (0.0, math.inf, True, False),
    "dropout": (0.0, 1.0, True, False),
    "grad_clip": (0.0, math.inf, True, False),
    "max_steps": (0, math.inf, True, False),
    "lr_anneal_steps": (0, math.inf, True, False),
    "save_interval": (0, math.inf, True, False),
    "log_interval": (0, math.inf, True, False),
    "sample_interval": (0, math.inf, True, False),
    "keep_checkpoints": (0, math.inf, True, False),
    "memory_log_interval": (0, math.inf, True, False),
    "cache_save_interval": (-1, math.inf, True, False),
    "max_nonfinite_skips": (0, math.inf, True, False),
    "input_perturb": (0.0, math.inf, True, False),
    "fp16_scale_growth": (0.0, math.inf, True, False),
    "mlp_ratio": (0.0, math.inf, False, False),
    "class_dropout_prob": (0.0, 1.0, True, False),
}

# A DiT section names one of the paper's grid ("DiT-S/2" ... "DiT-XL/8") or this, then sets its own sizes.
CUSTOM_DIT = "custom"

# String keys that YAML may type as numbers (`timestep_respacing: 100`); stored as strings.
NUMBER_AS_STRING_KEYS = frozenset({"timestep_respacing", "attention_resolutions", "channel_mult", "ema_rate"})

MINIMUMS: dict[str, float] = {
    "batch_size": 1, "num_samples": 1, "diffusion_steps": 1, "image_size": 1, "patch_size": 1,
    "hidden_size": 1, "depth": 1, "num_classes": 1,
}

PATH_KEYS = ("model", "diffusion")
SOURCE_KEY = "config"  # records the YAML a config was loaded from
KD_SECTIONS = ("teacher", "student")

# YAML sections of distillation methods (`tccd:`, `relational:`, ...) -> their schema. The methods add
# themselves (`register_section`, called when guided_diffusion.distill is imported); the core imports none.
_METHOD_SECTIONS: dict[str, Callable[[], dict[str, Any]]] = {}


class ConfigError(ValueError):
    """A config problem found before any model is built; the message is one line naming file and key."""


def _model_and_diffusion_defaults(dit: bool = False) -> dict[str, Any]:
    from guided_diffusion.script_util import dit_model_and_diffusion_defaults, model_and_diffusion_defaults

    return dit_model_and_diffusion_defaults() if dit else model_and_diffusion_defaults()


def section_defaults(kind: str, dit: bool = False) -> dict[str, Any]:
    """Defaults of a section kind: "flat" (baseline/sample/student) or "teacher"; the keys are the schema.
    `dit`: the section's network is a DiT (its arch keys instead of the UNet's)."""
    defaults = dict(_model_and_diffusion_defaults(dit))
    defaults.update(SAMPLING_DEFAULTS)
    if kind == "flat":
        defaults.update(TRAINING_DEFAULTS)
    elif kind == "teacher":
        defaults.update(teacher_schema().defaults())
    else:
        raise ValueError(f"unknown section kind {kind!r}")
    return defaults


@dataclass(frozen=True)
class TeacherSchema:
    """What DKDM adds to a KD config's `teacher:` section beside the model and sampling keys (registered by
    guided_diffusion.distill): its keys with defaults, the values a key may take, the authors' spellings of
    values and their alias keys, and `check(section, where)`, which raises ValueError on a bad value."""

    defaults: Callable[[], dict[str, Any]]
    choices: Mapping[str, tuple[str, ...]]
    value_aliases: Mapping[str, Mapping[str, str]]
    key_aliases: Mapping[str, str]
    check: Callable[[Mapping[str, Any], str], None]


_TEACHER_SCHEMA: TeacherSchema | None = None  # the registered one


def register_teacher_section(schema: TeacherSchema) -> None:
    """Make `schema` the `teacher:` section's (DKDM registers it when guided_diffusion.distill is loaded)."""
    global _TEACHER_SCHEMA
    _TEACHER_SCHEMA = schema


def teacher_schema() -> TeacherSchema:
    """The registered `teacher:` schema; a ConfigError when none is (nothing imported DKDM)."""
    if _TEACHER_SCHEMA is None:
        raise ConfigError("a KD config's teacher: section is DKDM's; import guided_diffusion.distill, which "
                          "registers it, before loading one")
    return _TEACHER_SCHEMA


def register_section(name: str, defaults: Callable[[], dict[str, Any]]) -> None:
    """Make `name:` a YAML section whose keys and defaults are `defaults()` (a method registers its own)."""
    if name in KD_SECTIONS or not name.isidentifier():
        raise ValueError(f"cannot register a method section named {name!r}")
    _METHOD_SECTIONS[name] = defaults


def unregister_section(name: str) -> None:
    """Forget a registered method section (tests)."""
    _METHOD_SECTIONS.pop(name, None)


def method_defaults(name: str) -> dict[str, Any]:
    """Defaults of a method section (`tccd:`, `relational:`, ...) as its method registered them; a name
    no method owns is a ConfigError."""
    defaults = _METHOD_SECTIONS.get(name)
    if defaults is None:
        known = sorted(_METHOD_SECTIONS)
        hint = "" if known else "; method sections are registered by importing guided_diffusion.distill"
        names = ["teacher", "student", *known]
        raise ConfigError(
            f"unknown section '{name}': no method owns it (known: {', '.join(names)})"
            f"{_suggest(name, names)}{hint}"
        )
    return dict(defaults())


# ---------------------------------------------------------------------------------------------------------
# Files


def check_file_exists(path: str | os.PathLike, what: str) -> Path:
    """Return `path` as an existing file (relative to the cwd, else the repo root) or raise ConfigError."""
    given = Path(path)
    candidates = [given] if given.is_absolute() else [given, REPO_ROOT / given]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{what} not found: {path}")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as exc:  # omegaconf and yaml raise many types; all mean "unreadable"
        message = " ".join(str(exc).split())
        raise ConfigError(f"{path}: cannot parse YAML: {message}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------------------------------
# Validation


def _suggest(key: str, valid: list[str]) -> str:
    """The nearest valid name: an abbreviation first (learning_rate -> lr), then the closest spelling."""

    def initials(name: str) -> str:
        return "".join(part[:1] for part in name.lower().split("_") if part)

    close = [name for name in valid if initials(key) == name.lower() or initials(name) == key.lower()]
    close = close or difflib.get_close_matches(key, valid, n=1, cutoff=0.3)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_keys(keys: Mapping[str, Any], valid: list[str], source: str, where: str) -> None:
    for key in keys:
        if key not in valid:
            raise ConfigError(f"{source}: unknown key '{key}' in {where}{_suggest(str(key), valid)}")


def _coerce(key: str, value: Any, default: Any, source: str, where: str) -> Any:
    """Check `value` against the type of `default`; int is fine for float, bool strings for bool."""
    if default is None:
        return value

    def wrong(expected: str) -> ConfigError:
        return ConfigError(
            f"{source}: key '{key}' in {where} must be {expected}, got {type(value).__name__} {value!r}"
        )

    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            from guided_diffusion.script_util import str2bool

            try:
                return str2bool(value)
            except argparse.ArgumentTypeError:
                raise wrong("a bool") from None
        raise wrong("a bool")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong("an int")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise wrong("a float")
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        if key in NUMBER_AS_STRING_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise wrong("a string")
    if isinstance(default, (list, tuple)):
        if isinstance(value, (list, tuple)):
            return list(value)
        raise wrong("a list")
    if isinstance(default, dict):
        if isinstance(value, dict):
            return value
        raise wrong("a mapping")
    return value


def _check_values(
    section: dict[str, Any], source: str, where: str, schema: TeacherSchema | None = None
) -> None:
    """Value checks beyond types: choices, minimums, respacing, ranges (and a teacher schema's own)."""
    aliases = schema.value_aliases if schema else {}
    for key, choices in {**CHOICES, **(schema.choices if schema else {})}.items():
        if key in section:
            value = aliases.get(key, {}).get(section[key], section[key])
            if value not in choices:
                raise ConfigError(
                    f"{source}: invalid {key} '{section[key]}' in {where} (choose from {', '.join(choices)})"
                )
            section[key] = value
    for key, minimum in MINIMUMS.items():
        if key in section and section[key] < minimum:
            raise ConfigError(f"{source}: {key} {section[key]} in {where} must be at least {minimum}")
    if schema is not None:
        try:
            schema.check(section, where)
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    for key, (low, high, low_in, high_in) in RANGES.items():
        value = section.get(key)
        if value is None or isinstance(value, bool):
            continue
        inside = (value >= low if low_in else value > low) and (value <= high if high_in else value < high)
        if not (math.isfinite(value) and inside):
            bounds = f"{'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"
            raise ConfigError(f"{source}: {key} {value} in {where} must be finite and in {bounds}")
    if "ema_rate" in section:
        _check_ema_rates(section["ema_rate"], source, where)
    _check_respacing(section, source, where)
    _check_architecture(section, source, where)


def _check_ema_rates(value: str, source: str, where: str) -> None:
    try:
        rates = [float(part) for part in str(value).split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{source}: ema_rate '{value}' in {where} is not a list of numbers") from None
    bad = [rate for rate in rates if not 0.0 <= rate < 1.0]
    if bad:
        raise ConfigError(f"{source}: ema_rate '{value}' in {where}: rates must be in [0, 1), got {bad[0]}")


def _check_architecture(section: dict[str, Any], source: str, where: str) -> None:
    """Build the section's network on the meta device (no memory): a shape problem (channel_mult,
    attention_resolutions, num_head_channels, a patch size that does not tile the image, ...) surfaces now,
    naming the file, not after a run dir exists. UNet attention must land on a level the UNet has."""
    from guided_diffusion.script_util import is_dit_section

    try:
        if is_dit_section(section):
            _check_dit(section)
        else:
            _check_unet(section)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"{source}: model in {where}: {str(exc).splitlines()[0]}") from None


def _check_unet(section: dict[str, Any]) -> None:
    from guided_diffusion.script_util import create_model, parse_attention_resolutions, parse_channel_mult

    accepted = inspect.signature(create_model).parameters
    kwargs = {key: section[key] for key in accepted if key in section}
    mult = parse_channel_mult(section["channel_mult"], section["image_size"])
    rates = parse_attention_resolutions(section["attention_resolutions"], section["image_size"])
    levels = {2**level for level in range(len(mult))}
    missing = [section["image_size"] // rate for rate in rates if rate not in levels]
    if missing:
        raise ValueError(
            f"attention_resolutions {section['attention_resolutions']!r}: the UNet has no "
            f"{missing[0]}px level (levels {sorted(section['image_size'] // r for r in levels)})"
        )
    with torch.device("meta"):
        create_model(**kwargs)


def _check_dit(section: dict[str, Any]) -> None:
    from guided_diffusion.dit import DIT_CONFIGS
    from guided_diffusion.script_util import create_dit_model

    name = section["model_name"]
    if name not in DIT_CONFIGS and name != CUSTOM_DIT:
        raise ValueError(f"unknown model_name {name!r} (one of {', '.join(DIT_CONFIGS)} or {CUSTOM_DIT})")
    if section["in_channels"] != 3:
        raise ValueError(
            f"in_channels {section['in_channels']}: the DiT defaults are the authors' latent-space ones; "
            "this project works on RGB pixels, set in_channels: 3"
        )
    if section.get("precision") == "adm_fp16":
        raise ValueError("precision adm_fp16 is guided-diffusion's fp16 of the ADM UNet; a DiT: fp16 or bf16")
    accepted = inspect.signature(create_dit_model).parameters
    kwargs = {key: section[key] for key in accepted if key in section}
    with torch.device("meta"):
        create_dit_model(input_size=section["image_size"], use_class=section["class_cond"], **kwargs)


def _check_dit_keys(given: Mapping[str, Any], source: str, where: str) -> None:
    """A DiT section's explicit keys: no UNet-only key, and with a named model no size that contradicts it
    (the name fixes patch_size, hidden_size, depth and num_heads)."""
    from guided_diffusion.dit import DIT_CONFIGS
    from guided_diffusion.script_util import dit_model_and_diffusion_defaults, model_and_diffusion_defaults

    unet_only = set(model_and_diffusion_defaults()) - set(dit_model_and_diffusion_defaults())
    for key in given:
        if key in unet_only:
            raise ConfigError(
                f"{source}: key '{key}' in {where} is a UNet setting; a DiT (model_name "
                f"{given['model_name']!r}) does not take it"
            )
    name = given["model_name"]
    for key, size in DIT_CONFIGS.get(name, {}).items():
        if key in given and given[key] != size:
            raise ConfigError(
                f"{source}: {key} {given[key]} in {where} contradicts model_name {name} ({key} {size}); "
                f"drop it, or set model_name: {CUSTOM_DIT}"
            )


def _check_respacing(section: dict[str, Any], source: str, where: str) -> None:
    spec = section.get("timestep_respacing", "")
    if not spec:
        return
    from guided_diffusion.respace import space_timesteps

    steps = section["diffusion_steps"]
    try:
        space_timesteps(steps, spec)
    except ValueError as exc:
        raise ConfigError(
            f"{source}: timestep_respacing '{spec}' in {where} is invalid for diffusion_steps {steps}: {exc}"
        ) from exc


# ---------------------------------------------------------------------------------------------------------
# Building sections


def _apply_aliases(raw: dict[str, Any], source: str, where: str) -> dict[str, Any]:
    """Rename the teacher schema's alias keys to the authors' keys; giving both spellings is a ConfigError."""
    resolved = dict(raw)
    for alias, key in teacher_schema().key_aliases.items():
        if alias in resolved:
            if key in resolved:
                raise ConfigError(f"{source}: {where} sets both '{alias}' and '{key}' (the same setting)")
            resolved[key] = resolved.pop(alias)
    return resolved


def _resolve_section(
    raw: dict[str, Any], kind: str, source: str, where: str, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Merge arch file < diffusion file < section keys < overrides, fill defaults, validate. A section
    whose arch file or own keys name a `model_name` is a DiT and gets the DiT's schema."""
    if kind == "teacher":
        raw = _apply_aliases(raw, source, where)
    files: dict[str, tuple[Path, dict[str, Any]]] = {}
    for path_key in PATH_KEYS:
        if path_key in raw:
            if not isinstance(raw[path_key], str):
                raise ConfigError(
                    f"{source}: key '{path_key}' in {where} must be a file path, got {raw[path_key]!r}"
                )
            path = check_file_exists(raw[path_key], f"{source}: {path_key} file of {where}")
            files[path_key] = (path, _read_yaml(path))
    explicit = {**{k: v for _, keys in files.values() for k, v in keys.items()}, **raw, **(overrides or {})}
    dit = bool(explicit.get("model_name"))
    defaults = section_defaults(kind, dit=dit)
    valid = sorted([*defaults, *PATH_KEYS])
    if dit:
        _check_dit_keys(explicit, source, where)
    _check_keys(raw, valid, source, where)
    own = {key: _coerce(key, value, defaults.get(key), source, where) for key, value in raw.items()}
    if overrides:
        _check_keys(overrides, valid, "command line", where)
        own.update(
            {
                key: _coerce(key, value, defaults.get(key), "command line", where)
                for key, value in overrides.items()
            }
        )

    merged: dict[str, Any] = {}
    for path_key, (path, file_keys) in files.items():
        _check_keys(file_keys, sorted(defaults), str(path), where)
        merged.update({k: _coerce(k, v, defaults[k], str(path), where) for k, v in file_keys.items()})
        own[path_key] = str(path)
    merged.update(own)
    for key, value in defaults.items():
        merged.setdefault(key, value)
    _check_values(merged, source, where, teacher_schema() if kind == "teacher" else None)
    return merged


def _resolve_method(name: str, raw: Any, source: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: section '{name}' must be a mapping, got {type(raw).__name__}")
    try:
        defaults = method_defaults(name)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    return resolve_with_defaults(raw, defaults, source, name)


def resolve_with_defaults(
    raw: Mapping[str, Any], defaults: Mapping[str, Any], source: str, where: str
) -> dict[str, Any]:
    """`raw` over `defaults`: unknown keys (with the nearest name) and values of the wrong type are a
    one-line ConfigError naming `source` and `where`."""
    _check_keys(raw, sorted(defaults), source, where)
    merged = dict(defaults)
    merged.update({key: _coerce(key, value, defaults.get(key), source, where) for key, value in raw.items()})
    return merged


def is_kd_config(cfg: Mapping[str, Any]) -> bool:
    """True for a distillation config (top-level `teacher:` and `student:` sections)."""
    return "teacher" in cfg and "student" in cfg


def primary_section(cfg: DictConfig) -> DictConfig:
    """The section scripts train or sample with: the flat config itself, or `cfg.student` for KD."""
    return cfg.student if is_kd_config(cfg) else cfg


def load_config(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> DictConfig:
    """Load, merge, fill and validate the YAML at `path`; `overrides` (None values skipped) go to the flat
    config or to `student`."""
    config_path = check_file_exists(path, "config file")
    source = str(config_path)
    raw = _read_yaml(config_path)
    raw.pop(SOURCE_KEY, None)
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    methods: dict[str, Any] = {}
    if any(name in raw for name in KD_SECTIONS):
        for name in KD_SECTIONS:
            if not isinstance(raw.get(name), dict):
                raise ConfigError(
                    f"{source}: a KD config needs a '{name}:' mapping next to the other section"
                )
        for name in [key for key in raw if key not in KD_SECTIONS]:
            methods[name] = _resolve_method(name, raw.pop(name), source)
        resolved: dict[str, Any] = {
            "teacher": _resolve_section(raw["teacher"], "teacher", source, "teacher"),
            "student": _resolve_section(raw["student"], "flat", source, "student", given),
        }
    else:
        resolved = _resolve_section(raw, "flat", source, "the config", given)
    resolved.update(methods)
    resolved[SOURCE_KEY] = source
    return OmegaConf.create(resolved)


def model_and_diffusion_kwargs(section: Mapping[str, Any]) -> dict[str, Any]:
    """Exactly the factory arguments of a resolved section: `create_model_and_diffusion`'s, or
    `create_dit_model_and_diffusion`'s for a DiT section (script_util.create_any_model_and_diffusion)."""
    from guided_diffusion.script_util import architecture_defaults

    keys = architecture_defaults(section)
    missing = [key for key in keys if key not in section]
    if missing:
        raise ConfigError(f"section lacks model/diffusion keys {missing}; was it made by load_config?")
    return {key: section[key] for key in keys}


def validate_world_size(cfg: DictConfig, world_size: int) -> None:
    """Raise ConfigError unless the primary section's batch_size splits evenly over `world_size` ranks."""
    section = primary_section(cfg)
    if section.batch_size % world_size != 0:
        where = "student" if is_kd_config(cfg) else "the config"
        raise ConfigError(
            f"{cfg.get(SOURCE_KEY, 'config')}: batch_size {section.batch_size} in {where} is not divisible "
            f"by the number of ranks {world_size}"
        )


INPUT_PATH_KEYS = ("model_path", "data_dir", "resume_checkpoint")


def check_input_files(cfg: DictConfig) -> None:
    """Raise ConfigError if a file or folder the run will read (checkpoints, data, resume path) is missing,
    or a KD config names no teacher checkpoint, so a typo fails before any model is built."""
    source = cfg.get(SOURCE_KEY, "config")
    sections = {name: cfg[name] for name in KD_SECTIONS} if is_kd_config(cfg) else {"the config": cfg}
    if is_kd_config(cfg) and not cfg.teacher.get("model_path"):
        raise ConfigError(f"{source}: model_path in teacher is empty; DKDM needs the teacher checkpoint")
    for where, section in sections.items():
        for key in INPUT_PATH_KEYS:
            value = section.get(key)
            if value and not os.path.exists(str(value)):
                hint = published_teacher_hint(value) if key == "model_path" else ""
                raise ConfigError(f"{source}: {key} in {where} does not exist: {value}{hint}")


def save_config(cfg: DictConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (temp file in the same folder, fsync, rename)."""
    atomic_write_text(path, OmegaConf.to_yaml(cfg))


# ---------------------------------------------------------------------------------------------------------
# Command line


class ConfigArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that remembers which flags override config keys."""

    override_keys: tuple[str, ...] = ()


# Command-line overrides every training script takes (image_train, image_kd adds its own).
TRAINING_FLAGS: dict[str, type] = {
    "data_dir": str,
    "resume_checkpoint": str,
    "batch_size": int,
    "microbatch": int,
    "lr": float,
    "max_steps": int,
    "log_interval": int,
    "save_interval": int,
    "sample_interval": int,
    "keep_checkpoints": int,
    "deterministic": bool,
    "precision": str,
    "seed": int,
}


def build_arg_parser(description: str, flags: Mapping[str, type]) -> ConfigArgumentParser:
    """A parser with `--config` plus one `--<key>` per flag (default None = keep the YAML's value)."""
    from guided_diffusion.script_util import str2bool

    parser = ConfigArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="experiment YAML, e.g. yaml/cifar10_32/teacher.yaml")
    for key, kind in flags.items():
        parser.add_argument(f"--{key}", type=str2bool if kind is bool else kind, default=None)
    parser.override_keys = tuple(flags)
    return parser


def parse_config_args(
    parser: ConfigArgumentParser, argv: list[str] | None = None
) -> tuple[argparse.Namespace, DictConfig]:
    """Parse the command line, load its `--config` with the given flags as overrides and check that the input
    files exist; exit with a one-line error otherwise."""
    args = parser.parse_args(argv)
    overrides = {key: getattr(args, key) for key in parser.override_keys}
    try:
        cfg = load_config(args.config, overrides)
        check_input_files(cfg)
    except ConfigError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    return args, cfg
